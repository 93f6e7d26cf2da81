//! The proxy's side of the route policy and of resource ownership: refuse what the table does
//! not allow, answer "not found" for resources the caller does not own, guard request bodies
//! against references to them, answer lists from the ownership index, and record what the
//! upstream creates (before the caller learns its name) and forget what it deletes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};

use super::Proxy;
use super::body::{BoxError, ProxyBody, RequestTally};
use super::client::UpstreamBody;
use super::headers::query_param;
use crate::error::ApiError;
use crate::identity::{KeyEntry, Registry};
use crate::ownership::references::{RefScanner, required};
use crate::ownership::{Kind, Owners, resource_of};
use crate::policy::{Access, Decision, Denial, Target, decide};
use crate::runtime::Runtime;

/// Largest answer of a create call read to learn the new resource's name.
const MAX_CREATED_BODY: usize = 4 << 20;
/// Default and largest `pageSize` of lists (Gemini's for files).
const DEFAULT_PAGE: usize = 10;
const MAX_PAGE: usize = 100;

/// Gemini's answer for a resource of `kind` that does not exist: the same whether it never
/// existed or belongs to someone else, so ownership cannot be probed.
pub fn not_found(kind: Kind, name: &str) -> ApiError {
    match kind {
        Kind::File => {
            let id = name.rsplit('/').next().unwrap_or(name).trim_start_matches('\u{fffd}');
            ApiError::new(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "not_owned",
                format!("You do not have permission to access the File {id} or it may not exist."),
            )
        }
        Kind::CachedContent => ApiError::new(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "not_owned",
            "CachedContent not found (or permission denied)",
        ),
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "not_owned",
            "Requested entity was not found.",
        ),
    }
}

/// 403 for a method the policy refuses.
fn denied(d: &Denial) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "PERMISSION_DENIED", "route_denied", d.message())
}

/// The policy's decision on a canonical path, or the refusal.
pub fn decision(rt: &Runtime, method: &Method, path: &str) -> Result<Decision, ApiError> {
    if path.starts_with("/ws/") {
        return Err(denied(&Denial::Live));
    }
    let target = Target::of(path).ok_or_else(|| denied(&Denial::Unknown(format!("{method} {path}"))))?;
    decide(method, &target, &rt.config.routes.allow_unmetered).map_err(|d| denied(&d))
}

/// Headers that would make the upstream run another method than the one the policy judged.
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// A request the policy allowed must also be what the upstream will act on: no method
/// override, and a body that can name resources must be JSON (the only form the reference
/// scanner reads).
pub fn screen(headers: &http::HeaderMap, query: Option<&str>, d: &Decision) -> Result<(), ApiError> {
    if METHOD_OVERRIDES.iter().any(|h| headers.contains_key(*h)) {
        return Err(ApiError::bad_request(
            "Method override headers are not accepted by this gateway.",
        ));
    }
    if d.name == "tunedModels.create" && query.is_some_and(|q| query_param(q, "tunedModelId").is_some()) {
        return Err(chosen_name());
    }
    if d.refs
        && let Some(ct) = headers.get(header::CONTENT_TYPE)
    {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" {
            return Err(ApiError::bad_request(format!(
                "This method takes a JSON body (Content-Type: application/json), not {essence:?}."
            )));
        }
    }
    Ok(())
}

/// A name chosen by the caller would let them probe (Gemini answers 409 when it is taken, by
/// anyone) or squat another user's: Gemini names what is created through the gateway.
fn chosen_name() -> ApiError {
    ApiError::bad_request("Choosing a resource's name is not available through this gateway: Gemini names it.")
}

/// Largest metadata body of an upload's start.
const MAX_UPLOAD_METADATA: usize = 1 << 20;

