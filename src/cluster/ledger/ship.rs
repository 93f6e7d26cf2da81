//! The shipper: copies this replica's local record log to `gm_usage_records`.
//!
//! The log is the outbox. The shipper reads it from a position kept in the store's `meta`
//! tree (`cluster/shipped`), only up to what is visible (synced and applied, so a machine
//! crash cannot take back a shipped record), and inserts each batch (at most [`MAX_BATCH`]
//! records, or what [`TICK`] gathered) in one transaction with `ON CONFLICT DO NOTHING`. The
//! position moves only after `COMMIT`, and is not flushed each time: after a crash it may lag,
//! and the batch shipped again is absorbed by the primary key. PostgreSQL down: records wait on
//! disk, the shipper retries with backoff, nothing is refused.
//!
//! Each batch also takes `gm_deleted_users` in SHARE mode and skips the records of a user
//! deleted after they were made: a deletion (which takes the table in ROW EXCLUSIVE mode)
//! waits for batches in flight and is seen by the next, so a user's records waiting in any
//! replica's log do not come back after their deletion.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};

use super::LedgerError;
use super::schema::ensure_partition;
use crate::clock::{Month, SharedClock};
use crate::cluster::Cluster;
use crate::ledger::log::RecordLog;
use crate::ledger::{Record, SledStore};
use crate::runtime::Live;

/// Key of the shipped position in the store's `meta` tree (u64, big-endian).
pub const POSITION_KEY: &[u8] = b"cluster/shipped";
/// Most records in one batch.
pub const MAX_BATCH: usize = 500;
/// How often the shipper looks for new records when it has caught up.
pub const TICK: Duration = Duration::from_millis(200);
/// Longest wait between two tries while PostgreSQL fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest a PostgreSQL step may take before the connection is dropped and the step retried.
const PG_TIMEOUT: Duration = Duration::from_secs(20);

/// The shipper's progress, for `/healthz`, `/metrics` and the cluster status.
#[derive(Debug)]
pub struct ShipState {
    backlog: AtomicU64,
    oldest_ms: AtomicI64,
    shipped: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
    last_error: parking_lot::Mutex<Option<String>>,
    wake: Notify,
    /// The log position shipped through (sent after every step).
    position: watch::Sender<u64>,
}

impl Default for ShipState {
    fn default() -> Self {
        Self {
            backlog: AtomicU64::new(0),
            oldest_ms: AtomicI64::new(0),
            shipped: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: parking_lot::Mutex::new(None),
            wake: Notify::new(),
            position: watch::Sender::new(0),
        }
    }
}

impl ShipState {
    /// Records written locally and not shipped yet (as of the shipper's last step).
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Relaxed)
    }

    /// Age of the oldest record not shipped yet; `None` when nothing waits.
    pub fn oldest_age(&self, now: DateTime<Utc>) -> Option<Duration> {
        let ms = self.oldest_ms.load(Relaxed);
        (ms != 0 && self.backlog() > 0)
            .then(|| Duration::from_millis(now.timestamp_millis().saturating_sub(ms).max(0) as u64))
    }

    /// The last PostgreSQL error of the shipper, cleared by the next batch shipped.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Records shipped by this process (counted once per batch committed; a batch shipped
    /// again after a crash counts again here, not in PostgreSQL).
    pub fn shipped(&self) -> u64 {
        self.shipped.load(Relaxed)
    }

    /// The JSON shown by `/healthz` and the cluster status.
    pub fn to_json(&self, now: DateTime<Utc>) -> serde_json::Value {
        serde_json::json!({
            "shipping_backlog": self.backlog(),
            "oldest_unshipped_seconds": self.oldest_age(now).map(|d| d.as_secs_f64()),
            "records_shipped": self.shipped(),
            "last_error": self.last_error(),
        })
    }

    /// Appends the shipper's Prometheus series to `out`.
    pub fn render_metrics(&self, out: &mut String, now: DateTime<Utc>) {
        let age = self.oldest_age(now).map_or(0.0, |d| d.as_secs_f64());
        for (name, kind, help, v) in [
            (
                "gm_cluster_shipping_backlog",
                "gauge",
                "Usage records not shipped to PostgreSQL yet.",
                self.backlog() as f64,
            ),
            (
                "gm_cluster_shipping_oldest_seconds",
                "gauge",
                "Age of the oldest record not shipped yet.",
                age,
            ),
            (
                "gm_cluster_shipped_records_total",
                "counter",
                "Records shipped to PostgreSQL.",
                self.shipped() as f64,
            ),
            (
                "gm_cluster_shipped_batches_total",
                "counter",
                "Batches committed to PostgreSQL.",
                self.batches.load(Relaxed) as f64,
            ),
            (
                "gm_cluster_shipping_failures_total",
                "counter",
                "Failed shipping attempts (retried).",
                self.failures.load(Relaxed) as f64,
            ),
        ] {
            crate::metrics::series(out, name, kind, help, v);
        }
    }
}

