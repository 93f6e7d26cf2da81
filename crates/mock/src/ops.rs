//! Long-running operations: Veo's `predictLongRunning`, tuning jobs and file search imports.
//! Each operation is found by its id (the last segment of its name); the first poll answers it
//! unfinished, later polls finished with its response. A missing one is 404 NOT_FOUND.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use super::body::MockBody;
use super::files::{self, Files, NewFile};
use super::store::{Collection, not_found, pretty};
use super::{random_id, wire};

const TYPE_PREFIX: &str = "type.googleapis.com/google.ai.generativelanguage.v1beta.";

/// The bytes of a generated video: the `ftyp` box of an empty MP4.
const FAKE_MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom";

/// What an operation produces when it finishes.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A Veo video: a generated file is created at completion.
    Video { host: String, samples: u32 },
    /// A fixed response (tuning, file search).
    Fixed(Value),
}

/// A stored operation.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    name: String,
    metadata: Option<Value>,
    polls: u32,
    outcome: Outcome,
    response: Option<Value>,
}

#[derive(Serialize)]
struct View<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a Value>,
}

impl Op {
    /// The full resource name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// True once the operation has its response.
    pub(crate) fn is_done(&self) -> bool {
        self.response.is_some()
    }

    fn view(&self) -> View<'_> {
        View {
            name: &self.name,
            metadata: self.metadata.as_ref(),
            done: self.response.is_some(),
            response: self.response.as_ref(),
        }
    }
}

impl Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.view().serialize(s)
    }
}

/// Every operation of one mock, by operation id.
#[derive(Debug, Default)]
pub(crate) struct Operations {
    items: Collection<Op>,
}

impl Operations {
    /// Stores a new operation named `{parent}/operations/{id}` (or `operations/{id}`) and
    /// returns it.
    pub(crate) fn create(&self, parent: Option<&str>, metadata: Option<Value>, outcome: Outcome) -> Op {
        let id = random_id(12).to_ascii_lowercase();
        let name = match parent {
            Some(p) => format!("{p}/operations/{id}"),
            None => format!("operations/{id}"),
        };
        let op = Op {
            name,
            metadata,
            polls: 0,
            outcome,
            response: None,
        };
        self.items.insert(&id, op.clone());
        op
    }

    /// Polls operation `id`: the first poll leaves it running, the next finishes it. `full`
    /// is the name asked for, when the path named one (it must match).
    pub(crate) fn poll(&self, files: &Files, id: &str, full: Option<&str>) -> Option<Op> {
        self.items
            .update(id, |op| {
                if full.is_some_and(|f| f != op.name) {
                    return None;
                }
                op.polls = op.polls.saturating_add(1);
                if op.polls >= 2 && op.response.is_none() {
                    op.response = Some(finish(files, &op.outcome));
                }
                Some(op.clone())
            })
            .flatten()
    }

    /// True when operation `id` has finished (without polling it).
    pub(crate) fn is_done(&self, id: &str) -> bool {
        self.items.get(id).is_some_and(|op| op.is_done())
    }

    /// `GET {name}` of an operation.
    pub(crate) fn get_response(&self, files: &Files, id: &str, full: Option<&str>) -> Response<MockBody> {
        match self.poll(files, id, full) {
            Some(op) => pretty(StatusCode::OK, &op),
            None => not_found(),
        }
    }

    /// `GET operations`.
    pub(crate) fn list(&self, query: Option<&str>) -> Response<MockBody> {
        self.items.list_response("operations", query)
    }
}

/// The response of a finished operation.
fn finish(files: &Files, outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Fixed(v) => v.clone(),
        Outcome::Video { host, samples } => {
            let samples: Vec<Value> = (0..*samples)
                .map(|_| {
                    let f = files.create(NewFile {
                        host: host.clone(),
                        display_name: None,
                        mime: "video/mp4".to_owned(),
                        size: FAKE_MP4.len() as u64,
                        sha256: files::digest(FAKE_MP4),
                        data: Some(Bytes::from_static(FAKE_MP4)),
                        source: "GENERATED",
                    });
                    json!({"video": {"uri": format!("http://{host}/v1beta/{}:download?alt=media", f.name)}})
                })
                .collect();
            json!({
                "@type": format!("{TYPE_PREFIX}PredictLongRunningResponse"),
                "generateVideoResponse": {"generatedSamples": samples},
            })
        }
    }
}

/// `POST models/{m}:predictLongRunning`: `{"name": "models/{m}/operations/{id}"}`;
/// `parameters.sampleCount` videos (default 1).
pub(crate) fn predict_long_running(ops: &Operations, host: String, model: &str, body: &[u8]) -> Response<MockBody> {
    let samples = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/parameters/sampleCount").and_then(Value::as_u64))
        .map_or(1, |n| n.clamp(1, 4) as u32);
    let op = ops.create(Some(&format!("models/{model}")), None, Outcome::Video { host, samples });
    pretty(StatusCode::OK, &json!({"name": op.name}))
}

/// Now as an RFC 3339 string.
pub(crate) fn now() -> String {
    let (secs, micros) = wire::now_micros();
    wire::rfc3339(secs, micros)
}

/// `type.googleapis.com/google.ai.generativelanguage.v1beta.{name}`.
pub(crate) fn type_url(name: &str) -> String {
    format!("{TYPE_PREFIX}{name}")
}
