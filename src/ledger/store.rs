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
//! | `h` | user | log positions of the user's newest record, overall and per type (4 x u64, or 5 once the user has a `cache_storage` record) |
//! | `L` | segment start (u64) | oldest and newest record time in that segment (2 x i64 ms) |
//! | `a` | `YYYY-MM` `/` user | [`Totals`] of the user's month |
//! | `g` | `YYYY-MM-DD` `/` type | [`Totals`] of a day, all users |
//! | `s` | `YYYY-MM` | [`Totals`] of a month, all users |
//! | `S` | `YYYY-MM` | active users of a month (u64) |
//! | `M` | `YYYY-MM` `/` model | [`Totals`] of a model's month (`records`: its requests) |
//! | `T` | `YYYY-MM` `/` tag name `/` tag value | [`Totals`] of a tag value's month (`records`: its requests) |
//! | `V` | | version of these aggregates (u64; absent: 1), see `store/migrate.rs` |
//! | `F` | `YYYY-MM` `/` user `/` quota `/` threshold (3 digits) | a quota alert fired: [`Alert`] JSON |
//! | `O` | delivery id | a pending alert delivery (the outbox): [`Delivery`](super::alerts::Delivery) JSON |
//! | `D` | `YYYY-MM` `/` user `/` delivery id | a finished alert delivery (sent or failed) |
//!
//! `F` and `O` are staged in the batch of the record that crossed the threshold (see
//! [`super::alerts`] and `store/alert_keys.rs`), so an alert exists on disk exactly when the
//! usage that caused it does.

use rustc_hash::FxHashMap as HashMap;
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
    owners: sled::Tree,
    log: Arc<RecordLog>,
    unapplied: Arc<parking_lot::Mutex<Unapplied>>,
}

/// The writer's view of records appended but not yet applied: their users' chain heads and day
/// runs. sled (and so every reader) sees them only when they are applied, which the recorder
/// does in groups; the next append must still link to them.
#[derive(Debug, Default)]
struct Unapplied {
    heads: HashMap<Arc<str>, Heads>,
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
        RecordKind::CacheStorage => 4,
    }
}

/// Chain heads per user: overall, then one per record type (see [`kind_slot`]).
pub(super) const HEAD_SLOTS: usize = 5;

/// A user's chain heads.
pub(super) type Heads = [u64; HEAD_SLOTS];

/// Stored length of heads without a `cache_storage` chain: written as before that type
/// existed, so a store without such records stays readable by older builds.
const HEADS_LEN_OLD: usize = 32;

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

mod alert_keys;
mod erase;
mod migrate;
mod open;
mod reads;
#[cfg(test)]
mod tests;

impl SledStore {
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
            alert_keys::stage(&self.ledger, &mut batch, alerts)?;
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
        let mut heads: HashMap<Arc<str>, Heads> = HashMap::default();
        // Per user and type: the day of the newest run, its running totals, and its link.
        let mut days: HashMap<(Arc<str>, usize), DayRun> = HashMap::default();
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
    fn heads(&self, user: &str) -> Result<Heads, StoreError> {
        let mut h = [NONE; HEAD_SLOTS];
        if let Some(v) = self.ledger.get(join(HEADS, &[user.as_bytes()]))? {
            if v.len() != HEADS_LEN_OLD && v.len() != 8 * HEAD_SLOTS {
                return Err(StoreError::Corrupt(format!("heads of {user}")));
            }
            for (i, slot) in h.iter_mut().enumerate().take(v.len() / 8) {
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
        known_heads: Option<&HashMap<Arc<str>, Heads>>,
    ) -> Result<(), StoreError> {
        // Deltas grouped by what they add to, keyed by borrowed parts: one key built per group.
        let mut user_month: HashMap<(&str, Month), Totals> = HashMap::default();
        let mut day: HashMap<(i32, RecordKind), Totals> = HashMap::default();
        let mut month: HashMap<Month, Totals> = HashMap::default();
        let mut model: HashMap<(Month, &str), Totals> = HashMap::default();
        let mut tag: HashMap<(Month, &str, &str), Totals> = HashMap::default();
        let mut heads: HashMap<&str, Heads> = HashMap::default();
        let mut spans: HashMap<u64, (i64, i64)> = HashMap::default();
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
            // Per model and tag, `records` counts requests: a request has one `message_sent`
            // whatever its outcome; its `ai_response` adds tokens and cost only.
            let req = Totals {
                records: u64::from(r.kind() == RecordKind::MessageSent),
                ..t
            };
            if let Some(name) = r.model() {
                model.entry((m, name)).or_default().add(&req);
            }
            for (name, v) in r.details.tags() {
                tag.entry((m, name, v)).or_default().add(&req);
            }
        }
        let day_str = |d: i32| {
            NaiveDate::from_num_days_from_ce_opt(d)
                .map(|d| d.format("%Y-%m-%d").to_string())
                .unwrap_or_default()
        };
        let mut batch = sled::Batch::default();
        let mut new_users: HashMap<Month, u64> = HashMap::default();
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
            let mut v = [0u8; 8 * HEAD_SLOTS];
            for (i, p) in h.iter().enumerate() {
                v[i * 8..i * 8 + 8].copy_from_slice(&p.to_be_bytes());
            }
            let len = if h[kind_slot(RecordKind::CacheStorage)] == NONE {
                HEADS_LEN_OLD
            } else {
                v.len()
            };
            batch.insert(join(HEADS, &[user.as_bytes()]), &v[..len]);
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
        alert_keys::stage(&self.ledger, &mut batch, &alerts)?;
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

    /// Raw access to the owners tree (who owns which upstream resource).
    pub fn owners(&self) -> &sled::Tree {
        &self.owners
    }

    /// Another tree of the same database (the audit trail keeps its entries with the ledger).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// The record log, read as it is (cluster mode's shipper reads it from its own position).
    pub fn record_log(&self) -> &Arc<RecordLog> {
        &self.log
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
