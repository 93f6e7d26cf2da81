//! The built-in mock of the Gemini API upstream (`gemini-meter mock-upstream`, the demo, the
//! integration tests and the load tests).
//!
//! It owns: a fake `generativelanguage.googleapis.com` that speaks the real wire format
//! (gemini-wire.md: unary, SSE and JSON-array streams, OpenAI compat, countTokens, models,
//! files, resumable uploads, Google's error envelopes) with deterministic usage, failure
//! injection by model id, and counters that show what reached it.
//!
//! It must not: log per request, take a lock on the generate path beyond one push onto the
//! request log (resource state is locked only by resource routes), or store API keys. It is
//! the baseline of the gateway's load tests, so it stays cheap.
//!
//! Stateful resources (in memory, per mock instance; under any of `v1beta`, `v1`, `v1alpha`;
//! API key required; pretty JSON, `application/json; charset=UTF-8`; lists are newest first,
//! `pageSize` default 10, max 100, `pageToken` / `nextPageToken`, an empty page is exactly `{}`):
//! - Files: the final chunk of a resumable upload, or a single-shot `POST /upload/{v}/files`
//!   (`X-Goog-Upload-Command: upload, finalize` or protocol `raw`, raw bytes as the body),
//!   creates `files/{id}` (12 lowercase alphanumerics) and answers `{"file": {..}}`.
//!   `GET files`, `GET files/{id}`, `DELETE files/{id}` (`{}`), `GET files/{id}:download` (the
//!   bytes, kept up to 64 MiB per file and 1 GiB in all). Missing: 403 PERMISSION_DENIED "You do
//!   not have permission to access the File {id} or it may not exist."
//! - cachedContents: `POST cachedContents` (model required; `ttl` "3600s" or `expireTime`,
//!   default 1 h; usage totalTokenCount = max(1, ceil(body bytes / 4))), `GET cachedContents`,
//!   `GET`/`PATCH`/`DELETE cachedContents/{id}`; gone after expireTime. Missing: 403
//!   PERMISSION_DENIED "CachedContent not found (or permission denied)".
//! - Batches: `POST models/{m}:batchGenerateContent` / `:asyncBatchEmbedContent` (inlined
//!   requests, or `inputConfig.fileName` naming an uploaded JSONL file of `{"key","request"}`
//!   lines) creates `batches/{id}` in BATCH_STATE_PENDING; the first `GET batches/{id}` answers
//!   RUNNING, later ones SUCCEEDED with `done: true` and `response` (also `metadata.output`):
//!   inlined responses with usage by the prompt rule over each request's compact JSON, or a
//!   generated `responsesFile` (JSONL). `GET batches` (`operations`), `POST batches/{id}:cancel`
//!   (`{}`, CANCELLED), `DELETE batches/{id}` (`{}`). Missing: 404 NOT_FOUND.
//! - Operations: `POST models/{m}:predictLongRunning` (Veo) answers `{"name":
//!   "models/{m}/operations/{id}"}`. Every operation (Veo, tuning, file search) answers its
//!   first poll unfinished and later ones `done: true` with its `response` (Veo: a
//!   PredictLongRunningResponse whose `parameters.sampleCount` videos, default 1, are real
//!   generated files at `.../files/{id}:download?alt=media`). `GET {parent}/operations/{id}`,
//!   `GET operations/{id}`, `GET operations` (`operations`). Missing: 404 NOT_FOUND.
//! - tunedModels: `POST tunedModels[?tunedModelId=]` answers the operation
//!   `tunedModels/{id}/operations/{op}` (CreateTunedModelMetadata, totalSteps =
//!   ceil(examples × epochCount / batchSize), defaults 5 and 4); the model is CREATING until
//!   the operation finishes (polling the model polls it too), then ACTIVE. `GET`/`DELETE
//!   tunedModels/{id}`, `GET tunedModels` (`tunedModels`); `tunedModels/{id}:generateContent`
//!   and `:streamGenerateContent` are the models' generate. Missing: 404 NOT_FOUND.
//! - fileSearchStores: `POST fileSearchStores`, `GET fileSearchStores` (`fileSearchStores`),
//!   `GET`/`DELETE fileSearchStores/{id}` (a store with documents needs `?force=true`);
//!   `POST fileSearchStores/{id}:importFile` `{"fileName": "files/x"}` answers the operation
//!   `fileSearchStores/{id}/operations/{op}`; `POST /upload/{v}/fileSearchStores/
//!   {id}:uploadToFileSearchStore` (single shot with raw bytes, or a resumable `start` whose
//!   session URL takes the chunks) answers `fileSearchStores/{id}/upload/operations/{op}`
//!   (from the final chunk when resumable); each adds a document: `GET {store}/documents`
//!   (`documents`), `GET`/`DELETE {store}/documents/{d}`. Missing: 404 NOT_FOUND.
//!
//! Billable methods the gateway refuses by default (stateless, deterministic, never counted as
//! generate requests): `models/{m}:embedContent` (`{"embedding": {"values": [8 floats]}}`),
//! `:batchEmbedContents` (one embedding per request, no usage), `:predict` (Imagen,
//! `parameters.sampleCount` PNGs, default 4), `POST openai/embeddings` (OpenAI list with
//! `usage.prompt_tokens` by the prompt rule), `POST openai/images/generations` (`n` images).
//!
//! Test routes (not logged, not counted): `GET /mock/stats`; `GET /mock/requests`, the last
//! 10,000 other requests as `[{"method","path","query"}]` (query `""` when absent, the value
//! of `key=` replaced by `REDACTED`); `POST /mock/reset` zeroes the stats and clears the log
//! (resources are kept).
//!
//! Deterministic usage: prompt = max(1, ceil(request body bytes / 4)); each of `chunks` pieces
//! is the text `"lorem ipsum "` worth 3 output tokens; thoughts = 7 when the model id contains
//! "thinking"; total = prompt + candidates + thoughts; nothing is cached.
//!
//! Failure injection by model id: `error-500`, `error-503`, `error-429`, `error-400`,
//! `midstream-error`, `cut`, `final-usage-only`, `gzip-always`, `slow` (see [`MockOptions`]).

