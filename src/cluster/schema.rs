//! The PostgreSQL schema, as versioned migrations applied at start under an advisory lock (so
//! replicas starting together apply each one once). A migration is never edited once shipped:
//! a change is a new version.

use super::{ClusterError, Pg};

pub use super::migration::Migration;

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[super::ledger::MIGRATION, super::shared::schema::MIGRATION];

/// The advisory lock migrations run under (an arbitrary constant: "gm" and a version).
const LOCK: i64 = 0x676d_0001;

/// Applies the migrations this database has not seen yet.
pub async fn migrate(pg: &Pg) -> Result<(), ClusterError> {
    let mut client = pg.connect().await?;
    // The lock first: two replicas creating the table at once collide even with IF NOT EXISTS.
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK]).await?;
    let result = match client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS gm_schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
    {
        Ok(()) => apply(&mut client).await,
        Err(e) => Err(e.into()),
    };
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]).await;
    result?;
    unlock?;
    Ok(())
}

async fn apply(client: &mut tokio_postgres::Client) -> Result<(), ClusterError> {
    for m in MIGRATIONS {
        let seen = client
            .query_opt("SELECT 1 FROM gm_schema_migrations WHERE version = $1", &[&m.version])
            .await?;
        if seen.is_some() {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO gm_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, name = m.name, "schema migration applied");
    }
    Ok(())
}
