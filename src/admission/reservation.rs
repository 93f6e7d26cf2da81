//! What admission holds back for a request until it is settled: today the message (so the
//! message quota is exact under any concurrency). A [`Reservation`] is released when dropped,
//! so no path can leak it; settling commits it together with the actual usage, in one step.

use std::sync::Arc;

use crate::clock::Month;
use crate::identity::{KeyEntry, Registry};
use crate::ledger::Totals;

/// A message reserved against the user's monthly quota.
#[must_use = "a reservation is released when dropped; commit it with the actual usage"]
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<Registry>,
    key: KeyEntry,
    month: Month,
    armed: bool,
}

impl Reservation {
    pub(super) fn new(registry: Arc<Registry>, key: KeyEntry, month: Month) -> Self {
        Reservation {
            registry,
            key,
            month,
            armed: true,
        }
    }

    /// The month the message was reserved in.
    pub fn month(&self) -> Month {
        self.month
    }

    /// Replaces the reservation with the actual usage `delta` (whose message, if any, is the
    /// reserved one): the counters change once, with no moment where both or neither count.
    pub fn commit(mut self, delta: &Totals) {
        self.armed = false;
        if let Some(user) = self.registry.user_of(self.key) {
            user.usage.commit(self.month, delta);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed
            && let Some(user) = self.registry.user_of(self.key)
        {
            user.usage.release(self.month);
        }
    }
}
