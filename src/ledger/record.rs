//! One usage record: the unit of billing, written once and never changed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::details::Details;
mod json;

pub use super::details::RecordKind;
use crate::clock::{Month, rfc3339_ms};

/// A usage record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Unique, time-sortable id; the recorder stamps it again in log order, so id order is
    /// history order.
    pub id: u128,
    /// The user billed.
    pub user_id: Arc<str>,
    /// Tokens.
    pub tokens: u64,
    /// Messages.
    pub messages: u64,
    /// Bytes.
    pub bytes: u64,
    /// Exact cost.
    pub cost: Decimal,
    /// What the record says beyond its amounts, typed per record type (rendered as `metadata`).
    pub details: Details,
    /// When the usage happened.
    pub created_at: DateTime<Utc>,
}

impl Record {
    /// The month the record counts in.
    pub fn month(&self) -> Month {
        Month::of(self.created_at)
    }

    /// What is billed.
    pub fn kind(&self) -> RecordKind {
        self.details.kind()
    }

    /// Bytes of response streamed back.
    pub fn response_bytes(&self) -> u64 {
        self.details.response_bytes()
    }

    /// The model the record names, if any.
    pub fn model(&self) -> Option<&str> {
        self.details.model()
    }

    /// The `metadata` object as the APIs render it.
    pub fn metadata(&self) -> Value {
        self.details.to_value()
    }

    /// The id as rendered in APIs: 32 lowercase hex digits (sorts as the time it encodes).
    pub fn id_string(&self) -> String {
        format_id(self.id)
    }

    /// Writes [`Record::to_json`]'s bytes (same keys, same order) without building a `Value`.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        json::write_record(self, out)
    }

    /// The same bytes as [`Record::write_json`], through serde_json (the reference it is
    /// tested against).
    #[cfg(test)]
    pub(crate) fn write_json_serde(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        // Field order is serde_json's map order (sorted), as `to_json` produces.
        #[derive(serde::Serialize)]
        struct Out<'a> {
            bytes: u64,
            cost: String,
            created_at: String,
            id: String,
            messages: u64,
            metadata: &'a Details,
            tokens: u64,
            #[serde(rename = "type")]
            kind: &'static str,
            user_id: &'a str,
        }
        serde_json::to_writer(
            out,
            &Out {
                bytes: self.bytes,
                cost: self.cost.normalize().to_string(),
                created_at: rfc3339_ms(self.created_at),
                id: self.id_string(),
                messages: self.messages,
                metadata: &self.details,
                tokens: self.tokens,
                kind: self.kind().as_str(),
                user_id: &self.user_id,
            },
        )
    }

    /// The JSON form used by the APIs and stored on disk.
    pub fn to_json(&self) -> Value {
        let mut m = Map::with_capacity(9);
        m.insert("id".into(), Value::String(self.id_string()));
        m.insert("user_id".into(), Value::String(self.user_id.to_string()));
        m.insert("type".into(), Value::String(self.kind().as_str().into()));
        m.insert("tokens".into(), self.tokens.into());
        m.insert("messages".into(), self.messages.into());
        m.insert("bytes".into(), self.bytes.into());
        m.insert("cost".into(), Value::String(self.cost.normalize().to_string()));
        m.insert("metadata".into(), self.details.to_value());
        m.insert("created_at".into(), Value::String(rfc3339_ms(self.created_at)));
        Value::Object(m)
    }

    /// Parses the stored JSON form back; `None` when it is not a record.
    pub fn from_json(v: &Value) -> Option<Self> {
        let cost: Decimal = v.get("cost")?.as_str()?.parse().ok()?;
        let kind = RecordKind::parse(v.get("type")?.as_str()?)?;
        Some(Record {
            id: parse_id(v.get("id")?.as_str()?)?,
            user_id: Arc::from(v.get("user_id")?.as_str()?),
            tokens: v.get("tokens")?.as_u64()?,
            messages: v.get("messages")?.as_u64()?,
            bytes: v.get("bytes")?.as_u64()?,
            cost,
            details: Details::from_value(kind, v.get("metadata")?)?,
            created_at: DateTime::parse_from_rfc3339(v.get("created_at")?.as_str()?)
                .ok()?
                .with_timezone(&Utc),
        })
    }
}

