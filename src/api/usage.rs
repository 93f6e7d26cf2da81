//! The usage API: a caller reads their own usage with the key the gateway issued them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

pub use super::current::current;
pub use super::usage_bodies::{ByModel, MODEL_SCAN_LIMIT, render_daily};
use super::{bounded, query_map};
use crate::app::App;
use crate::clock::Month;
use crate::error::{ApiError, json_response};
use crate::identity::{KeyEntry, User};
use crate::ledger::Totals;
use crate::ledger::store::{RecordFilter, format_cursor, parse_cursor};
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::caller_key;

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
                super::cluster_ledger::ship_written(app, WRITTEN_WAIT).await;
                let body = super::cluster_ledger::history(c, user.id(), &query_map(&req)).await?;
                return Ok(json_response(StatusCode::OK, &body));
            }
            written(app).await;
            history(app, user, &req)
        }
        (&Method::GET, "/api/usage/daily") => {
            if let Some(c) = &app.cluster {
                super::cluster_ledger::ship_written(app, WRITTEN_WAIT).await;
                let days = bounded(&query_map(&req), "days", 30, 366)?;
                let body = super::cluster_ledger::daily_rows(app, c, Some(user.id()), days).await?;
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

/// `GET /api/usage/breakdown?month=YYYY-MM` (default: this month): the caller's usage of a
/// month by record type (from the per-day aggregates, exact) and by model (from the records).
async fn breakdown(app: &Arc<App>, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let month = match query_map(req).get("month") {
        Some(m) => Month::parse(m).ok_or_else(|| ApiError::bad_request("month must be YYYY-MM"))?,
        None => Month::of(app.clock.now()),
    };
    if let Some(c) = &app.cluster {
        super::cluster_ledger::ship_written(app, WRITTEN_WAIT).await;
        let body = super::cluster_ledger::breakdown(c, user.id(), month).await?;
        return Ok(json_response(StatusCode::OK, &body));
    }
    let (app, user_id) = (app.clone(), user.id().to_string());
    let body = tokio::task::spawn_blocking(move || breakdown_body(&app, &user_id, month, MODEL_SCAN_LIMIT))
        .await
        .map_err(|e| ApiError::internal(format!("breakdown task: {e}")))??;
    Ok(json_response(StatusCode::OK, &body))
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
