//! Resumable upload sessions started through the gateway: which key started each one, so that
//! chunk requests (python-genai sends them without a key) are billed to the right user.
//! Sessions are also kept in sled (under a hash of the upload id, which is a bearer
//! capability), so an upload survives a restart of the gateway. Billing of the bytes an upload
//! request sent upstream lives here too. In cluster mode a session is also kept in PostgreSQL
//! ([`UploadSessions::attach`]), so another replica can finish it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::{Value, json};

use super::body::RequestTally;
use crate::cluster::shared::uploads::SharedUploads;
use crate::identity::{KeyEntry, Registry, hash_key};
use crate::ledger::{Details, FileUpload, Record, Status, Tags};
use crate::metering::pricing::upload_cost;
use crate::settle::Against;

/// Sessions older than this are forgotten (Gemini keeps uploads for 48 hours at most).
const SESSION_TTL: Duration = Duration::from_secs(48 * 3600);

/// One upload session.
#[derive(Debug)]
pub struct UploadSession {
    /// The key that started it.
    pub key: KeyEntry,
    /// Declared size at start.
    pub declared: Option<u64>,
    /// When it started.
    pub started: Instant,
}

/// Upload sessions by `upload_id`.
#[derive(Debug)]
pub struct UploadSessions {
    map: DashMap<String, Arc<UploadSession>>,
    tree: sled::Tree,
    /// Cluster mode: the sessions in PostgreSQL.
    shared: OnceLock<Arc<SharedUploads>>,
}

/// A stored session, as cluster mode pushes it to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Hex SHA-256 of the upload id.
    pub upload_hash: String,
    /// The key that started it.
    pub key_id: String,
    /// The size declared at start.
    pub declared: Option<u64>,
    /// Its age in seconds.
    pub age_secs: u64,
}

fn upload_hash(upload_id: &str) -> String {
    hex::encode(hash_key(upload_id))
}

fn stored_key(upload_id: &str) -> Vec<u8> {
    let mut k = b"upload/".to_vec();
    k.extend_from_slice(upload_hash(upload_id).as_bytes());
    k
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl UploadSessions {
    /// Sessions kept in memory and in `tree`.
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            map: DashMap::new(),
            tree,
            shared: OnceLock::new(),
        }
    }

    /// Cluster mode: sessions are also kept in PostgreSQL (set once, at start).
    pub fn attach(&self, shared: SharedUploads) {
        let _ = self.shared.set(Arc::new(shared));
    }

    /// The PostgreSQL side, in cluster mode.
    pub fn shared(&self) -> Option<&Arc<SharedUploads>> {
        self.shared.get()
    }

    /// Every session kept on disk that is not stale (cluster mode pushes them to PostgreSQL).
    pub fn stored(&self) -> Vec<StoredSession> {
        let now = unix_now();
        self.tree
            .scan_prefix(b"upload/")
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let v: Value = serde_json::from_slice(&v).ok()?;
                let age = now.saturating_sub(v["started"].as_u64()?);
                (age < SESSION_TTL.as_secs()).then_some(())?;
                Some(StoredSession {
                    upload_hash: String::from_utf8_lossy(k.get(7..)?).into_owned(),
                    key_id: v["key_id"].as_str()?.to_string(),
                    declared: v["declared"].as_u64(),
                    age_secs: age,
                })
            })
            .collect()
    }

    /// Remembers a session; in cluster mode also in PostgreSQL before returning, so another
    /// replica knows it by the time the caller has the upload URL.
    pub async fn insert(&self, upload_id: String, key: KeyEntry, declared: Option<u64>, registry: &Registry) {
        if let Some(shared) = self.shared.get()
            && let Err(e) = shared
                .insert(&upload_hash(&upload_id), registry.key_id(key), declared, 0)
                .await
        {
            tracing::warn!(error = %e, "upload session not shared; only this replica can finish it");
        }
        self.insert_local(upload_id, key, declared, registry);
    }

    fn insert_local(&self, upload_id: String, key: KeyEntry, declared: Option<u64>, registry: &Registry) {
        if self.map.len() > 10_000 {
            self.map.retain(|_, s| s.started.elapsed() < SESSION_TTL);
        }
        let rec = json!({"key_id": registry.key_id(key), "declared": declared, "started": unix_now()});
        if let Err(e) = self.tree.insert(stored_key(&upload_id), rec.to_string().into_bytes()) {
            tracing::warn!(error = %e, "upload session not persisted; it lasts until a restart");
        }
        self.map.insert(
            upload_id,
            Arc::new(UploadSession {
                key,
                declared,
                started: Instant::now(),
            }),
        );
    }

    /// The session of an `upload_id`, if it was started here (before or since the last
    /// restart) and is not stale.
    pub fn get(&self, upload_id: &str, registry: &Registry) -> Option<Arc<UploadSession>> {
        if let Some(s) = self.map.get(upload_id).map(|s| s.value().clone()) {
            return (s.started.elapsed() < SESSION_TTL).then_some(s);
        }
        let raw = self.tree.get(stored_key(upload_id)).ok()??;
        let v: Value = serde_json::from_slice(&raw).ok()?;
        let age = unix_now().saturating_sub(v["started"].as_u64()?);
        if age >= SESSION_TTL.as_secs() {
            return None;
        }
        let key = registry.entry_by_key_id(v["key_id"].as_str()?)?;
        let started = Instant::now()
            .checked_sub(std::time::Duration::from_secs(age))
            .unwrap_or_else(Instant::now);
        let s = Arc::new(UploadSession {
            key,
            declared: v["declared"].as_u64(),
            started,
        });
        self.map.insert(upload_id.to_string(), s.clone());
        Some(s)
    }

    /// Forgets a finished session.
    pub fn remove(&self, upload_id: &str) {
        self.map.remove(upload_id);
        let _ = self.tree.remove(stored_key(upload_id));
        if let Some(shared) = self.shared.get() {
            shared.remove(upload_hash(upload_id));
        }
    }

    /// Cluster mode: a session not known here is looked up in PostgreSQL (started through
    /// another replica) and, when found and its key is known here, kept locally, so the
    /// synchronous [`UploadSessions::get`] finds it.
    pub async fn fetch_shared(&self, upload_id: &str, registry: &Registry) {
        let Some(shared) = self.shared.get() else { return };
        if self.get(upload_id, registry).is_some() {
            return;
        }
        let s = match shared.get(&upload_hash(upload_id)).await {
            Ok(Some(s)) if s.age_secs < SESSION_TTL.as_secs() => s,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "upload session not looked up in PostgreSQL");
                return;
            }
        };
        let Some(key) = registry.entry_by_key_id(&s.key_id) else {
            return;
        };
        let started = Instant::now()
            .checked_sub(Duration::from_secs(s.age_secs))
            .unwrap_or_else(Instant::now);
        self.map.insert(
            upload_id.to_string(),
            Arc::new(UploadSession {
                key,
                declared: s.declared,
                started,
            }),
        );
    }
}

