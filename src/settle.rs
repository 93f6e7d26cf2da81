//! Settling: the one place where a finished piece of usage becomes counters, metrics, alerts,
//! an event for live listeners and a record on its way to the ledger. It sits below the proxy
//! (which decides *what* to settle) and above the ledger (which keeps it): nothing here knows
//! about HTTP, and nothing here waits for the disk on a thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use rust_decimal::Decimal;
use tokio::sync::{broadcast, oneshot};

use crate::admission::Reservation;
use crate::alerts::{Alerts, ON_DISK_WAIT};
use crate::clock::SharedClock;
use crate::identity::{KeyEntry, Registry};
use crate::ledger::Record;
use crate::ledger::{Details, RecordIds, RecorderHandle, Totals};
use crate::metrics::Metrics;
use crate::runtime::Live;

/// What a record settles against.
#[derive(Debug)]
pub enum Against<'a> {
    /// Nothing was reserved for it: its usage is added.
    Nothing,
    /// It is part of a reserved call (the message at the answer's head): it replaces as much
    /// of the reservation as it uses, the rest stays held for the call's end.
    Part(&'a mut Reservation),
    /// It ends a reserved call: the whole reservation is replaced by it.
    Whole(Reservation),
}

/// Everything settling touches, shared by every request.
#[derive(Debug)]
pub struct Settler {
    /// Users and keys (whose counters settle).
    pub registry: Arc<Registry>,
    /// Where records go.
    pub recorder: RecorderHandle,
    /// Quota alerts.
    pub alerts: Arc<Alerts>,
    /// Operational metrics.
    pub metrics: Arc<Metrics>,
    /// The live config (tiers for alerts and tokens per minute).
    pub live: Arc<Live>,
    /// The clock records are stamped with.
    pub clock: SharedClock,
    /// Record ids.
    pub ids: RecordIds,
    /// Announces the user id after each change of their usage (for live updates).
    pub usage_events: broadcast::Sender<Arc<str>>,
    /// Cluster mode: the counters are in Redis, settled from the record log by the pump
    /// (the local ones mirror Redis's replies).
    pub clustered: bool,
}

impl Settler {
    /// Settles one record of `key`'s user: counters at once (replacing what the request
    /// reserved, `against`, in one step), the record to the recorder. Returns a
    /// wait when the record fired an alert: whoever completes the request toward the client
    /// should hold its end until the wait resolves, so a client that saw success can count on
    /// the alert being on disk.
    pub fn settle(&self, key: KeyEntry, rec: Record, against: Against<'_>) -> Option<DiskWait> {
        let Some(user) = self.registry.user_of(key) else {
            // The key's slot is gone (another registry's entry): nothing to bill, and the
            // reservation (of the same slot) releases itself.
            return None;
        };
        let totals = Totals::of(&rec);
        let release = match against {
            Against::Whole(r) => r.commit(&totals),
            Against::Part(r) => r.commit_part(&totals),
            Against::Nothing if self.clustered => None,
            Against::Nothing => {
                user.usage.add(rec.month(), &totals, false);
                None
            }
        };
        let rt = self.live.load();
        if !self.clustered
            && let Details::AiResponse(_) = rec.details
            && let Some(tpm) = rt.tier_by_id(user.tier_id()).and_then(|t| t.tier.tokens_per_minute)
        {
            user.tpm.add(rec.tokens, Some(tpm));
        }
        let m = &self.metrics;
        m.records.fetch_add(1, Relaxed);
        m.tokens.fetch_add(rec.tokens, Relaxed);
        m.upload_bytes.fetch_add(rec.bytes, Relaxed);
        let nanos = (rec.cost * Decimal::from(1_000_000_000u32)).trunc();
        m.cost_nanos.fetch_add(u64::try_from(nanos).unwrap_or(0), Relaxed);
        let user_id = rec.user_id.clone();
        // In cluster mode the record is not in the (mirrored) counters yet: it reaches Redis
        // once on disk.
        let alerts = self
            .alerts
            .detect(&rt, &self.registry, user, &rec, &*self.clock, self.clustered);
        let wait = if alerts.is_empty() {
            self.recorder.record_releasing(rec, release);
            None
        } else {
            // The alerts go in the record's batch: on disk together, or not at all.
            let on_disk = self.recorder.record_with_alerts_releasing(rec, alerts, release);
            self.alerts.wake();
            Some(DiskWait::new(on_disk))
        };
        // Nobody listening is the common case; that is not an error.
        let _ = self.usage_events.send(user_id);
        wait
    }
}

/// Resolves when a record that fired an alert is on disk, or after [`ON_DISK_WAIT`] (or at
/// once if the recorder stopped). Polled by the request's task: no thread blocks on it.
pub struct DiskWait {
    on_disk: oneshot::Receiver<()>,
    // Made on first poll, inside the runtime whose timer it needs.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DiskWait {
    fn new(on_disk: oneshot::Receiver<()>) -> Self {
        DiskWait {
            on_disk,
            deadline: None,
        }
    }
}

impl std::fmt::Debug for DiskWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskWait").finish_non_exhaustive()
    }
}

impl Future for DiskWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Pin::new(&mut self.on_disk).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(ON_DISK_WAIT)));
        deadline.as_mut().poll(cx)
    }
}
