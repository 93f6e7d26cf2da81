//! Upload sessions in PostgreSQL, so an upload started through one replica can be finished
//! through another: stored (under the hash of the upload id, a bearer capability) before the
//! caller gets the upload URL, looked up on a local miss.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{SharedError, client, failed};
use crate::cluster::Cluster;

/// A session as PostgreSQL has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSession {
    /// The key that started it.
    pub key_id: String,
    /// The size declared at start.
    pub declared: Option<u64>,
    /// Its age in seconds.
    pub age_secs: u64,
}

/// The PostgreSQL side of [`crate::proxy::upload::UploadSessions`].
#[derive(Debug)]
pub struct SharedUploads {
    cluster: Arc<Cluster>,
    /// An insert failed: the listener pushes the local sessions at its next check.
    dirty: AtomicBool,
}

impl SharedUploads {
    /// Upload sessions kept in `cluster`'s PostgreSQL.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        SharedUploads {
            cluster,
            dirty: AtomicBool::new(false),
        }
    }

    /// Stores a session (`upload_hash`: hex SHA-256 of the upload id). Idempotent.
    pub async fn insert(
        &self,
        upload_hash: &str,
        key_id: &str,
        declared: Option<u64>,
        age_secs: u64,
    ) -> Result<(), SharedError> {
        let c = client(&self.cluster)
            .await
            .inspect_err(|_| self.dirty.store(true, Ordering::Release))?;
        let declared = declared.and_then(|d| i64::try_from(d).ok());
        let age = i64::try_from(age_secs).unwrap_or(0);
        c.execute(
            "INSERT INTO gm_upload_sessions (upload_hash, key_id, declared, created_at)
             VALUES ($1, $2, $3, now() - make_interval(secs => $4::bigint))
             ON CONFLICT (upload_hash) DO NOTHING",
            &[&upload_hash, &key_id, &declared, &age],
        )
        .await
        .map_err(|e| {
            self.dirty.store(true, Ordering::Release);
            failed(&self.cluster, e)
        })?;
        Ok(())
    }

    /// True once after an insert failed (the caller pushes the local sessions again).
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// The session stored under `upload_hash`, if any.
    pub async fn get(&self, upload_hash: &str) -> Result<Option<SharedSession>, SharedError> {
        let c = client(&self.cluster).await?;
        let row = c
            .query_opt(
                "SELECT key_id, declared,
                        greatest(0, extract(epoch FROM now() - created_at))::bigint AS age
                 FROM gm_upload_sessions WHERE upload_hash = $1",
                &[&upload_hash],
            )
            .await
            .map_err(|e| failed(&self.cluster, e))?;
        let Some(row) = row else { return Ok(None) };
        let bad = |e: tokio_postgres::Error| SharedError::Corrupt(e.to_string());
        let declared: Option<i64> = row.try_get("declared").map_err(bad)?;
        let age: i64 = row.try_get("age").map_err(bad)?;
        Ok(Some(SharedSession {
            key_id: row.try_get("key_id").map_err(bad)?,
            declared: declared.and_then(|d| u64::try_from(d).ok()),
            age_secs: u64::try_from(age).unwrap_or(0),
        }))
    }

    /// Drops the sessions older than Gemini keeps an upload (48 hours).
    pub async fn expire(&self) -> Result<(), SharedError> {
        let c = client(&self.cluster).await?;
        c.execute(
            "DELETE FROM gm_upload_sessions WHERE created_at < now() - interval '48 hours'",
            &[],
        )
        .await
        .map_err(|e| failed(&self.cluster, e))?;
        Ok(())
    }

    /// Forgets a finished session, in the background (a leftover row only expires later).
    pub fn remove(self: &Arc<Self>, upload_hash: String) {
        let me = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let res = match client(&me.cluster).await {
                Ok(c) => c
                    .execute("DELETE FROM gm_upload_sessions WHERE upload_hash = $1", &[&upload_hash])
                    .await
                    .map_err(|e| failed(&me.cluster, e)),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "finished upload session not removed from PostgreSQL");
            }
        });
    }
}
