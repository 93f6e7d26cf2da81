//! Resumable uploads (gemini-wire.md §1.1): `start` opens a session keyed by a random
//! `upload_id`, chunks must arrive at the exact offset, `finalize` answers the file object.
//! The only lock of the mock lives here; it is never held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, PoisonError};

use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::body::MockBody;
use super::{Shared, error_json, json, random_id, read_all, request_host, wire};

// Unfinished sessions are never expired; this bound keeps a misbehaving client from
// growing the map without end.
const MAX_SESSIONS: usize = 100_000;
// The start call carries only JSON metadata.
const MAX_START_BODY: usize = 1 << 20;

const UPLOAD_STATUS: HeaderName = HeaderName::from_static("x-goog-upload-status");
const UPLOAD_URL: HeaderName = HeaderName::from_static("x-goog-upload-url");
const UPLOAD_GRANULARITY: HeaderName = HeaderName::from_static("x-goog-upload-chunk-granularity");
const UPLOAD_SIZE_RECEIVED: HeaderName = HeaderName::from_static("x-goog-upload-size-received");

/// One open upload session.
#[derive(Debug)]
struct Session {
    received: u64,
    declared: Option<u64>,
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
struct StartBody {
    #[serde(default)]
    file: Option<StartFile>,
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

/// `POST /upload/{v}/files` with `X-Goog-Upload-Command: start` (already authenticated).
pub(crate) async fn start(shared: &Shared, req: Request<Incoming>) -> Response<MockBody> {
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
    let meta = serde_json::from_slice::<StartBody>(&body).unwrap_or_default().file;
    let (display_name, body_mime) = match meta {
        Some(f) => (f.display_name, f.mime_type),
        None => (None, None),
    };
    let mime = header_mime
        .or(body_mime)
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let upload_id = random_id(32);
    let url = format!("http://{host}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable");
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
                received: 0,
                declared,
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

/// `POST /upload/{v}/files?upload_id=..`: a chunk, `query` or `cancel`. Needs no API key: the
/// `upload_id` is the capability.
pub(crate) async fn chunk(shared: &Shared, req: Request<Incoming>, upload_id: &str) -> Response<MockBody> {
    let h = req.headers();
    let command = header(h, "x-goog-upload-command").unwrap_or("").to_ascii_lowercase();
    let mut upload = false;
    let mut finalize = false;
    let mut query = false;
    let mut cancel = false;
    for c in command.split(',').map(str::trim) {
        match c {
            "upload" => upload = true,
            "finalize" => finalize = true,
            "query" => query = true,
            "cancel" => cancel = true,
            _ => {}
        }
    }
    let offset: Option<u64> = header(h, "x-goog-upload-offset").and_then(|v| v.parse().ok());
    let host = request_host(&req);

    let received = match shared.uploads.lock().get(upload_id) {
        Some(s) => s.received,
        None => return plain(StatusCode::NOT_FOUND, "Upload session not found."),
    };
    if cancel {
        shared.uploads.lock().remove(upload_id);
        return with_status(Response::new(MockBody::empty()), "cancelled");
    }
    if query {
        let mut r = with_status(Response::new(MockBody::empty()), "active");
        r.headers_mut()
            .insert(UPLOAD_SIZE_RECEIVED, HeaderValue::from(received));
        return r;
    }
    if !upload && !finalize {
        return plain(StatusCode::BAD_REQUEST, "Invalid X-Goog-Upload-Command.");
    }
    if upload && offset != Some(received) {
        return plain(
            StatusCode::BAD_REQUEST,
            "Invalid request. The X-Goog-Upload-Offset value does not match the number of bytes received so far.",
        );
    }

    // Count the bytes as they stream in; never buffer a chunk.
    let mut n: u64 = 0;
    if upload {
        match super::count_body(req.into_body()).await {
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
        return plain(
            StatusCode::BAD_REQUEST,
            "Invalid request. The X-Goog-Upload-Offset value does not match the number of bytes received so far.",
        );
    }
    session.received += n;
    shared.stats.upload_bytes.fetch_add(n, Relaxed);
    if !finalize {
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

    let id = random_id(12).to_ascii_lowercase();
    let body = file_json(
        &host,
        &id,
        session.display_name.as_deref(),
        &session.mime,
        session.received,
        true,
    );
    match body {
        Ok(b) => with_status(json(StatusCode::OK, b), "final"),
        Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
    }
}

/// Renders a file object, wrapped in `{"file": ..}` when `wrapped` (the upload answer).
pub(crate) fn file_json(
    host: &str,
    id: &str,
    display_name: Option<&str>,
    mime: &str,
    size: u64,
    wrapped: bool,
) -> serde_json::Result<Vec<u8>> {
    let now = wire::unix_now();
    let created = wire::rfc3339(now, 0);
    // Files are kept 48 h by the real API.
    let expires = wire::rfc3339(now + 48 * 3600, 0);
    let name = format!("files/{id}");
    let uri = format!("http://{host}/v1beta/files/{id}");
    let file = wire::FileObject {
        name: &name,
        display_name,
        mime_type: mime,
        size_bytes: size.to_string(),
        create_time: &created,
        update_time: &created,
        expiration_time: &expires,
        uri: &uri,
        state: "ACTIVE",
        source: "UPLOADED",
    };
    let mut out = Vec::with_capacity(512);
    if wrapped {
        wire::write_pretty_json(&mut out, &wire::FileEnvelope { file })?;
    } else {
        wire::write_pretty_json(&mut out, &file)?;
    }
    Ok(out)
}
