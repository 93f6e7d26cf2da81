//! The gateway's own routes: the usage API (caller's key), the admin API (admin token),
//! health and metrics.

pub mod admin;
mod alerts;
pub mod audit;
pub mod cluster;
pub mod cluster_ledger;
pub mod current;
mod listing;
pub mod openapi;
pub mod pages;
pub mod resources;
pub mod statement;
pub mod stream;
pub mod usage;
pub mod usage_bodies;

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::app::App;
use crate::error::{ApiError, json_response};
use crate::proxy::body::ProxyBody;

/// Largest JSON body the admin API reads.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Routes a request that is not proxied.
pub async fn route(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let result = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => Ok(health(&app)),
        (Method::GET, "/metrics") => Ok(metrics(&app)),
        (Method::GET, "/dashboard") => Ok(pages::dashboard()),
        (Method::GET, "/openapi.json") => Ok(openapi::response(app.live.load().config.tiers.keys())),
        (_, p) if p.starts_with("/api/usage/") => usage::route(&app, req).await,
        (_, p) if p.starts_with("/admin/") || p == "/admin" => admin::route(&app, req).await,
        _ => Err(ApiError::not_found(format!("No route for {path}."))),
    };
    match result {
        Ok(resp) => resp,
        // Not found by the routers, at a documented path that takes other methods: 405. Asked
        // only after the routers, so a route added without its operation still answers.
        Err(e) if e.status == StatusCode::NOT_FOUND => match openapi::not_allowed(&method, &path) {
            Some(allow) => method_not_allowed(&method, &allow),
            None => e.into_response(),
        },
        Err(e) => e.into_response(),
    }
}

/// 405 with `Allow` for a known path asked with a method it does not take.
fn method_not_allowed(method: &Method, allow: &str) -> Response<ProxyBody> {
    let mut resp = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "INVALID_ARGUMENT",
        "method_not_allowed",
        format!("Method {method} is not allowed here; allowed: {allow}."),
    )
    .into_response();
    if let Ok(v) = http::HeaderValue::from_str(allow) {
        resp.headers_mut().insert(http::header::ALLOW, v);
    }
    resp
}

fn health(app: &App) -> Response<ProxyBody> {
    let stats = &app.recorder.stats;
    let degraded = stats.degraded.load(std::sync::atomic::Ordering::Relaxed);
    let last_error = stats.last_error.lock().ok().and_then(|g| g.clone());
    let mut body = json!({
        "status": if degraded { "degraded" } else { "ok" },
        "storage": {
            "queued_records": stats.queued.load(std::sync::atomic::Ordering::Relaxed),
            "last_error": last_error,
        },
    });
    if let Some(c) = &app.cluster {
        // Cluster mode only: records waiting for PostgreSQL (served all the same).
        body["cluster"] = c.shipping.to_json(app.clock.now());
        body["cluster"]["redis"] = json!(c.quotas.health_name());
    }
    json_response(StatusCode::OK, &body)
}

fn metrics(app: &App) -> Response<ProxyBody> {
    let mut text = app.metrics.render(&app.recorder.stats);
    let a = &app.alerts.metrics;
    let load = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
    for (name, kind, help, v) in [
        (
            "gm_alerts_fired_total",
            "counter",
            "Quota alerts fired.",
            load(&a.fired),
        ),
        (
            "gm_alert_deliveries_sent_total",
            "counter",
            "Alert deliveries accepted by their receiver.",
            load(&a.sent),
        ),
        (
            "gm_alert_deliveries_failed_total",
            "counter",
            "Alert deliveries given up.",
            load(&a.failed),
        ),
        (
            "gm_alert_delivery_retries_total",
            "counter",
            "Failed alert delivery attempts (retried).",
            load(&a.retries),
        ),
        (
            "gm_alert_deliveries_pending",
            "gauge",
            "Alert deliveries in the outbox.",
            load(&a.pending),
        ),
    ] {
        crate::metrics::series(&mut text, name, kind, help, v);
    }
    if let Some(c) = &app.cluster {
        c.shipping.render_metrics(&mut text, app.clock.now());
        c.quotas.render_metrics(&mut text);
    }
    let mut resp = Response::new(ProxyBody::full(text));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The query string as a map (first value wins).
pub fn query_map(req: &Request<Incoming>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    if let Some(q) = req.uri().query() {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
            if let Some(v) = crate::proxy::headers::query_param(q, k) {
                m.entry(k.to_string()).or_insert(v);
            }
        }
    }
    m
}

/// Reads a small JSON body.
pub async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::bad_request("The request body could not be read or is too large."))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

/// Parses a positive integer query parameter with a default and a maximum.
pub fn bounded(q: &HashMap<String, String>, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| n.min(max))
            .ok_or_else(|| ApiError::bad_request(format!("{name} must be a positive integer"))),
    }
}
