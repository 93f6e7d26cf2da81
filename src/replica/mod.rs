//! What this process does as one replica of several (cluster mode), wired to the running
//! gateway: it keeps its copy of the shared users, keys, uploads and ownership in step with
//! PostgreSQL (`identity`, `listen`), runs the shared counters' settlement pump and Redis
//! watcher, and ships its record log to the PostgreSQL ledger. The engines themselves and what
//! is stored in them are in `crate::cluster`. Outside cluster mode every function here does
//! nothing.

pub mod identity;
mod listen;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::app::App;
use crate::cluster::ledger::{LedgerError, ShipperHandle};
use crate::cluster::quota::{pump, watch};
use crate::cluster::shared::{SharedError, owners, uploads};

/// Starts sharing: attaches PostgreSQL to the upload sessions and the ownership index, listens
/// for changes and resyncs everything once before returning, then keeps listening (resyncing
/// after every reconnection) in the returned task. Call it before serving.
pub async fn start_shared(app: &Arc<App>) -> Result<Option<JoinHandle<()>>, SharedError> {
    let Some(cluster) = app.cluster.clone() else {
        return Ok(None);
    };
    app.proxy.uploads.attach(uploads::SharedUploads::new(cluster.clone()));
    app.proxy.owners.attach(owners::SharedOwners::new(cluster.clone()));
    let first = listen::Listener::connect(&cluster).await?;
    listen::resync(app, &cluster).await?;
    Ok(Some(tokio::spawn(listen::run(Arc::downgrade(app), cluster, first))))
}

/// Starts the shared counters' tasks: the settlement pump and the Redis watcher (which also
/// writes this replica's heartbeat). Waits (at most 30 s) until admission can run: the
/// counters checked, rebuilt if Redis lost them, and this replica's log replayed.
pub async fn start_counters(app: &Arc<App>) {
    let Some(cluster) = app.cluster.clone() else { return };
    let shared = Arc::new(pump::Shared {
        quotas: cluster.quotas.clone(),
        redis: cluster.redis.clone(),
        registry: app.registry.clone(),
        live: app.live.clone(),
        store: app.store.clone(),
        recorder: app.recorder.clone(),
    });
    tokio::spawn(pump::Pump { shared: shared.clone() }.run());
    tokio::spawn(watch::Watcher::new(shared, cluster.clone()).run());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cluster.quotas.ready() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !cluster.quotas.ready() {
        tracing::warn!("the shared counters are not usable yet: metered requests get 503 until they are");
    }
}

/// Starts shipping the record log to the PostgreSQL ledger (once, after the recorder started).
pub fn spawn_shipper(app: &Arc<App>) -> Option<ShipperHandle> {
    let cluster = app.cluster.clone()?;
    Some(crate::cluster::ledger::spawn_shipper(
        cluster,
        app.store.clone(),
        app.live.clone(),
        app.clock.clone(),
    ))
}

/// Ships everything written so far; fails after `timeout` (PostgreSQL down) with the records
/// safe on disk.
pub async fn flush(app: &App, timeout: Duration) -> Result<(), LedgerError> {
    match &app.cluster {
        Some(c) => crate::cluster::ledger::flush(c, &app.recorder, &app.store, timeout).await,
        None => Ok(()),
    }
}
