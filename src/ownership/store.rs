//! The ownership index: resource name → owner, in memory for the request path and in a sled
//! tree for restarts. A creation is flushed to disk before its answer reaches the caller, so a
//! name a caller holds is always one the index knows (also after `kill -9`). In cluster mode
//! ([`Owners::attach`]) every change also goes to PostgreSQL, which tells the other replicas.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use super::Kind;
use crate::cluster::shared::owners::{PgResource, SharedOwners};

/// Errors of the ownership store.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// sled failed.
    #[error("ownership store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored entry is not readable.
    #[error("ownership store: entry {0} is corrupt")]
    Corrupt(String),
    /// Cluster mode: PostgreSQL failed.
    #[error("ownership store (PostgreSQL): {0}")]
    Shared(String),
}

/// One owned resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEntry {
    /// The index name (`files/abc`).
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// The owner's user id.
    pub user: Arc<str>,
    /// Creation order (newest first in lists).
    pub seq: u64,
    /// When it was recorded (Unix milliseconds).
    pub created_ms: u64,
}

/// How an entry is kept on disk, under `n/{name}`.
#[derive(Serialize, Deserialize)]
struct Stored {
    user: String,
    seq: u64,
    created_ms: u64,
}

/// The index of owned resources.
#[derive(Debug)]
pub struct Owners {
    by_name: DashMap<String, OwnedEntry>,
    /// Each user's names by creation order, for lists.
    by_user: DashMap<Arc<str>, BTreeMap<u64, String>>,
    next_seq: AtomicU64,
    /// Settlements claimed in this process (finished batches being billed).
    settling: dashmap::DashSet<String>,
    tree: sled::Tree,
    /// Cluster mode: the index in PostgreSQL.
    shared: OnceLock<Arc<SharedOwners>>,
}

fn stored_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 2);
    k.extend_from_slice(b"n/");
    k.extend_from_slice(name.as_bytes());
    k
}

fn note_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 2);
    k.extend_from_slice(b"m/");
    k.extend_from_slice(name.as_bytes());
    k
}

