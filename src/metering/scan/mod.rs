//! Incremental scanners that pull usage, text volume and errors out of Gemini
//! response bodies (native and OpenAI-compatible framings) while they stream
//! through the proxy, plus a request-side text counter.
//!
//! The scanners never hold more than one unfinished event, never panic, and
//! tolerate any split of the body into network frames.
//!
//! The parts: `json` and `sse` cut a body into events, one framing each (`buffer` holds the one
//! unfinished event between frames); `fields` reads an event's fields leniently; [`Scanner`] and
//! its state, here, apply each event to the [`ScanSummary`]. `text` counts request text.

mod buffer;
mod fields;
#[cfg(test)]
pub(crate) mod fixtures;
mod json;
mod sse;
#[cfg(test)]
mod tests;
mod text;

use std::borrow::Cow;

use memchr::memmem;
use serde::Deserialize;

use crate::config::MODALITIES;
use fields::{ByModality, Event, NativeUsage, Num, Obj, OpenAiUsage, Str};
use json::Splitter;
use sse::SseParser;
pub use text::TextCounter;

/// Largest single event kept in memory; a bigger one is dropped except for its tail.
const MAX_EVENT_BYTES: usize = 64 << 20;
/// Bytes of an oversized event kept so its trailing usage block can still be read.
const SALVAGE_TAIL: usize = 256 << 10;
/// Buffer capacity kept between events; anything above is released.
const KEEP_CAPACITY: usize = 1 << 20;

/// Which framing a response body uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Native `generateContent`: one JSON object (or a `[...]`-wrapped error).
    UnaryJson,
    /// Native `streamGenerateContent?alt=sse`: `data:` events.
    Sse,
    /// Native `streamGenerateContent` without `alt=sse`: one streamed JSON array.
    JsonArray,
    /// OpenAI-compatible non-streaming chat completion.
    OpenAiJson,
    /// OpenAI-compatible streaming chat completion (`data:` chunks, then `data: [DONE]`).
    OpenAiSse,
}

impl Format {
    fn is_openai(self) -> bool {
        matches!(self, Format::OpenAiJson | Format::OpenAiSse)
    }

    fn is_sse(self) -> bool {
        matches!(self, Format::Sse | Format::OpenAiSse)
    }
}

/// Token counts as last reported by the upstream, field by field (None = never reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// `promptTokenCount` / `prompt_tokens` (includes cached tokens).
    pub prompt: Option<u64>,
    /// `candidatesTokenCount` / `completion_tokens`.
    pub candidates: Option<u64>,
    /// `thoughtsTokenCount` / `completion_tokens_details.reasoning_tokens`.
    pub thoughts: Option<u64>,
    /// `cachedContentTokenCount` / `prompt_tokens_details.cached_tokens`.
    pub cached: Option<u64>,
    /// `toolUsePromptTokenCount` (native only).
    pub tool_use_prompt: Option<u64>,
    /// `totalTokenCount` / `total_tokens`.
    pub total: Option<u64>,
    /// `promptTokensDetails`, tokens by modality (index [`crate::config::Modality::index`]), native only.
    pub prompt_details: Option<ModalityCounts>,
    /// `cacheTokensDetails`: the cached part by modality.
    pub cache_details: Option<ModalityCounts>,
    /// `candidatesTokensDetails`: visible output by modality.
    pub candidates_details: Option<ModalityCounts>,
}

/// Token counts by modality, indexed by [`crate::config::Modality::index`].
pub type ModalityCounts = [u64; MODALITIES];

/// An error object the upstream put inside the body (e.g. a mid-stream `{"error":{...}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    /// `error.code` when it is a number (or numeric string) that fits in `u16`.
    pub code: Option<u16>,
    /// `error.status`, e.g. `UNAVAILABLE`.
    pub status: Option<String>,
    /// `error.message`.
    pub message: Option<String>,
}

