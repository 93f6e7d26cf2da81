//! The admin API: users, keys, usage across users, analytics, export, config reload.
//! Every route needs `Authorization: Bearer <admin token>`; with no token configured the admin
//! API is off.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::usage::{daily_rows, records_page};
use super::{bounded, query_map, read_json};
use crate::app::App;
use crate::clock::{Month, rfc3339};
use crate::cluster::ledger::reads as pg;
use crate::cluster::shared::SharedError;
use crate::error::{ApiError, json_response};
use crate::identity::{IdentityError, valid_user_id};
use crate::ledger::store::{RecordFilter, parse_cursor};
use crate::ledger::{RecordKind, Totals};
use crate::metering::observer::BoxError;
use crate::proxy::body::ProxyBody;

fn check_token(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let rt = app.live.load();
    let Some(expected) = &rt.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "admin_off",
            "The admin API is off: set the admin token environment variable.",
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    // Compare digests so the comparison time does not depend on the token's content.
    let ok = given.is_some_and(|g| Sha256::digest(g.as_bytes()) == Sha256::digest(expected.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "admin_token",
            "Missing or invalid admin token.",
        ))
    }
}

fn identity_error(e: IdentityError) -> ApiError {
    match e {
        IdentityError::Exists(id) => ApiError::new(
            StatusCode::CONFLICT,
            "ALREADY_EXISTS",
            "exists",
            format!("User {id} already exists."),
        ),
        IdentityError::NoUser(id) => ApiError::not_found(format!("User {id} not found.")),
        IdentityError::NoKey(id) => ApiError::not_found(format!("Key {id} not found.")),
        IdentityError::BadId => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// Cluster mode's admin writes: PostgreSQL unreachable is a 503 (nothing was changed).
fn shared_error(e: SharedError) -> ApiError {
    match e {
        SharedError::Identity(e) => identity_error(e),
        SharedError::Unavailable(why) => ApiError::unavailable(format!(
            "The shared store (PostgreSQL) is unavailable; nothing was changed. {why}"
        )),
        other => ApiError::internal(other.to_string()),
    }
}

fn storage(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage: {e}"))
}

/// With a client CA configured (`[server.tls] client_ca_path`), every `/admin` path needs a
/// verified client certificate; without one the answer is 403, before the token is looked at.
fn check_client_cert(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let required = app.tls.as_ref().is_some_and(|t| t.requires_client_cert());
    let presented = req
        .extensions()
        .get::<crate::accept::ConnInfo>()
        .is_some_and(|c| c.client_cert);
    if !required || presented {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        "client_certificate",
        "The admin API requires a client certificate signed by the gateway's client CA.",
    ))
}

/// Routes `/admin/*`; actions (changes, exports) are written to the audit trail once answered.
pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let path = req.uri().path().to_string();
    check_client_cert(app, &req)?;
    if path == "/admin/dashboard" && req.method() == Method::GET {
        return Ok(super::pages::admin_dashboard());
    }
    check_token(app, &req)?;
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let pending = super::audit::begin(app, &req, &segs);
    let result = dispatch(app, req, &path).await;
    if let Some(p) = pending {
        let entry = p.finish(app, &result);
        super::audit::write(app, entry).await;
    }
    result
}

