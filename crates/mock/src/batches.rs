//! Batches: `models/{m}:batchGenerateContent` and `models/{m}:asyncBatchEmbedContent` create
//! `batches/{id}`, an Operation-like object whose state advances on each get (PENDING at
//! creation, RUNNING at the first get, SUCCEEDED with the responses afterwards); list, cancel
//! and delete. Inlined requests answer inlined responses; `inputConfig.fileName` (a JSONL file
//! of `{"key","request"}` lines) answers a `responsesFile`. A missing batch is 404 NOT_FOUND.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::body::MockBody;
use super::files::{self, Files, NewFile};
use super::generate::usage_for;
use super::random_id;
use super::store::{Collection, empty_ok, error_status, invalid, not_found, pretty};
use super::wire::{self, Tokens};

const TYPE_PREFIX: &str = "type.googleapis.com/google.ai.generativelanguage.v1main.";

/// What a batch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// batchGenerateContent.
    Generate,
    /// asyncBatchEmbedContent.
    Embed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Succeeded,
    Cancelled,
}

impl State {
    fn wire(self) -> &'static str {
        match self {
            State::Pending => "BATCH_STATE_PENDING",
            State::Running => "BATCH_STATE_RUNNING",
            State::Succeeded => "BATCH_STATE_SUCCEEDED",
            State::Cancelled => "BATCH_STATE_CANCELLED",
        }
    }

    fn done(self) -> bool {
        matches!(self, State::Succeeded | State::Cancelled)
    }
}

/// One request of a batch and what it will answer.
#[derive(Debug)]
struct Item {
    /// `metadata` of an inlined request.
    metadata: Option<Value>,
    /// `key` of a JSONL line.
    key: Option<Value>,
    tokens: Tokens,
    embedding: [f64; 8],
    response_id: String,
}

/// A stored batch.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    name: String,
    kind: Kind,
    /// `models/{m}`.
    model: String,
    display_name: Option<String>,
    create_time: String,
    update_time: String,
    end_time: Option<String>,
    state: State,
    items: Arc<Vec<Item>>,
    /// The input came from a file: the output goes to one too.
    from_file: bool,
    responses_file: Option<String>,
    host: String,
}

#[derive(Deserialize)]
struct CreateBody {
    batch: Option<BatchIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchIn {
    display_name: Option<String>,
    input_config: Option<InputConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputConfig {
    requests: Option<Requests>,
    file_name: Option<String>,
}

#[derive(Deserialize)]
struct Requests {
    #[serde(default)]
    requests: Vec<InlinedRequest>,
}

#[derive(Deserialize)]
struct InlinedRequest {
    #[serde(default)]
    request: Value,
    metadata: Option<Value>,
}

#[derive(Deserialize)]
struct FileLine {
    key: Option<Value>,
    #[serde(default)]
    request: Value,
}

/// Every batch of one mock.
#[derive(Debug, Default)]
pub(crate) struct Batches {
    items: Collection<Batch>,
}

/// What a batch needs from its surroundings.
pub(crate) struct Ctx<'a> {
    pub files: &'a Files,
    pub text: &'a str,
    pub chunks: u32,
    pub host: String,
}

impl Batches {
    /// `POST models/{m}:batchGenerateContent` / `:asyncBatchEmbedContent`.
    pub(crate) fn create(&self, ctx: &Ctx<'_>, kind: Kind, model_id: &str, body: &[u8]) -> Response<MockBody> {
        let Ok(req) = serde_json::from_slice::<CreateBody>(body) else {
            return invalid("Invalid JSON payload received.");
        };
        let Some(batch) = req.batch else {
            return invalid("batch is required.");
        };
        let Some(input) = batch.input_config else {
            return invalid("batch.input_config is required.");
        };
        let from_file = input.file_name.is_some();
        let items = match (input.requests, input.file_name) {
            (Some(r), None) => r
                .requests
                .into_iter()
                .map(|r| item(kind, ctx.chunks, model_id, &r.request, r.metadata, None))
                .collect(),
            (None, Some(f)) => match file_items(ctx, kind, model_id, &f) {
                Ok(items) => items,
                Err(r) => return *r,
            },
            _ => return invalid("Exactly one of input_config.requests and input_config.file_name must be set."),
        };
        let (secs, micros) = wire::now_micros();
        let now = wire::rfc3339(secs, micros);
        let id = random_id(12).to_ascii_lowercase();
        let b = Batch {
            name: format!("batches/{id}"),
            kind,
            model: format!("models/{model_id}"),
            display_name: batch.display_name,
            update_time: now.clone(),
            create_time: now,
            end_time: None,
            state: State::Pending,
            from_file,
            items: Arc::new(items),
            responses_file: None,
            host: ctx.host.clone(),
        };
        self.items.insert(&id, b.clone());
        pretty(StatusCode::OK, &b.view(ctx.text))
    }

