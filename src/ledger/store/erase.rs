//! Erasure: a deleted user's records and aggregates, and retention.

use chrono::{DateTime, Utc};

use super::{HEADS, SledStore, StoreError, decode_record, join, span_key};
use crate::clock::Month;
use crate::ledger::log::NONE;

impl SledStore {
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

    /// Deletes a user's records (erased in the log), per-user aggregates and alerts (marks and
    /// deliveries).
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
        self.stage_alert_erasure(user, &mut batch)?;
        batch.remove(join(HEADS, &[user.as_bytes()]));
        for m in months {
            batch.remove(join(b'a', &[m.to_string().as_bytes(), user.as_bytes()]));
        }
        self.ledger.apply_batch(batch)?;
        Ok(n)
    }
}
