//! What replicas share besides counters and the ledger: users, keys, tiers of users, upload
//! sessions, resource ownership and alert marks. PostgreSQL is the source of truth; each
//! replica keeps the in-memory copy (and embedded store) it has always had, and changes are
//! pushed to the other replicas with `LISTEN/NOTIFY` on the channel [`CHANNEL`].
//!
//! Why `LISTEN/NOTIFY` and not Redis pub/sub: the row and its notification are written in one
//! statement (one transaction), and PostgreSQL delivers a `NOTIFY` only after that transaction
//! commits, so no replica hears of a row it cannot read yet, and a rolled-back change is never
//! announced. With Redis the publish would be a second, separate write that can be lost or
//! arrive before the commit. A notification carries only `<kind>:<id>`; the listener reads the
//! row itself, so a lost or repeated notification is harmless, and after the listening
//! connection drops (when notifications may have been missed) a full resync reads every row.
//!
//! Writes: an admin change goes to PostgreSQL first (with its `NOTIFY`), then to the local
//! registry, under [`crate::identity::Registry::changes`] (see `crate::replica`) so the listener applies the same row
//! after it, idempotently. PostgreSQL unreachable: the admin call answers 503, nothing changed.

pub mod alerts;
pub mod owners;
pub mod schema;
pub mod uploads;

use std::sync::Arc;

use super::{Cluster, ClusterError};
use crate::identity::IdentityError;

/// The `LISTEN/NOTIFY` channel of changes; payloads are `user:<id>`, `key:<key id>`,
/// `resource:<name>`.
pub const CHANNEL: &str = "gm_changes";

/// Errors of the shared state.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// PostgreSQL could not be reached or failed: nothing was changed.
    #[error("PostgreSQL unavailable, nothing was changed: {0}")]
    Unavailable(String),
    /// The change is refused (no such user, id taken, ...) or the local store failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The local copy could not be changed (the shared store was; the listener retries).
    #[error("local store: {0}")]
    Local(String),
    /// A row read from PostgreSQL is not usable.
    #[error("shared store: {0}")]
    Corrupt(String),
}

impl From<tokio_postgres::Error> for SharedError {
    fn from(e: tokio_postgres::Error) -> Self {
        SharedError::Unavailable(super::pg::describe(&e))
    }
}

impl From<ClusterError> for SharedError {
    fn from(e: ClusterError) -> Self {
        SharedError::Unavailable(e.to_string())
    }
}

/// The cluster's PostgreSQL client.
pub async fn client(cluster: &Cluster) -> Result<Arc<tokio_postgres::Client>, SharedError> {
    match cluster.pg.client().await {
        Ok(c) => Ok(c),
        Err(e) => {
            cluster.pg.reset();
            Err(e.into())
        }
    }
}

/// Maps a query's failure to [`SharedError::Unavailable`], forgetting a broken client.
pub fn failed(cluster: &Cluster, e: tokio_postgres::Error) -> SharedError {
    if e.is_closed() || e.as_db_error().is_none() {
        cluster.pg.reset();
    }
    e.into()
}
