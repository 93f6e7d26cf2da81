//! One load run from start to end: bring up mock, gateway and nginx, create the users, drive the
//! interleaved rounds, watch the gateway's memory and CPU, check the metering, and stop it all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;

use super::admin::{Admin, Summary};
use super::client::{Phase, run_phase};
use super::procs::{self, Launch, Proc};
use super::report::{KindReport, Metering, NginxStatus, Report, Target, TargetReport};
use super::stats::Tally;
use super::{CallKind, LoadError, Options, configs};

/// How often the gateway's RSS is sampled.
const RSS_EVERY: Duration = Duration::from_millis(50);
/// How long the metering check waits for the recorder to catch up with the tool's count.
const METERING_WAIT: Duration = Duration::from_secs(30);
/// After the counts match, how long the check keeps watching for records beyond them.
const METERING_SETTLE: Duration = Duration::from_millis(500);

/// Runs the whole load test described by `opts` and returns its report.
///
/// # Errors
/// When a process cannot be started, the admin API fails, or the options cannot work. Failed
/// requests are not errors: they are counted in the report.
pub async fn run(opts: &Options) -> Result<Report, LoadError> {
    validate(opts)?;
    let dir = tempfile::Builder::new()
        .prefix("gemini-meter-loadtest-")
        .tempdir()
        .map_err(LoadError::io("creating the temp dir"))?;
    let secret = gemini_meter_secret()?;

    let (mock, mock_addr) = procs::start_mock(&opts.binary, opts.chunks, opts.chunk_delay, opts.ttfb).await?;
    let config_path = dir.path().join("gemini-meter.toml");
    std::fs::write(&config_path, configs::gateway_toml(mock_addr, &dir.path().join("data")))
        .map_err(LoadError::io("writing the gateway config"))?;
    let (gateway, gw_addr) = procs::start_gateway(
        &opts.binary,
        Launch::Direct,
        &config_path,
        &secret,
        "loadtest-upstream-key",
        opts.gateway_workers,
    )
    .await?;
    let admin = Admin::new(gw_addr, secret);
    let mut keys = Vec::with_capacity(opts.users);
    for i in 0..opts.users {
        let key = admin.user_with_key(&format!("load-{i}"), configs::TIER).await?;
        keys.push(HeaderValue::from_str(&key).map_err(|e| LoadError::Admin(format!("key is not a header: {e}")))?);
    }
    let gw_keys = Arc::new(keys);
    let (nginx, nginx_status) = start_nginx(opts, dir.path(), mock_addr).await;
    let hyper = if opts.no_hyper {
        None
    } else {
        Some(procs::start_passthrough(&opts.binary, Launch::Direct, mock_addr).await?)
    };

    let mut targets: Vec<(Target, SocketAddr, Arc<Vec<HeaderValue>>)> = vec![
        (Target::Direct, mock_addr, Arc::new(Vec::new())),
        (Target::Gateway, gw_addr, gw_keys),
    ];
    if let Some((_, addr)) = &nginx {
        targets.push((Target::Nginx, *addr, Arc::new(Vec::new())));
    }
    if let Some((_, addr)) = &hyper {
        targets.push((Target::Hyper, *addr, Arc::new(Vec::new())));
    }

    let rss_start = procs::rss_bytes(gateway.pid()).unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampler = spawn_rss_sampler(gateway.pid(), peak.clone());

    // Every successful gateway request, warm-up included: the ledger must hold exactly these.
    let mut gateway_ok = 0u64;
    let mut gateway_failed = 0u64;
    let mut kinds = Vec::new();
    for &kind in opts.mode.kinds() {
        let phase = |addr: SocketAddr, keys: &Arc<Vec<HeaderValue>>, duration: Duration| Phase {
            addr,
            kind,
            keys: keys.clone(),
            concurrency: opts.concurrency,
            duration,
            chunks: opts.chunks,
            stagger: match kind {
                CallKind::Sse => opts.chunk_delay,
                CallKind::Unary => Duration::ZERO,
            },
            requests: None,
            tls: None,
            fresh: false,
        };
        if !opts.warmup.is_zero() {
            for (target, addr, keys) in &targets {
                tracing::info!("{} warm-up: {}", kind.as_str(), target.as_str());
                let t = run_phase(&phase(*addr, keys, opts.warmup)).await;
                if *target == Target::Gateway {
                    gateway_ok += t.ok;
                    gateway_failed += t.errors.total();
                }
            }
        }
        let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
        // CPU time of each target's process over the measured rounds (none for direct).
        let mut cpu: Vec<Option<Duration>> = targets.iter().map(|_| None).collect();
        for round in 1..=opts.rounds {
            for (i, (target, addr, keys)) in targets.iter().enumerate() {
                tracing::info!("{} round {round}/{}: {}", kind.as_str(), opts.rounds, target.as_str());
                let cpu_pid = match target {
                    Target::Gateway => Some(gateway.pid()),
                    Target::Nginx => nginx.as_ref().map(|(p, _)| p.pid()),
                    Target::Hyper => hyper.as_ref().map(|(p, _)| p.pid()),
                    Target::Direct => None,
                };
                let before = cpu_pid.map(tree_cpu);
                let t = run_phase(&phase(*addr, keys, opts.duration)).await;
                if let (Some(pid), Some(b), Some(slot)) = (cpu_pid, before, cpu.get_mut(i)) {
                    *slot = Some(slot.unwrap_or_default() + tree_cpu(pid).saturating_sub(b));
                }
                if *target == Target::Gateway {
                    gateway_ok += t.ok;
                    gateway_failed += t.errors.total();
                }
                tallies[i].merge(&t);
            }
        }
        kinds.push(kind_report(kind, &targets, tallies, cpu));
    }

    let tls = if opts.tls {
        let plain = super::tls::Plain {
            pid: gateway.pid(),
            addr: gw_addr,
            keys: &targets[1].2,
        };
        Some(super::tls::measure(opts, mock_addr, dir.path(), plain, &mut gateway_ok, &mut gateway_failed).await)
    } else {
        None
    };

    // A gateway that died under load is a finding, not a reason to lose every figure measured.
    let metering = match check_metering(&admin, gateway_ok, gateway_failed).await {
        Ok(m) => m,
        Err(e) => Metering {
            tool_ok: gateway_ok,
            tool_failed: gateway_failed,
            error: Some(format!("{e}; gateway output: {}", gateway.tail())),
            ..Metering::default()
        },
    };
    sampler.abort();
    let rss_end = procs::rss_bytes(gateway.pid()).unwrap_or(0);
    let rss_peak = peak.load(Ordering::Relaxed).max(rss_end);

    if let Some((p, _)) = nginx {
        p.stop().await;
    }
    if let Some((p, _)) = hyper {
        p.stop().await;
    }
    let gateway_clean_exit = gateway.stop().await;
    let callgrind = match opts.callgrind {
        Some(n) => Some(super::callgrind::measure(opts, n, mock_addr, dir.path()).await),
        None => None,
    };
    mock.stop().await;

    Ok(Report {
        options: opts.clone(),
        nginx: nginx_status,
        kinds,
        gateway_rss_start: rss_start,
        gateway_rss_peak: rss_peak,
        gateway_rss_end: rss_end,
        metering,
        gateway_clean_exit,
        callgrind,
        tls,
    })
}

