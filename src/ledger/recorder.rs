//! The recorder: a background thread that writes records to the store in batches.
//!
//! The hot path hands records over a channel and never waits. The thread (its own OS thread,
//! since file writes and fsyncs block and must not stall the async workers) takes whatever has
//! queued up and writes it to the record log at once, with one write: from then on a record
//! survives a crash of the process, and under load batches grow on their own. At most
//! `apply_every` later (the config's `flush_interval`, "usage records reach disk within this
//! bound"), or at once when a caller waits (a barrier, an admin operation, an alert), the log is
//! synced and the aggregates of every batch written since are applied to sled in one atomic
//! batch. An fsync and a sled batch cost about the same for one record as for a thousand, so
//! this keeps their share small under load. A failing write is retried with backoff, never dropped;
//! each step is retried alone, so nothing is written twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::alerts::Alert;
use super::record::{Record, RecordIds};
use super::settled::{Release, Settled, SettledSink};
use super::store::{Appended, SledStore, StoreError};

/// How often sled is flushed while records flow.
const SLED_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Largest batch written at once.
const MAX_BATCH: usize = 20_000;

/// After writing a batch, the recorder sleeps this long before taking the next. While it sleeps
/// nobody waits on the channel, so a send is a push and an atomic load; woken by every send, it
/// cost the request path a futex call per record (3.5% of the gateway's CPU under unary load).
/// A record waits at most this much longer before it is written.
const GATHER: Duration = Duration::from_millis(1);

enum Msg {
    /// A record, and in cluster mode what of its call's reservation it replaces.
    Record(Box<Record>, Option<Box<Release>>),
    /// A record and the alerts it fired: always written in the same batch; the sender is told
    /// once that batch is on disk.
    Alerted(Box<Record>, Vec<Alert>, oneshot::Sender<()>, Option<Box<Release>>),
    Barrier(oneshot::Sender<()>),
    /// Told once every record handed over before is written to the log (not applied).
    Written(oneshot::Sender<()>),
    /// A user to erase, and the ids of every key they had.
    DeleteUser(String, Vec<String>, oneshot::Sender<Result<u64, StoreError>>),
    Retention(DateTime<Utc>, oneshot::Sender<Result<u64, StoreError>>),
}

/// Health of the write path, shown by `/healthz` and metrics.
#[derive(Debug, Default)]
pub struct RecorderStats {
    /// Records handed over and not yet on disk.
    pub queued: AtomicU64,
    /// Records written since start.
    pub written: AtomicU64,
    /// Batches written since start.
    pub batches: AtomicU64,
    /// Duration of the last log write (the sync comes with the next apply), in microseconds.
    pub last_flush_us: AtomicU64,
    /// Records of deleted users that settled after the erasure, dropped.
    pub dropped_erased: AtomicU64,
    /// True while writes are failing.
    pub degraded: AtomicBool,
    /// The last write error, if writes are failing.
    pub last_error: Mutex<Option<String>>,
}

/// Cheap handle used by the hot path to hand records over.
#[derive(Clone)]
pub struct RecorderHandle {
    tx: mpsc::Sender<Msg>,
    /// Counters about the write path.
    pub stats: Arc<RecorderStats>,
}

impl std::fmt::Debug for RecorderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecorderHandle").finish_non_exhaustive()
    }
}