/// The metadata of an upload's start, read whole (it is small): a `file.name` the caller chose
/// is refused (see [`chosen_name`]).
pub async fn upload_metadata<B>(body: B) -> Result<ProxyBody, ApiError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let bytes = Limited::new(body, MAX_UPLOAD_METADATA)
        .collect()
        .await
        .map_err(|_| ApiError::bad_request("The upload's metadata could not be read or is too large."))?
        .to_bytes();
    if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
        && v.pointer("/file/name").is_some_and(|n| !n.is_null())
    {
        return Err(chosen_name());
    }
    Ok(ProxyBody::full(bytes))
}

/// The path after the version (`files/abc`), for a canonical proxied path.
pub fn rest_of(path: &str) -> &str {
    Target::of(path).map_or("", |t| t.rest)
}

/// The caller must own the resource the path names, for methods that act on one.
pub fn check_path(owners: &Owners, user: &str, d: &Decision, path: &str) -> Result<(), ApiError> {
    if !matches!(d.access, Access::Path | Access::Delete | Access::PathCreate(_)) {
        return Ok(());
    }
    match resource_of(rest_of(path)) {
        Some((kind, name)) if owners.owns(user, &name) => {
            let _ = kind;
            Ok(())
        }
        Some((kind, name)) => Err(not_found(kind, &name)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "not_owned",
            "Requested entity was not found.",
        )),
    }
}

/// Checks references in a body: every resource they name must be the caller's. Built per
/// request without allocating; the caller and the upstream host are looked up only when a
/// reference turns up.
#[derive(Clone)]
pub struct RefCheck {
    owners: Arc<Owners>,
    registry: Arc<Registry>,
    key: KeyEntry,
    rt: Arc<Runtime>,
}

impl RefCheck {
    /// A check for the bodies of `key`'s user.
    pub fn new(proxy: &Proxy, rt: &Arc<Runtime>, key: KeyEntry) -> Self {
        Self {
            owners: proxy.owners.clone(),
            registry: proxy.registry.clone(),
            key,
            rt: rt.clone(),
        }
    }

    /// The first reference among those found that the caller does not own.
    fn first_foreign(&self, scanner: &mut RefScanner) -> Option<(Kind, String)> {
        let found = scanner.take_found();
        if found.is_empty() {
            return None;
        }
        let host = self
            .rt
            .config
            .upstream
            .base_url
            .host()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let user = self.registry.user_of(self.key).map(|u| u.id());
        found
            .iter()
            .filter_map(|r| required(r, &host))
            .find(|(_, name)| !user.is_some_and(|u| self.owners.owns(u, name)))
    }

    /// Checks a body read whole.
    pub fn whole(&self, bytes: &[u8]) -> Result<(), ApiError> {
        let mut s = RefScanner::new();
        s.feed(bytes);
        match self.first_foreign(&mut s) {
            Some((kind, name)) => Err(not_found(kind, &name)),
            None => Ok(()),
        }
    }
}

/// How much of a body that can carry references is scanned before any of it goes upstream.
/// A body this size or smaller (nearly every call) is refused before the upstream sees a byte;
/// a larger one (inline media) streams on once this much is clean, and is stopped at a foreign
/// reference, so the upstream never receives a whole request nor the reference itself.
pub const LOOKAHEAD: usize = 256 << 10;

/// The body of a call that can name resources, guarded: the first [`LOOKAHEAD`] bytes are read
/// and scanned before anything is sent; the rest is scanned as it streams ([`GuardedBody`]).
pub async fn guarded<B>(mut body: B, check: RefCheck, tally: Arc<RequestTally>, max: u64) -> Result<ProxyBody, ApiError>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    let mut scanner = RefScanner::new();
    let mut head: Vec<Bytes> = Vec::new();
    let mut held = 0usize;
    while held <= LOOKAHEAD {
        let Some(frame) = body.frame().await else {
            return Ok(whole(head));
        };
        let frame = frame.map_err(|_| {
            if tally.too_large.load(std::sync::atomic::Ordering::Relaxed) {
                ApiError::too_large(max)
            } else {
                ApiError::bad_request("The request body could not be read.")
            }
        })?;
        // Trailers of a request (Gemini's have none) are not passed on.
        let Ok(data) = frame.into_data() else { continue };
        scanner.feed(&data);
        if let Some((kind, name)) = check.first_foreign(&mut scanner) {
            super::body::drain(body).await;
            return Err(not_found(kind, &name));
        }
        held += data.len();
        head.push(data);
    }
    let rest = GuardedBody {
        inner: body,
        scanner,
        check,
        tally,
    };
    Ok(ProxyBody::stream(Prefixed {
        head: head.into(),
        rest,
    }))
}