    /// `GET batches/{id}`: advances PENDING → RUNNING → SUCCEEDED.
    pub(crate) fn get(&self, ctx: &Ctx<'_>, id: &str) -> Response<MockBody> {
        let b = self.items.update(id, |b| {
            let next = match b.state {
                State::Pending => State::Running,
                State::Running => State::Succeeded,
                s => s,
            };
            if next != b.state {
                let (secs, micros) = wire::now_micros();
                b.update_time = wire::rfc3339(secs, micros);
                b.state = next;
                if next == State::Succeeded {
                    b.end_time = Some(b.update_time.clone());
                    if b.from_file {
                        b.responses_file = Some(output_file(ctx, b));
                    }
                }
            }
            b.clone()
        });
        match b {
            Some(b) => pretty(StatusCode::OK, &b.view(ctx.text)),
            None => not_found(),
        }
    }

    /// `GET batches`: `{"operations": [...]}` (states are not advanced by listing).
    pub(crate) fn list(&self, text: &str, query: Option<&str>) -> Response<MockBody> {
        // Views borrow the shared text, so page over owned copies rendered on the fly.
        struct Listed<'a>(&'a str, Batch);
        impl Serialize for Listed<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.1.view(self.0).serialize(s)
            }
        }
        self.items.list_with("operations", query, |b| Listed(text, b))
    }

    /// `POST batches/{id}:cancel`: `{}`; an unfinished batch becomes CANCELLED.
    pub(crate) fn cancel(&self, id: &str) -> Response<MockBody> {
        let found = self.items.update(id, |b| {
            if !b.state.done() {
                let (secs, micros) = wire::now_micros();
                b.update_time = wire::rfc3339(secs, micros);
                b.end_time = Some(b.update_time.clone());
                b.state = State::Cancelled;
            }
        });
        match found {
            Some(()) => empty_ok(),
            None => not_found(),
        }
    }

    /// `DELETE batches/{id}`.
    pub(crate) fn delete(&self, id: &str) -> Response<MockBody> {
        match self.items.remove(id) {
            Some(_) => empty_ok(),
            None => not_found(),
        }
    }
}

fn item(kind: Kind, chunks: u32, model_id: &str, request: &Value, metadata: Option<Value>, key: Option<Value>) -> Item {
    // The request's own JSON bytes (compact) feed the mock's usage rule.
    let bytes = serde_json::to_vec(request).unwrap_or_default();
    let tokens = match kind {
        Kind::Generate => usage_for(chunks, &bytes, model_id),
        Kind::Embed => Tokens {
            prompt: 0,
            candidates: 0,
            thoughts: 0,
        },
    };
    Item {
        metadata,
        key,
        tokens,
        embedding: wire::embedding(&bytes),
        response_id: random_id(16),
    }
}

/// The items of a JSONL input file.
fn file_items(ctx: &Ctx<'_>, kind: Kind, model_id: &str, name: &str) -> Result<Vec<Item>, Box<Response<MockBody>>> {
    let id = name.strip_prefix("files/").unwrap_or(name);
    let Some(f) = ctx.files.get(id) else {
        let msg = format!("You do not have permission to access the File {id} or it may not exist.");
        return Err(Box::new(error_status(StatusCode::FORBIDDEN, &msg, "PERMISSION_DENIED")));
    };
    let Some(data) = f.data else {
        return Err(Box::new(invalid("The input file is too large for the mock.")));
    };
    let mut items = Vec::new();
    for line in data.split(|b| *b == b'\n').filter(|l| !l.trim_ascii().is_empty()) {
        let Ok(l) = serde_json::from_slice::<FileLine>(line) else {
            return Err(Box::new(invalid(
                "The input file holds a line that is not a JSON request.",
            )));
        };
        items.push(item(kind, ctx.chunks, model_id, &l.request, None, l.key));
    }
    Ok(items)
}

/// Writes the JSONL responses file of a finished file batch and returns its name.
fn output_file(ctx: &Ctx<'_>, b: &Batch) -> String {
    let mut out = Vec::new();
    for it in b.items.iter() {
        let line = Line {
            key: it.key.as_ref(),
            response: ItemResponse {
                kind: b.kind,
                item: it,
                text: ctx.text,
                model: &b.model,
            },
        };
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
    }
    let file = ctx.files.create(NewFile {
        host: b.host.clone(),
        display_name: Some(format!("{}-responses", b.name.replace('/', "-"))),
        mime: "application/jsonl".to_owned(),
        size: out.len() as u64,
        sha256: files::digest(&out),
        data: Some(Bytes::from(out)),
        source: "GENERATED",
    });
    file.name
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a Value>,
    response: ItemResponse<'a>,
}

