//! What the client measured, per target: counts, and HDR histograms (microseconds) of latency,
//! time to first byte and the gaps between stream chunks.
//!
//! HDR histograms because the figures that matter are the tail (p99, p99.9) of hundreds of
//! thousands of samples: fixed memory, O(1) record, exact merges across workers and rounds, and
//! 3 significant digits at any magnitude (from a 20 µs gap to a 2 s stream).

use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest value tracked: 10 minutes, in microseconds (beyond any phase).
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Hist(
    // `None` only if hdrhistogram refused the constant bounds, which it accepts: creation is
    // fallible in its API, and this keeps every caller free of a `Result` that cannot happen.
    Option<Histogram<u64>>,
);

impl Default for Hist {
    fn default() -> Self {
        // 3 significant digits: a p99 of 1234 µs is told apart from 1235 µs.
        Hist(Histogram::new_with_bounds(1, MAX_US, 3).ok())
    }
}

impl Hist {
    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        if let Some(h) = &mut self.0 {
            let us = u64::try_from(d.as_micros()).unwrap_or(MAX_US);
            h.saturating_record(us.min(MAX_US));
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Hist) {
        if let (Some(a), Some(b)) = (&mut self.0, &other.0) {
            // Same bounds on both sides, so adding cannot fail; saturate rather than lose the rest.
            if a.add(b).is_err() {
                for v in b.iter_recorded() {
                    a.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                }
            }
        }
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.0.as_ref().map_or(0, Histogram::len)
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value at quantile `q` (0..=1), in milliseconds; `None` when empty.
    pub fn ms(&self, q: f64) -> Option<f64> {
        let h = self.0.as_ref().filter(|h| !h.is_empty())?;
        Some(h.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// Requests that did not succeed, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Errors {
    /// Answered with a status other than 200.
    pub status: u64,
    /// Connection or protocol failure (including a failed connect).
    pub transport: u64,
    /// A stream that ended with fewer events than the mock sends.
    pub short_stream: u64,
}

impl Errors {
    /// All errors.
    pub fn total(&self) -> u64 {
        self.status + self.transport + self.short_stream
    }

    fn add(&mut self, o: &Errors) {
        self.status += o.status;
        self.transport += o.transport;
        self.short_stream += o.short_stream;
    }
}

/// What one target showed over one or more phases.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Requests that succeeded (status 200, whole body, every stream event).
    pub ok: u64,
    /// Requests that failed.
    pub errors: Errors,
    /// Wall time of the measured phases (start of load to the last answer).
    pub elapsed: Duration,
    /// Request start to the body's end.
    pub latency: Hist,
    /// Request start to the first body byte.
    pub ttfb: Hist,
    /// Between consecutive stream events as the client received them.
    pub gap: Hist,
    /// TCP connect plus TLS handshake of connections opened during the load (`--tls`).
    pub connect: Hist,
}

impl Tally {
    /// Adds `o` (another worker or phase).
    pub fn merge(&mut self, o: &Tally) {
        self.ok += o.ok;
        self.errors.add(&o.errors);
        self.elapsed += o.elapsed;
        self.latency.merge(&o.latency);
        self.ttfb.merge(&o.ttfb);
        self.gap.merge(&o.gap);
        self.connect.merge(&o.connect);
    }

    /// Successful requests per second over the measured time.
    pub fn rps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.ok as f64 / s } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_merge() {
        let mut a = Hist::default();
        let mut b = Hist::default();
        for i in 1..=99u64 {
            a.record(Duration::from_micros(i * 10));
        }
        b.record(Duration::from_millis(50));
        a.merge(&b);
        assert_eq!(a.len(), 100);
        let p50 = a.ms(0.5).unwrap();
        assert!((0.49..=0.51).contains(&p50), "{p50}");
        assert!(a.ms(1.0).unwrap() >= 49.9);
        assert!(Hist::default().ms(0.5).is_none());
    }
}
