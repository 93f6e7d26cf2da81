//! The audit trail: one entry per admin action (users, keys, tiers, reloads, exports,
//! retention runs, deletes) with its time, action, target, caller and outcome.
//!
//! Owns the `audit` tree of the ledger's sled database and its entries. Entries are only ever
//! appended (keys are a sequence number, big-endian so they sort; nothing here removes or
//! rewrites one, and neither retention nor deleting a user touches the tree). It never receives
//! a secret: callers pass ids (user, key id), never a key's plaintext or the admin token, and the
//! tests check the stored bytes for both.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::clock::rfc3339_ms;

/// Errors of the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// sled failed.
    #[error("audit storage error: {0}")]
    Sled(#[from] sled::Error),
    /// A cursor this log never gave out.
    #[error("cursor is not valid")]
    BadCursor,
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused or failed; nothing (or not all) was done.
    Failed,
}

/// One admin action, as recorded.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// What was done: `user.create`, `user.set_tier`, `user.delete`, `key.create`,
    /// `key.revoke`, `config.reload`, `tls.reload`, `export`, `retention.run`, ...
    pub action: &'static str,
    /// What it was done to (a user id, a key id, a month, a file), when anything.
    pub target: Option<String>,
    /// Who asked: the client's `address:port` for the admin API; `sighup`, `file-watch` or
    /// `scheduler` for what the gateway does on its own.
    pub caller: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The HTTP status answered, for actions through the admin API.
    pub status: Option<u16>,
    /// More about it (new and previous tier, key id, records deleted, the error message).
    pub detail: Value,
}

/// The append-only audit trail.
pub struct AuditLog {
    tree: sled::Tree,
    next: AtomicU64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

/// Largest error message kept in an entry.
const MAX_MESSAGE: usize = 300;

impl AuditLog {
    /// Opens the trail on its tree (the sequence continues after the last entry).
    pub fn open(tree: sled::Tree) -> Result<Self, AuditError> {
        let next = match tree.last()? {
            Some((k, _)) => seq_of(&k).map_or(1, |n| n + 1),
            None => 1,
        };
        Ok(AuditLog {
            tree,
            next: AtomicU64::new(next),
        })
    }

    /// Appends an entry (not yet flushed: see [`AuditLog::flush`]); returns its id.
    pub fn append(&self, e: &Entry) -> Result<u64, AuditError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut detail = e.detail.clone();
        if let Some(Value::String(m)) = detail.get_mut("error")
            && m.len() > MAX_MESSAGE
        {
            let mut cut = MAX_MESSAGE;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
        }
        let v = json!({
            "id": id.to_string(),
            "at": rfc3339_ms(e.at),
            "action": e.action,
            "target": e.target,
            "caller": e.caller,
            "outcome": match e.outcome { Outcome::Ok => "ok", Outcome::Failed => "failed" },
            "status": e.status,
            "detail": detail,
        });
        self.tree.insert(id.to_be_bytes(), v.to_string().into_bytes())?;
        Ok(id)
    }

    /// Appends and flushes, logging a failure (for callers that cannot report it: signals,
    /// watchers, timers). Blocking.
    pub fn record_blocking(&self, e: &Entry) {
        if let Err(err) = self.append(e).and_then(|_| Ok(self.tree.flush().map(|_| ())?)) {
            tracing::error!(error = %err, action = e.action, "audit entry not written");
        }
    }

    /// Makes appended entries durable.
    pub async fn flush(&self) -> Result<(), AuditError> {
        self.tree.flush_async().await?;
        Ok(())
    }

    /// A page of entries, newest first, before `cursor` (an id given out as `next_cursor`).
    pub fn page(&self, limit: usize, cursor: Option<&str>) -> Result<(Vec<Value>, Option<String>), AuditError> {
        let end = match cursor {
            None => u64::MAX,
            Some(c) => c.parse::<u64>().map_err(|_| AuditError::BadCursor)?,
        };
        let mut data = Vec::with_capacity(limit.min(1000));
        let mut last = None;
        let mut more = false;
        for item in self.tree.range(..end.to_be_bytes()).rev() {
            let (k, v) = item?;
            if data.len() == limit {
                more = true;
                break;
            }
            let Some(seq) = seq_of(&k) else { continue };
            // An unreadable entry is shown as such rather than hidden: the trail has no gaps.
            let entry = serde_json::from_slice::<Value>(&v)
                .unwrap_or_else(|_| json!({"id": seq.to_string(), "unreadable": true}));
            data.push(entry);
            last = Some(seq);
        }
        Ok((data, if more { last.map(|s| s.to_string()) } else { None }))
    }
}

fn seq_of(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &'static str) -> Entry {
        Entry {
            at: Utc::now(),
            action,
            target: Some("alice".into()),
            caller: "127.0.0.1:5000".into(),
            outcome: Outcome::Ok,
            status: Some(200),
            detail: json!({}),
        }
    }

    #[test]
    fn pages_newest_first_and_continues_the_sequence_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
        for a in ["user.create", "key.create", "key.revoke"] {
            log.append(&entry(a)).unwrap();
        }
        let (page, next) = log.page(2, None).unwrap();
        assert_eq!(page[0]["action"], "key.revoke");
        assert_eq!(page[1]["action"], "key.create");
        let (rest, end) = log.page(2, next.as_deref()).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0]["action"], "user.create");
        assert_eq!(end, None);
        assert!(log.page(2, Some("x")).is_err());
        drop(log);
        let log = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
        assert_eq!(log.append(&entry("user.delete")).unwrap(), 4);
    }
}
