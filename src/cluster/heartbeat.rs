//! Heartbeats: each replica writes one to Redis every second (version, config hash, shipping
//! backlog, its view of the engines), kept 5 s; the cluster status reads the live ones.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use super::Cluster;
use crate::runtime::Live;

/// How long a heartbeat stays visible.
const HEARTBEAT_TTL_SECS: u64 = 5;
/// The set of replicas that sent a heartbeat.
const REPLICAS: &str = "gm:replicas";

/// The key of a replica's heartbeat.
fn heartbeat_key(replica: &str) -> String {
    format!("gm:replica:{replica}")
}

/// Writes this replica's heartbeat (and checks PostgreSQL, whose health it reports), with
/// `redis_health` as the counters see it.
pub async fn beat(
    c: &Cluster,
    redis: &ConnectionManager,
    live: &Arc<Live>,
    redis_health: &str,
    started: DateTime<Utc>,
) {
    c.check_postgres().await;
    let key = heartbeat_key(&c.replica);
    let mut pipe = redis::pipe();
    pipe.cmd("HSET")
        .arg(&key)
        .arg("version")
        .arg(env!("CARGO_PKG_VERSION"))
        .arg("config_hash")
        .arg(live.config_hash())
        .arg("started_at")
        .arg(crate::clock::rfc3339(started))
        .arg("seen_at")
        .arg(crate::clock::rfc3339(Utc::now()))
        .arg("shipping_backlog")
        .arg(c.shipping_backlog())
        .arg("postgres")
        .arg(if c.postgres_ok() { "ok" } else { "down" })
        .arg("redis")
        .arg(redis_health)
        .ignore();
    pipe.cmd("EXPIRE").arg(&key).arg(HEARTBEAT_TTL_SECS).ignore();
    pipe.cmd("SADD").arg(REPLICAS).arg(&*c.replica).ignore();
    let mut conn = redis.clone();
    let _: Result<(), _> = pipe.query_async(&mut conn).await;
}

/// Every live replica's heartbeat; replicas whose heartbeat expired leave the set.
pub async fn live(c: &Cluster) -> Result<Vec<Value>, redis::RedisError> {
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
