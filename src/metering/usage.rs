//! What a metered response used: the `ai_response` details, tokens and exact cost, from what
//! the request was and what its body showed. Pure: no clock, no I/O, no shared state.

use std::sync::Arc;

use rust_decimal::Decimal;

use super::observer::{End, Ending};
use super::pricing::{Mode, Tokens, cache_storage_cost, price_tokens};
use super::scan::{Format, Scanner};
use crate::config::Pricing;
use crate::ledger::{AiResponse, CacheAction, CacheStorage, ErrorInfo, ResponseFormat, Status, Tags, TokenSource};

/// What is known of a metered request before its response body.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The requested model id.
    pub model: Arc<str>,
    /// Framing of the response.
    pub format: Format,
    /// The upstream's HTTP status (0: it never answered).
    pub upstream_status: u16,
    /// The caller's tags.
    pub tags: Option<Arc<Tags>>,
    /// The caller's key id.
    pub key_id: Box<str>,
    /// Characters of prompt text the request body carried (for estimates).
    pub prompt_chars: u64,
    /// From arrival to the end of the response.
    pub duration_ms: u64,
}

/// The usage of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseUsage {
    /// The record's details.
    pub details: AiResponse,
    /// Tokens billed.
    pub tokens: u64,
    /// Exact cost.
    pub cost: Decimal,
}

/// Meters a response: tokens from the upstream's own report when one was seen, nothing for an
/// error status (Gemini does not charge failed requests), else an estimate from the text seen.
pub fn response_usage(x: Exchange, end: &End<'_>, pricing: &Pricing) -> ResponseUsage {
    let s = end.summary;
    let openai = matches!(x.format, Format::OpenAiJson | Format::OpenAiSse);
    let failed_status = x.upstream_status >= 400;
    let status = if failed_status || (end.ending == Ending::Complete && s.error.is_some()) {
        Status::UpstreamError
    } else {
        match end.ending {
            Ending::Complete => Status::Ok,
            Ending::UpstreamCut => Status::UpstreamClosed,
            Ending::ClientClosed => Status::ClientClosed,
        }
    };
    let (mut tokens, source) = if s.usage_seen {
        let t = if openai {
            Tokens::from_openai(&s.usage)
        } else {
            Tokens::from_native(&s.usage)
        };
        (t, TokenSource::Upstream)
    } else if failed_status {
        (Tokens::default(), TokenSource::Upstream)
    } else {
        (Tokens::estimated(x.prompt_chars, s.text_chars), TokenSource::Estimated)
    };
    // Google bills a grounded answer per request; a failed one is not billed at all.
    tokens.grounded = s.grounded && !failed_status;
    // A model the config does not price may be priced under the version the upstream named.
    let price_model = match (&s.model_version, pricing.model(&x.model)) {
        (Some(v), None) if pricing.model(v).is_some() => v.as_str(),
        _ => &*x.model,
    };
    let priced = price_tokens(pricing, price_model, &tokens, Mode::Interactive);
    let format = response_format(x.format);
    let details = AiResponse {
        cached_tokens: tokens.cached,
        duration_ms: x.duration_ms,
        error: s.error.as_ref().map(|e| ErrorInfo {
            code: e.code,
            status: e.status.clone(),
        }),
        format,
        key_id: x.key_id,
        model: x.model,
        model_version: s.model_version.as_deref().map(Into::into),
        output_tokens: tokens.output,
        price: Some(priced.price),
        prompt_tokens: tokens.prompt,
        response_bytes: end.response_bytes,
        status,
        stream: format.is_stream(),
        tags: x.tags,
        thoughts_tokens: tokens.thoughts,
        token_source: source,
        tool_use_prompt_tokens: tokens.tool_use,
        upstream_status: x.upstream_status,
    };
    ResponseUsage {
        details,
        tokens: tokens.total,
        cost: priced.cost,
    }
}

/// Why a file is not a usage report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Neither `usageMetadata` nor an OpenAI `usage` object was found.
    #[error("no usageMetadata (or OpenAI usage) found in the response")]
    NoUsage,
    /// No model given and none in the response.
    #[error("the response names no model (modelVersion); give one with --model")]
    NoModel,
}

/// The model and tokens of one whole response body: a Gemini response JSON with `usageMetadata`
/// (a unary answer, an inlined response of a finished batch, or a stream's SSE body), or an
/// OpenAI-compatible one with `usage`; `model` overrides the response's `modelVersion`. Read by
/// the gateway's own scanner, so it bills exactly what the gateway would; price the result
/// with [`price_tokens`](super::pricing::price_tokens).
pub fn tokens_of_response(body: &[u8], model: Option<&str>) -> Result<(String, Tokens), ReportError> {
    let trimmed = body.trim_ascii_start();
    let sse = trimmed.starts_with(b"data:");
    let formats = if sse {
        [Format::Sse, Format::OpenAiSse]
    } else {
        [Format::UnaryJson, Format::OpenAiJson]
    };
    for (i, format) in formats.into_iter().enumerate() {
        let mut s = Scanner::new(format);
        s.feed(body);
        let sum = s.summary();
        if !sum.usage_seen {
            continue;
        }
        let mut t = if i == 0 {
            Tokens::from_native(&sum.usage)
        } else {
            Tokens::from_openai(&sum.usage)
        };
        t.grounded = sum.grounded;
        let model = model
            .map(str::to_owned)
            .or(sum.model_version)
            .ok_or(ReportError::NoModel)?;
        return Ok((model, t));
    }
    Err(ReportError::NoUsage)
}

