//! Quota alerts: when a user's use of a limited monthly quota first reaches a threshold
//! (`alerts.thresholds`, percent), one alert per channel (webhook, email), exactly once per
//! user, quota, threshold and month.
//!
//! - Detection ([`Alerts::detect`]) runs on the settle path after a record updated the
//!   counters: for each limited quota the record added to, a few integer comparisons against
//!   the thresholds, and a look-up in the in-memory set of thresholds already fired (loaded from
//!   storage at start). It allocates only when an alert fires.
//! - The alerts ride with their record to the recorder, which writes the fired marks and one
//!   outbox entry per channel in the same atomic batch as the record (see
//!   [`crate::ledger::alerts`]). After a crash, an alert is on disk exactly when the usage that
//!   crossed the line is; if both were lost, the reloaded counters are below the line again and
//!   the next crossing fires it. The request whose record fired an alert holds its end (bounded
//!   by [`ON_DISK_WAIT`], without blocking a thread: see `crate::settle`) until that batch is
//!   flushed, so a client that saw the crossing call succeed can count on the alert even after
//!   a `kill -9`.
//! - Delivery ([`spawn_delivery`]) is a background task that sends only what is on disk (first
//!   attempt a second after the alert), deletes an outbox entry once the receiver accepted it,
//!   and retries the rest with exponential backoff (1 s doubling to 5 min) across restarts,
//!   until success or a day after the alert. No request ever waits for a receiver.

mod deliver;
mod email;
mod failure;
mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use rust_decimal::Decimal;
use tokio::sync::Notify;

pub use deliver::{Gateway, backoff, spawn_delivery};
pub use email::render as email_text;
pub use webhook::signature;

use crate::clock::{Clock, Month};
use crate::config::Tier;
use crate::identity::{Registry, User};
use crate::ledger::alerts::{Alert, Channel, Quota};
use crate::ledger::{Record, SledStore, StoreError};
use crate::runtime::{EnvLookup, Runtime};

/// Counters of the alert pipeline, for the admin listing and `/metrics`.
#[derive(Debug, Default)]
pub struct AlertMetrics {
    /// Alerts fired since start (one per user, quota, threshold and month).
    pub fired: AtomicU64,
    /// Deliveries accepted by their receiver since start.
    pub sent: AtomicU64,
    /// Deliveries given up since start (a day passed, or they can never succeed).
    pub failed: AtomicU64,
    /// Failed attempts since start (each is retried later).
    pub retries: AtomicU64,
    /// Deliveries in the outbox as of the delivery task's last look (a gauge).
    pub pending: AtomicU64,
}

/// Thresholds already fired for one user in one month: one bit per percent, per quota.
#[derive(Debug, Clone, Copy)]
struct Fired {
    month: Month,
    user_created: i64,
    bits: [u128; 4],
}

/// The alert state of a running gateway: what fired, metrics, and the delivery task's wake-up.
pub struct Alerts {
    fired: DashMap<Arc<str>, Fired>,
    /// Counters of the pipeline.
    pub metrics: Arc<AlertMetrics>,
    wake: Arc<Notify>,
    env: EnvLookup,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("users_fired", &self.fired.len())
            .finish_non_exhaustive()
    }
}

/// A monthly limit and this month's use of it.
#[derive(Clone, Copy)]
enum Level {
    Whole { used: u64, limit: u64 },
    Money { used: Decimal, limit: Decimal },
}

impl Level {
    /// True when `used` is at least `percent` % of `limit`.
    fn reached(self, percent: u8) -> bool {
        match self {
            Level::Whole { used, limit } => u128::from(used) * 100 >= u128::from(percent) * u128::from(limit),
            Level::Money { used, limit } => match (
                used.checked_mul(Decimal::ONE_HUNDRED),
                limit.checked_mul(Decimal::from(percent)),
            ) {
                (Some(u), Some(l)) => u >= l,
                // Only amounts near Decimal's range overflow; such a use is past any limit.
                _ => true,
            },
        }
    }

