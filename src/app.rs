//! The shared state of a running gateway, and how it is assembled.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::alerts::Alerts;
use crate::audit::{AuditLog, Entry, Outcome};
use crate::clock::{Month, SharedClock};
use crate::config::Config;
use crate::identity::{IdentityError, Registry};
use crate::ledger::{RecordIds, Recorder, RecorderHandle, SledStore, StoreError};
use crate::metrics::Metrics;
use crate::ownership::Owners;
use crate::proxy::Proxy;
use crate::proxy::client::build as build_client;
use crate::proxy::upload::UploadSessions;
use crate::runtime::{EnvLookup, Live, Runtime, RuntimeError};
use crate::settle::Settler;

/// Errors of assembling the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config or the environment is not usable.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Storage could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Users and keys could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The ownership index could not be loaded.
    #[error(transparent)]
    Ownership(#[from] crate::ownership::OwnershipError),
    /// The audit trail could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The TLS files of `[server.tls]` are not usable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct App {
    /// The live config snapshot.
    pub live: Arc<Live>,
    /// Users and keys.
    pub registry: Arc<Registry>,
    /// Where records go.
    pub recorder: RecorderHandle,
    /// The store (reads for the APIs).
    pub store: SledStore,
    /// The clock.
    pub clock: SharedClock,
    /// Operational metrics.
    pub metrics: Arc<Metrics>,
    /// Announces the user id after each change of their usage (for live updates).
    pub usage_events: broadcast::Sender<Arc<str>>,
    /// Quota alerts: what fired this month, the delivery task's wake-up, metrics.
    pub alerts: Arc<Alerts>,
    /// Where usage is settled.
    pub settler: Arc<Settler>,
    /// Forwarding to the upstream.
    pub proxy: Arc<Proxy>,
    /// The audit trail of admin actions.
    pub audit: Arc<AuditLog>,
    /// The TLS certificate in use and its reload, with `[server.tls]`.
    pub tls: Option<Arc<crate::tls::TlsReloader>>,
    /// Cluster mode's engines (Redis, PostgreSQL); `None`: one gateway, embedded store.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl App {
    /// Opens storage, loads users, keys and this month's counters, and builds the runtime.
    /// The returned recorder must be spawned.
    pub fn open(
        config: Config,
        config_path: Option<PathBuf>,
        clock: SharedClock,
        env: EnvLookup,
    ) -> Result<(Arc<App>, Recorder), StartError> {
        Self::open_with(config, config_path, clock, env, None)
    }

    /// [`App::open`] in cluster mode when `cluster` is given (connected by
    /// [`crate::cluster::Cluster::connect`]).
    pub fn open_with(
        config: Config,
        config_path: Option<PathBuf>,
        clock: SharedClock,
        env: EnvLookup,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Result<(Arc<App>, Recorder), StartError> {
        let now = clock.now();
        let rt = Runtime::build(config, None, now, &env)?;
        let store = SledStore::open(&rt.config.storage.path)?;
        let registry = Arc::new(Registry::load(store.clone(), Month::of(now))?);
        let upstream = build_client(&rt.config.upstream);
        let (mut recorder, handle) = Recorder::new(store.clone(), rt.config.storage.flush_interval);
        if let Some(c) = &cluster {
            // Every record reaches Redis's counters once it is on disk.
            let pump = c.quotas.pump();
            recorder.set_sink(Box::new(move |batch| {
                let _ = pump.send(batch);
            }));
        }
        let (usage_events, _) = broadcast::channel(1024);
        let uploads = UploadSessions::new(store.meta().clone());
        let owners = Arc::new(Owners::load(store.owners().clone())?);
        let alerts = Arc::new(Alerts::new(env.clone()));
        alerts.load(&store, &registry, Month::of(now))?;
        let audit = Arc::new(AuditLog::open(store.tree("audit")?)?);
        let live = Arc::new(Live::new(rt, config_path.clone(), env));
        audit_file_reloads(&live, &audit, &clock, config_path.as_deref());
        let tls = crate::tls::TlsReloader::start(live.clone(), audit.clone(), now)?;
        let metrics = Arc::new(Metrics::default());
        let settler = Arc::new(Settler {
            registry: registry.clone(),
            recorder: handle.clone(),
            alerts: alerts.clone(),
            metrics: metrics.clone(),
            live: live.clone(),
            clock: clock.clone(),
            ids: RecordIds::new(),
            usage_events: usage_events.clone(),
            clustered: cluster.is_some(),
        });
        let proxy = Arc::new(Proxy {
            live: live.clone(),
            registry: registry.clone(),
            settler: settler.clone(),
            upstream,
            uploads,
            owners,
            metrics: metrics.clone(),
            clock: clock.clone(),
            cluster: cluster.clone(),
        });
        let app = App {
            live,
            registry,
            recorder: handle,
            store,
            clock,
            metrics,
            usage_events,
            alerts,
            settler,
            proxy,
            audit,
            tls,
            cluster,
        };
        Ok((Arc::new(app), recorder))
    }
}

/// Writes the reloads the config file watcher starts to the audit trail.
fn audit_file_reloads(live: &Live, audit: &Arc<AuditLog>, clock: &SharedClock, path: Option<&std::path::Path>) {
    let audit = audit.clone();
    let clock = clock.clone();
    let target = path.map(|p| p.display().to_string());
    live.on_file_reload(Arc::new(move |result: &Result<(), String>| {
        audit.record_blocking(&Entry {
            at: clock.now(),
            action: "config.reload",
            target: target.clone(),
            caller: "file-watch".into(),
            outcome: if result.is_ok() { Outcome::Ok } else { Outcome::Failed },
            status: None,
            detail: match result {
                Ok(()) => serde_json::json!({}),
                Err(e) => serde_json::json!({ "error": e }),
            },
        });
    }));
}

impl crate::alerts::Gateway for App {
    fn recorder(&self) -> &RecorderHandle {
        &self.recorder
    }

    fn store(&self) -> &SledStore {
        &self.store
    }

    fn live(&self) -> &Arc<Live> {
        &self.live
    }

    fn clock(&self) -> &SharedClock {
        &self.clock
    }

    fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }
}
