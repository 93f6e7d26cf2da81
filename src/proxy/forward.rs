//! Forwarding one proxied request: identify, admit, rewrite, send, meter, settle.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use super::body::{CountingBody, ProxyBody, RequestTally};
use super::headers::{caller_key, strip_hop_by_hop, strip_key_param, take_tags};
use super::route::{Route, classify};
use super::upload::rewrite_upload_url;
use crate::admission::{Admitted, Ask, admit};
use crate::app::App;
use crate::clock::Month;
use crate::error::ApiError;
use crate::identity::{KeyEntry, User};
use crate::ledger::{Record, RecordKind};
use crate::metering::observer::{Meter, MeteredBody, settle_unanswered};
use crate::metering::scan::{Format, TextCounter};
use crate::metrics::route_index;

/// The header the upstream key goes in (a constant: `from_static` validates on every call).
const GOOG_API_KEY: header::HeaderName = header::HeaderName::from_static("x-goog-api-key");

/// Forwards a proxied request; every failure becomes a Gemini error envelope.
pub async fn forward(app: Arc<App>, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut route_idx = route_index("other");
    let resp = match forward_inner(&app, req, &mut route_idx).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() {
                app.metrics.refusal(e.label);
            }
            e.into_response()
        }
    };
    app.metrics.request(route_idx, resp.status().as_u16());
    resp
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// A metered request between admission and the upstream's answer. If it is dropped there (the
/// client left while the upstream was still thinking), the reserved message is given back and
/// what was sent is recorded, estimated.
struct Pending {
    app: Arc<App>,
    key: KeyEntry,
    model: String,
    month: Month,
    at: DateTime<Utc>,
    reserved: bool,
    tags: Option<Map<String, Value>>,
    prompt_chars: Arc<AtomicU64>,
    started: Instant,
    armed: bool,
}

impl Pending {
    fn message_record(&self, user: &User, messages: u64, status: &str, upstream_status: Option<u16>) -> Record {
        let rt = self.app.live.load();
        let mut md = Map::new();
        md.insert("model".into(), self.model.clone().into());
        md.insert("status".into(), status.into());
        if let Some(s) = upstream_status {
            md.insert("upstream_status".into(), s.into());
        }
        md.insert("key_id".into(), self.app.registry.key_id(self.key).into());
        if let Some(t) = &self.tags {
            md.insert("tags".into(), Value::Object(t.clone()));
        }
        Record {
            id: self.app.ids.next(self.at),
            user_id: user.id_arc(),
            kind: RecordKind::MessageSent,
            tokens: 0,
            messages,
            bytes: 0,
            cost: if messages > 0 {
                rt.config.pricing.message_sent
            } else {
                Default::default()
            },
            metadata: md,
            created_at: self.at,
        }
    }

    fn meter(&mut self, upstream_status: u16, format: Format) -> Meter {
        Meter {
            app: self.app.clone(),
            key: self.key,
            model: self.model.clone(),
            format,
            upstream_status,
            tags: self.tags.take(),
            prompt_chars: self.prompt_chars.clone(),
            started: self.started,
            admitted_at: self.at,
        }
    }

    /// The upstream answered: the message counts if it answered with success.
    fn responded(mut self, status: StatusCode, format: Format) -> Meter {
        self.armed = false;
        let ok = status.is_success();
        if let Some(user) = self.app.registry.user_of(self.key) {
            if !ok && self.reserved {
                user.usage.release(self.month);
            }
            let status_label = if ok { "ok" } else { "upstream_error" };
            let rec = self.message_record(user, u64::from(ok), status_label, Some(status.as_u16()));
            self.app.settle_record(user, rec, ok && self.reserved);
        }
        self.meter(status.as_u16(), format)
    }

