//! The response-body observer: forwards every frame untouched and at once, feeds the bytes to
//! the scanner, and settles exactly once however the body ends: at its end, on an upstream
//! error, or when dropped because the client went away (dropping it also drops the upstream
//! body, which closes the upstream connection so the upstream stops generating).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body::{Body, Frame, SizeHint};

use super::decode::DecodingScanner;
use super::pricing::{Tokens, response_cost};
use super::scan::{Format, ScanSummary};
use crate::app::App;
use crate::identity::KeyEntry;
use crate::ledger::{AiResponse, Details, ErrorInfo, Record, ResponseFormat, Status, Tags, TokenSource};

/// Boxed error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a metered body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The upstream body ended cleanly.
    Complete,
    /// The upstream body broke off (reset, truncated chunked body).
    UpstreamCut,
    /// The client went away before the end.
    ClientClosed,
}

/// Everything needed to settle one metered response.
#[derive(Debug)]
pub struct Meter {
    /// Shared state.
    pub app: Arc<App>,
    /// The key used (and so who pays).
    pub key: KeyEntry,
    /// The requested model id.
    pub model: Arc<str>,
    /// Framing of the response.
    pub format: Format,
    /// Upstream HTTP status.
    pub upstream_status: u16,
    /// Tags from `x-meter-tag-*` headers.
    pub tags: Option<Arc<Tags>>,
    /// Characters of prompt text seen in the request body (for estimates).
    pub prompt_chars: Arc<AtomicU64>,
    /// When the request arrived.
    pub started: Instant,
    /// When it was admitted.
    pub admitted_at: DateTime<Utc>,
}

/// A response body that meters what passes through it.
pub struct MeteredBody<B> {
    inner: B,
    scanner: DecodingScanner,
    response_bytes: u64,
    meter: Option<Meter>,
    /// Set after forwarding an in-band error object of a 2xx stream: the next poll fails, so
    /// the client's stream ends as an error, not as a clean end.
    fail_next: bool,
    /// True once the frames before a deliberate failure had their chance to be written.
    flushed: bool,
}

impl<B> MeteredBody<B> {
    /// Wraps `inner`; `content_encoding` is the response's Content-Encoding.
    pub fn new(inner: B, content_encoding: Option<&str>, meter: Meter) -> Self {
        let scanner = DecodingScanner::new(content_encoding, meter.format);
        meter.app.metrics.open_streams.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            scanner,
            response_bytes: 0,
            meter: Some(meter),
            fail_next: false,
            flushed: false,
        }
    }

    fn settle(&mut self, ending: Ending) {
        if let Some(m) = self.meter.take() {
            m.app.metrics.open_streams.fetch_sub(1, Ordering::Relaxed);
            settle(m, &self.scanner.summary(), self.response_bytes, ending);
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.fail_next {
            if !this.flushed {
                // Give hyper one turn to write out the error object it already holds before the
                // failure aborts the connection; otherwise the client never sees it.
                this.flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.fail_next = false;
            this.settle(Ending::Complete);
            return Poll::Ready(Some(Err("the upstream reported an error inside the stream".into())));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if this.response_bytes == 0
                        && let Some(m) = &this.meter
                    {
                        m.app.metrics.ttfb.observe(m.started.elapsed());
                    }
                    this.response_bytes += data.len() as u64;
                    this.scanner.feed(data);
                    let ok_stream = this.meter.as_ref().is_some_and(|m| {
                        m.upstream_status < 300 && m.format != Format::UnaryJson && m.format != Format::OpenAiJson
                    });
                    if ok_stream && this.scanner.has_error() {
                        this.fail_next = true;
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                // hyper may never poll again once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.settle(Ending::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.settle(Ending::UpstreamCut);
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                this.settle(Ending::Complete);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.fail_next && self.meter.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.settle(Ending::ClientClosed);
    }
}

/// Settles a request the client abandoned before the upstream answered: the prompt was sent,
/// so its tokens are estimated and recorded.
pub fn settle_unanswered(m: Meter) {
    settle(m, &ScanSummary::default(), 0, Ending::ClientClosed);
}

/// Builds the `ai_response` record of a finished response and hands it over.
fn settle(m: Meter, s: &ScanSummary, response_bytes: u64, ending: Ending) {
    let openai = matches!(m.format, Format::OpenAiJson | Format::OpenAiSse);
    let failed_status = m.upstream_status >= 400;
    let status = if failed_status || (ending == Ending::Complete && s.error.is_some()) {
        Status::UpstreamError
    } else {
        match ending {
            Ending::Complete => Status::Ok,
            Ending::UpstreamCut => Status::UpstreamClosed,
            Ending::ClientClosed => Status::ClientClosed,
        }
    };
    let (tokens, source) = if s.usage_seen {
        let t = if openai {
            Tokens::from_openai(&s.usage)
        } else {
            Tokens::from_native(&s.usage)
        };
        (t, TokenSource::Upstream)
    } else if failed_status {
        // An error status bills nothing (Gemini does not charge failed requests).
        (Tokens::default(), TokenSource::Upstream)
    } else {
        m.app.metrics.estimated.fetch_add(1, Ordering::Relaxed);
        (
            Tokens::estimated(m.prompt_chars.load(Ordering::Relaxed), s.text_chars),
            TokenSource::Estimated,
        )
    };
    let Some(user) = m.app.registry.user_of(m.key) else {
        return;
    };
    let rt = m.app.live.load();
    let pricing = &rt.config.pricing;
    let price_model = match (&s.model_version, pricing.model(&m.model)) {
        (Some(v), None) if pricing.model(v).is_some() => v.as_str(),
        _ => &*m.model,
    };
    let cost = response_cost(pricing, price_model, &tokens);
    let now = m.app.clock.now();

    let format = response_format(m.format);
    let details = AiResponse {
        cached_tokens: tokens.cached,
        duration_ms: m.started.elapsed().as_millis() as u64,
        error: s.error.as_ref().map(|e| ErrorInfo {
            code: e.code,
            status: e.status.clone(),
        }),
        format,
        key_id: m.app.registry.key_id(m.key).into(),
        model: m.model.clone(),
        model_version: s.model_version.as_deref().map(Into::into),
        output_tokens: tokens.output,
        prompt_tokens: tokens.prompt,
        response_bytes,
        status,
        stream: format.is_stream(),
        tags: m.tags,
        thoughts_tokens: tokens.thoughts,
        token_source: source,
        tool_use_prompt_tokens: tokens.tool_use,
        upstream_status: m.upstream_status,
    };
    let rec = Record {
        id: m.app.ids.next(now),
        user_id: user.id_arc(),
        tokens: tokens.total,
        messages: 0,
        bytes: 0,
        cost,
        details: Details::AiResponse(details),
        created_at: now,
    };
    if let Some(tpm) = rt.tier_by_id(user.tier_id()).and_then(|t| t.tier.tokens_per_minute) {
        user.tpm.add(tokens.total, Some(tpm));
    }
    m.app.settle_record(user, rec, false);
}

fn response_format(f: Format) -> ResponseFormat {
    match f {
        Format::UnaryJson => ResponseFormat::Json,
        Format::Sse => ResponseFormat::Sse,
        Format::JsonArray => ResponseFormat::JsonArray,
        Format::OpenAiJson => ResponseFormat::OpenaiJson,
        Format::OpenAiSse => ResponseFormat::OpenaiSse,
    }
}
