//! The report of a load run: the table for people and the JSON for machines, plus the issue's
//! targets judged from the figures.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::callgrind::CallgrindStatus;
use super::stats::{Hist, Tally};
use super::{CallKind, Options};

/// What the client drove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The mock, no proxy in between (the baseline).
    Direct,
    /// The gateway in front of the mock.
    Gateway,
    /// `--replicas N`: N gateways in cluster mode (one Redis, one PostgreSQL), the load spread
    /// over them; its CPU is the replicas' and the engines'.
    Cluster,
    /// nginx in front of the mock.
    Nginx,
    /// A plain hyper proxy (the gateway's HTTP server and client, no metering) in front of the
    /// mock: what the HTTP stack costs by itself.
    Hyper,
}

impl Target {
    /// Name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Gateway => "gateway",
            Target::Cluster => "cluster",
            Target::Nginx => "nginx",
            Target::Hyper => "hyper",
        }
    }
}

/// Whether nginx took part.
#[derive(Debug, Clone)]
pub enum NginxStatus {
    /// Ran with this many worker processes.
    Used {
        /// Worker processes.
        workers: usize,
    },
    /// Left out, and why.
    Skipped(String),
}

/// One target's figures for one call kind.
#[derive(Debug, Clone)]
pub struct TargetReport {
    /// Which target.
    pub target: Target,
    /// Counts and histograms over all rounds.
    pub tally: Tally,
    /// CPU time (user + system) of the proxy process per request; `None` for direct.
    pub cpu_per_request: Option<Duration>,
    /// The proxy's CPU time over the measured wall time (1.0 = one core busy).
    pub cpu_cores: Option<f64>,
}

/// All targets for one call kind.
#[derive(Debug, Clone)]
pub struct KindReport {
    /// Unary or SSE.
    pub kind: CallKind,
    /// One row per target, direct first.
    pub rows: Vec<TargetReport>,
}

impl KindReport {
    fn row(&self, t: Target) -> Option<&TargetReport> {
        self.rows.iter().find(|r| r.target == t)
    }