    fn amounts(self) -> (Decimal, Decimal) {
        match self {
            Level::Whole { used, limit } => (Decimal::from(used), Decimal::from(limit)),
            Level::Money { used, limit } => (used, limit),
        }
    }
}

impl Alerts {
    /// Empty state; env var look-ups (webhook secret, SMTP credentials) go through `env`.
    pub fn new(env: EnvLookup) -> Self {
        Alerts {
            fired: DashMap::new(),
            metrics: Arc::new(AlertMetrics::default()),
            wake: Arc::new(Notify::new()),
            env,
        }
    }

    /// Loads the thresholds fired in `month` from storage (at start). Marks of a user that was
    /// deleted since (or re-created under the same id) are left out.
    pub fn load(&self, store: &SledStore, registry: &Registry, month: Month) -> Result<(), StoreError> {
        for a in store.alerts(month, None)? {
            let Some(user) = registry.user(&a.user_id) else {
                continue;
            };
            let created = user.created_unix();
            if created != a.user_created {
                continue;
            }
            let mut e = self.fired.entry(user.id_arc()).or_insert(Fired {
                month,
                user_created: created,
                bits: [0; 4],
            });
            e.bits[a.quota.index()] |= 1u128 << a.threshold;
        }
        Ok(())
    }

    /// Forgets the thresholds a deleted user reached (call once the registry marked them
    /// deleted; the store erases their marks): the same id created again is alerted afresh.
    pub fn forget(&self, user_id: &str) {
        self.fired.remove(user_id);
    }

    /// Pending deliveries are on disk: the delivery task looks now rather than at its next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The env var look-up of the gateway.
    pub fn env(&self) -> &EnvLookup {
        &self.env
    }

    /// The thresholds `rec` made `user` reach for the first time this month, as alerts to write
    /// with it; empty (no allocation) in the common case. Call after the record was added to the
    /// user's counters. Each (user, quota, threshold, month) is returned once per process; the
    /// store keeps it once on disk.
    ///
    /// Nothing is detected while no channel is configured, or for a user no channel reaches
    /// (only email configured, and the user has none): once one is, a user already past a
    /// threshold is alerted on their next use of that quota.
    pub fn detect(
        &self,
        rt: &Runtime,
        registry: &Registry,
        user: &User,
        rec: &Record,
        clock: &dyn Clock,
        pending: bool,
    ) -> Vec<Alert> {
        let cfg = &rt.config.alerts;
        let Some(&lowest) = cfg.thresholds.first() else {
            return Vec::new();
        };
        if user.is_deleted() {
            // A request that outlived its user: its record is dropped, and so are its alerts.
            return Vec::new();
        }
        let touched = [
            rec.messages > 0,
            rec.tokens > 0,
            rec.bytes > 0,
            rec.cost > Decimal::ZERO,
        ];
        if !touched.contains(&true) {
            return Vec::new();
        }
        let webhook = cfg.webhook_url.is_some();
        let email = cfg.smtp.is_some() && user.has_email();
        if !webhook && !email {
            return Vec::new();
        }
        let Some(tr) = rt.tier_by_id(user.tier_id()) else {
            return Vec::new();
        };
        let (tier, tier_name) = (&tr.tier, &tr.name);
        let month = rec.month();
        let mut after = user.usage.snapshot(month);
        if pending {
            // Cluster mode: the counters mirror Redis, which has not seen this record yet.
            after.add(&crate::ledger::Totals::of(rec));
        }
        let mut out = Vec::new();
        for q in Quota::ALL {
            if !touched[q.index()] {
                continue;
            }
            let Some(level) = level(q, tier, &after) else { continue };
            if !level.reached(lowest) {
                continue;
            }
            let mut want = 0u128;
            for &t in &cfg.thresholds {
                if level.reached(t) {
                    want |= 1u128 << t;
                }
            }
            let new = self.mark(user, month, q, want);
            if new == 0 {
                continue;
            }
            let (used, limit) = level.amounts();
            let user_created = user.created_unix();
            // The address is kept in storage only; a crossing is rare enough to read it there.
            let address = if email { registry.email(user) } else { None };
            let at = clock.now();
            for &t in &cfg.thresholds {
                if new & (1u128 << t) == 0 {
                    continue;
                }
                let mut channels = Vec::with_capacity(2);
                if webhook {
                    channels.push(Channel::Webhook);
                }
                if email {
                    channels.push(Channel::Email);
                }
                tracing::info!(user = %user.id(), quota = q.as_str(), threshold = t, %used, %limit, "quota alert");
                self.metrics.fired.fetch_add(1, Ordering::Relaxed);
                out.push(Alert {
                    id: Alert::make_id(user.id(), user_created, month, q, t),
                    user_id: user.id_arc(),
                    user_created,
                    tier: tier_name.to_string(),
                    quota: q,
                    threshold: t,
                    used,
                    limit,
                    month,
                    at,
                    record_id: rec.id,
                    email: address.clone(),
                    channels,
                });
            }
        }
        out
    }

