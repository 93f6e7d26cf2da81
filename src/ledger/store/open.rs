//! Opening the store: sled, the record log, and the replay of the log's tail that sled had
//! not kept; flushing.

use std::path::Path;
use std::sync::Arc;

use super::{APPLIED, LOCK_RETRIES, SledStore, StoreError, decode_record};
use crate::ledger::alerts::{Alert, decode_alerts};
use crate::ledger::log::RecordLog;
use crate::ledger::record::Record;

impl SledStore {
    /// Opens (or creates) the store in `path`, applying any part of the record log that sled
    /// had not kept. A second process on the same path gets [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, 64 * 1024 * 1024)
    }

    /// Opens the store with a sled page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        // sled's I/O threads can hold the lock for a moment after the last handle of a previous
        // opening is dropped (a restart in the same process): a little patience before saying
        // another process has it.
        let mut tries = 0;
        let db = loop {
            match Self::open_sled(path, cache_bytes) {
                Err(StoreError::Locked { .. }) if tries < LOCK_RETRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other?,
            }
        };
        // Opened after sled, whose file lock keeps a second process out of the log too.
        let log = RecordLog::open(&path.join("records"))?;
        let store = Self {
            ledger: db.open_tree("ledger")?,
            users: db.open_tree("users")?,
            keys: db.open_tree("keys")?,
            meta: db.open_tree("meta")?,
            owners: db.open_tree("owners")?,
            db,
            log: Arc::new(log),
            unapplied: Arc::default(),
        };
        store.migrate()?;
        store.replay()?;
        Ok(store)
    }

    /// Opens sled; [`StoreError::Locked`] when another opening holds it.
    fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
        sled::Config::new()
            .path(path)
            // The log is what makes a record durable; sled is flushed every second by the
            // recorder's flusher thread, which it joins before it returns, and by admin writes.
            // sled's own flusher thread would hold the database open for a moment after the
            // last handle is dropped.
            .flush_every_ms(None)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io)
                    if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        path: path.display().to_string(),
                    }
                }
                other => StoreError::Sled(other),
            })
    }

    /// Applies the log past the position sled's aggregates reached (after a crash).
    fn replay(&self) -> Result<(), StoreError> {
        let from = match self.ledger.get([APPLIED])? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt("P".into()))?),
            None => self.log.first(),
        };
        let started = std::time::Instant::now();
        let mut chunk: Vec<(u64, Record, Vec<Alert>)> = Vec::new();
        let mut chunk_end = from;
        let mut replayed = 0u64;
        let mut failed: Option<StoreError> = None;
        let end = self.log.recover(from, |f| {
            if failed.is_some() {
                return Ok(());
            }
            if !f.erased {
                match decode_record(f.record()) {
                    Ok(r) => chunk.push((f.pos, r, decode_alerts(f.alerts()))),
                    Err(e) => {
                        tracing::error!(position = f.pos, error = %e, "undecodable record in the log; skipped");
                    }
                }
            }
            chunk_end = f.end();
            if chunk.len() >= 4096 {
                replayed += chunk.len() as u64;
                if let Err(e) = self.apply(chunk.iter().map(|(p, r, a)| (*p, r, &a[..])), chunk_end, None) {
                    failed = Some(e);
                }
                chunk.clear();
            }
            Ok(())
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        replayed += chunk.len() as u64;
        if chunk_end > from {
            self.apply(chunk.iter().map(|(p, r, a)| (*p, r, &a[..])), chunk_end, None)?;
        }
        if replayed > 0 {
            self.db.flush()?;
            tracing::info!(
                records = replayed,
                ms = started.elapsed().as_millis() as u64,
                "applied the log's tail"
            );
        }
        self.log.set_visible(end);
        Ok(())
    }

    /// Flushes sled (the log is synced by every write already).
    pub async fn flush(&self) -> Result<(), StoreError> {
        // Not sled's `flush_async`: in 0.34 concurrent calls can leave a future never woken
        // (spacejam/sled#1308; seen here as tests hung in it). The blocking flush is safe
        // under concurrency; it runs on the blocking pool.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task: {e}")))??;
        Ok(())
    }

    /// Flushes synchronously (shutdown paths).
    pub fn flush_sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}
