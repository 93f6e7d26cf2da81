//! The delivery task: sends what is in the outbox, and only what is on disk.
//!
//! Each round reads the outbox, then waits for a recorder barrier (every batch applied before
//! it is flushed), so an alert goes out only once its fired mark is durable: a crash can never
//! leave a sent alert whose mark is lost, which would send it again after the restart.
//! A success removes the entry and is flushed at once; a failure is rescheduled with
//! exponential backoff. Sends run concurrently (bounded), each under a timeout, so one slow
//! receiver delays nobody else, and nothing on the request path waits for any of this.
//!
//! Delivery is at least once: if the process dies after a receiver accepted an alert but before
//! the removal reached the disk (a few milliseconds), the alert is sent again after the
//! restart, with the same delivery id, which receivers deduplicate on.
//!
//! In cluster mode each replica that saw a crossing holds its own copy of the alert; before the
//! first send, the copy claims the alert's mark in PostgreSQL and only the claimant delivers
//! (see [`crate::cluster::shared::alerts`]). The others move their copy out of the outbox
//! unsent. PostgreSQL unreachable: the claim is retried later, nothing is sent meanwhile.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use super::email;
use super::failure::Failure;
use super::webhook::{self, WebhookClient};
use super::{AlertMetrics, Alerts};
use crate::clock::SharedClock;
use crate::ledger::alerts::{Channel, Delivery, DeliveryStatus};
use crate::ledger::{RecorderHandle, SledStore};
use crate::runtime::{EnvLookup, Live};

/// Most deliveries in flight at once.
const MAX_IN_FLIGHT: usize = 32;
/// Longest sleep between two looks at the outbox (so a moved clock or a due retry is seen).
const TICK: Duration = Duration::from_secs(1);
/// First retry delay.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest retry delay.
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// How long after the alert a delivery is retried before it is given up.
const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::hours(24);

/// The delay before retry number `attempts` (1 after the first failure): 1 s, 2 s, 4 s, ...
/// capped at 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    BACKOFF_START.saturating_mul(1 << exp).min(BACKOFF_CAP)
}

/// What the delivery task reads of the running gateway.
pub trait Gateway: Send + Sync + 'static {
    /// The recorder (its barrier makes the outbox current).
    fn recorder(&self) -> &RecorderHandle;
    /// The store holding the outbox.
    fn store(&self) -> &SledStore;
    /// The live config (where to deliver).
    fn live(&self) -> &Arc<Live>;
    /// The clock.
    fn clock(&self) -> &SharedClock;
    /// The alert state.
    fn alerts(&self) -> &Alerts;
    /// Cluster mode's engines, whose alert marks decide which replica delivers.
    fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        None
    }
}

/// Starts the delivery task on the current tokio runtime. It holds the gateway only weakly and
/// ends once it is dropped (or when aborted); whatever it had not finished stays in the outbox
/// for the next start.
pub fn spawn_delivery<G: Gateway>(gw: &Arc<G>) -> JoinHandle<()> {
    tokio::spawn(run(Arc::downgrade(gw), gw.alerts().wake.clone()))
}

/// What one attempt needs (not the whole gateway, so that an attempt waiting on a slow
/// receiver does not keep a stopped gateway alive).
#[derive(Clone)]
struct Ctx {
    store: SledStore,
    live: Arc<Live>,
    clock: SharedClock,
    env: EnvLookup,
    metrics: Arc<AlertMetrics>,
    client: WebhookClient,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

async fn run<G: Gateway>(app: Weak<G>, wake: Arc<Notify>) {
    let client = webhook::client();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
    // The first look comes after a barrier too: the recorder may still hold alerts.
    let mut woken = true;
    loop {
        let Some(app) = app.upgrade() else { return };
        if woken && app.recorder().sync().await.is_err() {
            return; // the recorder stopped: the gateway is going down
        }
        let now = app.clock().now();
        let mut next_due: Option<DateTime<Utc>> = None;
        let mut due = Vec::new();
        match app.store().alert_outbox() {
            Ok(entries) => {
                app.alerts()
                    .metrics
                    .pending
                    .store(entries.len() as u64, Ordering::Relaxed);
                for d in entries {
                    if in_flight.values().any(|id| *id == d.id) {
                        continue;
                    }
                    if d.next_attempt_at <= now && in_flight.len() + due.len() < MAX_IN_FLIGHT {
                        due.push(d);
                    } else {
                        next_due = Some(next_due.map_or(d.next_attempt_at, |n| n.min(d.next_attempt_at)));
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "alerts: cannot read the outbox"),
        }
        // Send only what is durable: entries applied but not yet flushed are flushed by now.
        if !due.is_empty() && app.recorder().sync().await.is_ok() {
            let ctx = Ctx {
                store: app.store().clone(),
                live: app.live().clone(),
                clock: app.clock().clone(),
                env: app.alerts().env().clone(),
                metrics: app.alerts().metrics.clone(),
                client: client.clone(),
                cluster: app.cluster().cloned(),
            };
            for d in due {
                let id = d.id.clone();
                let handle = tasks.spawn(attempt(ctx.clone(), d));
                in_flight.insert(handle.id(), id);
            }
        }
        drop(app);
        let wait = next_due
            .and_then(|t| (t - now).to_std().ok())
            .unwrap_or(TICK)
            .clamp(Duration::from_millis(20), TICK);
        tokio::select! {
            _ = wake.notified() => woken = true,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "alerts: a delivery attempt panicked");
                        e.id()
                    }
                };
                in_flight.remove(&id);
                woken = false;
            }
            _ = tokio::time::sleep(wait) => woken = false,
        }
    }
}

