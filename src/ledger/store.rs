//! The store: the record log (every usage record, see [`super::log`]) and sled (users, keys,
//! upload sessions, alerts, and the aggregates the records add up to).
//!
//! A batch of records is written to the log first (from then on it survives a crash of the
//! process). Before its aggregates are applied, the log is synced (from then on it survives a
//! crash of the machine); then the aggregates go to sled in one atomic batch together with the
//! log position they reach (`P`). The recorder groups the syncs and applies of the batches
//! written within `flush_interval` (an fsync and a sled batch cost the same for one record or a
//! thousand); readers see records once applied. sled is not
//! flushed for every batch: after a crash, whatever part of the log lies past the `P` sled kept
//! is applied again at open, so aggregates and ledger never disagree and sled's own recovery
//! stays small (sled replays what was written since its last open; keeping records out of it
//! is what keeps restarts short).
//!
//! Keys of the `ledger` tree:
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `P` | | log position up to which aggregates are applied (u64) |
//! | `h` | user | log positions of the user's newest record, overall and per type (4 x u64) |
//! | `L` | segment start (u64) | oldest and newest record time in that segment (2 x i64 ms) |
//! | `a` | `YYYY-MM` `/` user | [`Totals`] of the user's month |
//! | `g` | `YYYY-MM-DD` `/` type | [`Totals`] of a day, all users |
//! | `s` | `YYYY-MM` | [`Totals`] of a month, all users |
//! | `S` | `YYYY-MM` | active users of a month (u64) |
//! | `M` | `YYYY-MM` `/` model | [`Totals`] of a model's month |
//! | `T` | `YYYY-MM` `/` tag name `/` tag value | [`Totals`] of a tag value's month |
//! | `F` | `YYYY-MM` `/` user `/` quota `/` threshold (3 digits) | a quota alert fired: [`Alert`] JSON |
//! | `O` | delivery id | a pending alert delivery (the outbox): [`Delivery`](super::alerts::Delivery) JSON |
//! | `D` | `YYYY-MM` `/` user `/` delivery id | a finished alert delivery (sent or failed) |
//!
//! `F` and `O` are staged in the batch of the record that crossed the threshold (see
//! [`super::alerts`]), so an alert exists on disk exactly when the usage that caused it does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde_json::Value;

use super::alerts::Alert;
use super::log::{DAY_BLOCK, Links, LogError, NONE, RecordLog};
use super::record::{Record, RecordKind};
use super::totals::Totals;
use crate::clock::Month;

/// Key of the log position the aggregates reach.
const APPLIED: u8 = b'P';
/// Prefix of a user's chain heads.
const HEADS: u8 = b'h';
/// Prefix of a segment's time span.
const SPAN: u8 = b'L';
/// Tries (50 ms apart) to get sled's lock before reporting it held.
const LOCK_RETRIES: u32 = 20;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database.
    #[error("storage at {path} is locked by another process (is another gateway running on it?)")]
    Locked {
        /// The directory.
        path: String,
    },
    /// sled failed.
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    /// The record log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A stored value could not be decoded.
    #[error("corrupt stored value under {0}")]
    Corrupt(String),
    /// A cursor that this store never gave out.
    #[error("cursor is not valid")]
    BadCursor,
    /// An apply that leaves out batches appended after it (their chain heads would be lost).
    #[error("appended batches must be applied together, up to the last one")]
    ApplyOrder,
}

/// The embedded store: the record log and sled.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    ledger: sled::Tree,
    users: sled::Tree,
    keys: sled::Tree,
    meta: sled::Tree,
    log: Arc<RecordLog>,
    unapplied: Arc<parking_lot::Mutex<Unapplied>>,
}

/// The writer's view of records appended but not yet applied: their users' chain heads and day
/// runs. sled (and so every reader) sees them only when they are applied, which the recorder
/// does in groups; the next append must still link to them.
#[derive(Debug, Default)]
struct Unapplied {
    heads: HashMap<Arc<str>, [u64; 4]>,
    days: HashMap<(Arc<str>, usize), DayRun>,
    /// The end of the last append.
    end: u64,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

/// Batches appended to the log: each record's position, and the end.
#[derive(Debug)]
pub struct Appended {
    /// Position of each record, in order.
    pub positions: Vec<u64>,
    /// Where the last batch ends.
    pub end: u64,
}

impl Appended {
    /// Adds a later batch, so that both are applied in one go.
    pub fn merge(&mut self, later: Appended) {
        self.positions.extend(later.positions);
        self.end = later.end;
    }
}

/// A user's run of records of one type on one day, as each record's day block carries it: the
/// totals so far that day, and the position of the last record of the run before (an earlier
/// day). The newest record of a day holds the day's totals, so a user's daily figures are read
/// from one frame per day and type, and sled keeps no per-user-day keys (they made sled's
/// restart replay, and its writes, grow with users x days).
#[derive(Debug, Clone, Copy)]
struct DayRun {
    /// Days since the common era (UTC).
    day: i32,
    totals: Totals,
    link: u64,
}

impl DayRun {
    fn encode(&self) -> [u8; DAY_BLOCK] {
        let mut b = [0u8; DAY_BLOCK];
        b[..8].copy_from_slice(&self.link.to_be_bytes());
        b[8..].copy_from_slice(&self.totals.encode());
        b
    }

