//! Exact costs (rust_decimal) from usage and the config's prices.

use rust_decimal::Decimal;

use super::scan::UsageReport;
use crate::config::Pricing;

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
            tool_use: 0,
            total,
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

/// Cost of a model response:
/// `((prompt - cached) * input + cached * cached_input + (output + thoughts) * output) / 1e6`
/// for a model with prices, else `total * ai_response_per_token`.
pub fn response_cost(pricing: &Pricing, model: &str, t: &Tokens) -> Decimal {
    match pricing.model(model) {
        Some(p) => {
            let cached_price = p.cached_input_per_million.unwrap_or(p.input_per_million);
            let fresh = Decimal::from(t.prompt.saturating_sub(t.cached));
            let cached = Decimal::from(t.cached);
            let out = Decimal::from(t.output.saturating_add(t.thoughts));
            let sum = fresh * p.input_per_million + cached * cached_price + out * p.output_per_million;
            (sum / Decimal::from(1_000_000u32)).normalize()
        }
        None => (Decimal::from(t.total) * pricing.ai_response_per_token).normalize(),
    }
}

/// Cost of uploaded bytes.
pub fn upload_cost(pricing: &Pricing, bytes: u64) -> Decimal {
    (Decimal::from(bytes) * pricing.file_upload_per_byte).normalize()
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
