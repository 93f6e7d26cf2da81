//! `GET /admin/alerts?user_id=&month=`: the alerts of a month (default: the current one), for
//! everyone or one user, each with its deliveries (pending, sent or failed), plus the counters of
//! the pipeline.

use std::sync::atomic::Ordering;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::query_map;
use crate::app::App;
use crate::body::ProxyBody;
use crate::clock::Month;
use crate::error::{ApiError, json_response};
use crate::ledger::alerts::DeliveryStatus;

/// Lists alerts and their deliveries. The caller checked the admin token.
pub fn list(app: &App, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let month = match q.get("month").filter(|m| !m.is_empty()) {
        Some(m) => Month::parse(m).ok_or_else(|| ApiError::bad_request("month must be YYYY-MM"))?,
        None => Month::of(app.clock.now()),
    };
    let user = q.get("user_id").filter(|u| !u.is_empty()).map(String::as_str);
    let storage = |e: crate::ledger::StoreError| ApiError::internal(format!("storage: {e}"));
    let mut alerts = app.store.alerts(month, user).map_err(storage)?;
    alerts.sort_by(|a, b| {
        a.at.cmp(&b.at)
            .then(a.user_id.cmp(&b.user_id))
            .then(a.threshold.cmp(&b.threshold))
    });
    let (mut sent, mut pending, mut failed) = (0u64, 0u64, 0u64);
    let mut data = Vec::with_capacity(alerts.len());
    for a in &alerts {
        let mut deliveries = Vec::with_capacity(a.channels.len());
        for &ch in &a.channels {
            let d = app.store.alert_delivery(a, ch).map_err(storage)?;
            match d {
                Some(d) => {
                    match d.status {
                        DeliveryStatus::Sent => sent += 1,
                        DeliveryStatus::Pending => pending += 1,
                        DeliveryStatus::Failed => failed += 1,
                    }
                    deliveries.push(d.to_json());
                }
                // Not expected: every channel of an alert gets an entry in the same batch as its mark.
                None => deliveries.push(json!({"id": a.delivery_id(ch), "channel": ch.as_str(), "status": "unknown"})),
            }
        }
        let mut v = a.to_json();
        v["deliveries"] = Value::Array(deliveries);
        data.push(v);
    }
    let m = &app.alerts.metrics;
    let body = json!({
        "month": month.to_string(),
        "user_id": user,
        "counts": {"alerts": alerts.len(), "sent": sent, "pending": pending, "failed": failed},
        "metrics": {
            "fired": m.fired.load(Ordering::Relaxed),
            "sent": m.sent.load(Ordering::Relaxed),
            "failed": m.failed.load(Ordering::Relaxed),
            "retries": m.retries.load(Ordering::Relaxed),
            "pending": m.pending.load(Ordering::Relaxed),
        },
        "data": data,
    });
    Ok(json_response(StatusCode::OK, &body))
}
