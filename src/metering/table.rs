//! What `gemini-meter prices` prints: the effective price table of a config, and the cost of one
//! usage report with its lines. Pure text from values; the binary does the I/O.

use std::fmt::Write as _;

use rust_decimal::Decimal;

use super::pricing::{Mode, Priced, Tokens, price_tokens};
use super::usage::{ReportError, tokens_of_response};
use crate::config::{ModalityRates, ModelPrice, Pricing, TierRates};
use crate::ledger::PricePart;

/// The price table: the defaults for unlisted models, then every model entry with every tier of
/// its token rates and its other prices. Amounts are USD, as written in the config.
pub fn price_table(pricing: &Pricing) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Unlisted models (the [pricing] defaults):");
    let _ = writeln!(
        out,
        "  {} per token (prompt and output alike)",
        pricing.ai_response_per_token
    );
    let _ = writeln!(out, "  message_sent {} per message", pricing.message_sent);
    let _ = writeln!(out, "  file upload {} per byte", pricing.file_upload_per_byte);
    let _ = writeln!(out, "  {}", batch_line(pricing.batch_discount));
    let _ = writeln!(
        out,
        "  grounding with Google Search {} per grounded response",
        pricing.grounding_per_request
    );
    for (id, m) in &pricing.models {
        let _ = writeln!(out);
        let _ = writeln!(out, "{id}");
        model_lines(&mut out, pricing, m);
    }
    out
}

fn batch_line(d: Decimal) -> String {
    if d.is_zero() {
        "batch: no discount (batch_discount 0)".to_owned()
    } else {
        let pct = (d * Decimal::ONE_HUNDRED).normalize();
        format!("batch: {pct}% off (batch_discount {d})")
    }
}

fn model_lines(out: &mut String, pricing: &Pricing, m: &ModelPrice) {
    let per_unit = m.per_image.is_some() || m.per_second.is_some();
    if !(per_unit && m.input_per_million.is_zero() && m.output_per_million.is_zero()) {
        for (rates, threshold) in m.tiers() {
            let tier = match (threshold, &m.long_context) {
                (Some(t), _) => format!("long (prompt > {t} tokens)"),
                (None, Some(l)) => format!("standard (prompt <= {} tokens)", l.threshold),
                (None, None) => "standard".to_owned(),
            };
            let _ = writeln!(out, "  {tier}, per 1M tokens:");
            tier_lines(out, &rates);
        }
    }
    if let Some(r) = m.cache_storage_per_million_per_hour {
        let _ = writeln!(out, "  cache storage {r} per 1M tokens per hour");
    }
    if let Some(r) = m.per_image {
        let _ = writeln!(out, "  {r} per image");
    }
    if let Some(r) = m.per_second {
        let _ = writeln!(out, "  {r} per second of video");
    }
    if let Some(c) = m.max_output_tokens {
        let _ = writeln!(out, "  output cap when a request sets none: {c} tokens");
    }
    let _ = writeln!(
        out,
        "  {}",
        batch_line(m.batch_discount.unwrap_or(pricing.batch_discount))
    );
    let g = m.grounding_per_request.unwrap_or(pricing.grounding_per_request);
    let _ = writeln!(out, "  grounding with Google Search {g} per grounded response");
}

fn tier_lines(out: &mut String, r: &TierRates<'_>) {
    let _ = writeln!(out, "    input {}{}", r.input, modality_list(r.input_by_modality));
    let cached = match r.cached {
        Some(c) => c.to_string(),
        None => "= input".to_owned(),
    };
    let _ = writeln!(out, "    cached input {cached}{}", modality_list(r.cached_by_modality));
    let _ = writeln!(out, "    tool-use prompt {}", r.input);
    let _ = writeln!(
        out,
        "    output (thinking included) {}{}",
        r.output,
        modality_list(r.output_by_modality)
    );
}

fn modality_list(rates: &ModalityRates) -> String {
    rates.iter().fold(String::new(), |mut s, (m, r)| {
        let _ = write!(s, "; {} {r}", m.as_str());
        s
    })
}

