//! The tiers of one config snapshot, compiled for admission: limits, the per-key rate limiter
//! and the `x-quota-*-limit` header values rendered once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};

use super::KeyCells;
use crate::config::{Tier, TierId};

/// A per-key requests-per-minute limiter (governor's GCRA), keyed by the key's slot in the
/// registry, its state one cell per slot ([`KeyCells`]).
pub type KeyLimiter = RateLimiter<u32, KeyCells, DefaultClock>;

/// A tier with its limiters.
#[derive(Debug)]
pub struct TierRuntime {
    /// The tier's name.
    pub name: Arc<str>,
    /// The tier's limits.
    pub tier: Tier,
    /// Per-key limiter when the tier sets `requests_per_minute`.
    pub rpm: Option<Arc<KeyLimiter>>,
    /// `x-quota-*-limit` header values (messages, tokens, bytes, cost), rendered once.
    pub limit_values: [Option<http::HeaderValue>; 4],
}

/// Every tier of a snapshot, by name and by [`TierId`] (the hot path's lookup).
#[derive(Default)]
pub struct Tiers {
    by_name: HashMap<String, Arc<TierRuntime>>,
    by_id: Vec<Option<Arc<TierRuntime>>>,
}

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Tiers {
    /// Compiles `config`'s tiers. Limiters of tiers whose rate is unchanged are carried over
    /// from `previous`, so a reload does not reset anyone's rate-limit state.
    pub fn build(config: &BTreeMap<String, Tier>, previous: Option<&Tiers>) -> Tiers {
        let mut tiers = HashMap::with_capacity(config.len());
        let mut by_id: Vec<Option<Arc<TierRuntime>>> = Vec::new();
        for (name, tier) in config {
            let rpm = tier.requests_per_minute.map(|rpm| {
                let reuse = previous
                    .and_then(|p| p.by_name.get(name))
                    .filter(|old| old.tier.requests_per_minute == Some(rpm))
                    .and_then(|old| old.rpm.clone());
                reuse.unwrap_or_else(|| {
                    Arc::new(RateLimiter::new(
                        Quota::per_minute(rpm),
                        KeyCells::default(),
                        DefaultClock::default(),
                    ))
                })
            });
            let limit_values = [
                tier.messages.map(http::HeaderValue::from),
                tier.tokens.map(http::HeaderValue::from),
                tier.bytes.map(http::HeaderValue::from),
                tier.cost
                    .and_then(|c| http::HeaderValue::from_str(&c.normalize().to_string()).ok()),
            ];
            let tr = Arc::new(TierRuntime {
                name: Arc::from(name.as_str()),
                tier: tier.clone(),
                rpm,
                limit_values,
            });
            let id = TierId::of(name);
            if id != TierId::OVERFLOW {
                if by_id.len() <= id.index() {
                    by_id.resize(id.index() + 1, None);
                }
                if let Some(slot) = by_id.get_mut(id.index()) {
                    *slot = Some(tr.clone());
                }
            }
            tiers.insert(name.clone(), tr);
        }
        Tiers { by_name: tiers, by_id }
    }

    /// The tier with this name.
    pub fn by_name(&self, name: &str) -> Option<&TierRuntime> {
        self.by_name.get(name).map(|t| &**t)
    }

    /// The tier with this id.
    pub fn by_id(&self, id: TierId) -> Option<&TierRuntime> {
        self.by_id.get(id.index()).and_then(|t| t.as_deref())
    }

    /// The tier names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}