async fn dispatch(app: &Arc<App>, req: Request<Incoming>, path: &str) -> Result<Response<ProxyBody>, ApiError> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method, segs.as_slice()) {
        (Method::POST, ["admin", "users"]) => create_user(app, req).await,
        (Method::GET, ["admin", "users", id]) => {
            let u = app
                .registry
                .user(id)
                .ok_or_else(|| ApiError::not_found(format!("User {id} not found.")))?;
            let mut v = app.registry.user_json(u);
            v["current"] = super::current::current_shared(app, u).await;
            Ok(json_response(StatusCode::OK, &v))
        }
        (Method::PATCH, ["admin", "users", id]) => {
            let id = id.to_string();
            let body = read_json(req).await?;
            let tier = body
                .get("tier")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request("Body must name a tier."))?;
            known_tier(app, tier)?;
            let u = match &app.cluster {
                Some(c) => crate::replica::identity::set_tier(app, c, &id, tier)
                    .await
                    .map_err(shared_error)?,
                None => app.registry.set_tier(&id, tier).map_err(identity_error)?,
            };
            let body = app.registry.user_json(u);
            app.store.flush().await.map_err(storage)?;
            Ok(json_response(StatusCode::OK, &body))
        }
        (Method::DELETE, ["admin", "users", id]) => {
            let id = id.to_string();
            let removed = match &app.cluster {
                Some(c) => {
                    let local = crate::replica::identity::delete_user(app, c, &id)
                        .await
                        .map_err(shared_error)?;
                    // The shared ledger and counters too: a user created again under this id
                    // starts with nothing.
                    let shipped = crate::cluster::ledger::delete_user(&c.pg, &id, app.clock.now())
                        .await
                        .map_err(|e| {
                            ApiError::unavailable(format!("The usage ledger (PostgreSQL) could not be cleared: {e}"))
                        })?;
                    c.quotas
                        .forget_user(&c.redis, &id, crate::clock::Month::of(app.clock.now()))
                        .await;
                    local.max(shipped)
                }
                None => {
                    let key_ids = app.registry.delete_user(&id).map_err(identity_error)?;
                    app.alerts.forget(&id);
                    app.recorder.delete_user(&id, key_ids).await.map_err(storage)?
                }
            };
            app.store.flush().await.map_err(storage)?;
            // Their upstream resources are not deleted with them (a deletion upstream cannot be
            // undone): listed here and under /admin/resources?user=, for the operator to delete.
            let resources: Vec<Value> = app
                .proxy
                .owners
                .of_user(&id)
                .iter()
                .map(super::resources::entry_json)
                .collect();
            Ok(noted(
                json_response(
                    StatusCode::OK,
                    &json!({"deleted": id, "records_deleted": removed, "resources": resources}),
                ),
                json!({"records_deleted": removed, "resources": resources.len()}),
            ))
        }
        (Method::POST, ["admin", "users", id, "keys"]) => {
            let now = app.clock.now();
            let (key, key_id) = match &app.cluster {
                Some(c) => crate::replica::identity::create_key(app, c, id, now)
                    .await
                    .map_err(shared_error)?,
                None => app.registry.create_key(id, now).map_err(identity_error)?,
            };
            app.store.flush().await.map_err(storage)?;
            Ok(noted(
                json_response(
                    StatusCode::CREATED,
                    &json!({"key": key, "key_id": key_id, "user_id": id}),
                ),
                // The key's id only: its plaintext never reaches the audit trail.
                json!({"key_id": key_id}),
            ))
        }
        (Method::GET, ["admin", "users", id, "statement"]) => {
            let u = app
                .registry
                .user(id)
                .ok_or_else(|| ApiError::not_found(format!("User {id} not found.")))?;
            super::usage::written(app).await;
            super::statement::response(app, u, &req).await
        }
        (Method::GET, ["admin", "users", id, "keys"]) => {
            let keys = app.registry.list_keys(id).map_err(identity_error)?;
            Ok(json_response(StatusCode::OK, &json!({"data": keys})))
        }
        (Method::DELETE, ["admin", "keys", key_id]) => {
            let now = app.clock.now();
            match &app.cluster {
                Some(c) => crate::replica::identity::revoke(app, c, key_id, now)
                    .await
                    .map_err(shared_error)?,
                None => app.registry.revoke(key_id, now).map_err(identity_error)?,
            }
            app.store.flush().await.map_err(storage)?;
            Ok(json_response(StatusCode::OK, &json!({"revoked": key_id})))
        }
        (Method::GET, ["admin", "cluster"]) => super::cluster::status(app).await,
        (Method::GET, ["admin", "usage"]) => admin_usage(app, &req).await,
        (Method::GET, ["admin", "resources"]) => super::resources::list(app, &req).await,
        (Method::PUT, ["admin", "resources", collection, id]) => {
            super::resources::assign(app, &[collection, id], req).await
        }
        (Method::DELETE, ["admin", "resources", collection, id]) => {
            super::resources::delete(app, &[collection, id]).await
        }
        (Method::GET, ["admin", "analytics", "daily"]) => {
            let days = bounded(&query_map(&req), "days", 30, 366)?;
            if let Some(c) = &app.cluster {
                let body = super::cluster_ledger::daily_rows(app, c, None, days).await?;
                return Ok(json_response(StatusCode::OK, &body));
            }
            Ok(json_response(StatusCode::OK, &daily_rows(app, None, days)?))
        }
        (Method::GET, ["admin", "analytics", "summary"]) => {
            let m = month_param(app, &req)?;
            let (t, users) = match &app.cluster {
                Some(c) => pg::month_summary(&c.pg, m).await?,
                None => app.store.month_summary(m).map_err(storage)?,
            };
            let mut v = t.to_json();
            v["month"] = json!(m.to_string());
            v["revenue"] = v["cost"].clone();
            v["active_users"] = json!(users);
            v["records"] = json!(t.records);
            Ok(json_response(StatusCode::OK, &v))
        }
        (Method::GET, ["admin", "analytics", "models"]) => {
            let m = month_param(app, &req)?;
            let rows = match &app.cluster {
                Some(c) => pg::month_models(&c.pg, m).await?,
                None => app.store.month_models(m).map_err(storage)?,
            };
            let data: Vec<Value> = rows.iter().map(|(model, t)| group_row("model", model, t)).collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"month": m.to_string(), "data": data}),
            ))
        }
        (Method::GET, ["admin", "analytics", "top-users"]) => {
            let q = query_map(&req);
            let m = month_param(app, &req)?;
            let limit = bounded(&q, "limit", 10, 1000)?;
            let by = q.get("by").map(String::as_str).unwrap_or("cost");
            let mut rows = match &app.cluster {
                Some(c) => pg::month_totals(&c.pg, m).await?,
                None => app.store.month_users(m).map_err(storage)?,
            };
            match by {
                "cost" => rows.sort_by_key(|r| std::cmp::Reverse(r.1.cost)),
                "tokens" => rows.sort_by_key(|r| std::cmp::Reverse(r.1.tokens)),
                "messages" => rows.sort_by_key(|r| std::cmp::Reverse(r.1.messages)),
                _ => return Err(ApiError::bad_request("by must be cost, tokens or messages")),
            }
            rows.truncate(limit);
            let data: Vec<Value> = rows.iter().map(|(u, t)| group_row("user_id", u, t)).collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"month": m.to_string(), "by": by, "data": data}),
            ))
        }
        (Method::GET, ["admin", "analytics", "tags"]) => {
            let q = query_map(&req);
            let m = month_param(app, &req)?;
            let name = q.get("name").ok_or_else(|| ApiError::bad_request("name is required"))?;
            let limit = bounded(&q, "limit", 10, 1000)?;
            let mut rows = match &app.cluster {
                Some(c) => pg::month_tag(&c.pg, m, name).await?,
                None => app.store.month_tag(m, name).map_err(storage)?,
            };
            rows.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(b.1.tokens.cmp(&a.1.tokens)));
            rows.truncate(limit);
            let data: Vec<Value> = rows.iter().map(|(v, t)| group_row("value", v, t)).collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"month": m.to_string(), "name": name, "data": data}),
            ))
        }
        (Method::GET, ["admin", "export"]) => export(app, &req).await,
        (Method::GET, ["admin", "alerts"]) => super::alerts::list(app, &req),
        (Method::GET, ["admin", "audit"]) => super::audit::list(app, &req),
        (Method::GET, ["admin", "users"]) => super::listing::users(app, &req),
        (Method::GET, ["admin", "users", id, "usage"]) => super::listing::user_month(app, &req, id),
        (Method::POST, ["admin", "reload"]) => {
            let res = app.live.reload(app.clock.now());
            let tls = reload_tls(app);
            let st = app.live.status();
            let res = res.and(tls.map(|_| ()));
            let mut body =
                json!({"ok": res.is_ok(), "loaded_at": st.loaded_at.map(rfc3339), "last_error": st.last_error});
            if let Some(t) = tls_status(app) {
                body["tls"] = t;
            }
            Ok(json_response(
                if res.is_ok() {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                },
                &body,
            ))
        }
        (Method::GET, ["admin", "config", "status"]) => {
            let st = app.live.status();
            let mut body = json!({"loaded_at": st.loaded_at.map(rfc3339), "last_error": st.last_error});
            if let Some(t) = tls_status(app) {
                body["tls"] = t;
            }
            Ok(json_response(StatusCode::OK, &body))
        }
        (Method::POST, ["admin", "retention", "run"]) => {
            let rt = app.live.load();
            let cutoff = Month::of(app.clock.now())
                .minus(rt.config.storage.retention_months)
                .start();
            let n = app.recorder.retention(cutoff).await.map_err(storage)?;
            let body = json!({"deleted": n, "cutoff": rfc3339(cutoff)});
            Ok(noted(json_response(StatusCode::OK, &body), body))
        }
        _ => Err(ApiError::not_found(format!("No admin route for {path}."))),
    }
}