fn validate(opts: &Options) -> Result<(), LoadError> {
    let bad = |m: &str| Err(LoadError::Options(m.to_string()));
    if opts.concurrency == 0 {
        return bad("--concurrency must be at least 1");
    }
    if opts.rounds == 0 {
        return bad("--rounds must be at least 1");
    }
    if opts.duration.is_zero() {
        return bad("--duration-secs must be more than 0");
    }
    if opts.users == 0 {
        return bad("--users must be at least 1");
    }
    if opts.chunks == 0 {
        return bad("--chunks must be at least 1");
    }
    if opts.callgrind == Some(0) {
        return bad("--callgrind must be at least 1");
    }
    Ok(())
}

/// A random admin token for this run's gateway (it never leaves the child's environment).
pub(crate) fn gemini_meter_secret() -> Result<String, LoadError> {
    random_base62(32)
        .map(|t| format!("adm_{t}"))
        .map_err(|e| LoadError::Admin(format!("cannot make an admin token: {e}")))
}

/// `n` uniformly random base62 characters from the OS's secure source (the same shape as the
/// gateway's own tokens; the load tool does not link the gateway library).
fn random_base62(n: usize) -> Result<String, getrandom::Error> {
    const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf)?;
        // Rejection sampling keeps the distribution uniform (248 = 4 * 62).
        for &b in buf.iter().filter(|&&b| b < 248).take(n - out.len()) {
            out.push(char::from(BASE62[usize::from(b % 62)]));
        }
    }
    Ok(out)
}

