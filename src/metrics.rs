//! Operational metrics: plain atomics that the hot path bumps (no lock, no allocation), rendered
//! as Prometheus text at `GET /metrics`.
//!
//! Labels are fixed sets known at compile time, so each series is one array slot. (A metrics
//! crate's label families and histograms take a lock per update; this takes none.)

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::ledger::recorder::RecorderStats;

/// Route classes of proxied requests.
pub const ROUTES: [&str; 7] = ["generate", "stream", "openai", "embed", "upload", "other", "api"];
/// Status classes.
pub const CLASSES: [&str; 4] = ["2xx", "4xx", "5xx", "other"];
/// Reasons a request is refused before it goes upstream.
pub const REFUSALS: [&str; 12] = [
    "missing_key",
    "invalid_key",
    "messages",
    "tokens",
    "bytes",
    "cost",
    "model_not_allowed",
    "rate_limited",
    "too_large",
    "unknown_tier",
    "bad_request",
    "other",
];
/// Histogram bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// All metrics of the gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; CLASSES.len()]; ROUTES.len()],
    refusals: [AtomicU64; REFUSALS.len()],
    /// Tokens metered.
    pub tokens: AtomicU64,
    /// Upload bytes metered.
    pub upload_bytes: AtomicU64,
    /// Cost metered, in billionths of the currency unit (metrics only; billing stays exact).
    pub cost_nanos: AtomicU64,
    /// Records settled.
    pub records: AtomicU64,
    /// Responses whose token counts were estimated.
    pub estimated: AtomicU64,
    /// Metered response bodies currently open.
    pub open_streams: AtomicI64,
    /// Time from forwarding to the upstream's response headers.
    pub upstream_latency: Histogram,
    /// Time from forwarding to the first response body byte.
    pub ttfb: Histogram,
}

/// Index of a route label.
pub fn route_index(route: &str) -> usize {
    ROUTES.iter().position(|r| *r == route).unwrap_or(ROUTES.len() - 2)
}

impl Metrics {
    /// Counts a response by route and status.
    pub fn request(&self, route: usize, status: u16) {
        let class = match status {
            200..=299 => 0,
            400..=499 => 1,
            500..=599 => 2,
            _ => 3,
        };
        if let Some(r) = self.requests.get(route) {
            r[class].fetch_add(1, Relaxed);
        }
    }

    /// Counts a refusal by its error label.
    pub fn refusal(&self, label: &str) {
        let i = REFUSALS.iter().position(|r| *r == label).unwrap_or(REFUSALS.len() - 1);
        self.refusals[i].fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, rec: &RecorderStats) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP gm_requests_total Requests answered, by route and status class.\n# TYPE gm_requests_total counter\n");
        for (ri, r) in ROUTES.iter().enumerate() {
            for (ci, c) in CLASSES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "gm_requests_total{{route=\"{r}\",status=\"{c}\"}} {}",
                    self.requests[ri][ci].load(Relaxed)
                );
            }
        }
        out.push_str("# HELP gm_admission_refusals_total Requests refused before the upstream, by reason.\n# TYPE gm_admission_refusals_total counter\n");
        for (i, r) in REFUSALS.iter().enumerate() {
            let _ = writeln!(
                out,
                "gm_admission_refusals_total{{reason=\"{r}\"}} {}",
                self.refusals[i].load(Relaxed)
            );
        }
        let counters: [(&str, &str, u64); 4] = [
            ("gm_tokens_total", "Tokens metered.", self.tokens.load(Relaxed)),
            (
                "gm_upload_bytes_total",
                "File bytes metered.",
                self.upload_bytes.load(Relaxed),
            ),
            (
                "gm_usage_records_total",
                "Usage records settled.",
                self.records.load(Relaxed),
            ),
            (
                "gm_estimated_responses_total",
                "Responses whose tokens were estimated.",
                self.estimated.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            series(&mut out, name, "counter", help, v);
        }
        let _ = writeln!(
            out,
            "# HELP gm_cost_total Cost metered (approximate float; billing uses exact decimals).\n# TYPE gm_cost_total counter\ngm_cost_total {}",
            self.cost_nanos.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "# HELP gm_open_streams Metered responses in flight.\n# TYPE gm_open_streams gauge\ngm_open_streams {}",
            self.open_streams.load(Relaxed)
        );
        self.upstream_latency.render(
            &mut out,
            "gm_upstream_latency_seconds",
            "Time to the upstream's response headers.",
        );
        self.ttfb.render(
            &mut out,
            "gm_upstream_ttfb_seconds",
            "Time to the first response body byte.",
        );
        let gauges: [(&str, &str, f64); 6] = [
            (
                "gm_recorder_queue_depth",
                "Records waiting to be written.",
                rec.queued.load(Relaxed) as f64,
            ),
            (
                "gm_recorder_last_flush_seconds",
                "Duration of the last storage flush.",
                rec.last_flush_us.load(Relaxed) as f64 / 1e6,
            ),
            (
                "gm_recorder_records_written_total",
                "Records written to storage.",
                rec.written.load(Relaxed) as f64,
            ),
            (
                "gm_recorder_batches_total",
                "Batches written to storage.",
                rec.batches.load(Relaxed) as f64,
            ),
            (
                "gm_recorder_records_dropped_erased_total",
                "Records of deleted users that settled after the erasure, dropped.",
                rec.dropped_erased.load(Relaxed) as f64,
            ),
            (
                "gm_storage_degraded",
                "1 while storage writes are failing.",
                f64::from(u8::from(rec.degraded.load(Relaxed))),
            ),
        ];
        for (name, help, v) in gauges {
            series(&mut out, name, "gauge", help, v);
        }
        out
    }
}

/// Appends one Prometheus series (its `# HELP` and `# TYPE` lines, then its value) to `out`.
pub fn series(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}
