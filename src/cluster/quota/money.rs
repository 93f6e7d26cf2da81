//! Money in Redis: integer units of 10^-scale USD, never floats (Lua numbers are doubles and
//! `INCRBYFLOAT` rounds). The scale is chosen at config load so that every price times a whole
//! quantity is a whole number of units; the ledger keeps the exact `rust_decimal`.

use rust_decimal::Decimal;

use crate::config::{Config, ModelPrice};

/// Largest amount a Lua number holds exactly.
pub const MAX_UNITS: i64 = 1 << 53;

/// Most decimal places a unit may stand for (rust_decimal holds 28).
const MAX_SCALE: u32 = 18;

/// The unit money is counted in, in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    scale: u32,
}

fn scale_of(d: Decimal) -> u32 {
    d.normalize().scale()
}

/// The decimal places of what one token (or byte, image, second) costs at each of a model's
/// rates.
fn model_scales(m: &ModelPrice, out: &mut Vec<u32>) {
    let per_million = [
        Some(m.input_per_million),
        Some(m.output_per_million),
        m.cached_input_per_million,
    ];
    let modal = [&m.input_by_modality, &m.cached_input_by_modality, &m.output_by_modality];
    let mut rates: Vec<Decimal> = per_million.into_iter().flatten().collect();
    for r in modal {
        rates.extend(r.0.iter().flatten().copied());
    }
    if let Some(l) = &m.long_context {
        rates.push(l.input_per_million);
        rates.push(l.output_per_million);
        rates.extend(l.cached_input_per_million);
        for r in [&l.input_by_modality, &l.cached_input_by_modality, &l.output_by_modality] {
            rates.extend(r.0.iter().flatten().copied());
        }
    }
    let discount = m.batch_discount.map_or(0, scale_of);
    out.extend(rates.iter().map(|r| scale_of(*r) + 6 + discount));
    out.extend(
        [m.per_image, m.per_second, m.grounding_per_request]
            .into_iter()
            .flatten()
            .map(scale_of),
    );
}

impl Money {
    /// The unit for `config`: the finest any of its prices needs. Refuses a config whose cost
    /// limits would not fit in a Lua number in that unit.
    pub fn for_config(config: &Config) -> Result<Money, String> {
        let p = &config.pricing;
        let discount = scale_of(p.batch_discount);
        let mut scales = vec![
            scale_of(p.message_sent),
            scale_of(p.ai_response_per_token) + discount,
            scale_of(p.file_upload_per_byte),
            scale_of(p.grounding_per_request),
        ];
        for m in p.models.values() {
            model_scales(m, &mut scales);
        }
        for t in config.tiers.values() {
            scales.extend(t.cost.map(scale_of));
        }
        let scale = scales.into_iter().max().unwrap_or(0).min(MAX_SCALE);
        let money = Money { scale };
        for (name, t) in &config.tiers {
            if let Some(c) = t.cost
                && money.checked_units(c).is_none_or(|u| u >= MAX_UNITS)
            {
                return Err(format!(
                    "tiers.{name}.cost: {c} is too large for cluster mode's counters at the precision the prices need (10^-{scale} USD; at most {} USD)",
                    money.decimal(MAX_UNITS - 1).normalize()
                ));
            }
        }
        Ok(money)
    }

    /// Decimal places of one unit.
    pub fn scale(&self) -> u32 {
        self.scale
    }

    fn checked_units(&self, d: Decimal) -> Option<i64> {
        let factor = Decimal::from_i128_with_scale(10i128.pow(self.scale), 0);
        let u = d.checked_mul(factor)?.ceil();
        i64::try_from(u).ok()
    }

    /// `d` in units, rounded up (a price finer than the unit, such as a cache's storage for
    /// a fraction of an hour, is never under-counted); saturates.
    pub fn units(&self, d: Decimal) -> i64 {
        self.checked_units(d)
            .unwrap_or(if d.is_sign_negative() { i64::MIN } else { i64::MAX })
    }

    /// `u` units as a decimal amount.
    pub fn decimal(&self, u: i64) -> Decimal {
        Decimal::from_i128_with_scale(i128::from(u), self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_price_is_whole_in_the_unit() {
        let cfg = Config::demo_default();
        let m = Money::for_config(&cfg).unwrap();
        for model in cfg.pricing.models.values() {
            let per_token = model.output_per_million / Decimal::from(1_000_000u32);
            let u = per_token * Decimal::from_i128_with_scale(10i128.pow(m.scale()), 0);
            assert_eq!(u, u.trunc(), "{per_token}");
        }
        let c: Decimal = "0.0011912".parse().unwrap();
        assert_eq!(m.decimal(m.units(c)), c);
    }

    #[test]
    fn rounds_up_and_refuses_limits_past_two_to_the_53() {
        let m = Money { scale: 2 };
        assert_eq!(m.units("0.011".parse().unwrap()), 2);
        let mut cfg = Config::default();
        let t = crate::config::Tier {
            cost: Some("100000000000000".parse().unwrap()),
            ..Default::default()
        };
        cfg.tiers.insert("big".into(), t);
        cfg.pricing.message_sent = "0.01".parse().unwrap();
        assert!(Money::for_config(&cfg).is_err());
    }
}