/// A cached content stored through the gateway: created, or its TTL extended.
#[derive(Debug, Clone)]
pub struct CacheStored {
    /// Created or extended.
    pub action: CacheAction,
    /// The resource name (`cachedContents/...`), when known.
    pub cache: Option<Box<str>>,
    /// The caller's key id.
    pub key_id: Box<str>,
    /// The model the cache is for (its `model`, with or without `models/`).
    pub model: Arc<str>,
    /// The caller's tags.
    pub tags: Option<Arc<Tags>>,
    /// The cache's `usageMetadata.totalTokenCount`.
    pub token_count: u64,
    /// Seconds of storage to bill: the TTL at creation, the added time on an extension.
    pub ttl_seconds: u64,
}

/// The details and exact cost of a `cache_storage` record (messages = 0, tokens = 0: stored
/// tokens are not processed tokens); `None` when the model has no
/// `cache_storage_per_million_per_hour`.
pub fn cache_storage_usage(pricing: &Pricing, c: CacheStored) -> Option<(CacheStorage, Decimal)> {
    let priced = cache_storage_cost(pricing, &c.model, c.token_count, c.ttl_seconds)?;
    let details = CacheStorage {
        action: c.action,
        cache: c.cache,
        key_id: c.key_id,
        model: c.model,
        price: priced.price,
        tags: c.tags,
        token_count: c.token_count,
        ttl_seconds: c.ttl_seconds,
    };
    Some((details, priced.cost))
}

/// The record's name of a framing.
pub fn response_format(f: Format) -> ResponseFormat {
    match f {
        Format::UnaryJson => ResponseFormat::Json,
        Format::Sse => ResponseFormat::Sse,
        Format::JsonArray => ResponseFormat::JsonArray,
        Format::OpenAiJson => ResponseFormat::OpenaiJson,
        Format::OpenAiSse => ResponseFormat::OpenaiSse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ledger::Details;

    #[test]
    fn a_cache_stored_for_an_hour_is_one_exact_record() {
        let cfg = Config::parse(
            "[pricing.models.\"gemini-2.5-pro\"]\ninput_per_million = \"1.25\"\noutput_per_million = \"10.00\"\ncache_storage_per_million_per_hour = \"4.50\"\n",
            "t.toml",
        )
        .unwrap();
        let stored = |model: &str| CacheStored {
            action: CacheAction::Create,
            cache: Some("cachedContents/abc123".into()),
            key_id: "key_1".into(),
            model: Arc::from(model),
            tags: None,
            token_count: 250_000,
            ttl_seconds: 3600,
        };
        // 250000 x 4.50 / 1e6 x 3600 / 3600 = 1.125
        let (d, cost) = cache_storage_usage(&cfg.pricing, stored("models/gemini-2.5-pro")).unwrap();
        assert_eq!(cost.to_string(), "1.125");
        assert_eq!(
            serde_json::to_string(&Details::CacheStorage(d)).unwrap(),
            r#"{"action":"create","cache":"cachedContents/abc123","key_id":"key_1","model":"models/gemini-2.5-pro","price":{"entry":"gemini-2.5-pro","lines":[{"cost":"1.125","part":"cache_storage","quantity":250000,"rate":"4.50"}]},"token_count":250000,"ttl_seconds":3600}"#
        );
        assert!(cache_storage_usage(&cfg.pricing, stored("gemini-2.5-flash")).is_none());
    }

    #[test]
    fn a_batch_inlined_response_is_priced_with_the_discount() {
        let cfg = Config::parse(
            "[pricing]\nbatch_discount = \"0.5\"\n[pricing.models.\"gemini-2.5-flash\"]\ninput_per_million = \"0.30\"\noutput_per_million = \"2.50\"\n",
            "t.toml",
        )
        .unwrap();
        let inlined = br#"{"candidates":[{"content":{"parts":[{"text":"2, 3, 5"}]}}],"usageMetadata":{"promptTokenCount":6,"candidatesTokenCount":8,"totalTokenCount":14},"modelVersion":"gemini-2.5-flash"}"#;
        let (model, t) = tokens_of_response(inlined, None).unwrap();
        // (6 x 0.30 + 8 x 2.50) / 1e6 x 0.5 = 21.8 / 1e6 x 0.5
        let p = price_tokens(&cfg.pricing, &model, &t, Mode::Batch);
        assert_eq!(p.cost.to_string(), "0.0000109");
        assert!(matches!(
            tokens_of_response(b"{\"usageMetadata\":{\"promptTokenCount\":1}}", None),
            Err(ReportError::NoModel)
        ));
    }
}
