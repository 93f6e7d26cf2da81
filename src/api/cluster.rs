//! `GET /admin/cluster`: the replicas that sent a heartbeat in the last seconds (their version,
//! config hash, shipping backlog and view of the engines), and this replica's own view of Redis
//! and PostgreSQL.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::app::App;
use crate::body::ProxyBody;
use crate::cluster::Cluster;
use crate::cluster::quota::watch::{REPLICAS, heartbeat_key};
use crate::error::{ApiError, json_response};

/// The cluster status (404 outside cluster mode).
pub async fn status(app: &Arc<App>) -> Result<Response<ProxyBody>, ApiError> {
    let Some(c) = &app.cluster else {
        return Err(ApiError::not_found(
            "Cluster mode is off: this gateway runs alone on its embedded store.",
        ));
    };
    c.check_postgres().await;
    let replicas = match replicas(c).await {
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

/// Every live replica's heartbeat; replicas whose heartbeat expired leave the set.
async fn replicas(c: &Cluster) -> Result<Vec<Value>, redis::RedisError> {
    let mut conn = c.redis.clone();
    let names: Vec<String> = redis::cmd("SMEMBERS").arg(REPLICAS).query_async(&mut conn).await?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(heartbeat_key(&name))
            .query_async(&mut conn)
            .await?;
        if h.is_empty() {
            let _: i64 = redis::cmd("SREM")
                .arg(REPLICAS)
                .arg(&name)
                .query_async(&mut conn)
                .await?;
            continue;
        }
        let get = |k: &str| h.get(k).cloned().unwrap_or_default();
        out.push(json!({
            "replica": name,
            "this": name == *c.replica,
            "version": get("version"),
            "config_hash": get("config_hash"),
            "started_at": get("started_at"),
            "seen_at": get("seen_at"),
            "shipping_backlog": get("shipping_backlog").parse::<u64>().unwrap_or(0),
            "redis": get("redis"),
            "postgres": get("postgres"),
        }));
    }
    out.sort_by(|a, b| a["replica"].as_str().cmp(&b["replica"].as_str()));
    Ok(out)
}