/// Puts `note` on the response for the action's audit entry.
fn noted(mut resp: Response<ProxyBody>, note: Value) -> Response<ProxyBody> {
    resp.extensions_mut().insert(super::audit::AuditNote(note));
    resp
}

/// Re-reads the TLS files (with `[server.tls]`): `Ok(None)` without TLS.
fn reload_tls(app: &App) -> Result<Option<()>, String> {
    match &app.tls {
        None => Ok(None),
        Some(t) => t.reload(app.clock.now()).map(Some),
    }
}

/// `{"loaded_at", "last_error"}` of the certificate in use, with `[server.tls]`.
fn tls_status(app: &App) -> Option<Value> {
    let st = app.tls.as_ref()?.status();
    Some(json!({"loaded_at": st.loaded_at.map(rfc3339), "last_error": st.last_error}))
}

fn group_row(label: &str, name: &str, t: &Totals) -> Value {
    json!({label: name, "requests": t.records, "messages": t.messages, "tokens": t.tokens, "bytes": t.bytes, "cost": t.cost.normalize().to_string()})
}

fn known_tier(app: &App, tier: &str) -> Result<(), ApiError> {
    if app.live.load().tier(tier).is_some() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("Unknown tier {tier}.")))
    }
}

fn month_param(app: &App, req: &Request<Incoming>) -> Result<Month, ApiError> {
    match query_map(req).get("month") {
        Some(m) => Month::parse(m).ok_or_else(|| ApiError::bad_request("month must be YYYY-MM")),
        None => Ok(Month::of(app.clock.now())),
    }
}

