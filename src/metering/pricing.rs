//! Exact costs (rust_decimal) from usage and the config's prices, each with the [`Price`] that
//! explains it. Pure functions: no clock, no I/O, no shared state.
//!
//! The rules (README, "Prices"): the tier of token rates is chosen by the request's prompt
//! tokens (long above `long_context_threshold`); within the tier, tokens the usage details
//! place in a modality pay that modality's rate when it has one, the rest the base rate;
//! tool-use prompt tokens pay the input rate and thinking tokens the output rate; a grounded
//! response adds its per-request price; Batch API work is discounted at the end.

use rust_decimal::{Decimal, RoundingStrategy};

use super::scan::{ModalityCounts, UsageReport};
use crate::config::{MODALITIES, Modality, ModelPrice, Pricing, TierRates};
use crate::ledger::{Price, PriceLine, PricePart};

/// The token breakdown billed for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    /// All input tokens, cached ones included.
    pub prompt: u64,
    /// The cached part of the prompt.
    pub cached: u64,
    /// Visible output tokens.
    pub output: u64,
    /// Thinking tokens (billed as output).
    pub thoughts: u64,
    /// Tool-use prompt tokens.
    pub tool_use: u64,
    /// The total metered.
    pub total: u64,
    /// Prompt tokens by modality (`promptTokensDetails`, cached ones included).
    pub prompt_by_modality: Option<ModalityCounts>,
    /// Cached tokens by modality (`cacheTokensDetails`).
    pub cached_by_modality: Option<ModalityCounts>,
    /// Visible output tokens by modality (`candidatesTokensDetails`).
    pub output_by_modality: Option<ModalityCounts>,
    /// Whether the response was grounded with Google Search (billed per request).
    pub grounded: bool,
}

/// Characters per token used for estimates.
const CHARS_PER_TOKEN: u64 = 4;

fn estimate(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

impl Tokens {
    /// Tokens from a native (Gemini) usage report: the last value of each field.
    pub fn from_native(u: &UsageReport) -> Self {
        let prompt = u.prompt.unwrap_or(0);
        let output = u.candidates.unwrap_or(0);
        let thoughts = u.thoughts.unwrap_or(0);
        let tool_use = u.tool_use_prompt.unwrap_or(0);
        let total = u.total.unwrap_or(prompt + output + thoughts + tool_use);
        Tokens {
            prompt,
            cached: u.cached.unwrap_or(0).min(prompt),
            output,
            thoughts,
            tool_use,
            total,
            prompt_by_modality: u.prompt_details,
            cached_by_modality: u.cache_details,
            output_by_modality: u.candidates_details,
            grounded: false,
        }
    }

    /// Tokens from an OpenAI-style `usage` object. Whether the compat layer counts thinking in
    /// `completion_tokens` is not documented, so what `total_tokens` holds beyond prompt and
    /// completion is billed as thinking: output is always `total - prompt`.
    pub fn from_openai(u: &UsageReport) -> Self {
        let prompt = u.prompt.unwrap_or(0);
        let output = u.candidates.unwrap_or(0);
        let total = u.total.unwrap_or(prompt + output + u.thoughts.unwrap_or(0));
        let thoughts = total.saturating_sub(prompt).saturating_sub(output);
        Tokens {
            prompt,
            cached: u.cached.unwrap_or(0).min(prompt),
            output,
            thoughts,
            total,
            ..Default::default()
        }
    }

    /// An estimate from the characters of prompt and output text seen.
    pub fn estimated(prompt_chars: u64, output_chars: u64) -> Self {
        let prompt = estimate(prompt_chars);
        let output = estimate(output_chars);
        Tokens {
            prompt,
            output,
            total: prompt + output,
            ..Default::default()
        }
    }
}

/// Whether work is interactive or done through the Batch API (discounted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A call answered as it is made.
    #[default]
    Interactive,
    /// Work submitted through `batchGenerateContent` / `asyncBatchEmbedContent`.
    Batch,
}

