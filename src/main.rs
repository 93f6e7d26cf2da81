//! The `gemini-meter` binary: parse the command, build the state, run.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gemini_meter::api::audit;
use gemini_meter::app::App;
use gemini_meter::clock::{Month, SharedClock, SystemClock};
use gemini_meter::config::Config;
use gemini_meter::runtime::{EnvLookup, process_env};
use gemini_meter_mock::{MockOptions, MockServer};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "gemini-meter", version, about = "A metering gateway for the Gemini API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the gateway.
    Serve {
        /// Config file.
        #[arg(long, default_value = "config/gemini-meter.toml")]
        config: PathBuf,
    },
    /// Runs the mock upstream and the gateway in one process, with a demo user and key.
    Demo,
    /// A plain hyper reverse proxy to `upstream` (the load tool's "hyper" target).
    #[command(hide = true)]
    LoadtestPassthrough {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// The upstream's address (plain HTTP).
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// Runs the built-in mock of the Gemini API.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// Delay before the first byte, in milliseconds.
        #[arg(long, default_value_t = 0)]
        ttfb_ms: u64,
        /// Number of chunks in a streamed answer.
        #[arg(long, default_value_t = 5)]
        chunks: u32,
        /// Gap between chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_interval_ms: u64,
    },
    /// Load-tests the gateway against the built-in mock, side by side with the mock directly and
    /// with nginx in front of it (when installed), interleaved in one run.
    Loadtest {
        /// Which calls: unary (`:generateContent`), sse (`:streamGenerateContent?alt=sse`) or both.
        #[arg(long, value_enum, default_value_t = LoadMode::Both)]
        mode: LoadMode,
        /// Requests in flight per target, each on its own keep-alive connection.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds of load per target in each round.
        #[arg(long, default_value_t = 3.0)]
        duration_secs: f64,
        /// Rounds; each runs direct, gateway, nginx in turn.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds of unmeasured load per target before the first round.
        #[arg(long, default_value_t = 1.0)]
        warmup_secs: f64,
        /// Stream chunks the mock sends per answer.
        #[arg(long, default_value_t = 5)]
        chunks: u32,
        /// Gap between stream chunks at the mock, in milliseconds; SSE workers start spread over
        /// one such gap, so streams do not all tick in the same millisecond.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
        /// Mock delay before the first byte, in milliseconds.
        #[arg(long, default_value_t = 0)]
        ttfb_ms: u64,
        /// Gateway users the load is spread over (one key each).
        #[arg(long, default_value_t = 16)]
        users: usize,
        /// Leave nginx out even when it is installed.
        #[arg(long)]
        no_nginx: bool,
        /// Leave out the plain hyper proxy (the gateway's HTTP server and client without the
        /// metering), which shows what the HTTP stack costs by itself.
        #[arg(long)]
        no_hyper: bool,
        /// Tokio worker threads of the gateway (default: one per core).
        #[arg(long)]
        gateway_workers: Option<usize>,
        /// After the run, also count the user-space instructions per unary request of the
        /// gateway and the hyper target, each under `valgrind --tool=callgrind`, over this many
        /// requests (e.g. 2000; needs valgrind).
        #[arg(long, value_name = "N")]
        callgrind: Option<u64>,
        /// Also measure TLS termination: a second gateway serving TLS, on kept-alive
        /// connections and with a new connection (and handshake) per request, against the plain
        /// one (needs the openssl command line).
        #[arg(long)]
        tls: bool,
        /// Also drive N gateway replicas in cluster mode (the "cluster" target), on a Redis and
        /// a PostgreSQL the tool starts itself (needs redis-server and PostgreSQL 15+ installed).
        #[arg(long, value_name = "N", default_value_t = 0)]
        replicas: usize,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The admin API from the command line: users, keys, usage, export, reload, audit.
    Admin(gemini_meter::admin_cli::AdminArgs),
    /// Validates a config file.
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = "config/gemini-meter.toml")]
        config: PathBuf,
    },
    /// Prints the effective price table of a config; with --request, the cost of one usage
    /// report (a Gemini response JSON with usageMetadata) line by line.
    Prices {
        /// Config file.
        #[arg(long, default_value = "config/gemini-meter.toml")]
        config: PathBuf,
        /// A response body to price (unary JSON, a stream's body, or OpenAI-compatible JSON).
        #[arg(long)]
        request: Option<PathBuf>,
        /// The model to price it as (default: the response's modelVersion).
        #[arg(long)]
        model: Option<String>,
        /// Price it as Batch API work (the batch discount applies).
        #[arg(long)]
        batch: bool,
    },
}

