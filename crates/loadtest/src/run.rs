//! One load run from start to end: bring up mock, gateway and nginx, create the users, drive the
//! interleaved rounds, watch the gateway's memory and CPU, check the metering, and stop it all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;

use super::admin::{Admin, Summary};
use super::client::{Phase, run_phase};
use super::cluster::{Cluster, ClusterKind};
use super::procs::{self, Launch, Proc};
use super::report::{ClusterReport, KindReport, Metering, NginxStatus, Report, Target, TargetReport};
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
    run_with_replicas(opts, 0).await
}

/// A target's address and the keys its workers send.
type Targets = Vec<(Target, SocketAddr, Arc<Vec<HeaderValue>>)>;

/// Successful and failed requests through the metered targets, warm-up included: each ledger
/// must hold exactly its target's successes.
#[derive(Debug, Default)]
struct Counts {
    gateway_ok: u64,
    gateway_failed: u64,
    cluster_ok: u64,
    cluster_failed: u64,
}

impl Counts {
    fn add(&mut self, target: Target, t: &Tally) {
        match target {
            Target::Gateway => {
                self.gateway_ok += t.ok;
                self.gateway_failed += t.errors.total();
            }
            Target::Cluster => {
                self.cluster_ok += t.ok;
                self.cluster_failed += t.errors.total();
            }
            Target::Direct | Target::Nginx | Target::Hyper => {}
        }
    }
}

/// The processes whose CPU each target's rows show.
struct Pids {
    gateway: u32,
    nginx: Option<u32>,
    hyper: Option<u32>,
}

/// [`run`], plus (when `replicas` > 0) a "cluster" target: that many gateways in cluster mode
/// on a Redis and a PostgreSQL the tool starts, the load spread over them.
///
/// # Errors
/// As [`run`]; also when an engine or a replica cannot be started, or a key made on one replica
/// does not work on the others.
pub async fn run_with_replicas(opts: &Options, replicas: usize) -> Result<Report, LoadError> {
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
    let (gateway, gw_addr, admin, keys) = start_embedded(opts, &config_path, &secret).await?;
    let mut targets: Targets = vec![
        (Target::Direct, mock_addr, Arc::new(Vec::new())),
        (Target::Gateway, gw_addr, Arc::new(keys)),
    ];
    let cluster = if replicas > 0 {
        let c = Cluster::start(opts, dir.path(), mock_addr, &secret, replicas).await?;
        let keys = c.users(opts.users).await?;
        targets.push((Target::Cluster, c.addrs()[0], Arc::new(keys)));
        Some(c)
    } else {
        None
    };
    let (nginx, nginx_status, hyper) = start_references(opts, dir.path(), mock_addr, &mut targets).await?;

    let rss_start = procs::rss_bytes(gateway.pid()).unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampler = spawn_rss_sampler(gateway.pid(), peak.clone());

    let pid_of = |p: &Option<(Proc, SocketAddr)>| p.as_ref().map(|(p, _)| p.pid());
    let (nginx_pid, hyper_pid) = (pid_of(&nginx), pid_of(&hyper));
    let pids = Pids {
        gateway: gateway.pid(),
        nginx: nginx_pid,
        hyper: hyper_pid,
    };
    let measured = measure_all(opts, &targets, &pids, cluster.as_ref(), mock_addr, dir.path()).await;
    let Measured {
        kinds,
        cluster_kinds,
        tls,
        counts,
    } = measured;

    // A gateway that died under load is a finding, not a reason to lose every figure measured.
    let metering = metering_of(&admin, counts.gateway_ok, counts.gateway_failed, || gateway.tail()).await;
    let cluster_report = match cluster {
        Some(c) => Some(cluster_figures(c, cluster_kinds, &counts).await),
        None => None,
    };
    sampler.abort();
    let rss_end = procs::rss_bytes(gateway.pid()).unwrap_or(0);
    let rss_peak = peak.load(Ordering::Relaxed).max(rss_end);
    for (p, _) in nginx.into_iter().chain(hyper) {
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
        cluster: cluster_report,
    })
}

/// What the rounds measured, over every call kind (and `--tls`).
struct Measured {
    kinds: Vec<KindReport>,
    cluster_kinds: Vec<ClusterKind>,
    tls: Option<super::tls::TlsFigures>,
    counts: Counts,
}

/// Every call kind's rounds over `targets`, then the TLS comparison when asked for.
async fn measure_all(
    opts: &Options,
    targets: &Targets,
    pids: &Pids,
    cluster: Option<&Cluster>,
    mock_addr: SocketAddr,
    dir: &std::path::Path,
) -> Measured {
    let mut counts = Counts::default();
    let mut kinds = Vec::new();
    let mut cluster_kinds = Vec::new();
    for &kind in opts.mode.kinds() {
        let (k, c) = measure_kind(opts, kind, targets, pids, cluster, &mut counts).await;
        kinds.push(k);
        cluster_kinds.extend(c);
    }
    let tls = if opts.tls {
        let plain = super::tls::Plain {
            pid: pids.gateway,
            addr: targets[1].1,
            keys: &targets[1].2,
        };
        let (ok, failed) = (&mut counts.gateway_ok, &mut counts.gateway_failed);
        Some(super::tls::measure(opts, mock_addr, dir, plain, ok, failed).await)
    } else {
        None
    };
    Measured {
        kinds,
        cluster_kinds,
        tls,
        counts,
    }
}