    /// `target`'s value at quantile `q` of `pick` minus direct's, in ms.
    /// Unjudged lines with the p99 that other targets add (what this machine allows).
    fn references(&self, out: &mut Vec<Check>, lines: [(&'static str, Target); 2], pick: fn(&Tally) -> &Hist) {
        for (what, t) in lines {
            if let Some(v) = self.added(t, 0.99, pick) {
                out.push(Check {
                    what,
                    measured: format!("{v:.3} ms"),
                    met: None,
                });
            }
        }
    }

    fn added(&self, t: Target, q: f64, pick: fn(&Tally) -> &Hist) -> Option<f64> {
        let d = pick(&self.row(Target::Direct)?.tally).ms(q)?;
        let v = pick(&self.row(t)?.tally).ms(q)?;
        Some(v - d)
    }
}

/// The metering check: the ledger against the tool's own count.
#[derive(Debug, Clone, Default)]
pub struct Metering {
    /// Successful gateway requests the tool counted (warm-up included).
    pub tool_ok: u64,
    /// Failed gateway requests the tool counted.
    pub tool_failed: u64,
    /// Messages in the ledger's month totals.
    pub ledger_messages: u64,
    /// Records in the ledger's month totals.
    pub ledger_records: u64,
    /// Records expected (two per call), when exact (no failures).
    pub expected_records: Option<u64>,
    /// Tokens in the ledger's month totals.
    pub ledger_tokens: u64,
    /// From the end of the load until the ledger held every message (the recorder's lag).
    pub catch_up: Duration,
    /// Messages (and records, when exact) match.
    pub pass: bool,
    /// Why the ledger could not be read (the check then fails).
    pub error: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The options it ran with.
    pub options: Options,
    /// nginx used or skipped.
    pub nginx: NginxStatus,
    /// Per call kind.
    pub kinds: Vec<KindReport>,
    /// Gateway RSS after start and user creation, bytes.
    pub gateway_rss_start: u64,
    /// Highest gateway RSS seen (sampled every 50 ms), bytes.
    pub gateway_rss_peak: u64,
    /// Gateway RSS after the load, bytes.
    pub gateway_rss_end: u64,
    /// The metering check.
    pub metering: Metering,
    /// The gateway exited 0 on SIGTERM (drained and flushed).
    pub gateway_clean_exit: bool,
    /// `--callgrind`: instructions per request under valgrind.
    pub callgrind: Option<CallgrindStatus>,
    /// `--tls`: what TLS costs.
    pub tls: Option<super::tls::TlsFigures>,
    /// `--replicas N`: the cluster's own figures.
    pub cluster: Option<ClusterReport>,
}

/// The cluster target's figures beyond its rows (`--replicas N`).
#[derive(Debug, Clone)]
pub struct ClusterReport {
    /// Replicas.
    pub replicas: usize,
    /// CPU of the replicas and each engine, and Redis commands, per call kind.
    pub kinds: Vec<super::cluster::ClusterKind>,
    /// The metering check, through the first replica (month totals of the whole cluster).
    pub metering: Metering,
    /// From the end of the run until PostgreSQL's ledger held every record, or why unknown.
    pub shipping_lag: Result<Duration, String>,
    /// Every replica exited 0 on SIGTERM.
    pub clean_exit: bool,
}

impl ClusterReport {
    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "cluster: {} replicas on one Redis and one PostgreSQL (connections spread evenly; its cpu/req counts replicas and engines)",
            self.replicas
        );
        for k in &self.kinds {
            let per = |d: Duration| opt_us(k.per_request(d));
            let _ = writeln!(
                s,
                "  {:<6} per request: replicas {} µs, redis {} µs, postgres {} µs; redis round trips {} (admission), {} (settlement); redis commands {} (scripts' included)",
                k.kind.as_str(),
                per(k.used.replicas_cpu),
                per(k.used.redis_cpu),
                per(k.used.postgres_cpu),
                k.trips_per_request()
                    .map_or_else(|| "-".into(), |t| format!("{:.2}", t.0)),
                k.trips_per_request()
                    .map_or_else(|| "-".into(), |t| format!("{:.3}", t.1)),
                k.redis_per_request().map_or_else(|| "-".into(), |r| format!("{r:.2}")),
            );
        }
        let m = &self.metering;
        let _ = writeln!(
            s,
            "  metering: {} successful requests ({} failed); month totals: {} messages, {} records{}: {}",
            m.tool_ok,
            m.tool_failed,
            m.ledger_messages,
            m.ledger_records,
            m.expected_records
                .map_or_else(String::new, |r| format!(" (expected {r})")),
            if m.pass { "PASS" } else { "FAIL" }
        );
        if let Some(e) = &m.error {
            let _ = writeln!(s, "  metering check could not read the totals: {e}");
        }
        let lag = match &self.shipping_lag {
            Ok(d) => format!("{:.2} s after the run", d.as_secs_f64()),
            Err(e) => format!("not measured: {e}"),
        };
        let _ = writeln!(s, "  ledger in PostgreSQL complete: {lag}");
        let _ = writeln!(
            s,
            "  replicas exited cleanly on SIGTERM: {}",
            if self.clean_exit { "yes" } else { "NO" }
        );
        s
    }

    fn json(&self) -> Value {
        let kinds: Vec<Value> = self
            .kinds
            .iter()
            .map(|k| {
                let us = |d: Duration| k.per_request(d).map(|d| d.as_secs_f64() * 1e6);
                json!({
                    "kind": k.kind.as_str(),
                    "requests": k.requests,
                    "cpu_per_request_us": {
                        "replicas": us(k.used.replicas_cpu), "redis": us(k.used.redis_cpu),
                        "postgres": us(k.used.postgres_cpu), "total": us(k.used.total_cpu()),
                    },
                    "redis_commands_per_request": k.redis_per_request(),
                    "redis_round_trips_per_request": k.trips_per_request().map(|t| json!({"admission": t.0, "settlement": t.1})),
                })
            })
            .collect();
        let m = &self.metering;
        json!({
            "replicas": self.replicas,
            "kinds": kinds,
            "metering": {
                "tool_ok": m.tool_ok, "tool_failed": m.tool_failed, "ledger_messages": m.ledger_messages,
                "ledger_records": m.ledger_records, "expected_records": m.expected_records,
                "catch_up_s": m.catch_up.as_secs_f64(), "pass": m.pass, "error": m.error,
            },
            "shipping_lag_s": self.shipping_lag.as_ref().ok().map(Duration::as_secs_f64),
            "shipping_lag_error": self.shipping_lag.as_ref().err(),
            "clean_exit": self.clean_exit,
        })
    }
}

