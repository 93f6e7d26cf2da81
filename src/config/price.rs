//! The price model of one model beyond its three base rates: a long-context tier, rates by
//! modality, per-unit prices (images, video seconds), cache storage, batch discount and search
//! grounding. Only the shapes and the lookups live here; `validate` builds them and
//! `metering::pricing` applies them.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::ModelPrice;

/// A content modality as Gemini's usage details name it (`promptTokensDetails[].modality`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Modality {
    /// `TEXT`
    Text,
    /// `IMAGE`
    Image,
    /// `AUDIO`
    Audio,
    /// `VIDEO`
    Video,
    /// `DOCUMENT`
    Document,
}

/// How many modalities there are (the length of per-modality arrays).
pub const MODALITIES: usize = 5;

impl Modality {
    /// Every modality, in index order.
    pub const ALL: [Modality; MODALITIES] = [
        Modality::Text,
        Modality::Image,
        Modality::Audio,
        Modality::Video,
        Modality::Document,
    ];

    /// The wire name (`TEXT`, `AUDIO`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "TEXT",
            Modality::Image => "IMAGE",
            Modality::Audio => "AUDIO",
            Modality::Video => "VIDEO",
            Modality::Document => "DOCUMENT",
        }
    }

    /// Parses the wire name (exact, upper case); `MODALITY_UNSPECIFIED` and unknown names are `None`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::parse_bytes(s.as_bytes())
    }

    /// [`Modality::parse`] on bytes (the scanner reads names as borrowed bytes).
    pub fn parse_bytes(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"TEXT" => Modality::Text,
            b"IMAGE" => Modality::Image,
            b"AUDIO" => Modality::Audio,
            b"VIDEO" => Modality::Video,
            b"DOCUMENT" => Modality::Document,
            _ => return None,
        })
    }

    /// Position in per-modality arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Rates by modality that replace a base rate (USD per million tokens); a modality without one
/// pays the base rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModalityRates(pub [Option<Decimal>; MODALITIES]);

impl ModalityRates {
    /// The rate of `m`, if it has its own.
    pub fn get(&self, m: Modality) -> Option<Decimal> {
        self.0.get(m.index()).copied().flatten()
    }

    /// Whether no modality has its own rate.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The modalities with their own rate, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Modality, Decimal)> + '_ {
        Modality::ALL.into_iter().filter_map(|m| Some((m, self.get(m)?)))
    }

    /// The highest of these rates, if any.
    fn max(&self) -> Option<Decimal> {
        self.0.iter().flatten().copied().max()
    }
}

/// The rates above `long_context_threshold` prompt tokens (`long_*` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongContext {
    /// Prompt tokens (`promptTokenCount` of the request) above which these rates apply.
    pub threshold: u64,
    /// `long_input_per_million`.
    pub input_per_million: Decimal,
    /// `long_output_per_million`.
    pub output_per_million: Decimal,
    /// `long_cached_input_per_million`; absent: cached tokens cost the long input rate.
    pub cached_input_per_million: Option<Decimal>,
    /// `long_input_per_million_by_modality`.
    pub input_by_modality: ModalityRates,
    /// `long_cached_input_per_million_by_modality`.
    pub cached_input_by_modality: ModalityRates,
    /// `long_output_per_million_by_modality`.
    pub output_by_modality: ModalityRates,
}

/// Which tier of a model's token prices applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextTier {
    /// The base rates (prompt at or below the threshold, or no threshold).
    Standard,
    /// The `long_*` rates (prompt above `long_context_threshold`).
    Long,
}

impl ContextTier {
    /// The name records and the price table use (`standard`, `long`).
    pub fn as_str(self) -> &'static str {
        match self {
            ContextTier::Standard => "standard",
            ContextTier::Long => "long",
        }
    }
}

