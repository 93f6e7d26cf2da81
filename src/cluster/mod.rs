//! Cluster mode: several replicas share users, quotas, rate limits and the ledger. Redis holds
//! this month's counters, the reservations of calls in flight and the rate limiters (one atomic
//! script per admission, one per settlement); PostgreSQL holds the ledger (shipped from each
//! replica's local record log), users, keys, upload sessions, resource ownership and alert
//! marks. Without `[cluster]` (or with its Redis variable unset) none of this runs.

pub mod heartbeat;
pub mod ledger;
pub mod migration;
pub mod pg;
pub mod quota;
pub mod schema;
pub mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::{ClusterConfig, Config};
use crate::runtime::EnvLookup;

pub use pg::Pg;

/// Errors of cluster mode's engines.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `[cluster]` is there and Redis is set, but the PostgreSQL variable is not.
    #[error("environment variable {0} (cluster.postgres_url_env) is not set: cluster mode needs PostgreSQL")]
    MissingPostgres(String),
    /// Redis could not be reached or answered with an error.
    #[error("Redis: {0}")]
    Redis(String),
    /// PostgreSQL could not be reached or answered with an error.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The config cannot run in cluster mode.
    #[error("{0}")]
    Config(String),
    /// A URL in the environment is not usable.
    #[error("{var}: {why}")]
    BadUrl {
        /// The variable.
        var: String,
        /// What is wrong (never the URL itself: it may hold a password).
        why: String,
    },
}

impl From<redis::RedisError> for ClusterError {
    fn from(e: redis::RedisError) -> Self {
        ClusterError::Redis(e.to_string())
    }
}

impl From<tokio_postgres::Error> for ClusterError {
    fn from(e: tokio_postgres::Error) -> Self {
        ClusterError::Postgres(pg::describe(&e))
    }
}

/// How long connecting to an engine may take at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The engines of cluster mode and this replica's name among its peers.
pub struct Cluster {
    /// `[cluster]` as configured.
    pub config: ClusterConfig,
    /// This process's id among the replicas (random at each start).
    pub replica: Arc<str>,
    /// Redis: reconnects on its own.
    pub redis: redis::aio::ConnectionManager,
    /// PostgreSQL: reconnects on demand.
    pub pg: Pg,
    /// The shared counters.
    pub quotas: Arc<quota::Quotas>,
    /// Whether PostgreSQL answered the last check.
    pg_ok: AtomicBool,
    /// The ledger shipper's progress (backlog for `/healthz`, `/metrics`, the status).
    pub shipping: Arc<ledger::ShipState>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// The Redis and PostgreSQL URLs of cluster mode, read from the environment; `None` when the
/// config has no `[cluster]` or the Redis variable is unset (one gateway, embedded store).
pub fn urls(config: &Config, env: &EnvLookup) -> Result<Option<(ClusterConfig, String, String)>, ClusterError> {
    let Some(c) = &config.cluster else { return Ok(None) };
    let Some(redis) = env(&c.redis_url_env).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let pg = env(&c.postgres_url_env)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ClusterError::MissingPostgres(c.postgres_url_env.clone()))?;
    Ok(Some((c.clone(), redis, pg)))
}

impl Cluster {
    /// Connects to both engines and runs the schema migrations; `None` outside cluster mode.
    /// Fails with a one-line reason when either engine is unreachable.
    pub async fn connect(config: &Config, env: &EnvLookup) -> Result<Option<Arc<Cluster>>, ClusterError> {
        let Some((cfg, redis_url, pg_url)) = urls(config, env)? else {
            return Ok(None);
        };
        let redis = connect_redis(&cfg.redis_url_env, &redis_url).await?;
        let pg = Pg::new(&cfg.postgres_url_env, &pg_url)?;
        pg.client().await?;
        schema::migrate(&pg).await?;
        let replica = replica_id(&config.storage.path)?;
        let money = quota::Money::for_config(config).map_err(ClusterError::Config)?;
        Ok(Some(Arc::new(Cluster {
            config: cfg,
            quotas: quota::Quotas::new(replica.clone(), money),
            replica,
            redis,
            pg,
            pg_ok: AtomicBool::new(true),
            shipping: Arc::default(),
        })))
    }

    /// Whether PostgreSQL answered the last check.
    pub fn postgres_ok(&self) -> bool {
        self.pg_ok.load(Ordering::Relaxed)
    }

    /// Records not yet shipped to PostgreSQL.
    pub fn shipping_backlog(&self) -> u64 {
        self.shipping.backlog()
    }

    /// Checks PostgreSQL (a `SELECT 1` within a second).
    pub async fn check_postgres(&self) {
        let ok = match self.pg.client().await {
            Ok(c) => matches!(
                tokio::time::timeout(Duration::from_secs(1), c.simple_query("SELECT 1")).await,
                Ok(Ok(_))
            ),
            Err(_) => false,
        };
        if !ok {
            self.pg.reset();
        }
        self.pg_ok.store(ok, Ordering::Relaxed);
    }
}

/// This replica's name: made once per data directory and kept there, so a restarted replica
/// is the same one (its records and its settled watermark in Redis are found again).
fn replica_id(data: &std::path::Path) -> Result<Arc<str>, ClusterError> {
    let io = |e: std::io::Error| ClusterError::Config(format!("{}: {e}", data.display()));
    std::fs::create_dir_all(data).map_err(io)?;
    let path = data.join("cluster-replica-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(Arc::from(s.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let id = crate::identity::keys::random_base62(12).map_err(|e| ClusterError::Config(e.to_string()))?;
    let id = format!("r-{id}");
    std::fs::write(&path, &id).map_err(io)?;
    Ok(Arc::from(id))
}

/// A connection manager for `url`, checked with a PING.
async fn connect_redis(var: &str, url: &str) -> Result<redis::aio::ConnectionManager, ClusterError> {
    let client = redis::Client::open(url).map_err(|e| ClusterError::BadUrl {
        var: var.to_string(),
        why: format!("not a Redis URL ({:?})", e.kind()),
    })?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1);
    let fut = redis::aio::ConnectionManager::new_with_config(client, cfg);
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(ClusterError::Redis(format!("cannot connect ({var}): {e}"))),
        Err(_) => return Err(ClusterError::Redis(format!("cannot connect ({var}): timed out"))),
    };
    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
    pong.map_err(|e| ClusterError::Redis(format!("PING failed ({var}): {e}")))?;
    Ok(conn)
}