/// `loadtest --mode` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LoadMode {
    Unary,
    Sse,
    Both,
}

/// jemalloc: under unary load glibc's malloc and free took about 10% of the gateway's CPU
/// (arena locks, `malloc_consolidate` on hyper's buffers); jemalloc's thread caches cut CPU per
/// request by about 15% and RSS with 1,000 open streams stays near 65 MB (mimalloc was as fast
/// but reached 132 MB).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CheckConfig { config } = &cli.command {
        return check_config(config);
    }
    if let Command::Prices {
        config,
        request,
        model,
        batch,
    } = &cli.command
    {
        return prices(config, request.as_deref(), model.as_deref(), *batch);
    }
    // rustls needs exactly one process-wide provider; ignore "already installed".
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The admin command line's stdout is its output (tables or JSON): no log lines there.
    let cli = match cli.command {
        Command::Admin(args) => return ExitCode::from(gemini_meter::admin_cli::run(args)),
        other => Cli { command: other },
    };
    // The load tool's stdout is its report (possibly JSON): its progress goes to stderr.
    let to_stderr = matches!(cli.command, Command::Loadtest { .. });
    tracing_subscriber::fmt()
        .with_writer(move || -> Box<dyn std::io::Write> {
            if to_stderr {
                Box::new(std::io::stderr())
            } else {
                Box::new(std::io::stdout())
            }
        })
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gemini-meter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Demo => demo().await,
            Command::LoadtestPassthrough { listen, upstream } => {
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                tracing::info!("passthrough listening on {}", listener.local_addr()?);
                gemini_meter::proxy::passthrough::serve(listener, upstream, shutdown_signal())
                    .await
                    .context("passthrough failed")
            }
            Command::MockUpstream {
                listen,
                ttfb_ms,
                chunks,
                chunk_interval_ms,
            } => {
                let opts = MockOptions {
                    ttfb: Duration::from_millis(ttfb_ms),
                    chunks,
                    chunk_interval: Duration::from_millis(chunk_interval_ms),
                    ..MockOptions::default()
                };
                let listener = TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                let addr = listener.local_addr()?;
                tracing::info!("mock upstream listening on {addr}");
                tokio::select! {
                    r = gemini_meter_mock::serve(listener, opts) => r.context("mock upstream failed"),
                    _ = shutdown_signal() => Ok(()),
                }
            }
            Command::Loadtest {
                mode,
                concurrency,
                duration_secs,
                rounds,
                warmup_secs,
                chunks,
                chunk_delay_ms,
                ttfb_ms,
                users,
                no_nginx,
                no_hyper,
                gateway_workers,
                callgrind,
                tls,
                replicas,
                json,
            } => {
                let secs = |v: f64, flag: &str| {
                    Duration::try_from_secs_f64(v)
                        .map_err(|_| anyhow::anyhow!("{flag} must be a number of seconds >= 0"))
                };
                let opts = gemini_meter_loadtest::Options {
                    mode: match mode {
                        LoadMode::Unary => gemini_meter_loadtest::Mode::Unary,
                        LoadMode::Sse => gemini_meter_loadtest::Mode::Sse,
                        LoadMode::Both => gemini_meter_loadtest::Mode::Both,
                    },
                    concurrency,
                    duration: secs(duration_secs, "--duration-secs")?,
                    rounds,
                    warmup: secs(warmup_secs, "--warmup-secs")?,
                    chunks,
                    chunk_delay: Duration::from_millis(chunk_delay_ms),
                    ttfb: Duration::from_millis(ttfb_ms),
                    users,
                    no_nginx,
                    no_hyper,
                    gateway_workers,
                    binary: std::env::current_exe().context("locating the gemini-meter binary")?,
                    callgrind,
                    tls,
                };
                let report = gemini_meter_loadtest::run_with_replicas(&opts, replicas).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report.json())?);
                } else {
                    print!("{}", report.table());
                }
                // Missed performance targets are figures; an unmetered request is a failure.
                if !report.metering_pass() {
                    anyhow::bail!("metering check failed: the ledger does not match the requests sent");
                }
                Ok(())
            }
            Command::CheckConfig { .. } | Command::Prices { .. } | Command::Admin(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gemini-meter: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            // The TLS files are part of the config: a certificate that does not load (or a key
            // that does not match it) would stop `serve`.
            if let Some(tls) = &cfg.server.tls {
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                if let Err(e) = gemini_meter::tls::server_config(tls) {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            // Cluster mode counts money in Redis as integers: the limits must fit.
            if cfg.cluster.is_some()
                && let Err(e) = gemini_meter::cluster::quota::Money::for_config(&cfg)
            {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!(
                "{}: valid ({} tiers, {} priced models)",
                path.display(),
                cfg.tiers.len(),
                cfg.pricing.models.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `gemini-meter prices`: the table, or one report's cost.
fn prices(config: &Path, request: Option<&Path>, model: Option<&str>, batch: bool) -> ExitCode {
    use gemini_meter::metering::pricing::Mode;
    use gemini_meter::metering::table::{explain_report, price_table};
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            return ExitCode::FAILURE;
        }
    };
    let Some(path) = request else {
        println!("Prices of {} (USD)\n", config.display());
        print!("{}", price_table(&cfg.pricing));
        return ExitCode::SUCCESS;
    };
    let body = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let mode = if batch { Mode::Batch } else { Mode::Interactive };
    match explain_report(&cfg.pricing, &body, model, mode) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the gateway until a signal, then drains and flushes every record.
async fn run_gateway(
    app: Arc<App>,
    recorder: gemini_meter::ledger::Recorder,
    clock: SharedClock,
    reloadable: bool,
) -> Result<()> {
    let rt = app.live.load();
    let listen = rt.config.server.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let recorder_task = recorder.spawn().context("starting the recorder thread")?;
    // Cluster mode: users, keys, uploads, ownership copied from PostgreSQL before serving.
    let _shared = gemini_meter::replica::start_shared(&app)
        .await
        .context("cluster mode: cannot load the shared users and keys")?;
    // Cluster mode: the settlement pump, the Redis watcher and the heartbeat.
    gemini_meter::replica::start_counters(&app).await;
    // Cluster mode: the local record log is shipped to the PostgreSQL ledger.
    let shipper = gemini_meter::replica::spawn_shipper(&app);
    if reloadable {
        app.live.spawn_watcher(Duration::from_millis(500), clock.clone());
        #[cfg(unix)]
        {
            let app = app.clone();
            if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading the config and the TLS files");
                        let app = app.clone();
                        let _ = tokio::task::spawn_blocking(move || sighup_reload(&app)).await;
                    }
                });
            }
        }
    }
    spawn_retention(app.clone());
    gemini_meter::alerts::spawn_delivery(&app);
    tracing::info!(users = app.registry.user_count(), "gemini-meter listening on {addr}");
    gemini_meter::server::serve(app.clone(), listener, shutdown_signal()).await;
    tracing::info!("draining done; flushing usage records");
    app.recorder.sync().await.context("flushing usage records")?;
    app.store.flush().await.context("flushing storage")?;
    if let Some(shipper) = shipper {
        // Bounded: with PostgreSQL down the records stay on disk and ship at the next start.
        if let Err(e) = gemini_meter::replica::flush(&app, Duration::from_secs(10)).await {
            tracing::warn!(error = %e, "records not shipped to PostgreSQL yet; they ship at the next start");
        }
        shipper.stop().await;
        app.store.flush().await.context("flushing storage")?;
    }
    drop(recorder_task);
    tracing::info!("stopped cleanly; every usage record is on disk");
    Ok(())
}