/// What a scanner learned from a body so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Last reported value of each usage field.
    pub usage: UsageReport,
    /// Whether any usage block (`usageMetadata` / non-null `usage`) was seen.
    pub usage_seen: bool,
    /// Unicode chars of output text (candidate text parts / choice contents), summed over events.
    pub text_chars: u64,
    /// Last `modelVersion` (native) or `model` (OpenAI) seen.
    pub model_version: Option<String>,
    /// Last top-level error object seen in the body.
    pub error: Option<BodyError>,
    /// Whether a `data: [DONE]` event was seen.
    pub done_marker: bool,
    /// Number of complete JSON events parsed (oversized, dropped events included).
    pub events: u64,
    /// Whether a candidate carried `groundingMetadata` with search queries or sources: the
    /// response was grounded with Google Search (billed per request).
    pub grounded: bool,
}

/// Incremental usage scanner for one response body.
pub struct Scanner {
    state: State,
    framing: Framing,
}

enum Framing {
    Json(Splitter),
    Sse(SseParser),
}

impl Scanner {
    /// Creates a scanner for a body in the given framing.
    pub fn new(format: Format) -> Self {
        Self::with_cap(format, MAX_EVENT_BYTES)
    }

    fn with_cap(format: Format, cap: usize) -> Self {
        let framing = if format.is_sse() {
            Framing::Sse(SseParser::new(cap))
        } else {
            Framing::Json(Splitter::new(cap))
        };
        Self {
            state: State {
                openai: format.is_openai(),
                sum: ScanSummary::default(),
            },
            framing,
        }
    }

    /// Feeds the next bytes of the body; any split, any size.
    pub fn feed(&mut self, bytes: &[u8]) {
        match &mut self.framing {
            Framing::Json(s) => s.feed(bytes, &mut self.state),
            Framing::Sse(p) => p.feed(bytes, &mut self.state),
        }
    }

    /// True once an error object was seen in the body (cheap; called per frame).
    pub fn has_error(&self) -> bool {
        self.state.sum.error.is_some()
    }

    /// What was learned so far. An SSE event whose data is complete but whose
    /// terminating blank line has not arrived yet is included tentatively, so a
    /// body cut right before its last blank line is still metered.
    pub fn summary(&self) -> ScanSummary {
        let sum = self.state.sum.clone();
        let Framing::Sse(p) = &self.framing else {
            return sum;
        };
        let Some(pending) = p.pending_event() else {
            return sum;
        };
        let mut tmp = State {
            openai: self.state.openai,
            sum,
        };
        tmp.dispatch(pending);
        tmp.sum
    }
}

// ---------------------------------------------------------------------------
// Applying parsed events

struct State {
    openai: bool,
    sum: ScanSummary,
}

