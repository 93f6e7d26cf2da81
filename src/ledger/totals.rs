//! Sums of usage (per user and month, per day, per model): what records add up to.

use rust_decimal::Decimal;
use serde::Serialize;

use super::record::Record;

/// Totals of a set of usage records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Number of records summed.
    pub records: u64,
    /// Messages (admitted, successful requests).
    pub messages: u64,
    /// Tokens.
    pub tokens: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Exact cost.
    pub cost: Decimal,
    /// Response bytes streamed back to callers.
    pub response_bytes: u64,
}

/// Size of the binary encoding of [`Totals`].
pub const TOTALS_LEN: usize = 8 * 5 + 16;

impl Totals {
    /// The contribution of one record.
    pub fn of(rec: &Record) -> Self {
        Totals {
            records: 1,
            messages: rec.messages,
            tokens: rec.tokens,
            bytes: rec.bytes,
            cost: rec.cost,
            response_bytes: rec.response_bytes(),
        }
    }

    /// Adds another set of totals to this one.
    pub fn add(&mut self, o: &Totals) {
        self.records = self.records.saturating_add(o.records);
        self.messages = self.messages.saturating_add(o.messages);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.cost += o.cost;
        self.response_bytes = self.response_bytes.saturating_add(o.response_bytes);
    }

    /// Fixed-size big-endian encoding for storage.
    pub fn encode(&self) -> [u8; TOTALS_LEN] {
        let mut out = [0u8; TOTALS_LEN];
        let fields = [
            self.records,
            self.messages,
            self.tokens,
            self.bytes,
            self.response_bytes,
        ];
        for (i, f) in fields.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&f.to_be_bytes());
        }
        out[40..].copy_from_slice(&self.cost.serialize());
        out
    }

    /// Decodes [`Totals::encode`]; `None` when the bytes are not a valid encoding.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != TOTALS_LEN {
            return None;
        }
        let u = |i: usize| -> Option<u64> { Some(u64::from_be_bytes(b.get(i * 8..i * 8 + 8)?.try_into().ok()?)) };
        let cost_bytes: [u8; 16] = b.get(40..56)?.try_into().ok()?;
        Some(Totals {
            records: u(0)?,
            messages: u(1)?,
            tokens: u(2)?,
            bytes: u(3)?,
            response_bytes: u(4)?,
            cost: Decimal::deserialize(cost_bytes),
        })
    }

    /// JSON view used by the APIs (cost as an exact string).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "messages": self.messages,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "cost": self.cost.normalize().to_string(),
            "response_bytes": self.response_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn encoding_round_trips() {
        let t = Totals {
            records: 3,
            messages: 2,
            tokens: 1644,
            bytes: 9,
            cost: Decimal::from_str("0.0011912").unwrap(),
            response_bytes: 77,
        };
        assert_eq!(Totals::decode(&t.encode()), Some(t));
        assert_eq!(Totals::decode(&[1, 2, 3]), None);
    }
}
