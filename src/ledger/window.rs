//! Tokens per minute per user: a leaky bucket that drains at `limit / 60` per second.
//!
//! governor cannot charge a cost known only after the response, so this keeps its own level:
//! admission refuses while the level is at or over the limit; settling adds the tokens used.

use std::sync::LazyLock;
use std::time::Instant;

use parking_lot::Mutex;

/// Times are kept as nanoseconds since this instant: 8 bytes per user instead of 16.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ns() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A user's recent token use.
#[derive(Debug, Default)]
pub struct TokenWindow {
    /// (level in tokens, when it was last drained in ns since `EPOCH`). Zero level needs no
    /// time, so a window that was never used is all zeros.
    state: Mutex<(f64, u64)>,
}

impl TokenWindow {
    fn drained(state: &mut (f64, u64), limit: u64) -> f64 {
        if state.0 <= 0.0 {
            // Nothing to drain: skip the clock read (the common case for idle users).
            state.0 = 0.0;
            return 0.0;
        }
        let now = now_ns();
        let rate = limit as f64 / 60.0;
        let elapsed = now.saturating_sub(state.1) as f64 / 1e9;
        state.0 = (state.0 - elapsed * rate).max(0.0);
        state.1 = now;
        state.0
    }

    /// Ok when the user is under `limit` tokens in the last minute; else seconds to wait.
    pub fn check(&self, limit: u64) -> Result<(), u64> {
        let mut st = self.state.lock();
        let level = Self::drained(&mut st, limit);
        if level < limit as f64 {
            return Ok(());
        }
        let rate = (limit as f64 / 60.0).max(f64::MIN_POSITIVE);
        Err(((level - limit as f64 + 1.0) / rate).ceil().max(1.0) as u64)
    }

    /// Adds tokens that were used.
    pub fn add(&self, tokens: u64, limit: Option<u64>) {
        let mut st = self.state.lock();
        if let Some(l) = limit {
            Self::drained(&mut st, l);
        }
        if st.0 <= 0.0 {
            // Draining starts now: the bucket was empty until these tokens.
            st.1 = now_ns();
        }
        st.0 += tokens as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_at_the_limit() {
        let w = TokenWindow::default();
        assert!(w.check(600).is_ok());
        w.add(700, Some(600));
        let wait = w.check(600).unwrap_err();
        // 600 per minute drains 10 per second: 101 tokens over the limit take about 10 s.
        assert!((10..=11).contains(&wait), "{wait}");
    }
}
