//! The Files API: files created by uploads (and by generated videos), listed, fetched,
//! downloaded and deleted. A missing file answers 403 PERMISSION_DENIED as Google does.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use base64::Engine;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::body::MockBody;
use super::store::{Collection, empty_ok, error_status, pretty};
use super::{random_id, wire};

/// Bytes of one file the mock keeps for download; bigger files keep only their metadata.
pub(crate) const MAX_KEPT_FILE: u64 = 64 << 20;
/// Bytes of all files the mock keeps at once.
const MAX_KEPT_TOTAL: u64 = 1 << 30;

/// A Files API resource, fields in wire order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct File {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    pub mime_type: String,
    pub size_bytes: String,
    pub create_time: String,
    pub update_time: String,
    pub expiration_time: String,
    pub sha256_hash: String,
    pub uri: String,
    pub state: &'static str,
    pub source: &'static str,
    /// The content, when small enough to keep.
    #[serde(skip)]
    pub data: Option<Bytes>,
}

/// The final upload answer: `{"file": {...}}`.
#[derive(Serialize)]
struct Envelope<'a> {
    file: &'a File,
}

/// What a new file is made of.
pub(crate) struct NewFile {
    pub host: String,
    pub display_name: Option<String>,
    pub mime: String,
    pub size: u64,
    pub sha256: [u8; 32],
    pub data: Option<Bytes>,
    pub source: &'static str,
}

/// Every file of one mock.
#[derive(Debug, Default)]
pub(crate) struct Files {
    items: Collection<File>,
    kept: AtomicU64,
}

impl Files {
    /// Stores a new `files/{id}` and returns it.
    pub(crate) fn create(&self, f: NewFile) -> File {
        let id = random_id(12).to_ascii_lowercase();
        let (secs, micros) = wire::now_micros();
        let created = wire::rfc3339(secs, micros);
        let data = f.data.filter(|d| {
            let n = d.len() as u64;
            let before = self.kept.fetch_add(n, Relaxed);
            let ok = before + n <= MAX_KEPT_TOTAL;
            if !ok {
                self.kept.fetch_sub(n, Relaxed);
            }
            ok
        });
        let file = File {
            name: format!("files/{id}"),
            display_name: f.display_name,
            mime_type: f.mime,
            size_bytes: f.size.to_string(),
            update_time: created.clone(),
            // Files are kept 48 h by the real API.
            expiration_time: wire::rfc3339(secs + 48 * 3600, micros),
            create_time: created,
            sha256_hash: sha256_hash(&f.sha256),
            uri: format!("http://{}/v1beta/files/{id}", f.host),
            state: "ACTIVE",
            source: f.source,
            data,
        };
        self.items.insert(&id, file.clone());
        file
    }

    /// A copy of `files/{id}`.
    pub(crate) fn get(&self, id: &str) -> Option<File> {
        self.items.get(id)
    }

    /// `GET files`.
    pub(crate) fn list(&self, query: Option<&str>) -> Response<MockBody> {
        self.items.list_response("files", query)
    }

    /// `GET files/{id}`.
    pub(crate) fn get_response(&self, id: &str) -> Response<MockBody> {
        match self.items.get(id) {
            Some(f) => pretty(StatusCode::OK, &f),
            None => missing(id),
        }
    }

    /// `DELETE files/{id}`.
    pub(crate) fn delete(&self, id: &str) -> Response<MockBody> {
        match self.items.remove(id) {
            Some(f) => {
                if let Some(d) = f.data {
                    self.kept.fetch_sub(d.len() as u64, Relaxed);
                }
                empty_ok()
            }
            None => missing(id),
        }
    }

    /// `GET files/{id}:download?alt=media`: the bytes, typed as the file.
    pub(crate) fn download(&self, id: &str) -> Response<MockBody> {
        let Some(f) = self.items.get(id) else {
            return missing(id);
        };
        let Some(data) = f.data else {
            return error_status(
                StatusCode::BAD_REQUEST,
                "The mock keeps the bytes of files up to 64 MiB (1 GiB in all); this file has none.",
                "FAILED_PRECONDITION",
            );
        };
        let mut r = Response::new(MockBody::full(data));
        let mime = HeaderValue::from_str(&f.mime_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
        r.headers_mut().insert(CONTENT_TYPE, mime);
        r
    }
}

/// The upload answer `{"file": {...}}`.
pub(crate) fn envelope(f: &File) -> Response<MockBody> {
    pretty(StatusCode::OK, &Envelope { file: f })
}

/// 403 PERMISSION_DENIED: what Google answers for a file that does not exist.
fn missing(id: &str) -> Response<MockBody> {
    let msg = format!("You do not have permission to access the File {id} or it may not exist.");
    error_status(StatusCode::FORBIDDEN, &msg, "PERMISSION_DENIED")
}

/// Google's `sha256Hash`: base64 of the lowercase hex digest.
fn sha256_hash(digest: &[u8; 32]) -> String {
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    base64::engine::general_purpose::STANDARD.encode(hex)
}

/// The digest of a whole byte string.
pub(crate) fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}