    /// The run a frame's day block describes (`None` for a frame without one).
    fn of(frame: &super::log::Frame) -> Option<DayRun> {
        let b = frame.day_block()?;
        Some(DayRun {
            day: day_number(frame.links.created_ms),
            link: u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            totals: Totals::decode(b.get(8..)?)?,
        })
    }
}

/// The UTC day of a time in ms, as days since the common era.
fn day_number(ms: i64) -> i32 {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.date_naive().num_days_from_ce())
        .unwrap_or(0)
}

/// Which of a user's chain heads a type uses (0 is the chain of all types).
fn kind_slot(k: RecordKind) -> usize {
    match k {
        RecordKind::MessageSent => 1,
        RecordKind::AiResponse => 2,
        RecordKind::FileUpload => 3,
    }
}

fn month_key(prefix: u8, m: Month) -> Vec<u8> {
    let mut k = Vec::with_capacity(8);
    k.push(prefix);
    k.extend_from_slice(m.to_string().as_bytes());
    k
}

/// A key: the prefix byte, then the parts joined by `/`.
pub(super) fn join(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(prefix);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(b'/');
        }
        k.extend_from_slice(p);
    }
    k
}

fn span_key(segment: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = SPAN;
    k[1..].copy_from_slice(&segment.to_be_bytes());
    k
}

/// Filters for listing records.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Only this user's records.
    pub user_id: Option<String>,
    /// Only records of this type.
    pub kind: Option<RecordKind>,
    /// Only records created at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only records created before this time.
    pub to: Option<DateTime<Utc>>,
    /// Start at this record (a cursor from an earlier page), newest first from there.
    pub cursor: Option<u64>,
}

/// Renders a page cursor (a log position).
pub fn format_cursor(pos: u64) -> String {
    format!("{pos:016x}")
}

/// Parses a page cursor.
pub fn parse_cursor(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok().filter(|p| *p != NONE)
}

