//! What a record says beyond its amounts, typed per record type. Serialized as the record's
//! `metadata` object with the field names the APIs, exports and the record log have always
//! used; fields are declared in alphabetical order because records written before typing
//! carried a sorted JSON map, and re-encoding a stored record must give the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use crate::config::{ContextTier, Modality};

/// What a record bills for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A request admitted and answered (messages = 1), or refused upstream (messages = 0).
    MessageSent,
    /// The tokens of one model response.
    AiResponse,
    /// File bytes sent upstream.
    FileUpload,
    /// Storage of a cached content for its TTL (messages = 0).
    CacheStorage,
}

impl RecordKind {
    /// The wire name (`message_sent`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::MessageSent => "message_sent",
            RecordKind::AiResponse => "ai_response",
            RecordKind::FileUpload => "file_upload",
            RecordKind::CacheStorage => "cache_storage",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "message_sent" => Some(RecordKind::MessageSent),
            "ai_response" => Some(RecordKind::AiResponse),
            "file_upload" => Some(RecordKind::FileUpload),
            "cache_storage" => Some(RecordKind::CacheStorage),
            _ => None,
        }
    }
}

/// Tags from `x-meter-tag-*` headers, by name (sorted, as they render).
pub type Tags = BTreeMap<String, String>;

/// How the request behind a record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Answered completely.
    Ok,
    /// The client went away first.
    ClientClosed,
    /// The upstream answered with an error (status or in-band error object).
    UpstreamError,
    /// The upstream's body broke off.
    UpstreamClosed,
    /// The upstream could not be reached or did not answer in time.
    UpstreamUnavailable,
}

/// Where a response's token counts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The upstream's own usage report.
    Upstream,
    /// Estimated from the text seen (no usage report arrived).
    Estimated,
}

/// The framing a response was metered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Native unary JSON.
    Json,
    /// Native Server-Sent Events.
    Sse,
    /// Native streamed JSON array.
    JsonArray,
    /// OpenAI-compatible JSON.
    OpenaiJson,
    /// OpenAI-compatible Server-Sent Events.
    OpenaiSse,
}

impl ResponseFormat {
    /// Whether the response was streamed.
    pub fn is_stream(self) -> bool {
        matches!(
            self,
            ResponseFormat::Sse | ResponseFormat::JsonArray | ResponseFormat::OpenaiSse
        )
    }
}

/// An error object the upstream reported in a response body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// `error.code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// `error.status`, e.g. `UNAVAILABLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A metered request's message: admitted and answered (messages = 1) or not (0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageSent {
    /// The caller's key id.
    pub key_id: Box<str>,
    /// The requested model.
    #[serde(serialize_with = "ser_arc", deserialize_with = "de_arc")]
    pub model: Arc<str>,
    /// How the request ended.
    pub status: Status,
    /// The caller's tags.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "tags_serde")]
    pub tags: Option<Arc<Tags>>,
    /// The upstream's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
}

/// The tokens of one model response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiResponse {
    /// The cached part of the prompt.
    #[serde(default)]
    pub cached_tokens: u64,
    /// From arrival to the end of the response.
    #[serde(default)]
    pub duration_ms: u64,
    /// The error object the body carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Framing of the response.
    pub format: ResponseFormat,
    /// The caller's key id.
    pub key_id: Box<str>,
    /// The requested model.
    #[serde(serialize_with = "ser_arc", deserialize_with = "de_arc")]
    pub model: Arc<str>,
    /// The model version the upstream reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<Box<str>>,
    /// Visible output tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// How the cost was made: the price entry, tier and rates applied (absent in records
    /// written before prices were explained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    /// Prompt tokens, cached ones included.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Bytes of response body passed to the client.
    #[serde(default)]
    pub response_bytes: u64,
    /// How the response ended.
    pub status: Status,
    /// Whether it was streamed.
    #[serde(default)]
    pub stream: bool,
    /// The caller's tags.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "tags_serde")]
    pub tags: Option<Arc<Tags>>,
    /// Thinking tokens (billed as output).
    #[serde(default)]
    pub thoughts_tokens: u64,
    /// Where the counts come from.
    pub token_source: TokenSource,
    /// Tokens of tool-use prompts.
    #[serde(default)]
    pub tool_use_prompt_tokens: u64,
    /// The upstream's HTTP status.
    pub upstream_status: u16,
}

/// How a record's cost was made, so an invoice line can be explained: the record's `cost` is
/// the sum of the lines' costs, times `1 - batch_discount` when there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    /// The fraction taken off for Batch API work; absent for interactive calls.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal_str")]
    pub batch_discount: Option<Decimal>,
    /// Which tier of token rates applied (`standard`, or `long` above the model's
    /// `long_context_threshold`); absent for per-unit and default prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextTier>,
    /// The `[pricing.models]` entry used; absent: the `[pricing]` defaults (an unlisted model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Box<str>>,
    /// What was billed, line by line.
    pub lines: Vec<PriceLine>,
}