#![forbid(unsafe_code)]

mod batches;
mod billable;
mod body;
mod caches;
mod files;
mod generate;
mod ops;
mod resources;
mod search;
mod store;
#[cfg(test)]
mod tests;
mod tuned;
mod upload;
mod wire;

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALT_SVC, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HOST, SERVER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use body::MockBody;
use generate::{count_tokens, generate, openai_chat};

/// Pause between events for the `slow` model, whatever `chunk_interval` says.
const SLOW_INTERVAL: Duration = Duration::from_millis(200);
/// Largest JSON body the mock buffers (OpenAI compat); inline media can reach ~100 MB.
const MAX_JSON_BODY: usize = 160 << 20;
const JSON: &str = "application/json; charset=UTF-8";

/// Options of the mock upstream (mirrors `gemini-meter mock-upstream` flags).
///
/// Model ids with a special meaning: `error-500`, `error-503`, `error-429`, `error-400` answer
/// that status with Google's envelope; `midstream-error` streams 2 events then an error object;
/// `cut` streams 2 events then aborts the body; `final-usage-only` streams with LF endings and
/// usage on the last event only; `gzip-always` gzips the answer; `slow` waits 200 ms between
/// events. A model id containing `thinking` reports 7 thoughts tokens. Usage honours the
/// request's output cap: thoughts are at most `thinkingBudget`, thoughts plus candidates at most
/// `maxOutputTokens` (OpenAI: `max_completion_tokens` / `max_tokens`).
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Delay before the response headers of generate calls (time to first byte).
    pub ttfb: Duration,
    /// Number of text pieces per answer (streamed events); 0 is treated as 1.
    pub chunks: u32,
    /// Gap between streamed events.
    pub chunk_interval: Duration,
    /// The only accepted API key; `None` accepts any non-empty key.
    pub api_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            ttfb: Duration::ZERO,
            chunks: 5,
            chunk_interval: Duration::ZERO,
            api_key: None,
        }
    }
}

/// Counters the mock keeps so tests can see what reached it (also at `GET /mock/stats`,
/// zeroed by `POST /mock/reset`). `/mock/*` requests themselves are not counted.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Every request outside `/mock/*`.
    pub requests: AtomicU64,
    /// Authenticated generateContent, streamGenerateContent and OpenAI chat calls.
    pub generate_requests: AtomicU64,
    /// Stream bodies handed to the server.
    pub streams_started: AtomicU64,
    /// Streams whose last byte was handed to the server (midstream-error included).
    pub streams_completed: AtomicU64,
    /// Streams whose body was dropped before its end: the client (or gateway) went away.
    /// A `cut` stream is neither completed nor cancelled.
    pub streams_cancelled: AtomicU64,
    /// Bytes accepted by upload chunk requests.
    pub upload_bytes: AtomicU64,
    /// Requests where a header value or the query held a token starting with `gm_`
    /// (a gateway-issued key that leaked upstream).
    pub leaked_gateway_keys: AtomicU64,
    /// The output cap (`generationConfig.maxOutputTokens`, OpenAI `max_tokens` /
    /// `max_completion_tokens`) of every generate call that set one, in arrival order.
    pub output_caps: std::sync::Mutex<Vec<u64>>,
}

