//! The admin API's side of the audit trail: which requests are actions, the entry each one
//! leaves once answered, and `GET /admin/audit`.
//!
//! Every admin request that changes something (any method but GET) is an action, and so are the
//! reads that take data out (export, statements). The entry is written after the answer is
//! known, with what the handler noted on its response ([`AuditNote`]); it never holds the
//! request's body or headers, so neither a created key nor the admin token can reach it.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{bounded, query_map};
use crate::accept::ConnInfo;
use crate::app::App;
use crate::audit::{AuditError, Entry, Outcome};
use crate::error::{ApiError, json_response};
use crate::proxy::body::ProxyBody;

/// What a handler adds to its action's audit entry (e.g. the id of the key it created), put in
/// its response's extensions.
#[derive(Debug, Clone)]
pub struct AuditNote(pub Value);

/// An action under way: what will be written once it is answered.
pub(super) struct Pending {
    action: &'static str,
    target: Option<String>,
    caller: String,
    detail: Value,
}

/// The action a request is, or `None` for a read that is not audited.
pub(super) fn begin(app: &App, req: &Request<Incoming>, segs: &[&str]) -> Option<Pending> {
    let q = query_map(req);
    let mut detail = json!({});
    let (action, target) = match (req.method().clone(), segs) {
        (Method::POST, ["admin", "users"]) => ("user.create", None),
        (Method::PATCH, ["admin", "users", id]) => {
            if let Some(u) = app.registry.user(id) {
                detail["previous_tier"] = json!(app.registry.user_json(u)["tier"]);
            }
            ("user.set_tier", Some(id.to_string()))
        }
        (Method::DELETE, ["admin", "users", id]) => ("user.delete", Some(id.to_string())),
        (Method::POST, ["admin", "users", id, "keys"]) => ("key.create", Some(id.to_string())),
        (Method::DELETE, ["admin", "keys", key_id]) => ("key.revoke", Some(key_id.to_string())),
        (Method::POST, ["admin", "reload"]) => ("config.reload", None),
        (Method::POST, ["admin", "retention", "run"]) => ("retention.run", None),
        (Method::GET, ["admin", "export"]) => {
            detail["format"] = json!(q.get("format").map_or("csv", String::as_str));
            ("export", q.get("month").cloned())
        }
        (Method::GET, ["admin", "users", id, "statement"]) => {
            detail["format"] = json!(q.get("format"));
            detail["month"] = json!(q.get("month"));
            ("statement", Some(id.to_string()))
        }
        (Method::GET | Method::HEAD, _) => return None,
        // Whatever else changes something is recorded too, under its method and path.
        (m, _) => (
            match m {
                Method::POST => "admin.post",
                Method::PUT => "admin.put",
                Method::PATCH => "admin.patch",
                Method::DELETE => "admin.delete",
                _ => "admin.other",
            },
            Some(req.uri().path().to_string()),
        ),
    };
    Some(Pending {
        action,
        target,
        caller: req
            .extensions()
            .get::<ConnInfo>()
            .map_or_else(|| "unknown".into(), |c| c.peer.to_string()),
        detail,
    })
}

impl Pending {
    /// The entry for the answer `result` (to [`write`]).
    pub(super) fn finish(mut self, app: &App, result: &Result<Response<ProxyBody>, ApiError>) -> Entry {
        let (status, ok) = match result {
            Ok(resp) => {
                if let Some(AuditNote(Value::Object(note))) = resp.extensions().get::<AuditNote>() {
                    for (k, v) in note {
                        if k == "target" {
                            self.target = v.as_str().map(str::to_string);
                        } else {
                            self.detail[k.as_str()] = v.clone();
                        }
                    }
                }
                (resp.status(), resp.status().is_success())
            }
            Err(e) => {
                self.detail["error"] = json!(e.message);
                (e.status, false)
            }
        };
        if self.action == "user.set_tier"
            && ok
            && let Some(id) = &self.target
            && let Some(u) = app.registry.user(id)
        {
            self.detail["tier"] = json!(app.registry.user_json(u)["tier"]);
        }
        Entry {
            at: app.clock.now(),
            action: self.action,
            target: self.target,
            caller: self.caller,
            outcome: if ok { Outcome::Ok } else { Outcome::Failed },
            status: Some(status.as_u16()),
            detail: self.detail,
        }
    }
}

/// Appends the entry and flushes it. A failure to write is logged: the action itself is done
/// by now.
pub(super) async fn write(app: &App, entry: Entry) {
    let written = match app.audit.append(&entry) {
        Ok(_) => app.audit.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::error!(error = %e, action = entry.action, "audit entry not written");
    }
}

/// `GET /admin/audit?limit=&cursor=`: entries newest first, `limit` at most 500.
pub(super) fn list(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let limit = bounded(&q, "limit", 50, 500)?;
    let cursor = q.get("cursor").filter(|c| !c.is_empty()).map(String::as_str);
    let (data, next) = app.audit.page(limit, cursor).map_err(|e| match e {
        AuditError::BadCursor => ApiError::bad_request("cursor is not valid"),
        other => ApiError::internal(format!("storage: {other}")),
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"data": data, "next_cursor": next}),
    ))
}

/// Writes an action the gateway was asked for outside the admin API (SIGHUP, the retention
/// timer). Blocking.
pub fn record_internal(app: &App, action: &'static str, caller: &str, result: Result<Value, String>) {
    let (outcome, detail) = match result {
        Ok(d) => (Outcome::Ok, d),
        Err(e) => (Outcome::Failed, json!({ "error": e })),
    };
    app.audit.record_blocking(&Entry {
        at: app.clock.now(),
        action,
        target: None,
        caller: caller.to_string(),
        outcome,
        status: None,
        detail,
    });
}
