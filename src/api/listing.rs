//! Admin reads the command line needs: the users page by page (`GET /admin/users`) and one
//! user's totals for a month (`GET /admin/users/{id}/usage?month=YYYY-MM`).

use std::ops::Bound;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{bounded, query_map};
use crate::app::App;
use crate::clock::Month;
use crate::error::{ApiError, json_response};
use crate::proxy::body::ProxyBody;

/// `GET /admin/users?limit=&cursor=`: users by id, `limit` at most 1000; the cursor is the last
/// id of the previous page.
pub(super) fn users(app: &App, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let limit = bounded(&q, "limit", 100, 1000)?;
    let start = match q.get("cursor").filter(|c| !c.is_empty()) {
        Some(c) => Bound::Excluded(c.as_bytes().to_vec()),
        None => Bound::Unbounded,
    };
    let mut data: Vec<Value> = Vec::new();
    let mut more = false;
    for kv in app.store.users().range::<Vec<u8>, _>((start, Bound::Unbounded)) {
        let (k, _) = kv.map_err(|e| ApiError::internal(format!("storage: {e}")))?;
        let Some(u) = std::str::from_utf8(&k).ok().and_then(|id| app.registry.user(id)) else {
            continue;
        };
        if data.len() == limit {
            more = true;
            break;
        }
        data.push(app.registry.user_json(u));
    }
    let next = if more {
        data.last().and_then(|u| u["id"].as_str()).map(str::to_string)
    } else {
        None
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"data": data, "next_cursor": next}),
    ))
}

/// `GET /admin/users/{id}/usage?month=YYYY-MM` (default this month): the month's totals from
/// the applied aggregates.
pub(super) fn user_month(app: &App, req: &Request<Incoming>, id: &str) -> Result<Response<ProxyBody>, ApiError> {
    let u = app
        .registry
        .user(id)
        .ok_or_else(|| ApiError::not_found(format!("User {id} not found.")))?;
    let m = match query_map(req).get("month") {
        Some(m) => Month::parse(m).ok_or_else(|| ApiError::bad_request("month must be YYYY-MM"))?,
        None => Month::of(app.clock.now()),
    };
    let t = app
        .store
        .user_month(id, m)
        .map_err(|e| ApiError::internal(format!("storage: {e}")))?;
    let mut v = t.to_json();
    v["user_id"] = json!(id);
    v["tier"] = json!(&*u.tier());
    v["month"] = json!(m.to_string());
    v["records"] = json!(t.records);
    Ok(json_response(StatusCode::OK, &v))
}