/// An exact cost and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// The cost, normalized.
    pub cost: Decimal,
    /// The explanation (`metadata.price`).
    pub price: Price,
}

/// 0.000001: multiplying by it shifts the scale, exactly, where dividing by a million divides.
const PER_MILLION: Decimal = Decimal::from_parts(1, 0, 0, false, 6);
/// Seconds per hour, for storage billed per hour over a TTL in seconds.
const SECONDS_PER_HOUR: u32 = 3600;
/// Decimal places kept of a storage cost whose TTL is not a whole number of hours (the only
/// cost that can be a non-terminating fraction: a rate per hour over seconds); a trillionth of
/// a dollar, rounded half away from zero.
pub const STORAGE_COST_DP: u32 = 12;

/// `q * rate`, saturating instead of overflowing (a hostile upstream may report any count).
fn times(q: u64, rate: Decimal) -> Decimal {
    Decimal::from(q).checked_mul(rate).unwrap_or(Decimal::MAX)
}

/// `q * rate / 1e6`.
fn per_million(q: u64, rate: Decimal) -> Decimal {
    times(q, rate).checked_mul(PER_MILLION).unwrap_or(Decimal::MAX)
}

fn line(part: PricePart, modality: Option<Modality>, quantity: u64, rate: Decimal, cost: Decimal) -> PriceLine {
    PriceLine {
        cost: cost.normalize(),
        modality,
        part,
        quantity,
        rate,
    }
}

/// Bills `total` tokens of one part: the tokens the details place in a modality at that
/// modality's rate, one line each, and the rest (tokens the details leave unplaced) at the base
/// rate. Details that claim more tokens than `total` (inconsistent counts) are placed dearest
/// first, so a modality priced above the base is never billed below it.
fn split(
    lines: &mut Vec<PriceLine>,
    part: PricePart,
    total: u64,
    counts: Option<&ModalityCounts>,
    rate: impl Fn(Option<Modality>) -> Decimal,
) {
    let mut left = total;
    if let Some(counts) = counts {
        let sum = counts.iter().fold(0u64, |a, &c| a.saturating_add(c));
        let mut take = *counts;
        if sum > total {
            let mut order = Modality::ALL;
            order.sort_by_key(|m| std::cmp::Reverse(rate(Some(*m))));
            for m in order {
                let i = m.index();
                let q = counts[i].min(left);
                take[i] = q;
                left -= q;
            }
        } else {
            left = total - sum;
        }
        for m in Modality::ALL {
            let q = take[m.index()];
            if q > 0 {
                let r = rate(Some(m));
                lines.push(line(part, Some(m), q, r, per_million(q, r)));
            }
        }
    }
    if left > 0 {
        let r = rate(None);
        lines.push(line(part, None, left, r, per_million(left, r)));
    }
}

/// Fresh prompt tokens by modality: the prompt's less the cached part's.
fn fresh_counts(t: &Tokens) -> Option<ModalityCounts> {
    let prompt = t.prompt_by_modality?;
    let cached = t.cached_by_modality.unwrap_or([0; MODALITIES]);
    let mut out = [0u64; MODALITIES];
    for i in 0..MODALITIES {
        out[i] = prompt[i].saturating_sub(cached[i]);
    }
    Some(out)
}

/// The token lines of a model with a price entry, at the rates of the tier `r`.
fn token_lines(r: &TierRates<'_>, t: &Tokens, lines: &mut Vec<PriceLine>) {
    let fresh = fresh_counts(t);
    split(lines, PricePart::Input, t.prompt.saturating_sub(t.cached), fresh.as_ref(), |m| {
        r.input_rate(m)
    });
    split(lines, PricePart::CachedInput, t.cached, t.cached_by_modality.as_ref(), |m| {
        r.cached_rate(m)
    });
    if t.tool_use > 0 {
        lines.push(line(PricePart::ToolUse, None, t.tool_use, r.input, per_million(t.tool_use, r.input)));
    }
    split(lines, PricePart::Output, t.output, t.output_by_modality.as_ref(), |m| {
        r.output_rate(m)
    });
    if t.thoughts > 0 {
        lines.push(line(PricePart::Thoughts, None, t.thoughts, r.output, per_million(t.thoughts, r.output)));
    }
}