/// nginx when wanted and installed; otherwise why not.
async fn start_nginx(
    opts: &Options,
    dir: &std::path::Path,
    mock: SocketAddr,
) -> (Option<(Proc, SocketAddr)>, NginxStatus) {
    if opts.no_nginx {
        return (None, NginxStatus::Skipped("--no-nginx".into()));
    }
    let Some(bin) = procs::find_nginx() else {
        return (
            None,
            NginxStatus::Skipped("nginx not found on PATH or at /usr/sbin/nginx (apt-get install nginx-light)".into()),
        );
    };
    let listen = match procs::free_port() {
        Ok(a) => a,
        Err(e) => return (None, NginxStatus::Skipped(e.to_string())),
    };
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    let conf = dir.join("nginx.conf");
    if let Err(e) = std::fs::write(&conf, configs::nginx_conf(dir, listen, mock, workers, root)) {
        return (None, NginxStatus::Skipped(format!("cannot write nginx.conf: {e}")));
    }
    match procs::start_nginx(&bin, dir, &conf, listen).await {
        Ok(p) => (Some((p, listen)), NginxStatus::Used { workers }),
        Err(e) => (None, NginxStatus::Skipped(e.to_string())),
    }
}

/// CPU time of a process and its direct children (nginx's workers).
fn tree_cpu(pid: u32) -> Duration {
    let own = procs::cpu_time(pid).unwrap_or_default();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .filter_map(procs::cpu_time)
        .fold(own, |a, b| a + b)
}

fn spawn_rss_sampler(pid: u32, peak: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RSS_EVERY);
        loop {
            tick.tick().await;
            match procs::rss_bytes(pid) {
                Some(b) => {
                    peak.fetch_max(b, Ordering::Relaxed);
                }
                None => return,
            }
        }
    })
}

fn kind_report(
    kind: CallKind,
    targets: &[(Target, SocketAddr, Arc<Vec<HeaderValue>>)],
    tallies: Vec<Tally>,
    cpu: Vec<Option<Duration>>,
) -> KindReport {
    let per_request = |cpu: Duration, t: &Tally| {
        let n = t.ok + t.errors.total();
        (n > 0).then(|| cpu / u32::try_from(n).unwrap_or(u32::MAX))
    };
    let rows = targets
        .iter()
        .zip(tallies)
        .zip(cpu)
        .map(|(((target, _, _), tally), cpu)| TargetReport {
            target: *target,
            cpu_per_request: cpu.and_then(|c| per_request(c, &tally)),
            cpu_cores: cpu.map(|c| {
                let wall = tally.elapsed.as_secs_f64();
                if wall > 0.0 { c.as_secs_f64() / wall } else { 0.0 }
            }),
            tally,
        })
        .collect();
    KindReport { kind, rows }
}

/// Waits until the ledger's month totals reach the tool's count (or the wait runs out), then
/// watches a little longer so that extra records would show too.
async fn check_metering(admin: &Admin, ok: u64, failed: u64) -> Result<Metering, LoadError> {
    let started = tokio::time::Instant::now();
    let deadline = started + METERING_WAIT;
    let mut s: Summary;
    loop {
        s = admin.summary().await?;
        if s.messages >= ok || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // How far the recorder was behind the load when it stopped (its backlog is held in memory).
    let catch_up = started.elapsed();
    tokio::time::sleep(METERING_SETTLE).await;
    s = admin.summary().await?;
    // Every answered call leaves a message_sent and an ai_response record; a failed one may
    // leave fewer, so the record count is only exact when nothing failed.
    let expected_records = (failed == 0).then_some(2 * ok);
    let pass = s.messages == ok && expected_records.is_none_or(|r| r == s.records);
    Ok(Metering {
        tool_ok: ok,
        tool_failed: failed,
        ledger_messages: s.messages,
        ledger_records: s.records,
        expected_records,
        ledger_tokens: s.tokens,
        catch_up,
        pass,
        error: None,
    })
}
