//! The sled store: users, keys, the ledger and its aggregates.
//!
//! The ledger tree holds every record and every aggregate the records add up to, under key
//! prefixes, so that one `apply_batch` (atomic within a tree) writes a batch of records together
//! with the totals they change: after a crash, aggregates and ledger never disagree.
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `r` | record id (16 bytes, big-endian) | record JSON |
//! | `u` | user `/` record id | empty (per-user index, newest last) |
//! | `a` | `YYYY-MM` `/` user | [`Totals`] of the user's month |
//! | `d` | user `/` `YYYY-MM-DD` `/` type | [`Totals`] of a user's day |
//! | `g` | `YYYY-MM-DD` `/` type | [`Totals`] of a day, all users |
//! | `s` | `YYYY-MM` | [`Totals`] of a month, all users |
//! | `S` | `YYYY-MM` | active users of a month (u64) |
//! | `M` | `YYYY-MM` `/` model | [`Totals`] of a model's month |
//! | `T` | `YYYY-MM` `/` tag name `/` tag value | [`Totals`] of a tag value's month |
//! | `F` | `YYYY-MM` `/` user `/` quota `/` threshold (3 digits) | a quota alert fired: [`Alert`] JSON |
//! | `O` | delivery id | a pending alert delivery (the outbox): [`Delivery`](super::alerts::Delivery) JSON |
//! | `D` | `YYYY-MM` `/` user `/` delivery id | a finished alert delivery (sent or failed) |
//!
//! `F` and `O` are written in the batch of the record that crossed the threshold (see
//! [`super::alerts`]), so an alert exists on disk exactly when the usage that caused it does.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::alerts::Alert;
use super::record::{Record, RecordKind};
use super::totals::Totals;
use crate::clock::Month;

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
    /// A stored value could not be decoded.
    #[error("corrupt stored value under {0}")]
    Corrupt(String),
}

/// The embedded sled store.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    ledger: sled::Tree,
    users: sled::Tree,
    keys: sled::Tree,
    meta: sled::Tree,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn month_key(prefix: u8, m: Month) -> Vec<u8> {
    let mut k = Vec::with_capacity(8);
    k.push(prefix);
    k.extend_from_slice(m.to_string().as_bytes());
    k
}