/// Errors of recorder requests.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// The recorder task has stopped.
    #[error("the recorder has stopped")]
    Stopped,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RecorderHandle {
    /// Hands a record over; never blocks. Returns false only if the recorder has stopped.
    pub fn record(&self, r: Record) -> bool {
        self.record_releasing(r, None)
    }

    /// [`RecorderHandle::record`], telling cluster mode's settlement what of a reservation
    /// the record replaces.
    pub fn record_releasing(&self, r: Record, release: Option<Box<Release>>) -> bool {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let ok = self.tx.send(Msg::Record(Box::new(r), release)).is_ok();
        if !ok {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("usage record handed to a stopped recorder");
        }
        ok
    }

    /// Hands a record over together with the alerts it fired; they are written in the same
    /// atomic batch. Never blocks; the returned receiver resolves once that batch is on disk
    /// (and with an error if the recorder has stopped).
    pub fn record_with_alerts(&self, r: Record, alerts: Vec<Alert>) -> oneshot::Receiver<()> {
        self.record_with_alerts_releasing(r, alerts, None)
    }

    /// [`RecorderHandle::record_with_alerts`], with what of a reservation the record replaces.
    pub fn record_with_alerts_releasing(
        &self,
        r: Record,
        alerts: Vec<Alert>,
        release: Option<Box<Release>>,
    ) -> oneshot::Receiver<()> {
        let (done, on_disk) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Msg::Alerted(Box::new(r), alerts, done, release)).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("usage record with alerts handed to a stopped recorder");
        }
        on_disk
    }

    /// Waits until every record handed over before this call is on disk.
    pub async fn sync(&self) -> Result<(), RecorderError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Barrier(tx)).map_err(|_| RecorderError::Stopped)?;
        rx.await.map_err(|_| RecorderError::Stopped)
    }

    /// Waits until every record handed over before this call is written to the log, where one
    /// user's reads find it (see `SledStore::records`); unlike [`RecorderHandle::sync`] it
    /// forces no sync and no apply: the recorder writes what it is handed within a
    /// millisecond or so anyway.
    pub async fn written(&self) -> Result<(), RecorderError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::Written(tx)).map_err(|_| RecorderError::Stopped)?;
        rx.await.map_err(|_| RecorderError::Stopped)
    }

    /// Deletes a user's usage, after every record handed over before. Records of requests
    /// made with one of `key_ids` (the user's keys) that are handed over later, from requests
    /// still in flight, are dropped: nothing of the user lands after the erasure, and a user
    /// created again under the same id (with keys of their own) starts with nothing.
    pub async fn delete_user(&self, user: &str, key_ids: Vec<String>) -> Result<u64, RecorderError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::DeleteUser(user.to_string(), key_ids, tx))
            .map_err(|_| RecorderError::Stopped)?;
        Ok(rx.await.map_err(|_| RecorderError::Stopped)??)
    }

    /// Deletes records older than `cutoff`, in order with the writes.
    pub async fn retention(&self, cutoff: DateTime<Utc>) -> Result<u64, RecorderError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Retention(cutoff, tx))
            .map_err(|_| RecorderError::Stopped)?;
        Ok(rx.await.map_err(|_| RecorderError::Stopped)??)
    }
}

/// The recorder task.
pub struct Recorder {
    store: SledStore,
    /// Stamps records in log order (see [`RecordIds::next_in_order`]).
    ids: RecordIds,
    rx: mpsc::Receiver<Msg>,
    stats: Arc<RecorderStats>,
    /// Longest a batch on disk waits for its aggregates to be applied.
    apply_every: Duration,
    /// Appended, not yet applied: the records and where they went.
    unapplied: Vec<(Record, Vec<Alert>)>,
    appended: Option<Appended>,
    /// When the oldest unapplied batch must be applied.
    apply_due: Option<Instant>,
    /// Deleted users, with the ids of the keys they had: their records that come late are
    /// dropped (see [`RecorderHandle::delete_user`]). In memory: nothing is in flight across
    /// a restart.
    erased: HashMap<Arc<str>, HashSet<String>>,
    /// Cluster mode: told of every batch once it is on disk.
    sink: Option<SettledSink>,
}