async fn create_user(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let body = read_json(req).await?;
    let id = body
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Body must have an id."))?;
    if !valid_user_id(id) {
        return Err(ApiError::bad_request(
            "User ids are 1 to 64 characters of a-z A-Z 0-9 _ - .",
        ));
    }
    let tier = body
        .get("tier")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Body must have a tier."))?;
    known_tier(app, tier)?;
    // An email of another type was dropped silently before (found by schemathesis).
    let email = match body.get("email") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) => Some(e.as_str()),
        Some(_) => return Err(ApiError::bad_request("email must be a string.")),
    };
    let now = app.clock.now();
    let u = match &app.cluster {
        Some(c) => crate::replica::identity::create_user(app, c, id, tier, email, now)
            .await
            .map_err(shared_error)?,
        None => app
            .registry
            .create_user(id, tier, email, now, Month::of(now))
            .map_err(identity_error)?,
    };
    let body = app.registry.user_json(u);
    app.store.flush().await.map_err(storage)?;
    Ok(noted(
        json_response(StatusCode::CREATED, &body),
        json!({"target": id, "tier": tier}),
    ))
}

async fn admin_usage(app: &App, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let limit = bounded(&q, "limit", 50, 500)?;
    let time = |name: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        match q.get(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => {
                if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
                    return Ok(Some(t.with_timezone(&chrono::Utc)));
                }
                chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|d| Some(d.and_utc()))
                    .ok_or_else(|| ApiError::bad_request(format!("{name} must be RFC 3339 or YYYY-MM-DD")))
            }
        }
    };
    let mut f = RecordFilter {
        user_id: q.get("user_id").filter(|v| !v.is_empty()).cloned(),
        kind: match q.get("type").filter(|v| !v.is_empty()) {
            Some(t) => Some(
                RecordKind::parse(t)
                    .ok_or_else(|| ApiError::bad_request("type must be message_sent, ai_response or file_upload"))?,
            ),
            None => None,
        },
        from: time("from")?,
        to: time("to")?,
        cursor: None,
    };
    if let Some(c) = &app.cluster {
        let f = super::cluster_ledger::page_filter(f, q.get("cursor"))?;
        let body = super::cluster_ledger::records_page(c, &f, limit).await?;
        return Ok(json_response(StatusCode::OK, &body));
    }
    f.cursor = match q.get("cursor").filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_cursor(c).ok_or_else(|| ApiError::bad_request("cursor is not valid"))?),
        None => None,
    };
    Ok(json_response(StatusCode::OK, &records_page(app, &f, limit)?))
}

