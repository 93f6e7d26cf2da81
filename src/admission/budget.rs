//! Hard enforcement of the token and cost quotas: what a model call may cost at worst, and the
//! largest output cap that keeps `used + reserved + this <= limit`.

use rust_decimal::Decimal;

use crate::config::{Pricing, Tier};
use crate::ledger::{Held, Reserved, Totals};

/// A model call's worst case, as a function of its output cap `c` (thinking included, per
/// candidate): `tokens(c) = prompt + n * c`, `cost(c) = base + per_output * n * c` for `n`
/// candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorstCase {
    /// The prompt's tokens, estimated from the body (never fewer than a text prompt has).
    pub prompt: u64,
    /// The output cap the request asks for (its own, else the model's); `None`: none known,
    /// so the largest that fits is set.
    pub cap: Option<u64>,
    /// Cost of the prompt at the dearest input price, plus the message's price.
    pub base: Decimal,
    /// Cost of one output token.
    pub per_output: Decimal,
    /// Candidates asked for (`candidateCount`, OpenAI `n`; at least 1): each may use the cap.
    pub candidates: u64,
}

impl WorstCase {
    /// The worst case of a call of `model` with `prompt` estimated tokens and output cap `cap`
    /// for each of `candidates` answers.
    pub fn new(pricing: &Pricing, model: &str, prompt: u64, cap: Option<u64>, candidates: u64) -> Self {
        let million = Decimal::from(1_000_000u32);
        let p = Decimal::from(prompt);
        let (base, per_output) = match pricing.model(model) {
            // The dearest rate of any tier and modality: the prompt's size and media are only
            // estimated here (a long-context or audio prompt must not be under-reserved).
            Some(m) => (
                p * m.dearest_input_per_million() / million,
                m.dearest_output_per_million() / million,
            ),
            None => (p * pricing.ai_response_per_token, pricing.ai_response_per_token),
        };
        WorstCase {
            prompt,
            cap,
            base: base + pricing.message_sent,
            per_output,
            candidates: candidates.max(1),
        }
    }

    /// What a call with output cap `c` holds: a message, its tokens and its cost.
    pub fn held(&self, c: u64) -> Held {
        Held {
            message: true,
            tokens: self.prompt.saturating_add(c.saturating_mul(self.candidates)),
            cost: self.base + self.per_output * Decimal::from(c) * Decimal::from(self.candidates),
        }
    }
}

/// Why a worst case does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoFit {
    /// Not even the smallest answer fits in the token limit.
    Tokens,
    /// Not even the smallest answer fits in the cost limit.
    Cost,
}

/// The output cap to send under `tier`'s hard limits, given the totals and the others'
/// reservations: the asked cap if it fits, else the largest that does, as long as that is at
/// least `min_output_tokens` (or the whole asked cap, when it is smaller).
pub fn fit(tier: &Tier, w: &WorstCase, t: &Totals, r: &Reserved) -> Result<u64, NoFit> {
    let mut room = w.cap.unwrap_or(u64::MAX);
    let floor = tier.min_output_tokens.min(room);
    if let Some(l) = tier.tokens {
        let left = l.saturating_sub(t.tokens).saturating_sub(r.tokens);
        let Some(c) = left.checked_sub(w.prompt) else {
            return Err(NoFit::Tokens);
        };
        let c = c / w.candidates;
        if c < floor {
            return Err(NoFit::Tokens);
        }
        room = room.min(c);
    }
    if let Some(l) = tier.cost {
        let left = l - t.cost - r.cost - w.base;
        if left < Decimal::ZERO {
            return Err(NoFit::Cost);
        }
        if w.per_output > Decimal::ZERO {
            let c = (left / (w.per_output * Decimal::from(w.candidates))).floor();
            let c = u64::try_from(c).unwrap_or(u64::MAX);
            if c < floor {
                return Err(NoFit::Cost);
            }
            room = room.min(c);
        }
    }
    // `u64::MAX`: no cap known and nothing limits it (output priced at 0 under a cost-only
    // limit): the request is left as it is.
    Ok(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(tokens: Option<u64>, cost: Option<&str>) -> Tier {
        Tier {
            tokens,
            cost: cost.map(|c| c.parse().unwrap()),
            min_output_tokens: 16,
            ..Default::default()
        }
    }

    fn w(prompt: u64, cap: Option<u64>) -> WorstCase {
        WorstCase::new(&Pricing::default(), "unpriced", prompt, cap, 1)
    }

    #[test]
    fn caps_to_what_is_left_and_refuses_below_the_minimum() {
        let t = tier(Some(1000), None);
        let used = Totals {
            tokens: 500,
            ..Default::default()
        };
        let others = Reserved {
            tokens: 300,
            ..Default::default()
        };
        assert_eq!(fit(&t, &w(100, Some(50)), &used, &others), Ok(50));
        assert_eq!(fit(&t, &w(100, Some(500)), &used, &others), Ok(100));
        assert_eq!(fit(&t, &w(100, None), &used, &others), Ok(100));
        assert_eq!(fit(&t, &w(190, Some(500)), &used, &others), Err(NoFit::Tokens));
        // A cap under the minimum that fits whole is not refused.
        assert_eq!(fit(&t, &w(190, Some(10)), &used, &others), Ok(10));
        assert_eq!(fit(&t, &w(250, Some(10)), &used, &others), Err(NoFit::Tokens));
    }

    #[test]
    fn cost_cap_is_exact() {
        // 0.0001 per token (the default for unpriced models): 0.01 left buys 100 tokens.
        let t = tier(None, Some("0.01"));
        let c = fit(&t, &w(40, Some(1000)), &Totals::default(), &Reserved::default());
        assert_eq!(c, Ok(60));
        let h = w(40, Some(1000)).held(60);
        assert_eq!(h.cost, "0.01".parse::<Decimal>().unwrap());
        assert_eq!(
            fit(&t, &w(90, Some(1000)), &Totals::default(), &Reserved::default()),
            Err(NoFit::Cost)
        );
        // Three candidates share what is left: 60 tokens of output make 20 each.
        let three = WorstCase::new(&Pricing::default(), "unpriced", 40, Some(1000), 3);
        assert_eq!(fit(&t, &three, &Totals::default(), &Reserved::default()), Ok(20));
        assert_eq!(three.held(20).cost, "0.01".parse::<Decimal>().unwrap());
        assert_eq!(three.held(20).tokens, 100);
    }
}
