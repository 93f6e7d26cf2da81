//! Resumable uploads (gemini-wire.md §1.1): `start` opens a session keyed by a random
//! `upload_id`, chunks must arrive at the exact offset, `finalize` answers the file object.
//! A finished upload (or a single-shot one) becomes a real file in [`super::files`]. The
//! session lock is never held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::body::MockBody;
use super::files::{self, NewFile};
use super::search::Upload;
use super::{Shared, error_json, random_id, read_all, request_host, wire};

// Unfinished sessions are never expired; this bound keeps a misbehaving client from
// growing the map without end.
const MAX_SESSIONS: usize = 100_000;
// The start call carries only JSON metadata.
const MAX_START_BODY: usize = 1 << 20;

const UPLOAD_STATUS: HeaderName = HeaderName::from_static("x-goog-upload-status");
const UPLOAD_URL: HeaderName = HeaderName::from_static("x-goog-upload-url");
const UPLOAD_GRANULARITY: HeaderName = HeaderName::from_static("x-goog-upload-chunk-granularity");
const UPLOAD_SIZE_RECEIVED: HeaderName = HeaderName::from_static("x-goog-upload-size-received");

/// What a finished upload becomes.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A Files API file (`/upload/{v}/files`).
    File,
    /// A document of file search store `{id}` (`uploadToFileSearchStore`).
    Store(String),
}

/// One open upload session.
#[derive(Debug)]
struct Session {
    target: Target,
    received: u64,
    declared: Option<u64>,
    hasher: Sha256,
    /// The bytes so far; `None` once the file outgrew [`files::MAX_KEPT_FILE`].
    data: Option<Vec<u8>>,
    mime: String,
    display_name: Option<String>,
}

/// Open upload sessions by `upload_id`.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock cannot leave a session half-written in a way that
        // matters to a mock, so a poisoned lock is simply reused.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct StartBody {
    #[serde(default)]
    file: Option<StartFile>,
    // uploadToFileSearchStore sends its metadata at the top level.
    display_name: Option<String>,
    mime_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartFile {
    display_name: Option<String>,
    mime_type: Option<String>,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn plain(status: StatusCode, msg: &'static str) -> Response<MockBody> {
    let mut r = Response::new(MockBody::full(msg));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn with_status(mut r: Response<MockBody>, status: &'static str) -> Response<MockBody> {
    r.headers_mut().insert(UPLOAD_STATUS, HeaderValue::from_static(status));
    r
}

/// `POST /upload/{v}/files` (or `.../{store}:uploadToFileSearchStore`) with
/// `X-Goog-Upload-Command: start` (already authenticated).
pub(crate) async fn start(shared: &Shared, req: Request<Incoming>, target: Target) -> Response<MockBody> {
    let h = req.headers();
    let command = header(h, "x-goog-upload-command").unwrap_or("");
    let protocol = header(h, "x-goog-upload-protocol").unwrap_or("");
    if !command.eq_ignore_ascii_case("start") || !protocol.eq_ignore_ascii_case("resumable") {
        // Multipart and single-request media uploads are not mocked.
        return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST);
    }
    let declared = header(h, "x-goog-upload-header-content-length").and_then(|v| v.parse().ok());
    let header_mime = header(h, "x-goog-upload-header-content-type").map(str::to_owned);
    let host = request_host(&req);
    let body = match read_all(req.into_body(), MAX_START_BODY).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    // Lenient: an empty or unparsable body just means no metadata.
    let meta = serde_json::from_slice::<StartBody>(&body).unwrap_or_default();
    let (display_name, body_mime) = match meta.file {
        Some(f) => (f.display_name, f.mime_type),
        None => (meta.display_name, meta.mime_type),
    };
    let mime = header_mime
        .or(body_mime)
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let upload_id = random_id(32);
    let path = match &target {
        Target::File => "files".to_owned(),
        Target::Store(id) => format!("fileSearchStores/{id}:uploadToFileSearchStore"),
    };
    let url = format!("http://{host}/upload/v1beta/{path}?upload_id={upload_id}&upload_protocol=resumable");
    let Ok(url) = HeaderValue::from_str(&url) else {
        return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST);
    };
    {
        let mut map = shared.uploads.lock();
        if map.len() >= MAX_SESSIONS {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "Too many open upload sessions.");
        }
        map.insert(
            upload_id,
            Session {
                target,
                received: 0,
                declared,
                hasher: Sha256::new(),
                data: Some(Vec::new()),
                mime,
                display_name,
            },
        );
    }
    let mut r = with_status(Response::new(MockBody::empty()), "active");
    r.headers_mut().insert(UPLOAD_URL, url);
    r.headers_mut()
        .insert(UPLOAD_GRANULARITY, HeaderValue::from_static("8388608"));
    r
}