/// One of the targets, judged.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is required.
    pub what: &'static str,
    /// The measured value, as text.
    pub measured: String,
    /// Met, not met, or `None` when it could not be judged (e.g. nginx skipped).
    pub met: Option<bool>,
}

fn mb(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn opt_us(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e6))
}

impl Report {
    /// Every metered request is in its ledger: the gateway's, and the cluster's when it ran.
    pub fn metering_pass(&self) -> bool {
        self.metering.pass && self.cluster.as_ref().is_none_or(|c| c.metering.pass)
    }

    /// The targets, judged from this run.
    pub fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let kind = |k: CallKind| self.kinds.iter().find(|r| r.kind == k);
        if let Some(u) = kind(CallKind::Unary) {
            let gw = u.row(Target::Gateway).map(|r| r.tally.rps());
            let ng = u.row(Target::Nginx).map(|r| r.tally.rps());
            let ratio = gw.zip(ng).and_then(|(g, n)| (n > 0.0).then(|| g / n));
            out.push(Check {
                what: "unary: gateway req/s >= 0.9 x nginx",
                measured: ratio.map_or_else(|| "nginx not run".into(), |r| format!("{r:.2} x")),
                met: ratio.map(|r| r >= 0.9),
            });
            let p99 = u.added(Target::Gateway, 0.99, |t| &t.latency);
            out.push(Check {
                what: "unary: gateway p99 added over direct <= 1 ms",
                measured: format!("{} ms", opt_ms(p99)),
                met: p99.map(|v| v <= 1.0),
            });
            // The HTTP stack alone, measured alike: how much of the distance is hyper's.
            let hy = u.row(Target::Hyper).map(|r| r.tally.rps());
            if let Some(r) = hy.zip(ng).and_then(|(h, n)| (n > 0.0).then(|| h / n)) {
                out.push(Check {
                    what: "unary, for reference: hyper req/s / nginx req/s",
                    measured: format!("{r:.2} x"),
                    met: None,
                });
            }
            u.references(
                &mut out,
                [
                    ("unary, for reference: hyper p99 added", Target::Hyper),
                    ("unary, for reference: nginx p99 added", Target::Nginx),
                ],
                |t| &t.latency,
            );
        }
        if let Some(s) = kind(CallKind::Sse) {
            let gw = s.row(Target::Gateway);
            let errors = gw.map(|r| r.tally.errors.total());
            out.push(Check {
                what: "sse: no gateway errors",
                measured: format!(
                    "{} errors at {} concurrent streams",
                    errors.unwrap_or(0),
                    self.options.concurrency
                ),
                met: errors.map(|e| e == 0),
            });
            let gap = s.added(Target::Gateway, 0.99, |t| &t.gap);
            out.push(Check {
                what: "sse: gateway gap per chunk p99 added < 1 ms",
                measured: format!("{} ms", opt_ms(gap)),
                met: gap.map(|v| v < 1.0),
            });
            s.references(
                &mut out,
                [
                    ("sse, for reference: hyper gap p99 added", Target::Hyper),
                    ("sse, for reference: nginx gap p99 added", Target::Nginx),
                ],
                |t| &t.gap,
            );
        }
        out.push(Check {
            what: "gateway RSS peak < 100 MB",
            measured: format!("{:.1} MB", mb(self.gateway_rss_peak)),
            met: Some(self.gateway_rss_peak < 100 * 1024 * 1024),
        });
        out.push(Check {
            what: "every gateway request metered",
            measured: format!(
                "ledger {} messages for {} requests",
                self.metering.ledger_messages, self.metering.tool_ok
            ),
            met: Some(self.metering.pass),
        });
        out
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let o = &self.options;
        let mut s = String::new();
        let nginx = match &self.nginx {
            NginxStatus::Used { workers } => format!("nginx with {workers} workers"),
            NginxStatus::Skipped(why) => format!("nginx skipped: {why}"),
        };
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let hyper = if self.kinds.iter().any(|k| k.row(Target::Hyper).is_some()) {
            "; hyper: the gateway's HTTP server and client alone (no keys, quotas, metering or records)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "gemini-meter loadtest: {} cores; concurrency {}; {} rounds x {:.1} s per target (+{:.1} s warm-up); {} users; mock: {} chunks {} ms apart{}, ttfb {} ms; {nginx}{hyper}",
            cores,
            o.concurrency,
            o.rounds,
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.users,
            o.chunks,
            o.chunk_delay.as_millis(),
            if o.chunk_delay.is_zero() {
                ""
            } else {
                " (SSE streams started spread over one gap)"
            },
            o.ttfb.as_millis(),
        );
        for k in &self.kinds {
            let _ = writeln!(s);
            let sse = k.kind == CallKind::Sse;
            let _ = writeln!(
                s,
                "{} ({}), latencies in ms, +: added over direct",
                k.kind.as_str(),
                if sse {
                    "POST :streamGenerateContent?alt=sse, latency = whole stream"
                } else {
                    "POST :generateContent"
                }
            );
            let mut head = format!(
                "{:<8} {:>9} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
                "target", "req/s", "ok", "errors", "p50", "p99", "p99.9", "+p50", "+p99", "ttfb p50"
            );
            if sse {
                let _ = write!(
                    head,
                    " {:>9} {:>9} {:>9} {:>9} {:>9}",
                    "ttfb p99", "gap p50", "gap p99", "+gap p50", "+gap p99"
                );
            }
            let _ = write!(head, " {:>10} {:>9}", "cpu/req µs", "cpu cores");
            let _ = writeln!(s, "{head}");
            for r in &k.rows {
                let t = &r.tally;
                let _ = write!(
                    s,
                    "{:<8} {:>9.0} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
                    r.target.as_str(),
                    t.rps(),
                    t.ok,
                    t.errors.total(),
                    opt_ms(t.latency.ms(0.5)),
                    opt_ms(t.latency.ms(0.99)),
                    opt_ms(t.latency.ms(0.999)),
                    opt_ms(
                        k.added(r.target, 0.5, |t| &t.latency)
                            .filter(|_| r.target != Target::Direct)
                    ),
                    opt_ms(
                        k.added(r.target, 0.99, |t| &t.latency)
                            .filter(|_| r.target != Target::Direct)
                    ),
                    opt_ms(t.ttfb.ms(0.5)),
                );
                if sse {
                    let _ = write!(
                        s,
                        " {:>9} {:>9} {:>9} {:>9} {:>9}",
                        opt_ms(t.ttfb.ms(0.99)),
                        opt_ms(t.gap.ms(0.5)),
                        opt_ms(t.gap.ms(0.99)),
                        opt_ms(
                            k.added(r.target, 0.5, |t| &t.gap)
                                .filter(|_| r.target != Target::Direct)
                        ),
                        opt_ms(
                            k.added(r.target, 0.99, |t| &t.gap)
                                .filter(|_| r.target != Target::Direct)
                        ),
                    );
                }
                let _ = writeln!(
                    s,
                    " {:>10} {:>9}",
                    opt_us(r.cpu_per_request),
                    r.cpu_cores.map_or_else(|| "-".into(), |c| format!("{c:.2}"))
                );
                let e = t.errors;
                if e.total() > 0 {
                    let _ = writeln!(
                        s,
                        "         errors: {} non-200, {} transport, {} short streams",
                        e.status, e.transport, e.short_stream
                    );
                }
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "gateway RSS: {:.1} MB at start, {:.1} MB peak, {:.1} MB at end; exited cleanly on SIGTERM: {}",
            mb(self.gateway_rss_start),
            mb(self.gateway_rss_peak),
            mb(self.gateway_rss_end),
            if self.gateway_clean_exit { "yes" } else { "NO" }
        );
        let m = &self.metering;
        let _ = writeln!(
            s,
            "metering: {} successful gateway requests ({} failed, warm-up included); ledger: {} messages, {} records{}, {} tokens, complete {:.2} s after the load: {}",
            m.tool_ok,
            m.tool_failed,
            m.ledger_messages,
            m.ledger_records,
            m.expected_records
                .map_or_else(String::new, |r| format!(" (expected {r})")),
            m.ledger_tokens,
            m.catch_up.as_secs_f64(),
            if m.pass { "PASS" } else { "FAIL" }
        );
        if let Some(e) = &m.error {
            let _ = writeln!(s, "metering check could not read the ledger: {e}");
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "targets (issue 6):");
        for c in self.checks() {
            let verdict = match c.met {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None if c.what.contains("for reference") => "reference",
                None => "not judged",
            };
            let _ = writeln!(s, "  {:<48} {:<40} {verdict}", c.what, c.measured);
        }
        if let Some(c) = &self.cluster {
            s.push_str(&c.table());
        }
        if let Some(t) = &self.tls {
            s.push_str(&t.table());
        }
        if let Some(c) = &self.callgrind {
            s.push_str(&c.table());
        }
        s
    }

