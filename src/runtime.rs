//! The live configuration: an immutable snapshot (config, upstream key, rate limiters) swapped
//! atomically on reload, so a request sees the old or the new config, never a mix.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use governor::clock::DefaultClock;
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::admission::KeyCells;
use crate::config::{Config, ConfigError, Tier};

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

/// A per-key requests-per-minute limiter (governor's GCRA), keyed by the key's slot in the
/// registry, its state one cell per slot ([`KeyCells`]).
pub type KeyLimiter = RateLimiter<u32, KeyCells, DefaultClock>;

/// A tier name as a small number, so each of a million users holds 2 bytes rather than a
/// pointer, and admission finds its tier by index rather than by hashing a string.
///
/// Ids are process-wide and never reused: a name keeps its id across reloads, and a runtime
/// maps the ids of the tiers it has ([`Runtime::tier_by_id`]); a name it lacks maps to none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TierId(u16);

#[derive(Default)]
struct TierNames {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u16>,
}

// Process-wide because tier names outlive any one config snapshot and are few (the names seen in
// configs and stored users); tests run several gateways in one process, which share it harmlessly.
static TIER_NAMES: LazyLock<RwLock<TierNames>> = LazyLock::new(Default::default);

impl TierId {
    /// Stands for a name that could not be interned (over 65,535 distinct names): no runtime has it.
    const OVERFLOW: TierId = TierId(u16::MAX);

    /// The id of a tier name, assigned on first use.
    pub fn of(name: &str) -> TierId {
        let read = TIER_NAMES.read().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = read.ids.get(name) {
            return TierId(id);
        }
        drop(read);
        let mut w = TIER_NAMES.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = w.ids.get(name) {
            return TierId(id);
        }
        let Ok(id) = u16::try_from(w.names.len()) else {
            return TierId::OVERFLOW;
        };
        if id == u16::MAX {
            return TierId::OVERFLOW;
        }
        let name: Arc<str> = Arc::from(name);
        w.names.push(name.clone());
        w.ids.insert(name, id);
        TierId(id)
    }

    /// The tier's name.
    pub fn name(self) -> Arc<str> {
        let read = TIER_NAMES.read().unwrap_or_else(|p| p.into_inner());
        read.names
            .get(usize::from(self.0))
            .cloned()
            .unwrap_or_else(|| Arc::from("(unknown)"))
    }

    /// The id as stored in a user's slot.
    pub fn raw(self) -> u16 {
        self.0
    }

    /// An id read back from [`TierId::raw`].
    pub fn from_raw(raw: u16) -> TierId {
        TierId(raw)
    }

    fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A tier with its limiters.
#[derive(Debug)]
pub struct TierRuntime {
    /// The tier's name.
    pub name: Arc<str>,
    /// The tier's limits.
    pub tier: Tier,
    /// Per-key limiter when the tier sets `requests_per_minute`.
    pub rpm: Option<Arc<KeyLimiter>>,
    /// `x-quota-*-limit` header values (messages, tokens, bytes, cost), rendered once.
    pub limit_values: [Option<http::HeaderValue>; 4],
}

/// One immutable snapshot of the running configuration.
pub struct Runtime {
    /// The validated config.
    pub config: Arc<Config>,
    /// Tiers by name.
    pub tiers: HashMap<String, Arc<TierRuntime>>,
    /// The same tiers by [`TierId`] (the hot path's lookup).
    by_id: Vec<Option<Arc<TierRuntime>>>,
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
            .field("tiers", &self.tiers.keys().collect::<Vec<_>>())
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
        let mut tiers = HashMap::with_capacity(config.tiers.len());
        let mut by_id: Vec<Option<Arc<TierRuntime>>> = Vec::new();
        for (name, tier) in &config.tiers {
            let rpm = tier.requests_per_minute.map(|rpm| {
                let reuse = previous
                    .and_then(|p| p.tiers.get(name))
                    .filter(|old| old.tier.requests_per_minute == Some(rpm))
                    .and_then(|old| old.rpm.clone());
                reuse.unwrap_or_else(|| {
                    Arc::new(RateLimiter::new(
                        Quota::per_minute(rpm),
                        KeyCells::default(),
                        DefaultClock::default(),
                    ))
                })
            });
            let limit_values = [
                tier.messages.map(http::HeaderValue::from),
                tier.tokens.map(http::HeaderValue::from),
                tier.bytes.map(http::HeaderValue::from),
                tier.cost
                    .and_then(|c| http::HeaderValue::from_str(&c.normalize().to_string()).ok()),
            ];
            let tr = Arc::new(TierRuntime {
                name: Arc::from(name.as_str()),
                tier: tier.clone(),
                rpm,
                limit_values,
            });
            let id = TierId::of(name);
            if id != TierId::OVERFLOW {
                if by_id.len() <= id.index() {
                    by_id.resize(id.index() + 1, None);
                }
                if let Some(slot) = by_id.get_mut(id.index()) {
                    *slot = Some(tr.clone());
                }
            }
            tiers.insert(name.clone(), tr);
        }
        Ok(Runtime {
            config: Arc::new(config),
            tiers,
            by_id,
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
        self.tiers.get(name).map(|t| &**t)
    }

    /// The tier with this id, if the config has it.
    pub fn tier_by_id(&self, id: TierId) -> Option<&TierRuntime> {
        self.by_id.get(id.index()).and_then(|t| t.as_deref())
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
}

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
            let _ = self.reload(now);
        }
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