/// `POST /upload/{v}/...?upload_id=..`: a chunk, `query` or `cancel`. Needs no API key: the
/// `upload_id` is the capability.
pub(crate) async fn chunk(shared: &Shared, req: Request<Incoming>, upload_id: &str) -> Response<MockBody> {
    let h = req.headers();
    let command = Command::parse(h);
    let offset: Option<u64> = header(h, "x-goog-upload-offset").and_then(|v| v.parse().ok());
    let host = request_host(&req);

    let (received, mut hasher, keeping) = match shared.uploads.lock().get(upload_id) {
        Some(s) => (s.received, s.hasher.clone(), s.data.is_some()),
        None => return plain(StatusCode::NOT_FOUND, "Upload session not found."),
    };
    if command.cancel {
        shared.uploads.lock().remove(upload_id);
        return with_status(Response::new(MockBody::empty()), "cancelled");
    }
    if command.query {
        let mut r = with_status(Response::new(MockBody::empty()), "active");
        r.headers_mut()
            .insert(UPLOAD_SIZE_RECEIVED, HeaderValue::from(received));
        return r;
    }
    if !command.upload && !command.finalize {
        return plain(StatusCode::BAD_REQUEST, "Invalid X-Goog-Upload-Command.");
    }
    if command.upload && offset != Some(received) {
        return plain(StatusCode::BAD_REQUEST, OFFSET_MISMATCH);
    }

    // Hash the bytes as they stream in; keep them only while the file stays small.
    let mut kept = keeping.then(Vec::new);
    let mut n: u64 = 0;
    if command.upload {
        match read_chunk(req.into_body(), &mut hasher, &mut kept, received).await {
            Ok(len) => n = len,
            Err(()) => return plain(StatusCode::BAD_REQUEST, "Failed to read the chunk."),
        }
    }

    let mut map = shared.uploads.lock();
    let Some(session) = map.get_mut(upload_id) else {
        return plain(StatusCode::NOT_FOUND, "Upload session not found.");
    };
    // A concurrent chunk may have moved the offset while this one was being read.
    if session.received != received {
        return plain(StatusCode::BAD_REQUEST, OFFSET_MISMATCH);
    }
    session.received += n;
    session.hasher = hasher;
    match (&mut session.data, kept) {
        (Some(d), Some(k)) => d.extend_from_slice(&k),
        (d, _) => *d = None,
    }
    shared.stats.upload_bytes.fetch_add(n, Relaxed);
    if !command.finalize {
        return with_status(Response::new(MockBody::empty()), "active");
    }
    if session.declared.is_some_and(|d| d != session.received) {
        return plain(
            StatusCode::BAD_REQUEST,
            "The uploaded size does not match X-Goog-Upload-Header-Content-Length.",
        );
    }
    let Some(session) = map.remove(upload_id) else {
        return plain(StatusCode::NOT_FOUND, "Upload session not found.");
    };
    drop(map);

    if let Target::Store(id) = &session.target {
        let up = Upload {
            display_name: session.display_name,
            mime: session.mime,
            size: session.received,
        };
        return with_status(shared.resources.stores.upload(&shared.resources.ops, id, up), "final");
    }
    let file = shared.resources.files.create(NewFile {
        host,
        display_name: session.display_name,
        mime: session.mime,
        size: session.received,
        sha256: session.hasher.finalize().into(),
        data: session.data.map(Bytes::from),
        source: "UPLOADED",
    });
    with_status(files::envelope(&file), "final")
}

/// The words of `X-Goog-Upload-Command` (`upload, finalize` and friends).
#[derive(Debug, Default, Clone, Copy)]
struct Command {
    upload: bool,
    finalize: bool,
    query: bool,
    cancel: bool,
}

impl Command {
    fn parse(h: &HeaderMap) -> Self {
        let mut c = Command::default();
        let words = header(h, "x-goog-upload-command").unwrap_or("").to_ascii_lowercase();
        for w in words.split(',').map(str::trim) {
            match w {
                "upload" => c.upload = true,
                "finalize" => c.finalize = true,
                "query" => c.query = true,
                "cancel" => c.cancel = true,
                _ => {}
            }
        }
        c
    }
}

const OFFSET_MISMATCH: &str =
    "Invalid request. The X-Goog-Upload-Offset value does not match the number of bytes received so far.";

/// Streams one chunk through the hasher, keeping its bytes in `kept` while the whole file
/// (`before` bytes so far) stays under [`files::MAX_KEPT_FILE`].
async fn read_chunk(
    mut body: Incoming,
    hasher: &mut Sha256,
    kept: &mut Option<Vec<u8>>,
    before: u64,
) -> Result<u64, ()> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.map_err(|_| ())?.data_ref() {
            hasher.update(d);
            n += d.len() as u64;
            if before + n > files::MAX_KEPT_FILE {
                *kept = None;
            } else if let Some(k) = kept {
                k.extend_from_slice(d);
            }
        }
    }
    Ok(n)
}

/// `POST /upload/{v}/files` without a session (already authenticated): a single-shot upload,
/// `X-Goog-Upload-Command: upload, finalize` (or `X-Goog-Upload-Protocol: raw`) with the raw
/// bytes as the body; type from `X-Goog-Upload-Header-Content-Type` or `Content-Type`, name
/// from `X-Goog-Upload-File-Name`.
pub(crate) async fn single_shot(shared: &Shared, req: Request<Incoming>) -> Response<MockBody> {
    let h = req.headers();
    let mime = header(h, "x-goog-upload-header-content-type")
        .or_else(|| header(h, CONTENT_TYPE.as_str()))
        .filter(|m| !m.is_empty())
        .unwrap_or("application/octet-stream")
        .to_owned();
    let display_name = header(h, "x-goog-upload-file-name").map(str::to_owned);
    let host = request_host(&req);
    let mut hasher = Sha256::new();
    let mut kept = Some(Vec::new());
    let Ok(n) = read_chunk(req.into_body(), &mut hasher, &mut kept, 0).await else {
        return plain(StatusCode::BAD_REQUEST, "Failed to read the upload.");
    };
    shared.stats.upload_bytes.fetch_add(n, Relaxed);
    let file = shared.resources.files.create(NewFile {
        host,
        display_name,
        mime,
        size: n,
        sha256: hasher.finalize().into(),
        data: kept.map(Bytes::from),
        source: "UPLOADED",
    });
    with_status(files::envelope(&file), "final")
}

/// True when a session-less upload request is a single-shot upload rather than a `start`.
pub(crate) fn is_single_shot(h: &HeaderMap) -> bool {
    let c = Command::parse(h);
    let raw = header(h, "x-goog-upload-protocol").is_some_and(|p| p.eq_ignore_ascii_case("raw"));
    (c.upload && c.finalize) || raw
}