    /// The upstream could not be reached: the message is given back, the attempt recorded.
    fn failed(mut self, status: StatusCode) {
        self.armed = false;
        if let Some(user) = self.app.registry.user_of(self.key) {
            if self.reserved {
                user.usage.release(self.month);
            }
            let rec = self.message_record(user, 0, "upstream_unavailable", Some(status.as_u16()));
            self.app.settle_record(user, rec, false);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(user) = self.app.registry.user_of(self.key) {
            if self.reserved {
                user.usage.release(self.month);
            }
            let rec = self.message_record(user, 0, "client_closed", None);
            self.app.settle_record(user, rec, false);
        }
        let meter = self.meter(0, Format::UnaryJson);
        settle_unanswered(meter);
    }
}

async fn forward_inner(
    app: &Arc<App>,
    req: Request<Incoming>,
    route_idx: &mut usize,
) -> Result<Response<ProxyBody>, ApiError> {
    let started = Instant::now();
    let rt = app.live.load();
    let (mut parts, body) = req.into_parts();
    // A clone shares the URI's bytes: path and query are borrowed from it, not copied.
    let uri_in = parts.uri.clone();
    let (path, query) = (uri_in.path(), uri_in.query());
    let route = classify(&parts.method, path, query, &parts.headers);
    *route_idx = route_index(match &route {
        Route::Generate { stream: false, .. } => "generate",
        Route::Generate { stream: true, .. } => "stream",
        Route::OpenAiChat => "openai",
        Route::UploadStart { .. } | Route::UploadChunk { .. } | Route::UploadOther => "upload",
        Route::Other { .. } => "other",
    });
    let max = rt.config.server.max_request_bytes;
    if content_length(&parts.headers).is_some_and(|n| n > max) {
        return Err(ApiError::too_large(max));
    }

    // Who is calling. Chunks of a session started here belong to the key that started it.
    let presented = caller_key(&parts.headers, query);
    let mut session_chunk = false;
    let key = match &route {
        Route::UploadChunk { upload_id } => match app.uploads.get(upload_id, &app.registry) {
            Some(s) if app.registry.key_active(s.key) => {
                session_chunk = true;
                s.key
            }
            Some(_) => return Err(ApiError::invalid_key()),
            None => identify(app, presented.as_ref().map(|p| p.0.as_ref()))?,
        },
        _ => identify(app, presented.as_ref().map(|p| p.0.as_ref()))?,
    };
    let user = app.registry.user_of(key).ok_or_else(ApiError::invalid_key)?;
    let tags = take_tags(&mut parts.headers);
    // Only an upload's start needs it (to rewrite the session URL).
    let gateway_base =
        matches!(route, Route::UploadStart { .. }).then(|| gateway_base(&rt.config.server.public_url, &parts));

    // The OpenAI-compatible endpoint names its model in the body: read it (bounded).
    let tally = Arc::new(RequestTally::default());
    let mut openai: Option<(String, bool)> = None;
    let upstream_body = if route == Route::OpenAiChat {
        let bytes = match Limited::new(body, max as usize).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(ApiError::too_large(max)),
            Err(_) => return Err(ApiError::bad_request("The request body could not be read.")),
        };
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
        let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
        let model = model.strip_prefix("models/").unwrap_or(model).to_string();
        if model.is_empty() {
            return Err(ApiError::bad_request("The request body names no model."));
        }
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let mut tc = TextCounter::new();
        tc.feed(&bytes);
        tally.text_chars.store(tc.chars(), Ordering::Relaxed);
        tally.bytes.store(bytes.len() as u64, Ordering::Relaxed);
        openai = Some((model, stream));
        ProxyBody::full(bytes)
    } else {
        let count_text = matches!(route, Route::Generate { .. });
        ProxyBody::stream(CountingBody::new(body, tally.clone(), max, count_text))
    };

    // Admission: nothing goes upstream before this passes.
    let now = app.clock.now();
    let model: Option<&str> = match (&route, &openai) {
        (Route::Generate { model, .. }, _) => Some(model),
        (_, Some((m, _))) => Some(m),
        _ => None,
    };
    let ask = match &route {
        Route::Generate { model, .. } => Ask::Generate { model },
        Route::OpenAiChat => Ask::Generate {
            model: model.unwrap_or_default(),
        },
        Route::UploadStart { declared } => Ask::UploadStart { declared: *declared },
        Route::UploadChunk { .. } | Route::UploadOther => Ask::UploadBytes,
        Route::Other { model } => Ask::Other {
            model: model.as_deref(),
        },
    };
    // Chunks of an admitted session are not refused halfway (size was checked at start).
    let admitted = if session_chunk {
        Admitted {
            month: Month::of(now),
            at: now,
            reserved_message: false,
            quota: None,
        }
    } else {
        admit(&rt, user, key, &ask, now)?
    };
    let mut pending = model.filter(|_| matches!(ask, Ask::Generate { .. })).map(|m| Pending {
        app: app.clone(),
        key,
        model: m.to_string(),
        month: admitted.month,
        at: admitted.at,
        reserved: admitted.reserved_message,
        tags: tags.clone(),
        prompt_chars: tally.text_chars.clone(),
        started,
        armed: true,
    });