/// The fraction taken off batch work of `model` (its own, else `[pricing]`'s).
pub fn batch_discount(pricing: &Pricing, model: &str) -> Decimal {
    pricing
        .model(model)
        .and_then(|p| p.batch_discount)
        .unwrap_or(pricing.batch_discount)
}

/// `cost` less a batch discount (`discount` is the fraction taken off, 0..=1): `cost * (1 -
/// discount)`, exact.
pub fn batch_discounted(cost: Decimal, discount: Decimal) -> Decimal {
    let keep = Decimal::ONE.checked_sub(discount).unwrap_or(Decimal::ONE);
    cost.checked_mul(keep).unwrap_or(cost).normalize()
}

/// Sums the lines into a [`Priced`], applying the batch discount of `mode`.
fn finish(pricing: &Pricing, model: &str, mode: Mode, mut price: Price) -> Priced {
    let sum = price
        .lines
        .iter()
        .fold(Decimal::ZERO, |a, l| a.checked_add(l.cost).unwrap_or(Decimal::MAX));
    let cost = match mode {
        Mode::Interactive => sum.normalize(),
        Mode::Batch => {
            let d = batch_discount(pricing, model);
            price.batch_discount = Some(d);
            batch_discounted(sum, d)
        }
    };
    Priced { cost, price }
}

/// Prices one response's tokens. A model with a price entry: each part at its tier's and
/// modality's rate, per million, plus grounding; an unlisted model: `total *
/// ai_response_per_token`, plus grounding at `[pricing] grounding_per_request`. For an entry
/// with only the three base rates and no tool-use tokens this is the formula of the interface:
/// `((prompt - cached) * input + cached * cached_input + (output + thoughts) * output) / 1e6`.
pub fn price_tokens(pricing: &Pricing, model: &str, t: &Tokens, mode: Mode) -> Priced {
    let mut lines = Vec::with_capacity(8);
    let (entry, context, grounding) = match pricing.model(model) {
        Some(p) => {
            let r = p.tier_for(t.prompt);
            token_lines(&r, t, &mut lines);
            let context = Some(r.tier);
            (Some(entry_name(pricing, model)), context, p.grounding_per_request)
        }
        None => {
            let r = pricing.ai_response_per_token;
            lines.push(line(PricePart::Tokens, None, t.total, r, times(t.total, r)));
            (None, None, None)
        }
    };
    if t.grounded {
        let r = grounding.unwrap_or(pricing.grounding_per_request);
        lines.push(line(PricePart::Grounding, None, 1, r, r));
    }
    let price = Price {
        batch_discount: None,
        context,
        entry: entry.map(Into::into),
        lines,
    };
    finish(pricing, model, mode, price)
}

/// The name of a model's price entry (its id without `models/`).
fn entry_name<'a>(pricing: &'a Pricing, model: &'a str) -> &'a str {
    let id = model.strip_prefix("models/").unwrap_or(model);
    pricing.models.get_key_value(id).map_or(id, |(k, _)| k.as_str())
}

/// A per-unit price: `quantity * rate` of the entry's `pick`ed rate; `None` when the model has
/// no such price.
fn per_unit(
    pricing: &Pricing,
    model: &str,
    part: PricePart,
    quantity: u64,
    mode: Mode,
    pick: impl Fn(&ModelPrice) -> Option<Decimal>,
) -> Option<Priced> {
    let rate = pick(pricing.model(model)?)?;
    let price = Price {
        batch_discount: None,
        context: None,
        entry: Some(entry_name(pricing, model).into()),
        lines: vec![line(part, None, quantity, rate, times(quantity, rate))],
    };
    Some(finish(pricing, model, mode, price))
}

