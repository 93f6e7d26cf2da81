//! The ledger's tables: migration 1, and the monthly partitions created on demand.

use crate::clock::Month;
use crate::cluster::migration::Migration;

use super::LedgerError;

/// Migration 1: the records (partitioned by month), the shipping positions per replica, and
/// the tombstones of deleted users (see [`super::ship`] on why the shipper checks them).
pub const MIGRATION: Migration = Migration {
    version: 1,
    name: "ledger",
    sql: "
CREATE TABLE gm_usage_records (
  id text NOT NULL,
  created_at timestamptz NOT NULL,
  user_id text NOT NULL,
  type text NOT NULL,
  messages bigint NOT NULL, tokens bigint NOT NULL, bytes bigint NOT NULL,
  cost numeric NOT NULL,
  model text,
  record jsonb NOT NULL,
  replica text NOT NULL,
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX ON gm_usage_records (user_id, created_at, id);
CREATE INDEX ON gm_usage_records (created_at, id);
CREATE TABLE gm_replicas_shipped (
  replica text PRIMARY KEY,
  shipped_through text NOT NULL,
  updated_at timestamptz NOT NULL
);
CREATE TABLE gm_deleted_users (
  user_id text PRIMARY KEY,
  deleted_at timestamptz NOT NULL
);
",
};

/// The advisory lock partitions are created under ("gm" and 0x1ed9: ledger), so replicas
/// creating the same month at once do not race in the catalog.
const PARTITION_LOCK: i64 = 0x676d_1ed9;

/// The name of a month's partition: `gm_usage_records_YYYY_MM`.
pub fn partition_name(m: Month) -> String {
    format!("gm_usage_records_{:04}_{:02}", m.year(), m.month())
}

/// Creates the partition of `m` unless it exists.
pub async fn ensure_partition(client: &mut tokio_postgres::Client, m: Month) -> Result<(), LedgerError> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF gm_usage_records FOR VALUES FROM ('{}') TO ('{}')",
        partition_name(m),
        m.start().format("%Y-%m-%d %H:%M:%S+00"),
        m.next().start().format("%Y-%m-%d %H:%M:%S+00"),
    );
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
        .await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(())
}

/// Drops the partitions of months before `cutoff` (retention): whole months go at once,
/// without a scan. Returns the partitions dropped.
pub async fn drop_partitions_before(
    client: &tokio_postgres::Client,
    cutoff: Month,
) -> Result<Vec<String>, LedgerError> {
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'gm_usage_records'",
            &[],
        )
        .await?;
    let limit = partition_name(cutoff);
    let mut dropped = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        // Same width names compare as their months do.
        if name.len() == limit.len() && name < limit && name.starts_with("gm_usage_records_") {
            client.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_sort_as_months() {
        let a = partition_name(Month::parse("2026-09").unwrap());
        let b = partition_name(Month::parse("2026-10").unwrap());
        assert_eq!(a, "gm_usage_records_2026_09");
        assert!(a < b);
    }
}