    // Rewrite: upstream URI, the real key instead of the caller's, no hop-by-hop headers.
    let uri = upstream_uri(&rt.config.upstream.base_url, path, query)?;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::AUTHORIZATION);
    let bad_key = || ApiError::internal("The upstream key is not a valid header value.");
    let upstream_key = rt.upstream_headers.key.clone().ok_or_else(bad_key)?;
    if openai.is_some() {
        let bearer = rt.upstream_headers.bearer.clone().ok_or_else(bad_key)?;
        parts.headers.insert(header::AUTHORIZATION, bearer);
    }
    parts.headers.insert(GOOG_API_KEY, upstream_key);
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let up_req = Request::from_parts(parts, upstream_body);

    let sent_at = Instant::now();
    let fut = app.upstream.request(up_req);
    let result = match rt.config.upstream.read_timeout {
        Some(d) => match tokio::time::timeout(d, fut).await {
            Ok(r) => r,
            Err(_) => {
                if let Some(p) = pending.take() {
                    p.failed(StatusCode::GATEWAY_TIMEOUT);
                }
                return Err(ApiError::upstream_timeout());
            }
        },
        None => fut.await,
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if tally.too_large.load(Ordering::Relaxed) {
                if let Some(mut p) = pending.take() {
                    // Refused by us, not the upstream: give the message back, record nothing.
                    p.armed = false;
                    if p.reserved {
                        user.usage.release(p.month);
                    }
                }
                return Err(ApiError::too_large(max));
            }
            let err = upstream_error(&e);
            tracing::warn!(error = %err.message, "upstream request failed");
            if let Some(p) = pending.take() {
                p.failed(err.status);
            }
            return Err(err);
        }
    };

    app.metrics.upstream_latency.observe(sent_at.elapsed());
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    // Browsers would try HTTP/3 on our host otherwise.
    rparts.headers.remove(header::ALT_SVC);
    for (n, v) in admitted.quota_headers(&rt) {
        rparts.headers.insert(n, v);
    }
    let status = rparts.status;
    let body = match route {
        Route::Generate { .. } | Route::OpenAiChat if pending.is_some() => {
            let is_openai = openai.is_some();
            let sse = rparts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let stream = matches!(route, Route::Generate { stream: true, .. }) || openai.as_ref().is_some_and(|o| o.1);
            let format = match (is_openai, status.is_success() && (stream || sse), sse) {
                (true, true, _) => Format::OpenAiSse,
                (true, false, _) => Format::OpenAiJson,
                (false, true, true) => Format::Sse,
                (false, true, false) => Format::JsonArray,
                (false, false, _) => Format::UnaryJson,
            };
            let ce = rparts
                .headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let meter = match pending.take() {
                Some(p) => p.responded(status, format),
                None => return Err(ApiError::internal("metering state lost")),
            };
            ProxyBody::stream(MeteredBody::new(rbody, ce.as_deref(), meter))
        }
        Route::UploadStart { declared } => {
            if status.is_success()
                && let Some(url) = rparts
                    .headers
                    .get("x-goog-upload-url")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            {
                if let Some(id) = url
                    .split_once('?')
                    .and_then(|(_, q)| super::headers::query_param(q, "upload_id"))
                {
                    app.uploads.insert(id, key, declared, &app.registry);
                }
                let prefix = rt.config.upstream.base_url.path();
                if let Some(base) = &gateway_base
                    && let Some(new) = rewrite_upload_url(&url, base, prefix)
                    && let Ok(v) = HeaderValue::from_str(&new)
                {
                    rparts.headers.insert("x-goog-upload-url", v);
                }
            }
            ProxyBody::stream(rbody)
        }
        Route::UploadChunk { ref upload_id } => {
            super::upload::record_upload(app, key, &rparts, &tally, tags, Some(upload_id));
            if rparts.headers.get("x-goog-upload-status").and_then(|v| v.to_str().ok()) == Some("final") {
                app.uploads.remove(upload_id);
            }
            ProxyBody::stream(rbody)
        }
        Route::UploadOther => {
            super::upload::record_upload(app, key, &rparts, &tally, tags, None);
            ProxyBody::stream(rbody)
        }
        _ => ProxyBody::stream(rbody),
    };
    Ok(Response::from_parts(rparts, body))
}

fn identify(app: &App, key: Option<&str>) -> Result<KeyEntry, ApiError> {
    let key = key.ok_or_else(ApiError::missing_key)?;
    app.registry.identify(key).ok_or_else(ApiError::invalid_key)
}

/// The base URL callers reach the gateway at.
fn gateway_base(public_url: &Option<String>, parts: &http::request::Parts) -> String {
    if let Some(p) = public_url {
        return p.clone();
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    format!("http://{host}")
}

fn upstream_uri(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, ApiError> {
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let prefix = base.path().trim_end_matches('/');
    let mut s = String::with_capacity(scheme.len() + authority.len() + prefix.len() + path.len() + 64);
    s.push_str(scheme);
    s.push_str("://");
    s.push_str(authority);
    s.push_str(prefix);
    s.push_str(path);
    if let Some(q) = query {
        let q = strip_key_param(q);
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q);
        }
    }
    s.parse()
        .map_err(|_| ApiError::bad_request("The request path is not valid."))
}

fn upstream_error(e: &super::client::Error) -> ApiError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut timed_out = false;
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            timed_out = true;
        }
        if s.to_string().contains("timed out") {
            timed_out = true;
        }
        src = s.source();
    }
    if timed_out {
        ApiError::upstream_timeout()
    } else if e.is_connect() {
        ApiError::upstream_unavailable("could not connect to the upstream API.")
    } else {
        ApiError::upstream_unavailable("the upstream connection failed before it answered.")
    }
}
