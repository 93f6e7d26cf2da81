//! Monthly statements: one user's month as a document for people (PDF) or tools (CSV): the
//! user, tier and period, totals by record type, by model and by price rule, a daily table
//! and the record count.
//!
//! The figures come from the ledger's own reads, as the usage API's: the per-type and daily
//! totals from the user's day runs ([`SledStore::daily`]), the per-model and per-rule rows from
//! the user's records of the month ([`SledStore::records`]); both follow the user's chain from
//! the heads the writer keeps, so records written but not yet applied are included.

mod pdf;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::clock::{Month, rfc3339};
use crate::ledger::store::RecordFilter;
use crate::ledger::{Record, SledStore, StoreError, Totals};

pub use pdf::render_pdf;

/// Why a statement could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// Reading the ledger failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The PDF writer failed.
    #[error("pdf: {0}")]
    Pdf(String),
}

/// What a group of records was priced by: its type and model and, once records carry it,
/// the price rule applied (`metadata.price`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PriceRule {
    /// Record type (`ai_response`, ...).
    pub kind: &'static str,
    /// The model, for records that name one.
    pub model: Option<String>,
    /// The price rule recorded with the record (`metadata.price`); `None` for records written
    /// before records carried it, which are grouped by type and model alone.
    pub price: Option<String>,
}

impl PriceRule {
    /// The rule a record was priced by.
    ///
    /// Hook: records do not carry their price rule yet (the pricing work adds `metadata.price`);
    /// until then this reads `price` from the metadata if it is there, so the statement groups
    /// by it as soon as records have it, and by type and model before.
    pub fn of(r: &Record) -> Self {
        let price = match r.metadata().get("price") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Null) | None => None,
            Some(v) => Some(rule_of_price(v)),
        };
        PriceRule {
            kind: r.kind().as_str(),
            model: r.model().map(str::to_string),
            price,
        }
    }

    /// One-line label: `type model [price]`.
    pub fn label(&self) -> String {
        let mut s = self.kind.to_string();
        if let Some(m) = &self.model {
            s.push(' ');
            s.push_str(m);
        }
        if let Some(p) = &self.price {
            s.push_str(" @ ");
            s.push_str(p);
        }
        s
    }
}

/// The rule of a record's `metadata.price`: the price entry, context tier, batch discount and
/// the rates applied (part, modality, rate), without the quantities and costs, so records
/// priced the same way group together.
fn rule_of_price(v: &serde_json::Value) -> String {
    use serde_json::Value;
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let mut out = s("entry").unwrap_or("defaults").to_string();
    if let Some(c) = s("context") {
        out.push(' ');
        out.push_str(c);
    }
    if let Some(d) = v.get("batch_discount").filter(|d| !d.is_null()) {
        out.push_str(" batch -");
        out.push_str(d.as_str().map_or_else(|| d.to_string(), str::to_string).as_str());
    }
    let lines = v
        .get("lines")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, l) in lines.iter().enumerate() {
        out.push_str(if i == 0 { ": " } else { ", " });
        out.push_str(l.get("part").and_then(Value::as_str).unwrap_or("?"));
        if let Some(m) = l.get("modality").and_then(Value::as_str) {
            out.push('/');
            out.push_str(m);
        }
        out.push('=');
        let rate = l
            .get("rate")
            .map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_string));
        out.push_str(rate.as_deref().unwrap_or("?"));
    }
    out
}

/// One user's month, ready to render.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The user billed.
    pub user_id: String,
    /// The user's tier when the statement was made.
    pub tier: String,
    /// The month.
    pub month: Month,
    /// When the statement was made.
    pub generated_at: DateTime<Utc>,
    /// The month's totals (`records` is the record count).
    pub total: Totals,
    /// Totals by record type, by type name.
    pub by_type: Vec<(String, Totals)>,
    /// Totals by model (records without a model, uploads, under `None`), most cost first.
    pub by_model: Vec<(Option<String>, Totals)>,
    /// Totals by price rule, most cost first.
    pub by_rule: Vec<(PriceRule, Totals)>,
    /// Totals per day with usage (`YYYY-MM-DD`), oldest first.
    pub daily: Vec<(String, Totals)>,
}

impl Statement {
    /// The period as `YYYY-MM-DD to YYYY-MM-DD` (UTC, both days included).
    pub fn period(&self) -> String {
        let first = self.month.start().date_naive();
        let last = self.month.next().start().date_naive() - chrono::Duration::days(1);
        format!("{} to {}", first.format("%Y-%m-%d"), last.format("%Y-%m-%d"))
    }

    /// The file name for a download (`statement-USER-YYYY-MM.EXT`).
    pub fn file_name(&self, ext: &str) -> String {
        format!("statement-{}-{}.{ext}", self.user_id, self.month)
    }
}

