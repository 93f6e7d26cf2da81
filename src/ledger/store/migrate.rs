//! Upgrades of the aggregates sled keeps, run once at open, before the log's tail is replayed
//! (which applies it the current way).
//!
//! Version 2: per-model (`M`) and per-tag (`T`) totals count requests in `records` (one
//! `message_sent` per request); version 1 counted every record (a request answered had two).
//! Each such row is recounted from the records the log still holds up to `P`: exactly when
//! they are all there (the row's old count equals the records found), else (records erased
//! with a deleted user, or dropped by retention) the missing ones are counted as two records
//! per request, rounded up, and the row is reported as estimated in the log. Tokens, cost and
//! the other figures of a row are sums over records and stay as they were.

use std::collections::HashMap;

use super::{APPLIED, SledStore, StoreError, decode_record, join};
use crate::ledger::record::RecordKind;
use crate::ledger::totals::Totals;

/// Key of the aggregates' version.
const VERSION: u8 = b'V';
/// The version this code writes.
const CURRENT: u64 = 2;
/// Prefixes of the rows whose `records` count requests since version 2.
const REQUEST_ROWS: [u8; 2] = [b'M', b'T'];

impl SledStore {
    /// Brings the aggregates to [`CURRENT`] (see the module docs).
    pub(super) fn migrate(&self) -> Result<(), StoreError> {
        if self.get_u64(&[VERSION])? >= CURRENT {
            return Ok(());
        }
        let mut rows: Vec<(sled::IVec, Totals)> = Vec::new();
        for prefix in REQUEST_ROWS {
            for kv in self.ledger.scan_prefix([prefix]) {
                let (k, v) = kv?;
                let t = Totals::decode(&v).ok_or_else(|| StoreError::Corrupt(String::from_utf8_lossy(&k).into()))?;
                rows.push((k, t));
            }
        }
        let mut batch = sled::Batch::default();
        if !rows.is_empty() {
            let started = std::time::Instant::now();
            let seen = self.count_requests()?;
            let mut estimated = 0usize;
            for (k, old) in &rows {
                let (records, requests) = seen.get(k.as_ref()).copied().unwrap_or((0, 0));
                let requests = if old.records == records {
                    requests
                } else {
                    estimated += 1;
                    requests + old.records.saturating_sub(records).div_ceil(2)
                };
                let new = Totals {
                    records: requests,
                    ..*old
                };
                batch.insert(k.as_ref(), &new.encode()[..]);
            }
            let (n, ms) = (rows.len(), started.elapsed().as_millis() as u64);
            if estimated > 0 {
                tracing::warn!(
                    rows = n,
                    estimated,
                    ms,
                    "aggregates upgraded: per-model and per-tag rows count requests; rows whose records are no longer all in the log are estimated at two records per request"
                );
            } else {
                tracing::info!(
                    rows = n,
                    ms,
                    "aggregates upgraded: per-model and per-tag rows count requests"
                );
            }
        }
        batch.insert(&[VERSION][..], &CURRENT.to_be_bytes()[..]);
        self.ledger.apply_batch(batch)?;
        // On disk before any row is added to the new way: a second upgrade would count again.
        self.db.flush()?;
        Ok(())
    }

    /// Per `M` and `T` key: the records of the log up to `P` that add to it, and how many of
    /// them are requests. Empty (every row estimated) when the log cannot be read through.
    fn count_requests(&self) -> Result<HashMap<Vec<u8>, (u64, u64)>, StoreError> {
        let applied = self.get_u64(&[APPLIED])?;
        let mut seen: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        // Nothing reads the log before the replay that follows: make the applied part
        // scannable (the replay sets the visible end again).
        self.log.set_visible(applied);
        let scanned = self.log.scan(self.log.first(), applied, |fr| {
            if fr.erased {
                return true;
            }
            let Ok(r) = decode_record(fr.record()) else {
                return true;
            };
            let m = r.month().to_string();
            let request = u64::from(r.kind() == RecordKind::MessageSent);
            let mut add = |k: Vec<u8>| {
                let e = seen.entry(k).or_default();
                e.0 += 1;
                e.1 += request;
            };
            if let Some(model) = r.model() {
                add(join(b'M', &[m.as_bytes(), model.as_bytes()]));
            }
            for (name, v) in r.details.tags() {
                add(join(b'T', &[m.as_bytes(), name.as_bytes(), v.as_bytes()]));
            }
            true
        });
        self.log.set_visible(0);
        if let Err(e) = scanned {
            tracing::warn!(error = %e, "cannot read the record log through to recount requests; every per-model and per-tag row is estimated");
            seen.clear();
        }
        Ok(seen)
    }
}
