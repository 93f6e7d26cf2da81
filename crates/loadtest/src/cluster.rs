//! `--replicas N`: N gateways in cluster mode on one Redis and one PostgreSQL that the tool
//! starts itself, driven as one target ("cluster"): the client's connections are spread evenly
//! over the replicas (as an L4 load balancer with keep-alive would pin them), their CPU, and
//! the engines', counted per request, with Redis commands per request and the shipping lag of
//! the ledger to PostgreSQL.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;

use super::admin::Admin;
use super::client::{Phase, connect, run_phase};
use super::engines::Engines;
use super::procs::{self, Launch, Proc};
use super::stats::Tally;
use super::{CallKind, LoadError, Options, configs};

/// The `[cluster]` section added to the generated gateway config.
const CLUSTER_TOML: &str = r#"
[cluster]
redis_url_env = "GEMINI_METER_REDIS_URL"
postgres_url_env = "GEMINI_METER_DATABASE_URL"
on_redis_unavailable = "deny"
"#;
/// How long a key made on the first replica may take to work on the others.
const KEY_SPREAD_WAIT: Duration = Duration::from_secs(10);
/// How long the shipping check waits for PostgreSQL to hold every record.
const SHIPPING_WAIT: Duration = Duration::from_secs(60);

/// The replicas and their engines.
#[derive(Debug)]
pub struct Cluster {
    engines: Engines,
    replicas: Vec<(Proc, SocketAddr)>,
    /// The first replica's admin API (users, keys, month totals).
    pub admin: Admin,
}

/// What the cluster's engines did during one call kind's measured rounds.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineUse {
    /// CPU time of the replicas.
    pub replicas_cpu: Duration,
    /// CPU time of redis-server.
    pub redis_cpu: Duration,
    /// CPU time of the postmaster and its backends.
    pub postgres_cpu: Duration,
    /// Commands Redis processed (INFO's own included, one per reading; the commands the
    /// gateway's scripts run count one each).
    pub redis_commands: u64,
    /// Round trips to Redis the replicas' admissions made (their `/metrics`).
    pub admit_trips: u64,
    /// Round trips (pipelines) to Redis the replicas' settlement made.
    pub settle_trips: u64,
}

impl EngineUse {
    /// All the CPU the cluster spent.
    pub fn total_cpu(&self) -> Duration {
        self.replicas_cpu + self.redis_cpu + self.postgres_cpu
    }

    fn add(&mut self, o: &EngineUse) {
        self.replicas_cpu += o.replicas_cpu;
        self.redis_cpu += o.redis_cpu;
        self.postgres_cpu += o.postgres_cpu;
        self.redis_commands += o.redis_commands;
        self.admit_trips += o.admit_trips;
        self.settle_trips += o.settle_trips;
    }
}