impl MockStats {
    fn fields(&self) -> [(&'static str, &AtomicU64); 7] {
        [
            ("requests", &self.requests),
            ("generate_requests", &self.generate_requests),
            ("streams_started", &self.streams_started),
            ("streams_completed", &self.streams_completed),
            ("streams_cancelled", &self.streams_cancelled),
            ("upload_bytes", &self.upload_bytes),
            ("leaked_gateway_keys", &self.leaked_gateway_keys),
        ]
    }

    /// All counters as a JSON object keyed by field name.
    pub fn snapshot(&self) -> serde_json::Value {
        let map = self
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v.load(Relaxed))))
            .collect();
        serde_json::Value::Object(map)
    }

    /// Sets every counter to zero.
    pub fn reset(&self) {
        for (_, v) in self.fields() {
            v.store(0, Relaxed);
        }
    }
}

/// A running mock; dropping it (or [`MockServer::shutdown`]) stops the listener and closes
/// every connection.
#[derive(Debug)]
pub struct MockServer {
    /// The bound address (the real port when started on port 0).
    pub addr: SocketAddr,
    /// The live counters.
    pub stats: Arc<MockStats>,
    // Dropping the sender tells every connection task to close.
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Binds `addr` (use 127.0.0.1:0 in tests) and serves in a spawned tokio task until the
    /// handle is dropped or `shutdown()` is called.
    ///
    /// # Errors
    /// When the address cannot be bound. Must be called within a tokio runtime.
    pub async fn start(addr: SocketAddr, opts: MockOptions) -> io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts)?);
        let stats = shared.stats.clone();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared, rx));
        Ok(MockServer {
            addr,
            stats,
            shutdown: tx,
            task,
        })
    }

    /// Stops the mock (same as dropping the handle).
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

/// Runs the mock on an already-bound listener until the process ends (used by the CLI
/// `mock-upstream`).
///
/// # Errors
/// Only if the static bodies cannot be built; accept errors are retried, never returned.
pub async fn serve(listener: TcpListener, opts: MockOptions) -> io::Result<()> {
    let shared = Arc::new(Shared::new(opts)?);
    // Kept alive for as long as the accept loop runs, so connections are never told to stop.
    let (_tx, rx) = watch::channel(false);
    accept_loop(listener, shared, rx).await;
    Ok(())
}

/// State shared by all connections; read-only except for atomics, upload sessions, the
/// request log and the resources.
struct Shared {
    opts: MockOptions,
    chunks: u32,
    stats: Arc<MockStats>,
    // Pre-built bodies and texts.
    unary_text: String,
    models_list: Bytes,
    uploads: upload::Sessions,
    resources: resources::Resources,
}

impl Shared {
    fn new(opts: MockOptions) -> io::Result<Self> {
        let chunks = opts.chunks.max(1);
        let models = wire::ModelList {
            models: [
                ("models/gemini-2.5-flash", "Gemini 2.5 Flash"),
                ("models/gemini-2.5-pro", "Gemini 2.5 Pro"),
                ("models/gemini-2.5-flash-lite", "Gemini 2.5 Flash-Lite"),
            ]
            .into_iter()
            .map(|(n, d)| wire::Model::new(n, d))
            .collect(),
        };
        let models_list = serde_json::to_vec_pretty(&models).map_err(io::Error::other)?;
        Ok(Shared {
            unary_text: wire::PIECE.repeat(chunks as usize),
            chunks,
            opts,
            stats: Arc::new(MockStats::default()),
            models_list: Bytes::from(models_list),
            uploads: upload::Sessions::default(),
            resources: resources::Resources::default(),
        })
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; not per request.
                tracing::warn!(error = %e, "mock upstream: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Events must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                res = conn => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "mock upstream: connection ended with an error");
                    }
                }
                _ = shutdown.changed() => {}
            }
        });
    }
}

/// A parsed request target, owned so that the request can be consumed afterwards.
enum Route {
    Generate { model: String, stream: bool },
    CountTokens { model: String },
    OpenAiChat,
    ListModels,
    GetModel { name: String, id: String },
    Resource(resources::Call),
    UploadStart,
    UploadChunk { upload_id: String },
    NotFound,
}

fn is_version(v: &str) -> bool {
    matches!(v, "v1" | "v1beta" | "v1alpha")
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', ':'])
}