/// One attempt at one delivery, and its bookkeeping.
async fn attempt(ctx: Ctx, mut d: Delivery) {
    let rt = ctx.live.load();
    let result = match claimed(&ctx, &mut d).await {
        Some(Ok(())) => match d.channel {
            Channel::Webhook => webhook::send(&ctx.client, &rt.config.alerts, &ctx.env, &d).await,
            Channel::Email => email::send(&rt.config, &ctx.env, &d).await,
        },
        Some(Err(f)) => Err(f),
        None => return,
    };
    let now = ctx.clock.now();
    let metrics = &ctx.metrics;
    let store = &ctx.store;
    d.attempts = d.attempts.saturating_add(1);
    let saved = match result {
        Ok(()) => {
            d.status = DeliveryStatus::Sent;
            d.last_error = None;
            d.finished_at = Some(now);
            metrics.sent.fetch_add(1, Ordering::Relaxed);
            tracing::info!(delivery = %d.id, channel = d.channel.as_str(), user = %d.alert.user_id, attempts = d.attempts, "alert delivered");
            store.finish_delivery(&d)
        }
        Err(f) => {
            metrics.retries.fetch_add(1, Ordering::Relaxed);
            d.last_error = Some(f.message().to_string());
            let deadline = d.alert.at + GIVE_UP_AFTER;
            let next = now + chrono::Duration::from_std(backoff(d.attempts)).unwrap_or(chrono::Duration::seconds(300));
            if matches!(f, Failure::Permanent(_)) || now >= deadline {
                d.status = DeliveryStatus::Failed;
                d.finished_at = Some(now);
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(delivery = %d.id, channel = d.channel.as_str(), user = %d.alert.user_id, attempts = d.attempts, error = f.message(), "alert delivery given up");
                store.finish_delivery(&d)
            } else {
                // The last try falls on the deadline; a failure then gives up.
                d.next_attempt_at = next.min(deadline);
                tracing::warn!(delivery = %d.id, channel = d.channel.as_str(), attempts = d.attempts, error = f.message(), retry_at = %d.next_attempt_at, "alert delivery failed; will retry");
                store.reschedule_delivery(&d)
            }
        }
    };
    if let Err(e) = saved {
        tracing::error!(delivery = %d.id, error = %e, "alerts: cannot save a delivery's state");
    }
    if let Err(e) = store.flush().await {
        tracing::error!(error = %e, "alerts: flush failed");
    }
}

/// Cluster mode: whether this replica delivers `d`. `Some(Ok)`: send it (also outside cluster
/// mode); `Some(Err)`: PostgreSQL failed, retry later; `None`: another replica's copy of the
/// alert holds the mark, so this copy left the outbox unsent.
async fn claimed(ctx: &Ctx, d: &mut Delivery) -> Option<Result<(), Failure>> {
    let Some(cluster) = &ctx.cluster else {
        return Some(Ok(()));
    };
    match crate::cluster::shared::alerts::claim(cluster, &d.alert).await {
        Ok(true) => Some(Ok(())),
        Err(e) => Some(Err(Failure::Retry(format!("alert mark not claimed: {e}")))),
        Ok(false) => {
            d.status = DeliveryStatus::Sent;
            d.last_error = Some("delivered by another replica (it claimed the alert first)".into());
            d.finished_at = Some(ctx.clock.now());
            tracing::info!(delivery = %d.id, user = %d.alert.user_id, "alert delivered by another replica; this copy is dropped");
            if let Err(e) = ctx.store.finish_delivery(d) {
                tracing::error!(delivery = %d.id, error = %e, "alerts: cannot save a delivery's state");
            }
            if let Err(e) = ctx.store.flush().await {
                tracing::error!(error = %e, "alerts: flush failed");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_five_minutes() {
        let s: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
