//! The alerts' keys in the ledger tree: fired marks, the outbox and the delivery log (the
//! alerts themselves: [`crate::ledger::alerts`]).
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `F` | `YYYY-MM` `/` user `/` quota `/` threshold (3 digits) | the [`Alert`] (JSON): the fired mark |
//! | `O` | delivery id | a pending [`Delivery`] (JSON): the outbox |
//! | `D` | `YYYY-MM` `/` user `/` delivery id | a finished [`Delivery`] (JSON), sent or failed |

use std::collections::HashSet;

use serde_json::Value;

use super::{SledStore, StoreError, join};
use crate::clock::Month;
use crate::ledger::alerts::{Alert, Channel, Delivery, Quota};

const FIRED: u8 = b'F';
const OUTBOX: u8 = b'O';
const DONE: u8 = b'D';

fn fired_key(month: Month, user: &str, quota: Quota, threshold: u8) -> Vec<u8> {
    let t = format!("{threshold:03}");
    join(
        FIRED,
        &[
            month.to_string().as_bytes(),
            user.as_bytes(),
            quota.as_str().as_bytes(),
            t.as_bytes(),
        ],
    )
}

/// The prefix of the fired marks of a month, or of one user's in a month.
fn fired_prefix(month: Month, user: Option<&str>) -> Vec<u8> {
    let m = month.to_string();
    let mut k = match user {
        Some(u) => join(FIRED, &[m.as_bytes(), u.as_bytes()]),
        None => join(FIRED, &[m.as_bytes()]),
    };
    k.push(b'/');
    k
}

fn outbox_key(delivery_id: &str) -> Vec<u8> {
    join(OUTBOX, &[delivery_id.as_bytes()])
}

fn done_key(d: &Delivery) -> Vec<u8> {
    let a = &d.alert;
    join(
        DONE,
        &[a.month.to_string().as_bytes(), a.user_id.as_bytes(), d.id.as_bytes()],
    )
}

fn corrupt(k: &[u8]) -> StoreError {
    StoreError::Corrupt(String::from_utf8_lossy(k).into_owned())
}

fn decode_alert(k: &[u8], v: &[u8]) -> Result<Alert, StoreError> {
    let json: Value = serde_json::from_slice(v).map_err(|_| corrupt(k))?;
    Alert::from_stored(&json).ok_or_else(|| corrupt(k))
}

fn decode_delivery(k: &[u8], v: &[u8]) -> Result<Delivery, StoreError> {
    let json: Value = serde_json::from_slice(v).map_err(|_| corrupt(k))?;
    Delivery::from_stored(&json).ok_or_else(|| corrupt(k))
}