/// SIGHUP: reloads the config, then the TLS files, and audits both.
fn sighup_reload(app: &App) {
    let now = app.clock.now();
    let result = app.live.reload(now);
    audit::record_internal(app, "config.reload", "sighup", result.map(|()| serde_json::json!({})));
    if let Some(tls) = &app.tls {
        let result = tls.reload(now);
        audit::record_internal(app, "tls.reload", "sighup", result.map(|()| serde_json::json!({})));
    }
}

/// Deletes records older than the retention period once a day.
fn spawn_retention(app: Arc<App>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
        loop {
            tick.tick().await;
            let months = app.live.load().config.storage.retention_months;
            let cutoff = Month::of(app.clock.now()).minus(months).start();
            let result = app.recorder.retention(cutoff).await;
            if let Some(c) = &app.cluster {
                match gemini_meter::cluster::ledger::retention(c, cutoff).await {
                    Ok(dropped) if !dropped.is_empty() => {
                        tracing::info!(?dropped, "retention: ledger partitions dropped")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "retention in PostgreSQL failed"),
                }
            }
            match &result {
                Ok(n) if *n > 0 => tracing::info!(deleted = n, "retention: old records deleted"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "retention failed"),
            }
            let app = app.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let detail = result
                    .map(|n| serde_json::json!({"deleted": n, "cutoff": gemini_meter::clock::rfc3339(cutoff)}))
                    .map_err(|e| e.to_string());
                audit::record_internal(&app, "retention.run", "scheduler", detail);
            })
            .await;
        }
    });
}

