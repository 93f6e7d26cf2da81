//! JSON shapes and static bodies of the mock, written the way Google writes them.
//!
//! Key order matters for byte-level fidelity (serde_json maps sort keys), so every body is
//! either a literal or a `#[derive(Serialize)]` struct whose field order is the wire order.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The text of one streamed piece; every piece is worth [`TOKENS_PER_PIECE`] output tokens.
pub(crate) const PIECE: &str = "lorem ipsum ";
/// Output tokens reported per piece.
pub(crate) const TOKENS_PER_PIECE: u64 = 3;
/// Thinking tokens reported when the model id contains "thinking".
pub(crate) const THINKING_TOKENS: u64 = 7;

pub(crate) const ERR_UNREGISTERED: &str = r#"{
  "error": {
    "code": 403,
    "message": "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
    "status": "PERMISSION_DENIED"
  }
}"#;

pub(crate) const ERR_KEY_INVALID: &str = r#"{
  "error": {
    "code": 400,
    "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {
          "service": "generativelanguage.googleapis.com"
        }
      },
      {
        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
        "locale": "en-US",
        "message": "API key not valid. Please pass a valid API key."
      }
    ]
  }
}"#;

pub(crate) const ERR_OAUTH_EXPECTED: &str = r#"{
  "error": {
    "code": 401,
    "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
    "status": "UNAUTHENTICATED"
  }
}"#;

pub(crate) const ERR_NOT_FOUND: &str = r#"{
  "error": {
    "code": 404,
    "message": "Requested entity was not found.",
    "status": "NOT_FOUND"
  }
}"#;

pub(crate) const ERR_BAD_REQUEST: &str = r#"{
  "error": {
    "code": 400,
    "message": "Request contains an invalid argument.",
    "status": "INVALID_ARGUMENT"
  }
}"#;

pub(crate) const ERR_BAD_JSON: &str = r#"{
  "error": {
    "code": 400,
    "message": "Invalid JSON payload received.",
    "status": "INVALID_ARGUMENT"
  }
}"#;

pub(crate) const ERR_TOO_LARGE: &str = r#"{
  "error": {
    "code": 413,
    "message": "Request payload size exceeds the limit of the mock.",
    "status": "INVALID_ARGUMENT"
  }
}"#;

pub(crate) const ERR_INTERNAL: &str = r#"{
  "error": {
    "code": 500,
    "message": "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    "status": "INTERNAL"
  }
}"#;

/// Also the mid-stream error object (fixtures/stream-sse-midstream-error.txt).
pub(crate) const ERR_OVERLOADED: &str = r#"{
  "error": {
    "code": 503,
    "message": "The model is overloaded. Please try again later.",
    "status": "UNAVAILABLE"
  }
}"#;

/// The mid-stream error as an OpenAI-compat `data:` event (single line).
pub(crate) const ERR_OVERLOADED_COMPACT: &str =
    r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

/// Byte-identical to fixtures/error-429.json.
pub(crate) const ERR_QUOTA: &str = r#"{
  "error": {
    "code": 429,
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "quotaDimensions": {
              "location": "global",
              "model": "gemini-2.5-flash"
            },
            "quotaValue": "10"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "15s"
      }
    ]
  }
}"#;

/// Compact JSON with `": "` after keys and no space after commas: the style of Google's SSE
/// `data:` lines (`{"candidates": [{"content": {"parts": [...],"role": "model"}...`).
struct SseFormatter;

impl serde_json::ser::Formatter for SseFormatter {
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Appends `v` in Google's single-line SSE style.
pub(crate) fn write_sse_json<T: Serialize>(out: &mut Vec<u8>, v: &T) -> serde_json::Result<()> {
    v.serialize(&mut serde_json::Serializer::with_formatter(out, SseFormatter))
}

/// Appends `v` pretty-printed with two-space indents (unary bodies, JSON-array elements).
pub(crate) fn write_pretty_json<T: Serialize>(out: &mut Vec<u8>, v: &T) -> serde_json::Result<()> {
    v.serialize(&mut serde_json::Serializer::pretty(out))
}

// serde's skip_serializing_if hands us a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The token counts of one report; `total` = prompt + candidates + thoughts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tokens {
    pub prompt: u64,
    pub candidates: u64,
    pub thoughts: u64,
}

impl Tokens {
    pub(crate) fn total(self) -> u64 {
        self.prompt + self.candidates + self.thoughts
    }
}

/// `usageMetadata`; zero fields are omitted as protobuf-JSON does.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Usage {
    #[serde(skip_serializing_if = "is_zero")]
    prompt_token_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    candidates_token_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    total_token_count: u64,
    prompt_tokens_details: [ModalityCount; 1],
    #[serde(skip_serializing_if = "is_zero")]
    thoughts_token_count: u64,
}

