//! The usage and admin API's reads in cluster mode: the same bodies as the embedded reads,
//! from PostgreSQL; PostgreSQL unreachable answers 503 UNAVAILABLE.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::api::usage_bodies::{ByModel, MODEL_SCAN_LIMIT, render_daily};
use crate::app::App;
use crate::clock::Month;
use crate::cluster::Cluster;
use crate::cluster::ledger::reads::{self, PageFilter, format_cursor, parse_cursor};
use crate::error::ApiError;
use crate::ledger::Totals;
use crate::ledger::store::RecordFilter;

/// A page filter from the embedded one (whose cursor is left unset) and the query's cursor.
pub fn page_filter(f: RecordFilter, cursor: Option<&String>) -> Result<PageFilter, ApiError> {
    Ok(PageFilter {
        user_id: f.user_id,
        kind: f.kind,
        from: f.from,
        to: f.to,
        cursor: match cursor.filter(|c| !c.is_empty()) {
            Some(c) => Some(parse_cursor(c).ok_or_else(|| ApiError::bad_request("cursor is not valid"))?),
            None => None,
        },
    })
}

/// One page of records, newest first, with the cursor of the next page (as
/// `usage::records_page`).
pub async fn records_page(c: &Cluster, f: &PageFilter, limit: usize) -> Result<Value, ApiError> {
    let mut recs = reads::records(&c.pg, f, limit + 1).await?;
    // One record past the page says there is more, and starts the next page.
    let next = if recs.len() > limit {
        recs.get(limit).map(format_cursor)
    } else {
        None
    };
    recs.truncate(limit);
    Ok(json!({
        "data": recs.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

/// `GET /api/usage/history` for `user`.
pub async fn history(c: &Cluster, user: &str, q: &HashMap<String, String>) -> Result<Value, ApiError> {
    let limit = crate::api::bounded(q, "limit", 50, 500)?;
    let f = RecordFilter {
        user_id: Some(user.to_string()),
        ..Default::default()
    };
    records_page(c, &page_filter(f, q.get("cursor"))?, limit).await
}

/// Per day and type totals for the last `days` days (one user or everyone), as
/// `usage::daily_rows`.
pub async fn daily_rows(app: &App, c: &Cluster, user: Option<&str>, days: usize) -> Result<Value, ApiError> {
    let today = app.clock.now().date_naive();
    let since = today - chrono::Duration::days(days as i64 - 1);
    let rows = reads::daily(&c.pg, user, since).await?;
    Ok(render_daily(days, since, rows))
}

/// The body of `GET /api/usage/breakdown` (as `usage::breakdown_body`).
pub async fn breakdown(c: &Cluster, user: &str, month: Month) -> Result<Value, ApiError> {
    let by_type: BTreeMap<String, Totals> = reads::user_month_by_type(&c.pg, user, month)
        .await?
        .into_iter()
        .collect();
    let mut f = PageFilter {
        user_id: Some(user.to_string()),
        from: Some(month.start()),
        to: Some(month.next().start()),
        ..Default::default()
    };
    let mut by_model = ByModel::default();
    let mut scanned = 0;
    // In pages, as the embedded read does: the aggregates are kept, not the records.
    let complete = loop {
        let want = 1000.min(MODEL_SCAN_LIMIT - scanned);
        if want == 0 {
            break false;
        }
        let page = reads::records(&c.pg, &f, want + 1).await?;
        page.iter().take(want).for_each(|r| by_model.add(r));
        scanned += page.len().min(want);
        match page.get(want) {
            Some(next) => f.cursor = Some(reads::position(next)),
            None => break true,
        }
    };
    Ok(by_model.body(month, &by_type, complete))
}

/// Best effort before a caller's own read in cluster mode: ships what this replica wrote so
/// far (bounded by `wait`), so the caller sees the records of the answers they already got
/// from this replica. Records on other replicas follow within a shipping tick.
pub async fn ship_written(app: &App, wait: std::time::Duration) {
    if let Some(c) = &app.cluster
        && let Err(e) = crate::cluster::ledger::flush(c, &app.recorder, &app.store, wait).await
    {
        tracing::debug!(error = %e, "read before this replica's records were shipped");
    }
}