    /// Marks the thresholds in `want` as fired and returns those that were not yet.
    fn mark(&self, user: &User, month: Month, q: Quota, want: u128) -> u128 {
        let created = user.created_unix();
        let i = q.index();
        // Read lock first: a user past a threshold keeps hitting it, and it is fired already.
        if let Some(f) = self.fired.get(user.id())
            && f.month == month
            && f.user_created == created
            && want & !f.bits[i] == 0
        {
            return 0;
        }
        let entry = self.fired.entry(user.id_arc());
        if user.is_deleted() {
            // Checked under the entry's lock, which `forget` takes too: a user deleted
            // meanwhile leaves no mark behind for the next user of the id.
            return 0;
        }
        let mut e = entry.or_insert(Fired {
            month,
            user_created: created,
            bits: [0; 4],
        });
        if e.month != month || e.user_created != created {
            if e.month > month && e.user_created == created {
                // A late record of a month already over: its alerts are not sent any more.
                return 0;
            }
            *e = Fired {
                month,
                user_created: created,
                bits: [0; 4],
            };
        }
        let new = want & !e.bits[i];
        e.bits[i] |= want;
        new
    }
}

/// Longest a request waits for its crossing record to reach the disk.
pub const ON_DISK_WAIT: Duration = Duration::from_secs(1);

/// The tier's limit of `q` and the use of it in `t`; `None` when the tier leaves it unlimited.
fn level(q: Quota, tier: &Tier, t: &crate::ledger::Totals) -> Option<Level> {
    match q {
        Quota::Messages => tier.messages.map(|limit| Level::Whole {
            used: t.messages,
            limit,
        }),
        Quota::Tokens => tier.tokens.map(|limit| Level::Whole { used: t.tokens, limit }),
        Quota::Bytes => tier.bytes.map(|limit| Level::Whole { used: t.bytes, limit }),
        Quota::Cost => tier.cost.map(|limit| Level::Money { used: t.cost, limit }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_reached_exactly() {
        let l = Level::Whole { used: 8, limit: 10 };
        assert!(l.reached(80));
        assert!(!l.reached(81));
        let l = Level::Whole { used: 9, limit: 10 };
        assert!(!l.reached(95), "9.5 messages are not 9");
        assert!(
            Level::Whole { used: 0, limit: 0 }.reached(100),
            "a zero limit is reached at once"
        );
        assert!(
            Level::Whole {
                used: u64::MAX,
                limit: u64::MAX
            }
            .reached(100),
            "no overflow"
        );
        let m = |u: &str, l: &str| Level::Money {
            used: u.parse().unwrap(),
            limit: l.parse().unwrap(),
        };
        assert!(m("4.00", "5.00").reached(80));
        assert!(!m("3.99999999", "5.00").reached(80));
        assert!(m("0.00000095", "0.000001").reached(95));
    }
}
