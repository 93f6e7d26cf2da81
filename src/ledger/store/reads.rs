//! Reads for the APIs: aggregates, per-day rows, record pages, month scans.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate};

use super::{
    DayRow, DayRun, Heads, RecordFilter, SPAN, SledStore, StoreError, decode_record, join, kind_slot, month_key,
};
use crate::clock::Month;
use crate::ledger::log::NONE;
use crate::ledger::record::{Record, RecordKind};
use crate::ledger::totals::Totals;

impl SledStore {
    /// A user's chain heads as the writer left them: their records written to the log and not
    /// yet applied included. One user's reads (records, days) start here, so they show every
    /// record the recorder wrote, while aggregates and everyone's reads wait for the apply.
    fn written_heads(&self, user: &str) -> Result<Heads, StoreError> {
        if let Some(h) = self.unapplied.lock().heads.get(user) {
            return Ok(*h);
        }
        // Not written to since the last apply, which put them in sled before the writer's
        // copy was dropped.
        self.heads(user)
    }

    /// [`SledStore::day_run`] among every frame written.
    fn written_day_run(&self, pos: u64) -> Result<Option<DayRun>, StoreError> {
        Ok(self
            .log
            .read_written(pos)?
            .filter(|f| !f.erased)
            .and_then(|f| DayRun::of(&f)))
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

    /// Per-day, per-type totals from `since` (inclusive), for one user (every record written,
    /// see [`SledStore::written_heads`]) or for everyone (the applied aggregates).
    pub fn daily(&self, user: Option<&str>, since: NaiveDate) -> Result<Vec<DayRow>, StoreError> {
        let Some(user) = user else {
            return self.daily_all(since);
        };
        // One frame per day and type: the newest record of each run holds the run's totals.
        let since_day = since.num_days_from_ce();
        let heads = self.written_heads(user)?;
        let mut sums: std::collections::BTreeMap<(i32, &'static str), Totals> = std::collections::BTreeMap::new();
        for kind in [
            RecordKind::MessageSent,
            RecordKind::AiResponse,
            RecordKind::FileUpload,
            RecordKind::CacheStorage,
        ] {
            let mut pos = heads[kind_slot(kind)];
            while let Some(run) = self.written_day_run(pos)? {
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
    /// in the log (a page costs its own records, however long the history), from every record
    /// written (see [`SledStore::written_heads`]); everyone's by walking the log backwards
    /// from the applied end.
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
                    None => self.written_heads(user)?[slot],
                };
                while pos != NONE {
                    let Some(frame) = self.log.read_written(pos)? else {
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
    pub(super) fn spans(&self) -> Result<HashMap<u64, (i64, i64)>, StoreError> {
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

    /// Every record applied with an id above `after`, oldest first (ids grow along the log, so
    /// this walks back from the applied end only as far as `after`). Cluster mode replays these
    /// into Redis after a crash or a Redis restart.
    pub fn records_since(&self, after: u128) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let mut frame = self.log.read_before(self.log.visible())?;
        while let Some(fr) = frame {
            // An erased record (a deleted user's) is not billed anywhere any more.
            if !fr.erased {
                let rec = decode_record(fr.record())?;
                if rec.id <= after {
                    break;
                }
                out.push(rec);
            }
            frame = self.log.read_before(fr.pos)?;
        }
        out.reverse();
        Ok(out)
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
}