impl Recorder {
    /// Creates the recorder and its handle; run it with [`Recorder::run`]. Aggregates are
    /// applied at most `apply_every` after their records reached the disk.
    pub fn new(store: SledStore, apply_every: Duration) -> (Recorder, RecorderHandle) {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(RecorderStats::default());
        (
            Recorder {
                store,
                ids: RecordIds::new(),
                rx,
                stats: stats.clone(),
                apply_every,
                unapplied: Vec::new(),
                appended: None,
                apply_due: None,
                erased: HashMap::new(),
                sink: None,
            },
            RecorderHandle { tx, stats },
        )
    }

    /// Sends the settlements of every batch written from now on to `sink` (cluster mode),
    /// once the batch is on disk.
    pub fn set_sink(&mut self, sink: SettledSink) {
        self.sink = Some(sink);
    }

    /// Starts the recorder on its own thread; it runs until every handle is dropped.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("gm-recorder".into())
            .spawn(move || self.run())
    }

    /// The next message; `None` once every handle is gone. Applies what is due while waiting.
    fn next_msg(&mut self) -> Option<Msg> {
        loop {
            let Some(due) = self.apply_due else {
                return self.rx.recv().ok();
            };
            match self.rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(m) => return Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => self.apply(),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Runs until every handle is dropped and the queue is drained (blocking).
    pub fn run(self) {
        let store = self.store.clone();
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::scope(|scope| {
            // sled's flush only shortens the log tail a restart applies again, and can take tens
            // of ms: on its own thread, so that records keep reaching the log meanwhile (a
            // `kill -9` loses what has not). Any `P` it flushes was applied after the log sync.
            let flusher = std::thread::Builder::new()
                .name("gm-sled-flush".into())
                .spawn_scoped(scope, move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(SLED_FLUSH_EVERY) {
                        if let Err(e) = store.flush_sync() {
                            tracing::warn!(error = %e, "sled flush failed (the record log holds every record; retried in a second)");
                        }
                    }
                });
            if let Err(e) = flusher {
                tracing::warn!(error = %e, "cannot start the sled flusher; sled is flushed at shutdown only");
            }
            self.run_loop();
            drop(stop);
        });
    }

    fn run_loop(mut self) {
        let mut buf: Vec<(Record, Vec<Alert>)> = Vec::with_capacity(1024);
        let mut releases: Vec<Option<Box<Release>>> = Vec::new();
        let mut on_disk: Vec<oneshot::Sender<()>> = Vec::new();
        let mut barriers: Vec<oneshot::Sender<()>> = Vec::new();
        let mut written: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(first) = self.next_msg() {
            let mut op = None;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(r, _) if self.of_erased_user(&r) => {}
                    Msg::Record(r, rel) => {
                        buf.push((*r, Vec::new()));
                        if self.sink.is_some() {
                            releases.push(rel);
                        }
                    }
                    Msg::Alerted(r, _, done, _) if self.of_erased_user(&r) => {
                        // Its alerts go with it; the request that waits is let go.
                        let _ = done.send(());
                    }
                    Msg::Alerted(r, a, done, rel) => {
                        buf.push((*r, a));
                        on_disk.push(done);
                        if self.sink.is_some() {
                            releases.push(rel);
                        }
                    }
                    Msg::Barrier(b) => barriers.push(b),
                    Msg::Written(w) => written.push(w),
                    other => {
                        // Admin operations run after the records queued before them.
                        op = Some(other);
                        break;
                    }
                }
                if buf.len() >= MAX_BATCH {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            let wrote = !buf.is_empty();
            if wrote {
                for (rec, alerts) in &mut buf {
                    let id = self.ids.next_in_order(rec.created_at);
                    for a in alerts.iter_mut().filter(|a| a.record_id == rec.id) {
                        a.record_id = id;
                    }
                    rec.id = id;
                }
                let settled = self.sink.as_ref().map(|_| {
                    buf.iter()
                        .zip(releases.drain(..))
                        .map(|((rec, _), rel)| Settled::of(rec, rel))
                        .collect::<Vec<_>>()
                });
                self.append(&mut buf);
                // Only now on disk: a settlement the pump loses is found again in the log.
                if let (Some(sink), Some(settled)) = (&self.sink, settled) {
                    sink(settled);
                }
            }
            // Whoever waits reads sled next (alert delivery reads its outbox there), so what
            // they wait for is applied first.
            let waited = !on_disk.is_empty() || !barriers.is_empty() || op.is_some();
            if waited || self.unapplied.len() >= MAX_BATCH || self.apply_due.is_some_and(|d| d <= Instant::now()) {
                self.apply();
            }
            for w in written.drain(..) {
                let _ = w.send(());
            }
            for done in on_disk.drain(..) {
                let _ = done.send(());
            }
            for b in barriers.drain(..) {
                let _ = b.send(());
            }
            match op {
                Some(Msg::DeleteUser(user, key_ids, reply)) => {
                    self.erased.entry(Arc::from(user.as_str())).or_default().extend(key_ids);
                    let res = self.store.delete_user_usage(&user);
                    let res = match res {
                        Ok(n) => self.store.flush_sync().map(|_| n),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(res);
                }
                Some(Msg::Retention(cutoff, reply)) => {
                    let res = self.store.delete_records_before(cutoff);
                    let res = match res {
                        Ok(n) => self.store.flush_sync().map(|_| n),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(res);
                }
                _ => {}
            }
            if wrote {
                std::thread::sleep(GATHER);
            }
        }
        self.apply();
        if let Err(e) = self.store.flush_sync() {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    /// True for a record of a deleted user's request that settled after the erasure (it is
    /// dropped; see [`RecorderHandle::delete_user`]).
    fn of_erased_user(&self, r: &Record) -> bool {
        let Some(keys) = self.erased.get(&*r.user_id) else {
            return false;
        };
        let late = r.details.key_id().is_some_and(|k| keys.contains(k));
        if late {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped_erased.fetch_add(1, Ordering::Relaxed);
            tracing::info!(user = %r.user_id, kind = r.kind().as_str(), "record of a deleted user, settled after the erasure: dropped");
        }
        late
    }

    /// Writes one batch to the log (retried until it is) and keeps it for the next apply;
    /// empties `batch`.
    fn append(&mut self, batch: &mut Vec<(Record, Vec<Alert>)>) {
        let mut backoff = Duration::from_millis(50);
        let t0 = Instant::now();
        let appended = loop {
            match self.store.append(batch) {
                Ok(a) => break a,
                Err(e) => self.failed(&e, &mut backoff),
            }
        };
        self.stats
            .last_flush_us
            .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        let n = batch.len() as u64;
        self.stats.queued.fetch_sub(n, Ordering::Relaxed);
        self.stats.written.fetch_add(n, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.recovered();
        match &mut self.appended {
            Some(a) => a.merge(appended),
            None => {
                self.appended = Some(appended);
                self.apply_due = Some(Instant::now() + self.apply_every);
            }
        }
        self.unapplied.append(batch);
    }

    /// Syncs the log and applies the aggregates of every batch written since the last apply
    /// (retried alone: appending again would record them twice).
    fn apply(&mut self) {
        let Some(appended) = self.appended.take() else {
            return;
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.apply_appended(&self.unapplied, &appended) {
                Ok(()) => break,
                Err(e) => self.failed(&e, &mut backoff),
            }
        }
        self.recovered();
        self.unapplied.clear();
        self.apply_due = None;
    }

    fn recovered(&self) {
        if self.stats.degraded.swap(false, Ordering::Relaxed) {
            tracing::warn!("storage writes recovered");
            if let Ok(mut g) = self.stats.last_error.lock() {
                *g = None;
            }
        }
    }

    fn failed(&self, e: &StoreError, backoff: &mut Duration) {
        tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "storage write failed; retrying (nothing is dropped)");
        self.stats.degraded.store(true, Ordering::Relaxed);
        if let Ok(mut g) = self.stats.last_error.lock() {
            *g = Some(e.to_string());
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
    }
}