/// The running shipper.
#[derive(Debug)]
pub struct ShipperHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ShipperHandle {
    /// Stops the shipper after its current step, or aborts it after 5 s (a transaction cut
    /// short is rolled back and its position not moved: the batch ships at the next start).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

/// Starts the shipper of this replica (once, after the recorder started).
pub fn spawn_shipper(
    cluster: Arc<Cluster>,
    store: SledStore,
    live: Arc<crate::runtime::Live>,
    clock: crate::clock::SharedClock,
) -> ShipperHandle {
    let (stop, stopped) = watch::channel(false);
    let shipper = Shipper {
        store,
        live,
        clock,
        cluster,
        pos: 0,
        counted_to: 0,
        counted: 0,
        partitions: HashSet::new(),
        conn: None,
    };
    ShipperHandle {
        stop,
        task: tokio::spawn(shipper.run(stopped)),
    }
}

/// Ships everything written so far: waits until the recorder has applied every record handed
/// to it, then until the shipper has shipped through that point. Fails after `timeout`
/// (PostgreSQL down), with the records safe on disk.
pub async fn flush(
    cluster: &Cluster,
    recorder: &crate::ledger::RecorderHandle,
    store: &SledStore,
    timeout: Duration,
) -> Result<(), LedgerError> {
    recorder
        .sync()
        .await
        .map_err(|e| LedgerError::Invalid(format!("recorder: {e}")))?;
    let target = store.record_log().visible();
    let state = &cluster.shipping;
    let mut rx = state.position.subscribe();
    state.wake.notify_one();
    tokio::time::timeout(timeout, rx.wait_for(|p| *p >= target))
        .await
        .map_err(|_| LedgerError::Timeout("shipping the record log to PostgreSQL"))?
        .map_err(|_| LedgerError::Invalid("the shipper stopped".into()))?;
    Ok(())
}

/// This replica's records not shipped yet (from the shipped position to the visible end), for
/// rebuilding counters together with [`super::reads::month_totals_with`]. Blocking: reads the
/// log.
pub fn unshipped_records(store: &SledStore) -> Result<Vec<Record>, LedgerError> {
    let from = stored_position(store)?;
    let log = store.record_log();
    let mut out = Vec::new();
    log.scan(from, u64::MAX, |f| {
        if !f.erased
            && let Some(r) = decode(f.record(), f.pos)
        {
            out.push(r);
        }
        true
    })
    .map_err(crate::ledger::StoreError::from)?;
    Ok(out)
}

/// The shipped position kept in `meta` (the log's first position when none is kept: an
/// embedded store joining a cluster ships its history).
fn stored_position(store: &SledStore) -> Result<u64, LedgerError> {
    match store
        .meta()
        .get(POSITION_KEY)
        .map_err(crate::ledger::StoreError::from)?
    {
        Some(v) => {
            Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                LedgerError::Invalid("corrupt shipped position".into())
            })?))
        }
        None => Ok(store.record_log().first()),
    }
}

/// A record's stored JSON decoded; `None` (logged) when it does not decode, as the store's
/// replay does.
fn decode(raw: &[u8], pos: u64) -> Option<Record> {
    let r = serde_json::from_slice(raw).ok().and_then(|v| Record::from_json(&v));
    if r.is_none() {
        tracing::error!(position = pos, "undecodable record in the log; not shipped");
    }
    r
}

/// Records read from the log, with their JSON as stored.
struct Batch {
    records: Vec<(Record, String)>,
    /// Where the frames read end (erased ones included).
    end: u64,
}

/// Reads up to [`MAX_BATCH`] visible records from `from`.
fn read_batch(log: &RecordLog, from: u64) -> Result<Batch, LedgerError> {
    let mut b = Batch {
        records: Vec::new(),
        end: from,
    };
    log.scan(from, u64::MAX, |f| {
        if !f.erased {
            if b.records.len() >= MAX_BATCH {
                return false;
            }
            if let Some(r) = decode(f.record(), f.pos) {
                b.records.push((r, String::from_utf8_lossy(f.record()).into_owned()));
            }
        }
        b.end = f.end();
        true
    })
    .map_err(crate::ledger::StoreError::from)?;
    Ok(b)
}

