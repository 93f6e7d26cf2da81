//! `loadtest --callgrind N`: a deterministic count of the work per request, for a machine whose
//! timings are noisy and whose `perf stat` has no hardware counters.
//!
//! The gateway and the `hyper` target each run under `valgrind --tool=callgrind` (the mock and
//! this client run natively), get a warm-up, then exactly `N` unary requests. Callgrind's counters
//! are zeroed (`callgrind_control -z`) just before the `N` and dumped (`-d`) just after, so
//! start-up, user creation and warm-up are left out. What the process does without requests in
//! the same wall time (timers, the recorder's ticks: valgrind stretches a run some fifty times,
//! and these with it) is measured right after in the same way and subtracted. The figure is
//! user-space instructions (callgrind's `Ir`, every thread of the process); the kernel's part of
//! a request (its syscalls) is not in it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde_json::{Value, json};
use tokio::process::Command;

use super::admin::Admin;
use super::client::{Phase, run_phase};
use super::procs::{self, Launch, Proc};
use super::report::Target;
use super::{CallKind, LoadError, Options, configs};

/// Warm-up requests before the count (connections opened, pools and caches filled).
const WARMUP: u64 = 200;
/// Requests in flight during the count. Valgrind runs one thread at a time, so more would not
/// go faster; a few keep the server's connections and tasks interleaving as under load.
pub const CONCURRENCY: usize = 4;
/// How long `callgrind_control` may take to have a command carried out.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the counted requests' phase (they finish long before under any sane valgrind).
const PHASE_LIMIT: Duration = Duration::from_secs(3600);

/// Whether the count ran.
#[derive(Debug, Clone)]
pub enum CallgrindStatus {
    /// Counted.
    Measured(Callgrind),
    /// Not run, and why.
    Skipped(String),
}

/// The count for each target.
#[derive(Debug, Clone)]
pub struct Callgrind {
    /// Requests counted per target.
    pub requests: u64,
    /// Warm-up requests before them.
    pub warmup: u64,
    /// Requests in flight.
    pub concurrency: usize,
    /// Gateway, then hyper (unless `--no-hyper`).
    pub rows: Vec<(Target, Result<Count, String>)>,
}

/// One target's count.
#[derive(Debug, Clone)]
pub struct Count {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Instructions from just before the first counted request to just after the last.
    pub instructions: u64,
    /// Instructions of the same process in the same wall time without requests.
    pub idle_instructions: u64,
    /// Wall time of the counted requests.
    pub elapsed: Duration,
    /// The gateway's ledger: messages after the count (warm-up included), read back to show the
    /// requests were metered under valgrind too.
    pub ledger_messages: Option<u64>,
}

impl Count {
    /// User-space instructions per request, the idle work subtracted.
    pub fn per_request(&self) -> Option<f64> {
        let n = self.ok + self.errors;
        (n > 0).then(|| self.instructions.saturating_sub(self.idle_instructions) as f64 / n as f64)
    }
}

/// `valgrind` and `callgrind_control` on PATH.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.is_file())
    };
    Some((find("valgrind")?, find("callgrind_control")?))
}

/// Counts `requests` unary requests through the gateway and the hyper target in front of `mock`.
pub async fn measure(opts: &Options, requests: u64, mock: SocketAddr, dir: &Path) -> CallgrindStatus {
    let Some((valgrind, control)) = tools() else {
        return CallgrindStatus::Skipped(
            "valgrind or callgrind_control not found on PATH (apt-get install valgrind)".into(),
        );
    };
    let warmup = requests.min(WARMUP);
    let wrap = |name: &str| -> Vec<OsString> {
        let mut out = OsString::from("--callgrind-out-file=");
        out.push(dir.join(format!("callgrind.{name}.out")));
        vec![valgrind.clone().into_os_string(), "--tool=callgrind".into(), out]
    };
    let counter = Counter {
        control,
        requests,
        warmup,
        chunks: opts.chunks,
    };
    let mut rows = Vec::new();
    let gw = counter
        .gateway(opts, &wrap("gateway"), mock, dir)
        .await
        .map_err(|e| e.to_string());
    rows.push((Target::Gateway, gw));
    if !opts.no_hyper {
        let hyper = counter
            .hyper(&opts.binary, &wrap("hyper"), mock)
            .await
            .map_err(|e| e.to_string());
        rows.push((Target::Hyper, hyper));
    }
    CallgrindStatus::Measured(Callgrind {
        requests,
        warmup,
        concurrency: CONCURRENCY,
        rows,
    })
}

