//! The watcher: whether Redis is usable, and what to do when it is back. Every 200 ms it asks
//! Redis its `run_id`. Unreachable: admission refuses (503). A `run_id` the counters were not
//! built for (Redis restarted empty, or failed over to a replica that may have lost recent
//! writes): admission pauses, one replica rebuilds this month's counters from the ledger in
//! PostgreSQL, and every replica applies again what of its own record log PostgreSQL does not
//! have yet, before admitting again. Every second it writes this replica's heartbeat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use redis::aio::ConnectionManager;

use super::pump::{Shared, applied_key};
use super::{DOWN, MONTH_TTL_SECS, READY, REBUILDING, q_key, w_key};
use crate::clock::Month;
use crate::cluster::Cluster;

/// How often Redis is checked.
const EVERY: Duration = Duration::from_millis(200);
/// How long a heartbeat stays visible.
const HEARTBEAT_TTL_SECS: u64 = 5;
/// The set of replicas that sent a heartbeat.
pub const REPLICAS: &str = "gm:replicas";
/// What the counters were built for: `run_id` and a generation.
const META: &str = "gm:meta";
const LOCK: &str = "gm:rebuild:lock";

/// The key of a replica's heartbeat.
pub fn heartbeat_key(replica: &str) -> String {
    format!("gm:replica:{replica}")
}

/// The watcher's task.
pub struct Watcher {
    pub(super) shared: Arc<Shared>,
    pub(super) cluster: Arc<Cluster>,
    started: chrono::DateTime<Utc>,
}

impl Watcher {
    /// A watcher for `cluster`.
    pub fn new(shared: Arc<Shared>, cluster: Arc<Cluster>) -> Self {
        Watcher {
            shared,
            cluster,
            started: Utc::now(),
        }
    }