/// Counts the visible records from `from`; returns the count and where the count ends.
fn count_from(log: &RecordLog, from: u64) -> Result<(u64, u64), LedgerError> {
    let (mut n, mut end) = (0, from);
    log.scan(from, u64::MAX, |f| {
        n += u64::from(!f.erased);
        end = f.end();
        true
    })
    .map_err(crate::ledger::StoreError::from)?;
    Ok((n, end))
}

struct Shipper {
    store: SledStore,
    /// The config (for the retention period).
    live: Arc<Live>,
    clock: SharedClock,
    cluster: Arc<Cluster>,
    /// Shipped through here.
    pos: u64,
    /// The backlog is counted up to here (incrementally: only new frames are read).
    counted_to: u64,
    counted: u64,
    /// Partitions known to exist.
    partitions: HashSet<Month>,
    /// A connection of the shipper's own (its transactions cannot share the pipelined one).
    conn: Option<tokio_postgres::Client>,
}

/// Runs blocking log reads off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LedgerError::Invalid(format!("log read task: {e}")))?
}

impl Shipper {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let state = self.cluster.shipping.clone();
        match stored_position(&self.store) {
            Ok(p) => self.pos = p,
            Err(e) => tracing::error!(error = %e, "shipper: cannot read its position; shipping from the start"),
        }
        let mut backoff = TICK;
        let mut handle_kept = true;
        while !*stop.borrow() {
            let wait = match self.step().await {
                Ok(more) => {
                    *state.last_error.lock() = None;
                    backoff = TICK;
                    if more {
                        continue;
                    }
                    TICK
                }
                Err(e) => {
                    state.failures.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, backlog = state.backlog(), "shipping to PostgreSQL failed; retrying");
                    *state.last_error.lock() = Some(e.to_string());
                    self.conn = None;
                    // A partition dropped by retention meanwhile is created again.
                    self.partitions.clear();
                    let w = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = state.wake.notified() => {}
                // A dropped handle leaves the shipper running (detached), not spinning.
                changed = stop.changed(), if handle_kept => handle_kept = changed.is_ok(),
            }
        }
    }

    /// Ships one batch; true when a full batch went (more may wait).
    async fn step(&mut self) -> Result<bool, LedgerError> {
        let log = self.store.record_log().clone();
        let from = self.pos;
        let mut batch = blocking({
            let log = log.clone();
            move || read_batch(&log, from)
        })
        .await?;
        self.count_backlog(&log, &batch).await?;
        let read = batch.records.len();
        // Records past the retention period are not shipped: retention drops their month.
        let months = self.live.load().config.storage.retention_months;
        let cutoff = Month::of(self.clock.now()).minus(months).start();
        batch.records.retain(|(r, _)| r.created_at >= cutoff);
        if !batch.records.is_empty() {
            tokio::time::timeout(PG_TIMEOUT, self.insert(&batch))
                .await
                .map_err(|_| LedgerError::Timeout("inserting a batch"))??;
            let state = &self.cluster.shipping;
            state.shipped.fetch_add(batch.records.len() as u64, Relaxed);
            state.batches.fetch_add(1, Relaxed);
        }
        self.counted = self.counted.saturating_sub(read as u64);
        self.advance(batch.end)?;
        Ok(read >= MAX_BATCH)
    }

    /// Updates the backlog and the oldest record's time from the frames written since the last
    /// count.
    async fn count_backlog(&mut self, log: &Arc<RecordLog>, batch: &Batch) -> Result<(), LedgerError> {
        if self.counted_to < self.pos {
            (self.counted_to, self.counted) = (self.pos, 0);
        }
        let from = self.counted_to;
        let log = log.clone();
        let (n, end) = blocking(move || count_from(&log, from)).await?;
        self.counted += n;
        self.counted_to = end;
        let state = &self.cluster.shipping;
        state.backlog.store(self.counted, Relaxed);
        let oldest = batch
            .records
            .first()
            .map_or(0, |(r, _)| r.created_at.timestamp_millis());
        state.oldest_ms.store(oldest, Relaxed);
        Ok(())
    }

    /// Moves the position after a commit (or past erased frames) and announces it.
    fn advance(&mut self, end: u64) -> Result<(), LedgerError> {
        if end > self.pos {
            self.pos = end;
            self.store
                .meta()
                .insert(POSITION_KEY, &end.to_be_bytes()[..])
                .map_err(crate::ledger::StoreError::from)?;
        }
        if self.pos >= self.counted_to {
            // Caught up: the count is exact again (erasures inside it are forgotten).
            self.counted = 0;
            self.cluster.shipping.backlog.store(0, Relaxed);
            self.cluster.shipping.oldest_ms.store(0, Relaxed);
        }
        self.cluster.shipping.position.send_replace(self.pos);
        Ok(())
    }

    /// Inserts a batch in one transaction (partitions created first, outside it).
    async fn insert(&mut self, batch: &Batch) -> Result<(), LedgerError> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.cluster.pg.connect().await?);
        }
        let Some(client) = self.conn.as_mut() else {
            return Err(LedgerError::Postgres("no connection".into()));
        };
        for m in batch.records.iter().map(|(r, _)| r.month()).collect::<HashSet<_>>() {
            if !self.partitions.contains(&m) {
                ensure_partition(client, m).await?;
                self.partitions.insert(m);
            }
        }
        let rows = Rows::of(batch, &self.cluster.replica);
        let last = batch.records.last().map(|(r, _)| r.id_string()).unwrap_or_default();
        let tx = client.transaction().await?;
        tx.batch_execute("LOCK TABLE gm_deleted_users IN SHARE MODE").await?;
        tx.execute(INSERT, &rows.params()).await?;
        tx.execute(
            "INSERT INTO gm_replicas_shipped (replica, shipped_through, updated_at) VALUES ($1, $2, now()) \
             ON CONFLICT (replica) DO UPDATE SET shipped_through = excluded.shipped_through, updated_at = excluded.updated_at",
            &[&&*self.cluster.replica, &last],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// One statement per batch: the columns as arrays, unnested; records of users deleted after
/// they were made are left out (see the module's notes).
const INSERT: &str = "INSERT INTO gm_usage_records \
    (id, created_at, user_id, type, messages, tokens, bytes, cost, model, record, replica) \
    SELECT r.id, r.created_at, r.user_id, r.type, r.messages, r.tokens, r.bytes, r.cost::numeric, r.model, \
           r.record::jsonb, $11 \
    FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], \
                $8::text[], $9::text[], $10::text[]) \
         AS r(id, created_at, user_id, type, messages, tokens, bytes, cost, model, record) \
    WHERE NOT EXISTS (SELECT 1 FROM gm_deleted_users d WHERE d.user_id = r.user_id AND d.deleted_at >= r.created_at) \
    ON CONFLICT DO NOTHING";

/// A batch as column arrays.
struct Rows {
    id: Vec<String>,
    created_at: Vec<DateTime<Utc>>,
    user_id: Vec<String>,
    kind: Vec<&'static str>,
    messages: Vec<i64>,
    tokens: Vec<i64>,
    bytes: Vec<i64>,
    cost: Vec<String>,
    model: Vec<Option<String>>,
    record: Vec<String>,
    replica: String,
}

/// A count as PostgreSQL's bigint (amounts never come near 2^63).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Rows {
    fn of(batch: &Batch, replica: &str) -> Self {
        let rs = &batch.records;
        Rows {
            id: rs.iter().map(|(r, _)| r.id_string()).collect(),
            created_at: rs.iter().map(|(r, _)| r.created_at).collect(),
            user_id: rs.iter().map(|(r, _)| r.user_id.to_string()).collect(),
            kind: rs.iter().map(|(r, _)| r.kind().as_str()).collect(),
            messages: rs.iter().map(|(r, _)| big(r.messages)).collect(),
            tokens: rs.iter().map(|(r, _)| big(r.tokens)).collect(),
            bytes: rs.iter().map(|(r, _)| big(r.bytes)).collect(),
            cost: rs.iter().map(|(r, _)| r.cost.normalize().to_string()).collect(),
            model: rs.iter().map(|(r, _)| r.model().map(str::to_string)).collect(),
            record: rs.iter().map(|(_, j)| j.clone()).collect(),
            replica: replica.to_string(),
        }
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 11] {
        [
            &self.id,
            &self.created_at,
            &self.user_id,
            &self.kind,
            &self.messages,
            &self.tokens,
            &self.bytes,
            &self.cost,
            &self.model,
            &self.record,
            &self.replica,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_and_the_age_of_its_oldest_record_show_while_records_wait() {
        let s = ShipState::default();
        let now = Utc::now();
        assert_eq!(s.oldest_age(now), None);
        assert_eq!(s.to_json(now)["oldest_unshipped_seconds"], serde_json::Value::Null);
        s.backlog.store(3, Relaxed);
        s.oldest_ms.store(now.timestamp_millis() - 2500, Relaxed);
        assert_eq!(s.oldest_age(now), Some(Duration::from_millis(2500)));
        assert_eq!(s.to_json(now)["shipping_backlog"], 3);
        let mut m = String::new();
        s.render_metrics(&mut m, now);
        assert!(m.contains("\ngm_cluster_shipping_backlog 3\n"), "{m}");
        assert!(m.contains("\ngm_cluster_shipping_oldest_seconds 2.5\n"), "{m}");
    }
}