/// One row of a per-day breakdown.
#[derive(Debug, Clone, PartialEq)]
pub struct DayRow {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Record type.
    pub kind: String,
    /// Totals of that day and type.
    pub totals: Totals,
}

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
            db,
            log: Arc::new(log),
            unapplied: Arc::default(),
        };
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
                    Ok(r) => chunk.push((f.pos, r, super::alerts::decode_alerts(f.alerts()))),
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

    /// Writes records: appended and synced, then applied (tests and tools; the recorder runs
    /// the two steps itself so that it can retry each alone).
    pub fn write_records(&self, records: &[Record]) -> Result<(), StoreError> {
        self.write_batch(records, &[])
    }

    /// Writes records and alerts (carried by the last record's frame; with no records, staged
    /// in sled directly). For tests and tools.
    pub fn write_batch(&self, records: &[Record], alerts: &[Alert]) -> Result<(), StoreError> {
        if records.is_empty() {
            let mut batch = sled::Batch::default();
            super::alerts::stage(&self.ledger, &mut batch, alerts)?;
            self.ledger.apply_batch(batch)?;
            return Ok(());
        }
        let mut items: Vec<(Record, Vec<Alert>)> = records.iter().map(|r| (r.clone(), Vec::new())).collect();
        if let Some(last) = items.last_mut() {
            last.1 = alerts.to_vec();
        }
        let appended = self.append(&items)?;
        self.apply_appended(&items, &appended)
    }

    /// Appends records, each with the alerts it fired, to the log (written, synced by
    /// [`SledStore::apply_appended`]); returns their positions and the end of the batch. Nothing is visible until [`SledStore::apply`]. A
    /// failed append can be retried as a whole: nothing refers to positions of a batch that was
    /// never applied.
    pub fn append(&self, items: &[(Record, Vec<Alert>)]) -> Result<Appended, StoreError> {
        let mut heads: HashMap<Arc<str>, [u64; 4]> = HashMap::new();
        // Per user and type: the day of the newest run, its running totals, and its link.
        let mut days: HashMap<(Arc<str>, usize), DayRun> = HashMap::new();
        // Held to the end: one writer at a time, and this batch links to unapplied ones.
        let mut unapplied = self.unapplied.lock();
        let mut out = Vec::with_capacity(items.len());
        let mut app = self.log.append();
        let mut json = Vec::with_capacity(1024);
        for (rec, alerts) in items {
            let h = match heads.get_mut(&*rec.user_id) {
                Some(h) => h,
                None => {
                    let h = match unapplied.heads.get(&*rec.user_id) {
                        Some(h) => *h,
                        None => self.heads(&rec.user_id)?,
                    };
                    heads.entry(rec.user_id.clone()).or_insert(h)
                }
            };
            let k = kind_slot(rec.kind());
            json.clear();
            rec.write_json(&mut json)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let links = Links {
                prev_user: h[0],
                prev_kind: h[k],
                created_ms: rec.created_at.timestamp_millis(),
            };
            let day = day_number(links.created_ms);
            let slot = (rec.user_id.clone(), k);
            let prev = match days.get(&slot).or_else(|| unapplied.days.get(&slot)) {
                Some(run) => Some(*run),
                // Not touched since the last apply: h[k] is a visible frame.
                None => self.day_run(h[k])?,
            };
            let t = Totals::of(rec);
            let run = match prev {
                Some(mut run) if run.day == day => {
                    run.totals.add(&t);
                    run
                }
                // A new day: this record starts its run, linked to the last run's last record.
                _ => DayRun {
                    day,
                    totals: t,
                    link: h[k],
                },
            };
            days.insert(slot, run);
            let pos = app.push(links, &json, &super::alerts::encode_alerts(alerts), Some(&run.encode()))?;
            h[0] = pos;
            h[k] = pos;
            out.push(pos);
        }
        // Synced before the aggregates are applied (see `apply_appended`), not here: one
        // fsync per apply instead of one per batch.
        let end = app.write()?;
        unapplied.heads.extend(heads);
        unapplied.days.extend(days);
        unapplied.end = end;
        Ok(Appended { positions: out, end })
    }

    /// [`SledStore::apply`] for what [`SledStore::append`] wrote since the last apply: `a` must
    /// cover every batch since (merged with [`Appended::merge`]), whose chain heads the store
    /// kept. The log is synced first, so `P` never runs ahead of what a machine crash keeps.
    pub fn apply_appended(&self, items: &[(Record, Vec<Alert>)], a: &Appended) -> Result<(), StoreError> {
        let heads = {
            let unapplied = self.unapplied.lock();
            if a.end != unapplied.end {
                return Err(StoreError::ApplyOrder);
            }
            unapplied.heads.clone()
        };
        self.log.sync_written()?;
        self.apply(
            items.iter().zip(&a.positions).map(|((r, al), p)| (*p, r, &al[..])),
            a.end,
            Some(&heads),
        )
    }

    /// The day run the record at `pos` ends (`None` at the end of a chain or past erasure).
    fn day_run(&self, pos: u64) -> Result<Option<DayRun>, StoreError> {
        Ok(self.log.read(pos)?.filter(|f| !f.erased).and_then(|f| DayRun::of(&f)))
    }

    /// The log positions of a user's newest record, overall and per type.
    fn heads(&self, user: &str) -> Result<[u64; 4], StoreError> {
        let mut h = [NONE; 4];
        if let Some(v) = self.ledger.get(join(HEADS, &[user.as_bytes()]))? {
            if v.len() != 32 {
                return Err(StoreError::Corrupt(format!("heads of {user}")));
            }
            for (i, slot) in h.iter_mut().enumerate() {
                *slot = u64::from_be_bytes(
                    v[i * 8..i * 8 + 8]
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("heads".into()))?,
                );
            }
        }
        Ok(h)
    }

    /// Applies appended records (position, record, alerts fired) to the aggregates, the users'
    /// chains and the alerts in one atomic sled batch that also moves `P` to `end`, then makes
    /// them visible. Not flushed: the log is what is durable. `known_heads` are the chain heads
    /// the append left (else they are read back and moved along the records).
    pub fn apply<'a>(
        &self,
        items: impl IntoIterator<Item = (u64, &'a Record, &'a [Alert])>,
        end: u64,
        known_heads: Option<&HashMap<Arc<str>, [u64; 4]>>,
    ) -> Result<(), StoreError> {
        // Deltas grouped by what they add to, keyed by borrowed parts: one key built per group.
        let mut user_month: HashMap<(&str, Month), Totals> = HashMap::new();
        let mut day: HashMap<(i32, RecordKind), Totals> = HashMap::new();
        let mut month: HashMap<Month, Totals> = HashMap::new();
        let mut model: HashMap<(Month, &str), Totals> = HashMap::new();
        let mut tag: HashMap<(Month, &str, &str), Totals> = HashMap::new();
        let mut heads: HashMap<&str, [u64; 4]> = HashMap::new();
        let mut spans: HashMap<u64, (i64, i64)> = HashMap::new();
        let mut alerts: Vec<Alert> = Vec::new();
        let segments = self.log.segment_ranges();
        for (pos, r, fired) in items {
            let ms = r.created_at.timestamp_millis();
            let seg = segments
                .iter()
                .rev()
                .find(|(s, _)| *s <= pos)
                .map(|(s, _)| *s)
                .unwrap_or(0);
            let span = spans.entry(seg).or_insert((ms, ms));
            span.0 = span.0.min(ms);
            span.1 = span.1.max(ms);
            let user: &str = &r.user_id;
            if known_heads.is_none() {
                if !heads.contains_key(user) {
                    heads.insert(user, self.heads(user)?);
                }
                if let Some(h) = heads.get_mut(user) {
                    h[0] = pos;
                    h[kind_slot(r.kind())] = pos;
                }
            }
            alerts.extend(fired.iter().cloned());
            let t = Totals::of(r);
            let m = r.month();
            let d = r.created_at.date_naive().num_days_from_ce();
            user_month.entry((user, m)).or_default().add(&t);
            day.entry((d, r.kind())).or_default().add(&t);
            month.entry(m).or_default().add(&t);
            if let Some(name) = r.model() {
                model.entry((m, name)).or_default().add(&t);
            }
            for (name, v) in r.details.tags() {
                tag.entry((m, name, v)).or_default().add(&t);
            }
        }
        let day_str = |d: i32| {
            NaiveDate::from_num_days_from_ce_opt(d)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default()
        };
        let mut batch = sled::Batch::default();
        let mut new_users: HashMap<Month, u64> = HashMap::new();
        for ((user, m), d) in user_month {
            let k = join(b'a', &[m.to_string().as_bytes(), user.as_bytes()]);
            if !self.add_totals(&mut batch, k, &d)? {
                // First record of this user in this month: one more active user.
                *new_users.entry(m).or_default() += 1;
            }
        }
        for ((d, kind), t) in day {
            let k = join(b'g', &[day_str(d).as_bytes(), kind.as_str().as_bytes()]);
            self.add_totals(&mut batch, k, &t)?;
        }
        for (m, t) in month {
            self.add_totals(&mut batch, month_key(b's', m), &t)?;
        }
        for ((m, name), t) in model {
            let k = join(b'M', &[m.to_string().as_bytes(), name.as_bytes()]);
            self.add_totals(&mut batch, k, &t)?;
        }
        for ((m, name, v), t) in tag {
            let k = join(b'T', &[m.to_string().as_bytes(), name.as_bytes(), v.as_bytes()]);
            self.add_totals(&mut batch, k, &t)?;
        }
        for (m, n) in new_users {
            let k = month_key(b'S', m);
            let cur = self.get_u64(&k)?;
            batch.insert(k, &(cur + n).to_be_bytes()[..]);
        }
        let known = known_heads.into_iter().flatten().map(|(u, h)| (&**u, h));
        for (user, h) in heads.iter().map(|(u, h)| (*u, h)).chain(known) {
            let mut v = [0u8; 32];
            for (i, p) in h.iter().enumerate() {
                v[i * 8..i * 8 + 8].copy_from_slice(&p.to_be_bytes());
            }
            batch.insert(join(HEADS, &[user.as_bytes()]), &v[..]);
        }
        for (seg, (lo, hi)) in spans {
            let k = span_key(seg);
            let (lo, hi) = match self.ledger.get(k)? {
                Some(v) if v.len() == 16 => {
                    let old_lo = i64::from_be_bytes(v[..8].try_into().map_err(|_| StoreError::Corrupt("L".into()))?);
                    let old_hi = i64::from_be_bytes(v[8..].try_into().map_err(|_| StoreError::Corrupt("L".into()))?);
                    (lo.min(old_lo), hi.max(old_hi))
                }
                _ => (lo, hi),
            };
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&lo.to_be_bytes());
            v[8..].copy_from_slice(&hi.to_be_bytes());
            batch.insert(&k[..], &v[..]);
        }
        super::alerts::stage(&self.ledger, &mut batch, &alerts)?;
        batch.insert(&[APPLIED][..], &end.to_be_bytes()[..]);
        self.ledger.apply_batch(batch)?;
        self.log.set_visible(end);
        let mut unapplied = self.unapplied.lock();
        if end >= unapplied.end {
            // sled now holds every head and the log every day run the writer kept.
            unapplied.heads.clear();
            unapplied.days.clear();
        }
        Ok(())
    }

    /// Stages `key = stored + delta`; returns whether the key existed.
    fn add_totals(&self, batch: &mut sled::Batch, key: Vec<u8>, delta: &Totals) -> Result<bool, StoreError> {
        let cur = self.ledger.get(&key)?;
        let mut total = match &cur {
            Some(v) => Totals::decode(v).ok_or_else(|| StoreError::Corrupt(String::from_utf8_lossy(&key).into()))?,
            None => Totals::default(),
        };
        total.add(delta);
        batch.insert(key, &total.encode()[..]);
        Ok(cur.is_some())
    }

    fn get_u64(&self, k: &[u8]) -> Result<u64, StoreError> {
        Ok(match self.ledger.get(k)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("counter".into()))?,
            ),
            None => 0,
        })
    }

    fn get_totals(&self, k: &[u8]) -> Result<Totals, StoreError> {
        match self.ledger.get(k)? {
            Some(v) => Totals::decode(&v).ok_or_else(|| StoreError::Corrupt(String::from_utf8_lossy(k).into())),
            None => Ok(Totals::default()),
        }
    }

    /// A user's totals for a month.
    pub fn user_month(&self, user: &str, m: Month) -> Result<Totals, StoreError> {
        self.get_totals(&join(b'a', &[m.to_string().as_bytes(), user.as_bytes()]))
    }

    /// Every user's totals for a month (used to load the counters at start).
    pub fn month_users(&self, m: Month) -> Result<Vec<(String, Totals)>, StoreError> {
        let mut prefix = month_key(b'a', m);
        prefix.push(b'/');
        let mut out = Vec::new();
        for kv in self.ledger.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let user = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let t = Totals::decode(&v).ok_or_else(|| StoreError::Corrupt(user.clone()))?;
            out.push((user, t));
        }
        Ok(out)
    }

    /// Month totals over all users, and the number of active users.
    pub fn month_summary(&self, m: Month) -> Result<(Totals, u64), StoreError> {
        Ok((
            self.get_totals(&month_key(b's', m))?,
            self.get_u64(&month_key(b'S', m))?,
        ))
    }

    /// Per-model totals of a month.
    pub fn month_models(&self, m: Month) -> Result<Vec<(String, Totals)>, StoreError> {
        self.scan_totals(&{
            let mut p = month_key(b'M', m);
            p.push(b'/');
            p
        })
    }

    /// Per-value totals of a tag in a month.
    pub fn month_tag(&self, m: Month, name: &str) -> Result<Vec<(String, Totals)>, StoreError> {
        let mut p = join(b'T', &[m.to_string().as_bytes(), name.as_bytes()]);
        p.push(b'/');
        self.scan_totals(&p)
    }

    fn scan_totals(&self, prefix: &[u8]) -> Result<Vec<(String, Totals)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.ledger.scan_prefix(prefix) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((name.clone(), Totals::decode(&v).ok_or(StoreError::Corrupt(name))?));
        }
        Ok(out)
    }

    /// Per-day, per-type totals from `since` (inclusive), for one user or for everyone.
    pub fn daily(&self, user: Option<&str>, since: NaiveDate) -> Result<Vec<DayRow>, StoreError> {
        let Some(user) = user else {
            return self.daily_all(since);
        };
        // One frame per day and type: the newest record of each run holds the run's totals.
        let since_day = since.num_days_from_ce();
        let heads = self.heads(user)?;
        let mut sums: std::collections::BTreeMap<(i32, &'static str), Totals> = std::collections::BTreeMap::new();
        for kind in [RecordKind::MessageSent, RecordKind::AiResponse, RecordKind::FileUpload] {
            let mut pos = heads[kind_slot(kind)];
            while let Some(run) = self.day_run(pos)? {
                if run.day < since_day {
                    break;
                }
                sums.entry((run.day, kind.as_str())).or_default().add(&run.totals);
                pos = run.link;
            }
        }
        Ok(sums
            .into_iter()
            .map(|((day, kind), totals)| DayRow {
                day: NaiveDate::from_num_days_from_ce_opt(day)
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .unwrap_or_default(),
                kind: kind.to_string(),
                totals,
            })
            .collect())
    }

    /// Per-day, per-type totals of everyone from `since`.
    fn daily_all(&self, since: NaiveDate) -> Result<Vec<DayRow>, StoreError> {
        let prefix = vec![b'g'];
        let mut start = prefix.clone();
        start.extend_from_slice(since.format("%Y-%m-%d").to_string().as_bytes());
        let mut end = prefix.clone();
        end.push(0xff);
        let mut out = Vec::new();
        for kv in self.ledger.range(start..end) {
            let (k, v) = kv?;
            let rest = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let Some((day, kind)) = rest.split_once('/') else {
                continue;
            };
            let totals = Totals::decode(&v).ok_or_else(|| StoreError::Corrupt(rest.clone()))?;
            out.push(DayRow {
                day: day.to_string(),
                kind: kind.to_string(),
                totals,
            });
        }
        Ok(out)
    }

    /// Records matching `f`, newest first, at most `limit`, each with its position (the
    /// cursor that starts a page at it). One user's records are read by following their chain
    /// in the log (a page costs its own records, however long the history); everyone's by
    /// walking the log backwards.
    pub fn records(&self, f: &RecordFilter, limit: usize) -> Result<Vec<(u64, Record)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(512));
        if limit == 0 {
            return Ok(out);
        }
        let from_ms = f.from.map(|t| t.timestamp_millis());
        let to_ms = f.to.map(|t| t.timestamp_millis());
        match &f.user_id {
            Some(user) => {
                let slot = f.kind.map(kind_slot).unwrap_or(0);
                let mut pos = match f.cursor {
                    Some(c) => c,
                    None => self.heads(user)?[slot],
                };
                while pos != NONE {
                    let Some(frame) = self.log.read(pos)? else {
                        if f.cursor == Some(pos) {
                            return Err(StoreError::BadCursor);
                        }
                        break;
                    };
                    let ms = frame.links.created_ms;
                    if from_ms.is_some_and(|from| ms < from) {
                        break;
                    }
                    // The chain of the type asked for, once on it (a cursor may land elsewhere).
                    let next = if slot != 0 {
                        frame.links.prev_kind
                    } else {
                        frame.links.prev_user
                    };
                    if !frame.erased && to_ms.is_none_or(|to| ms < to) {
                        let rec = decode_record(frame.record())?;
                        if &*rec.user_id != user.as_str() {
                            // Only a forged cursor leads off the user's own chain.
                            return Err(StoreError::BadCursor);
                        }
                        if f.kind.is_some_and(|k| k != rec.kind()) {
                            pos = frame.links.prev_user;
                            continue;
                        }
                        out.push((frame.pos, rec));
                        if out.len() >= limit {
                            break;
                        }
                    }
                    pos = next;
                }
            }
            None => {
                let mut frame = match f.cursor {
                    Some(c) => Some(self.log.read(c)?.ok_or(StoreError::BadCursor)?),
                    None => self.log.read_before(self.log.visible())?,
                };
                while let Some(fr) = frame {
                    let ms = fr.links.created_ms;
                    if from_ms.is_some_and(|from| ms < from) {
                        break;
                    }
                    if !fr.erased && to_ms.is_none_or(|to| ms < to) {
                        let rec = decode_record(fr.record())?;
                        if f.kind.is_none_or(|k| k == rec.kind()) {
                            out.push((fr.pos, rec));
                            if out.len() >= limit {
                                break;
                            }
                        }
                    }
                    frame = self.log.read_before(fr.pos)?;
                }
            }
        }
        Ok(out)
    }

    /// The time span (oldest, newest record, ms) of each segment, by segment start.
    fn spans(&self) -> Result<HashMap<u64, (i64, i64)>, StoreError> {
        let mut out = HashMap::new();
        for kv in self.ledger.scan_prefix([SPAN]) {
            let (k, v) = kv?;
            let (Ok(seg), Ok(lo), Ok(hi)) = (
                <[u8; 8]>::try_from(&k[1..]),
                <[u8; 8]>::try_from(v.get(..8).unwrap_or_default()),
                <[u8; 8]>::try_from(v.get(8..16).unwrap_or_default()),
            ) else {
                return Err(StoreError::Corrupt("L".into()));
            };
            out.insert(
                u64::from_be_bytes(seg),
                (i64::from_be_bytes(lo), i64::from_be_bytes(hi)),
            );
        }
        Ok(out)
    }

    /// Calls `each` with every record of a month, oldest first, as stored JSON bytes; reads only
    /// the segments whose records overlap the month, sequentially.
    pub fn for_each_record_in(&self, m: Month, mut each: impl FnMut(&[u8]) -> bool) -> Result<(), StoreError> {
        let lo = m.start().timestamp_millis();
        let hi = m.next().start().timestamp_millis();
        let spans = self.spans()?;
        let mut open = true;
        for (start, end) in self.log.segment_ranges() {
            if !open {
                break;
            }
            if spans.get(&start).is_none_or(|&(a, b)| b < lo || a >= hi) {
                continue;
            }
            self.log.scan(start, end, |fr| {
                let ms = fr.links.created_ms;
                if !fr.erased && ms >= lo && ms < hi {
                    open = each(fr.record());
                }
                open
            })?;
        }
        Ok(())
    }

    /// Number of records in the ledger (slow: reads the whole log; for tests and tools).
    pub fn count_records(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        self.log.scan(0, u64::MAX, |fr| {
            n += u64::from(!fr.erased);
            true
        })?;
        Ok(n)
    }

    /// Deletes records created before `cutoff`; aggregates stay. Whole segments older than the
    /// cutoff are removed; older records in a segment that straddles it are erased in place.
    /// Returns how many records went.
    pub fn delete_records_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let cut = cutoff.timestamp_millis();
        // Every record about to go must already count in the aggregates sled keeps.
        self.db.flush()?;
        let spans = self.spans()?;
        let mut deleted = 0;
        let mut gone = sled::Batch::default();
        for (start, end) in self.log.segment_ranges() {
            let Some(&(lo, hi)) = spans.get(&start) else {
                continue;
            };
            if lo >= cut {
                continue;
            }
            let mut old = Vec::new();
            let mut live = 0u64;
            self.log.scan(start, end, |fr| {
                if !fr.erased {
                    live += 1;
                    if fr.links.created_ms < cut {
                        old.push(fr.pos);
                    }
                }
                true
            })?;
            if hi < cut && !self.log.is_active(start) && self.log.drop_segment(start)? {
                deleted += live;
                gone.remove(&span_key(start)[..]);
                continue;
            }
            for pos in old {
                if self.log.erase(pos)? {
                    deleted += 1;
                }
            }
        }
        self.log.sync()?;
        self.ledger.apply_batch(gone)?;
        Ok(deleted)
    }

    /// Deletes a user's records (erased in the log) and per-user aggregates.
    pub fn delete_user_usage(&self, user: &str) -> Result<u64, StoreError> {
        // The records erased must already count in what sled keeps, or a replay after a crash
        // would miss them while the global totals already include them.
        self.db.flush()?;
        let mut n = 0;
        let mut months = std::collections::BTreeSet::new();
        let mut pos = self.heads(user)?[0];
        while pos != NONE {
            let Some(frame) = self.log.read(pos)? else {
                break;
            };
            if let Some(t) = DateTime::<Utc>::from_timestamp_millis(frame.links.created_ms) {
                months.insert(Month::of(t));
            }
            if !frame.erased
                && decode_record(frame.record()).is_ok_and(|r| &*r.user_id == user)
                && self.log.erase(pos)?
            {
                n += 1;
            }
            pos = frame.links.prev_user;
        }
        self.log.sync()?;
        let mut batch = sled::Batch::default();
        batch.remove(join(HEADS, &[user.as_bytes()]));
        for m in months {
            batch.remove(join(b'a', &[m.to_string().as_bytes(), user.as_bytes()]));
        }
        self.ledger.apply_batch(batch)?;
        Ok(n)
    }

    /// The ledger tree (for the alert keys kept in it, see [`super::alerts`]).
    pub(super) fn ledger_tree(&self) -> &sled::Tree {
        &self.ledger
    }

    /// Raw access to the users tree.
    pub fn users(&self) -> &sled::Tree {
        &self.users
    }

    /// Raw access to the keys tree.
    pub fn keys(&self) -> &sled::Tree {
        &self.keys
    }

    /// Raw access to the meta tree (small state: alerts, upload sessions).
    pub fn meta(&self) -> &sled::Tree {
        &self.meta
    }

    /// Bytes the database occupies on disk (sled and the record log).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0) + self.log.size_on_disk()
    }
}