/// Streams a month of records as CSV or JSON lines, in bounded memory: a blocking task walks
/// the ledger and sends chunks through a small channel; a slow client slows the walk.
async fn export(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let m = month_param(app, req)?;
    let csv = match q.get("format").map(String::as_str).unwrap_or("csv") {
        "csv" => true,
        "jsonl" => false,
        _ => return Err(ApiError::bad_request("format must be csv or jsonl")),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    if let Some(c) = &app.cluster {
        // Streamed from PostgreSQL with COPY; each record rendered as below.
        let head = if csv { CSV_HEADER.to_string() } else { String::new() };
        let render = move |buf: &mut String, raw: &[u8]| export_line(buf, raw, csv);
        crate::cluster::ledger::export::start(&c.pg, m, head, render, tx).await?;
    } else {
        export_local(app, m, csv, tx);
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut resp = Response::new(ProxyBody::stream(StreamBody::new(stream)));
    let (ctype, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/x-ndjson", "jsonl")
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"usage-{m}.{ext}\"")) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// The header line of a CSV export.
const CSV_HEADER: &str = "id,user_id,type,tokens,messages,bytes,cost,metadata,created_at\n";

/// Adds a record (its stored JSON) to an export: a CSV row, or the JSON as one line.
fn export_line(buf: &mut String, raw: &[u8], csv: bool) {
    let Ok(v) = serde_json::from_slice::<Value>(raw) else {
        return;
    };
    if csv {
        csv_row(buf, &v);
    } else {
        buf.push_str(&String::from_utf8_lossy(raw));
        buf.push('\n');
    }
}

/// Streams a month of the local ledger into `tx` from a blocking task.
fn export_local(app: &App, m: Month, csv: bool, tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>) {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = String::with_capacity(64 * 1024);
        if csv {
            buf.push_str(CSV_HEADER);
        }
        let mut open = true;
        let res = store.for_each_record_in(m, |raw| {
            export_line(&mut buf, raw, csv);
            if buf.len() >= 60 * 1024 {
                let chunk = Bytes::from(std::mem::take(&mut buf));
                open = tx.blocking_send(Ok(Frame::data(chunk))).is_ok();
            }
            open
        });
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(Box::new(e)));
            return;
        }
        if open && !buf.is_empty() {
            let _ = tx.blocking_send(Ok(Frame::data(Bytes::from(buf))));
        }
    });
}

fn csv_field(buf: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        buf.push('"');
        buf.push_str(&s.replace('"', "\"\""));
        buf.push('"');
    } else {
        buf.push_str(s);
    }
}

fn csv_row(buf: &mut String, v: &Value) {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0).to_string();
    let fields = [
        s("id"),
        s("user_id"),
        s("type"),
        n("tokens"),
        n("messages"),
        n("bytes"),
        s("cost"),
        v.get("metadata").map(Value::to_string).unwrap_or_else(|| "{}".into()),
        s("created_at"),
    ];
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        csv_field(buf, f);
    }
    buf.push('\n');
}
