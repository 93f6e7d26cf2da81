//! Resumable upload sessions started through the gateway: which key started each one, so that
//! chunk requests (python-genai sends them without a key) are billed to the right user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::identity::KeyEntry;

/// Sessions older than this are forgotten (Gemini keeps uploads for 48 hours at most).
const SESSION_TTL: Duration = Duration::from_secs(48 * 3600);

/// One upload session.
#[derive(Debug)]
pub struct UploadSession {
    /// The key that started it.
    pub key: Arc<KeyEntry>,
    /// Declared size at start.
    pub declared: Option<u64>,
    /// When it started.
    pub started: Instant,
}

/// Upload sessions by `upload_id`.
#[derive(Debug, Default)]
pub struct UploadSessions {
    map: DashMap<String, Arc<UploadSession>>,
}

impl UploadSessions {
    /// Remembers a session.
    pub fn insert(&self, upload_id: String, key: Arc<KeyEntry>, declared: Option<u64>) {
        if self.map.len() > 10_000 {
            self.map.retain(|_, s| s.started.elapsed() < SESSION_TTL);
        }
        self.map.insert(upload_id, Arc::new(UploadSession { key, declared, started: Instant::now() }));
    }

    /// The session of an `upload_id`, if it was started here and is not stale.
    pub fn get(&self, upload_id: &str) -> Option<Arc<UploadSession>> {
        self.map
            .get(upload_id)
            .map(|s| s.value().clone())
            .filter(|s| s.started.elapsed() < SESSION_TTL)
    }

    /// Forgets a finished session.
    pub fn remove(&self, upload_id: &str) {
        self.map.remove(upload_id);
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
    let rest = path_and_query.strip_prefix(prefix).filter(|r| r.starts_with('/')).unwrap_or(path_and_query);
    Some(format!("{}{}", public.trim_end_matches('/'), rest))
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
            rewrite_upload_url("http://h:1/base/upload/v1beta/files?upload_id=Y", "https://gw.example.com/", "/base").unwrap(),
            "https://gw.example.com/upload/v1beta/files?upload_id=Y"
        );
    }
}