/// The response of one item: a GenerateContentResponse or an EmbedContentResponse.
struct ItemResponse<'a> {
    kind: Kind,
    item: &'a Item,
    text: &'a str,
    model: &'a str,
}

impl Serialize for ItemResponse<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.kind {
            Kind::Generate => {
                let model = self.model.strip_prefix("models/").unwrap_or(self.model);
                wire::GenerateResponse::new(self.text, true, Some(self.item.tokens), model, &self.item.response_id)
                    .serialize(s)
            }
            Kind::Embed => {
                #[derive(Serialize)]
                struct E {
                    embedding: wire::Embedding,
                }
                E {
                    embedding: wire::Embedding {
                        values: self.item.embedding,
                    },
                }
                .serialize(s)
            }
        }
    }
}

#[derive(Serialize)]
struct OpView<'a> {
    name: &'a str,
    metadata: Meta<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<Output<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta<'a> {
    #[serde(rename = "@type")]
    type_: String,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Output<'a>>,
    create_time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_time: Option<&'a str>,
    update_time: &'a str,
    batch_stats: Stats,
    state: &'static str,
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    request_count: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    successful_request_count: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending_request_count: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Output<'a> {
    #[serde(rename = "@type", skip_serializing_if = "Option::is_none")]
    type_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    responses_file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inlined_responses: Option<Inlined<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inlined_embed_content_responses: Option<Inlined<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Inlined<'a> {
    inlined_responses: InlinedList<'a>,
}

struct InlinedList<'a> {
    batch: &'a Batch,
    text: &'a str,
}

impl Serialize for InlinedList<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct One<'a> {
            response: ItemResponse<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            metadata: Option<&'a Value>,
        }
        let mut seq = s.serialize_seq(Some(self.batch.items.len()))?;
        for item in self.batch.items.iter() {
            seq.serialize_element(&One {
                response: ItemResponse {
                    kind: self.batch.kind,
                    item,
                    text: self.text,
                    model: &self.batch.model,
                },
                metadata: item.metadata.as_ref(),
            })?;
        }
        seq.end()
    }
}

impl Batch {
    fn output<'a>(&'a self, text: &'a str, with_type: bool) -> Option<Output<'a>> {
        if self.state != State::Succeeded {
            return None;
        }
        let suffix = match self.kind {
            Kind::Generate => "GenerateContentBatchOutput",
            Kind::Embed => "EmbedContentBatchOutput",
        };
        let inlined = (!self.from_file).then_some(Inlined {
            inlined_responses: InlinedList { batch: self, text },
        });
        let (gen_inlined, embed_inlined) = match self.kind {
            Kind::Generate => (inlined, None),
            Kind::Embed => (None, inlined),
        };
        Some(Output {
            type_: with_type.then(|| format!("{TYPE_PREFIX}{suffix}")),
            responses_file: self.responses_file.as_deref(),
            inlined_responses: gen_inlined,
            inlined_embed_content_responses: embed_inlined,
        })
    }

    fn view<'a>(&'a self, text: &'a str) -> OpView<'a> {
        let n = self.items.len().to_string();
        let stats = match self.state {
            State::Succeeded => Stats {
                request_count: n.clone(),
                successful_request_count: Some(n),
                pending_request_count: None,
            },
            State::Pending | State::Running => Stats {
                request_count: n.clone(),
                successful_request_count: None,
                pending_request_count: Some(n),
            },
            State::Cancelled => Stats {
                request_count: n,
                successful_request_count: None,
                pending_request_count: None,
            },
        };
        let type_name = match self.kind {
            Kind::Generate => "GenerateContentBatch",
            Kind::Embed => "EmbedContentBatch",
        };
        OpView {
            name: &self.name,
            metadata: Meta {
                type_: format!("{TYPE_PREFIX}{type_name}"),
                model: &self.model,
                display_name: self.display_name.as_deref(),
                output: self.output(text, false),
                create_time: &self.create_time,
                end_time: self.end_time.as_deref(),
                update_time: &self.update_time,
                batch_stats: stats,
                state: self.state.wire(),
                name: &self.name,
            },
            done: self.state.done(),
            response: self.output(text, true),
        }
    }
}