/// Prices one response body (see [`tokens_of_response`]) and explains the cost line by line.
pub fn explain_report(pricing: &Pricing, body: &[u8], model: Option<&str>, mode: Mode) -> Result<String, ReportError> {
    let (model, t) = tokens_of_response(body, model)?;
    let p = price_tokens(pricing, &model, &t, mode);
    Ok(explain(&model, &t, &p))
}

/// The text of one priced response.
pub fn explain(model: &str, t: &Tokens, p: &Priced) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model {model}: prompt {} (cached {}), tool-use {}, output {}, thoughts {}, total {}{}",
        t.prompt,
        t.cached,
        t.tool_use,
        t.output,
        t.thoughts,
        t.total,
        if t.grounded { ", grounded" } else { "" }
    );
    let entry = match (&p.price.entry, p.price.context) {
        (Some(e), Some(c)) => format!("price entry {e}, {} context", c.as_str()),
        (Some(e), None) => format!("price entry {e}"),
        (None, _) => "no price entry: the [pricing] defaults".to_owned(),
    };
    let _ = writeln!(out, "{entry}");
    for l in &p.price.lines {
        let what = match l.modality {
            Some(m) => format!("{} {}", l.part.as_str(), m.as_str()),
            None => l.part.as_str().to_owned(),
        };
        let unit = match l.part {
            PricePart::Tokens => "per token",
            PricePart::Grounding => "per grounded response",
            PricePart::Image => "per image",
            PricePart::VideoSecond => "per second",
            PricePart::CacheStorage => "per 1M tokens per hour",
            _ => "per 1M tokens",
        };
        let _ = writeln!(out, "  {what:<20} {:>12} x {} {unit} = {}", l.quantity, l.rate, l.cost);
    }
    if let Some(d) = p.price.batch_discount {
        let _ = writeln!(out, "  {}", batch_line(d));
    }
    let _ = writeln!(out, "cost {}", p.cost);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_report_is_priced_as_the_gateway_prices_it() {
        let cfg = Config::parse(
            "[pricing.models.\"gemini-2.5-flash\"]\ninput_per_million = \"0.30\"\noutput_per_million = \"2.50\"\ninput_per_million_by_modality = { AUDIO = \"1.00\" }\n",
            "t.toml",
        )
        .unwrap();
        let body = br#"{"candidates": [], "modelVersion": "gemini-2.5-flash",
          "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 50, "totalTokenCount": 1050,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 200}, {"modality": "AUDIO", "tokenCount": 800}]}}"#;
        let text = explain_report(&cfg.pricing, body, None, Mode::Interactive).unwrap();
        assert!(text.ends_with("cost 0.000985\n"), "{text}");
        assert!(text.contains("input AUDIO"), "{text}");
        // The model can be named; an unlisted one bills per token: 1050 x 0.0001.
        let text = explain_report(&cfg.pricing, body, Some("other"), Mode::Interactive).unwrap();
        assert!(text.ends_with("cost 0.105\n"), "{text}");
        assert!(matches!(
            explain_report(&cfg.pricing, b"{}", None, Mode::Interactive),
            Err(ReportError::NoUsage)
        ));
        let openai = br#"{"model": "gemini-2.5-flash", "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}"#;
        let text = explain_report(&cfg.pricing, openai, None, Mode::Interactive).unwrap();
        // (10 x 0.30 + 4 x 2.50) / 1e6
        assert!(text.ends_with("cost 0.000013\n"), "{text}");
    }

    #[test]
    fn the_table_shows_every_tier() {
        let cfg = Config::demo_default();
        let t = price_table(&cfg.pricing);
        assert!(t.contains("gemini-2.5-pro\n"), "{t}");
        assert!(t.contains("long (prompt > 200000 tokens)"), "{t}");
        assert!(t.contains("AUDIO 1.00"), "{t}");
    }
}
