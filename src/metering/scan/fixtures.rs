//! Shared wire fixtures; the directory is named only here.

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/", $name)).as_slice()
    };
}
pub const UNARY: &[u8] = fixture!("unary.json");
pub const UNARY_BLOCKED: &[u8] = fixture!("unary-blocked.json");
pub const SSE_CRLF: &[u8] = fixture!("stream-sse-crlf.txt");
pub const SSE_LF_FINAL: &[u8] = fixture!("stream-sse-lf-final-usage.txt");
pub const JSON_ARRAY: &[u8] = fixture!("stream-json-array.txt");
pub const SSE_MIDSTREAM_ERROR: &[u8] = fixture!("stream-sse-midstream-error.txt");
pub const OPENAI_STREAM: &[u8] = fixture!("openai-stream.txt");
pub const ERROR_429: &[u8] = fixture!("error-429.json");

use super::Format;

/// Every fixture with the framing it uses.
pub const ALL: &[(&str, Format, &[u8])] = &[
    ("unary", Format::UnaryJson, UNARY),
    ("unary-blocked", Format::UnaryJson, UNARY_BLOCKED),
    ("sse-crlf", Format::Sse, SSE_CRLF),
    ("sse-lf-final", Format::Sse, SSE_LF_FINAL),
    ("json-array", Format::JsonArray, JSON_ARRAY),
    ("sse-midstream-error", Format::Sse, SSE_MIDSTREAM_ERROR),
    ("openai-stream", Format::OpenAiSse, OPENAI_STREAM),
    ("error-429", Format::UnaryJson, ERROR_429),
];
