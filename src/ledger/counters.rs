//! In-memory counters of a user's current month: what admission checks and `current` shows.
//!
//! One small mutex per user (never a global lock). The message quota is reserved under that
//! mutex, so however many requests race, no more than `limit` are admitted in a month.
//! A million users are loaded at once, so the layout is kept tight: a one-byte lock, the month
//! packed next to the totals (72 bytes in all).

use parking_lot::Mutex;

use super::totals::Totals;
use crate::clock::Month;

/// Stands for "no month yet": older than any real month, so the first touch starts from zero.
const NO_MONTH: Month = Month(0);

#[derive(Debug)]
struct State {
    month: Month,
    totals: Totals,
}

impl Default for State {
    fn default() -> Self {
        State {
            month: NO_MONTH,
            totals: Totals::default(),
        }
    }
}

/// A user's counters for the current month.
#[derive(Debug, Default)]
pub struct UserUsage {
    state: Mutex<State>,
}

impl UserUsage {
    /// Counters starting from `totals` for `month` (loaded from storage at start).
    pub fn loaded(month: Month, totals: Totals) -> Self {
        Self {
            state: Mutex::new(State { month, totals }),
        }
    }

    fn with<R>(&self, month: Month, f: impl FnOnce(&mut Totals) -> R) -> Option<R> {
        let mut st = self.state.lock();
        match st.month {
            m if m == month => {}
            m if m > month => return None,
            // A new month starts from zero: no reset job, the first touch rolls it over.
            _ => {
                st.month = month;
                st.totals = Totals::default();
            }
        }
        Some(f(&mut st.totals))
    }

    /// This month's totals as of now.
    pub fn snapshot(&self, month: Month) -> Totals {
        self.with(month, |t| *t).unwrap_or_default()
    }

    /// Reserves one message if `check` accepts the totals as they are; returns the totals seen
    /// (after the reservation when it succeeded).
    pub fn try_reserve(&self, month: Month, check: impl FnOnce(&Totals) -> bool) -> Result<Totals, Totals> {
        self.with(month, |t| {
            if check(t) {
                t.messages = t.messages.saturating_add(1);
                Ok(*t)
            } else {
                Err(*t)
            }
        })
        .unwrap_or(Err(Totals::default()))
    }

    /// Gives back a reserved message (the upstream refused or never answered).
    pub fn release(&self, month: Month) {
        self.with(month, |t| t.messages = t.messages.saturating_sub(1));
    }

    /// Replaces a reserved message with the settled usage `delta` in one step (`delta`'s
    /// messages are what the request really counts: 1 if answered, 0 if not).
    pub fn commit(&self, month: Month, delta: &Totals) {
        self.with(month, |t| {
            t.messages = t.messages.saturating_sub(1);
            t.add(delta);
        });
    }

    /// Adds settled usage. `reserved_message` is true when the record's message was already
    /// counted at admission, so it is not counted twice.
    pub fn add(&self, month: Month, delta: &Totals, reserved_message: bool) {
        self.with(month, |t| {
            let mut d = *delta;
            if reserved_message {
                d.messages = d.messages.saturating_sub(1);
            }
            t.add(&d);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_stay_small() {
        assert!(
            std::mem::size_of::<UserUsage>() <= 72,
            "{}",
            std::mem::size_of::<UserUsage>()
        );
    }

    #[test]
    fn reservation_is_exact_and_months_roll_over() {
        let u = UserUsage::default();
        let nov = Month(202611);
        let limit = 2;
        assert!(u.try_reserve(nov, |t| t.messages < limit).is_ok());
        assert!(u.try_reserve(nov, |t| t.messages < limit).is_ok());
        assert!(u.try_reserve(nov, |t| t.messages < limit).is_err());
        u.release(nov);
        assert!(u.try_reserve(nov, |t| t.messages < limit).is_ok());
        let dec = nov.next();
        assert_eq!(u.snapshot(dec).messages, 0);
        // Late usage of the previous month does not leak into the new one.
        u.add(
            nov,
            &Totals {
                tokens: 5,
                ..Default::default()
            },
            false,
        );
        assert_eq!(u.snapshot(dec).tokens, 0);
    }
}
