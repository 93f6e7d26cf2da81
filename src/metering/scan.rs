//! Incremental scanners that pull usage, text volume and errors out of Gemini
//! response bodies (native and OpenAI-compatible framings) while they stream
//! through the proxy, plus a request-side text counter.
//!
//! The scanners never hold more than one unfinished event, never panic, and
//! tolerate any split of the body into network frames.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use memchr::{memchr2, memchr3, memmem};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
}

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

// ---------------------------------------------------------------------------
// Borrowed event shapes. Objects are read key by key (keys as raw bytes, so
// serde_json skips UTF-8 validation), unknown keys are skipped with
// `IgnoredAny`, and every value type is lenient: a value of an unexpected JSON
// type counts as absent instead of failing the whole event. Duplicate keys:
// the last one wins.

#[derive(Default)]
struct Event<'a> {
    candidates: SumSeq<Candidate>,
    usage_metadata: Obj<NativeUsage>,
    model_version: Str<'a>,
    choices: SumSeq<Choice>,
    usage: Obj<OpenAiUsage>,
    model: Str<'a>,
    error: ErrField<'a>,
}

#[derive(Default)]
struct NativeUsage {
    prompt_token_count: Num,
    candidates_token_count: Num,
    thoughts_token_count: Num,
    cached_content_token_count: Num,
    tool_use_prompt_token_count: Num,
    total_token_count: Num,
}

#[derive(Default)]
struct OpenAiUsage {
    prompt_tokens: Num,
    completion_tokens: Num,
    total_tokens: Num,
    prompt_tokens_details: Obj<PromptDetails>,
    completion_tokens_details: Obj<CompletionDetails>,
}

#[derive(Default)]
struct PromptDetails {
    cached_tokens: Num,
}

#[derive(Default)]
struct CompletionDetails {
    reasoning_tokens: Num,
}

#[derive(Default)]
struct Candidate {
    content: Obj<Content>,
}

#[derive(Default)]
struct Content {
    parts: SumSeq<Part>,
}

#[derive(Default)]
struct Part {
    text: Chars,
}

#[derive(Default)]
struct Choice {
    delta: Obj<Message>,
    message: Obj<Message>,
}

#[derive(Default)]
struct Message {
    content: Chars,
}

#[derive(Default)]
struct ErrBody<'a> {
    code: Num,
    status: Str<'a>,
    message: Str<'a>,
}

/// An object read field by field.
trait Record<'de>: Default {
    /// Reads the value of `key` if it is a field of ours; `false` means "skip it".
    fn field<A: MapAccess<'de>>(&mut self, key: &[u8], map: &mut A) -> Result<bool, A::Error>;
}

/// Generates `Record` from `"json key" => field` pairs.
macro_rules! record {
    ($ty:ident $(<$lt:lifetime>)?, $($key:literal => $field:ident),+ $(,)?) => {
        impl<'de $(: $lt, $lt)?> Record<'de> for $ty $(<$lt>)? {
            fn field<A: MapAccess<'de>>(&mut self, key: &[u8], map: &mut A) -> Result<bool, A::Error> {
                match key {
                    $($key => self.$field = map.next_value()?,)+
                    _ => return Ok(false),
                }
                Ok(true)
            }
        }
    };
}

record!(Event<'a>,
    b"candidates" => candidates,
    b"usageMetadata" => usage_metadata,
    b"modelVersion" => model_version,
    b"choices" => choices,
    b"usage" => usage,
    b"model" => model,
    b"error" => error,
);
record!(NativeUsage,
    b"promptTokenCount" => prompt_token_count,
    b"candidatesTokenCount" => candidates_token_count,
    b"thoughtsTokenCount" => thoughts_token_count,
    b"cachedContentTokenCount" => cached_content_token_count,
    b"toolUsePromptTokenCount" => tool_use_prompt_token_count,
    b"totalTokenCount" => total_token_count,
);
record!(OpenAiUsage,
    b"prompt_tokens" => prompt_tokens,
    b"completion_tokens" => completion_tokens,
    b"total_tokens" => total_tokens,
    b"prompt_tokens_details" => prompt_tokens_details,
    b"completion_tokens_details" => completion_tokens_details,
);
record!(PromptDetails, b"cached_tokens" => cached_tokens);
record!(CompletionDetails, b"reasoning_tokens" => reasoning_tokens);
record!(Candidate, b"content" => content);
record!(Content, b"parts" => parts);
record!(Part, b"text" => text);
record!(Choice, b"delta" => delta, b"message" => message);
record!(Message, b"content" => content);
record!(ErrBody<'a>, b"code" => code, b"status" => status, b"message" => message);

/// Every key any `Record` reads; an escaped key is matched against these.
const KNOWN_KEYS: &[&[u8]] = &[
    b"candidates",
    b"usageMetadata",
    b"modelVersion",
    b"choices",
    b"usage",
    b"model",
    b"error",
    b"promptTokenCount",
    b"candidatesTokenCount",
    b"thoughtsTokenCount",
    b"cachedContentTokenCount",
    b"toolUsePromptTokenCount",
    b"totalTokenCount",
    b"prompt_tokens",
    b"completion_tokens",
    b"total_tokens",
    b"prompt_tokens_details",
    b"completion_tokens_details",
    b"cached_tokens",
    b"reasoning_tokens",
    b"content",
    b"parts",
    b"text",
    b"delta",
    b"message",
    b"code",
    b"status",
];

fn known_key(k: &[u8]) -> &'static [u8] {
    KNOWN_KEYS.iter().copied().find(|known| *known == k).unwrap_or_default()
}

/// Reads an object key as bytes, borrowed from the input when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = &'de [u8];

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'de [u8], D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = &'de [u8];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<&'de [u8], E> {
        Ok(v)
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<&'de [u8], E> {
        Ok(KNOWN_KEYS.iter().copied().find(|k| *k == v).unwrap_or_default())
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<&'de [u8], E> {
        Ok(v.as_bytes())
    }
    fn visit_str<E>(self, v: &str) -> Result<&'de [u8], E> {
        Ok(known_key(v.as_bytes()))
    }
}

