//! The bodies of the usage reads that the embedded reads (from the local store) and the cluster
//! reads (from PostgreSQL) both render, so the two answer byte for byte the same.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::clock::Month;
use crate::ledger::{Record, Totals};

/// The body of a daily read: `{"days", "since", "data": [{"day", "type", …amounts}]}`.
pub fn render_daily(days: usize, since: chrono::NaiveDate, rows: Vec<crate::ledger::store::DayRow>) -> Value {
    let data: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "day": r.day,
                "type": r.kind,
                "messages": r.totals.messages,
                "tokens": r.totals.tokens,
                "bytes": r.totals.bytes,
                "cost": r.totals.cost.normalize().to_string(),
                "records": r.totals.records,
            })
        })
        .collect();
    json!({"days": days, "since": since.format("%Y-%m-%d").to_string(), "data": data})
}

/// Most records `GET /api/usage/breakdown` reads to group a month by model; past it the
/// per-model rows cover the newest records only and say so (`models_complete: false`).
pub const MODEL_SCAN_LIMIT: usize = 20_000;

pub(super) fn totals_row(label: &str, name: Value, t: &Totals) -> Value {
    json!({label: name, "records": t.records, "messages": t.messages, "tokens": t.tokens, "bytes": t.bytes, "cost": t.cost.normalize().to_string()})
}

/// Cost by modality and part, from the records' `metadata.price` lines: one row per (modality,
/// part) such as `("AUDIO", "input")`, with the quantity billed (tokens, images, seconds,
/// grounded requests) and the cost, batch discounts applied. A record without price lines (a
/// message, an upload, a response recorded before prices were explained) is one row under its
/// record type with no modality, so the rows add up to the same cost as `by_model`.
#[derive(Default)]
struct ModalityRows(HashMap<(Option<&'static str>, &'static str), (u64, u64, Decimal)>);

impl ModalityRows {
    fn add(&mut self, r: &Record) {
        match r.details.price().filter(|p| !p.lines.is_empty()) {
            Some(p) => {
                let keep = p
                    .batch_discount
                    .map_or(Decimal::ONE, |d| Decimal::ONE.checked_sub(d).unwrap_or(Decimal::ONE));
                for l in &p.lines {
                    let row = self
                        .0
                        .entry((l.modality.map(|m| m.as_str()), l.part.as_str()))
                        .or_default();
                    row.0 += 1;
                    row.1 = row.1.saturating_add(l.quantity);
                    // Exact: (a + b) * k == a * k + b * k in decimal arithmetic.
                    row.2 += l.cost.checked_mul(keep).unwrap_or(l.cost);
                }
            }
            None => {
                let row = self.0.entry((None, r.kind().as_str())).or_default();
                row.0 += 1;
                row.2 += r.cost;
            }
        }
    }

    /// Rows by cost, most first: `{"modality", "part", "lines", "quantity", "cost"}`.
    fn rows(&self) -> Vec<Value> {
        let mut rows: Vec<_> = self.0.iter().collect();
        rows.sort_by(|a, b| b.1.2.cmp(&a.1.2).then(a.0.cmp(b.0)));
        rows.into_iter()
            .map(|((m, part), (lines, q, cost))| {
                json!({"modality": m, "part": part, "lines": lines, "quantity": q, "cost": cost.normalize().to_string()})
            })
            .collect()
    }
}

/// The per-model and per-modality rows of a breakdown, fed one record at a time.
#[derive(Default)]
pub struct ByModel {
    models: HashMap<Option<String>, Totals>,
    modality: ModalityRows,
    pub(super) scanned: usize,
}

impl ByModel {
    /// Adds a record.
    pub fn add(&mut self, r: &Record) {
        self.models
            .entry(r.model().map(str::to_string))
            .or_default()
            .add(&Totals::of(r));
        self.modality.add(r);
        self.scanned += 1;
    }

    /// The breakdown's body (see `usage::breakdown_body`) with `by_type` from the aggregates.
    pub fn body(self, month: Month, by_type: &BTreeMap<String, Totals>, complete: bool) -> Value {
        let mut total = Totals::default();
        by_type.values().for_each(|t| total.add(t));
        let mut models: Vec<(Option<String>, Totals)> = self.models.into_iter().collect();
        models.sort_by(|a, b| {
            b.1.cost
                .cmp(&a.1.cost)
                .then(b.1.tokens.cmp(&a.1.tokens))
                .then(a.0.cmp(&b.0))
        });
        json!({
            "month": month.to_string(),
            "total": totals_row("type", Value::Null, &total),
            "by_type": by_type.iter().map(|(k, t)| totals_row("type", json!(k), t)).collect::<Vec<_>>(),
            "by_model": models.iter().map(|(m, t)| totals_row("model", json!(m), t)).collect::<Vec<_>>(),
            "by_modality": self.modality.rows(),
            "models_complete": complete,
            "records_scanned": self.scanned,
        })
    }
}