fn whole(mut head: Vec<Bytes>) -> ProxyBody {
    if head.len() <= 1 {
        return head.pop().map_or_else(ProxyBody::empty, ProxyBody::full);
    }
    let mut all = bytes::BytesMut::with_capacity(head.iter().map(Bytes::len).sum());
    for b in head {
        all.extend_from_slice(&b);
    }
    ProxyBody::full(all.freeze())
}

/// Chunks already read, then the rest of the body.
struct Prefixed<B> {
    head: std::collections::VecDeque<Bytes>,
    rest: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }
}

/// The rest of a guarded body, scanned as it streams. A chunk that completes a reference to
/// someone else's resource is not sent: the body fails there, and the refusal is kept in the
/// request's tally for the answer.
pub struct GuardedBody<B> {
    inner: B,
    scanner: RefScanner,
    check: RefCheck,
    tally: Arc<RequestTally>,
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            this.scanner.feed(d);
            if this.scanner.has_found()
                && let Some(foreign) = this.check.first_foreign(&mut this.scanner)
            {
                let _ = this.tally.foreign_reference.set(foreign);
                return Poll::Ready(Some(Err("the body names a resource the caller does not own".into())));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The refusal a guarded body left in the tally, if it stopped for a foreign reference.
pub fn foreign_refusal(tally: &RequestTally) -> Option<ApiError> {
    tally.foreign_reference.get().map(|(k, n)| not_found(*k, n))
}

/// A call to the upstream with the real key (the gateway's own: lists, admin deletes): its
/// status and body (bounded).
pub async fn upstream_call(
    proxy: &Proxy,
    rt: &Runtime,
    method: Method,
    path: &str,
    query: Option<&str>,
) -> Result<(StatusCode, Bytes), ApiError> {
    let uri = super::headers::upstream_uri(&rt.config.upstream.base_url, path, query)?;
    let key = rt
        .upstream_headers
        .key
        .clone()
        .ok_or_else(|| ApiError::internal("The upstream key is not a valid header value."))?;
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(super::headers::GOOG_API_KEY, key)
        .body(ProxyBody::empty())
        .map_err(|_| ApiError::internal("The upstream request could not be built."))?;
    let resp = proxy
        .upstream
        .request(req)
        .await
        .map_err(|e| super::UpstreamFailure::of(&e).to_api_error())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_CREATED_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::upstream_unavailable("the upstream's answer could not be read"))?
        .to_bytes();
    Ok((status, body))
}

/// A GET of one resource upstream: its JSON, `None` when the upstream says it is gone
/// (403/404), or the failure.
async fn fetch(proxy: &Proxy, rt: &Runtime, version: &str, name: &str) -> Result<Option<Value>, ApiError> {
    let (status, body) = upstream_call(proxy, rt, Method::GET, &format!("/{version}/{name}"), None).await?;
    match status {
        s if s.is_success() => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|_| ApiError::upstream_unavailable("the upstream's answer is not JSON")),
        StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => Ok(None),
        _ => Err(ApiError::upstream_unavailable(
            "the upstream could not list the resources",
        )),
    }
}

