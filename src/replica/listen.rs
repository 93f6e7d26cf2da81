//! The change listener: one connection of its own that `LISTEN`s on [`crate::cluster::shared::CHANNEL`] and
//! applies each change to the local copy, and the full resync run at start and after every
//! reconnection (notifications sent while it was away are lost, the rows are not).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::identity;
use crate::app::App;
use crate::cluster::shared::SharedError;
use crate::cluster::{CONNECT_TIMEOUT, Cluster};
use crate::identity::KeyRow;

/// How often the listening connection is checked (a dead peer sends no notification).
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long to wait before reconnecting.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A connection that listens for changes.
pub(super) struct Listener {
    client: tokio_postgres::Client,
    changes: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    /// Connects and `LISTEN`s; its driver forwards notifications until the connection ends.
    pub(super) async fn connect(cluster: &Cluster) -> Result<Self, SharedError> {
        let fut = cluster.pg.config().connect(NoTls);
        let (client, mut conn) = tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| SharedError::Unavailable("listening connection: timed out".into()))??;
        let (tx, changes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Polling messages also drives the connection (the client's queries).
            while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %crate::cluster::pg::describe(&e), "listening connection lost");
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", crate::cluster::shared::CHANNEL))
            .await?;
        Ok(Listener { client, changes })
    }
}

/// Listens until the gateway is gone, reconnecting (and resyncing) when the connection drops.
pub(super) async fn run(app: Weak<App>, cluster: Arc<Cluster>, first: Listener) {
    let mut next = Some(first);
    loop {
        let listener = match next.take() {
            Some(l) => l,
            None => {
                tokio::time::sleep(RETRY_AFTER).await;
                let Some(app) = app.upgrade() else { return };
                match reconnect(&app, &cluster).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "shared users and keys: cannot listen for changes; retrying");
                        continue;
                    }
                }
            }
        };
        if !listen(&app, &cluster, listener).await {
            return;
        }
    }
}

async fn reconnect(app: &App, cluster: &Cluster) -> Result<Listener, SharedError> {
    let l = Listener::connect(cluster).await?;
    resync(app, cluster).await?;
    tracing::info!("shared users and keys: listening again after a full resync");
    Ok(l)
}

/// Applies changes until the connection drops (true) or the gateway is gone (false).
async fn listen(app: &Weak<App>, cluster: &Cluster, mut l: Listener) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            change = l.changes.recv() => {
                let Some(change) = change else { return true };
                let Some(app) = app.upgrade() else { return false };
                match apply(&app, cluster, &change).await {
                    Ok(()) => {}
                    Err(e @ SharedError::Unavailable(_)) => {
                        // The change may be lost with the connection: resync on reconnection.
                        tracing::warn!(error = %e, change = %change, "shared change not applied");
                        return true;
                    }
                    Err(e) => tracing::error!(error = %e, change = %change, "shared change not applied"),
                }
            }
            _ = ping.tick() => {
                if app.strong_count() == 0 {
                    return false;
                }
                let alive = tokio::time::timeout(CONNECT_TIMEOUT, l.client.simple_query("SELECT 1")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return true;
                }
                if let Some(app) = app.upgrade()
                    && let Err(e) = push_failed_writes(&app).await
                {
                    tracing::warn!(error = %e, "shared resources or uploads not pushed; retrying");
                }
            }
        }
    }
}