    /// The machine-readable report.
    pub fn json(&self) -> Value {
        let o = &self.options;
        let hist = |h: &Hist| {
            json!({
                "count": h.len(),
                "p50_ms": h.ms(0.5), "p99_ms": h.ms(0.99), "p999_ms": h.ms(0.999), "max_ms": h.ms(1.0),
            })
        };
        let kinds: Vec<Value> = self
            .kinds
            .iter()
            .map(|k| {
                let rows: Vec<Value> = k
                    .rows
                    .iter()
                    .map(|r| {
                        let t = &r.tally;
                        let added = |q: f64, pick: fn(&Tally) -> &Hist| {
                            if r.target == Target::Direct {
                                None
                            } else {
                                k.added(r.target, q, pick)
                            }
                        };
                        json!({
                            "target": r.target.as_str(),
                            "requests_per_sec": t.rps(),
                            "ok": t.ok,
                            "errors": {"total": t.errors.total(), "status": t.errors.status,
                                       "transport": t.errors.transport, "short_stream": t.errors.short_stream},
                            "elapsed_s": t.elapsed.as_secs_f64(),
                            "latency": hist(&t.latency),
                            "ttfb": hist(&t.ttfb),
                            "gap": hist(&t.gap),
                            "added_p50_ms": added(0.5, |t| &t.latency),
                            "added_p99_ms": added(0.99, |t| &t.latency),
                            "added_gap_p50_ms": added(0.5, |t| &t.gap),
                            "added_gap_p99_ms": added(0.99, |t| &t.gap),
                            "cpu_per_request_us": r.cpu_per_request.map(|d| d.as_secs_f64() * 1e6),
                            "cpu_cores": r.cpu_cores,
                        })
                    })
                    .collect();
                json!({"kind": k.kind.as_str(), "targets": rows})
            })
            .collect();
        let checks: Vec<Value> = self
            .checks()
            .into_iter()
            .map(|c| json!({"target": c.what, "measured": c.measured, "met": c.met}))
            .collect();
        let m = &self.metering;
        json!({
            "options": {
                "mode": o.mode.kinds().iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                "concurrency": o.concurrency, "duration_s": o.duration.as_secs_f64(), "rounds": o.rounds,
                "warmup_s": o.warmup.as_secs_f64(), "chunks": o.chunks,
                "chunk_delay_ms": o.chunk_delay.as_millis() as u64, "ttfb_ms": o.ttfb.as_millis() as u64,
                "users": o.users,
            },
            "cores": std::thread::available_parallelism().map_or(0, usize::from),
            "nginx": match &self.nginx {
                NginxStatus::Used { workers } => json!({"used": true, "workers": workers}),
                NginxStatus::Skipped(why) => json!({"used": false, "skipped": why}),
            },
            "kinds": kinds,
            "gateway_rss_bytes": {"start": self.gateway_rss_start, "peak": self.gateway_rss_peak, "end": self.gateway_rss_end},
            "gateway_clean_exit": self.gateway_clean_exit,
            "metering": {
                "tool_ok": m.tool_ok, "tool_failed": m.tool_failed, "ledger_messages": m.ledger_messages,
                "ledger_records": m.ledger_records, "expected_records": m.expected_records,
                "ledger_tokens": m.ledger_tokens, "catch_up_s": m.catch_up.as_secs_f64(), "pass": m.pass,
                "error": m.error,
            },
            "checks": checks,
            "callgrind": self.callgrind.as_ref().map(CallgrindStatus::json),
            "tls": self.tls.as_ref().map(super::tls::TlsFigures::json),
            "cluster": self.cluster.as_ref().map(ClusterReport::json),
        })
    }
}
