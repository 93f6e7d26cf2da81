//! What admission holds back for a request until it is settled: its message (so the message
//! quota is exact under any concurrency) and, under hard enforcement, its worst-case tokens and
//! cost (so those quotas are never exceeded). A [`Reservation`] is released when dropped, so no
//! path can leak it; settling replaces it with the actual usage, in one step.

use std::sync::Arc;

use crate::clock::Month;
use crate::identity::{KeyEntry, Registry};
use crate::ledger::{Held, Totals};

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
}

impl Reservation {
    pub(super) fn new(registry: Arc<Registry>, key: KeyEntry, month: Month, held: Held, tpm_charged: u64) -> Self {
        Reservation {
            registry,
            key,
            month,
            held,
            tpm_charged,
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

    /// Settles part of the request's usage (the message at the answer's head) against the
    /// reservation in one step; the rest stays held until [`Reservation::commit`].
    pub fn commit_part(&mut self, delta: &Totals) {
        if let Some(user) = self.registry.user_of(self.key) {
            user.usage.commit_part(self.month, &mut self.held, delta);
        }
    }

    /// Replaces the reservation with the actual usage `delta` (whose message, if any, is the
    /// reserved one): the counters change once, with no moment where both or neither count.
    pub fn commit(mut self, delta: &Totals) {
        let held = std::mem::take(&mut self.held);
        if let Some(user) = self.registry.user_of(self.key) {
            user.usage.commit(self.month, &held, delta);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
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
