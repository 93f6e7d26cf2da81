//! Tokens per minute per user: a leaky bucket that drains at `limit / 60` per second.
//!
//! governor cannot charge a cost known only after the response, so this keeps its own level:
//! admission refuses while the level is at or over the limit; settling adds the tokens used.

use std::sync::Mutex;
use std::time::Instant;

/// A user's recent token use.
#[derive(Debug)]
pub struct TokenWindow {
    state: Mutex<(f64, Instant)>,
}

impl Default for TokenWindow {
    fn default() -> Self {
        Self {
            state: Mutex::new((0.0, Instant::now())),
        }
    }
}

impl TokenWindow {
    fn drained(state: &mut (f64, Instant), limit: u64) -> f64 {
        let now = Instant::now();
        let rate = limit as f64 / 60.0;
        let elapsed = now.duration_since(state.1).as_secs_f64();
        state.0 = (state.0 - elapsed * rate).max(0.0);
        state.1 = now;
        state.0
    }

    /// Ok when the user is under `limit` tokens in the last minute; else seconds to wait.
    pub fn check(&self, limit: u64) -> Result<(), u64> {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let level = Self::drained(&mut st, limit);
        if level < limit as f64 {
            return Ok(());
        }
        let rate = (limit as f64 / 60.0).max(f64::MIN_POSITIVE);
        Err(((level - limit as f64 + 1.0) / rate).ceil().max(1.0) as u64)
    }

    /// Adds tokens that were used.
    pub fn add(&self, tokens: u64, limit: Option<u64>) {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(l) = limit {
            Self::drained(&mut st, l);
        }
        st.0 += tokens as f64;
    }
}
