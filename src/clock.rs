//! The one source of time, so month boundaries and retention are testable.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Datelike, TimeZone, Utc};

/// Gives the current time; the only way the gateway reads the wall clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant in UTC.
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock, optionally shifted by a fixed offset (for tests of a running binary).
#[derive(Debug, Default)]
pub struct SystemClock {
    offset_ns: AtomicI64,
}

impl SystemClock {
    /// A clock shifted by `offset_ms` milliseconds from the system time.
    pub fn with_offset_ms(offset_ms: i64) -> Self {
        Self {
            offset_ns: AtomicI64::new(offset_ms.saturating_mul(1_000_000)),
        }
    }

    /// Builds the process clock: the system time, shifted so that it starts at
    /// `GEMINI_METER_FAKE_NOW` (RFC 3339) when that variable is set.
    pub fn from_env() -> Result<Self, chrono::ParseError> {
        match std::env::var("GEMINI_METER_FAKE_NOW") {
            Ok(v) if !v.is_empty() => {
                let start = DateTime::parse_from_rfc3339(&v)?.with_timezone(&Utc);
                Ok(Self::with_offset_ms((start - Utc::now()).num_milliseconds()))
            }
            _ => Ok(Self::default()),
        }
    }

    /// Moves the clock by `delta_ms` (tests).
    pub fn advance_ms(&self, delta_ms: i64) {
        self.offset_ns
            .fetch_add(delta_ms.saturating_mul(1_000_000), Ordering::Relaxed);
    }

    /// Sets the clock so that `now()` returns `at` from this moment on (tests). Kept in
    /// nanoseconds so that setting it to a month's first instant never reads as the month before.
    pub fn set(&self, at: DateTime<Utc>) {
        let off = (at - Utc::now()).num_nanoseconds().unwrap_or(0);
        self.offset_ns.store(off, Ordering::Relaxed);
    }
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        let off = self.offset_ns.load(Ordering::Relaxed);
        Utc::now() + chrono::Duration::nanoseconds(off)
    }
}

/// Shared handle to the process clock.
pub type SharedClock = Arc<dyn Clock>;

/// A calendar month (UTC) packed as `year * 100 + month`, e.g. 202611.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(pub u32);

impl Month {
    /// The month containing `t`.
    pub fn of(t: DateTime<Utc>) -> Self {
        Month(t.year().max(0) as u32 * 100 + t.month())
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Self> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let y: u32 = y.parse().ok()?;
        let m: u32 = m.parse().ok()?;
        (1..=12).contains(&m).then_some(Month(y * 100 + m))
    }

    /// Year part.
    pub fn year(self) -> u32 {
        self.0 / 100
    }

    /// Month part, 1 to 12.
    pub fn month(self) -> u32 {
        self.0 % 100
    }

    /// The following month.
    pub fn next(self) -> Self {
        if self.month() == 12 {
            Month((self.year() + 1) * 100 + 1)
        } else {
            Month(self.0 + 1)
        }
    }

    /// The month `n` months before this one.
    pub fn minus(self, n: u32) -> Self {
        let idx = self.year() * 12 + (self.month() - 1);
        let idx = idx.saturating_sub(n);
        Month((idx / 12) * 100 + idx % 12 + 1)
    }

    /// 00:00 UTC on the first day of this month.
    pub fn start(self) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(self.year() as i32, self.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or_default()
    }

    /// When this month's quotas reset: the start of the next month.
    pub fn resets_at(self) -> DateTime<Utc> {
        self.next().start()
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month())
    }
}

/// Renders a time as RFC 3339 UTC with a `Z` suffix and whole seconds.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Renders a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_arithmetic() {
        let m = Month::parse("2026-12").unwrap();
        assert_eq!(m.next().to_string(), "2027-01");
        assert_eq!(m.minus(12).to_string(), "2025-12");
        assert_eq!(m.minus(24).to_string(), "2024-12");
        assert_eq!(Month::parse("2026-11").unwrap().minus(11).to_string(), "2025-12");
        assert_eq!(
            rfc3339(Month::parse("2026-11").unwrap().resets_at()),
            "2026-12-01T00:00:00Z"
        );
        assert!(Month::parse("2026-13").is_none());
        assert!(Month::parse("26-1").is_none());
    }
}
