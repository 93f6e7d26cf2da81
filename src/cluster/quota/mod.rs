//! The shared counters in Redis: one atomic script per admission (rate limits, every limited
//! quota of the tier, and the reservation, keyed by its id so a retry after a lost reply counts
//! once) and one idempotent script per settlement (see [`pump`]). Every key of a user carries
//! the hash tag `{user}`, so all a script touches is in one slot and Redis Cluster works.
//!
//! Keys: `gm:q:{u}:YYYYMM` the month's counters (`m t b c` used, `rt rc` reserved; a new month
//! is a new key, so there is no reset job), `gm:r:{u}:<id>` one reservation, `gm:rz:{u}` open
//! reservations by deadline, `gm:rl:{u}:<key id>` a key's requests-per-minute cell,
//! `gm:tpm:{u}` the user's tokens-per-minute cell, `gm:w:{u}` per replica, the last record
//! settled.

pub mod money;
pub mod pump;
pub mod rebuild;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use redis::Script;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::admission::{
    Admitted, Ask, RateLimit, Refusal, Remote, Reservation, Tiers, check_model, refusal_of, tier_of,
};
use crate::clock::Month;
use crate::identity::{KeyEntry, Registry, User};
use crate::ledger::{Held, Quota, Reserved, Settled, Totals};
pub use money::Money;

/// How long a reservation may stay unsettled before Redis gives it back (its replica is
/// presumed gone): longer than any request.
pub const RESERVATION_TTL_MS: u64 = 2 * 3600 * 1000;
/// How long a month's counters are kept after their last change.
pub const MONTH_TTL_SECS: u64 = 40 * 86400;

/// Admission may run: the counters are there and current.
const READY: u8 = 0;
/// Redis cannot be reached.
const DOWN: u8 = 1;
/// Redis restarted or failed over: the counters are being rebuilt from the ledger.
const REBUILDING: u8 = 2;