/// One billed quantity at one rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceLine {
    /// `quantity * rate` (per million for token parts; per hour of the TTL for cache storage).
    #[serde(with = "decimal_str")]
    pub cost: Decimal,
    /// The modality the tokens are of, when the usage details placed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modality: Option<Modality>,
    /// What is billed.
    pub part: PricePart,
    /// How many: tokens, images, seconds or grounded requests.
    pub quantity: u64,
    /// The rate applied: USD per million tokens for token parts (per token for `tokens`), per
    /// image, per second, per grounded request, per million tokens per hour for cache storage.
    #[serde(with = "decimal_str")]
    pub rate: Decimal,
}

/// What a price line bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PricePart {
    /// Fresh (uncached) prompt tokens.
    Input,
    /// Cached prompt tokens.
    CachedInput,
    /// Tool-use prompt tokens (`toolUsePromptTokenCount`), at the input rate.
    ToolUse,
    /// Visible output tokens.
    Output,
    /// Thinking tokens, at the output rate.
    Thoughts,
    /// All tokens of a model without a price entry, at `ai_response_per_token`.
    Tokens,
    /// A response grounded with Google Search.
    Grounding,
    /// Generated images.
    Image,
    /// Seconds of generated video.
    VideoSecond,
    /// Cached content stored for its TTL.
    CacheStorage,
}

impl PricePart {
    /// The wire name (`input`, `cached_input`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PricePart::Input => "input",
            PricePart::CachedInput => "cached_input",
            PricePart::ToolUse => "tool_use",
            PricePart::Output => "output",
            PricePart::Thoughts => "thoughts",
            PricePart::Tokens => "tokens",
            PricePart::Grounding => "grounding",
            PricePart::Image => "image",
            PricePart::VideoSecond => "video_second",
            PricePart::CacheStorage => "cache_storage",
        }
    }
}

/// Why a cache storage record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheAction {
    /// A `cachedContents` resource was created.
    Create,
    /// Its TTL (or expire time) was extended; billed for the added time only.
    Extend,
}

/// Storage of one cached content (`cachedContents`) for a TTL: messages = 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStorage {
    /// Created or extended.
    pub action: CacheAction,
    /// The resource name (`cachedContents/...`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Box<str>>,
    /// The caller's key id.
    pub key_id: Box<str>,
    /// The model the cache is for.
    #[serde(serialize_with = "ser_arc", deserialize_with = "de_arc")]
    pub model: Arc<str>,
    /// How the cost was made.
    pub price: Price,
    /// The caller's tags.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "tags_serde")]
    pub tags: Option<Arc<Tags>>,
    /// The cache's `usageMetadata.totalTokenCount`.
    pub token_count: u64,
    /// Seconds of storage billed.
    pub ttl_seconds: u64,
}

/// File bytes one upload request sent upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileUpload {
    /// Bytes sent, billed or not.
    pub bytes_sent: u64,
    /// The caller's key id.
    pub key_id: Box<str>,
    /// `ok` or `upstream_error`.
    pub status: Status,
    /// The caller's tags.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "tags_serde")]
    pub tags: Option<Arc<Tags>>,
    /// A fingerprint of the upload session (the id itself is a bearer capability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_session: Option<Box<str>>,
    /// `x-goog-upload-status` of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_status: Option<Box<str>>,
    /// The upstream's HTTP status.
    pub upstream_status: u16,
}

/// A record's details, one shape per record type.
#[derive(Debug, Clone, PartialEq)]
pub enum Details {
    /// Of a `message_sent` record.
    MessageSent(MessageSent),
    /// Of an `ai_response` record.
    AiResponse(AiResponse),
    /// Of a `file_upload` record.
    FileUpload(FileUpload),
    /// Of a `cache_storage` record.
    CacheStorage(CacheStorage),
    /// Stored metadata that fits none of the shapes (kept as it was, never lost).
    Untyped(RecordKind, Map<String, Value>),
}

impl Details {
    /// The record type these details belong to.
    pub fn kind(&self) -> RecordKind {
        match self {
            Details::MessageSent(_) => RecordKind::MessageSent,
            Details::AiResponse(_) => RecordKind::AiResponse,
            Details::FileUpload(_) => RecordKind::FileUpload,
            Details::CacheStorage(_) => RecordKind::CacheStorage,
            Details::Untyped(k, _) => *k,
        }
    }

    /// The model named, if any.
    pub fn model(&self) -> Option<&str> {
        match self {
            Details::MessageSent(m) => Some(&m.model),
            Details::AiResponse(a) => Some(&a.model),
            Details::FileUpload(_) => None,
            Details::CacheStorage(c) => Some(&c.model),
            Details::Untyped(_, m) => m.get("model").and_then(Value::as_str),
        }
    }

