//! `GET /admin/cluster`: the replicas that sent a heartbeat in the last seconds (their version,
//! config hash, shipping backlog and view of the engines), and this replica's own view of Redis
//! and PostgreSQL.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::json;

use crate::app::App;
use crate::body::ProxyBody;
use crate::error::{ApiError, json_response};

/// The cluster status (404 outside cluster mode).
pub async fn status(app: &Arc<App>) -> Result<Response<ProxyBody>, ApiError> {
    let Some(c) = &app.cluster else {
        return Err(ApiError::not_found(
            "Cluster mode is off: this gateway runs alone on its embedded store.",
        ));
    };
    c.check_postgres().await;
    let replicas = match crate::cluster::heartbeat::live(c).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cluster status: Redis unreachable");
            Vec::new()
        }
    };
    let hashes: std::collections::BTreeSet<&str> = replicas.iter().filter_map(|r| r["config_hash"].as_str()).collect();
    let v = json!({
        "mode": "cluster",
        "replica": &*c.replica,
        "redis": {"status": c.quotas.health_name()},
        "postgres": {"status": if c.postgres_ok() { "ok" } else { "down" }},
        "shipping_backlog": c.shipping_backlog(),
        "config_hashes_differ": hashes.len() > 1,
        "replicas": replicas,
    });
    Ok(json_response(StatusCode::OK, &v))
}