/// Cluster mode's counters: the scripts, the unit money is counted in, whether Redis is usable,
/// and the queue of settlements.
pub struct Quotas {
    /// The unit of money in Redis.
    pub money: Money,
    /// This replica's name (kept across restarts: it keys its settled watermark).
    pub replica: Arc<str>,
    admit: Script,
    settle: Script,
    health: AtomicU8,
    seq: AtomicU64,
    pump: UnboundedSender<Vec<Settled>>,
    pump_rx: std::sync::Mutex<Option<UnboundedReceiver<Vec<Settled>>>>,
    /// Redis round trips made by admissions (for the metrics and the load tool).
    pub admit_trips: AtomicU64,
    /// Redis round trips made by the settlement pump (pipelines).
    pub settle_trips: AtomicU64,
    /// Settlements applied to Redis.
    pub settled: AtomicU64,
    /// Whether the settlement script is loaded in Redis (as far as the pump knows).
    settle_loaded: std::sync::atomic::AtomicBool,
    /// The Redis `run_id` the counters were last found good under.
    run_id: parking_lot::Mutex<Option<String>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// The Redis key of `user`'s counters for `month`.
pub fn q_key(user: &str, month: Month) -> String {
    format!("gm:q:{{{user}}}:{}", month.0)
}

fn r_key(user: &str, res: &str) -> String {
    format!("gm:r:{{{user}}}:{res}")
}

fn rz_key(user: &str) -> String {
    format!("gm:rz:{{{user}}}")
}

fn w_key(user: &str) -> String {
    format!("gm:w:{{{user}}}")
}

fn tpm_key(user: &str) -> String {
    format!("gm:tpm:{{{user}}}")
}

fn limit(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// The reply of the admission script.
struct AdmitReply {
    status: i64,
    why: String,
    cap: i64,
    used: [i64; 4],
    reserved: [i64; 2],
    retry_ms: i64,
    held: [i64; 2],
}

impl redis::FromRedisValue for AdmitReply {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        let (status, why, cap, m, t, b, c, rt, rc, retry_ms, ht, hc): (
            i64,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = redis::FromRedisValue::from_redis_value(v)?;
        Ok(AdmitReply {
            status,
            why,
            cap,
            used: [m, t, b, c],
            reserved: [rt, rc],
            retry_ms,
            held: [ht, hc],
        })
    }
}

impl Quotas {
    /// The counters of replica `replica`, counting money in `money`.
    pub fn new(replica: Arc<str>, money: Money) -> Arc<Self> {
        let (tx, rx) = unbounded_channel();
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Arc::new(Quotas {
            money,
            replica,
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            health: AtomicU8::new(REBUILDING),
            seq: AtomicU64::new(u64::from_le_bytes(b) >> 1),
            pump: tx,
            pump_rx: std::sync::Mutex::new(Some(rx)),
            admit_trips: AtomicU64::new(0),
            settle_trips: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            run_id: parking_lot::Mutex::new(None),
            settle_loaded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The settlement queue (the recorder's sink and dropped reservations feed it).
    pub fn pump(&self) -> UnboundedSender<Vec<Settled>> {
        self.pump.clone()
    }

    fn take_pump_rx(&self) -> Option<UnboundedReceiver<Vec<Settled>>> {
        self.pump_rx.lock().ok()?.take()
    }

    /// The Redis `run_id` the counters are good under.
    pub fn known_run_id(&self) -> Option<String> {
        self.run_id.lock().clone()
    }

    fn set_known_run_id(&self, id: String) {
        *self.run_id.lock() = Some(id);
    }

    /// Whether Redis still runs under the `run_id` the counters were built for (asked before a
    /// retry: a Redis restarted empty must not take a reservation before it is rebuilt).
    async fn same_redis(&self, redis: &redis::aio::ConnectionManager) -> bool {
        let mut conn = redis.clone();
        match watch::run_id(&mut conn).await {
            Ok(id) => self.known_run_id().as_deref() == Some(id.as_str()),
            Err(_) => false,
        }
    }

    /// Waits a little for a Redis found down to be checked again by the watcher (a dropped
    /// connection is back within a few hundred ms); true once admission may run.
    async fn ready_soon(&self) -> bool {
        for _ in 0..50 {
            if self.ready() {
                return true;
            }
            if self.health.load(Ordering::Acquire) != DOWN {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.ready()
    }

    /// True while admission may run.
    pub fn ready(&self) -> bool {
        self.health.load(Ordering::Acquire) == READY
    }

    /// `ok`, `down` or `rebuilding`, for the status page.
    pub fn health_name(&self) -> &'static str {
        match self.health.load(Ordering::Acquire) {
            READY => "ok",
            DOWN => "down",
            _ => "rebuilding",
        }
    }

    fn set_health(&self, h: u8) {
        let old = self.health.swap(h, Ordering::AcqRel);
        if old != h {
            let name = self.health_name();
            match h {
                READY => tracing::info!(redis = name, "cluster counters usable: admission resumes"),
                _ => tracing::warn!(redis = name, "cluster counters unusable: new metered requests get 503"),
            }
        }
    }

    /// Redis failed on a request's path: admission stops until the watcher has checked it.
    pub fn suspect(&self) {
        let _ = self
            .health
            .compare_exchange(READY, DOWN, Ordering::AcqRel, Ordering::Acquire);
        tracing::warn!("Redis failed during admission or settlement; checking it");
    }

    /// Appends the counters' metrics (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let up = u64::from(self.ready());
        for (name, kind, help, v) in [
            (
                "gm_cluster_redis_ready",
                "gauge",
                "1 while the shared counters in Redis are usable.",
                up,
            ),
            (
                "gm_cluster_admission_round_trips_total",
                "counter",
                "Redis round trips made by admissions.",
                load(&self.admit_trips),
            ),
            (
                "gm_cluster_settlement_round_trips_total",
                "counter",
                "Redis round trips (pipelines) made by the settlement pump.",
                load(&self.settle_trips),
            ),
            (
                "gm_cluster_settlements_total",
                "counter",
                "Records settled in Redis.",
                load(&self.settled),
            ),
        ] {
            crate::metrics::series(out, name, kind, help, v);
        }
    }

    fn next_res_id(&self) -> String {
        format!("{}.{:x}", self.replica, self.seq.fetch_add(1, Ordering::Relaxed))
    }
}

/// What one admission asks Redis.
struct Plan<'a> {
    mode: &'static str,
    ask: &'a Ask<'a>,
}

impl Quotas {
    /// Admission in cluster mode: the model allow-list here, then rate limits, quotas and the
    /// reservation in one script. Refuses with 503 (never admits unreserved) while Redis is
    /// unusable.
    pub async fn admit(
        &self,
        redis: &redis::aio::ConnectionManager,
        tiers: &Tiers,
        registry: &Arc<Registry>,
        key: KeyEntry,
        ask: &Ask<'_>,
        now: DateTime<Utc>,
    ) -> Result<Admitted, Refusal> {
        let (user, tr) = tier_of(tiers, registry, key)?;
        check_model(tr, ask)?;
        let month = Month::of(now);
        let mode = match ask {
            Ask::Generate { .. } => "gen",
            Ask::UploadStart { .. } => "upstart",
            Ask::UploadBytes => "upbytes",
            Ask::Billed { .. } => "billed",
            Ask::Other { .. } => "other",
        };
        if mode == "other" && tr.tier.requests_per_minute.is_none() {
            // Nothing shared to check: no round trip.
            let (t, r) = user.usage.snapshot_reserved(month);
            return Ok(admitted(month, now, None, Some((user.tier_id(), t, r)), None));
        }
        if !self.ready_soon().await {
            return Err(Refusal::StoreUnavailable { retry_secs: 1 });
        }
        let res = self.next_res_id();
        let reply = self
            .call_admit(redis, user, registry, key, tr, &Plan { mode, ask }, &res, month)
            .await?;
        self.admitted(registry, key, user, tr, ask, month, now, res, reply)
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_admit(
        &self,
        redis: &redis::aio::ConnectionManager,
        user: &User,
        registry: &Registry,
        key: KeyEntry,
        tr: &crate::admission::TierRuntime,
        plan: &Plan<'_>,
        res: &str,
        month: Month,
    ) -> Result<AdmitReply, Refusal> {
        let tier = &tr.tier;
        let uid = user.id();
        let mut inv = self.admit.prepare_invoke();
        inv.key(q_key(uid, month))
            .key(r_key(uid, res))
            .key(rz_key(uid))
            .key(format!("gm:rl:{{{uid}}}:{}", registry.key_id(key)))
            .key(tpm_key(uid));
        let m = &self.money;
        inv.arg(plan.mode)
            .arg(limit(tier.messages))
            .arg(limit(tier.tokens))
            .arg(limit(tier.bytes))
            .arg(tier.cost.map_or(-1, |c| m.units(c)))
            .arg(i64::from(tier.hard_budget()));
        match plan.ask {
            Ask::Generate { worst: Some(w), .. } => inv
                .arg(limit(Some(w.prompt)))
                .arg(limit(w.cap))
                .arg(m.units(w.base))
                .arg(m.units(w.per_output))
                .arg(limit(Some(w.candidates)))
                .arg(limit(Some(tier.min_output_tokens))),
            _ => inv.arg(-1).arg(-1).arg(0).arg(0).arg(1).arg(0),
        };
        let declared = match plan.ask {
            Ask::UploadStart { declared } => limit(Some(declared.unwrap_or(0))),
            _ => 0,
        };
        inv.arg(declared)
            .arg(tier.requests_per_minute.map_or(0, |r| r.get()))
            .arg(limit(tier.tokens_per_minute).max(0))
            .arg(RESERVATION_TTL_MS)
            .arg(MONTH_TTL_SECS)
            .arg(res);
        // A reply lost on the way (the connection dropped after the script ran) is asked again
        // with the same reservation id: the script answers the stored verdict, counted once.
        let mut last = None;
        for pause in [0u64, 20, 100, 300] {
            if pause > 0 {
                // The connection manager reconnects in the background meanwhile; the retry
                // goes only to the same Redis (one restarted empty is rebuilt first).
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                if !self.same_redis(redis).await {
                    continue;
                }
            }
            self.admit_trips.fetch_add(1, Ordering::Relaxed);
            let mut conn = redis.clone();
            match inv.invoke_async::<AdmitReply>(&mut conn).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => last = Some(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = last {
            tracing::warn!(error = %e, "admission script failed");
        }
        self.suspect();
        Err(Refusal::StoreUnavailable { retry_secs: 1 })
    }

    #[allow(clippy::too_many_arguments)]
    fn admitted(
        &self,
        registry: &Arc<Registry>,
        key: KeyEntry,
        user: &User,
        tr: &crate::admission::TierRuntime,
        ask: &Ask<'_>,
        month: Month,
        now: DateTime<Utc>,
        res: String,
        reply: AdmitReply,
    ) -> Result<Admitted, Refusal> {
        let (used, reserved) = self.mirror(user, month, &reply.used, &reply.reserved);
        match reply.status {
            1 => {}
            2 => {
                let limit = if reply.why == "tpm" {
                    RateLimit::TokensPerMinute
                } else {
                    RateLimit::RequestsPerMinute
                };
                let secs = u64::try_from(reply.retry_ms.max(0)).unwrap_or(0).div_ceil(1000);
                return Err(Refusal::RateLimited {
                    limit,
                    retry_secs: secs.max(1),
                });
            }
            _ => {
                let quota = Quota::parse(&reply.why).unwrap_or(Quota::Messages);
                return Err(refusal_of(tr, quota, &used, month));
            }
        }
        let reservation = matches!(ask, Ask::Generate { .. }).then(|| {
            let held = Held {
                message: true,
                tokens: u64::try_from(reply.held[0]).unwrap_or(0),
                cost: self.money.decimal(reply.held[1]),
            };
            let tpm_charged = if tr.tier.tokens_per_minute.is_some() {
                held.tokens
            } else {
                0
            };
            let remote = Remote {
                id: Arc::from(res),
                user: user.id_arc(),
                pump: self.pump.clone(),
            };
            Reservation::remote(registry.clone(), key, month, held, tpm_charged, remote)
        });
        let hard = matches!(ask, Ask::Generate { worst: Some(_), .. }) && tr.tier.hard_budget();
        let output_cap = (hard && reply.cap >= 0).then(|| u64::try_from(reply.cap).unwrap_or(0));
        let quota = Some((user.tier_id(), used, reserved));
        Ok(admitted(month, now, reservation, quota, output_cap))
    }

    /// Reads `user`'s counters of `month` from Redis into the local ones (what
    /// `/api/usage/current` shows in cluster mode: every replica's usage, not this one's view).
    pub async fn refresh(&self, redis: &redis::aio::ConnectionManager, user: &User, month: Month) -> bool {
        let mut conn = redis.clone();
        let got: Result<Vec<Option<i64>>, _> = redis::cmd("HMGET")
            .arg(q_key(user.id(), month))
            .arg(&["m", "t", "b", "c", "rt", "rc"])
            .query_async(&mut conn)
            .await;
        match got {
            Ok(v) if v.len() == 6 => {
                let f = |i: usize| v.get(i).copied().flatten().unwrap_or(0);
                self.mirror(user, month, &[f(0), f(1), f(2), f(3)], &[f(4), f(5)]);
                true
            }
            _ => false,
        }
    }

    /// Forgets a deleted user's counters of `month` and their watermarks (best effort: with
    /// Redis down they stay until it is rebuilt, which no longer finds the user's records).
    pub async fn forget_user(&self, redis: &redis::aio::ConnectionManager, user: &str, month: Month) {
        let mut conn = redis.clone();
        let keys = [q_key(user, month), w_key(user), rz_key(user), tpm_key(user)];
        let r: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "a deleted user's counters stay in Redis until it is rebuilt");
        }
    }

    /// Sets `user`'s local counters to what Redis answered; returns them.
    fn mirror(&self, user: &User, month: Month, used: &[i64; 4], reserved: &[i64; 2]) -> (Totals, Reserved) {
        let mut t = user.usage.snapshot(month);
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        t.messages = n(used[0]);
        t.tokens = n(used[1]);
        t.bytes = n(used[2]);
        t.cost = self.money.decimal(used[3]);
        let r = Reserved {
            tokens: n(reserved[0]),
            cost: self.money.decimal(reserved[1]),
        };
        user.usage.mirror(month, &t, r);
        (t, r)
    }
}

fn admitted(
    month: Month,
    at: DateTime<Utc>,
    reservation: Option<Reservation>,
    quota: Option<(crate::config::TierId, Totals, Reserved)>,
    output_cap: Option<u64>,
) -> Admitted {
    Admitted {
        month,
        at,
        reservation,
        quota,
        output_cap,
        capped: None,
    }
}