    /// The key the usage was made with, if the record names it.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Details::MessageSent(m) => Some(&m.key_id),
            Details::AiResponse(a) => Some(&a.key_id),
            Details::FileUpload(f) => Some(&f.key_id),
            Details::CacheStorage(c) => Some(&c.key_id),
            Details::Untyped(_, m) => m.get("key_id").and_then(Value::as_str),
        }
    }

    /// Bytes of response streamed back.
    pub fn response_bytes(&self) -> u64 {
        match self {
            Details::AiResponse(a) => a.response_bytes,
            Details::Untyped(_, m) => m.get("response_bytes").and_then(Value::as_u64).unwrap_or(0),
            _ => 0,
        }
    }

    /// How the cost was made, for records that say.
    pub fn price(&self) -> Option<&Price> {
        match self {
            Details::AiResponse(a) => a.price.as_ref(),
            Details::CacheStorage(c) => Some(&c.price),
            _ => None,
        }
    }

    /// The tags, as (name, value) pairs (no allocation when there are none).
    pub fn tags(&self) -> Vec<(&str, &str)> {
        let typed = match self {
            Details::MessageSent(m) => m.tags.as_deref(),
            Details::AiResponse(a) => a.tags.as_deref(),
            Details::FileUpload(f) => f.tags.as_deref(),
            Details::CacheStorage(c) => c.tags.as_deref(),
            Details::Untyped(_, m) => {
                let Some(t) = m.get("tags").and_then(Value::as_object) else {
                    return Vec::new();
                };
                return t.iter().filter_map(|(n, v)| Some((n.as_str(), v.as_str()?))).collect();
            }
        };
        typed
            .map(|t| t.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect())
            .unwrap_or_default()
    }

    /// Reads stored metadata of a record of type `kind`; what fits no shape is kept untyped.
    pub fn from_value(kind: RecordKind, v: &Value) -> Option<Self> {
        let typed = match kind {
            RecordKind::MessageSent => MessageSent::deserialize(v).ok().map(Details::MessageSent),
            RecordKind::AiResponse => AiResponse::deserialize(v).ok().map(Details::AiResponse),
            RecordKind::FileUpload => FileUpload::deserialize(v).ok().map(Details::FileUpload),
            RecordKind::CacheStorage => CacheStorage::deserialize(v).ok().map(Details::CacheStorage),
        };
        typed.or_else(|| Some(Details::Untyped(kind, v.as_object()?.clone())))
    }

    /// The JSON object form (`metadata`).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()))
    }
}

impl Serialize for Details {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Details::MessageSent(m) => m.serialize(s),
            Details::AiResponse(a) => a.serialize(s),
            Details::FileUpload(f) => f.serialize(s),
            Details::CacheStorage(c) => c.serialize(s),
            Details::Untyped(_, m) => m.serialize(s),
        }
    }
}

/// `Option<Arc<Tags>>` as a plain map (serde's own `Arc` support needs its `rc` feature).
mod tags_serde {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Tags;

    pub fn serialize<S: Serializer>(t: &Option<Arc<Tags>>, s: S) -> Result<S::Ok, S::Error> {
        t.as_deref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<Tags>>, D::Error> {
        Ok(Option::<Tags>::deserialize(d)?.map(Arc::new))
    }
}

/// A decimal as a JSON string, written as `Display` writes it (what the records' hand-written
/// JSON writes too).
mod decimal_str {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(D::Error::custom)
    }
}

/// `Option<Decimal>` as [`decimal_str`] writes it.
mod opt_decimal_str {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(d),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| t.parse().map_err(D::Error::custom)).transpose()
    }
}

fn ser_arc<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn de_arc<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    Ok(Arc::from(String::deserialize(d)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_shapes_are_kept_untyped() {
        let v = json!({"status": "something-new", "model": "m"});
        let d = Details::from_value(RecordKind::MessageSent, &v).unwrap();
        assert!(matches!(d, Details::Untyped(RecordKind::MessageSent, _)));
        assert_eq!(d.to_value(), v);
        assert_eq!(d.model(), Some("m"));
    }

    #[test]
    fn typed_fields_render_sorted() {
        let d = Details::MessageSent(MessageSent {
            key_id: "key_1".into(),
            model: Arc::from("gemini-2.5-flash"),
            status: Status::UpstreamUnavailable,
            tags: Some(Arc::new(Tags::from([
                ("b".into(), "2".into()),
                ("a".into(), "1".into()),
            ]))),
            upstream_status: Some(504),
        });
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"key_id":"key_1","model":"gemini-2.5-flash","status":"upstream_unavailable","tags":{"a":"1","b":"2"},"upstream_status":504}"#
        );
        assert_eq!(Details::from_value(RecordKind::MessageSent, &d.to_value()), Some(d));
    }
}