/// Cost of `images` images generated by `model` (Imagen `predict`: the images returned) at its
/// `per_image`; `None` when the model has no `per_image` price.
pub fn image_cost(pricing: &Pricing, model: &str, images: u64, mode: Mode) -> Option<Priced> {
    per_unit(pricing, model, PricePart::Image, images, mode, |p| p.per_image)
}

/// Cost of `seconds` seconds of video generated by `model` (Veo `predictLongRunning`) at its
/// `per_second`; `None` when the model has no `per_second` price.
pub fn video_cost(pricing: &Pricing, model: &str, seconds: u64, mode: Mode) -> Option<Priced> {
    per_unit(pricing, model, PricePart::VideoSecond, seconds, mode, |p| p.per_second)
}

/// Cost of storing a cached content of `tokens` tokens (its `usageMetadata.totalTokenCount`)
/// for `ttl_seconds`: `tokens * cache_storage_per_million_per_hour / 1e6 * ttl_seconds / 3600`,
/// exact for whole hours (and whenever the division terminates), else rounded to
/// [`STORAGE_COST_DP`] places. `None` when the model has no storage price.
pub fn cache_storage_cost(pricing: &Pricing, model: &str, tokens: u64, ttl_seconds: u64) -> Option<Priced> {
    let rate = pricing.model(model)?.cache_storage_per_million_per_hour?;
    let token_hours = per_million(tokens, rate)
        .checked_mul(Decimal::from(ttl_seconds))
        .unwrap_or(Decimal::MAX);
    let cost = token_hours
        .checked_div(Decimal::from(SECONDS_PER_HOUR))
        .unwrap_or(Decimal::MAX)
        .round_dp_with_strategy(STORAGE_COST_DP, RoundingStrategy::MidpointAwayFromZero);
    let price = Price {
        batch_discount: None,
        context: None,
        entry: Some(entry_name(pricing, model).into()),
        lines: vec![line(PricePart::CacheStorage, None, tokens, rate, cost)],
    };
    Some(finish(pricing, model, Mode::Interactive, price))
}

/// Cost of a model response (interactive), without its explanation.
pub fn response_cost(pricing: &Pricing, model: &str, t: &Tokens) -> Decimal {
    price_tokens(pricing, model, t, Mode::Interactive).cost
}

/// Cost of uploaded bytes.
pub fn upload_cost(pricing: &Pricing, bytes: u64) -> Decimal {
    times(bytes, pricing.file_upload_per_byte).normalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn fixture_cost_is_exact() {
        let cfg = Config::parse(
            r#"
[pricing.models."gemini-2.5-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
cached_input_per_million = "0.03"
"#,
            "t.toml",
        )
        .unwrap();
        let u = UsageReport {
            prompt: Some(1204),
            candidates: Some(52),
            thoughts: Some(388),
            cached: Some(1000),
            tool_use_prompt: None,
            total: Some(1644),
        };
        let t = Tokens::from_native(&u);
        assert_eq!(t.total, 1644);
        assert_eq!(
            response_cost(&cfg.pricing, "gemini-2.5-flash", &t).to_string(),
            "0.0011912"
        );
        assert_eq!(
            response_cost(&cfg.pricing, "models/gemini-2.5-flash", &t).to_string(),
            "0.0011912"
        );
        // Unlisted model: total * ai_response_per_token (default 0.0001).
        assert_eq!(response_cost(&cfg.pricing, "other", &t).to_string(), "0.1644");
        assert_eq!(upload_cost(&cfg.pricing, 2_010_585).to_string(), "0.02010585");
    }

    #[test]
    fn openai_output_is_total_minus_prompt() {
        let u = UsageReport {
            prompt: Some(10),
            candidates: Some(5),
            total: Some(40),
            ..Default::default()
        };
        let t = Tokens::from_openai(&u);
        assert_eq!((t.output, t.thoughts, t.total), (5, 25, 40));
    }
}