fn join(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
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

/// Key of a record.
fn rec_key(id: u128) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'r';
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn user_idx_prefix(user: &str) -> Vec<u8> {
    let mut k = join(b'u', &[user.as_bytes()]);
    k.push(b'/');
    k
}

fn user_idx_key(user: &str, id: u128) -> Vec<u8> {
    let mut k = user_idx_prefix(user);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn day_string(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
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
    /// Only records with an id below this one (the cursor).
    pub before: Option<u128>,
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
    /// Opens (or creates) the store in `path`. A second process on the same path gets
    /// [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, 256 * 1024 * 1024)
    }

    /// Opens the store with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            // The recorder flushes after each batch; sled's own timer would only add I/O.
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
            })?;
        Ok(Self {
            ledger: db.open_tree("ledger")?,
            users: db.open_tree("users")?,
            keys: db.open_tree("keys")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Flushes everything written so far to disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Flushes synchronously (shutdown paths).
    pub fn flush_sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Writes records and the aggregates they add to in one atomic batch (not yet flushed).
    pub fn write_records(&self, records: &[Record]) -> Result<(), StoreError> {
        self.write_batch(records, &[])
    }

    /// Writes records, the aggregates they add to and the alerts they fired (marks and outbox
    /// entries) in one atomic batch (not yet flushed).
    pub fn write_batch(&self, records: &[Record], alerts: &[Alert]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut deltas: HashMap<Vec<u8>, Totals> = HashMap::new();
        for r in records {
            let json = serde_json::to_vec(&r.to_json()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            batch.insert(&rec_key(r.id)[..], json);
            batch.insert(user_idx_key(&r.user_id, r.id), &[][..]);
            let t = Totals::of(r);
            let m = r.month().to_string();
            let day = day_string(r.created_at);
            let kind = r.kind.as_str();
            let user = r.user_id.as_bytes();
            for k in [
                join(b'a', &[m.as_bytes(), user]),
                join(b'd', &[user, day.as_bytes(), kind.as_bytes()]),
                join(b'g', &[day.as_bytes(), kind.as_bytes()]),
                month_key(b's', r.month()),
            ] {
                deltas.entry(k).or_default().add(&t);
            }
            if let Some(model) = r.model() {
                deltas
                    .entry(join(b'M', &[m.as_bytes(), model.as_bytes()]))
                    .or_default()
                    .add(&t);
            }
            if let Some(tags) = r.metadata.get("tags").and_then(Value::as_object) {
                for (name, value) in tags {
                    if let Some(v) = value.as_str() {
                        deltas
                            .entry(join(b'T', &[m.as_bytes(), name.as_bytes(), v.as_bytes()]))
                            .or_default()
                            .add(&t);
                    }
                }
            }
        }
        let mut new_users: HashMap<Vec<u8>, u64> = HashMap::new();
        for (k, d) in deltas {
            let cur = self.ledger.get(&k)?;
            let mut total = match &cur {
                Some(v) => Totals::decode(v).ok_or_else(|| StoreError::Corrupt(String::from_utf8_lossy(&k).into()))?,
                None => Totals::default(),
            };
            if cur.is_none() && k.first() == Some(&b'a') {
                // First record of this user in this month: one more active user.
                if let Some(month) = k.get(1..8) {
                    let mut sk = vec![b'S'];
                    sk.extend_from_slice(month);
                    *new_users.entry(sk).or_default() += 1;
                }
            }
            total.add(&d);
            batch.insert(k, &total.encode()[..]);
        }
        for (k, n) in new_users {
            let cur = self.get_u64(&k)?;
            batch.insert(k, &(cur + n).to_be_bytes()[..]);
        }
        super::alerts::stage(&self.ledger, &mut batch, alerts)?;
        self.ledger.apply_batch(batch)?;
        Ok(())
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
        let prefix = match user {
            Some(u) => {
                let mut p = join(b'd', &[u.as_bytes()]);
                p.push(b'/');
                p
            }
            None => vec![b'g'],
        };
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

    /// Records matching `f`, newest first, at most `limit`.
    pub fn records(&self, f: &RecordFilter, limit: usize) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(512));
        let from_id = f.from.map(|t| (t.timestamp_millis().max(0) as u128) << 80);
        let to_id = f.to.map(|t| (t.timestamp_millis().max(0) as u128) << 80);
        let mut upper = f.before.unwrap_or(u128::MAX);
        if let Some(t) = to_id {
            upper = upper.min(t);
        }
        let lower = from_id.unwrap_or(0);
        match &f.user_id {
            Some(user) => {
                let lo = user_idx_key(user, lower);
                let hi = user_idx_key(user, upper);
                for kv in self.ledger.range(lo..hi).rev() {
                    let (k, _) = kv?;
                    let id_bytes: [u8; 16] = k[k.len() - 16..]
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("index".into()))?;
                    let id = u128::from_be_bytes(id_bytes);
                    let Some(v) = self.ledger.get(rec_key(id))? else {
                        continue;
                    };
                    let rec = decode_record(&v)?;
                    if f.kind.is_none_or(|kd| kd == rec.kind) {
                        out.push(rec);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
            }
            None => {
                for kv in self.ledger.range(rec_key(lower)..rec_key(upper)).rev() {
                    let (_, v) = kv?;
                    let rec = decode_record(&v)?;
                    if f.kind.is_none_or(|kd| kd == rec.kind) {
                        out.push(rec);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Calls `each` with every record of a month, oldest first, as stored JSON bytes.
    pub fn for_each_record_in(&self, m: Month, mut each: impl FnMut(&[u8]) -> bool) -> Result<(), StoreError> {
        let lo = (m.start().timestamp_millis().max(0) as u128) << 80;
        let hi = (m.next().start().timestamp_millis().max(0) as u128) << 80;
        for kv in self.ledger.range(rec_key(lo)..rec_key(hi)) {
            let (_, v) = kv?;
            if !each(&v) {
                break;
            }
        }
        Ok(())
    }

    /// Number of records in the ledger (slow: a scan; for tests and tools).
    pub fn count_records(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.ledger.scan_prefix([b'r']) {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes records created before `cutoff`; aggregates stay. Returns how many went.
    pub fn delete_records_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let hi = (cutoff.timestamp_millis().max(0) as u128) << 80;
        let mut deleted = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in self.ledger.range(rec_key(0)..rec_key(hi)).take(10_000) {
                let (k, v) = kv?;
                let rec = decode_record(&v)?;
                batch.remove(k);
                batch.remove(user_idx_key(&rec.user_id, rec.id));
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.ledger.apply_batch(batch)?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// Deletes a user's records and per-user aggregates.
    pub fn delete_user_usage(&self, user: &str) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.ledger.scan_prefix(user_idx_prefix(user)) {
            let (k, _) = kv?;
            if let Ok(id_bytes) = <[u8; 16]>::try_from(&k[k.len() - 16..]) {
                batch.remove(&rec_key(u128::from_be_bytes(id_bytes))[..]);
            }
            batch.remove(k);
            n += 1;
        }
        let mut dprefix = join(b'd', &[user.as_bytes()]);
        dprefix.push(b'/');
        let mut months = std::collections::BTreeSet::new();
        for kv in self.ledger.scan_prefix(&dprefix) {
            let (k, _) = kv?;
            if let Some(month) = k.get(dprefix.len()..dprefix.len() + 7) {
                months.insert(month.to_vec());
            }
            batch.remove(k);
        }
        for m in months {
            batch.remove(join(b'a', &[&m, user.as_bytes()]));
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

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

fn decode_record(v: &[u8]) -> Result<Record, StoreError> {
    let json: Value = serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Record::from_json(&json).ok_or_else(|| StoreError::Corrupt("record".into()))
}
