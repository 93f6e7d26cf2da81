//! A PostgreSQL handle that reconnects on demand: one pipelined client shared by every task
//! (tokio-postgres pipelines concurrent queries on one connection), replaced when it closes.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::{CONNECT_TIMEOUT, ClusterError};

/// The shared PostgreSQL client of this replica.
pub struct Pg {
    var: String,
    config: tokio_postgres::Config,
    client: ArcSwapOption<Client>,
    connecting: Mutex<()>,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg").field("var", &self.var).finish_non_exhaustive()
    }
}

/// A one-line account of a PostgreSQL error (its server message when there is one).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl Pg {
    /// A handle for the URL held by `var` (parsed now, connected on first use).
    pub fn new(var: &str, url: &str) -> Result<Self, ClusterError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| ClusterError::BadUrl {
                var: var.to_string(),
                why: format!("not a PostgreSQL URL ({})", describe(&e)),
            })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("gemini-meter");
        Ok(Pg {
            var: var.to_string(),
            config,
            client: ArcSwapOption::empty(),
            connecting: Mutex::new(()),
        })
    }

    /// The config (for a second connection, such as the one that LISTENs).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The client, connecting (again) when there is none or it closed.
    pub async fn client(&self) -> Result<Arc<Client>, ClusterError> {
        if let Some(c) = self.client.load_full()
            && !c.is_closed()
        {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.client.load_full()
            && !c.is_closed()
        {
            return Ok(c);
        }
        let c = Arc::new(self.connect().await?);
        self.client.store(Some(c.clone()));
        Ok(c)
    }

    /// A new connection of its own, its driver spawned.
    pub async fn connect(&self) -> Result<Client, ClusterError> {
        let fut = self.config.connect(NoTls);
        let (client, conn) = match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                return Err(ClusterError::Postgres(format!(
                    "cannot connect ({}): {}",
                    self.var,
                    describe(&e)
                )));
            }
            Err(_) => {
                return Err(ClusterError::Postgres(format!(
                    "cannot connect ({}): timed out",
                    self.var
                )));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %describe(&e), "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// Forgets the client (after an error that may have broken it); the next use reconnects.
    pub fn reset(&self) {
        self.client.store(None);
    }
}