impl Cluster {
    /// Starts the engines and `n` replicas of the gateway on them, in front of `mock`.
    ///
    /// # Errors
    /// When an engine or a replica does not start.
    pub async fn start(
        opts: &Options,
        dir: &Path,
        mock: SocketAddr,
        secret: &str,
        n: usize,
    ) -> Result<Cluster, LoadError> {
        let engines = Engines::start(dir).await?;
        let env = [
            ("GEMINI_METER_REDIS_URL".to_string(), engines.redis_url()),
            ("GEMINI_METER_DATABASE_URL".to_string(), engines.postgres_url()),
        ];
        let mut replicas = Vec::with_capacity(n);
        for i in 0..n {
            let rdir = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&rdir).map_err(LoadError::io("creating a replica's dir"))?;
            let config = rdir.join("gemini-meter.toml");
            let text = configs::gateway_toml(mock, &rdir.join("data")) + CLUSTER_TOML;
            std::fs::write(&config, text).map_err(LoadError::io("writing a replica's config"))?;
            let started = procs::start_gateway_env(
                &opts.binary,
                Launch::Direct,
                &config,
                secret,
                "loadtest-upstream-key",
                opts.gateway_workers,
                &env,
            )
            .await?;
            replicas.push(started);
        }
        let admin = match replicas.first() {
            Some((_, addr)) => Admin::new(*addr, secret.to_string()),
            None => return Err(LoadError::Options("--replicas must be at least 1".into())),
        };
        Ok(Cluster {
            engines,
            replicas,
            admin,
        })
    }

    /// The replicas' addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|(_, a)| *a).collect()
    }

    /// How many replicas.
    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// The last output lines of every replica, for error messages.
    pub fn tails(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, (p, _))| format!("replica {i}: {}", p.tail()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Creates the load users through the first replica and waits until their keys work on
    /// every replica (shared identity).
    ///
    /// # Errors
    /// When the admin API fails or a key is still unknown to a replica after the wait.
    pub async fn users(&self, n: usize) -> Result<Vec<HeaderValue>, LoadError> {
        let mut keys = Vec::with_capacity(n);
        for i in 0..n {
            let key = self.admin.user_with_key(&format!("load-{i}"), configs::TIER).await?;
            keys.push(HeaderValue::from_str(&key).map_err(|e| LoadError::Admin(format!("key is not a header: {e}")))?);
        }
        let deadline = tokio::time::Instant::now() + KEY_SPREAD_WAIT;
        for (i, addr) in self.addrs().into_iter().enumerate() {
            for key in &keys {
                while !key_accepted(addr, key).await? {
                    if tokio::time::Instant::now() > deadline {
                        return Err(LoadError::Admin(format!(
                            "a key made on replica 0 is unknown to replica {i} after {KEY_SPREAD_WAIT:?} (shared identity missing?)"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(keys)
    }

    /// Runs `phase` with its connections spread evenly over the replicas, all at once.
    pub async fn run_spread(&self, phase: &Phase) -> Tally {
        let addrs = self.addrs();
        let n = addrs.len().max(1);
        let handles: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let mut p = phase.clone();
                p.addr = *addr;
                // The first `concurrency % n` replicas take one connection more.
                p.concurrency = phase.concurrency / n + usize::from(i < phase.concurrency % n);
                tokio::spawn(async move {
                    if p.concurrency == 0 {
                        Tally::default()
                    } else {
                        run_phase(&p).await
                    }
                })
            })
            .collect();
        let mut all = Tally::default();
        let mut elapsed = Duration::ZERO;
        for h in handles {
            if let Ok(t) = h.await {
                // The phases ran side by side: wall time is the longest, not the sum.
                elapsed = elapsed.max(t.elapsed);
                all.merge(&t);
            }
        }
        all.elapsed = elapsed;
        all
    }

    /// CPU so far of the replicas, Redis and PostgreSQL, and Redis's command count.
    pub async fn usage(&self) -> EngineUse {
        let tree = super::run::tree_cpu;
        EngineUse {
            replicas_cpu: self.replicas.iter().map(|(p, _)| tree(p.pid())).sum(),
            redis_cpu: tree(self.engines.redis_pid()),
            postgres_cpu: self.engines.postgres_pid().map(tree).unwrap_or_default(),
            redis_commands: self.engines.redis_commands().await.unwrap_or(0),
            admit_trips: self.metric_sum("gm_cluster_admission_round_trips_total").await,
            settle_trips: self.metric_sum("gm_cluster_settlement_round_trips_total").await,
        }
    }

    /// The sum over the replicas of one counter of their `/metrics` (0 when unreadable).
    async fn metric_sum(&self, name: &str) -> u64 {
        let mut sum = 0;
        for (_, addr) in &self.replicas {
            sum += metric(*addr, name).await.unwrap_or(0);
        }
        sum
    }

    /// Waits until PostgreSQL's ledger holds `records` usage records; returns how long that
    /// took, or why it could not be told.
    pub async fn shipping_lag(&self, records: u64) -> Result<Duration, String> {
        let started = tokio::time::Instant::now();
        loop {
            let v = self.engines.sql_value("SELECT count(*) FROM gm_usage_records").await?;
            let have: u64 = v.parse().map_err(|_| format!("count(*) answered {v:?}"))?;
            if have >= records {
                return Ok(started.elapsed());
            }
            if started.elapsed() > SHIPPING_WAIT {
                return Err(format!("{have} of {records} records after {SHIPPING_WAIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM to every replica (each drains and ships), then the engines stop. Returns
    /// whether every replica exited cleanly.
    pub async fn stop(self) -> bool {
        let mut clean = true;
        for (p, _) in self.replicas {
            clean &= p.stop().await;
        }
        self.engines.stop().await;
        clean
    }
}

/// One counter of a replica's `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    use http_body_util::BodyExt;
    let mut sender = connect(addr).await.ok()?;
    let req = Request::builder()
        .method(Method::GET)
        .uri("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// Whether `addr` accepts `key` (`GET /api/usage/current` answers 200).
async fn key_accepted(addr: SocketAddr, key: &HeaderValue) -> Result<bool, LoadError> {
    let mut sender = connect(addr)
        .await
        .map_err(|e| LoadError::Admin(format!("connect to a replica: {e}")))?;
    let req = Request::builder()
        .method(Method::GET)
        .uri("/api/usage/current")
        .header(http::header::HOST, addr.to_string())
        .header("x-goog-api-key", key.clone())
        .body(Full::new(Bytes::new()))
        .map_err(|e| LoadError::Admin(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| LoadError::Admin("a replica did not answer within 10 s".into()))?
        .map_err(|e| LoadError::Admin(format!("/api/usage/current: {e}")))?;
    Ok(resp.status() == StatusCode::OK)
}

/// The cluster's figures for one call kind.
#[derive(Debug, Clone, Copy)]
pub struct ClusterKind {
    /// Unary or SSE.
    pub kind: CallKind,
    /// Requests (ok and failed) in the measured rounds.
    pub requests: u64,
    /// What the engines did meanwhile.
    pub used: EngineUse,
}

impl ClusterKind {
    /// A kind with nothing measured yet.
    pub fn new(kind: CallKind) -> Self {
        ClusterKind {
            kind,
            requests: 0,
            used: EngineUse::default(),
        }
    }

    /// Adds one measured phase: `before` and `after` readings around `requests` requests.
    pub fn add_phase(&mut self, before: &EngineUse, after: &EngineUse, requests: u64) {
        self.requests += requests;
        self.used.add(&EngineUse {
            replicas_cpu: after.replicas_cpu.saturating_sub(before.replicas_cpu),
            redis_cpu: after.redis_cpu.saturating_sub(before.redis_cpu),
            postgres_cpu: after.postgres_cpu.saturating_sub(before.postgres_cpu),
            // Less the INFO that took the `after` reading.
            redis_commands: after.redis_commands.saturating_sub(before.redis_commands + 1),
            admit_trips: after.admit_trips.saturating_sub(before.admit_trips),
            settle_trips: after.settle_trips.saturating_sub(before.settle_trips),
        });
    }

    /// `d` per request.
    pub fn per_request(&self, d: Duration) -> Option<Duration> {
        (self.requests > 0).then(|| d / u32::try_from(self.requests).unwrap_or(u32::MAX))
    }

    /// Redis round trips per request: (admission, settlement).
    pub fn trips_per_request(&self) -> Option<(f64, f64)> {
        let n = self.requests as f64;
        (self.requests > 0).then(|| (self.used.admit_trips as f64 / n, self.used.settle_trips as f64 / n))
    }

    /// Redis commands per request.
    pub fn redis_per_request(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.used.redis_commands as f64 / self.requests as f64)
    }
}