fn decode_record(v: &[u8]) -> Result<Record, StoreError> {
    let json: Value = serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Record::from_json(&json).ok_or_else(|| StoreError::Corrupt("record".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::record::RecordIds;
    use chrono::TimeZone;

    fn rec(ids: &RecordIds, user: &str, kind: RecordKind, at: DateTime<Utc>) -> Record {
        Record {
            id: ids.next_in_order(at),
            user_id: Arc::from(user),
            tokens: 10,
            messages: u64::from(kind == RecordKind::MessageSent),
            bytes: 0,
            cost: rust_decimal::Decimal::new(5, 3),
            details: crate::ledger::Details::Untyped(kind, serde_json::Map::new()),
            created_at: at,
        }
    }

    fn ids_of(page: &[(u64, Record)]) -> Vec<u128> {
        page.iter().map(|(_, r)| r.id).collect()
    }

    #[test]
    fn a_batch_appended_but_never_applied_is_applied_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let ids = RecordIds::new();
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
        let m = Month::of(at);
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.write_records(&[rec(&ids, "ann", RecordKind::MessageSent, at)])
                .unwrap();
            // A crash between the log's fsync and sled's batch: only the log has these.
            let items: Vec<(Record, Vec<Alert>)> = (0..3)
                .map(|_| (rec(&ids, "ann", RecordKind::AiResponse, at), Vec::new()))
                .collect();
            s.append(&items).unwrap();
            s.flush_sync().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        let t = s.user_month("ann", m).unwrap();
        assert_eq!((t.records, t.messages, t.tokens), (4, 1, 40));
        let page = s
            .records(
                &RecordFilter {
                    user_id: Some("ann".into()),
                    ..Default::default()
                },
                10,
            )
            .unwrap();
        assert_eq!(page.len(), 4);
        // Opening again applies nothing twice.
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.user_month("ann", m).unwrap().records, 4);
        assert_eq!(s.count_records().unwrap(), 4);
    }

    #[test]
    fn pages_follow_each_users_chain_by_type_and_reject_other_users_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let ids = RecordIds::new();
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
        let mut all = Vec::new();
        for i in 0..30 {
            let user = if i % 3 == 0 { "bob" } else { "ann" };
            let kind = if i % 2 == 0 {
                RecordKind::MessageSent
            } else {
                RecordKind::AiResponse
            };
            all.push(rec(&ids, user, kind, at + chrono::Duration::seconds(i)));
        }
        // Two batches, so chains cross batch boundaries.
        s.write_records(&all[..13]).unwrap();
        s.write_records(&all[13..]).unwrap();
        let want = |user: &str, kind: Option<RecordKind>| -> Vec<u128> {
            let mut v: Vec<u128> = all
                .iter()
                .filter(|r| &*r.user_id == user && kind.is_none_or(|k| k == r.kind()))
                .map(|r| r.id)
                .collect();
            v.reverse();
            v
        };
        for kind in [None, Some(RecordKind::AiResponse), Some(RecordKind::MessageSent)] {
            let mut f = RecordFilter {
                user_id: Some("ann".into()),
                kind,
                ..Default::default()
            };
            let mut got = Vec::new();
            loop {
                let page = s.records(&f, 4).unwrap();
                got.extend(ids_of(&page[..page.len().min(3)]));
                match page.get(3) {
                    Some((pos, _)) => f.cursor = Some(*pos),
                    None => break,
                }
            }
            assert_eq!(got, want("ann", kind), "{kind:?}");
        }
        // Everyone's records, newest first, and a time window.
        let every = s.records(&RecordFilter::default(), 100).unwrap();
        let mut newest_first: Vec<u128> = all.iter().map(|r| r.id).collect();
        newest_first.reverse();
        assert_eq!(ids_of(&every), newest_first);
        let window = s
            .records(
                &RecordFilter {
                    from: Some(at + chrono::Duration::seconds(10)),
                    to: Some(at + chrono::Duration::seconds(20)),
                    ..Default::default()
                },
                100,
            )
            .unwrap();
        assert_eq!(window.len(), 10);
        // A cursor at one of bob's records does not page through ann's history.
        let bobs = s
            .records(
                &RecordFilter {
                    user_id: Some("bob".into()),
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        let forged = RecordFilter {
            user_id: Some("ann".into()),
            cursor: Some(bobs[0].0),
            ..Default::default()
        };
        assert!(matches!(s.records(&forged, 5), Err(StoreError::BadCursor)));
        let inside = RecordFilter {
            user_id: Some("ann".into()),
            cursor: Some(bobs[0].0 + 1),
            ..Default::default()
        };
        assert!(matches!(s.records(&inside, 5), Err(StoreError::BadCursor)));
    }

    /// Every page, of every user and type, newest first.
    fn all_pages(s: &SledStore) -> Vec<Vec<u128>> {
        let mut out = Vec::new();
        for user in ["ann", "bob"] {
            for kind in [None, Some(RecordKind::MessageSent), Some(RecordKind::AiResponse)] {
                let f = RecordFilter {
                    user_id: Some(user.into()),
                    kind,
                    ..Default::default()
                };
                out.push(ids_of(&s.records(&f, 1000).unwrap()));
            }
        }
        out
    }

    #[test]
    fn batches_applied_together_read_like_batches_applied_one_by_one() {
        let ids = RecordIds::new();
        // 30 hours from here: days and a month (so a new log segment) change between applies.
        let d0 = Utc.with_ymd_and_hms(2026, 11, 30, 20, 0, 0).unwrap();
        let all: Vec<Record> = (0..90i64)
            .map(|i| {
                let kind = if i % 3 == 0 {
                    RecordKind::AiResponse
                } else {
                    RecordKind::MessageSent
                };
                rec(
                    &ids,
                    if i % 4 == 0 { "bob" } else { "ann" },
                    kind,
                    d0 + chrono::Duration::minutes(i * 20),
                )
            })
            .collect();
        let one = tempfile::tempdir().unwrap();
        let a = SledStore::open(one.path()).unwrap();
        for chunk in all.chunks(4) {
            a.write_records(chunk).unwrap();
        }
        let grouped = tempfile::tempdir().unwrap();
        let b = SledStore::open(grouped.path()).unwrap();
        let items: Vec<(Record, Vec<Alert>)> = all.iter().map(|r| (r.clone(), Vec::new())).collect();
        // Applying the first of two unapplied batches alone would lose the second's heads.
        let first = b.append(&items[..1]).unwrap();
        let second = b.append(&items[1..2]).unwrap();
        assert!(matches!(
            b.apply_appended(&items[..1], &first),
            Err(StoreError::ApplyOrder)
        ));
        let mut both = first;
        both.merge(second);
        b.apply_appended(&items[..2], &both).unwrap();
        let mut applied = 2;
        for group in items[2..].chunks(20) {
            // Several appends, each linking to the unapplied ones before it, then one apply.
            let mut pending: Option<Appended> = None;
            for chunk in group.chunks(4) {
                let appended = b.append(chunk).unwrap();
                match &mut pending {
                    Some(p) => p.merge(appended),
                    None => pending = Some(appended),
                }
                // Readers see only what is applied.
                let seen: usize = all_pages(&b).iter().step_by(3).map(Vec::len).sum();
                assert_eq!(seen, applied);
                assert_eq!(b.count_records().unwrap(), applied as u64);
            }
            b.apply_appended(group, &pending.unwrap()).unwrap();
            applied += group.len();
            assert_eq!(b.count_records().unwrap(), applied as u64);
        }
        assert_eq!(all_pages(&b), all_pages(&a));
        let months = [Month::of(d0), Month::of(d0 + chrono::Duration::days(2))];
        assert_ne!(months[0], months[1]);
        assert!(b.log.segment_ranges().len() >= 2);
        for user in ["ann", "bob"] {
            assert_eq!(
                b.daily(Some(user), d0.date_naive()).unwrap(),
                a.daily(Some(user), d0.date_naive()).unwrap()
            );
            for m in months {
                assert_eq!(b.user_month(user, m).unwrap(), a.user_month(user, m).unwrap());
            }
        }
        for m in months {
            assert_eq!(b.month_summary(m).unwrap(), a.month_summary(m).unwrap());
            assert_eq!(b.month_models(m).unwrap(), a.month_models(m).unwrap());
        }
        drop(b);
        let b = SledStore::open(grouped.path()).unwrap();
        assert_eq!(all_pages(&b), all_pages(&a));
    }

    #[test]
    fn daily_totals_come_from_day_runs_across_batches_days_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let ids = RecordIds::new();
        let d0 = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        let mut all = Vec::new();
        // Three days, both types, two users interleaved; written in uneven batches.
        for i in 0..60i64 {
            let at = d0 + chrono::Duration::minutes(i * 50);
            let kind = if i % 3 == 0 {
                RecordKind::AiResponse
            } else {
                RecordKind::MessageSent
            };
            all.push(rec(&ids, if i % 4 == 0 { "bob" } else { "ann" }, kind, at));
        }
        {
            let s = SledStore::open(dir.path()).unwrap();
            for chunk in all[..40].chunks(7) {
                s.write_records(chunk).unwrap();
            }
        }
        let s = SledStore::open(dir.path()).unwrap();
        s.write_records(&all[40..]).unwrap();
        for user in ["ann", "bob"] {
            let mut want: std::collections::BTreeMap<(String, String), Totals> = Default::default();
            for r in all.iter().filter(|r| &*r.user_id == user) {
                let day = r.created_at.format("%Y-%m-%d").to_string();
                want.entry((day, r.kind().as_str().to_string()))
                    .or_default()
                    .add(&Totals::of(r));
            }
            let got: std::collections::BTreeMap<(String, String), Totals> = s
                .daily(Some(user), d0.date_naive())
                .unwrap()
                .into_iter()
                .map(|row| ((row.day, row.kind), row.totals))
                .collect();
            assert_eq!(got, want, "{user}");
            // A later start leaves the earlier days out.
            let later = s
                .daily(Some(user), d0.date_naive() + chrono::Duration::days(1))
                .unwrap();
            assert!(later.iter().all(|r| r.day.as_str() > "2026-11-20"));
            assert_eq!(
                later.len(),
                want.keys().filter(|(d, _)| d.as_str() > "2026-11-20").count()
            );
        }
    }

    #[test]
    fn deleting_a_user_erases_their_records_and_retention_drops_old_months() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let ids = RecordIds::new();
        let sep = Utc.with_ymd_and_hms(2026, 9, 10, 0, 0, 0).unwrap();
        let nov = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
        s.write_records(&[
            rec(&ids, "ann", RecordKind::MessageSent, sep),
            rec(&ids, "bob", RecordKind::MessageSent, sep),
        ])
        .unwrap();
        s.write_records(&[
            rec(&ids, "ann", RecordKind::MessageSent, nov),
            rec(&ids, "bob", RecordKind::AiResponse, nov),
        ])
        .unwrap();
        assert_eq!(s.log.segment_ranges().len(), 2, "a segment per month");
        assert_eq!(s.delete_user_usage("bob").unwrap(), 2);
        let bob = RecordFilter {
            user_id: Some("bob".into()),
            ..Default::default()
        };
        assert!(s.records(&bob, 10).unwrap().is_empty());
        assert_eq!(s.count_records().unwrap(), 2);
        // Erased on disk: the record's JSON is gone from the files.
        for (start, _) in s.log.segment_ranges() {
            let bytes = std::fs::read(dir.path().join("records").join(format!("{start:020}.seg"))).unwrap();
            assert!(!bytes.windows(5).any(|w| w == b"\"bob\""));
        }
        // Retention: September's segment goes whole; month totals stay.
        let cutoff = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
        assert_eq!(s.delete_records_before(cutoff).unwrap(), 1);
        assert_eq!(s.log.segment_ranges().len(), 1);
        assert_eq!(s.count_records().unwrap(), 1);
        assert_eq!(s.user_month("ann", Month::of(sep)).unwrap().records, 1);
        let mut n = 0;
        s.for_each_record_in(Month::of(nov), |_| {
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 1);
        // A user created again under the same id starts a history of their own.
        s.write_records(&[rec(&ids, "bob", RecordKind::MessageSent, nov)])
            .unwrap();
        assert_eq!(s.records(&bob, 10).unwrap().len(), 1);
    }
}
