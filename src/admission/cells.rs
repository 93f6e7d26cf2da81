//! Rate-limit state of every key in one flat table: governor's keyed limiter (its GCRA, its
//! clock) with its state store replaced by one cell per key slot.
//!
//! governor's default keyed store is a DashMap: a hash, a shard lock and about 35 bytes for
//! each key that ever made a request, kept until someone calls `retain_recent`. The registry
//! already numbers keys densely (their slot), so the state of key `n` is cell `n`: 8 bytes, one
//! load, no lock, nothing to sweep. Cells come in chunks allocated on a key's first request, so
//! a tier whose keys never call costs only the chunk directory.

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::nanos::Nanos;
use governor::state::StateStore;

const CHUNK_BITS: u32 = 14;
const CHUNK: usize = 1 << CHUNK_BITS;
/// Covers as many keys as the registry can hold (67 million).
const MAX_CHUNKS: usize = 1 << 12;

/// One GCRA cell (the theoretical arrival time; 0: never used) per key slot.
pub struct KeyCells {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl Default for KeyCells {
    fn default() -> Self {
        KeyCells {
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl std::fmt::Debug for KeyCells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used = self.chunks.iter().filter(|c| c.get().is_some()).count();
        f.debug_struct("KeyCells").field("chunks", &used).finish()
    }
}

impl KeyCells {
    fn cell(&self, key: u32) -> Option<&AtomicU64> {
        let chunk = self.chunks.get((key >> CHUNK_BITS) as usize)?;
        let chunk = chunk.get_or_init(|| (0..CHUNK).map(|_| AtomicU64::new(0)).collect());
        chunk.get(key as usize & (CHUNK - 1))
    }
}

fn nanos(v: u64) -> Option<Nanos> {
    NonZeroU64::new(v).map(|n| Nanos::from(n.get()))
}

impl StateStore for KeyCells {
    type Key = u32;

    // The same compare-and-swap loop as governor's own `InMemoryState`.
    fn measure_and_replace<T, F, E>(&self, key: &u32, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let Some(cell) = self.cell(*key) else {
            // Past the registry's capacity, so never a real key: judged as a first request.
            return f(None).map(|(t, _)| t);
        };
        let mut prev = cell.load(Ordering::Acquire);
        let mut decision = f(nanos(prev));
        while let Ok((result, next)) = decision {
            match cell.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return Ok(result),
                Err(now) => prev = now,
            }
            decision = f(nanos(prev));
        }
        decision.map(|(result, _)| result)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::DefaultClock;
    use governor::{Quota, RateLimiter};

    use super::*;

    #[test]
    fn limits_each_key_on_its_own() {
        let lim: RateLimiter<u32, KeyCells, DefaultClock> = RateLimiter::new(
            Quota::per_minute(NonZeroU32::new(2).unwrap()),
            KeyCells::default(),
            DefaultClock::default(),
        );
        assert!(lim.check_key(&7).is_ok());
        assert!(lim.check_key(&7).is_ok());
        assert!(lim.check_key(&7).is_err());
        assert!(lim.check_key(&(CHUNK as u32 + 7)).is_ok());
        assert!(lim.check_key(&u32::MAX).is_ok());
    }
}