fn parse_route(method: &Method, path: &str, query: Option<&str>) -> Route {
    if let Some(rest) = path.strip_prefix("/upload/") {
        return match rest.split_once('/') {
            // The session URL of a files or a file search store upload.
            Some((v, _)) if is_version(v) && method == Method::POST && query_param(query, "upload_id").is_some() => {
                Route::UploadChunk {
                    upload_id: query_param(query, "upload_id").unwrap_or_default().to_owned(),
                }
            }
            Some((v, "files")) if is_version(v) && method == Method::POST => Route::UploadStart,
            Some((v, rest)) if is_version(v) => match resources::parse_upload(method, rest) {
                Some(call) => Route::Resource(call),
                None => Route::NotFound,
            },
            _ => Route::NotFound,
        };
    }
    let Some((v, rest)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Route::NotFound;
    };
    if !is_version(v) {
        return Route::NotFound;
    }
    match (method, rest) {
        (&Method::POST, "openai/chat/completions") => return Route::OpenAiChat,
        (&Method::GET, "models") => return Route::ListModels,
        _ => {}
    }
    if let Some(call) = resources::parse(method, rest) {
        return Route::Resource(call);
    }
    let Some((collection, target)) = rest.split_once('/') else {
        return Route::NotFound;
    };
    if collection != "models" && collection != "tunedModels" {
        return Route::NotFound;
    }
    match (method, target.split_once(':')) {
        (&Method::GET, None) if is_id(target) => Route::GetModel {
            name: rest.to_owned(),
            id: target.to_owned(),
        },
        (&Method::POST, Some((id, verb))) if is_id(id) => {
            let model = id.to_owned();
            match verb {
                "generateContent" => Route::Generate { model, stream: false },
                "streamGenerateContent" => Route::Generate { model, stream: true },
                "countTokens" => Route::CountTokens { model },
                _ => Route::NotFound,
            }
        }
        _ => Route::NotFound,
    }
}

/// The first value of `name` in a raw query string (no percent-decoding: keys, ids and
/// `alt` values are plain).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<MockBody>, Infallible> {
    if let Some(admin) = req.uri().path().strip_prefix("/mock/") {
        return Ok(admin_route(&shared, req.method(), admin));
    }
    shared.stats.requests.fetch_add(1, Relaxed);
    shared.resources.log.push(req.method(), req.uri());
    if leaks_gateway_key(&req) {
        shared.stats.leaked_gateway_keys.fetch_add(1, Relaxed);
    }
    let route = parse_route(req.method(), req.uri().path(), req.uri().query());
    let mut resp = match route {
        Route::Generate { model, stream } => generate(&shared, req, model, stream).await,
        Route::CountTokens { model } => count_tokens(&shared, req, &model).await,
        Route::OpenAiChat => openai_chat(&shared, req).await,
        Route::ListModels => match reject_native(&shared, &req) {
            None => json(StatusCode::OK, shared.models_list.clone()),
            Some(r) => r,
        },
        Route::GetModel { name, id } => match reject_native(&shared, &req) {
            None => match serde_json::to_vec_pretty(&wire::Model::new(&name, &id)) {
                Ok(b) => json(StatusCode::OK, b),
                Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
            },
            Some(r) => r,
        },
        Route::Resource(call) => resources::handle(&shared, req, call).await,
        Route::UploadStart => match reject_native(&shared, &req) {
            None if upload::is_single_shot(req.headers()) => upload::single_shot(&shared, req).await,
            None => upload::start(&shared, req, upload::Target::File).await,
            Some(r) => r,
        },
        Route::UploadChunk { upload_id } => upload::chunk(&shared, req, &upload_id).await,
        Route::NotFound => error_json(StatusCode::NOT_FOUND, wire::ERR_NOT_FOUND),
    };
    // What Google's front end adds; alt-svc lets gateway tests check that it is stripped.
    let h = resp.headers_mut();
    h.insert(SERVER, HeaderValue::from_static("scaffolding on HTTPServer2"));
    h.insert(
        ALT_SVC,
        HeaderValue::from_static("h3=\":443\"; ma=2592000,h3-29=\":443\"; ma=2592000"),
    );
    Ok(resp)
}