/// The token rates of one tier, borrowed from a [`ModelPrice`].
#[derive(Debug, Clone, Copy)]
pub struct TierRates<'a> {
    /// Which tier these are.
    pub tier: ContextTier,
    /// Fresh input, per million tokens.
    pub input: Decimal,
    /// Output (thinking included), per million tokens.
    pub output: Decimal,
    /// Cached input, per million tokens; `None`: cached tokens cost the input rate.
    pub cached: Option<Decimal>,
    /// Fresh input by modality.
    pub input_by_modality: &'a ModalityRates,
    /// Cached input by modality.
    pub cached_by_modality: &'a ModalityRates,
    /// Output by modality.
    pub output_by_modality: &'a ModalityRates,
}

impl TierRates<'_> {
    /// Fresh input rate of a modality (`None`: tokens the details do not place).
    pub fn input_rate(&self, m: Option<Modality>) -> Decimal {
        m.and_then(|m| self.input_by_modality.get(m)).unwrap_or(self.input)
    }

    /// Cached input rate of a modality: its own cached rate, else the cached base rate, else
    /// (no cached price at all) the modality's fresh input rate, as cached tokens without a
    /// cached price always cost the input price.
    pub fn cached_rate(&self, m: Option<Modality>) -> Decimal {
        m.and_then(|m| self.cached_by_modality.get(m))
            .or(self.cached)
            .unwrap_or_else(|| self.input_rate(m))
    }

    /// Output rate of a modality.
    pub fn output_rate(&self, m: Option<Modality>) -> Decimal {
        m.and_then(|m| self.output_by_modality.get(m)).unwrap_or(self.output)
    }

    /// The highest rate any prompt token can cost in this tier.
    fn dearest_input(&self) -> Decimal {
        let mut d = self.input.max(self.cached.unwrap_or(Decimal::ZERO));
        for r in [self.input_by_modality, self.cached_by_modality] {
            d = d.max(r.max().unwrap_or(Decimal::ZERO));
        }
        d
    }

    /// The highest rate any output token can cost in this tier.
    fn dearest_output(&self) -> Decimal {
        self.output.max(self.output_by_modality.max().unwrap_or(Decimal::ZERO))
    }
}

impl ModelPrice {
    /// The rates that apply to a request with `prompt_tokens` prompt tokens (cached ones
    /// included), judged per request as Google does: long above the threshold, else standard.
    pub fn tier_for(&self, prompt_tokens: u64) -> TierRates<'_> {
        match &self.long_context {
            Some(l) if prompt_tokens > l.threshold => self.long_rates(l),
            _ => self.standard_rates(),
        }
    }

    /// The standard (base) rates.
    pub fn standard_rates(&self) -> TierRates<'_> {
        TierRates {
            tier: ContextTier::Standard,
            input: self.input_per_million,
            output: self.output_per_million,
            cached: self.cached_input_per_million,
            input_by_modality: &self.input_by_modality,
            cached_by_modality: &self.cached_input_by_modality,
            output_by_modality: &self.output_by_modality,
        }
    }

    /// The long-context rates of `l`.
    pub fn long_rates<'a>(&'a self, l: &'a LongContext) -> TierRates<'a> {
        TierRates {
            tier: ContextTier::Long,
            input: l.input_per_million,
            output: l.output_per_million,
            cached: l.cached_input_per_million,
            input_by_modality: &l.input_by_modality,
            cached_by_modality: &l.cached_input_by_modality,
            output_by_modality: &l.output_by_modality,
        }
    }

    /// Every tier of token rates (standard, then long when the model has one).
    pub fn tiers(&self) -> Vec<(TierRates<'_>, Option<u64>)> {
        let mut out = vec![(self.standard_rates(), None)];
        if let Some(l) = &self.long_context {
            out.push((self.long_rates(l), Some(l.threshold)));
        }
        out
    }

    /// The highest price per million of any prompt token, over every tier and modality: what a
    /// worst-case reservation must assume for a prompt it can only estimate.
    pub fn dearest_input_per_million(&self) -> Decimal {
        self.tiers()
            .iter()
            .map(|(t, _)| t.dearest_input())
            .max()
            .unwrap_or(self.input_per_million)
    }

    /// The highest price per million of any output token, over every tier and modality.
    pub fn dearest_output_per_million(&self) -> Decimal {
        self.tiers()
            .iter()
            .map(|(t, _)| t.dearest_output())
            .max()
            .unwrap_or(self.output_per_million)
    }
}
