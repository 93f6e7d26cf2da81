//! The shared state of a running gateway, and how it is assembled.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::broadcast;

use crate::alerts::Alerts;
use crate::clock::{Month, SharedClock};
use crate::config::Config;
use crate::identity::{IdentityError, Registry, User};
use crate::ledger::{Record, RecordIds, Recorder, RecorderHandle, SledStore, StoreError, Totals};
use crate::metrics::Metrics;
use crate::proxy::client::{UpstreamClient, build as build_client};
use crate::proxy::upload::UploadSessions;
use crate::runtime::{EnvLookup, Live, Runtime, RuntimeError};

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
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct App {
    /// The live config snapshot.
    pub live: Arc<Live>,
    /// Users and keys.
    pub registry: Registry,
    /// Where records go.
    pub recorder: RecorderHandle,
    /// The store (reads for the APIs).
    pub store: SledStore,
    /// The clock.
    pub clock: SharedClock,
    /// Record id generator.
    pub ids: RecordIds,
    /// The pooled upstream client.
    pub upstream: UpstreamClient,
    /// Upload sessions started here.
    pub uploads: UploadSessions,
    /// Operational metrics.
    pub metrics: Metrics,
    /// Announces the user id after each change of their usage (for live updates).
    pub usage_events: broadcast::Sender<Arc<str>>,
    /// Quota alerts: what fired this month, the delivery task's wake-up, metrics.
    pub alerts: Alerts,
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
        let now = clock.now();
        let rt = Runtime::build(config, None, now, &env)?;
        let store = SledStore::open(&rt.config.storage.path)?;
        let registry = Registry::load(store.clone(), Month::of(now))?;
        let upstream = build_client(&rt.config.upstream);
        let (recorder, handle) = Recorder::new(store.clone(), rt.config.storage.flush_interval);
        let (usage_events, _) = broadcast::channel(1024);
        let uploads = UploadSessions::new(store.meta().clone());
        let alerts = Alerts::new(env.clone());
        alerts.load(&store, &registry, Month::of(now))?;
        let app = App {
            live: Arc::new(Live::new(rt, config_path, env)),
            registry,
            recorder: handle,
            store,
            clock,
            ids: RecordIds::new(),
            upstream,
            uploads,
            usage_events,
            metrics: Metrics::default(),
            alerts,
        };
        Ok((Arc::new(app), recorder))
    }

    /// Settles one record: counters now, ledger later (batched by the recorder).
    /// `reserved_message` says the record's message was already counted at admission.
    pub fn settle_record(&self, user: &User, rec: Record, reserved_message: bool) {
        user.usage.add(rec.month(), &Totals::of(&rec), reserved_message);
        let m = &self.metrics;
        m.records.fetch_add(1, Relaxed);
        m.tokens.fetch_add(rec.tokens, Relaxed);
        m.upload_bytes.fetch_add(rec.bytes, Relaxed);
        let nanos = (rec.cost * rust_decimal::Decimal::from(1_000_000_000u32)).trunc();
        m.cost_nanos.fetch_add(u64::try_from(nanos).unwrap_or(0), Relaxed);
        let user_id = rec.user_id.clone();
        let alerts = self
            .alerts
            .detect(&self.live.load(), &self.registry, user, &rec, &*self.clock);
        if alerts.is_empty() {
            self.recorder.record(rec);
        } else {
            // The alerts go in the record's batch: on disk together, or not at all. A crossing
            // is rare (a few per user and month); its caller waits (bounded) for that batch, so
            // a client that saw the call succeed can count on the alert, even after a kill -9.
            let on_disk = self.recorder.record_with_alerts(rec, alerts);
            self.alerts.wake();
            crate::alerts::wait_on_disk(&on_disk);
        }
        // Nobody listening is the common case; that is not an error.
        let _ = self.usage_events.send(user_id);
    }
}
