//! In-memory counters of a user's current month: what admission checks and `current` shows.
//!
//! One small mutex per user (never a global lock). The message quota, and under hard
//! enforcement the token and cost quotas, are reserved under that mutex, so however many
//! requests race, no more than the limit is admitted in a month: what is used plus what is
//! reserved by requests in flight never exceeds what admission allowed.
//! A million users are loaded at once, so the layout is kept tight: a one-byte lock, the month
//! packed next to the totals and the reserved amounts (96 bytes in all).

use parking_lot::Mutex;
use rust_decimal::Decimal;

use super::totals::Totals;
use crate::clock::Month;

/// Stands for "no month yet": older than any real month, so the first touch starts from zero.
const NO_MONTH: Month = Month(0);

/// What requests in flight hold back (one request's hold, or the sum of a user's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// A message (one request holds at most one; the sum counts them in `Totals::messages`).
    pub message: bool,
    /// Tokens: the prompt's estimate plus the output cap.
    pub tokens: u64,
    /// Cost: the worst case of those tokens, plus the message's price.
    pub cost: Decimal,
}

/// Tokens and cost reserved by a user's requests in flight (their messages are already
/// counted in [`Totals::messages`], so the message quota stays exact as before).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reserved {
    /// Tokens reserved.
    pub tokens: u64,
    /// Cost reserved.
    pub cost: Decimal,
}

#[derive(Debug)]
struct State {
    month: Month,
    totals: Totals,
    reserved: Reserved,
}

impl Default for State {
    fn default() -> Self {
        State {
            month: NO_MONTH,
            totals: Totals::default(),
            reserved: Reserved::default(),
        }
    }
}

/// A user's counters for the current month.
#[derive(Debug, Default)]
pub struct UserUsage {
    state: Mutex<State>,
}

impl UserUsage {
    /// Counters starting from `totals` for `month` (loaded from storage at start: nothing is
    /// in flight then).
    pub fn loaded(month: Month, totals: Totals) -> Self {
        Self {
            state: Mutex::new(State {
                month,
                totals,
                reserved: Reserved::default(),
            }),
        }
    }

    fn with<R>(&self, month: Month, f: impl FnOnce(&mut Totals, &mut Reserved) -> R) -> Option<R> {
        let mut st = self.state.lock();
        match st.month {
            m if m == month => {}
            m if m > month => return None,
            // A new month starts from zero: no reset job, the first touch rolls it over. What
            // the old month's requests reserved is not carried over (their release, of the old
            // month, then changes nothing).
            _ => {
                st.month = month;
                st.totals = Totals::default();
                st.reserved = Reserved::default();
            }
        }
        let State { totals, reserved, .. } = &mut *st;
        Some(f(totals, reserved))
    }

    /// This month's totals as of now.
    pub fn snapshot(&self, month: Month) -> Totals {
        self.with(month, |t, _| *t).unwrap_or_default()
    }

    /// This month's totals and what requests in flight reserve, as of now.
    pub fn snapshot_reserved(&self, month: Month) -> (Totals, Reserved) {
        self.with(month, |t, r| (*t, *r)).unwrap_or_default()
    }

    /// Reserves what `decide` asks for, given the totals and the reservations of others as
    /// they are, in one step under the user's lock; `None` from `decide` refuses. Returns the
    /// totals and reservations seen (after this one when it succeeded) and what was held.
    pub fn try_reserve(
        &self,
        month: Month,
        decide: impl FnOnce(&Totals, &Reserved) -> Option<Held>,
    ) -> Result<(Totals, Reserved, Held), Totals> {
        self.with(month, |t, r| match decide(t, r) {
            Some(h) => {
                t.messages = t.messages.saturating_add(u64::from(h.message));
                r.tokens = r.tokens.saturating_add(h.tokens);
                r.cost += h.cost;
                Ok((*t, *r, h))
            }
            None => Err(*t),
        })
        .unwrap_or(Err(Totals::default()))
    }

