//! The live configuration: an immutable snapshot (config, upstream key, rate limiters) swapped
//! atomically on reload, so a request sees the old or the new config, never a mix.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::admission::{TierRuntime, Tiers};
use crate::config::{Config, ConfigError, TierId};

/// Errors of building a runtime from a config.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The config file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The upstream key variable is unset.
    #[error("environment variable {0} (upstream.api_key_env) is not set: the gateway needs the real Gemini API key")]
    MissingUpstreamKey(String),
}

/// Reads an environment variable (the process environment, or a map in tests).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The process environment.
pub fn process_env() -> EnvLookup {
    Arc::new(|name| std::env::var(name).ok())
}

/// One immutable snapshot of the running configuration.
pub struct Runtime {
    /// The validated config.
    pub config: Arc<Config>,
    /// The tiers with their limiters.
    pub tiers: Tiers,
    /// The real upstream key (never logged).
    pub upstream_key: Arc<str>,
    /// The key as the header values sent upstream, built once per snapshot.
    pub upstream_headers: UpstreamHeaders,
    /// The admin token, when the admin API is on.
    pub admin_token: Option<Arc<str>>,
    /// When this snapshot was loaded.
    pub loaded_at: DateTime<Utc>,
}

// By hand: the derived form would print the upstream key and the admin token.
impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .field("tiers", &self.tiers)
            .field("upstream_key", &"<redacted>")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("loaded_at", &self.loaded_at)
            .finish_non_exhaustive()
    }
}

/// The upstream key as header values, marked sensitive (hidden from `Debug` and from HTTP/2
/// header compression); `None` when the key is not a valid header value (requests then fail
/// with an internal error, as they would have building it each time).
#[derive(Debug, Clone)]
pub struct UpstreamHeaders {
    /// `x-goog-api-key: <key>`.
    pub key: Option<http::HeaderValue>,
    /// `Authorization: Bearer <key>`, for the OpenAI-compatible endpoint.
    pub bearer: Option<http::HeaderValue>,
}

impl UpstreamHeaders {
    fn of(key: &str) -> Self {
        let sensitive = |v: String| {
            http::HeaderValue::try_from(v).ok().map(|mut h| {
                h.set_sensitive(true);
                h
            })
        };
        UpstreamHeaders {
            key: sensitive(key.to_string()),
            bearer: sensitive(format!("Bearer {key}")),
        }
    }
}

impl Runtime {
    /// Builds a snapshot. Limiters of tiers whose rate is unchanged are carried over from
    /// `previous`, so a reload does not reset anyone's rate-limit state.
    pub fn build(
        config: Config,
        previous: Option<&Runtime>,
        now: DateTime<Utc>,
        env: &EnvLookup,
    ) -> Result<Runtime, RuntimeError> {
        let upstream_key = match env(&config.upstream.api_key_env) {
            Some(v) if !v.is_empty() => Arc::<str>::from(v),
            _ => return Err(RuntimeError::MissingUpstreamKey(config.upstream.api_key_env.clone())),
        };
        let admin_token = env(&config.server.admin_token_env)
            .filter(|v| !v.is_empty())
            .map(Arc::<str>::from);
        let tiers = Tiers::build(&config.tiers, previous.map(|p| &p.tiers));
        Ok(Runtime {
            config: Arc::new(config),
            tiers,
            upstream_headers: UpstreamHeaders::of(&upstream_key),
            upstream_key,
            admin_token,
            loaded_at: now,
        })
    }
}

impl Runtime {
    /// The tier with this name, if the config has it.
    pub fn tier(&self, name: &str) -> Option<&TierRuntime> {
        self.tiers.by_name(name)
    }

    /// The tier with this id, if the config has it.
    pub fn tier_by_id(&self, id: TierId) -> Option<&TierRuntime> {
        self.tiers.by_id(id)
    }
}

/// Result of the last reload attempt.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// When the running config was loaded.
    pub loaded_at: Option<DateTime<Utc>>,
    /// The error of the last failed reload, until a valid one clears it.
    pub last_error: Option<String>,
}

/// The live config and how to reload it.
pub struct Live {
    current: ArcSwap<Runtime>,
    env: EnvLookup,
    path: Option<PathBuf>,
    status: Mutex<ReloadStatus>,
    fingerprint: Mutex<Option<[u8; 32]>>,
    on_file_reload: OnceLock<FileReloadHook>,
}

/// Called with the outcome of each reload the file watcher starts (the audit trail).
pub type FileReloadHook = Arc<dyn Fn(&Result<(), String>) + Send + Sync>;

