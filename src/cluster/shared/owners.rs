//! Resource ownership in PostgreSQL: who owns each upstream resource, its settled mark and its
//! note, so a resource created through one replica is its owner's through every replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_postgres::Row;

use super::{SharedError, client, failed};
use crate::cluster::Cluster;

/// A resource as PostgreSQL has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgResource {
    /// The index name (`files/abc`).
    pub name: String,
    /// The owner (none for a name that only has a settled mark or a note).
    pub user: Option<String>,
    /// When it was recorded (Unix milliseconds).
    pub created_ms: u64,
    /// True once deleted upstream (a tombstone).
    pub deleted: bool,
    /// True once its one-time settlement is done.
    pub settled: bool,
    /// The note kept about it.
    pub note: Option<Vec<u8>>,
}

/// How long a replica's claim on a settlement holds (longer than any settlement takes).
pub const CLAIM_EXPIRES: &str = "10 minutes";

const COLS: &str = "name, user_id, created_ms, deleted, settled, note";

fn of_row(r: &Row) -> Result<PgResource, SharedError> {
    let bad = |e: tokio_postgres::Error| SharedError::Corrupt(e.to_string());
    let created: i64 = r.try_get("created_ms").map_err(bad)?;
    Ok(PgResource {
        name: r.try_get("name").map_err(bad)?,
        user: r.try_get("user_id").map_err(bad)?,
        created_ms: u64::try_from(created).unwrap_or(0),
        deleted: r.try_get("deleted").map_err(bad)?,
        settled: r.try_get("settled").map_err(bad)?,
        note: r.try_get("note").map_err(bad)?,
    })
}

/// The PostgreSQL side of [`crate::ownership::Owners`].
#[derive(Debug)]
pub struct SharedOwners {
    cluster: Arc<Cluster>,
    /// A write failed: the listener resyncs the resources at its next check.
    dirty: AtomicBool,
}

impl SharedOwners {
    /// Ownership kept in `cluster`'s PostgreSQL.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        SharedOwners {
            cluster,
            dirty: AtomicBool::new(false),
        }
    }

    /// Runs one upsert-and-notify statement with `$1` the name.
    async fn change(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), SharedError> {
        let q = format!("WITH r AS ({sql} RETURNING name) SELECT pg_notify('gm_changes', 'resource:' || name) FROM r");
        let res = match client(&self.cluster).await {
            Ok(c) => c.execute(&q, params).await.map_err(|e| failed(&self.cluster, e)),
            Err(e) => Err(e),
        };
        if res.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        res.map(|_| ())
    }

    /// True once after a write failed (the caller resyncs the resources).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Records `user` as the owner of `name` (the upstream's word wins, as locally).
    pub async fn record(&self, name: &str, user: &str, created_ms: u64) -> Result<(), SharedError> {
        let created = i64::try_from(created_ms).unwrap_or(0);
        self.change(
            "INSERT INTO gm_resources (name, user_id, created_ms) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET user_id = EXCLUDED.user_id,
                 created_ms = EXCLUDED.created_ms, deleted = false",
            &[&name, &user, &created],
        )
        .await
    }

    /// Pushes a row known here but not there (from before cluster mode); never overwrites.
    pub async fn push(&self, r: &PgResource) -> Result<(), SharedError> {
        let created = i64::try_from(r.created_ms).unwrap_or(0);
        self.change(
            "INSERT INTO gm_resources (name, user_id, created_ms, settled, note) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO NOTHING",
            &[&r.name, &r.user, &created, &r.settled, &r.note],
        )
        .await
    }

    /// Claims `name`'s one-time settlement for this replica: true when no replica settled it
    /// and none holds a live claim (one older than [`CLAIM_EXPIRES`] is taken over).
    pub async fn claim(&self, name: &str) -> Result<bool, SharedError> {
        let c = client(&self.cluster).await?;
        let replica: &str = &self.cluster.replica;
        let q = format!(
            "INSERT INTO gm_resources (name, settling, settling_at) VALUES ($1, $2, now())
             ON CONFLICT (name) DO UPDATE SET settling = EXCLUDED.settling, settling_at = now()
             WHERE NOT gm_resources.settled AND (gm_resources.settling IS NULL
                 OR gm_resources.settling_at < now() - interval '{CLAIM_EXPIRES}')
             RETURNING name"
        );
        let row = c
            .query_opt(&q, &[&name, &replica])
            .await
            .map_err(|e| failed(&self.cluster, e))?;
        Ok(row.is_some())
    }

    /// Gives back this replica's claim on `name` (its settlement failed), in the background.
    pub fn unclaim(self: &Arc<Self>, name: String) {
        let me = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let replica: &str = &me.cluster.replica;
            let res = match client(&me.cluster).await {
                Ok(c) => c
                    .execute(
                        "UPDATE gm_resources SET settling = NULL WHERE name = $1 AND settling = $2",
                        &[&name, &replica],
                    )
                    .await
                    .map_err(|e| failed(&me.cluster, e)),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "settlement claim not given back; it expires");
            }
        });
    }

    /// Records that `name`'s one-time settlement is done.
    pub async fn settled(&self, name: &str) -> Result<(), SharedError> {
        self.change(
            "INSERT INTO gm_resources (name, settled) VALUES ($1, true)
             ON CONFLICT (name) DO UPDATE SET settled = true, settling = NULL",
            &[&name],
        )
        .await
    }

    /// Keeps `note` about `name`.
    pub async fn set_note(&self, name: &str, note: &[u8]) -> Result<(), SharedError> {
        self.change(
            "INSERT INTO gm_resources (name, note) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET note = EXCLUDED.note",
            &[&name, &note],
        )
        .await
    }

    /// Marks `name` deleted, in the background (the caller is synchronous).
    pub fn forget(self: &Arc<Self>, name: String) {
        let me = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let res = me
                .change(
                    "UPDATE gm_resources SET deleted = true WHERE name = $1 AND NOT deleted",
                    &[&name],
                )
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "deleted resource not marked in PostgreSQL");
            }
        });
    }

    /// The row of `name`.
    pub async fn get(&self, name: &str) -> Result<Option<PgResource>, SharedError> {
        let c = client(&self.cluster).await?;
        let q = format!("SELECT {COLS} FROM gm_resources WHERE name = $1");
        let row = c.query_opt(&q, &[&name]).await.map_err(|e| failed(&self.cluster, e))?;
        row.as_ref().map(of_row).transpose()
    }

    /// Every row.
    pub async fn all(&self) -> Result<Vec<PgResource>, SharedError> {
        let c = client(&self.cluster).await?;
        let q = format!("SELECT {COLS} FROM gm_resources");
        let rows = c.query(&q, &[]).await.map_err(|e| failed(&self.cluster, e))?;
        rows.iter().map(of_row).collect()
    }
}