impl From<Tokens> for Usage {
    fn from(t: Tokens) -> Self {
        Usage {
            prompt_token_count: t.prompt,
            candidates_token_count: t.candidates,
            total_token_count: t.total(),
            prompt_tokens_details: [ModalityCount {
                modality: "TEXT",
                token_count: t.prompt,
            }],
            thoughts_token_count: t.thoughts,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModalityCount {
    modality: &'static str,
    token_count: u64,
}

/// One `GenerateContentResponse` with a single text candidate.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GenerateResponse<'a> {
    candidates: [Candidate<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_metadata: Option<Usage>,
    model_version: &'a str,
    response_id: &'a str,
}

impl<'a> GenerateResponse<'a> {
    pub(crate) fn new(
        text: &'a str,
        finished: bool,
        usage: Option<Tokens>,
        model: &'a str,
        response_id: &'a str,
    ) -> Self {
        GenerateResponse {
            candidates: [Candidate {
                content: Content {
                    parts: [Part { text }],
                    role: "model",
                },
                index: 0,
                finish_reason: finished.then_some("STOP"),
            }],
            usage_metadata: usage.map(Usage::from),
            model_version: model,
            response_id,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    content: Content<'a>,
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Content<'a> {
    parts: [Part<'a>; 1],
    role: &'static str,
}

#[derive(Serialize)]
struct Part<'a> {
    text: &'a str,
}

/// `{"totalTokens": N}` of countTokens.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CountTokens {
    pub total_tokens: u64,
}

/// OpenAI-compat usage; thinking tokens count as completion tokens (fixtures/openai-stream.txt).
#[derive(Serialize)]
pub(crate) struct OaUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<Tokens> for OaUsage {
    fn from(t: Tokens) -> Self {
        OaUsage {
            prompt_tokens: t.prompt,
            completion_tokens: t.candidates + t.thoughts,
            total_tokens: t.total(),
        }
    }
}

/// One `chat.completion.chunk`.
#[derive(Serialize)]
pub(crate) struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChunkChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<OaUsage>,
}

/// The one choice of a chunk; `finish_reason` is `null` until the last chunk.
#[derive(Serialize)]
pub(crate) struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'static str>,
}

/// A chunk's content delta.
#[derive(Serialize)]
pub(crate) struct Delta<'a> {
    pub content: &'a str,
}

/// A non-streaming `chat.completion`.
#[derive(Serialize)]
pub(crate) struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: OaUsage,
}

/// The one choice of a completion.
#[derive(Serialize)]
pub(crate) struct Choice<'a> {
    pub index: u32,
    pub message: Message<'a>,
    pub finish_reason: &'static str,
}

/// The assistant message of a completion.
#[derive(Serialize)]
pub(crate) struct Message<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// A models.get resource.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Model<'a> {
    pub name: &'a str,
    pub version: &'static str,
    pub display_name: &'a str,
    pub description: &'static str,
    pub input_token_limit: u64,
    pub output_token_limit: u64,
    pub supported_generation_methods: &'static [&'static str],
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u64,
    pub max_temperature: f64,
    pub thinking: bool,
}

impl<'a> Model<'a> {
    pub(crate) fn new(name: &'a str, display_name: &'a str) -> Self {
        Model {
            name,
            version: "001",
            display_name,
            description: "Mock model served by gemini-meter mock-upstream.",
            input_token_limit: 1_048_576,
            output_token_limit: 65_536,
            supported_generation_methods: &[
                "generateContent",
                "countTokens",
                "createCachedContent",
                "batchGenerateContent",
            ],
            temperature: 1.0,
            top_p: 0.95,
            top_k: 64,
            max_temperature: 2.0,
            thinking: true,
        }
    }
}

/// models.list.
#[derive(Serialize)]
pub(crate) struct ModelList<'a> {
    pub models: Vec<Model<'a>>,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds and microseconds since the Unix epoch (zero if the clock is before it).
pub(crate) fn now_micros() -> (u64, u32) {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or((0, 0), |d| (d.as_secs(), d.subsec_micros()))
}

/// RFC 3339 UTC timestamp with microseconds, as the Files API prints them.
pub(crate) fn rfc3339(unix_secs: u64, micros: u32) -> String {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 of a date on or after it (Howard Hinnant's days_from_civil).
pub(crate) fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Eight deterministic embedding values in [-1, 1] derived from `seed` (FNV-1a per slot).
pub(crate) fn embedding(seed: &[u8]) -> [f64; 8] {
    let mut out = [0.0; 8];
    for (i, v) in out.iter_mut().enumerate() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (i as u64);
        for b in seed {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        *v = ((h % 2001) as f64 - 1000.0) / 1000.0;
    }
    out
}

/// `{"values": [...]}` of an embedding.
#[derive(Serialize)]
pub(crate) struct Embedding {
    pub values: [f64; 8],
}

// Howard Hinnant's days-to-civil algorithm, for dates on or after 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(rfc3339(1_795_800_000, 0), "2026-11-27T17:20:00.000000Z");
    }

    #[test]
    fn sse_style_matches_google() -> serde_json::Result<()> {
        let t = Tokens {
            prompt: 7,
            candidates: 3,
            thoughts: 0,
        };
        let mut out = Vec::new();
        write_sse_json(&mut out, &GenerateResponse::new("Hi", true, Some(t), "m", "r"))?;
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"candidates": [{"content": {"parts": [{"text": "Hi"}],"role": "model"},"index": 0,"finishReason": "STOP"}],"usageMetadata": {"promptTokenCount": 7,"candidatesTokenCount": 3,"totalTokenCount": 10,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 7}]},"modelVersion": "m","responseId": "r"}"#
        );
        Ok(())
    }
}