fn admin_route(shared: &Shared, method: &Method, path: &str) -> Response<MockBody> {
    match (method, path) {
        (&Method::GET, "stats") => match serde_json::to_vec_pretty(&shared.stats.snapshot()) {
            Ok(b) => json(StatusCode::OK, b),
            Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
        },
        (&Method::GET, "requests") => shared.resources.log.response(),
        (&Method::POST, "reset") => {
            shared.stats.reset();
            shared.resources.log.clear();
            json(StatusCode::OK, Bytes::from_static(b"{}"))
        }
        _ => error_json(StatusCode::NOT_FOUND, wire::ERR_NOT_FOUND),
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication

fn non_empty(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|v| !v.is_empty())
}

/// The API key of a native call: `x-goog-api-key`, else `?key=`.
fn native_key<B>(req: &Request<B>) -> Option<&str> {
    non_empty(req.headers().get("x-goog-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| non_empty(query_param(req.uri().query(), "key")))
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        non_empty(Some(token))
    } else {
        None
    }
}

/// The rejection of a call with this key, if any.
fn reject_key(shared: &Shared, key: Option<&str>) -> Option<Response<MockBody>> {
    match (key, shared.opts.api_key.as_deref()) {
        (None, _) => Some(error_json(StatusCode::FORBIDDEN, wire::ERR_UNREGISTERED)),
        (Some(k), Some(expected)) if k != expected => Some(error_json(StatusCode::BAD_REQUEST, wire::ERR_KEY_INVALID)),
        _ => None,
    }
}

/// Native paths take the key from `x-goog-api-key` or `?key=`. A Bearer token alone is an
/// OAuth attempt, which the real API rejects with 401 for an API key.
fn reject_native<B>(shared: &Shared, req: &Request<B>) -> Option<Response<MockBody>> {
    let key = native_key(req);
    if key.is_none() && bearer(req.headers()).is_some() {
        return Some(error_json(StatusCode::UNAUTHORIZED, wire::ERR_OAUTH_EXPECTED));
    }
    reject_key(shared, key)
}

/// The OpenAI-compat endpoint takes `Authorization: Bearer KEY` (or the native forms).
fn reject_openai<B>(shared: &Shared, req: &Request<B>) -> Option<Response<MockBody>> {
    reject_key(shared, bearer(req.headers()).or_else(|| native_key(req)))
}

/// True when a header value or the query holds a token that starts with `gm_`.
fn leaks_gateway_key<B>(req: &Request<B>) -> bool {
    req.headers().values().any(|v| has_gm_token(v.as_bytes()))
        || req.uri().query().is_some_and(|q| has_gm_token(q.as_bytes()))
}

fn has_gm_token(s: &[u8]) -> bool {
    s.windows(3)
        .enumerate()
        .any(|(i, w)| w == b"gm_" && (i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_')))
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared with `generate` and `upload`

/// A JSON response.
fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut r = Response::new(MockBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

/// A Google error envelope (a static body: no allocation).
fn error_json(status: StatusCode, body: &'static str) -> Response<MockBody> {
    json(status, Bytes::from_static(body.as_bytes()))
}

/// A 200 JSON response, gzipped when asked.
fn json_gz(body: Vec<u8>, gzip: bool) -> Response<MockBody> {
    if !gzip {
        return json(StatusCode::OK, body);
    }
    match body::gzip_all(&body) {
        Ok(gz) => {
            let mut r = json(StatusCode::OK, gz);
            r.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }
        Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
    }
}

/// Reads and discards a request body, returning its length (the prompt-token formula needs
/// only the size, so nothing is buffered).
async fn count_body(mut body: Incoming) -> Result<u64, ()> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.map_err(|_| ())?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

/// Why a request body could not be buffered.
#[derive(Debug, Clone, Copy)]
enum ReadError {
    TooLarge,
    Broken,
}

impl ReadError {
    fn response(self) -> Response<MockBody> {
        match self {
            ReadError::TooLarge => error_json(StatusCode::PAYLOAD_TOO_LARGE, wire::ERR_TOO_LARGE),
            ReadError::Broken => error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST),
        }
    }
}

/// Buffers a request body of at most `limit` bytes.
async fn read_all(mut body: Incoming, limit: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ReadError::Broken)?;
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > limit {
                return Err(ReadError::TooLarge);
            }
            out.extend_from_slice(d);
        }
    }
    Ok(out)
}

/// The authority the client used (Host header, or the h2 `:authority`).
fn request_host<B>(req: &Request<B>) -> String {
    req.headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
        .filter(|h| !h.is_empty())
        .unwrap_or("localhost")
        .to_owned()
}

/// A random-looking base62 id (not cryptographic: upload ids of a local mock).
fn random_id(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::with_capacity(len);
    while out.len() < len {
        // RandomState gives fresh random keys per process and thread; the counter makes each
        // draw distinct.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Relaxed));
        let mut x = h.finish();
        for _ in 0..10 {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[(x % 62) as usize]));
            x /= 62;
        }
    }
    out
}