impl Live {
    /// Wraps the first snapshot; `path` is the file to reload from (None: no reload).
    pub fn new(rt: Runtime, path: Option<PathBuf>, env: EnvLookup) -> Self {
        let fp = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| Sha256::digest(&b).into());
        let status = ReloadStatus {
            loaded_at: Some(rt.loaded_at),
            last_error: None,
        };
        Live {
            current: ArcSwap::from_pointee(rt),
            env,
            path,
            status: Mutex::new(status),
            fingerprint: Mutex::new(fp),
            on_file_reload: OnceLock::new(),
        }
    }

    /// The snapshot for a new request.
    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// The reload status.
    pub fn status(&self) -> ReloadStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replaces the snapshot with one built from `config` (tests and demo).
    pub fn replace(&self, config: Config, now: DateTime<Utc>) -> Result<(), RuntimeError> {
        let rt = Runtime::build(config, Some(&self.current.load()), now, &self.env)?;
        self.current.store(Arc::new(rt));
        Ok(())
    }

    /// Reloads from the file. An invalid file changes nothing and is reported.
    pub fn reload(&self, now: DateTime<Utc>) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Err("no config file to reload from".into());
        };
        let bytes = std::fs::read(path);
        let result = Config::load(path).map_err(RuntimeError::from).and_then(|cfg| {
            let old = self.current.load();
            warn_restart_only(&old.config, &cfg);
            Runtime::build(cfg, Some(&old), now, &self.env)
        });
        let mut st = match self.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Ok(b) = bytes
            && let Ok(mut fp) = self.fingerprint.lock()
        {
            *fp = Some(Sha256::digest(&b).into());
        }
        match result {
            Ok(rt) => {
                st.loaded_at = Some(rt.loaded_at);
                st.last_error = None;
                self.current.store(Arc::new(rt));
                tracing::info!(path = %path.display(), "config reloaded");
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "config reload rejected; the running config stays");
                st.last_error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// Reloads when the file's content changed since the last attempt.
    pub fn reload_if_changed(&self, now: DateTime<Utc>) {
        let Some(path) = &self.path else { return };
        let Ok(bytes) = std::fs::read(path) else { return };
        let fp: [u8; 32] = Sha256::digest(&bytes).into();
        let changed = self.fingerprint.lock().map(|g| *g != Some(fp)).unwrap_or(false);
        if changed {
            let result = self.reload(now);
            if let Some(hook) = self.on_file_reload.get() {
                hook(&result);
            }
        }
    }

    /// SHA-256 (hex) of the running config, less what each replica sets for itself (its
    /// listen address and storage path): replicas whose configs mean different things show
    /// different hashes on the cluster status.
    pub fn config_hash(&self) -> String {
        let mut c = (*self.load().config).clone();
        c.server.listen = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        c.storage.path = PathBuf::new();
        hex::encode(Sha256::digest(format!("{c:?}").as_bytes()))
    }

    /// Sets what is told of reloads the file watcher starts (once; later calls are ignored).
    pub fn on_file_reload(&self, hook: FileReloadHook) {
        let _ = self.on_file_reload.set(hook);
    }

    /// Polls the file every `every` and reloads on change (a poll needs no extra crate and
    /// works on every filesystem, including bind mounts and editors that replace the file).
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration, clock: crate::clock::SharedClock) {
        let live = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let live = live.clone();
                let now = clock.now();
                let _ = tokio::task::spawn_blocking(move || live.reload_if_changed(now)).await;
            }
        });
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("path", &self.path).finish_non_exhaustive()
    }
}

fn warn_restart_only(old: &Config, new: &Config) {
    if old.server.listen != new.server.listen {
        tracing::warn!("server.listen changed: takes effect after a restart");
    }
    if old.storage.path != new.storage.path {
        tracing::warn!("storage.path changed: takes effect after a restart");
    }
    if old.server.tls.is_some() != new.server.tls.is_some() {
        tracing::warn!("[server.tls] added or removed: TLS is turned on or off by a restart");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_upstream_key_and_the_admin_token() {
        let env: EnvLookup = Arc::new(|name: &str| {
            Some(
                if name.contains("ADMIN") {
                    "adm-secret-token-42"
                } else {
                    "upstream-secret-key-17"
                }
                .to_string(),
            )
        });
        let rt = Runtime::build(Config::default(), None, Utc::now(), &env).expect("runtime");
        assert_eq!(&*rt.upstream_key, "upstream-secret-key-17");
        assert!(rt.admin_token.is_some());
        let shown = format!("{rt:?} {:?}", rt.upstream_headers);
        assert!(!shown.contains("upstream-secret-key-17"), "{shown}");
        assert!(!shown.contains("adm-secret-token-42"), "{shown}");
    }
}
