//! Reading one JSON event field by field, borrowed from the input. Objects are read key by key
//! (keys as raw bytes, so serde_json skips UTF-8 validation), unknown keys are skipped with
//! `IgnoredAny`, and every value type is lenient: a value of an unexpected JSON type counts as
//! absent instead of failing the whole event. Duplicate keys: the last one wins.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::config::{MODALITIES, Modality};

#[derive(Default)]
pub(super) struct Event<'a> {
    pub(super) candidates: SumSeq<Candidate>,
    pub(super) usage_metadata: Obj<NativeUsage>,
    pub(super) model_version: Str<'a>,
    pub(super) choices: SumSeq<Choice>,
    pub(super) usage: Obj<OpenAiUsage>,
    pub(super) model: Str<'a>,
    pub(super) error: ErrField<'a>,
}

#[derive(Default)]
pub(super) struct NativeUsage {
    pub(super) prompt_token_count: Num,
    pub(super) candidates_token_count: Num,
    pub(super) thoughts_token_count: Num,
    pub(super) cached_content_token_count: Num,
    pub(super) tool_use_prompt_token_count: Num,
    pub(super) total_token_count: Num,
    pub(super) prompt_tokens_details: ByModality,
    pub(super) cache_tokens_details: ByModality,
    pub(super) candidates_tokens_details: ByModality,
}

/// One `{"modality", "tokenCount"}` entry of a details list.
#[derive(Default)]
struct ModalityCount {
    modality: ModalityName,
    token_count: Num,
}

#[derive(Default)]
pub(super) struct OpenAiUsage {
    pub(super) prompt_tokens: Num,
    pub(super) completion_tokens: Num,
    pub(super) total_tokens: Num,
    pub(super) prompt_tokens_details: Obj<PromptDetails>,
    pub(super) completion_tokens_details: Obj<CompletionDetails>,
}

#[derive(Default)]
pub(super) struct PromptDetails {
    pub(super) cached_tokens: Num,
}

#[derive(Default)]
pub(super) struct CompletionDetails {
    pub(super) reasoning_tokens: Num,
}

#[derive(Default)]
pub(super) struct Candidate {
    content: Obj<Content>,
    grounding_metadata: Obj<Grounding>,
}

/// What of `groundingMetadata` shows that Search was used: its queries and the sources found.
#[derive(Default)]
struct Grounding {
    web_search_queries: Count,
    grounding_chunks: Count,
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
pub(super) struct Choice {
    delta: Obj<Message>,
    message: Obj<Message>,
}

#[derive(Default)]
struct Message {
    content: Chars,
}

#[derive(Default)]
pub(super) struct ErrBody<'a> {
    pub(super) code: Num,
    pub(super) status: Str<'a>,
    pub(super) message: Str<'a>,
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
    b"promptTokensDetails" => prompt_tokens_details,
    b"cacheTokensDetails" => cache_tokens_details,
    b"candidatesTokensDetails" => candidates_tokens_details,
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
record!(Candidate, b"content" => content, b"groundingMetadata" => grounding_metadata);
record!(Grounding, b"webSearchQueries" => web_search_queries, b"groundingChunks" => grounding_chunks);
record!(ModalityCount, b"modality" => modality, b"tokenCount" => token_count);
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
    b"promptTokensDetails",
    b"cacheTokensDetails",
    b"candidatesTokensDetails",
    b"modality",
    b"tokenCount",
    b"groundingMetadata",
    b"webSearchQueries",
    b"groundingChunks",
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
    /// Whether the item shows a Google Search grounding (candidates only).
    fn grounded(&self) -> bool {
        false
    }
}

impl TextChars for Candidate {
    fn text_chars(&self) -> u64 {
        self.content.0.as_ref().map_or(0, |c| c.parts.0)
    }
    fn grounded(&self) -> bool {
        self.grounding_metadata
            .0
            .as_ref()
            .is_some_and(|g| g.web_search_queries.0 > 0 || g.grounding_chunks.0 > 0)
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

lenient_deserialize!(Num, Chars, Str<'a>, ErrField<'a>, ByModality, ModalityName, Count);

/// A token count; accepts numbers and numeric strings.
#[derive(Default, Clone, Copy)]
pub(super) struct Num(pub(super) Option<u64>);

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
pub(super) struct Str<'a>(pub(super) Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Lenient<'de> for Str<'a> {
    fn of_str(v: &str) -> Self {
        Str(Some(Cow::Owned(v.to_owned())))
    }
    fn of_borrowed_str(v: &'de str) -> Self {
        Str(Some(Cow::Borrowed(v)))
    }
}

/// A nested object; anything but an object is treated as absent.
pub(super) struct Obj<T>(pub(super) Option<T>);

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

/// The summed text chars of an array of objects, and whether any of them was grounded.
pub(super) struct SumSeq<T>(pub(super) u64, pub(super) bool, PhantomData<T>);

impl<T> Default for SumSeq<T> {
    fn default() -> Self {
        SumSeq(0, false, PhantomData)
    }
}

impl<'de, T: Record<'de> + TextChars> Lenient<'de> for SumSeq<T> {
    fn of_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut n = 0u64;
        let mut grounded = false;
        while let Some(item) = seq.next_element::<Obj<T>>()? {
            if let Some(item) = item.0 {
                n = n.saturating_add(item.text_chars());
                grounded |= item.grounded();
            }
        }
        Ok(SumSeq(n, grounded, PhantomData))
    }
}

/// A usage details list (`promptTokensDetails` ...): token counts summed by modality. `None`
/// when absent or not a list, so a chunk without the list keeps what an earlier one said.
#[derive(Default)]
pub(super) struct ByModality(pub(super) Option<[u64; MODALITIES]>);

impl<'de> Lenient<'de> for ByModality {
    fn of_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut counts = [0u64; MODALITIES];
        while let Some(item) = seq.next_element::<Obj<ModalityCount>>()? {
            // Entries of an unknown modality (MODALITY_UNSPECIFIED) stay unplaced: they are
            // billed at the base rate with the rest of the count.
            if let Some(ModalityCount {
                modality: ModalityName(Some(m)),
                token_count: Num(Some(n)),
            }) = item.0
                && let Some(slot) = counts.get_mut(m.index())
            {
                *slot = slot.saturating_add(n);
            }
        }
        Ok(ByModality(Some(counts)))
    }
}

/// A modality name; unknown names are absent.
#[derive(Default)]
struct ModalityName(Option<Modality>);

impl Lenient<'_> for ModalityName {
    fn of_str(v: &str) -> Self {
        ModalityName(Modality::parse(v))
    }
}

/// The length of an array.
#[derive(Default)]
struct Count(u64);

impl<'de> Lenient<'de> for Count {
    fn of_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut n = 0u64;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            n = n.saturating_add(1);
        }
        Ok(Count(n))
    }
}

impl<'de, T: Record<'de> + TextChars> Deserialize<'de> for SumSeq<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

/// The `error` member: an object, or a bare message string.
#[derive(Default)]
pub(super) struct ErrField<'a>(pub(super) Option<ErrBody<'a>>);

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
