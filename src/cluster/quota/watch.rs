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

use super::pump::Shared;
use super::rebuild::META;
use super::{DOWN, READY, REBUILDING};
use crate::cluster::Cluster;

/// How often Redis is checked.
const EVERY: Duration = Duration::from_millis(200);
/// Held by the replica that rebuilds the counters.
const LOCK: &str = "gm:rebuild:lock";

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
                let (c, q) = (&self.cluster, &self.shared.quotas);
                crate::cluster::heartbeat::beat(
                    c,
                    &self.shared.redis,
                    &self.shared.live,
                    q.health_name(),
                    self.started,
                )
                .await;
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
        let result = super::rebuild::rebuild(&self.cluster, &self.shared.quotas.money, conn, run_id).await;
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