    /// Cluster mode: sets the counters to what Redis answered (messages, tokens, bytes, cost
    /// used and tokens, cost reserved by every replica's calls in flight). Records and response
    /// bytes are not counted in Redis and stay as they are.
    pub fn mirror(&self, month: Month, used: &Totals, reserved: Reserved) {
        self.with(month, |t, r| {
            t.messages = used.messages;
            t.tokens = used.tokens;
            t.bytes = used.bytes;
            t.cost = used.cost;
            *r = reserved;
        });
    }

    /// Gives back what a request held (the upstream refused or never answered).
    pub fn release(&self, month: Month, held: &Held) {
        self.with(month, |t, r| unhold(t, r, held));
    }

    /// Replaces what a request held with its settled usage `delta` in one step (`delta`'s
    /// messages are what the request really counts: 1 if answered, 0 if not).
    pub fn commit(&self, month: Month, held: &Held, delta: &Totals) {
        self.with(month, |t, r| {
            unhold(t, r, held);
            t.add(delta);
        });
    }

    /// Settles part of a request's usage, `delta`, against what it holds, in one step: the
    /// held message is replaced by `delta`'s, and as much of `delta`'s tokens and cost as is
    /// held moves from reserved to used (the rest stays held for the remainder). `held` is
    /// what remains held afterwards.
    pub fn commit_part(&self, month: Month, held: &mut Held, delta: &Totals) {
        let part = Held {
            message: held.message,
            tokens: held.tokens.min(delta.tokens),
            cost: held.cost.min(delta.cost).max(Decimal::ZERO),
        };
        self.with(month, |t, r| {
            unhold(t, r, &part);
            t.add(delta);
        });
        held.message = false;
        held.tokens -= part.tokens;
        held.cost -= part.cost;
    }

    /// Adds settled usage. `reserved_message` is true when the record's message was already
    /// counted at admission, so it is not counted twice.
    pub fn add(&self, month: Month, delta: &Totals, reserved_message: bool) {
        self.with(month, |t, _| {
            let mut d = *delta;
            if reserved_message {
                d.messages = d.messages.saturating_sub(1);
            }
            t.add(&d);
        });
    }
}

