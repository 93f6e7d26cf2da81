//! The usage API: a caller reads their own usage with the key the gateway issued them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

pub use super::current::current;
use super::{bounded, query_map};
use crate::app::App;
use crate::clock::Month;
use crate::error::{ApiError, json_response};
use crate::identity::{KeyEntry, User};
use crate::ledger::store::{RecordFilter, format_cursor, parse_cursor};
use crate::ledger::{Record, Totals};
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::caller_key;
use rust_decimal::Decimal;

/// Routes `/api/usage/*`.
pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let key = authenticate(app, &req)?;
    let user = app.registry.user_of(key).ok_or_else(ApiError::invalid_key)?;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/api/usage/current") => Ok(json_response(
            StatusCode::OK,
            &super::current::current_shared(app, user).await,
        )),
        (&Method::GET, "/api/usage/history") => {
            if let Some(c) = &app.cluster {
                crate::cluster::ledger::ship_written(app, WRITTEN_WAIT).await;
                let body = crate::cluster::ledger::api::history(c, user.id(), &query_map(&req)).await?;
                return Ok(json_response(StatusCode::OK, &body));
            }
            written(app).await;
            history(app, user, &req)
        }
        (&Method::GET, "/api/usage/daily") => {
            if let Some(c) = &app.cluster {
                crate::cluster::ledger::ship_written(app, WRITTEN_WAIT).await;
                let days = bounded(&query_map(&req), "days", 30, 366)?;
                let body = crate::cluster::ledger::api::daily_rows(app, c, Some(user.id()), days).await?;
                return Ok(json_response(StatusCode::OK, &body));
            }
            written(app).await;
            daily(app, user, &req)
        }
        (&Method::GET, "/api/usage/breakdown") => {
            written(app).await;
            breakdown(app, user, &req).await
        }
        (&Method::GET, "/api/usage/stream") => Ok(super::stream::response(app, key)),
        (&Method::GET, "/api/usage/statement") => {
            written(app).await;
            super::statement::response(app, user, &req).await
        }
        _ => Err(ApiError::not_found("No such usage route.")),
    }
}

/// Longest a read waits for the recorder (see [`written`]): it takes a millisecond or so, and
/// longer only while storage writes fail (the read then shows what is written).
const WRITTEN_WAIT: Duration = Duration::from_millis(500);

/// Waits until every record handed to the recorder so far is in the log, where the caller's
/// history, daily and breakdown are read from (records not yet applied to the aggregates
/// included): the caller sees every record of the responses they already got, as
/// `/api/usage/current` (live counters) does. Costs no disk sync and nothing on the proxy path.
pub(super) async fn written(app: &App) {
    match tokio::time::timeout(WRITTEN_WAIT, app.recorder.written()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "usage read without the recorder's barrier"),
        Err(_) => tracing::warn!(
            wait_ms = WRITTEN_WAIT.as_millis() as u64,
            "the recorder did not write in time; the usage read shows what is written"
        ),
    }
}

fn authenticate(app: &App, req: &Request<Incoming>) -> Result<KeyEntry, ApiError> {
    let (key, _) = caller_key(req.headers(), req.uri().query()).ok_or_else(ApiError::missing_key)?;
    app.registry.identify(&key).ok_or_else(ApiError::invalid_key)
}

fn history(app: &App, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let limit = bounded(&q, "limit", 50, 500)?;
    let before = match q.get("cursor").filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_cursor(c).ok_or_else(|| ApiError::bad_request("cursor is not valid"))?),
        None => None,
    };
    let f = RecordFilter {
        user_id: Some(user.id().to_string()),
        cursor: before,
        ..Default::default()
    };
    let page = records_page(app, &f, limit)?;
    Ok(json_response(StatusCode::OK, &page))
}