/// Applies one notification (`<kind>:<id>`) by reading its row.
async fn apply(app: &App, cluster: &Cluster, change: &str) -> Result<(), SharedError> {
    match change.split_once(':') {
        Some(("user", id)) => identity::apply_user(app, cluster, id).await,
        Some(("key", id)) => identity::apply_key(app, cluster, id).await,
        Some(("resource", name)) => {
            let owners = &app.proxy.owners;
            let Some(shared) = owners.shared() else { return Ok(()) };
            if let Some(r) = shared.get(name).await? {
                owners.mirror(&r).map_err(|e| SharedError::Local(e.to_string()))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Makes the local copy match PostgreSQL (users, then keys, then resources), and pushes what
/// only this replica has (rows from before cluster mode, changes PostgreSQL missed).
pub(super) async fn resync(app: &App, cluster: &Cluster) -> Result<(), SharedError> {
    let _one = app.registry.changes().lock().await;
    resync_users(app, cluster).await?;
    resync_keys(app, cluster).await?;
    resync_resources(app).await?;
    resync_uploads(app).await
}

async fn resync_users(app: &App, cluster: &Cluster) -> Result<(), SharedError> {
    let shared = identity::all_users(cluster).await?;
    let known: HashSet<String> = shared.iter().map(|u| u.row.id.clone()).collect();
    for u in &shared {
        if let Err(e) = identity::apply_user_row(app, u).await {
            tracing::error!(error = %e, user = %u.row.id, "shared user not copied here");
        }
    }
    for u in app.registry.user_rows()? {
        if !known.contains(&u.id) {
            identity::push_user(cluster, &u).await?;
        }
    }
    Ok(())
}

async fn resync_keys(app: &App, cluster: &Cluster) -> Result<(), SharedError> {
    let shared = identity::all_keys(cluster).await?;
    let local: HashMap<String, KeyRow> = app
        .registry
        .key_rows()?
        .into_iter()
        .map(|k| (k.key_id.clone(), k))
        .collect();
    let same = |a: &KeyRow, b: &KeyRow| a.user_id == b.user_id && a.revoked_at.is_some() == b.revoked_at.is_some();
    let mut known = HashMap::with_capacity(shared.len());
    for k in shared {
        if !local.get(&k.key_id).is_some_and(|l| same(l, &k))
            && let Err(e) = identity::apply_key_row(app, cluster, &k).await
        {
            tracing::error!(error = %e, key = %k.key_id, "shared key not copied here");
        }
        known.insert(k.key_id.clone(), k);
    }
    for (id, l) in &local {
        let revoked_here = l.revoked_at.is_some() && known.get(id).is_some_and(|k| k.revoked_at.is_none());
        if !known.contains_key(id) || revoked_here {
            identity::push_key(cluster, l).await?;
        }
    }
    Ok(())
}

async fn resync_resources(app: &App) -> Result<(), SharedError> {
    let owners = &app.proxy.owners;
    let Some(shared) = owners.shared() else { return Ok(()) };
    let local: HashMap<String, _> = owners.rows().into_iter().map(|r| (r.name.clone(), r)).collect();
    let rows = shared.all().await?;
    let mut known: HashMap<String, (bool, bool)> = HashMap::with_capacity(rows.len());
    for r in rows {
        known.insert(r.name.clone(), (r.settled, r.note.is_some()));
        let differs = local.get(&r.name).is_none_or(|l| {
            l.user != r.user || r.deleted || (r.settled && !l.settled) || (r.note.is_some() && l.note != r.note)
        });
        // A tombstone of a name never known here is nothing to do.
        if differs && (!r.deleted || local.contains_key(&r.name)) {
            owners.mirror(&r).map_err(|e| SharedError::Local(e.to_string()))?;
        }
    }
    // What PostgreSQL lacks: whole rows, or a settled mark or note whose write failed.
    for (name, l) in &local {
        match known.get(name) {
            None => shared.push(l).await?,
            Some(&(settled, has_note)) => {
                if l.settled && !settled {
                    shared.settled(name).await?;
                }
                if let (Some(n), false) = (&l.note, has_note) {
                    shared.set_note(name, n).await?;
                }
            }
        }
    }
    Ok(())
}

/// Pushes again what a failed write left only here (resources, upload sessions).
async fn push_failed_writes(app: &App) -> Result<(), SharedError> {
    if app.proxy.owners.shared().is_some_and(|s| s.take_dirty()) {
        let _one = app.registry.changes().lock().await;
        resync_resources(app).await?;
    }
    if app.proxy.uploads.shared().is_some_and(|s| s.take_dirty()) {
        resync_uploads(app).await?;
    }
    Ok(())
}

async fn resync_uploads(app: &App) -> Result<(), SharedError> {
    let uploads = &app.proxy.uploads;
    let Some(shared) = uploads.shared() else { return Ok(()) };
    for s in uploads.stored() {
        shared.insert(&s.upload_hash, &s.key_id, s.declared, s.age_secs).await?;
    }
    shared.expire().await
}