struct Counter {
    control: PathBuf,
    requests: u64,
    warmup: u64,
    chunks: u32,
}

impl Counter {
    async fn gateway(
        &self,
        opts: &Options,
        wrap: &[OsString],
        mock: SocketAddr,
        dir: &Path,
    ) -> Result<Count, LoadError> {
        let config = dir.join("callgrind-gateway.toml");
        std::fs::write(&config, configs::gateway_toml(mock, &dir.join("callgrind-data")))
            .map_err(LoadError::io("writing the callgrind gateway's config"))?;
        let secret = super::run::gemini_meter_secret()?;
        let (proc, addr) = procs::start_gateway(
            &opts.binary,
            Launch::Under(wrap),
            &config,
            &secret,
            "loadtest-upstream-key",
            opts.gateway_workers,
        )
        .await?;
        let admin = Admin::new(addr, secret);
        let mut keys = Vec::with_capacity(opts.users);
        for i in 0..opts.users {
            let key = admin.user_with_key(&format!("load-{i}"), configs::TIER).await?;
            keys.push(HeaderValue::from_str(&key).map_err(|e| LoadError::Admin(format!("key is not a header: {e}")))?);
        }
        let result = self.count(&proc, addr, Arc::new(keys), out_file(wrap)).await;
        let result = match result {
            Ok(mut c) => {
                c.ledger_messages = admin.summary().await.ok().map(|s| s.messages);
                Ok(c)
            }
            Err(e) => Err(e),
        };
        proc.stop().await;
        result
    }

    async fn hyper(&self, binary: &Path, wrap: &[OsString], mock: SocketAddr) -> Result<Count, LoadError> {
        let (proc, addr) = procs::start_passthrough(binary, Launch::Under(wrap), mock).await?;
        let result = self.count(&proc, addr, Arc::new(Vec::new()), out_file(wrap)).await;
        proc.stop().await;
        result
    }

    /// Warm-up, zero, the counted requests, dump; zero, as long idle, dump.
    async fn count(
        &self,
        proc: &Proc,
        addr: SocketAddr,
        keys: Arc<Vec<HeaderValue>>,
        out: PathBuf,
    ) -> Result<Count, LoadError> {
        let phase = |requests: u64| Phase {
            addr,
            kind: CallKind::Unary,
            keys: keys.clone(),
            concurrency: CONCURRENCY,
            duration: PHASE_LIMIT,
            chunks: self.chunks,
            stagger: Duration::ZERO,
            requests: Some(requests),
            tls: None,
            fresh: false,
        };
        if self.warmup > 0 {
            run_phase(&phase(self.warmup)).await;
        }
        let pid = proc.pid();
        self.control(pid, "-z").await?;
        let started = Instant::now();
        let tally = run_phase(&phase(self.requests)).await;
        let elapsed = started.elapsed();
        self.control(pid, "-d").await?;
        let instructions = read_total(&dump_file(&out, 1))?;
        self.control(pid, "-z").await?;
        tokio::time::sleep(elapsed).await;
        self.control(pid, "-d").await?;
        let idle_instructions = read_total(&dump_file(&out, 2))?;
        Ok(Count {
            ok: tally.ok,
            errors: tally.errors.total(),
            instructions,
            idle_instructions,
            elapsed,
            ledger_messages: None,
        })
    }

