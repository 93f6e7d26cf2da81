//! Test harness: the mock upstream and the gateway in this process, on 127.0.0.1:0, with a
//! temporary sled directory and a config file that tests may edit (hot reload).
#![allow(dead_code)]

pub mod engines;
pub mod records;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use gemini_meter::app::App;
use gemini_meter::clock::SystemClock;
use gemini_meter::config::Config;
use gemini_meter::ledger::Record;
use gemini_meter::ledger::store::RecordFilter;
use gemini_meter::server::Server;
use gemini_meter_mock::{MockOptions, MockServer};
use serde_json::{Value, json};

/// The real upstream key the gateway must send (and never leak).
pub const UPSTREAM_KEY: &str = "AIzaTEST-upstream-secret-0123456789";
/// The admin token.
pub const ADMIN_TOKEN: &str = "test-admin-token-4f9a";

/// Config text shared by tests; `{mock}` and `{data}` are filled in, `extra` appended.
pub fn base_config(mock: SocketAddr, data: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_token_env = "GM_TEST_ADMIN_TOKEN"
max_request_bytes = 1048576
drain_timeout_ms = 2000

[upstream]
base_url = "http://{mock}"
api_key_env = "GM_TEST_UPSTREAM_KEY"
connect_timeout_ms = 1000

[storage]
path = "{data}"
flush_interval_ms = 20

[pricing]
message_sent = "0"
ai_response_per_token = "0.0001"
file_upload_per_byte = "0.00000001"

[pricing.models."gemini-2.5-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
cached_input_per_million = "0.03"
cache_storage_per_million_per_hour = "1.00"
max_output_tokens = 8192

[tiers.free]
messages = 100
tokens = 1000000
# The shared tier keeps the soft mode so the other suites see bodies as sent; the hard mode is
# tested in tests/budgets.rs.
enforcement = "soft"
models = ["gemini-2.5-flash", "gemini-2.5-flash-lite", "slow", "cut", "midstream-error", "final-usage-only", "gzip-always", "error-500", "error-503", "error-429", "error-400", "gemini-2.0-flash"]

[tiers.unlimited]
{extra}
"#,
        data = data.display()
    )
}

/// A gateway in front of a mock upstream.
pub struct Harness {
    pub mock: MockServer,
    pub app: Arc<App>,
    pub server: Option<Server>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub clock: Arc<SystemClock>,
    pub http: reqwest::Client,
}

impl Harness {
    /// Default config plus `extra` TOML (e.g. more tiers).
    pub async fn start(extra: &str) -> Harness {
        Self::start_with(
            extra,
            MockOptions {
                api_key: Some(UPSTREAM_KEY.into()),
                ..MockOptions::default()
            },
        )
        .await
    }

    /// With mock options.
    pub async fn start_with(extra: &str, mut opts: MockOptions) -> Harness {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        if opts.api_key.is_none() {
            opts.api_key = Some(UPSTREAM_KEY.into());
        }
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
        let upstream = mock.addr;
        Self::assemble(mock, upstream, extra).await
    }

    /// Like [`Harness::start`], with `storage.flush_interval_ms` set to `ms` (the default
    /// config has 20).
    pub async fn start_flushing_every(ms: u64, extra: &str) -> Harness {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let opts = MockOptions {
            api_key: Some(UPSTREAM_KEY.into()),
            ..MockOptions::default()
        };
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
        let upstream = mock.addr;
        Self::assemble_with(mock, upstream, extra, ms).await
    }

    /// A gateway whose upstream is `upstream` (the mock still runs, for its counters).
    async fn assemble(mock: MockServer, upstream: SocketAddr, extra: &str) -> Harness {
        Self::assemble_with(mock, upstream, extra, 20).await
    }

    async fn assemble_with(mock: MockServer, upstream: SocketAddr, extra: &str, flush_ms: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gemini-meter.toml");
        let text = base_config(upstream, &dir.path().join("data"), extra)
            .replace("flush_interval_ms = 20\n", &format!("flush_interval_ms = {flush_ms}\n"));
        std::fs::write(&config_path, &text).unwrap();
        let clock = Arc::new(SystemClock::default());
        Self::open_on(mock, dir, config_path, clock, &[], false).await
    }

    /// Rewrites the config file (the watcher or /admin/reload picks it up).
    pub fn write_config_extra(&self, extra: &str) {
        let text = base_config(self.mock.addr, &self.dir.path().join("data"), extra);
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// URL on the gateway.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// An admin request builder.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN)
    }

    /// Creates a user through the admin API.
    pub async fn create_user(&self, id: &str, tier: &str) {
        let r = self
            .admin(reqwest::Method::POST, "/admin/users")
            .json(&json!({"id": id, "tier": tier}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "create user {id}: {}", r.text().await.unwrap());
    }

    /// Issues a key through the admin API.
    pub async fn create_key(&self, user: &str) -> String {
        let r = self
            .admin(reqwest::Method::POST, &format!("/admin/users/{user}/keys"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        v["key"].as_str().unwrap().to_string()
    }

    /// A user in `tier` with one key.
    pub async fn user_with_key(&self, id: &str, tier: &str) -> String {
        self.create_user(id, tier).await;
        self.create_key(id).await
    }

    /// POSTs a native generate call with the key in the header.
    pub async fn generate(&self, key: &str, model: &str, stream_sse: bool) -> reqwest::Response {
        let path = if stream_sse {
            format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
        } else {
            format!("/v1beta/models/{model}:generateContent")
        };
        self.http
            .post(self.url(&path))
            .header("x-goog-api-key", key)
            .json(&json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]}))
            .send()
            .await
            .unwrap()
    }