/// The unmetered proxies the gateway is compared with, added to `targets`: nginx (when wanted
/// and installed; else why not) and the plain hyper proxy (unless left out).
async fn start_references(
    opts: &Options,
    dir: &std::path::Path,
    mock: SocketAddr,
    targets: &mut Targets,
) -> Result<(Option<(Proc, SocketAddr)>, NginxStatus, Option<(Proc, SocketAddr)>), LoadError> {
    let (nginx, nginx_status) = start_nginx(opts, dir, mock).await;
    let hyper = if opts.no_hyper {
        None
    } else {
        Some(procs::start_passthrough(&opts.binary, Launch::Direct, mock).await?)
    };
    if let Some((_, addr)) = &nginx {
        targets.push((Target::Nginx, *addr, Arc::new(Vec::new())));
    }
    if let Some((_, addr)) = &hyper {
        targets.push((Target::Hyper, *addr, Arc::new(Vec::new())));
    }
    Ok((nginx, nginx_status, hyper))
}

/// The embedded gateway on `config`, and the load users made through its admin API: the
/// process, its address, its admin client and the users' keys.
async fn start_embedded(
    opts: &Options,
    config: &std::path::Path,
    secret: &str,
) -> Result<(Proc, SocketAddr, Admin, Vec<HeaderValue>), LoadError> {
    let (gateway, addr) = procs::start_gateway(
        &opts.binary,
        Launch::Direct,
        config,
        secret,
        "loadtest-upstream-key",
        opts.gateway_workers,
    )
    .await?;
    let admin = Admin::new(addr, secret.to_string());
    let mut keys = Vec::with_capacity(opts.users);
    for i in 0..opts.users {
        let key = admin.user_with_key(&format!("load-{i}"), configs::TIER).await?;
        keys.push(HeaderValue::from_str(&key).map_err(|e| LoadError::Admin(format!("key is not a header: {e}")))?);
    }
    Ok((gateway, addr, admin, keys))
}

/// The metering check of one gateway (or cluster) through `admin`; a failure to read the
/// ledger is reported with `tail` (the process's last output).
async fn metering_of(admin: &Admin, ok: u64, failed: u64, tail: impl FnOnce() -> String) -> Metering {
    match check_metering(admin, ok, failed).await {
        Ok(m) => m,
        Err(e) => Metering {
            tool_ok: ok,
            tool_failed: failed,
            error: Some(format!("{e}; output: {}", tail())),
            ..Metering::default()
        },
    }
}

/// The cluster's metering check, shipping lag and clean stop.
async fn cluster_figures(c: Cluster, kinds: Vec<ClusterKind>, counts: &Counts) -> ClusterReport {
    let metering = metering_of(&c.admin, counts.cluster_ok, counts.cluster_failed, || c.tails()).await;
    // Two records (message_sent, ai_response) per successful call.
    let shipping_lag = c.shipping_lag(2 * counts.cluster_ok).await;
    let replicas = c.replica_count();
    let clean_exit = c.stop().await;
    ClusterReport {
        replicas,
        kinds,
        metering,
        shipping_lag,
        clean_exit,
    }
}

/// Warm-up and measured rounds of one call kind over every target, interleaved.
async fn measure_kind(
    opts: &Options,
    kind: CallKind,
    targets: &Targets,
    pids: &Pids,
    cluster: Option<&Cluster>,
    counts: &mut Counts,
) -> (KindReport, Option<ClusterKind>) {
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
        for (target, addr, keys) in targets {
            tracing::info!("{} warm-up: {}", kind.as_str(), target.as_str());
            let t = drive(*target, &phase(*addr, keys, opts.warmup), cluster).await;
            counts.add(*target, &t);
        }
    }
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    // CPU time of each target's processes over the measured rounds (none for direct).
    let mut cpu: Vec<Option<Duration>> = targets.iter().map(|_| None).collect();
    let mut cluster_kind = cluster.map(|_| ClusterKind::new(kind));
    for round in 1..=opts.rounds {
        for (i, (target, addr, keys)) in targets.iter().enumerate() {
            tracing::info!("{} round {round}/{}: {}", kind.as_str(), opts.rounds, target.as_str());
            let cpu_pid = match target {
                Target::Gateway => Some(pids.gateway),
                Target::Nginx => pids.nginx,
                Target::Hyper => pids.hyper,
                Target::Direct | Target::Cluster => None,
            };
            let before = cpu_pid.map(tree_cpu);
            let cluster_before = match (target, cluster) {
                (Target::Cluster, Some(c)) => Some(c.usage().await),
                _ => None,
            };
            let t = drive(*target, &phase(*addr, keys, opts.duration), cluster).await;
            if let (Some(pid), Some(b), Some(slot)) = (cpu_pid, before, cpu.get_mut(i)) {
                *slot = Some(slot.unwrap_or_default() + tree_cpu(pid).saturating_sub(b));
            }
            if let (Some(c), Some(b), Some(ck), Some(slot)) =
                (cluster, cluster_before, cluster_kind.as_mut(), cpu.get_mut(i))
            {
                let a = c.usage().await;
                ck.add_phase(&b, &a, t.ok + t.errors.total());
                *slot = Some(slot.unwrap_or_default() + a.total_cpu().saturating_sub(b.total_cpu()));
            }
            counts.add(*target, &t);
            tallies[i].merge(&t);
        }
    }
    (kind_report(kind, targets, tallies, cpu), cluster_kind)
}

/// One phase against `target`: the cluster's spread over its replicas, any other as is.
async fn drive(target: Target, phase: &Phase, cluster: Option<&Cluster>) -> Tally {
    match (target, cluster) {
        (Target::Cluster, Some(c)) => c.run_spread(phase).await,
        _ => run_phase(phase).await,
    }
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
pub(crate) fn tree_cpu(pid: u32) -> Duration {
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

fn kind_report(kind: CallKind, targets: &Targets, tallies: Vec<Tally>, cpu: Vec<Option<Duration>>) -> KindReport {
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
