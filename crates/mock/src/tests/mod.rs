//! Tests over real sockets with reqwest: every route and framing, the counters, uploads,
//! gzip, auth, failure injection, and the wire shape of each framing against the fixtures.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;

use super::*;

mod bench;
mod framing;
mod long_running;
mod resources;
mod service;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const FLASH: &str = "/v1beta/models/gemini-2.5-flash";
// 40 bytes: 10 prompt tokens.
const BODY40: &str = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;

async fn mock(opts: MockOptions) -> io::Result<MockServer> {
    MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
}

fn url(m: &MockServer, path: &str) -> String {
    format!("http://{}{}", m.addr, path)
}

fn stat(m: &MockServer, f: fn(&MockStats) -> &AtomicU64) -> u64 {
    f(&m.stats).load(Relaxed)
}

async fn post(m: &MockServer, path: &str, body: &'static str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .post(url(m, path))
        .header("x-goog-api-key", "AIzaTEST")
        .body(body)
        .send()
        .await
}

/// Reads every body frame separately.
async fn frames(mut resp: reqwest::Response) -> reqwest::Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await? {
        out.push(c);
    }
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixture(name: &str) -> Option<Vec<u8>> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        std::env::var_os("GEMINI_METER_FIXTURES").map(PathBuf::from),
        Some(manifest.join("../shared/fixtures")),
        Some(manifest.join("../../shared/fixtures")),
        Some(manifest.join("../../../shared/fixtures")),
        Some(PathBuf::from("/work/shared/fixtures")),
    ]
    .into_iter()
    .flatten()
    .find_map(|dir| std::fs::read(dir.join(name)).ok())
}

/// The comparable wire properties of an SSE body (native or OpenAI).
#[derive(Debug, PartialEq)]
struct SseShape {
    eol: &'static str,
    /// Every event is one `data: ` line holding single-line JSON (or `[DONE]`).
    single_line_events: bool,
    /// `": "` after keys (native style) vs none (OpenAI style).
    colon_space: bool,
    /// Which events carry usage (`usageMetadata` or `usage`).
    usage_on: Vec<bool>,
    /// Which events carry a finish reason.
    finish_on: Vec<bool>,
    done_sentinel: bool,
    /// What follows the last `data:` event, if anything (a raw error object).
    trailer: String,
}

fn sse_shape(body: &[u8]) -> SseShape {
    let s = text(body);
    let eol = if s.contains("\r\n") { "\r\n" } else { "\n" };
    let sep = format!("{eol}{eol}");
    let mut parts: Vec<&str> = s.split(sep.as_str()).collect();
    let trailer = parts.pop().unwrap_or_default().to_owned();
    let mut events = Vec::new();
    let mut trailer_parts = Vec::new();
    for p in parts {
        if p.starts_with("data: ") && !p.contains('\n') {
            events.push(&p[6..]);
        } else {
            trailer_parts.push(p);
        }
    }
    trailer_parts.push(&trailer);
    let done_sentinel = events.last() == Some(&"[DONE]");
    let json_events: Vec<&str> = events.iter().copied().filter(|e| *e != "[DONE]").collect();
    let values: Vec<Value> = json_events
        .iter()
        .map(|e| serde_json::from_str(e).expect("event is JSON"))
        .collect();
    SseShape {
        eol,
        single_line_events: !events.is_empty(),
        colon_space: json_events.iter().all(|e| e.contains("\": ")),
        usage_on: values
            .iter()
            .map(|v| v.get("usageMetadata").is_some() || v.get("usage").is_some())
            .collect(),
        finish_on: values
            .iter()
            .map(|v| {
                let c = v.get("candidates").or_else(|| v.get("choices"));
                let c0 = &c.expect("candidates")[0];
                c0.get("finishReason").is_some() || c0.get("finish_reason").is_some_and(|f| !f.is_null())
            })
            .collect(),
        done_sentinel,
        trailer: trailer_parts.join("|"),
    }
}

/// The comparable wire properties of a JSON-array stream.
#[derive(Debug, PartialEq)]
struct ArrayShape {
    starts: String,
    separators: usize,
    ends: String,
    /// Elements are pretty-printed: each starts with `{\n  "` and ends with `\n}`.
    pretty: bool,
    elements: usize,
}

fn array_shape(body: &[u8]) -> ArrayShape {
    let s = text(body);
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix("\r\n]"))
        .expect("array framing");
    let elems: Vec<&str> = inner.split("\r\n,\r\n").collect();
    let parsed: Value = serde_json::from_str(&s).expect("whole body is a JSON array");
    assert_eq!(parsed.as_array().map(Vec::len), Some(elems.len()));
    ArrayShape {
        starts: s.chars().take(5).collect(),
        separators: s.matches("\r\n,\r\n").count(),
        ends: s[s.len() - 4..].to_owned(),
        pretty: elems.iter().all(|e| e.starts_with("{\n  \"") && e.ends_with("\n}")),
        elements: elems.len(),
    }
}
