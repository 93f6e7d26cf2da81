//! What admission holds back for a request until it is settled: its message (so the message
//! quota is exact under any concurrency) and, under hard enforcement, its worst-case tokens and
//! cost (so those quotas are never exceeded). A [`Reservation`] is released when dropped, so no
//! path can leak it; settling replaces it with the actual usage, in one step.
//!
//! In cluster mode the hold is in Redis: settling here only works out what of it a record
//! replaces ([`Release`]); the record carries that to Redis once it is on disk, in one script
//! with the record's own amounts.

use std::sync::Arc;

use rust_decimal::Decimal;
use tokio::sync::mpsc::UnboundedSender;

use crate::clock::Month;
use crate::identity::{KeyEntry, Registry};
use crate::ledger::{Held, Release, Settled, Totals};

/// A hold in Redis: its id, whose it is, and the settlement pump (which gives it back when
/// the reservation is dropped unsettled).
#[derive(Debug, Clone)]
pub struct Remote {
    /// The reservation's id in Redis.
    pub id: Arc<str>,
    /// The user it is held for.
    pub user: Arc<str>,
    /// The settlement pump's queue.
    pub pump: UnboundedSender<Vec<Settled>>,
}

/// What a request holds against the user's monthly quotas (and tokens per minute).
#[must_use = "a reservation is released when dropped; commit it with the actual usage"]
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<Registry>,
    key: KeyEntry,
    month: Month,
    held: Held,
    /// Tokens charged to the user's tokens-per-minute window at admission (given back at
    /// settlement, where the actual tokens are charged instead).
    tpm_charged: u64,
    /// Cluster mode: the hold is in Redis.
    remote: Option<Box<Remote>>,
}

impl Reservation {
    pub(super) fn new(registry: Arc<Registry>, key: KeyEntry, month: Month, held: Held, tpm_charged: u64) -> Self {
        Reservation {
            registry,
            key,
            month,
            held,
            tpm_charged,
            remote: None,
        }
    }

    /// A reservation held in Redis (cluster mode).
    pub fn remote(
        registry: Arc<Registry>,
        key: KeyEntry,
        month: Month,
        held: Held,
        tpm_charged: u64,
        remote: Remote,
    ) -> Self {
        Reservation {
            registry,
            key,
            month,
            held,
            tpm_charged,
            remote: Some(Box::new(remote)),
        }
    }

    /// The month the reservation was made in.
    pub fn month(&self) -> Month {
        self.month
    }

    /// What is still held.
    pub fn held(&self) -> Held {
        self.held
    }

    fn release(&self, part: &Held, whole: bool, tpm_charged: u64) -> Option<Box<Release>> {
        let r = self.remote.as_ref()?;
        Some(Box::new(Release {
            res: r.id.clone(),
            message: part.message,
            tokens: part.tokens,
            cost: part.cost,
            whole,
            tpm_charged,
        }))
    }

    /// Settles part of the request's usage (the message at the answer's head) against the
    /// reservation in one step; the rest stays held until [`Reservation::commit`]. In cluster
    /// mode, returns what the record replaces in Redis.
    pub fn commit_part(&mut self, delta: &Totals) -> Option<Box<Release>> {
        if self.remote.is_some() {
            let part = Held {
                message: self.held.message,
                tokens: self.held.tokens.min(delta.tokens),
                cost: self.held.cost.min(delta.cost).max(Decimal::ZERO),
            };
            self.held.message = false;
            self.held.tokens -= part.tokens;
            self.held.cost -= part.cost;
            return self.release(&part, false, 0);
        }
        if let Some(user) = self.registry.user_of(self.key) {
            user.usage.commit_part(self.month, &mut self.held, delta);
        }
        None
    }

    /// Replaces the reservation with the actual usage `delta` (whose message, if any, is the
    /// reserved one): the counters change once, with no moment where both or neither count.
    /// In cluster mode, returns what the record replaces in Redis (all that is held).
    pub fn commit(mut self, delta: &Totals) -> Option<Box<Release>> {
        let held = std::mem::take(&mut self.held);
        let charged = std::mem::take(&mut self.tpm_charged);
        if self.remote.is_some() {
            return self.release(&held, true, charged);
        }
        self.tpm_charged = charged;
        if let Some(user) = self.registry.user_of(self.key) {
            user.usage.commit(self.month, &held, delta);
        }
        None
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(r) = &self.remote {
            // Given back in Redis, through the pump (in order with the records before it). A
            // commit took the hold already; an unsettled one is given back whole.
            if self.held != Held::default() || self.tpm_charged > 0 {
                let release = self.release(&self.held, true, self.tpm_charged);
                let _ = r.pump.send(vec![Settled {
                    id: 0,
                    user_id: r.user.clone(),
                    month: self.month,
                    messages: 0,
                    tokens: 0,
                    bytes: 0,
                    cost: Decimal::ZERO,
                    model_tokens: true,
                    release,
                }]);
            }
            return;
        }
        if self.held == Held::default() && self.tpm_charged == 0 {
            return;
        }
        if let Some(user) = self.registry.user_of(self.key) {
            user.usage.release(self.month, &self.held);
            if self.tpm_charged > 0 {
                user.tpm.refund(self.tpm_charged);
            }
        }
    }
}