trait TextChars {
    fn text_chars(&self) -> u64;
}

impl TextChars for Candidate {
    fn text_chars(&self) -> u64 {
        self.content.0.as_ref().map_or(0, |c| c.parts.0)
    }
}

impl TextChars for Part {
    fn text_chars(&self) -> u64 {
        self.text.0
    }
}

impl TextChars for Choice {
    fn text_chars(&self) -> u64 {
        let d = self.delta.0.as_ref().map_or(0, |m| m.content.0);
        let m = self.message.0.as_ref().map_or(0, |m| m.content.0);
        d.saturating_add(m)
    }
}

/// A JSON value read leniently: each hook defaults to "absent" and skips the value.
trait Lenient<'de>: Sized + Default {
    fn of_u64(_: u64) -> Self {
        Self::default()
    }
    fn of_i64(v: i64) -> Self {
        u64::try_from(v).map_or_else(|_| Self::default(), Self::of_u64)
    }
    fn of_f64(_: f64) -> Self {
        Self::default()
    }
    fn of_str(_: &str) -> Self {
        Self::default()
    }
    fn of_borrowed_str(v: &'de str) -> Self {
        Self::of_str(v)
    }
    fn of_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
    fn of_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient<'de>> Visitor<'de> for LenientVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E>(self, v: u64) -> Result<T, E> {
        Ok(T::of_u64(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<T, E> {
        Ok(T::of_i64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<T, E> {
        Ok(T::of_f64(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok(T::of_str(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<T, E> {
        Ok(T::of_borrowed_str(v))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::of_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::of_seq(seq)
    }
}

/// Implements `Deserialize` through `Lenient`.
macro_rules! lenient_deserialize {
    ($($ty:ident $(<$lt:lifetime>)?),+ $(,)?) => {$(
        impl<'de $(: $lt, $lt)?> Deserialize<'de> for $ty $(<$lt>)? {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(LenientVisitor(PhantomData))
            }
        }
    )+};
}

lenient_deserialize!(Num, Chars, Str<'a>, ErrField<'a>);

/// A token count; accepts numbers and numeric strings.
#[derive(Default, Clone, Copy)]
struct Num(Option<u64>);

impl Lenient<'_> for Num {
    fn of_u64(v: u64) -> Self {
        Num(Some(v))
    }
    fn of_f64(v: f64) -> Self {
        // `as` saturates; NaN and negatives are rejected first.
        Num((v.is_finite() && v >= 0.0).then_some(v as u64))
    }
    fn of_str(v: &str) -> Self {
        Num(v.trim().parse().ok())
    }
}

/// The char count of a string value.
#[derive(Default)]
struct Chars(u64);

impl Lenient<'_> for Chars {
    fn of_str(v: &str) -> Self {
        Chars(u64::try_from(v.chars().count()).unwrap_or(u64::MAX))
    }
}

/// A string value, borrowed when it has no escapes.
#[derive(Default)]
struct Str<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Lenient<'de> for Str<'a> {
    fn of_str(v: &str) -> Self {
        Str(Some(Cow::Owned(v.to_owned())))
    }
    fn of_borrowed_str(v: &'de str) -> Self {
        Str(Some(Cow::Borrowed(v)))
    }
}

/// A nested object; anything but an object is treated as absent.
struct Obj<T>(Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Record<'de>> Lenient<'de> for Obj<T> {
    fn of_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut t = T::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if !t.field(key, &mut map)? {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Obj(Some(t)))
    }
}

impl<'de, T: Record<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

/// The summed text chars of an array of objects.
struct SumSeq<T>(u64, PhantomData<T>);

impl<T> Default for SumSeq<T> {
    fn default() -> Self {
        SumSeq(0, PhantomData)
    }
}

impl<'de, T: Record<'de> + TextChars> Lenient<'de> for SumSeq<T> {
    fn of_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut n = 0u64;
        while let Some(item) = seq.next_element::<Obj<T>>()? {
            if let Some(item) = item.0 {
                n = n.saturating_add(item.text_chars());
            }
        }
        Ok(SumSeq(n, PhantomData))
    }
}

impl<'de, T: Record<'de> + TextChars> Deserialize<'de> for SumSeq<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

/// The `error` member: an object, or a bare message string.
#[derive(Default)]
struct ErrField<'a>(Option<ErrBody<'a>>);

impl<'de: 'a, 'a> Lenient<'de> for ErrField<'a> {
    fn of_str(v: &str) -> Self {
        ErrField(Some(ErrBody {
            message: Str::of_str(v),
            ..ErrBody::default()
        }))
    }
    fn of_borrowed_str(v: &'de str) -> Self {
        ErrField(Some(ErrBody {
            message: Str::of_borrowed_str(v),
            ..ErrBody::default()
        }))
    }
    fn of_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        Obj::<ErrBody<'a>>::of_map(map).map(|o| ErrField(o.0))
    }
}

// ---------------------------------------------------------------------------
// Event buffering

/// The bytes of the one unfinished event, capped; past the cap only a tail is kept.
struct EventBuf {
    bytes: Vec<u8>,
    overflowed: bool,
    cap: usize,
}

impl EventBuf {
    fn new(cap: usize) -> Self {
        Self {
            bytes: Vec::new(),
            overflowed: false,
            cap,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if !self.overflowed {
            if self.bytes.len().saturating_add(data.len()) <= self.cap {
                self.bytes.extend_from_slice(data);
                return;
            }
            // Over the cap: from now on keep only a tail, from which the usage
            // block can still be salvaged. Trim first so the buffer never grows.
            self.overflowed = true;
            let tail = self.cap.clamp(1, SALVAGE_TAIL);
            let cut = self.bytes.len().saturating_sub(tail);
            self.bytes.drain(..cut);
            self.bytes.shrink_to(tail.saturating_mul(2));
        }
        let tail = self.cap.clamp(1, SALVAGE_TAIL);
        if data.len() >= tail {
            self.bytes.clear();
            let from = data.len().saturating_sub(tail);
            self.bytes.extend_from_slice(data.get(from..).unwrap_or_default());
        } else {
            self.bytes.extend_from_slice(data);
            if self.bytes.len() > tail.saturating_mul(2) {
                let cut = self.bytes.len().saturating_sub(tail);
                self.bytes.drain(..cut);
            }
        }
    }

    /// Hands the finished event to `st` and empties the buffer.
    fn finish(&mut self, st: &mut State, sse: bool) {
        if self.overflowed {
            st.salvage(&self.bytes);
        } else if sse {
            st.dispatch(&self.bytes);
        } else {
            st.process(&self.bytes);
        }
        self.reset();
    }

    fn reset(&mut self) {
        self.bytes.clear();
        self.overflowed = false;
        if self.bytes.capacity() > KEEP_CAPACITY {
            self.bytes.shrink_to(KEEP_CAPACITY);
        }
    }
}

// ---------------------------------------------------------------------------
// JSON object splitter

/// Finds top-level JSON objects (brace depth 0 → 0) in a byte stream,
/// string-aware; used for unary bodies, JSON-array streams and raw JSON inside SSE.
struct Splitter {
    depth: u32,
    in_str: bool,
    esc: bool,
    buf: EventBuf,
}

impl Splitter {
    fn new(cap: usize) -> Self {
        Self {
            depth: 0,
            in_str: false,
            esc: false,
            buf: EventBuf::new(cap),
        }
    }

    fn feed(&mut self, input: &[u8], st: &mut State) {
        // An object begun in an earlier feed lives in `buf`; one begun here is
        // parsed straight from `input` when it also ends here.
        let mut carried = self.depth > 0;
        let mut start = 0usize;
        let mut i = 0usize;
        while let Some(rest) = input.get(i..).filter(|r| !r.is_empty()) {
            if self.in_str {
                if self.esc {
                    self.esc = false;
                    i += 1;
                    continue;
                }
                let Some(k) = memchr2(b'"', b'\\', rest) else {
                    break;
                };
                if rest.get(k) == Some(&b'"') {
                    self.in_str = false;
                } else {
                    self.esc = true;
                }
                i += k + 1;
                continue;
            }
            let Some(k) = memchr3(b'{', b'}', b'"', rest) else {
                break;
            };
            let p = i + k;
            i = p + 1;
            match rest.get(k) {
                Some(b'"') => self.in_str = true,
                Some(b'{') => {
                    if self.depth == 0 {
                        start = p;
                    }
                    self.depth = self.depth.saturating_add(1);
                }
                _ => {
                    if self.depth == 0 {
                        continue;
                    }
                    self.depth -= 1;
                    if self.depth == 0 {
                        let obj = input.get(start..i).unwrap_or_default();
                        if carried {
                            self.buf.push(obj);
                            self.buf.finish(st, false);
                            carried = false;
                        } else {
                            st.process(obj);
                        }
                    }
                }
            }
        }
        if self.depth > 0 {
            self.buf.push(input.get(start..).unwrap_or_default());
        }
    }

    /// Raw JSON inside SSE is line-based: a string never spans lines in valid
    /// JSON, so a stray quote must not swallow the following lines.
    fn line_end(&mut self, st: &mut State) {
        if self.depth > 0 {
            self.feed(b"\n", st);
        }
        self.in_str = false;
        self.esc = false;
    }

    fn reset(&mut self) {
        self.depth = 0;
        self.in_str = false;
        self.esc = false;
        self.buf.reset();
    }
}

// ---------------------------------------------------------------------------
// SSE

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineMode {
    /// At the start of a line, matching the `data:` prefix.
    Start,
    /// Just after `data:`; one optional space follows.
    DataSpace,
    /// Inside a data line's value.
    Data,
    /// Inside a line that carries nothing for us (`event:`, `id:`, comments, …).
    Ignore,
    /// Inside a raw (non-`data:`) JSON line.
    Raw,
}

const DATA_PREFIX: &[u8] = b"data:";

struct SseParser {
    mode: LineMode,
    /// Bytes of `data:` matched so far on this line.
    prefix: usize,
    /// The line so far is only spaces/tabs.
    lead_ws: bool,
    /// The previous line ended with CR; a following LF belongs to it.
    skip_lf: bool,
    /// A raw JSON object is open across lines.
    raw_active: bool,
    /// At least one data line belongs to the current event.
    has_data: bool,
    /// The event's first data line began in the current `feed` call.
    first_line_here: bool,
    /// The event's data so far, as a range of the current `feed` input, when it
    /// was not copied into `data` (the common case: a whole event in one frame).
    lazy: Option<(usize, usize)>,
    data: EventBuf,
    raw: Splitter,
}

impl SseParser {
    fn new(cap: usize) -> Self {
        Self {
            mode: LineMode::Start,
            prefix: 0,
            lead_ws: false,
            skip_lf: false,
            raw_active: false,
            has_data: false,
            first_line_here: false,
            lazy: None,
            data: EventBuf::new(cap),
            raw: Splitter::new(cap),
        }
    }

    fn feed(&mut self, input: &[u8], st: &mut State) {
        let mut i = 0usize;
        while let Some(&b) = input.get(i) {
            if self.skip_lf {
                self.skip_lf = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.mode {
                LineMode::Start => i += self.start_byte(b, input, st),
                LineMode::DataSpace => {
                    if b == b' ' {
                        i += 1;
                    }
                    self.mode = LineMode::Data;
                }
                LineMode::Data | LineMode::Ignore | LineMode::Raw => {
                    let rest = input.get(i..).unwrap_or_default();
                    let end = memchr2(b'\n', b'\r', rest);
                    let seg = rest.get(..end.unwrap_or(rest.len())).unwrap_or_default();
                    match self.mode {
                        LineMode::Data if self.first_line_here => {
                            self.lazy = Some((i, i + seg.len()));
                            self.first_line_here = false;
                        }
                        LineMode::Data => self.data.push(seg),
                        LineMode::Raw => self.raw.feed(seg, st),
                        _ => {}
                    }
                    i += seg.len();
                    if let Some(k) = end {
                        self.end_line(input, st);
                        self.skip_lf = rest.get(k) == Some(&b'\r');
                        i += 1;
                    }
                }
            }
        }
        // Ranges of `input` do not outlive this call.
        self.materialize(input);
        self.first_line_here = false;
    }

    /// Copies lazily tracked data into the event buffer.
    fn materialize(&mut self, input: &[u8]) {
        if let Some((from, to)) = self.lazy.take() {
            self.data.push(input.get(from..to).unwrap_or_default());
        }
    }

    /// Handles one byte at the start of a line; returns how many bytes it consumed.
    fn start_byte(&mut self, b: u8, input: &[u8], st: &mut State) -> usize {
        if b == b'\n' || b == b'\r' {
            self.end_line(input, st);
            self.skip_lf = b == b'\r';
            return 1;
        }
        if self.prefix == 0 {
            if self.raw_active {
                // Inside raw JSON only a `data:` line can interrupt it.
                if b != b'd' {
                    self.mode = LineMode::Raw;
                    return 0;
                }
            } else if b == b'{' || b == b'[' {
                self.raw_active = true;
                self.mode = LineMode::Raw;
                return 0;
            } else if b == b' ' || b == b'\t' {
                self.lead_ws = true;
                return 1;
            } else if self.lead_ws {
                self.mode = LineMode::Ignore;
                return 0;
            }
        }
        if DATA_PREFIX.get(self.prefix) == Some(&b) {
            self.prefix += 1;
            if self.prefix == DATA_PREFIX.len() {
                self.begin_data(input);
                self.mode = LineMode::DataSpace;
            }
            return 1;
        }
        if self.raw_active {
            let matched = DATA_PREFIX.get(..self.prefix).unwrap_or_default();
            self.raw.feed(matched, st);
            self.mode = LineMode::Raw;
        } else {
            self.mode = LineMode::Ignore;
        }
        0
    }

    fn begin_data(&mut self, input: &[u8]) {
        if self.raw_active {
            // A broken raw object is abandoned when regular events resume.
            self.raw.reset();
            self.raw_active = false;
        }
        if self.has_data {
            self.materialize(input);
            self.data.push(b"\n");
        } else {
            self.first_line_here = true;
        }
        self.has_data = true;
    }

    fn end_line(&mut self, input: &[u8], st: &mut State) {
        match self.mode {
            LineMode::Start => {
                if self.prefix == 0 && !self.lead_ws {
                    self.dispatch(input, st);
                } else if self.prefix == DATA_PREFIX.len() - 1 && !self.raw_active {
                    // A bare `data` line is a data field with an empty value.
                    self.begin_data(input);
                    self.first_line_here = false;
                }
            }
            LineMode::Raw => {
                self.raw.line_end(st);
                if self.raw.depth == 0 {
                    self.raw.reset();
                    self.raw_active = false;
                }
            }
            LineMode::DataSpace | LineMode::Data | LineMode::Ignore => {}
        }
        self.mode = LineMode::Start;
        self.prefix = 0;
        self.lead_ws = false;
    }

    fn dispatch(&mut self, input: &[u8], st: &mut State) {
        if !self.has_data {
            return;
        }
        match self.lazy.take() {
            Some((from, to)) => st.dispatch(input.get(from..to).unwrap_or_default()),
            None => self.data.finish(st, true),
        }
        self.has_data = false;
        self.first_line_here = false;
    }

    /// The data of an event not yet terminated by a blank line, if it looks complete.
    fn pending_event(&self) -> Option<&[u8]> {
        if !self.has_data || self.data.overflowed {
            return None;
        }
        let d = self.data.bytes.trim_ascii();
        (d.last() == Some(&b'}') || d == b"[DONE]").then_some(d)
    }
}

// ---------------------------------------------------------------------------
// Request text counter

/// Counts characters of JSON string values whose key is "text" or "content" (when the value is a string) in a JSON document fed in arbitrary pieces; used on REQUEST bodies to estimate prompt tokens. Never panics, tolerates truncation.
pub struct TextCounter {
    chars: u64,
    /// Container kinds, innermost last (`true` = object); capped.
    stack: Vec<bool>,
    /// Nesting beyond the stack cap.
    deep: u64,
    /// Next string in this object is a key.
    expect_key: bool,
    /// The last key was `text` or `content`; its value is not seen yet.
    key_hit: bool,
    str_kind: StrKind,
    esc: Esc,
    key: [u8; 8],
    key_len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StrKind {
    None,
    Key,
    Skip,
    Count,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    /// Inside `\uXXXX`: digits read so far and their value.
    Unicode(u8, u16),
}

const MAX_STACK: usize = 4096;

impl Default for TextCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl TextCounter {
    /// Creates a counter at the start of a document.
    pub fn new() -> Self {
        Self {
            chars: 0,
            stack: Vec::new(),
            deep: 0,
            expect_key: false,
            key_hit: false,
            str_kind: StrKind::None,
            esc: Esc::None,
            key: [0; 8],
            key_len: 0,
        }
    }

    /// Characters counted so far.
    pub fn chars(&self) -> u64 {
        self.chars
    }

    /// Feeds the next bytes of the document.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0usize;
        while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
            if self.str_kind == StrKind::None {
                if let Some(&b) = rest.first() {
                    self.structural(b);
                }
                i += 1;
                continue;
            }
            if self.esc != Esc::None {
                if let Some(&b) = rest.first() {
                    self.escape_byte(b);
                }
                i += 1;
                continue;
            }
            let end = memchr2(b'"', b'\\', rest);
            let seg = rest.get(..end.unwrap_or(rest.len())).unwrap_or_default();
            match self.str_kind {
                StrKind::Count => self.add(utf8_chars(seg)),
                StrKind::Key => self.key_bytes(seg),
                StrKind::Skip | StrKind::None => {}
            }
            i += seg.len();
            if let Some(k) = end {
                if rest.get(k) == Some(&b'"') {
                    self.close_string();
                } else {
                    self.esc = Esc::Backslash;
                }
                i += 1;
            }
        }
    }

    fn add(&mut self, n: u64) {
        self.chars = self.chars.saturating_add(n);
    }

    fn in_object(&self) -> bool {
        self.deep == 0 && self.stack.last() == Some(&true)
    }

    fn push(&mut self, object: bool) {
        if self.deep > 0 || self.stack.len() >= MAX_STACK {
            self.deep = self.deep.saturating_add(1);
        } else {
            self.stack.push(object);
        }
    }

    fn pop(&mut self) {
        if self.deep > 0 {
            self.deep -= 1;
        } else {
            self.stack.pop();
        }
    }

    fn structural(&mut self, b: u8) {
        match b {
            b'"' => {
                if self.expect_key && self.in_object() {
                    self.str_kind = StrKind::Key;
                    self.key_len = 0;
                } else {
                    self.str_kind = if self.key_hit { StrKind::Count } else { StrKind::Skip };
                    self.key_hit = false;
                }
                self.expect_key = false;
            }
            b'{' => {
                self.push(true);
                self.expect_key = true;
                self.key_hit = false;
            }
            b'[' => {
                self.push(false);
                self.expect_key = false;
                self.key_hit = false;
            }
            b'}' | b']' => {
                self.pop();
                self.expect_key = false;
                self.key_hit = false;
            }
            b',' => {
                self.expect_key = self.in_object();
                self.key_hit = false;
            }
            b':' | b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => self.key_hit = false,
        }
    }

    fn key_bytes(&mut self, seg: &[u8]) {
        for &b in seg {
            match self.key.get_mut(self.key_len) {
                Some(slot) => {
                    *slot = b;
                    self.key_len += 1;
                }
                None => {
                    // Longer than any key we look for.
                    self.key_len = usize::MAX;
                    return;
                }
            }
        }
    }

    fn close_string(&mut self) {
        if self.str_kind == StrKind::Key {
            let key = self.key.get(..self.key_len).unwrap_or_default();
            self.key_hit = key == b"text" || key == b"content";
        }
        self.str_kind = StrKind::None;
    }

    fn escape_byte(&mut self, b: u8) {
        match self.esc {
            Esc::Backslash => {
                if self.str_kind == StrKind::Key {
                    // Escaped keys never match.
                    self.key_len = usize::MAX;
                }
                if b == b'u' {
                    self.esc = Esc::Unicode(0, 0);
                } else {
                    if self.str_kind == StrKind::Count {
                        self.add(1);
                    }
                    self.esc = Esc::None;
                }
            }
            Esc::Unicode(n, v) => {
                let digit = char::from(b).to_digit(16).and_then(|d| u16::try_from(d).ok());
                let v = v.wrapping_shl(4) | digit.unwrap_or(0);
                if n >= 3 || digit.is_none() {
                    // A low surrogate completes a pair already counted.
                    if self.str_kind == StrKind::Count && !(0xDC00..=0xDFFF).contains(&v) {
                        self.add(1);
                    }
                    self.esc = Esc::None;
                    if digit.is_none() && b == b'"' {
                        self.close_string();
                    }
                } else {
                    self.esc = Esc::Unicode(n + 1, v);
                }
            }
            Esc::None => {}
        }
    }
}

/// Unicode scalar values in a UTF-8 slice (continuation bytes are not counted).
fn utf8_chars(s: &[u8]) -> u64 {
    let n = s.iter().filter(|&&b| (b as i8) >= -0x40).count();
    u64::try_from(n).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------

/// Shared wire fixtures; the directory is named only here.
#[cfg(test)]
pub(crate) mod fixtures {
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
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use proptest::prelude::*;

    const SENTENCE: &str = "The meter counts every token that passes, and nothing more.";

    fn scan(format: Format, body: &[u8]) -> ScanSummary {
        let mut s = Scanner::new(format);
        s.feed(body);
        s.summary()
    }

    fn scan_pieces(format: Format, pieces: &[&[u8]]) -> ScanSummary {
        let mut s = Scanner::new(format);
        for p in pieces {
            s.feed(p);
        }
        s.summary()
    }

    fn chars(s: &str) -> u64 {
        s.chars().count() as u64
    }

    fn full_usage() -> UsageReport {
        UsageReport {
            prompt: Some(1204),
            candidates: Some(52),
            thoughts: Some(388),
            cached: Some(1000),
            tool_use_prompt: None,
            total: Some(1644),
        }
    }

    #[test]
    fn unary_fixture() {
        let s = scan(Format::UnaryJson, UNARY);
        assert_eq!(s.usage, full_usage());
        assert!(s.usage_seen);
        assert_eq!(s.text_chars, chars(SENTENCE));
        assert_eq!(s.model_version.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(s.error, None);
        assert_eq!(s.events, 1);
    }

    #[test]
    fn unary_blocked_fixture() {
        let s = scan(Format::UnaryJson, UNARY_BLOCKED);
        let want = UsageReport {
            prompt: Some(17),
            total: Some(17),
            ..UsageReport::default()
        };
        assert_eq!(s.usage, want);
        assert!(s.usage_seen);
        assert_eq!(s.text_chars, 0);
    }

    #[test]
    fn sse_crlf_fixture() {
        let s = scan(Format::Sse, SSE_CRLF);
        assert_eq!(s.usage, full_usage());
        assert_eq!(s.text_chars, chars(SENTENCE));
        assert_eq!(s.events, 5);
        assert!(!s.done_marker);
        assert_eq!(s.model_version.as_deref(), Some("gemini-2.5-flash"));
    }

    #[test]
    fn sse_lf_final_usage_fixture() {
        let s = scan(Format::Sse, SSE_LF_FINAL);
        let want = UsageReport {
            prompt: Some(88),
            candidates: Some(52),
            tool_use_prompt: Some(40),
            total: Some(180),
            ..UsageReport::default()
        };
        assert_eq!(s.usage, want);
        assert_eq!(s.text_chars, chars(SENTENCE));
        assert_eq!(s.model_version.as_deref(), Some("gemini-2.0-flash"));
    }

    #[test]
    fn json_array_fixture() {
        let s = scan(Format::JsonArray, JSON_ARRAY);
        assert_eq!(s.usage, full_usage());
        assert_eq!(s.text_chars, chars(SENTENCE));
        assert_eq!(s.events, 5);
    }

    #[test]
    fn midstream_error_fixture() {
        let s = scan(Format::Sse, SSE_MIDSTREAM_ERROR);
        let e = s.error.clone().expect("error seen");
        assert_eq!(e.code, Some(503));
        assert_eq!(e.status.as_deref(), Some("UNAVAILABLE"));
        assert_eq!(
            e.message.as_deref(),
            Some("The model is overloaded. Please try again later.")
        );
        assert_eq!(s.usage.prompt, Some(1204));
        assert_eq!(s.usage.candidates, Some(21));
        assert_eq!(s.usage.thoughts, Some(388));
        assert_eq!(s.usage.total, Some(1613));
        assert_eq!(s.usage.cached, Some(1000));
        assert_eq!(s.text_chars, chars("The meter counts every "));
    }

    #[test]
    fn openai_stream_fixture() {
        let s = scan(Format::OpenAiSse, OPENAI_STREAM);
        let want = UsageReport {
            prompt: Some(1204),
            candidates: Some(440),
            total: Some(1644),
            ..UsageReport::default()
        };
        assert_eq!(s.usage, want);
        assert!(s.done_marker);
        assert_eq!(s.text_chars, chars(SENTENCE));
        assert_eq!(s.model_version.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(s.events, 5);
    }

    #[test]
    fn error_429_fixture() {
        let s = scan(Format::UnaryJson, ERROR_429);
        assert_eq!(s.usage, UsageReport::default());
        assert!(!s.usage_seen);
        let e = s.error.expect("error seen");
        assert_eq!(e.code, Some(429));
        assert_eq!(e.status.as_deref(), Some("RESOURCE_EXHAUSTED"));
    }

    #[test]
    fn every_fixture_split_at_every_offset() {
        for &(name, format, body) in ALL {
            let whole = scan(format, body);
            for cut in 0..=body.len() {
                let (a, b) = body.split_at(cut);
                assert_eq!(scan_pieces(format, &[a, b]), whole, "{name} cut at {cut}");
            }
        }
    }

    #[test]
    fn every_fixture_byte_by_byte() {
        for &(name, format, body) in ALL {
            let whole = scan(format, body);
            let mut s = Scanner::new(format);
            for b in body.chunks(1) {
                s.feed(b);
                let _ = s.summary();
            }
            assert_eq!(s.summary(), whole, "{name}");
        }
    }

    #[test]
    fn json_array_in_other_json_formats_and_repeated() {
        let mut body = JSON_ARRAY.to_vec();
        body.extend_from_slice(JSON_ARRAY);
        let s = scan(Format::JsonArray, &body);
        assert_eq!(s.events, 10);
        assert_eq!(s.usage, full_usage());
        assert_eq!(s.text_chars, 2 * chars(SENTENCE));
    }

    #[test]
    fn sse_reads_a_json_array_body_too() {
        let s = scan(Format::Sse, JSON_ARRAY);
        assert_eq!(s.usage, full_usage());
        assert_eq!(s.events, 5);
    }

    #[test]
    fn usage_kept_field_by_field() {
        let body =
            b"data: {\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":3,\"totalTokenCount\":8}}\n\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"x\"}]}}]}\n\n\
data: {\"usageMetadata\":{\"candidatesTokenCount\":7}}\n\n\
data: {\"usageMetadata\":null}\n\n";
        let s = scan(Format::Sse, body);
        assert_eq!(s.usage.prompt, Some(5));
        assert_eq!(s.usage.candidates, Some(7));
        assert_eq!(s.usage.total, Some(8));
        assert_eq!(s.text_chars, 1);
        assert_eq!(s.events, 4);
    }

    #[test]
    fn openai_usage_null_and_details() {
        let body = b"data: {\"model\":\"m1\",\"choices\":[{\"delta\":{\"content\":\"h\\u00e9\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":2},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\r\n\r\n\
data:{\"choices\":[{\"delta\":{\"content\":null}}],\"usage\":null}\r\n\r\n\
data: [DONE]\r\n\r\n";
        let s = scan(Format::OpenAiSse, body);
        let want = UsageReport {
            prompt: Some(3),
            candidates: Some(4),
            thoughts: Some(1),
            cached: Some(2),
            tool_use_prompt: None,
            total: Some(7),
        };
        assert_eq!(s.usage, want);
        assert_eq!(s.text_chars, 2);
        assert!(s.done_marker);
        assert_eq!(s.model_version.as_deref(), Some("m1"));
    }

    #[test]
    fn openai_unary_message_content() {
        let body = br#"{"id":"x","model":"gemini-2.5-flash","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":"10","completion_tokens":2,"total_tokens":12.0}}"#;
        let s = scan(Format::OpenAiJson, body);
        assert_eq!(s.usage.prompt, Some(10));
        assert_eq!(s.usage.candidates, Some(2));
        assert_eq!(s.usage.total, Some(12));
        assert_eq!(s.text_chars, 11);
    }

    #[test]
    fn sse_line_endings_fields_and_multiline_data() {
        // CR-only, LF and CRLF mixed; event/id/retry/comment lines; a data field
        // split over two lines joined with "\n" (legal JSON whitespace).
        let body = b": keep-alive\revent: message\nid: 7\r\nretry: 100\r\
data: {\"usageMetadata\":\r\ndata: {\"promptTokenCount\": 9}, \"modelVersion\": \"m\"}\r\r\
data:{\"usageMetadata\":{\"totalTokenCount\":11}}\n\r\n";
        let s = scan(Format::Sse, body);
        assert_eq!(s.usage.prompt, Some(9));
        assert_eq!(s.usage.total, Some(11));
        assert_eq!(s.events, 2);
        assert_eq!(s.model_version.as_deref(), Some("m"));
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(scan_pieces(Format::Sse, &[a, b]), s, "cut {cut}");
        }
    }

    #[test]
    fn braces_and_quotes_inside_strings() {
        let body = br#"[{"candidates":[{"content":{"parts":[{"text":"a } { \" ] [ \\"}]}}],"usageMetadata":{"totalTokenCount":3}}
,
{"usageMetadata":{"promptTokenCount":1}}
]"#;
        let s = scan(Format::JsonArray, body);
        assert_eq!(s.events, 2);
        assert_eq!(s.usage.total, Some(3));
        assert_eq!(s.usage.prompt, Some(1));
        assert_eq!(s.text_chars, chars(r#"a } { " ] [ \"#));
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(scan_pieces(Format::JsonArray, &[a, b]), s, "cut {cut}");
        }
    }

    #[test]
    fn array_wrapped_error() {
        let body = b"[{\n  \"error\": {\n    \"code\": 400,\n    \"message\": \"bad\",\n    \"status\": \"INVALID_ARGUMENT\"\n  }\n}\n]";
        for format in [Format::JsonArray, Format::UnaryJson, Format::Sse] {
            let s = scan(format, body);
            let e = s.error.expect("error");
            assert_eq!(e.code, Some(400), "{format:?}");
            assert_eq!(e.status.as_deref(), Some("INVALID_ARGUMENT"));
        }
    }

    #[test]
    fn sse_data_error_payload() {
        let body =
            b"data: {\"error\":{\"code\":500,\"message\":\"Internal error encountered.\",\"status\":\"INTERNAL\"}}\n\n";
        let e = scan(Format::Sse, body).error.expect("error");
        assert_eq!(e.code, Some(500));
    }

    #[test]
    fn stray_raw_line_does_not_hide_later_events() {
        let body = b"{ not json\n\"quote\ndata: {\"usageMetadata\":{\"totalTokenCount\":4}}\n\n";
        let s = scan(Format::Sse, body);
        assert_eq!(s.usage.total, Some(4));
    }

    #[test]
    fn unterminated_last_event_is_counted_tentatively() {
        let body = b"data: {\"usageMetadata\":{\"totalTokenCount\":4}}";
        let mut s = Scanner::new(Format::Sse);
        s.feed(body);
        assert_eq!(s.summary().usage.total, Some(4));
        s.feed(b"\r\n");
        assert_eq!(s.summary().usage.total, Some(4));
        s.feed(b"\r\n");
        let done = s.summary();
        assert_eq!(done.usage.total, Some(4));
        assert_eq!(done.events, 1);
    }

    #[test]
    fn bad_events_are_skipped() {
        let body = b"data: {\"usageMetadata\":{\"totalTokenCount\":4}}\n\ndata: {garbage\n\ndata: {\"candidates\":5,\"usageMetadata\":[1],\"modelVersion\":7,\"error\":null}\n\n";
        let s = scan(Format::Sse, body);
        assert_eq!(s.usage.total, Some(4));
        assert_eq!(s.events, 2);
        assert_eq!(s.error, None);
        assert_eq!(s.model_version, None);
    }

    #[test]
    fn oversized_event_is_dropped_but_usage_salvaged() {
        let text = "x".repeat(10_000);
        let ev = format!(
            "{{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{text}\"}}]}}}}],\"usageMetadata\":{{\"promptTokenCount\":3,\"totalTokenCount\":9}},\"modelVersion\":\"big\"}}"
        );
        for format in [Format::Sse, Format::JsonArray] {
            let body = if format == Format::Sse {
                format!("data: {ev}\n\ndata: {{\"usageMetadata\":{{\"candidatesTokenCount\":6}}}}\n\n")
            } else {
                format!("[{ev}\r\n,\r\n{{\"usageMetadata\":{{\"candidatesTokenCount\":6}}}}\r\n]")
            };
            let mut s = Scanner::with_cap(format, 1024);
            for piece in body.as_bytes().chunks(100) {
                s.feed(piece);
            }
            if let Framing::Sse(p) = &s.framing {
                assert!(p.data.bytes.capacity() <= 4096);
            }
            let sum = s.summary();
            assert_eq!(sum.usage.prompt, Some(3), "{format:?}");
            assert_eq!(sum.usage.total, Some(9));
            assert_eq!(sum.usage.candidates, Some(6));
            assert_eq!(sum.model_version.as_deref(), Some("big"));
            assert_eq!(sum.events, 2);
        }
    }

    #[test]
    fn scanners_are_send() {
        fn send<T: Send>() {}
        send::<Scanner>();
        send::<TextCounter>();
    }

    #[test]
    fn text_counter_example() {
        let doc = br#"{"contents":[{"role":"user","parts":[{"text":"h\u00e9llo \"x\""}]}]}"#;
        let raw = "{\"contents\":[{\"role\":\"user\",\"parts\":[{\"text\":\"héllo \\\"x\\\"\"}]}]}";
        for d in [doc.as_slice(), raw.as_bytes()] {
            let mut c = TextCounter::new();
            c.feed(d);
            assert_eq!(c.chars(), 9);
            for cut in 0..=d.len() {
                let (a, b) = d.split_at(cut);
                let mut c = TextCounter::new();
                c.feed(a);
                c.feed(b);
                assert_eq!(c.chars(), 9, "cut {cut}");
            }
        }
    }

    #[test]
    fn text_counter_keys_and_values() {
        let doc = "{\"messages\":[{\"role\":\"user\",\"content\":\"ab\"},{\"content\":[{\"type\":\"text\",\"text\":\"cd\"}]}],\
\"x\":{\"text\":5,\"y\":\"text\"},\"z\":[\"text\",\"content\"],\"s\":\"\\ud83d\\ude00!\"}";
        let mut c = TextCounter::new();
        c.feed(doc.as_bytes());
        assert_eq!(c.chars(), 4);
        let mut c = TextCounter::new();
        c.feed(br#"{"text":"\ud83d\ude00\n"}"#);
        assert_eq!(c.chars(), 2);
        let mut c = TextCounter::new();
        c.feed(br#"{"text":"abc"#);
        assert_eq!(c.chars(), 3);
    }

    fn any_format() -> impl Strategy<Value = Format> {
        prop::sample::select(vec![
            Format::UnaryJson,
            Format::Sse,
            Format::JsonArray,
            Format::OpenAiJson,
            Format::OpenAiSse,
        ])
    }

    fn jsonish_bytes() -> impl Strategy<Value = Vec<u8>> {
        let alphabet = b"{}[]\":,\\ \r\ndata:[DONE]usageMetadataerrortext0123456789u".to_vec();
        prop::collection::vec(prop_oneof![any::<u8>(), prop::sample::select(alphabet)], 0..1500)
    }

    fn cut(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for p in points {
            out.push(body[last..p].to_vec());
            last = p;
        }
        out.push(body[last..].to_vec());
        out
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            r#"[a-z"\\\n{}\[\]é😀\x01\x7f]{0,12}"#.prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let key = prop::sample::select(vec!["text", "content", "role", "parts", "tex", "contents"]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::vec((key, inner), 0..5).prop_map(|kv| {
                    serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    /// Reference count for `TextCounter`.
    fn reference_chars(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Array(a) => a.iter().map(reference_chars).sum(),
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) if k == "text" || k == "content" => chars(s),
                    other => reference_chars(other),
                })
                .sum(),
            _ => 0,
        }
    }

    type GenEvent = (Vec<String>, [Option<u64>; 3]);

    fn gen_events() -> impl Strategy<Value = Vec<GenEvent>> {
        let text = r#"[a-z"\\\n{}\[\]é😀\x01]{0,10}"#;
        let usage = prop::array::uniform3(prop::option::of(0u64..100_000));
        prop::collection::vec((prop::collection::vec(text, 0..3), usage), 1..6)
    }

    fn event_json(ev: &GenEvent) -> serde_json::Value {
        let (texts, usage) = ev;
        let parts: Vec<_> = texts.iter().map(|t| serde_json::json!({ "text": t })).collect();
        let mut v = serde_json::json!({
            "candidates": [{ "content": { "parts": parts, "role": "model" }, "index": 0 }],
            "modelVersion": "m",
        });
        let names = ["promptTokenCount", "candidatesTokenCount", "totalTokenCount"];
        let mut meta = serde_json::Map::new();
        for (name, value) in names.iter().zip(usage) {
            if let Some(value) = value {
                meta.insert((*name).to_owned(), (*value).into());
            }
        }
        if !meta.is_empty() {
            v["usageMetadata"] = serde_json::Value::Object(meta);
        }
        v
    }

    proptest! {
        #[test]
        fn generated_native_streams(
            events in gen_events(),
            eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            cuts in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut want = UsageReport::default();
            let mut want_chars = 0;
            for (texts, usage) in &events {
                want_chars += texts.iter().map(|t| chars(t)).sum::<u64>();
                for (slot, value) in [&mut want.prompt, &mut want.candidates, &mut want.total]
                    .into_iter()
                    .zip(usage)
                {
                    if value.is_some() {
                        *slot = *value;
                    }
                }
            }
            let values: Vec<_> = events.iter().map(event_json).collect();
            let mut sse = Vec::new();
            for v in &values {
                sse.extend_from_slice(b"data: ");
                sse.extend_from_slice(&serde_json::to_vec(v).expect("serialize"));
                sse.extend_from_slice(format!("{eol}{eol}").as_bytes());
            }
            let elems: Vec<String> = values
                .iter()
                .map(|v| serde_json::to_string_pretty(v).expect("serialize"))
                .collect();
            let array = format!("[{}\r\n]", elems.join("\r\n,\r\n"));
            for (format, body) in [(Format::Sse, sse.as_slice()), (Format::JsonArray, array.as_bytes())] {
                let pieces = cut(body, &cuts);
                let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
                let got = scan_pieces(format, &refs);
                prop_assert_eq!(got.usage, want, "{:?}", format);
                prop_assert_eq!(got.text_chars, want_chars, "{:?}", format);
                prop_assert_eq!(got.events, events.len() as u64);
            }
        }

        #[test]
        fn text_counter_matches_reference(
            v in json_value(),
            pretty in any::<bool>(),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let doc = if pretty {
                serde_json::to_vec_pretty(&v).expect("serialize")
            } else {
                serde_json::to_vec(&v).expect("serialize")
            };
            let mut c = TextCounter::new();
            for piece in cut(&doc, &cuts) {
                c.feed(&piece);
            }
            prop_assert_eq!(c.chars(), reference_chars(&v));
        }

        #[test]
        fn random_bytes_never_panic(
            format in any_format(),
            body in jsonish_bytes(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let whole = scan(format, &body);
            let mut s = Scanner::with_cap(format, 64);
            let mut t = TextCounter::new();
            let pieces = cut(&body, &cuts);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            for p in &refs {
                s.feed(p);
                t.feed(p);
                let _ = s.summary();
            }
            let _ = t.chars();
            prop_assert_eq!(scan_pieces(format, &refs), whole);
        }

        #[test]
        fn fixtures_in_random_pieces(
            idx in 0..ALL.len(),
            cuts in prop::collection::vec(any::<usize>(), 0..40),
        ) {
            let (_, format, body) = ALL[idx];
            let pieces = cut(body, &cuts);
            let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(scan_pieces(format, &refs), scan(format, body));
        }
    }
}