/// Rewrites the upstream's absolute upload URL to point at the gateway: `public` is the
/// gateway's base URL (`public_url`, or `http://` plus the Host the caller used), and
/// `upstream_prefix` the path of `upstream.base_url`, which the gateway's own paths lack.
pub fn rewrite_upload_url(url: &str, public: &str, upstream_prefix: &str) -> Option<String> {
    let after_scheme = url.split_once("://").map(|(_, r)| r)?;
    let path_start = after_scheme.find('/').unwrap_or(after_scheme.len());
    let path_and_query = &after_scheme[path_start..];
    let prefix = upstream_prefix.trim_end_matches('/');
    let rest = path_and_query
        .strip_prefix(prefix)
        .filter(|r| r.starts_with('/'))
        .unwrap_or(path_and_query);
    Some(format!("{}{}", public.trim_end_matches('/'), rest))
}

impl super::Proxy {
    /// Cluster mode: before a request is identified, what another replica may have recorded
    /// and this one not heard of yet is looked up in PostgreSQL: the upload session it
    /// continues, the owner of the resource its path names (only for a caller whose key is
    /// known here, so requests without one cannot make this replica query PostgreSQL at will).
    /// A no-op outside cluster mode and on a local hit.
    pub async fn prefetch_shared(
        &self,
        route: &super::route::Route,
        path: &str,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) {
        if let Some(upload_id) = route.upload_session() {
            self.uploads.fetch_shared(upload_id, &self.registry).await;
        }
        if self.owners.shared().is_none() {
            return;
        }
        if let Some((_, name)) = crate::ownership::resource_of(super::tenancy::rest_of(path))
            && super::headers::caller_key(headers, query).is_some_and(|(k, _)| self.registry.identify(&k).is_some())
        {
            self.owners.fetch_shared(&name).await;
        }
    }

    /// Records the file bytes an upload request sent upstream (billed when it accepted them).
    /// Waits (without blocking) for an alert the record fired to reach the disk.
    pub async fn record_upload(
        &self,
        key: KeyEntry,
        rparts: &http::response::Parts,
        tally: &RequestTally,
        tags: Option<Arc<Tags>>,
        upload_id: Option<&str>,
    ) {
        let Some(user) = self.registry.user_of(key) else {
            return;
        };
        let sent = tally.bytes.load(Ordering::Relaxed);
        let ok = rparts.status.is_success();
        let bytes = if ok { sent } else { 0 };
        let s = &self.settler;
        let now = s.clock.now();
        let details = FileUpload {
            bytes_sent: sent,
            key_id: self.registry.key_id(key).into(),
            status: if ok { Status::Ok } else { Status::UpstreamError },
            tags,
            // The upload id is a bearer capability: keep only a fingerprint of it.
            upload_session: upload_id.map(|id| hex::encode(&hash_key(id)[..8]).into()),
            upload_status: rparts
                .headers
                .get("x-goog-upload-status")
                .and_then(|v| v.to_str().ok())
                .map(Into::into),
            upstream_status: rparts.status.as_u16(),
        };
        let rec = Record {
            id: s.ids.next(now),
            user_id: user.id_arc(),
            tokens: 0,
            messages: 0,
            bytes,
            cost: upload_cost(&self.live.load().config.pricing, bytes),
            details: Details::FileUpload(details),
            created_at: now,
        };
        if let Some(wait) = s.settle(key, rec, Against::Nothing) {
            wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_url_points_at_the_gateway() {
        let u = "https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=X1&upload_protocol=resumable";
        assert_eq!(
            rewrite_upload_url(u, "http://127.0.0.1:8080", "/").unwrap(),
            "http://127.0.0.1:8080/upload/v1beta/files?upload_id=X1&upload_protocol=resumable"
        );
        assert_eq!(
            rewrite_upload_url(
                "http://h:1/base/upload/v1beta/files?upload_id=Y",
                "https://gw.example.com/",
                "/base"
            )
            .unwrap(),
            "https://gw.example.com/upload/v1beta/files?upload_id=Y"
        );
    }
}