    /// Waits until every record handed over so far is on disk.
    pub async fn sync(&self) {
        self.app.recorder.sync().await.unwrap();
    }

    /// A user's records, newest first (after a sync).
    pub async fn records(&self, user: &str) -> Vec<Record> {
        self.sync().await;
        self.app
            .store
            .records(
                &RecordFilter {
                    user_id: Some(user.into()),
                    ..Default::default()
                },
                100_000,
            )
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// The mock's counters.
    pub fn mock_stats(&self) -> Value {
        self.mock.stats.snapshot()
    }

    /// GET /api/usage/current for a key.
    pub async fn current(&self, key: &str) -> Value {
        self.http
            .get(self.url("/api/usage/current"))
            .header("x-goog-api-key", key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Stops the gateway (drains) and returns the data directory for inspection.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.sync().await;
    }
}

/// Sum of a set of records, as (messages, tokens, bytes, cost string).
pub fn sum(records: &[Record]) -> (u64, u64, u64, String) {
    let mut t = gemini_meter::ledger::Totals::default();
    for r in records {
        t.add(&gemini_meter::ledger::Totals::of(r));
    }
    (t.messages, t.tokens, t.bytes, t.cost.normalize().to_string())
}

impl Harness {
    /// A gateway whose upstream is `upstream` (a test's own server, or a closed port) instead
    /// of the mock. The mock is still started so that every field is set, but the gateway does
    /// not talk to it (note: `write_config_extra` would point the gateway back at the mock).
    pub async fn start_against(upstream: SocketAddr, extra: &str) -> Harness {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let opts = MockOptions {
            api_key: Some(UPSTREAM_KEY.into()),
            ..MockOptions::default()
        };
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
        Self::assemble(mock, upstream, extra).await
    }

    /// Creates a user and issues a key, returning `(key, key_id)`.
    pub async fn user_with_key_id(&self, id: &str, tier: &str) -> (String, String) {
        self.create_user(id, tier).await;
        let r = self
            .admin(reqwest::Method::POST, &format!("/admin/users/{id}/keys"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        (
            v["key"].as_str().unwrap().to_string(),
            v["key_id"].as_str().unwrap().to_string(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Alerts: a gateway running the alert delivery task (as `serve` does), and a restart of a
// gateway on the same data directory.

/// The environment of a harness gateway: the upstream key, the admin token, and `extra`.
pub fn test_env(extra: &[(&str, &str)]) -> gemini_meter::runtime::EnvLookup {
    let env: HashMap<String, String> = [
        ("GM_TEST_UPSTREAM_KEY", UPSTREAM_KEY),
        ("GM_TEST_ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Arc::new(move |n: &str| env.get(n).cloned())
}

impl Harness {
    /// Like [`Harness::start`], with `env` added to the gateway's environment (e.g. the webhook
    /// secret) and the alert delivery task running.
    pub async fn start_alerting(extra: &str, env: &[(&str, &str)]) -> Harness {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let opts = MockOptions {
            api_key: Some(UPSTREAM_KEY.into()),
            ..MockOptions::default()
        };
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gemini-meter.toml");
        let text = base_config(mock.addr, &dir.path().join("data"), extra);
        std::fs::write(&config_path, &text).unwrap();
        Self::open_on(mock, dir, config_path, Arc::new(SystemClock::default()), env, true).await
    }

    /// A restart: stops this gateway (drain, flush), drops it, and starts a new one with the
    /// same data directory, config file, mock upstream and clock (on a new port). `env` as for
    /// [`Harness::start_alerting`].
    pub async fn reopen(mut self, env: &[(&str, &str)]) -> Harness {
        self.stop().await;
        let Harness {
            mock,
            app,
            dir,
            config_path,
            clock,
            ..
        } = self;
        drop(app);
        Self::open_on(mock, dir, config_path, clock, env, true).await
    }

    /// Opens a gateway on an existing config file and data directory; `deliver` starts the
    /// alert delivery task (as `serve` does).
    async fn open_on(
        mock: MockServer,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        clock: Arc<SystemClock>,
        env: &[(&str, &str)],
        deliver: bool,
    ) -> Harness {
        let cfg = Config::load(&config_path).unwrap();
        // The previous gateway's last holders (recorder thread, delivery task) let go of the
        // storage within a moment of its drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (app, recorder) = loop {
            match App::open(cfg.clone(), Some(config_path.clone()), clock.clone(), test_env(env)) {
                Ok(opened) => break opened,
                Err(gemini_meter::app::StartError::Store(gemini_meter::ledger::StoreError::Locked { .. }))
                    if std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot open the gateway: {e}"),
            }
        };
        recorder.spawn().unwrap();
        if deliver {
            gemini_meter::alerts::spawn_delivery(&app);
        }
        let server = Server::start(app.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let base = format!("http://{}", server.addr);
        Harness {
            mock,
            app,
            server: Some(server),
            base,
            dir,
            config_path,
            clock,
            http: reqwest::Client::new(),
        }
    }
}

/// A loopback port that is free now and that the OS will not hand to anyone binding port 0
/// (it lies below the ephemeral range, 32768 and up): for a server a test starts later on an
/// address it had to name first. A port from `bind(":0")` released for later use can be taken
/// meanwhile by another test process's own `bind(":0")`.
#[allow(dead_code)]
pub fn spare_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test process starts at its own place in 20000..32000, then walks.
    let base = 20_000 + (std::process::id() * 7919) % 12_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (20_000 + (base - 20_000 + n * 13) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