/// Gathers `user`'s statement for `month` from the ledger. Blocking (reads the log): call it
/// off the async workers.
pub fn gather(
    store: &SledStore,
    user: &str,
    tier: &str,
    month: Month,
    now: DateTime<Utc>,
) -> Result<Statement, StatementError> {
    let prefix = month.to_string();
    let mut by_type: BTreeMap<String, Totals> = BTreeMap::new();
    let mut daily: BTreeMap<String, Totals> = BTreeMap::new();
    for row in store.daily(Some(user), month.start().date_naive())? {
        if row.day.starts_with(&prefix) {
            by_type.entry(row.kind).or_default().add(&row.totals);
            daily.entry(row.day).or_default().add(&row.totals);
        }
    }
    let mut total = Totals::default();
    by_type.values().for_each(|t| total.add(t));

    let mut by_model: HashMap<Option<String>, Totals> = HashMap::new();
    let mut by_rule: HashMap<PriceRule, Totals> = HashMap::new();
    let mut f = RecordFilter {
        user_id: Some(user.to_string()),
        from: Some(month.start()),
        to: Some(month.next().start()),
        ..Default::default()
    };
    const PAGE: usize = 1000;
    loop {
        let page = store.records(&f, PAGE + 1)?;
        for (_, r) in page.iter().take(PAGE) {
            let t = Totals::of(r);
            by_model.entry(r.model().map(str::to_string)).or_default().add(&t);
            by_rule.entry(PriceRule::of(r)).or_default().add(&t);
        }
        match page.get(PAGE) {
            Some((pos, _)) => f.cursor = Some(*pos),
            None => break,
        }
    }
    let mut by_model: Vec<_> = by_model.into_iter().collect();
    by_model.sort_by(|a, b| {
        b.1.cost
            .cmp(&a.1.cost)
            .then(b.1.tokens.cmp(&a.1.tokens))
            .then(a.0.cmp(&b.0))
    });
    let mut by_rule: Vec<_> = by_rule.into_iter().collect();
    by_rule.sort_by(|a, b| {
        b.1.cost
            .cmp(&a.1.cost)
            .then(b.1.tokens.cmp(&a.1.tokens))
            .then(a.0.cmp(&b.0))
    });
    Ok(Statement {
        user_id: user.to_string(),
        tier: tier.to_string(),
        month,
        generated_at: now,
        total,
        by_type: by_type.into_iter().collect(),
        by_model,
        by_rule,
        daily: daily.into_iter().collect(),
    })
}

/// The cost as the APIs render it: the exact decimal, no trailing zeros.
fn cost(t: &Totals) -> String {
    t.cost.normalize().to_string()
}

/// The statement as CSV: a header `section,name,records,messages,tokens,bytes,cost`, then
/// rows `user`, `tier`, `period`, `generated_at` (name only), `total`, one `type`, `model`,
/// `price_rule` and `day` row each. Costs are exact decimal strings.
pub fn render_csv(s: &Statement) -> String {
    let mut out = String::from("section,name,records,messages,tokens,bytes,cost\n");
    for (section, name) in [
        ("user", s.user_id.clone()),
        ("tier", s.tier.clone()),
        ("period", s.period()),
        ("generated_at", rfc3339(s.generated_at)),
    ] {
        csv_field(&mut out, section);
        out.push(',');
        csv_field(&mut out, &name);
        out.push_str(",,,,,\n");
    }
    let mut row = |section: &str, name: &str, t: &Totals| {
        csv_field(&mut out, section);
        out.push(',');
        csv_field(&mut out, name);
        out.push_str(&format!(
            ",{},{},{},{},{}\n",
            t.records,
            t.messages,
            t.tokens,
            t.bytes,
            cost(t)
        ));
    };
    row("total", "", &s.total);
    for (k, t) in &s.by_type {
        row("type", k, t);
    }
    for (m, t) in &s.by_model {
        row("model", m.as_deref().unwrap_or(""), t);
    }
    for (r, t) in &s.by_rule {
        row("price_rule", &r.label(), t);
    }
    for (d, t) in &s.daily {
        row("day", d, t);
    }
    out
}

/// A CSV field, quoted when it must be (and guarded against spreadsheet formulas, since model
/// names come from callers).
fn csv_field(out: &mut String, s: &str) {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Statement {
        let t = Totals {
            records: 2,
            messages: 1,
            tokens: 27,
            bytes: 0,
            cost: "0.0000411".parse().unwrap(),
            response_bytes: 10,
        };
        Statement {
            user_id: "alice".into(),
            tier: "free".into(),
            month: Month(202611),
            generated_at: Month(202612).start(),
            total: t,
            by_type: vec![("ai_response".into(), t)],
            by_model: vec![(Some("=cmd,x".into()), t)],
            by_rule: vec![(
                PriceRule {
                    kind: "ai_response",
                    model: Some("gemini-2.5-flash".into()),
                    price: None,
                },
                t,
            )],
            daily: vec![("2026-11-03".into(), t)],
        }
    }

    #[test]
    fn csv_has_every_section_and_quotes_what_it_must() {
        let csv = render_csv(&sample());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "section,name,records,messages,tokens,bytes,cost");
        assert!(lines.contains(&"period,2026-11-01 to 2026-11-30,,,,,"));
        assert!(lines.contains(&"total,,2,1,27,0,0.0000411"));
        assert!(lines.contains(&"model,\"'=cmd,x\",2,1,27,0,0.0000411"));
        assert!(lines.contains(&"price_rule,ai_response gemini-2.5-flash,2,1,27,0,0.0000411"));
        assert!(lines.contains(&"day,2026-11-03,2,1,27,0,0.0000411"));
    }

    #[test]
    fn pdf_renders_with_the_font_embedded() {
        let pdf = render_pdf(&sample()).unwrap();
        assert!(pdf.starts_with(b"%PDF-"));
        // The font goes in as a subset (FontFile2), with a ToUnicode map so text can be copied.
        let text = String::from_utf8_lossy(&pdf);
        assert!(text.contains("FontFile2"), "font embedded");
        assert!(text.contains("ToUnicode"), "text extractable");
    }
}
