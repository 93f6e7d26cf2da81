//! The ledger in PostgreSQL (cluster mode): every replica keeps writing its local record log
//! first (nothing on the request path waits on PostgreSQL) and a shipper task copies it to
//! `gm_usage_records` (see [`ship`]); history, daily, breakdown, analytics and export read
//! PostgreSQL in cluster mode (see [`reads`] and [`export`]).
//!
//! Erasure: a user's deletion deletes their rows in PostgreSQL and leaves a tombstone that
//! every shipper checks, so records of that user still waiting in some replica's log are not
//! shipped afterwards ([`reads::delete_user`]). Retention drops whole monthly partitions
//! ([`schema::drop_partitions_before`]).

pub mod export;
pub mod reads;
pub mod schema;
pub mod ship;

pub use reads::{delete_user, month_totals, month_totals_with};
pub use schema::MIGRATION;
pub use ship::{ShipState, ShipperHandle, flush, spawn_shipper, unshipped_records};

use crate::cluster::ClusterError;
use crate::error::ApiError;
use crate::ledger::StoreError;

/// Errors of the ledger in PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// PostgreSQL could not be reached or answered with an error.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A row or a cursor is not what the ledger writes.
    #[error("{0}")]
    Invalid(String),
    /// Waited longer than allowed (PostgreSQL down or slow).
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> Self {
        LedgerError::Postgres(crate::cluster::pg::describe(&e))
    }
}

impl From<ClusterError> for LedgerError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Postgres(s) => LedgerError::Postgres(s),
            other => LedgerError::Postgres(other.to_string()),
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Invalid(m) => ApiError::bad_request(m),
            LedgerError::Store(e) => ApiError::internal(format!("storage: {e}")),
            e => ApiError::unavailable(format!(
                "The usage ledger (PostgreSQL) is unavailable; try again later. ({e})"
            )),
        }
    }
}

/// Retention in PostgreSQL: drops the partitions of the months before `cutoff`'s month (the
/// local log's retention takes the records before `cutoff`; the shipper skips such records).
/// Returns the partitions dropped. Every replica may run it; it is idempotent.
pub async fn retention(
    cluster: &crate::cluster::Cluster,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>, LedgerError> {
    let client = cluster.pg.client().await?;
    schema::drop_partitions_before(&client, crate::clock::Month::of(cutoff)).await
}