/// Renders a record id.
pub fn format_id(id: u128) -> String {
    format!("{id:032x}")
}

/// Parses a rendered record id.
pub fn parse_id(s: &str) -> Option<u128> {
    if s.len() != 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// The time encoded in a record id.
pub fn id_time(id: u128) -> DateTime<Utc> {
    let ms = (id >> 80) as i64;
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// Issues record ids: 48 bits of milliseconds, 16 random bits per process, 64-bit counter.
/// Unique across processes and restarts; ordered by time, and within a process by issue order.
#[derive(Debug)]
pub struct RecordIds {
    node: u128,
    seq: AtomicU64,
    /// The newest millisecond issued by [`RecordIds::next_in_order`].
    last_ms: AtomicU64,
}

impl RecordIds {
    /// A generator with a random node id.
    pub fn new() -> Self {
        let mut b = [0u8; 10];
        // Falls back to the time if the OS has no randomness; ids stay unique in practice.
        if getrandom::fill(&mut b).is_err() {
            let t = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u128;
            b.copy_from_slice(&t.to_be_bytes()[6..]);
        }
        let node = u16::from_be_bytes([b[0], b[1]]) as u128;
        let seq = u64::from_be_bytes([b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9]]) >> 1;
        Self {
            node,
            seq: AtomicU64::new(seq),
            last_ms: AtomicU64::new(0),
        }
    }

    /// The next id, stamped with `at`.
    pub fn next(&self, at: DateTime<Utc>) -> u128 {
        let ms = (at.timestamp_millis().max(0) as u128) & ((1 << 48) - 1);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) as u128;
        (ms << 80) | (self.node << 64) | seq
    }
}

impl RecordIds {
    /// The next id, stamped with `at` or, if later, the newest time this generator stamped: ids
    /// issued in a row by one caller only grow, even when the times they stand for do not (the
    /// recorder stamps records in log order, so id order is history order).
    pub fn next_in_order(&self, at: DateTime<Utc>) -> u128 {
        let ms = (at.timestamp_millis().max(0) as u64) & ((1 << 48) - 1);
        let prev = self.last_ms.fetch_max(ms, Ordering::Relaxed);
        let ms = ms.max(prev) as u128;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) as u128;
        (ms << 80) | (self.node << 64) | seq
    }
}

impl Default for RecordIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let ids = RecordIds::new();
        let t0 = Utc::now();
        let a = ids.next(t0);
        let b = ids.next(t0);
        let c = ids.next(t0 + chrono::Duration::milliseconds(1));
        assert!(a != b && b != c);
        assert!(c > a && c > b);
        assert_eq!(parse_id(&format_id(a)), Some(a));
        assert_eq!(id_time(a).timestamp_millis(), t0.timestamp_millis());
    }

    #[test]
    fn json_round_trip() {
        let r = Record {
            id: RecordIds::new().next(Utc::now()),
            user_id: Arc::from("u1"),
            tokens: 1644,
            messages: 0,
            bytes: 0,
            cost: "0.0011912".parse().unwrap(),
            details: Details::from_value(
                RecordKind::AiResponse,
                &serde_json::json!({"model": "gemini-2.5-flash", "response_bytes": 10}),
            )
            .unwrap(),
            created_at: DateTime::parse_from_rfc3339("2026-11-28T10:00:00.123Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        let back = Record::from_json(&r.to_json()).unwrap();
        let mut direct = Vec::new();
        r.write_json(&mut direct).unwrap();
        assert_eq!(direct, serde_json::to_vec(&r.to_json()).unwrap());
        assert_eq!(back, r);
        assert_eq!(r.to_json()["cost"], "0.0011912");
    }
}