fn unhold(t: &mut Totals, r: &mut Reserved, held: &Held) {
    t.messages = t.messages.saturating_sub(u64::from(held.message));
    r.tokens = r.tokens.saturating_sub(held.tokens);
    r.cost = (r.cost - held.cost).max(Decimal::ZERO);
}
#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn msg() -> Held {
        Held {
            message: true,
            ..Default::default()
        }
    }

    #[test]
    fn counters_stay_small() {
        assert!(
            std::mem::size_of::<UserUsage>() <= 96,
            "{}",
            std::mem::size_of::<UserUsage>()
        );
    }

    #[test]
    fn reservation_is_exact_and_months_roll_over() {
        let u = UserUsage::default();
        let nov = Month(202611);
        let limit = 2;
        let ask = |t: &Totals, _: &Reserved| (t.messages < limit).then(msg);
        assert!(u.try_reserve(nov, ask).is_ok());
        assert!(u.try_reserve(nov, ask).is_ok());
        assert!(u.try_reserve(nov, ask).is_err());
        u.release(nov, &msg());
        assert!(u.try_reserve(nov, ask).is_ok());
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

    #[test]
    fn partial_then_final_settlement_counts_once() {
        let u = UserUsage::default();
        let m = Month(202612);
        let mut held = Held {
            message: true,
            tokens: 100,
            cost: Decimal::new(5, 2),
        };
        let (_, _, h) = u.try_reserve(m, |_, _| Some(held)).unwrap();
        assert_eq!(h, held);
        let head = Totals {
            messages: 1,
            cost: Decimal::new(1, 2),
            ..Default::default()
        };
        u.commit_part(m, &mut held, &head);
        let (t, r) = u.snapshot_reserved(m);
        assert_eq!(
            (t.messages, t.cost, r.tokens, r.cost),
            (1, Decimal::new(1, 2), 100, Decimal::new(4, 2))
        );
        let end = Totals {
            tokens: 60,
            cost: Decimal::new(2, 2),
            ..Default::default()
        };
        u.commit(m, &held, &end);
        let (t, r) = u.snapshot_reserved(m);
        assert_eq!((t.messages, t.tokens, t.cost), (1, 60, Decimal::new(3, 2)));
        assert_eq!(r, Reserved::default());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit {
            tokens: u64,
            cost: u32,
        },
        Commit {
            which: usize,
            tokens_pct: u64,
            cost_pct: u32,
        },
        Part {
            which: usize,
            cost_pct: u32,
        },
        Release {
            which: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..400, 0u32..400).prop_map(|(tokens, cost)| Op::Admit { tokens, cost }),
            (0usize..64, 0u64..=100, 0u32..=100).prop_map(|(which, tokens_pct, cost_pct)| Op::Commit {
                which,
                tokens_pct,
                cost_pct
            }),
            (0usize..64, 0u32..=100).prop_map(|(which, cost_pct)| Op::Part { which, cost_pct }),
            (0usize..64).prop_map(|which| Op::Release { which }),
        ]
    }

    proptest! {
        // Admission's rule (`used + reserved + ask <= limit`) with settlements that never
        // exceed what was held (the upstream honours the cap): used + reserved stays within
        // the limits after every step, and nothing stays reserved once all have ended.
        #[test]
        fn used_plus_reserved_never_exceeds_the_limit(ops in prop::collection::vec(op(), 1..200)) {
            let u = UserUsage::default();
            let m = Month(202612);
            let (tl, cl) = (1000u64, Decimal::new(1000, 3));
            let mut open: Vec<Held> = Vec::new();
            for op in ops {
                match op {
                    Op::Admit { tokens, cost } => {
                        let cost = Decimal::new(i64::from(cost), 3);
                        let r = u.try_reserve(m, |t, r| {
                            let fits = t.tokens + r.tokens + tokens <= tl && t.cost + r.cost + cost <= cl;
                            fits.then_some(Held { message: true, tokens, cost })
                        });
                        if let Ok((_, _, h)) = r {
                            open.push(h);
                        }
                    }
                    Op::Commit { which, tokens_pct, cost_pct } if !open.is_empty() => {
                        let h = open.swap_remove(which % open.len());
                        let delta = Totals {
                            messages: 1,
                            tokens: h.tokens * tokens_pct / 100,
                            cost: h.cost * Decimal::from(cost_pct) / Decimal::from(100),
                            ..Default::default()
                        };
                        u.commit(m, &h, &delta);
                    }
                    Op::Part { which, cost_pct } if !open.is_empty() => {
                        let i = which % open.len();
                        if let Some(h) = open.get_mut(i) {
                            let delta = Totals {
                                messages: u64::from(h.message),
                                cost: h.cost * Decimal::from(cost_pct) / Decimal::from(100),
                                ..Default::default()
                            };
                            u.commit_part(m, h, &delta);
                        }
                    }
                    Op::Release { which } if !open.is_empty() => {
                        let h = open.swap_remove(which % open.len());
                        u.release(m, &h);
                    }
                    _ => {}
                }
                let (t, r) = u.snapshot_reserved(m);
                prop_assert!(t.tokens + r.tokens <= tl, "{t:?} {r:?}");
                prop_assert!(t.cost + r.cost <= cl, "{t:?} {r:?}");
                let held_tokens: u64 = open.iter().map(|h| h.tokens).sum();
                prop_assert_eq!(r.tokens, held_tokens);
            }
            for h in open.drain(..) {
                u.release(m, &h);
            }
            prop_assert_eq!(u.snapshot_reserved(m).1, Reserved::default());
        }
    }
}