async fn serve(path: &Path) -> Result<()> {
    let cfg = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let clock: SharedClock = Arc::new(SystemClock::from_env().context("GEMINI_METER_FAKE_NOW")?);
    let env = process_env();
    let cluster = gemini_meter::cluster::Cluster::connect(&cfg, &env)
        .await
        .context("cluster mode: cannot start")?;
    let (app, recorder) = App::open_with(cfg, Some(path.to_path_buf()), clock.clone(), env, cluster)?;
    run_gateway(app, recorder, clock, true).await
}

const DEMO_UPSTREAM_KEY: &str = "demo-upstream-key";

/// The demo's environment: the process's, plus a placeholder upstream key and a fresh admin
/// token where the process has none (the variables themselves are not set).
fn demo_env(cfg: &Config) -> EnvLookup {
    let upstream_key_env = cfg.upstream.api_key_env.clone();
    let admin_token_env = cfg.server.admin_token_env.clone();
    // Without a random source the demo runs with the admin API off, as `serve` does without a token.
    let admin_token = gemini_meter::identity::keys::random_base62(32)
        .ok()
        .map(|t| format!("adm_{t}"));
    Arc::new(move |name: &str| {
        std::env::var(name).ok().or_else(|| {
            if name == upstream_key_env {
                Some(DEMO_UPSTREAM_KEY.to_string())
            } else if name == admin_token_env {
                admin_token.clone()
            } else {
                None
            }
        })
    })
}

async fn demo() -> Result<()> {
    let mock = MockServer::start("127.0.0.1:0".parse()?, MockOptions::default())
        .await
        .context("starting the mock upstream")?;
    let mut cfg = Config::demo_default();
    cfg.upstream.base_url = format!("http://{}", mock.addr).parse()?;
    cfg.storage.path = PathBuf::from("data-demo");
    if std::net::TcpListener::bind(cfg.server.listen).is_err() {
        cfg.server.listen = "127.0.0.1:0".parse()?;
    }
    let clock: SharedClock = Arc::new(SystemClock::default());
    let env = demo_env(&cfg);
    let (app, recorder) = App::open(cfg, None, clock.clone(), env)?;
    let now = clock.now();
    if app.registry.user("demo").is_none() {
        app.registry.create_user("demo", "free", None, now, Month::of(now))?;
    }
    let (key, _) = app.registry.create_key("demo", now)?;
    app.store.flush().await?;
    let rt = app.live.load();
    let listen = rt.config.server.listen;
    // Bind first so the printed address is the real one.
    let probe = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = probe.local_addr()?;
    drop(probe);
    let mut cfg2 = (*rt.config).clone();
    cfg2.server.listen = addr;
    app.live.replace(cfg2, now)?;
    println!();
    println!(
        "gemini-meter demo: a mock Gemini API at http://{} and the gateway at http://{addr}",
        mock.addr
    );
    println!("demo user: demo (tier free), key: {key}");
    if let Some(t) = &rt.admin_token {
        println!("admin token: {t}");
    }
    println!("try:");
    println!(
        "  curl -s http://{addr}/v1beta/models/gemini-2.5-flash:generateContent -H 'x-goog-api-key: {key}' -H 'Content-Type: application/json' -d '{{\"contents\":[{{\"parts\":[{{\"text\":\"Hello\"}}]}}]}}'"
    );
    println!("  curl -s http://{addr}/api/usage/current -H 'x-goog-api-key: {key}'");
    println!();
    run_gateway(app, recorder, clock, false).await
}