impl State {
    /// Handles one SSE `data` payload.
    fn dispatch(&mut self, payload: &[u8]) {
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            self.sum.done_marker = true;
        } else {
            self.process(payload);
        }
    }

    /// Parses one complete JSON event; malformed events are skipped.
    fn process(&mut self, json: &[u8]) {
        // Trailing bytes after the object are ignored rather than failing it.
        if let Some(Obj(Some(ev))) = parse_prefix::<Obj<Event<'_>>>(json) {
            self.apply(ev);
        }
    }

    fn apply(&mut self, ev: Event<'_>) {
        self.sum.events = self.sum.events.saturating_add(1);
        if self.openai {
            self.sum.text_chars = self.sum.text_chars.saturating_add(ev.choices.0);
            if let Some(u) = ev.usage.0 {
                self.apply_openai_usage(u);
            }
            set_model(&mut self.sum.model_version, ev.model.0);
        } else {
            self.sum.text_chars = self.sum.text_chars.saturating_add(ev.candidates.0);
            self.sum.grounded |= ev.candidates.1;
            if let Some(u) = ev.usage_metadata.0 {
                self.apply_native_usage(u);
            }
            set_model(&mut self.sum.model_version, ev.model_version.0);
        }
        if let Some(e) = ev.error.0 {
            self.sum.error = Some(BodyError {
                code: e.code.0.and_then(|c| u16::try_from(c).ok()),
                status: e.status.0.map(Cow::into_owned),
                message: e.message.0.map(Cow::into_owned),
            });
        }
    }

    fn apply_native_usage(&mut self, u: NativeUsage) {
        let r = &mut self.sum.usage;
        keep(&mut r.prompt, u.prompt_token_count);
        keep(&mut r.candidates, u.candidates_token_count);
        keep(&mut r.thoughts, u.thoughts_token_count);
        keep(&mut r.cached, u.cached_content_token_count);
        keep(&mut r.tool_use_prompt, u.tool_use_prompt_token_count);
        keep(&mut r.total, u.total_token_count);
        keep_details(&mut r.prompt_details, u.prompt_tokens_details);
        keep_details(&mut r.cache_details, u.cache_tokens_details);
        keep_details(&mut r.candidates_details, u.candidates_tokens_details);
        self.sum.usage_seen = true;
    }

    fn apply_openai_usage(&mut self, u: OpenAiUsage) {
        let r = &mut self.sum.usage;
        keep(&mut r.prompt, u.prompt_tokens);
        keep(&mut r.candidates, u.completion_tokens);
        keep(&mut r.total, u.total_tokens);
        if let Some(d) = u.prompt_tokens_details.0 {
            keep(&mut r.cached, d.cached_tokens);
        }
        if let Some(d) = u.completion_tokens_details.0 {
            keep(&mut r.thoughts, d.reasoning_tokens);
        }
        self.sum.usage_seen = true;
    }

    /// Reads what it can from the tail of an event too large to buffer: the
    /// usage block and model name sit at the end of Gemini events.
    fn salvage(&mut self, tail: &[u8]) {
        self.sum.events = self.sum.events.saturating_add(1);
        if self.openai {
            if let Some(u) = value_after_key(tail, b"\"usage\"")
                .and_then(parse_prefix::<Obj<OpenAiUsage>>)
                .and_then(|o| o.0)
            {
                self.apply_openai_usage(u);
            }
            let m = value_after_key(tail, b"\"model\"").and_then(parse_prefix::<Str<'_>>);
            set_model(&mut self.sum.model_version, m.and_then(|s| s.0));
        } else {
            if let Some(u) = value_after_key(tail, b"\"usageMetadata\"")
                .and_then(parse_prefix::<Obj<NativeUsage>>)
                .and_then(|o| o.0)
            {
                self.apply_native_usage(u);
            }
            let m = value_after_key(tail, b"\"modelVersion\"").and_then(parse_prefix::<Str<'_>>);
            set_model(&mut self.sum.model_version, m.and_then(|s| s.0));
        }
    }
}

fn keep(slot: &mut Option<u64>, v: Num) {
    if v.0.is_some() {
        *slot = v.0;
    }
}

/// A details list replaces the last one whole (counts are cumulative in streams, like the
/// totals); a chunk without it keeps the last.
fn keep_details(slot: &mut Option<ModalityCounts>, v: ByModality) {
    if v.0.is_some() {
        *slot = v.0;
    }
}

fn set_model(slot: &mut Option<String>, v: Option<Cow<'_, str>>) {
    if let Some(v) = v
        && slot.as_deref() != Some(&*v)
    {
        *slot = Some(v.into_owned());
    }
}

/// The bytes after the last `key` followed by a colon.
fn value_after_key<'a>(hay: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = memmem::rfind(hay, key)?;
    hay.get(at.saturating_add(key.len())..)?
        .trim_ascii_start()
        .strip_prefix(b":")
}

/// Parses the first JSON value of `bytes`, ignoring whatever follows it.
fn parse_prefix<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    T::deserialize(&mut serde_json::Deserializer::from_slice(bytes)).ok()
}