/// A list of the caller's own resources of `kind`, in Gemini's shape (an empty list is `{}`),
/// with the items read (name and object, for billing what a list shows finished),
/// paged with `pageSize` and `pageToken`. Answered from the ownership index, each item fetched
/// from the upstream: filtering the upstream's own pages would read every tenant's resources to
/// find one user's, and its pages would come out short or empty.
pub async fn list(
    proxy: &Proxy,
    rt: &Runtime,
    user: &str,
    kind: Kind,
    query: Option<&str>,
) -> Result<(Value, Vec<(String, Value)>), ApiError> {
    let q = query.unwrap_or("");
    let size = match query_param(q, "pageSize").filter(|s| !s.is_empty()) {
        None => DEFAULT_PAGE,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if n <= 0 => DEFAULT_PAGE,
            Ok(n) => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
            Err(_) => return Err(ApiError::bad_request(format!("Invalid value for pageSize: {s:?}"))),
        },
    };
    let mut before = match query_param(q, "pageToken").filter(|s| !s.is_empty()) {
        None => u64::MAX,
        Some(t) => parse_token(&t)
            .and_then(|name| proxy.owners.seq_of(user, &name))
            .ok_or_else(|| ApiError::bad_request("Invalid page token."))?,
    };
    // Resources live under v1beta (v1 lacks most of them): a list through /v1 reads them there.
    let version = "v1beta";
    let owners = &proxy.owners;
    let mut items = Vec::new();
    let mut more = false;
    let mut last_name = String::new();
    loop {
        let want = size - items.len();
        let batch = owners.page(user, |k| k == kind, before, want);
        let Some(last) = batch.last() else { break };
        before = last.seq;
        last_name.clone_from(&last.name);
        let fetched = futures_util::future::join_all(batch.iter().map(|e| fetch(proxy, rt, version, &e.name))).await;
        for (e, got) in batch.iter().zip(fetched) {
            // Gone upstream (expired, deleted by its TTL), or not readable now: left out, and
            // kept (a passing 403 must not cost the owner their resource).
            if let Some(v) = got? {
                items.push((e.name.clone(), v));
            }
        }
        if items.len() >= size {
            more = !owners.page(user, |k| k == kind, before, 1).is_empty();
            break;
        }
    }
    let mut out = Map::new();
    if !items.is_empty() {
        out.insert(
            kind.list_field().into(),
            Value::Array(items.iter().map(|(_, v)| v.clone()).collect()),
        );
    }
    if more {
        out.insert("nextPageToken".into(), Value::String(page_token(&last_name)));
    }
    Ok((Value::Object(out), items))
}

/// A page token: the last listed resource's name (the caller's own), encoded. Nothing about
/// other users' resources (a global counter would tell how many they made in between).
fn page_token(last_name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_name)
}

fn parse_token(t: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t).ok()?;
    String::from_utf8(raw).ok()
}

/// The names a create call's answer gives the new resource of `kind`, as index names.
pub fn created_names(v: &Value, kind: Kind) -> Vec<String> {
    let candidates = [
        v.pointer("/file/name"),
        v.get("name"),
        v.pointer("/metadata/tunedModel"),
        v.pointer("/metadata/name"),
    ];
    let mut names: Vec<String> = candidates
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(resource_of)
        .filter(|(k, _)| *k == kind)
        .map(|(_, n)| n)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The answer of a create call: read (bounded), the new resources recorded as `user`'s and on
/// disk, then passed on whole (with the answer's JSON, for billing). A name the caller could
/// read is always one the index knows.
pub async fn record_created(
    owners: &Owners,
    user: &Arc<str>,
    kind: Kind,
    rparts: &mut http::response::Parts,
    body: UpstreamBody,
) -> Result<(ProxyBody, Option<Value>), ApiError> {
    let bytes = Limited::new(body, MAX_CREATED_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::upstream_unavailable("the upstream's answer could not be read"))?
        .to_bytes();
    let mut created = None;
    if rparts.status.is_success() {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => {
                for name in created_names(&v, kind) {
                    owners.record(user, kind, &name).await.map_err(|e| {
                        tracing::error!(error = %e, "ownership not recorded");
                        ApiError::internal("The new resource's owner could not be recorded; an operator can assign it.")
                    })?;
                }
                created = Some(v);
            }
            Err(_) => tracing::warn!("a create call's answer is not JSON: the resource has no owner"),
        }
    }
    rparts.headers.remove(header::CONTENT_LENGTH);
    rparts.headers.remove(header::TRANSFER_ENCODING);
    Ok((ProxyBody::full(bytes), created))
}