    /// `callgrind_control <flag> <pid>`; it returns once the process has carried it out (vgdb
    /// wakes a process blocked in a syscall).
    async fn control(&self, pid: u32, flag: &str) -> Result<(), LoadError> {
        let run = Command::new(&self.control).arg(flag).arg(pid.to_string()).output();
        let out = tokio::time::timeout(CONTROL_TIMEOUT, run)
            .await
            .map_err(|_| {
                LoadError::Options(format!(
                    "callgrind_control {flag} did not answer within {CONTROL_TIMEOUT:?}"
                ))
            })?
            .map_err(LoadError::io(format!("running callgrind_control {flag}")))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("OK") {
            return Err(LoadError::Options(format!(
                "callgrind_control {flag} {pid} failed: {} {}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// The `--callgrind-out-file` in a wrapper's command line.
fn out_file(wrap: &[OsString]) -> PathBuf {
    wrap.iter()
        .find_map(|a| a.to_str()?.strip_prefix("--callgrind-out-file=").map(PathBuf::from))
        .unwrap_or_default()
}

/// Callgrind writes its `n`th dump next to the output file, as `<file>.<n>`.
fn dump_file(out: &Path, n: u32) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The event total of a callgrind output file (its `summary:` line; `Ir` is the first event).
fn read_total(path: &Path) -> Result<u64, LoadError> {
    let text = std::fs::read_to_string(path).map_err(LoadError::io(format!("reading {}", path.display())))?;
    parse_total(&text).ok_or_else(|| LoadError::Options(format!("no summary line in {}", path.display())))
}

fn parse_total(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("summary:"))
        .or_else(|| text.lines().find(|l| l.starts_with("totals:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl CallgrindStatus {
    fn ratio(c: &Callgrind) -> Option<f64> {
        let per = |t: Target| {
            c.rows
                .iter()
                .find(|(r, _)| *r == t)
                .and_then(|(_, c)| c.as_ref().ok()?.per_request())
        };
        let (g, h) = (per(Target::Gateway)?, per(Target::Hyper)?);
        (h > 0.0).then(|| g / h)
    }

    /// The report's section.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let c = match self {
            CallgrindStatus::Skipped(why) => {
                let _ = writeln!(s, "\ncallgrind: skipped: {why}");
                return s;
            }
            CallgrindStatus::Measured(c) => c,
        };
        let _ = writeln!(
            s,
            "\ncallgrind: user-space instructions per unary request (valgrind --tool=callgrind), {} requests \
             at concurrency {} after {} warm-up; start-up and warm-up left out (counters zeroed), the \
             process's idle work over the same wall time subtracted",
            c.requests, c.concurrency, c.warmup
        );
        let _ = writeln!(
            s,
            "{:<8} {:>8} {:>6} {:>16} {:>14} {:>8} {:>12}",
            "target", "ok", "errors", "instructions", "idle", "seconds", "per request"
        );
        for (t, r) in &c.rows {
            match r {
                Ok(n) => {
                    let _ = writeln!(
                        s,
                        "{:<8} {:>8} {:>6} {:>16} {:>14} {:>8.1} {:>12}",
                        t.as_str(),
                        n.ok,
                        n.errors,
                        thousands(n.instructions),
                        thousands(n.idle_instructions),
                        n.elapsed.as_secs_f64(),
                        n.per_request().map_or("-".into(), |v| thousands(v.round() as u64)),
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "{:<8} failed: {e}", t.as_str());
                }
            }
        }
        if let Some(r) = Self::ratio(c) {
            let _ = writeln!(s, "gateway / hyper: {r:.2} x");
        }
        if let Some((_, Ok(n))) = c.rows.iter().find(|(t, _)| *t == Target::Gateway)
            && let Some(m) = n.ledger_messages
        {
            let _ = writeln!(
                s,
                "callgrind gateway's ledger: {m} messages for {} successful requests (warm-up included)",
                n.ok + c.warmup
            );
        }
        s
    }

    /// The report's JSON member.
    pub fn json(&self) -> Value {
        let c = match self {
            CallgrindStatus::Skipped(why) => return json!({"skipped": why}),
            CallgrindStatus::Measured(c) => c,
        };
        let rows: Vec<Value> = c
            .rows
            .iter()
            .map(|(t, r)| match r {
                Ok(n) => json!({
                    "target": t.as_str(), "ok": n.ok, "errors": n.errors,
                    "instructions": n.instructions, "idle_instructions": n.idle_instructions,
                    "seconds": n.elapsed.as_secs_f64(), "instructions_per_request": n.per_request(),
                    "ledger_messages": n.ledger_messages,
                }),
                Err(e) => json!({"target": t.as_str(), "error": e}),
            })
            .collect();
        json!({
            "requests": c.requests, "warmup": c.warmup, "concurrency": c.concurrency,
            "targets": rows, "gateway_over_hyper": Self::ratio(c),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_line_and_names_dumps() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 38056337\n\ntotals: 38058628\n";
        assert_eq!(parse_total(text), Some(38_056_337));
        assert_eq!(parse_total("events: Ir\ntotals: 12\n"), Some(12));
        assert_eq!(parse_total("events: Ir\n"), None);
        assert_eq!(dump_file(Path::new("/t/cg.out"), 2), PathBuf::from("/t/cg.out.2"));
        let wrap: Vec<OsString> = vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--callgrind-out-file=/t/x.out".into(),
        ];
        assert_eq!(out_file(&wrap), PathBuf::from("/t/x.out"));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }

    #[test]
    fn per_request_subtracts_idle_work() {
        let c = Count {
            ok: 1000,
            errors: 0,
            instructions: 40_000_000,
            idle_instructions: 1_000_000,
            elapsed: Duration::from_secs(5),
            ledger_messages: None,
        };
        assert_eq!(c.per_request(), Some(39_000.0));
    }
}
