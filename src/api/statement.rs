//! `GET /api/usage/statement` (the caller's) and `GET /admin/users/{id}/statement` (any
//! user's): a month's statement as PDF or CSV (see [`crate::statement`]).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::query_map;
use crate::app::App;
use crate::clock::Month;
use crate::error::ApiError;
use crate::identity::User;
use crate::proxy::body::ProxyBody;
use crate::statement::{self, StatementError};

/// The statement of `user` for `?month=YYYY-MM` (default: this month) as `?format=pdf`
/// (default) or `csv`, as a download.
pub async fn response(app: &Arc<App>, user: &User, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let month = match q.get("month") {
        Some(m) => Month::parse(m).ok_or_else(|| ApiError::bad_request("month must be YYYY-MM"))?,
        None => Month::of(app.clock.now()),
    };
    let pdf = match q.get("format").map(String::as_str).unwrap_or("pdf") {
        "pdf" => true,
        "csv" => false,
        _ => return Err(ApiError::bad_request("format must be pdf or csv")),
    };
    let (app2, user_id, tier) = (app.clone(), user.id().to_string(), user.tier().to_string());
    let now = app.clock.now();
    let (body, name) = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, String), StatementError> {
        let s = statement::gather(&app2.store, &user_id, &tier, month, now)?;
        if pdf {
            Ok((statement::render_pdf(&s)?, s.file_name("pdf")))
        } else {
            Ok((statement::render_csv(&s).into_bytes(), s.file_name("csv")))
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("statement task: {e}")))?
    .map_err(|e| ApiError::internal(format!("statement: {e}")))?;
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if pdf {
            "application/pdf"
        } else {
            "text/csv; charset=utf-8"
        }),
    );
    // User ids are plain ASCII by construction; a value that would not be a header is left out.
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}