/// Whether an answer can hand the caller new files: a read of their own operation or batch,
/// whose result names the files it produced (a Veo video, a batch's results file).
pub fn may_adopt(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(resource_of(rest_of(path)), Some((Kind::Operation | Kind::Batch, _)))
}

/// Files an operation's or batch's result names: a batch's `responsesFile`, a video
/// operation's generated samples. Only those exact fields: the rest of an answer (a batch's
/// metadata, a model's output) echoes what the caller wrote, and must not hand them a file.
fn produced_files(v: &Value, host: &str, out: &mut Vec<String>) {
    let mut candidates: Vec<&str> = ["/response/responsesFile", "/metadata/output/responsesFile"]
        .iter()
        .filter_map(|p| v.pointer(p).and_then(Value::as_str))
        .collect();
    if let Some(samples) = v
        .pointer("/response/generateVideoResponse/generatedSamples")
        .and_then(Value::as_array)
    {
        candidates.extend(
            samples
                .iter()
                .filter_map(|s| s.pointer("/video/uri").and_then(Value::as_str)),
        );
    }
    for s in candidates {
        let r = crate::ownership::references::Reference {
            key: crate::ownership::references::RefKey::FileUri,
            value: s.to_string(),
        };
        if let Some((Kind::File, name)) = required(&r, host) {
            out.push(name);
        }
    }
}

/// The answer of a read of the caller's own operation or batch: files its result names that
/// no one owns yet become the caller's (so the caller can download what their call made).
/// Returns the answer's JSON too (a finished batch is billed from it).
pub async fn adopt_produced(
    owners: &Owners,
    user: &Arc<str>,
    upstream_host: &str,
    rparts: &mut http::response::Parts,
    body: UpstreamBody,
) -> Result<(ProxyBody, Option<Value>), ApiError> {
    let bytes = Limited::new(body, MAX_CREATED_BODY)
        .collect()
        .await
        .map_err(|_| ApiError::upstream_unavailable("the upstream's answer could not be read"))?
        .to_bytes();
    let mut read = None;
    if rparts.status.is_success()
        && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
    {
        let mut files = Vec::new();
        produced_files(&v, upstream_host, &mut files);
        for name in files.iter().filter(|n| !n.starts_with('\u{fffd}')) {
            if owners.owner(name).is_none() {
                owners
                    .record(user, Kind::File, name)
                    .await
                    .map_err(|_| ApiError::internal("The produced file's owner could not be recorded."))?;
            }
        }
        read = Some(v);
    }
    rparts.headers.remove(header::CONTENT_LENGTH);
    rparts.headers.remove(header::TRANSFER_ENCODING);
    Ok((ProxyBody::full(bytes), read))
}

/// After a delete the upstream agreed to, the resource is forgotten.
pub fn deleted(owners: &Owners, status: StatusCode, path: &str) {
    if !status.is_success() {
        return;
    }
    if let Some((_, name)) = resource_of(rest_of(path))
        && let Err(e) = owners.forget(&name)
    {
        tracing::warn!(error = %e, "ownership entry not forgotten");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_of_created_resources() {
        assert_eq!(
            created_names(&json!({"file": {"name": "files/ABC", "uri": "x"}}), Kind::File),
            ["files/abc"]
        );
        assert_eq!(
            created_names(
                &json!({"name": "tunedModels/t1/operations/o1", "metadata": {"tunedModel": "tunedModels/t1"}}),
                Kind::TunedModel
            ),
            ["tunedModels/t1"]
        );
        assert_eq!(
            created_names(&json!({"name": "models/veo-3/operations/op9"}), Kind::Operation),
            ["models/veo-3/operations/op9"]
        );
        assert!(created_names(&json!({"name": "files/x"}), Kind::Batch).is_empty());
        assert_eq!(parse_token(&page_token("files/abc")).as_deref(), Some("files/abc"));
        assert_eq!(parse_token("!!"), None);
    }
}