fn settled_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 2);
    k.extend_from_slice(b"s/");
    k.extend_from_slice(name.as_bytes());
    k
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Owners {
    /// Loads the index from `tree`.
    pub fn load(tree: sled::Tree) -> Result<Self, OwnershipError> {
        let owners = Owners {
            by_name: DashMap::new(),
            by_user: DashMap::new(),
            next_seq: AtomicU64::new(1),
            settling: dashmap::DashSet::new(),
            tree,
            shared: OnceLock::new(),
        };
        let mut max_seq = 0;
        for item in owners.tree.scan_prefix(b"n/") {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(k.get(2..).unwrap_or_default()).into_owned();
            let s: Stored = serde_json::from_slice(&v).map_err(|_| OwnershipError::Corrupt(name.clone()))?;
            let Some((kind, _)) = super::resource_of(&name) else {
                return Err(OwnershipError::Corrupt(name));
            };
            max_seq = max_seq.max(s.seq);
            owners.index(OwnedEntry {
                name,
                kind,
                user: Arc::from(s.user),
                seq: s.seq,
                created_ms: s.created_ms,
            });
        }
        owners.next_seq.store(max_seq + 1, Ordering::Relaxed);
        Ok(owners)
    }

    fn index(&self, e: OwnedEntry) {
        self.by_user
            .entry(e.user.clone())
            .or_default()
            .insert(e.seq, e.name.clone());
        if let Some(old) = self.by_name.insert(e.name.clone(), e)
            && let Some(mut m) = self.by_user.get_mut(&old.user)
        {
            // A name re-created by another user (the old one expired upstream) moves.
            if m.get(&old.seq) == Some(&old.name) {
                m.remove(&old.seq);
            }
        }
    }

    /// The owner of an index name.
    pub fn owner(&self, name: &str) -> Option<Arc<str>> {
        self.by_name.get(name).map(|e| e.user.clone())
    }

    /// The creation number of `user`'s resource `name` (a list's page token).
    pub fn seq_of(&self, user: &str, name: &str) -> Option<u64> {
        self.by_name.get(name).filter(|e| &*e.user == user).map(|e| e.seq)
    }

    /// Whether `user` owns the index name.
    pub fn owns(&self, user: &str, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|e| &*e.user == user)
    }

    /// Records `user` as the owner of `name` (a resource the upstream just created) and waits
    /// until that is on disk. The upstream's word wins over an older entry: a name is only
    /// re-created after the old resource is gone.
    /// In cluster mode also in PostgreSQL before returning (a failure there is logged: this
    /// replica still knows, and pushes it at its next resync).
    pub async fn record(&self, user: &Arc<str>, kind: Kind, name: &str) -> Result<(), OwnershipError> {
        let created_ms = now_ms();
        self.put(user, kind, name, created_ms)?;
        self.tree.flush_async().await?;
        if let Some(shared) = self.shared.get()
            && let Err(e) = shared.record(name, user, created_ms).await
        {
            tracing::warn!(error = %e, "resource owner not shared; other replicas learn it at a resync");
        }
        Ok(())
    }

    /// Writes an entry without waiting for the disk.
    fn put(&self, user: &Arc<str>, kind: Kind, name: &str, created_ms: u64) -> Result<(), OwnershipError> {
        let e = OwnedEntry {
            name: name.to_string(),
            kind,
            user: user.clone(),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            created_ms,
        };
        let stored = Stored {
            user: user.to_string(),
            seq: e.seq,
            created_ms: e.created_ms,
        };
        let v = serde_json::to_vec(&stored).map_err(|_| OwnershipError::Corrupt(name.into()))?;
        self.tree.insert(stored_key(name), v)?;
        self.index(e);
        Ok(())
    }

    /// Gives an existing (or unowned) resource to `user` (admin).
    pub async fn assign(&self, user: &Arc<str>, kind: Kind, name: &str) -> Result<(), OwnershipError> {
        self.forget_local(name)?;
        self.record(user, kind, name).await
    }

    /// Claims the one-time settlement of a resource (a finished batch): true for the first
    /// caller only, in this process and across restarts once [`Owners::settled`] recorded it.
    pub fn claim_settlement(&self, name: &str) -> Result<bool, OwnershipError> {
        if self.tree.contains_key(settled_key(name))? {
            return Ok(false);
        }
        Ok(self.settling.insert(name.to_string()))
    }

    /// Records on disk that a claimed settlement is done (its records are durable).
    pub async fn settled(&self, name: &str) -> Result<(), OwnershipError> {
        self.tree.insert(settled_key(name), &b"1"[..])?;
        self.tree.flush_async().await?;
        if let Some(shared) = self.shared.get()
            && let Err(e) = shared.settled(name).await
        {
            tracing::warn!(error = %e, "settled mark not shared; other replicas learn it at a resync");
        }
        Ok(())
    }

    /// [`Owners::claim_settlement`], across replicas in cluster mode: the claim is also taken
    /// in PostgreSQL, so two replicas reading a finished batch at once bill it once.
    pub async fn claim_settlement_shared(&self, name: &str) -> Result<bool, OwnershipError> {
        if !self.claim_settlement(name)? {
            return Ok(false);
        }
        let Some(shared) = self.shared.get() else {
            return Ok(true);
        };
        match shared.claim(name).await {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.settling.remove(name);
                Ok(false)
            }
            Err(e) => {
                self.settling.remove(name);
                Err(OwnershipError::Shared(e.to_string()))
            }
        }
    }

    /// Gives back a claim whose settlement failed, so a later read can try again.
    pub fn unclaim(&self, name: &str) {
        self.settling.remove(name);
        if let Some(shared) = self.shared.get() {
            shared.unclaim(name.to_string());
        }
    }

    /// Keeps a small note about a resource (what a video generation asked for), on disk.
    pub async fn set_note(&self, name: &str, note: &[u8]) -> Result<(), OwnershipError> {
        self.tree.insert(note_key(name), note)?;
        self.tree.flush_async().await?;
        if let Some(shared) = self.shared.get()
            && let Err(e) = shared.set_note(name, note).await
        {
            tracing::warn!(error = %e, "resource note not shared; other replicas learn it at a resync");
        }
        Ok(())
    }

    /// The note kept about a resource.
    pub fn note(&self, name: &str) -> Option<Vec<u8>> {
        self.tree.get(note_key(name)).ok().flatten().map(|v| v.to_vec())
    }

    /// Forgets a resource (deleted upstream, or gone); in cluster mode PostgreSQL marks it
    /// deleted too (in the background).
    pub fn forget(&self, name: &str) -> Result<(), OwnershipError> {
        self.forget_local(name)?;
        if let Some(shared) = self.shared.get() {
            shared.forget(name.to_string());
        }
        Ok(())
    }

    fn forget_local(&self, name: &str) -> Result<(), OwnershipError> {
        if let Some((_, e)) = self.by_name.remove(name)
            && let Some(mut m) = self.by_user.get_mut(&e.user)
        {
            m.remove(&e.seq);
        }
        self.tree.remove(stored_key(name))?;
        Ok(())
    }

    /// Cluster mode: ownership is also kept in PostgreSQL (set once, at start).
    pub fn attach(&self, shared: SharedOwners) {
        let _ = self.shared.set(Arc::new(shared));
    }

    /// Makes the local copy of one resource match PostgreSQL's row (owner, settled mark,
    /// note), without writing PostgreSQL back.
    pub fn mirror(&self, r: &PgResource) -> Result<(), OwnershipError> {
        if r.settled {
            self.tree.insert(settled_key(&r.name), &b"1"[..])?;
        }
        if let Some(n) = &r.note {
            self.tree.insert(note_key(&r.name), n.as_slice())?;
        }
        match (&r.user, r.deleted) {
            (Some(u), false) if self.owner(&r.name).as_deref() != Some(u.as_str()) => {
                let Some((kind, _)) = super::resource_of(&r.name) else {
                    return Err(OwnershipError::Corrupt(r.name.clone()));
                };
                self.put(&Arc::from(u.as_str()), kind, &r.name, r.created_ms)
            }
            (_, true) => self.forget_local(&r.name),
            _ => Ok(()),
        }
    }

    /// Cluster mode: a name this replica does not know is looked up in PostgreSQL (created
    /// through another replica, its notification not here yet).
    pub async fn fetch_shared(&self, name: &str) {
        let Some(shared) = self.shared.get() else { return };
        if self.by_name.contains_key(name) {
            return;
        }
        match shared.get(name).await {
            Ok(Some(r)) => {
                if let Err(e) = self.mirror(&r) {
                    tracing::warn!(error = %e, "shared resource not copied here");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "resource owner not looked up in PostgreSQL"),
        }
    }

    /// Every resource known here, with its settled mark and note (a resync pushes the ones
    /// PostgreSQL lacks).
    pub fn rows(&self) -> Vec<PgResource> {
        let mut out: std::collections::HashMap<String, PgResource> = self
            .all()
            .into_iter()
            .map(|e| {
                let r = PgResource {
                    name: e.name.clone(),
                    user: Some(e.user.to_string()),
                    created_ms: e.created_ms,
                    deleted: false,
                    settled: false,
                    note: None,
                };
                (e.name, r)
            })
            .collect();
        for (prefix, settled) in [(&b"s/"[..], true), (&b"m/"[..], false)] {
            for (k, v) in self.tree.scan_prefix(prefix).filter_map(Result::ok) {
                let name = String::from_utf8_lossy(k.get(2..).unwrap_or_default()).into_owned();
                let r = out.entry(name.clone()).or_insert_with(|| PgResource {
                    name,
                    user: None,
                    created_ms: 0,
                    deleted: false,
                    settled: false,
                    note: None,
                });
                if settled {
                    r.settled = true;
                } else {
                    r.note = Some(v.to_vec());
                }
            }
        }
        out.into_values().collect()
    }

    /// The PostgreSQL side, in cluster mode.
    pub fn shared(&self) -> Option<&Arc<SharedOwners>> {
        self.shared.get()
    }

    /// Up to `limit` of `user`'s resources of the kinds `want` accepts, newest first, older
    /// than creation number `before` (exclusive; `u64::MAX` for the first page).
    pub fn page(&self, user: &str, want: impl Fn(Kind) -> bool, before: u64, limit: usize) -> Vec<OwnedEntry> {
        let Some(m) = self.by_user.get(user) else {
            return Vec::new();
        };
        m.range(..before)
            .rev()
            .filter_map(|(_, name)| self.by_name.get(name).map(|e| e.clone()))
            .filter(|e| want(e.kind))
            .take(limit)
            .collect()
    }

    /// Every resource of `user`, newest first.
    pub fn of_user(&self, user: &str) -> Vec<OwnedEntry> {
        self.page(user, |_| true, u64::MAX, usize::MAX)
    }

    /// Every owned resource (admin), in name order.
    pub fn all(&self) -> Vec<OwnedEntry> {
        let mut v: Vec<OwnedEntry> = self.by_name.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_a_reopen_and_pages_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        {
            let db = sled::open(dir.path()).unwrap();
            let o = Owners::load(db.open_tree("owners").unwrap()).unwrap();
            for i in 0..5 {
                o.record(&alice, Kind::File, &format!("files/a{i}")).await.unwrap();
            }
            o.record(&bob, Kind::File, "files/b0").await.unwrap();
            o.record(&alice, Kind::CachedContent, "cachedContents/c0")
                .await
                .unwrap();
            o.forget("files/a1").unwrap();
            o.tree.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let o = Owners::load(db.open_tree("owners").unwrap()).unwrap();
        assert!(o.owns("alice", "files/a0"));
        assert!(!o.owns("bob", "files/a0"));
        assert!(!o.owns("alice", "files/a1"));
        let files = |k| k == Kind::File;
        let p1: Vec<String> = o
            .page("alice", files, u64::MAX, 2)
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(p1, ["files/a4", "files/a3"]);
        let last = o.page("alice", files, u64::MAX, 2)[1].seq;
        let p2: Vec<String> = o.page("alice", files, last, 10).into_iter().map(|e| e.name).collect();
        assert_eq!(p2, ["files/a2", "files/a0"]);
        // A new record after reopening gets a newer number than every old one.
        o.record(&alice, Kind::File, "files/a9").await.unwrap();
        assert_eq!(o.page("alice", files, u64::MAX, 1)[0].name, "files/a9");
        // Re-created by someone else: it moves.
        o.record(&bob, Kind::File, "files/a0").await.unwrap();
        assert!(o.owns("bob", "files/a0"));
        assert!(
            o.page("alice", files, u64::MAX, 10)
                .iter()
                .all(|e| e.name != "files/a0")
        );
    }
}