/// One page of records, newest first, with the cursor of the next page.
pub fn records_page(app: &App, f: &RecordFilter, limit: usize) -> Result<Value, ApiError> {
    let mut recs = app.store.records(f, limit + 1).map_err(|e| match e {
        crate::ledger::StoreError::BadCursor => ApiError::bad_request("cursor is not valid"),
        e => ApiError::internal(format!("storage: {e}")),
    })?;
    // One record past the page says there is more, and its position starts the next page.
    let next = if recs.len() > limit {
        recs.get(limit).map(|(pos, _)| format_cursor(*pos))
    } else {
        None
    };
    recs.truncate(limit);
    Ok(json!({
        "data": recs.iter().map(|(_, r)| r.to_json()).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

fn daily(app: &App, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let days = bounded(&q, "days", 30, 366)?;
    Ok(json_response(StatusCode::OK, &daily_rows(app, Some(user.id()), days)?))
}

/// Per day and type totals for the last `days` days (one user or everyone).
pub fn daily_rows(app: &App, user: Option<&str>, days: usize) -> Result<Value, ApiError> {
    let today = app.clock.now().date_naive();
    let since = today - chrono::Duration::days(days as i64 - 1);
    let rows = app
        .store
        .daily(user, since)
        .map_err(|e| ApiError::internal(format!("storage: {e}")))?;
    Ok(render_daily(days, since, rows))
}

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

/// `GET /api/usage/breakdown?month=YYYY-MM` (default: this month): the caller's usage of a
/// month by record type (from the per-day aggregates, exact) and by model (from the records).
async fn breakdown(app: &Arc<App>, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let month = match query_map(req).get("month") {
        Some(m) => Month::parse(m).ok_or_else(|| ApiError::bad_request("month must be YYYY-MM"))?,
        None => Month::of(app.clock.now()),
    };
    if let Some(c) = &app.cluster {
        crate::cluster::ledger::ship_written(app, WRITTEN_WAIT).await;
        let body = crate::cluster::ledger::api::breakdown(c, user.id(), month).await?;
        return Ok(json_response(StatusCode::OK, &body));
    }
    let (app, user_id) = (app.clone(), user.id().to_string());
    let body = tokio::task::spawn_blocking(move || breakdown_body(&app, &user_id, month, MODEL_SCAN_LIMIT))
        .await
        .map_err(|e| ApiError::internal(format!("breakdown task: {e}")))??;
    Ok(json_response(StatusCode::OK, &body))
}

fn totals_row(label: &str, name: Value, t: &Totals) -> Value {
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

/// The body of `GET /api/usage/breakdown`: `{"month", "total", "by_type": [...], "by_model":
/// [...], "by_modality": [...], "models_complete", "records_scanned"}` (`by_modality`: see
/// [`ModalityRows`]; it covers the records scanned, as `by_model` does). Rows carry records, messages, tokens, bytes
/// and cost (exact decimal string); `by_model` is sorted by cost, then tokens, most first, and
/// groups records without a model (uploads) under `"model": null`. Reads at most `scan_limit`
/// records (newest first) for the model rows.
pub fn breakdown_body(app: &App, user: &str, month: Month, scan_limit: usize) -> Result<Value, ApiError> {
    let storage = |e: crate::ledger::StoreError| ApiError::internal(format!("storage: {e}"));
    let prefix = month.to_string();
    let mut by_type: BTreeMap<String, Totals> = BTreeMap::new();
    for row in app
        .store
        .daily(Some(user), month.start().date_naive())
        .map_err(storage)?
    {
        if row.day.starts_with(&prefix) {
            by_type.entry(row.kind).or_default().add(&row.totals);
        }
    }
    let mut by_model = ByModel::default();
    let mut complete = true;
    let mut f = RecordFilter {
        user_id: Some(user.to_string()),
        from: Some(month.start()),
        to: Some(month.next().start()),
        ..Default::default()
    };
    loop {
        let want = 1000.min(scan_limit - by_model.scanned);
        if want == 0 {
            complete = false;
            break;
        }
        let page = app.store.records(&f, want + 1).map_err(storage)?;
        for (_, r) in page.iter().take(want) {
            by_model.add(r);
        }
        match page.get(want) {
            Some((pos, _)) => f.cursor = Some(*pos),
            None => break,
        }
    }
    Ok(by_model.body(month, &by_type, complete))
}

/// The per-model and per-modality rows of a breakdown, fed one record at a time.
#[derive(Default)]
pub struct ByModel {
    models: HashMap<Option<String>, Totals>,
    modality: ModalityRows,
    scanned: usize,
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

    /// The breakdown's body (see [`breakdown_body`]) with `by_type` from the aggregates.
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
