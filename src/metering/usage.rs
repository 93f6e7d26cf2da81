//! What a metered response used: the `ai_response` details, tokens and exact cost, from what
//! the request was and what its body showed. Pure: no clock, no I/O, no shared state.

use std::sync::Arc;

use rust_decimal::Decimal;

use super::observer::{End, Ending};
use super::pricing::{Mode, Tokens, price_tokens};
use super::scan::Format;
use crate::config::Pricing;
use crate::ledger::{AiResponse, ErrorInfo, ResponseFormat, Status, Tags, TokenSource};

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