    /// Runs forever.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = Instant::now() - Duration::from_secs(10);
        loop {
            tick.tick().await;
            self.check().await;
            // Down: checked again soon, so a dropped connection costs little.
            for _ in 0..3 {
                if self.shared.quotas.ready() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.check().await;
            }
            if beat.elapsed() >= Duration::from_secs(1) {
                beat = Instant::now();
                self.heartbeat().await;
            }
        }
    }

    async fn check(&mut self) {
        let q = &self.shared.quotas;
        let mut conn = self.shared.redis.clone();
        let run_id = match run_id(&mut conn).await {
            Ok(r) => r,
            Err(e) => {
                if q.ready() {
                    tracing::warn!(error = %e, "Redis unreachable");
                }
                q.set_health(DOWN);
                return;
            }
        };
        if q.known_run_id().as_deref() == Some(run_id.as_str()) {
            q.set_health(READY);
            return;
        }
        q.set_health(REBUILDING);
        let built: Option<String> = match redis::cmd("HGET").arg(META).arg("run_id").query_async(&mut conn).await {
            Ok(b) => b,
            Err(_) => return,
        };
        if built.as_deref() != Some(run_id.as_str()) && !self.rebuild_as_leader(&mut conn, &run_id).await {
            return;
        }
        // This replica's records PostgreSQL does not have (or that Redis settled before it
        // was lost) go in again before anything is admitted.
        if let Err(e) = self.shared.replay_log().await {
            tracing::warn!(error = %e, "replaying the record log into Redis failed; retried");
            return;
        }
        q.set_known_run_id(run_id);
        q.set_health(READY);
    }

    /// Rebuilds the counters if this replica wins the lock; false while not rebuilt.
    async fn rebuild_as_leader(&self, conn: &mut ConnectionManager, run_id: &str) -> bool {
        let replica = &*self.shared.quotas.replica;
        let got: Option<String> = redis::cmd("SET")
            .arg(LOCK)
            .arg(replica)
            .arg("NX")
            .arg("PX")
            .arg(60_000)
            .query_async(conn)
            .await
            .unwrap_or(None);
        if got.is_none() {
            return false;
        }
        tracing::warn!(
            "Redis does not hold counters built for its run id (restarted empty or failed over): rebuilding this month's from the ledger"
        );
        let result = self.rebuild(conn, run_id).await;
        let _: Result<i64, _> = redis::cmd("DEL").arg(LOCK).query_async(conn).await;
        match result {
            Ok(users) => {
                tracing::info!(users, "counters rebuilt from the ledger");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding the counters failed (admission stays paused; retried)");
                false
            }
        }
    }

    /// This month's counters from PostgreSQL, and per user and replica the last record id it
    /// holds (the watermarks replays are checked against).
    async fn rebuild(&self, conn: &mut ConnectionManager, run_id: &str) -> Result<usize, String> {
        let month = Month::of(Utc::now());
        let (from, to) = (month.start(), month.next().start());
        let pg = self.cluster.pg.client().await.map_err(|e| e.to_string())?;
        let sums = pg
            .query(
                "SELECT user_id, sum(messages)::bigint, sum(tokens)::bigint, sum(bytes)::bigint, sum(cost)::text
                 FROM gm_usage_records WHERE created_at >= $1 AND created_at < $2 GROUP BY user_id",
                &[&from, &to],
            )
            .await
            .map_err(|e| crate::cluster::pg::describe(&e))?;
        let marks = pg
            .query(
                "SELECT user_id, replica, max(id) FROM gm_usage_records
                 WHERE created_at >= $1 AND created_at < $2 GROUP BY user_id, replica",
                &[&from, &to],
            )
            .await
            .map_err(|e| crate::cluster::pg::describe(&e))?;
        let last = pg
            .query(
                "SELECT replica, max(id) FROM gm_usage_records WHERE created_at >= $1 AND created_at < $2 GROUP BY replica",
                &[&from, &to],
            )
            .await
            .map_err(|e| crate::cluster::pg::describe(&e))?;
        let money = &self.shared.quotas.money;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for row in &sums {
            let (user, m, t, b, c): (String, i64, i64, i64, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let cost = c.parse::<rust_decimal::Decimal>().map_err(|e| e.to_string())?;
            let key = q_key(&user, month);
            pipe.cmd("DEL").arg(&key).ignore();
            pipe.cmd("HSET")
                .arg(&key)
                .arg("m")
                .arg(m)
                .arg("t")
                .arg(t)
                .arg("b")
                .arg(b)
                .arg("c")
                .arg(money.units(cost))
                .ignore();
            pipe.cmd("EXPIRE").arg(&key).arg(MONTH_TTL_SECS).ignore();
        }
        for row in &marks {
            let (user, replica, id): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            pipe.cmd("HSET").arg(w_key(&user)).arg(replica).arg(id).ignore();
        }
        for row in &last {
            let (replica, id): (String, String) = (row.get(0), row.get(1));
            pipe.cmd("SET").arg(applied_key(&replica)).arg(id).ignore();
        }
        let generation = crate::identity::keys::random_base62(8).unwrap_or_default();
        pipe.cmd("HSET")
            .arg(META)
            .arg("run_id")
            .arg(run_id)
            .arg("gen")
            .arg(generation)
            .ignore();
        let () = pipe.query_async(conn).await.map_err(|e| e.to_string())?;
        Ok(sums.len())
    }

    async fn heartbeat(&self) {
        let c = &self.cluster;
        c.check_postgres().await;
        let q = &self.shared.quotas;
        let key = heartbeat_key(&q.replica);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg("version")
            .arg(env!("CARGO_PKG_VERSION"))
            .arg("config_hash")
            .arg(self.shared.live.config_hash())
            .arg("started_at")
            .arg(crate::clock::rfc3339(self.started))
            .arg("seen_at")
            .arg(crate::clock::rfc3339(Utc::now()))
            .arg("shipping_backlog")
            .arg(c.shipping_backlog())
            .arg("postgres")
            .arg(if c.postgres_ok() { "ok" } else { "down" })
            .arg("redis")
            .arg(q.health_name())
            .ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(HEARTBEAT_TTL_SECS).ignore();
        pipe.cmd("SADD").arg(REPLICAS).arg(&*q.replica).ignore();
        let mut conn = self.shared.redis.clone();
        let _: Result<(), _> = pipe.query_async(&mut conn).await;
    }
}

/// Redis's `run_id` (`INFO server`).
pub async fn run_id(conn: &mut ConnectionManager) -> Result<String, redis::RedisError> {
    let info: String = tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("INFO").arg("server").query_async(conn),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "INFO timed out")))??;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_string())
}
