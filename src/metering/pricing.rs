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
    split(
        lines,
        PricePart::Input,
        t.prompt.saturating_sub(t.cached),
        fresh.as_ref(),
        |m| r.input_rate(m),
    );
    split(
        lines,
        PricePart::CachedInput,
        t.cached,
        t.cached_by_modality.as_ref(),
        |m| r.cached_rate(m),
    );
    if t.tool_use > 0 {
        lines.push(line(
            PricePart::ToolUse,
            None,
            t.tool_use,
            r.input,
            per_million(t.tool_use, r.input),
        ));
    }
    split(lines, PricePart::Output, t.output, t.output_by_modality.as_ref(), |m| {
        r.output_rate(m)
    });
    if t.thoughts > 0 {
        lines.push(line(
            PricePart::Thoughts,
            None,
            t.thoughts,
            r.output,
            per_million(t.thoughts, r.output),
        ));
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
    use crate::config::{Config, ContextTier};

    /// Prices as in `config/gemini-meter.toml` (§7 of gemini-wire.md) for the token models; the
    /// per-unit, grounding and image-output rates are made up for the tests.
    const PRICES: &str = r#"
[pricing]
ai_response_per_token = "0.0001"
batch_discount = "0.5"
grounding_per_request = "0.035"

[pricing.models."gemini-2.5-pro"]
input_per_million = "1.25"
output_per_million = "10.00"
cached_input_per_million = "0.125"
long_context_threshold = 200000
long_input_per_million = "2.50"
long_output_per_million = "15.00"
long_cached_input_per_million = "0.25"
cache_storage_per_million_per_hour = "4.50"

[pricing.models."gemini-2.5-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
cached_input_per_million = "0.03"
input_per_million_by_modality = { AUDIO = "1.00" }

[pricing.models."gemini-2.5-flash-image"]
input_per_million = "0.30"
output_per_million = "2.50"
output_per_million_by_modality = { IMAGE = "30.00" }
batch_discount = "0.25"

[pricing.models."imagen-4.0-generate-001"]
per_image = "0.04"

[pricing.models."veo-3.0-generate-001"]
per_second = "0.40"
"#;

    fn pricing() -> Pricing {
        Config::parse(PRICES, "t.toml").unwrap().pricing
    }

    fn modal(text: u64, image: u64, audio: u64) -> Option<ModalityCounts> {
        Some([text, image, audio, 0, 0])
    }

    fn cost(p: &Priced) -> String {
        p.cost.to_string()
    }

    fn lines(p: &Priced) -> Vec<(PricePart, Option<&str>, u64, String, String)> {
        p.price
            .lines
            .iter()
            .map(|l| {
                (
                    l.part,
                    l.modality.map(|m| m.as_str()),
                    l.quantity,
                    l.rate.to_string(),
                    l.cost.to_string(),
                )
            })
            .collect()
    }

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
            total: Some(1644),
            prompt_details: modal(1204, 0, 0),
            cache_details: modal(1000, 0, 0),
            ..Default::default()
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
    fn long_context_prompt_on_pro() {
        let p = pricing();
        // 250k prompt tokens > 200k: every part at the long rates.
        // (250000 x 2.50 + (1000 + 2000) x 15.00) / 1e6 = 0.625 + 0.045 = 0.67
        let t = Tokens {
            prompt: 250_000,
            output: 1000,
            thoughts: 2000,
            total: 253_000,
            prompt_by_modality: modal(250_000, 0, 0),
            ..Default::default()
        };
        let r = price_tokens(&p, "gemini-2.5-pro", &t, Mode::Interactive);
        assert_eq!(cost(&r), "0.67");
        assert_eq!(r.price.context, Some(ContextTier::Long));
        assert_eq!(r.price.entry.as_deref(), Some("gemini-2.5-pro"));
        assert_eq!(
            lines(&r),
            [
                (PricePart::Input, Some("TEXT"), 250_000, "2.50".into(), "0.625".into()),
                (PricePart::Output, None, 1000, "15.00".into(), "0.015".into()),
                (PricePart::Thoughts, None, 2000, "15.00".into(), "0.03".into()),
            ]
        );
        // Exactly at the threshold is still standard: (200000 x 1.25 + 3000 x 10.00) / 1e6.
        let at = Tokens { prompt: 200_000, ..t };
        let r = price_tokens(&p, "gemini-2.5-pro", &at, Mode::Interactive);
        assert_eq!(
            (cost(&r), r.price.context),
            ("0.28".into(), Some(ContextTier::Standard))
        );
        // The threshold counts cached tokens (they are part of the prompt): 150k fresh and
        // 100k cached at the long rates: (150000 x 2.50 + 100000 x 0.25 + 3000 x 15) / 1e6.
        let cached = Tokens {
            cached: 100_000,
            cached_by_modality: modal(100_000, 0, 0),
            ..t
        };
        assert_eq!(
            cost(&price_tokens(&p, "gemini-2.5-pro", &cached, Mode::Interactive)),
            "0.445"
        );
    }

    #[test]
    fn audio_prompt_on_flash() {
        let p = pricing();
        // (200 x 0.30 + 800 x 1.00 + 50 x 2.50) / 1e6 = (60 + 800 + 125) / 1e6
        let t = Tokens {
            prompt: 1000,
            output: 50,
            total: 1050,
            prompt_by_modality: modal(200, 0, 800),
            ..Default::default()
        };
        let r = price_tokens(&p, "gemini-2.5-flash", &t, Mode::Interactive);
        assert_eq!(cost(&r), "0.000985");
        assert_eq!(
            lines(&r),
            [
                (PricePart::Input, Some("TEXT"), 200, "0.30".into(), "0.00006".into()),
                (PricePart::Input, Some("AUDIO"), 800, "1.00".into(), "0.0008".into()),
                (PricePart::Output, None, 50, "2.50".into(), "0.000125".into()),
            ]
        );
        // 300 of the audio cached, no cached audio rate: the cached base rate.
        // (200 x 0.30 + 500 x 1.00 + 300 x 0.03 + 50 x 2.50) / 1e6 = 694 / 1e6
        let c = Tokens {
            cached: 300,
            cached_by_modality: modal(0, 0, 300),
            ..t
        };
        assert_eq!(
            cost(&price_tokens(&p, "gemini-2.5-flash", &c, Mode::Interactive)),
            "0.000694"
        );
        // Details that claim more than the fresh tokens are placed dearest first: 100 fresh
        // tokens, 100 TEXT and 100 AUDIO claimed -> 100 AUDIO at 1.00.
        let odd = Tokens {
            prompt: 100,
            total: 100,
            prompt_by_modality: modal(100, 0, 100),
            ..Default::default()
        };
        let r = price_tokens(&p, "gemini-2.5-flash", &odd, Mode::Interactive);
        assert_eq!(cost(&r), "0.0001");
        assert_eq!(
            lines(&r),
            [(PricePart::Input, Some("AUDIO"), 100, "1.00".into(), "0.0001".into())]
        );
        // No details (OpenAI compat): everything at the base rate, as before.
        let plain = Tokens {
            prompt_by_modality: None,
            ..t
        };
        assert_eq!(
            cost(&price_tokens(&p, "gemini-2.5-flash", &plain, Mode::Interactive)),
            "0.000425"
        );
    }

    #[test]
    fn image_output() {
        let p = pricing();
        // (10 x 0.30 + 1290 x 30.00 + 10 x 2.50) / 1e6 = (3 + 38700 + 25) / 1e6
        let t = Tokens {
            prompt: 10,
            output: 1300,
            total: 1310,
            prompt_by_modality: modal(10, 0, 0),
            output_by_modality: modal(10, 1290, 0),
            ..Default::default()
        };
        let r = price_tokens(&p, "gemini-2.5-flash-image", &t, Mode::Interactive);
        assert_eq!(cost(&r), "0.038728");
        assert_eq!(
            lines(&r)[1..],
            [
                (PricePart::Output, Some("TEXT"), 10, "2.50".into(), "0.000025".into()),
                (PricePart::Output, Some("IMAGE"), 1290, "30.00".into(), "0.0387".into()),
            ]
        );
    }

    #[test]
    fn unlisted_model() {
        let p = pricing();
        let t = Tokens {
            prompt: 1204,
            output: 440,
            total: 1644,
            prompt_by_modality: modal(0, 0, 1204),
            ..Default::default()
        };
        // 1644 x 0.0001, whatever the modalities.
        let r = price_tokens(&p, "gemini-9-ultra", &t, Mode::Interactive);
        assert_eq!(cost(&r), "0.1644");
        assert_eq!((r.price.entry.as_deref(), r.price.context), (None, None));
        assert_eq!(
            lines(&r),
            [(PricePart::Tokens, None, 1644, "0.0001".into(), "0.1644".into())]
        );
    }

    #[test]
    fn tool_use_tokens_and_grounding() {
        let p = pricing();
        // (100 x 0.30 + 400 x 0.30 + 20 x 2.50) / 1e6 = 200 / 1e6; grounded: + 0.035.
        let t = Tokens {
            prompt: 100,
            tool_use: 400,
            output: 20,
            total: 520,
            ..Default::default()
        };
        assert_eq!(
            cost(&price_tokens(&p, "gemini-2.5-flash", &t, Mode::Interactive)),
            "0.0002"
        );
        let g = Tokens { grounded: true, ..t };
        let r = price_tokens(&p, "gemini-2.5-flash", &g, Mode::Interactive);
        assert_eq!(cost(&r), "0.0352");
        assert_eq!(
            lines(&r),
            [
                (PricePart::Input, None, 100, "0.30".into(), "0.00003".into()),
                (PricePart::ToolUse, None, 400, "0.30".into(), "0.00012".into()),
                (PricePart::Output, None, 20, "2.50".into(), "0.00005".into()),
                (PricePart::Grounding, None, 1, "0.035".into(), "0.035".into()),
            ]
        );
        // Long context: tool-use tokens at the long input rate (the prompt decides the tier).
        let long = Tokens {
            prompt: 200_001,
            tool_use: 1000,
            total: 201_001,
            ..Default::default()
        };
        // (200001 x 2.50 + 1000 x 2.50) / 1e6 = 502502.5 / 1e6
        assert_eq!(
            cost(&price_tokens(&p, "gemini-2.5-pro", &long, Mode::Interactive)),
            "0.5025025"
        );
    }

    #[test]
    fn cache_storage_for_an_hour() {
        let p = pricing();
        // 100000 tokens x 4.50 per million per hour x 1 hour = 0.45
        let r = cache_storage_cost(&p, "gemini-2.5-pro", 100_000, 3600).unwrap();
        assert_eq!(cost(&r), "0.45");
        assert_eq!(
            lines(&r),
            [(PricePart::CacheStorage, None, 100_000, "4.50".into(), "0.45".into())]
        );
        // 90 s: 0.45 x 90 / 3600 = 0.01125, exact.
        assert_eq!(
            cost(&cache_storage_cost(&p, "models/gemini-2.5-pro", 100_000, 90).unwrap()),
            "0.01125"
        );
        // 7 tokens for 7 s: 7 x 4.5e-6 x 7 / 3600 = 6.125e-8 (exact).
        assert_eq!(
            cost(&cache_storage_cost(&p, "gemini-2.5-pro", 7, 7).unwrap()),
            "0.00000006125"
        );
        // 1 token for 1 s: 4.5e-6 / 3600 = 1.25e-9 exact; 1 token for 7 s at a rate that does not
        // divide: 0.000000000 875 (exact) - and a non-terminating one is rounded to 12 places.
        assert_eq!(
            cost(&cache_storage_cost(&p, "gemini-2.5-pro", 1, 1).unwrap()),
            "0.00000000125"
        );
        let odd = Config::parse(
            "[pricing.models.m]\ninput_per_million = \"1\"\noutput_per_million = \"1\"\ncache_storage_per_million_per_hour = \"1\"\n",
            "t.toml",
        )
        .unwrap()
        .pricing;
        // 1e-6 x 1 / 3600 = 2.777...e-10 -> 0.000000000278
        assert_eq!(cost(&cache_storage_cost(&odd, "m", 1, 1).unwrap()), "0.000000000278");
        // No storage price: nothing to bill (the caller decides).
        assert_eq!(cache_storage_cost(&p, "gemini-2.5-flash", 100_000, 3600), None);
        assert_eq!(cache_storage_cost(&p, "unlisted", 100_000, 3600), None);
    }

    #[test]
    fn batch_discount_applies_at_the_end() {
        let p = pricing();
        assert_eq!(
            batch_discounted(Decimal::new(11912, 7), Decimal::new(5, 1)).to_string(),
            "0.0005956"
        );
        assert_eq!(batch_discounted(Decimal::new(3, 0), Decimal::ZERO).to_string(), "3");
        assert_eq!(batch_discounted(Decimal::new(3, 0), Decimal::ONE).to_string(), "0");
        // The fixture at Flash prices, in a batch: 0.0011912 x 0.5.
        let t = Tokens {
            prompt: 1204,
            cached: 1000,
            output: 52,
            thoughts: 388,
            total: 1644,
            ..Default::default()
        };
        let r = price_tokens(&p, "gemini-2.5-flash", &t, Mode::Batch);
        assert_eq!(cost(&r), "0.0005956");
        assert_eq!(r.price.batch_discount, Some(Decimal::new(5, 1)));
        // The model's own discount wins: 0.038728 x 0.75 = 0.029046.
        let img = Tokens {
            prompt: 10,
            output: 1300,
            total: 1310,
            prompt_by_modality: modal(10, 0, 0),
            output_by_modality: modal(10, 1290, 0),
            ..Default::default()
        };
        assert_eq!(
            cost(&price_tokens(&p, "gemini-2.5-flash-image", &img, Mode::Batch)),
            "0.029046"
        );
        // An unlisted model in a batch: 1644 x 0.0001 x 0.5.
        assert_eq!(cost(&price_tokens(&p, "other", &t, Mode::Batch)), "0.0822");
    }

    #[test]
    fn per_image_and_per_second() {
        let p = pricing();
        assert_eq!(
            cost(&image_cost(&p, "imagen-4.0-generate-001", 4, Mode::Interactive).unwrap()),
            "0.16"
        );
        assert_eq!(
            cost(&image_cost(&p, "imagen-4.0-generate-001", 4, Mode::Batch).unwrap()),
            "0.08"
        );
        assert_eq!(
            cost(&video_cost(&p, "veo-3.0-generate-001", 8, Mode::Interactive).unwrap()),
            "3.2"
        );
        assert_eq!(image_cost(&p, "veo-3.0-generate-001", 1, Mode::Interactive), None);
        assert_eq!(video_cost(&p, "unlisted", 8, Mode::Interactive), None);
    }

    #[test]
    fn huge_counts_saturate_instead_of_panicking() {
        let p = pricing();
        let t = Tokens {
            prompt: u64::MAX,
            output: u64::MAX,
            thoughts: u64::MAX,
            tool_use: u64::MAX,
            total: u64::MAX,
            prompt_by_modality: Some([u64::MAX; MODALITIES]),
            ..Default::default()
        };
        for m in ["gemini-2.5-pro", "gemini-2.5-flash", "other"] {
            let _ = price_tokens(&p, m, &t, Mode::Batch);
        }
        let _ = cache_storage_cost(&p, "gemini-2.5-pro", u64::MAX, u64::MAX);
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