fn encode_delivery(d: &Delivery) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&d.to_stored()).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Adds alerts to a batch being built by the recorder: for each, its fired mark and one outbox
/// entry per channel. An alert whose mark is already on disk for the same user (created at the
/// same time) is left out, so a mark is written once whatever memory believed.
pub(super) fn stage(tree: &sled::Tree, batch: &mut sled::Batch, alerts: &[Alert]) -> Result<(), StoreError> {
    let mut staged: HashSet<Vec<u8>> = HashSet::new();
    for a in alerts {
        let fk = fired_key(a.month, &a.user_id, a.quota, a.threshold);
        if staged.contains(&fk) {
            continue;
        }
        if let Some(old) = tree.get(&fk)?
            && decode_alert(&fk, &old).is_ok_and(|o| o.user_created == a.user_created)
        {
            continue;
        }
        let json = serde_json::to_vec(&a.to_stored()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        batch.insert(fk.as_slice(), json);
        for &ch in &a.channels {
            let d = Delivery::new(a, ch);
            batch.insert(outbox_key(&d.id), encode_delivery(&d)?);
        }
        staged.insert(fk);
    }
    Ok(())
}

impl SledStore {
    /// The fired alerts of a month, for everyone or one user, in key order (user, quota,
    /// threshold). An entry that cannot be decoded is logged and skipped.
    pub fn alerts(&self, month: Month, user: Option<&str>) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        for kv in self.ledger.scan_prefix(fired_prefix(month, user)) {
            let (k, v) = kv?;
            match decode_alert(&k, &v) {
                Ok(a) => out.push(a),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable alert"),
            }
        }
        Ok(out)
    }

    /// Every pending delivery (the outbox). An entry that cannot be decoded is logged and
    /// skipped (it stays on disk for inspection; it cannot block the others).
    pub fn alert_outbox(&self) -> Result<Vec<Delivery>, StoreError> {
        let mut out = Vec::new();
        for kv in self.ledger.scan_prefix([OUTBOX]) {
            let (k, v) = kv?;
            match decode_delivery(&k, &v) {
                Ok(d) => out.push(d),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable alert delivery"),
            }
        }
        Ok(out)
    }

    /// The delivery of `alert` on `channel`, pending or finished; `None` when there is none.
    pub fn alert_delivery(&self, alert: &Alert, channel: Channel) -> Result<Option<Delivery>, StoreError> {
        let id = alert.delivery_id(channel);
        let tree = &self.ledger;
        let ok = outbox_key(&id);
        if let Some(v) = tree.get(&ok)? {
            return decode_delivery(&ok, &v).map(Some);
        }
        let dk = join(
            DONE,
            &[
                alert.month.to_string().as_bytes(),
                alert.user_id.as_bytes(),
                id.as_bytes(),
            ],
        );
        match tree.get(&dk)? {
            Some(v) => decode_delivery(&dk, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Saves a pending delivery after a failed attempt (attempts, next attempt, last error).
    /// Does nothing when it is no longer in the outbox. Not flushed.
    pub fn reschedule_delivery(&self, d: &Delivery) -> Result<(), StoreError> {
        let k = outbox_key(&d.id);
        let v = encode_delivery(d)?;
        // Only the delivery worker writes outbox entries after the recorder created them, so
        // this compare-and-swap fails only when the entry was finished meanwhile.
        let tree = &self.ledger;
        if let Some(cur) = tree.get(&k)? {
            let _ = tree.compare_and_swap(&k, Some(cur), Some(v))?;
        }
        Ok(())
    }

    /// Moves a delivery out of the outbox into the delivery log (sent or failed), atomically.
    /// Does nothing when it is no longer in the outbox (its user was deleted meanwhile). Not
    /// flushed.
    pub fn finish_delivery(&self, d: &Delivery) -> Result<(), StoreError> {
        let (ok, dk, v) = (outbox_key(&d.id), done_key(d), encode_delivery(d)?);
        self.ledger
            .transaction(|tx| {
                if tx.remove(ok.as_slice())?.is_some() {
                    tx.insert(dk.as_slice(), v.as_slice())?;
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => StoreError::Corrupt("finish_delivery aborted".into()),
            })
    }

    /// Stages the removal of everything the alerts kept of `user` (fired marks, pending and
    /// finished deliveries, of every month) into `batch`: a user created again under the same
    /// id is alerted afresh. Returns how many entries go.
    pub(super) fn stage_alert_erasure(&self, user: &str, batch: &mut sled::Batch) -> Result<u64, StoreError> {
        let mut n = 0;
        // `F` and `D` keys: the prefix, `YYYY-MM`, `/`, the user, `/` (ids hold no `/`).
        let mine = |k: &[u8]| {
            k.get(9..)
                .and_then(|rest| rest.strip_prefix(user.as_bytes()))
                .is_some_and(|rest| rest.first() == Some(&b'/'))
        };
        for prefix in [FIRED, DONE] {
            for kv in self.ledger.scan_prefix([prefix]) {
                let (k, _) = kv?;
                if mine(&k) {
                    batch.remove(k);
                    n += 1;
                }
            }
        }
        for kv in self.ledger.scan_prefix([OUTBOX]) {
            let (k, v) = kv?;
            if decode_delivery(&k, &v).is_ok_and(|d| &*d.alert.user_id == user) {
                batch.remove(k);
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::alerts::DeliveryStatus;

    use rust_decimal::Decimal;
    use std::sync::Arc;

    use crate::ledger::alerts::test_alert as alert;

    #[test]
    fn staging_writes_a_mark_once_and_an_entry_per_channel() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = alert(Quota::Messages, 80, Decimal::from(8), Decimal::from(10));
        store.write_batch(&[], &[a.clone(), a.clone()]).unwrap();
        assert_eq!(store.alerts(a.month, Some("ann")).unwrap(), vec![a.clone()]);
        assert_eq!(
            store.alerts(a.month, Some("an")).unwrap(),
            vec![],
            "user prefixes do not leak"
        );
        let outbox = store.alert_outbox().unwrap();
        assert_eq!(outbox.len(), 2);
        // A second crossing of the same mark (memory lost it) is not staged again.
        let mut again = a.clone();
        again.used = Decimal::from(9);
        let sent = {
            let mut d = outbox[0].clone();
            d.status = DeliveryStatus::Sent;
            d
        };
        store.finish_delivery(&sent).unwrap();
        store.write_batch(&[], &[again]).unwrap();
        assert_eq!(
            store.alert_outbox().unwrap().len(),
            1,
            "only the untouched entry is pending"
        );
        assert_eq!(store.alerts(a.month, None).unwrap()[0].used, Decimal::from(8));
        let got = store.alert_delivery(&a, sent.channel).unwrap().unwrap();
        assert_eq!(got.status, DeliveryStatus::Sent);
        // The same user id created anew is a new user: its mark replaces the old one.
        let mut reborn = a.clone();
        reborn.user_created += 10;
        reborn.id = Alert::make_id("ann", reborn.user_created, a.month, a.quota, a.threshold);
        store.write_batch(&[], &[reborn.clone()]).unwrap();
        assert_eq!(store.alerts(a.month, Some("ann")).unwrap(), vec![reborn]);
    }

    #[test]
    fn deleting_a_user_takes_their_marks_and_deliveries_and_no_one_elses() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let of = |user: &str, month: Month| {
            let mut a = alert(Quota::Messages, 80, Decimal::from(8), Decimal::from(10));
            a.user_id = Arc::from(user);
            a.month = month;
            a.id = Alert::make_id(user, a.user_created, month, a.quota, a.threshold);
            a
        };
        let (nov, dec) = (Month(202611), Month(202612));
        let alerts = [of("ann", nov), of("ann", dec), of("anna", nov), of("an", dec)];
        store.write_batch(&[], &alerts).unwrap();
        // One of ann's deliveries finished (the delivery log), the others pending.
        let mut sent = Delivery::new(&alerts[0], Channel::Webhook);
        sent.status = DeliveryStatus::Sent;
        store.finish_delivery(&sent).unwrap();
        assert_eq!(store.alert_outbox().unwrap().len(), 7);
        store.delete_user_usage("ann").unwrap();
        for m in [nov, dec] {
            assert!(store.alerts(m, Some("ann")).unwrap().is_empty());
        }
        assert_eq!(store.alert_delivery(&alerts[0], Channel::Webhook).unwrap(), None);
        let mut left: Vec<String> = store
            .alert_outbox()
            .unwrap()
            .iter()
            .map(|d| d.alert.user_id.to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["an", "an", "anna", "anna"]);
        assert_eq!(store.alerts(nov, Some("anna")).unwrap().len(), 1);
        assert_eq!(store.alerts(dec, Some("an")).unwrap().len(), 1);
        // A delivery that was being sent when its user went is not logged as finished.
        let mut late = Delivery::new(&alerts[1], Channel::Email);
        late.status = DeliveryStatus::Sent;
        store.finish_delivery(&late).unwrap();
        assert_eq!(store.alert_delivery(&alerts[1], Channel::Email).unwrap(), None);
    }
}
