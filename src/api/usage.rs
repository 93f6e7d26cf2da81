//! The usage API: a caller reads their own usage with the key the gateway issued them.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};

use super::{bounded, query_map};
use crate::app::App;
use crate::clock::{Month, rfc3339};
use crate::error::{ApiError, json_response};
use crate::identity::{KeyEntry, User};
use crate::ledger::record::parse_id;
use crate::ledger::store::RecordFilter;
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::caller_key;

/// Routes `/api/usage/*`.
pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let key = authenticate(app, &req)?;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/api/usage/current") => Ok(json_response(StatusCode::OK, &current(app, &key.user))),
        (&Method::GET, "/api/usage/history") => history(app, &key.user, &req),
        (&Method::GET, "/api/usage/daily") => daily(app, &key.user, &req),
        _ => Err(ApiError::not_found("No such usage route.")),
    }
}

fn authenticate(app: &App, req: &Request<Incoming>) -> Result<Arc<KeyEntry>, ApiError> {
    let (key, _) = caller_key(req.headers(), req.uri().query()).ok_or_else(ApiError::missing_key)?;
    app.registry.identify(&key).ok_or_else(ApiError::invalid_key)
}

fn pct(used: Decimal, limit: Decimal) -> Value {
    if limit.is_zero() {
        return json!(100.0);
    }
    let p = (used * Decimal::from(100) / limit).round_dp(2);
    json!(p.to_f64().unwrap_or(0.0))
}

/// The `current` body: this month's totals against the plan.
pub fn current(app: &App, user: &User) -> Value {
    let now = app.clock.now();
    let month = Month::of(now);
    let t = user.usage.snapshot(month);
    let rt = app.live.load();
    let tier_name = user.tier();
    let tier = rt.tiers.get(tier_name.as_str()).map(|t| &t.tier);
    let lim_u = |f: fn(&crate::config::Tier) -> Option<u64>| tier.and_then(f);
    let limits = json!({
        "messages": lim_u(|t| t.messages),
        "tokens": lim_u(|t| t.tokens),
        "bytes": lim_u(|t| t.bytes),
        "cost": tier.and_then(|t| t.cost).map(|c| c.normalize().to_string()),
        "requests_per_minute": tier.and_then(|t| t.requests_per_minute).map(|n| n.get()),
        "tokens_per_minute": lim_u(|t| t.tokens_per_minute),
        "models": tier.and_then(|t| t.models.clone()),
    });
    let p = |used: u64, l: Option<u64>| l.map(|l| pct(Decimal::from(used), Decimal::from(l))).unwrap_or(Value::Null);
    let percentage = json!({
        "messages": p(t.messages, lim_u(|t| t.messages)),
        "tokens": p(t.tokens, lim_u(|t| t.tokens)),
        "bytes": p(t.bytes, lim_u(|t| t.bytes)),
        "cost": tier.and_then(|tr| tr.cost).map(|l| pct(t.cost, l)).unwrap_or(Value::Null),
    });
    json!({
        "user_id": &*user.id,
        "tier": &*tier_name,
        "month": month.to_string(),
        "resets_at": rfc3339(month.resets_at()),
        "current_month": t.to_json(),
        "limits": limits,
        "percentage": percentage,
    })
}

fn history(app: &App, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let limit = bounded(&q, "limit", 50, 500)?;
    let before = match q.get("cursor").filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_id(c).ok_or_else(|| ApiError::bad_request("cursor is not valid"))?),
        None => None,
    };
    let f = RecordFilter { user_id: Some(user.id.to_string()), before, ..Default::default() };
    let page = records_page(app, &f, limit)?;
    Ok(json_response(StatusCode::OK, &page))
}

/// One page of records, newest first, with the cursor of the next page.
pub fn records_page(app: &App, f: &RecordFilter, limit: usize) -> Result<Value, ApiError> {
    let mut recs = app
        .store
        .records(f, limit + 1)
        .map_err(|e| ApiError::internal(format!("storage: {e}")))?;
    let more = recs.len() > limit;
    recs.truncate(limit);
    let next = if more { recs.last().map(|r| r.id_string()) } else { None };
    Ok(json!({
        "data": recs.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
}

fn daily(app: &App, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let days = bounded(&q, "days", 30, 366)?;
    Ok(json_response(StatusCode::OK, &daily_rows(app, Some(&user.id), days)?))
}

/// Per day and type totals for the last `days` days (one user or everyone).
pub fn daily_rows(app: &App, user: Option<&str>, days: usize) -> Result<Value, ApiError> {
    let today = app.clock.now().date_naive();
    let since = today - chrono::Duration::days(days as i64 - 1);
    let rows = app.store.daily(user, since).map_err(|e| ApiError::internal(format!("storage: {e}")))?;
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
    Ok(json!({"days": days, "since": since.format("%Y-%m-%d").to_string(), "data": data}))
}
