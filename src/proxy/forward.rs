//! Forwarding one proxied request, in phases: identify the caller, read what must be read of
//! the body, admit, build the upstream request, send it, and handle the answer's head; the
//! body's end is metered by [`MeteredBody`] and settled by the call's context
//! ([`super::metered`]). Which route does what is decided only in [`super::route`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::Value;

use super::Proxy;
use super::body::{CountingBody, ProxyBody, RequestTally};
use super::client::UpstreamBody;
use super::failure::UpstreamFailure;
use super::guard::{self, RefCheck};
use super::headers::{GOOG_API_KEY, caller_key, query_param, strip_hop_by_hop, take_tags, upstream_uri};
use super::metered::MeteredCall;
use super::route::{Answer, Route, classify};
use super::surfaces;
use super::tenancy;
use super::upload::rewrite_upload_url;
use crate::admission::{Admitted, WorstCase, admit};
use crate::error::{ApiError, json_response};
use crate::identity::KeyEntry;
use crate::ledger::Tags;
use crate::metering::estimate::{self, Dialect};
use crate::metering::observer::MeteredBody;
use crate::metering::scan::{Format, TextCounter};
use crate::metrics::route_index;
use crate::ownership::Kind;
use crate::policy::path::canonical;
use crate::policy::{Access, Decision};
use crate::runtime::Runtime;

/// Forwards a proxied request; every failure becomes a Gemini error envelope.
pub async fn forward(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut label = "other";
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let resp = match forward_inner(&proxy, parts, &mut body, &mut label).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() {
                proxy.metrics.refusal(e.label);
            }
            if let Some(b) = body.take() {
                super::body::drain(b).await;
            }
            e.into_response()
        }
    };
    proxy.metrics.request(route_index(label), resp.status().as_u16());
    resp
}

/// What the phases of one request share.
struct Call<'p> {
    proxy: &'p Arc<Proxy>,
    rt: Arc<Runtime>,
    route: Route,
    /// The route policy's decision.
    decision: Decision,
    /// The canonical path (what the policy judged and the upstream is sent).
    path: &'p str,
    /// A read of an owned operation or batch, whose result may name files it produced.
    adopts: bool,
    key: KeyEntry,
    tags: Option<Arc<Tags>>,
    tally: Arc<RequestTally>,
}

/// The model and stream flag an OpenAI-compatible body names.
struct BodyModel {
    model: String,
    stream: bool,
}

/// A model call's body read whole for hard enforcement: estimated, and its output cap
/// rewritten when it must be lowered (or set).
struct HardBody {
    value: Value,
    len: usize,
    dialect: Dialect,
}

/// The header telling the caller its output cap was lowered to fit its quota.
const OUTPUT_CAPPED: header::HeaderName = header::HeaderName::from_static("x-quota-output-capped");

async fn forward_inner(
    proxy: &Arc<Proxy>,
    mut parts: http::request::Parts,
    body: &mut Option<Incoming>,
    label: &mut &'static str,
) -> Result<Response<ProxyBody>, ApiError> {
    let started = Instant::now();
    let rt = proxy.live.load();
    // A clone shares the URI's bytes: path and query are borrowed from it, not copied.
    let uri_in = parts.uri.clone();
    let canon = canonical(uri_in.path()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (path, query) = (&*canon, uri_in.query());
    let decision = tenancy::decision(&rt, &parts.method, path)?;
    tenancy::screen(&parts.headers, uri_in.query(), &decision)?;
    let route = classify(&parts.method, path, query, &parts.headers);
    *label = route.label();
    let max = rt.config.server.max_request_bytes;
    if content_length(&parts.headers).is_some_and(|n| n > max) {
        return Err(ApiError::too_large(max));
    }
    proxy.prefetch_shared(&route, path, &parts.headers, query).await;
    let (key, continued) = identify(proxy, &route, &parts.headers, query)?;
    let adopts = owned_phase(proxy, &decision, key, &mut parts, path)?;
    let tags = take_tags(&mut parts.headers);
    let gateway_base = route
        .needs_gateway_base()
        .then(|| gateway_base(&rt.config.server.public_url, &parts));
    let call = Call {
        proxy,
        rt,
        route,
        decision,
        path,
        adopts,
        key,
        tags,
        tally: Arc::new(RequestTally::default()),
    };
    if let Access::List(kind) = call.decision.access {
        return list_phase(&call, kind, query).await;
    }
    let body = body
        .take()
        .ok_or_else(|| ApiError::internal("The request body was already read."))?;
    let (mut upstream_body, body_model, hard) = request_body(&call, body, max).await?;
    let bm = body_model.as_ref().map(|b| b.model.as_str());
    let worst = hard.as_ref().and_then(|h| worst_case(&call, bm, h));
    let mut admitted = admit_phase(&call, bm, continued, worst).await?;
    if let (Some(h), Some(w), Some(cap)) = (hard, worst, admitted.output_cap)
        && call.route.has_output()
        && estimate::requested_cap(&h.value, h.dialect) != Some(cap)
    {
        upstream_body = with_cap(&call, h, cap, &mut parts.headers)?;
        admitted.capped = w.cap.is_none_or(|asked| cap < asked).then_some(cap);
    }
    let metered = call.route.metered_model(bm).map(|m| {
        MeteredCall::new(
            proxy.settler.clone(),
            key,
            m,
            admitted.at,
            call.tags.clone(),
            call.tally.clone(),
            started,
            admitted.reservation.take(),
            call.rt.config.pricing.message_sent,
        )
    });
    let up_req = upstream_request(
        &call.rt,
        parts,
        path,
        query,
        upstream_body,
        call.route.is_openai() || path.contains("/openai/"),
    )?;
    let (resp, metered) = send(&call, up_req, metered).await?;
    let body_stream = body_model.is_some_and(|b| b.stream);
    answer(call, resp, admitted, metered, gateway_base, body_stream).await
}

/// The caller must own the resource the path names; an answer read for a resource's name (a
/// create, or a read that may hand over produced files) is asked for uncompressed. True for
/// such a read.
fn owned_phase(
    proxy: &Proxy,
    decision: &Decision,
    key: KeyEntry,
    parts: &mut http::request::Parts,
    path: &str,
) -> Result<bool, ApiError> {
    if decision.access != Access::None {
        let user = proxy.registry.user_of(key).ok_or_else(ApiError::invalid_key)?;
        tenancy::check_path(&proxy.owners, user.id(), decision, path)?;
    }
    let adopts = decision.access == Access::Path && tenancy::may_adopt(&parts.method, path);
    if adopts || matches!(decision.access, Access::Create(_) | Access::PathCreate(_)) {
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    Ok(adopts)
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Who is calling, and whether the request continues one already admitted (the chunks of an
/// upload session started here belong to the key that started it).
fn identify(
    proxy: &Proxy,
    route: &Route,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<(KeyEntry, bool), ApiError> {
    if let Some(upload_id) = route.upload_session()
        && let Some(s) = proxy.uploads.get(upload_id, &proxy.registry)
    {
        return if proxy.registry.key_active(s.key) {
            Ok((s.key, true))
        } else {
            Err(ApiError::invalid_key())
        };
    }
    let presented = caller_key(headers, query);
    let key = presented
        .as_ref()
        .map(|p| p.0.as_ref())
        .ok_or_else(ApiError::missing_key)?;
    let entry = proxy.registry.identify(key).ok_or_else(ApiError::invalid_key)?;
    proxy.registry.user_of(entry).ok_or_else(ApiError::invalid_key)?;
    Ok((entry, false))
}

/// The body to send upstream. The OpenAI-compatible endpoint names its model in the body, so
/// that body is read whole (bounded), as is a model call's under a hard token or cost limit (to
/// estimate it and lower its output cap); any other body streams through, counted.
async fn request_body(
    call: &Call<'_>,
    body: Incoming,
    max: u64,
) -> Result<(ProxyBody, Option<BodyModel>, Option<HardBody>), ApiError> {
    let openai = call.route.model_in_body();
    let hard = call.route.counts_prompt_text() || openai;
    let hard = hard && hard_budget(call);
    if matches!(call.route, Route::UploadStart { .. }) {
        return Ok((tenancy::upload_metadata(body).await?, None, None));
    }
    let video = matches!(call.route, Route::VideoCreate { .. } | Route::BatchCreate { .. });
    if !openai && !hard && !video {
        let counting = CountingBody::new(body, call.tally.clone(), max, call.route.counts_prompt_text());
        if !call.decision.refs {
            return Ok((ProxyBody::stream(counting), None, None));
        }
        let check = RefCheck::new(call.proxy, &call.rt, call.key);
        let body = guard::guarded(counting, check, call.tally.clone(), max).await?;
        return Ok((body, None, None));
    }
    let bytes: Bytes = match Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(ApiError::too_large(max)),
        Err(_) => return Err(ApiError::bad_request("The request body could not be read.")),
    };
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let mut tc = TextCounter::new();
    tc.feed(&bytes);
    call.tally.text_chars.store(tc.chars(), Ordering::Relaxed);
    call.tally.bytes.store(bytes.len() as u64, Ordering::Relaxed);
    if call.decision.refs {
        RefCheck::new(call.proxy, &call.rt, call.key).whole(&bytes)?;
    }
    if video {
        surfaces::screen_body(&call.route, &v)?;
        call.tally
            .video_seconds
            .store(surfaces::requested_seconds(&v), Ordering::Relaxed);
    }
    let body_model = if openai {
        let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
        let model = model.strip_prefix("models/").unwrap_or(model).to_string();
        if model.is_empty() {
            return Err(ApiError::bad_request("The request body names no model."));
        }
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        Some(BodyModel { model, stream })
    } else {
        None
    };
    let hard = hard.then(|| HardBody {
        len: bytes.len(),
        value: v,
        dialect: if openai { Dialect::OpenAi } else { Dialect::Native },
    });
    Ok((ProxyBody::full(bytes), body_model, hard))
}

/// Whether the caller's tier enforces its token or cost limit as hard.
fn hard_budget(call: &Call<'_>) -> bool {
    let tier = call.proxy.registry.user_of(call.key).map(|u| u.tier_id());
    tier.and_then(|t| call.rt.tiers.by_id(t))
        .is_some_and(|tr| tr.tier.hard_budget())
}

/// The worst case of a model call read whole: its estimated prompt, and its output cap (its
/// own, else the model's `max_output_tokens`).
fn worst_case(call: &Call<'_>, body_model: Option<&str>, h: &HardBody) -> Option<WorstCase> {
    let model = call.route.metered_model(body_model)?;
    let pricing = &call.rt.config.pricing;
    // Embeddings have no output: their worst case is their prompt.
    let cap = if call.route.has_output() {
        estimate::requested_cap(&h.value, h.dialect).or_else(|| pricing.model(model).and_then(|m| m.max_output_tokens))
    } else {
        Some(0)
    };
    let prompt = estimate::prompt_tokens(&h.value, h.len);
    let n = estimate::candidates(&h.value, h.dialect);
    Some(WorstCase::new(pricing, model, prompt, cap, n))
}

/// The body with output cap `cap` written in (the request's own cap, if any, is not above it).
fn with_cap(call: &Call<'_>, mut h: HardBody, cap: u64, headers: &mut http::HeaderMap) -> Result<ProxyBody, ApiError> {
    let user = call.proxy.registry.user_of(call.key);
    let tier = user.and_then(|u| call.rt.tiers.by_id(u.tier_id()));
    let min_output = tier.map_or(0, |t| t.tier.min_output_tokens);
    estimate::set_cap(&mut h.value, h.dialect, cap, min_output);
    let bytes =
        serde_json::to_vec(&h.value).map_err(|_| ApiError::internal("The request body could not be rewritten."))?;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Ok(ProxyBody::full(Bytes::from(bytes)))
}

/// Admission: nothing goes upstream before this passes. The chunks of an admitted upload are
/// not refused halfway (its size was checked at its start).
async fn admit_phase(
    call: &Call<'_>,
    body_model: Option<&str>,
    continued: bool,
    worst: Option<WorstCase>,
) -> Result<Admitted, ApiError> {
    let now = call.proxy.clock.now();
    if continued {
        return Ok(Admitted::continued(now));
    }
    surfaces::check_priced(&call.route, &call.rt.config.pricing, body_model)?;
    let mut ask = call.route.ask(body_model);
    if let crate::admission::Ask::Generate { worst: w, .. } = &mut ask {
        *w = worst;
    }
    if let Some(c) = &call.proxy.cluster {
        let (tiers, registry) = (&call.rt.tiers, &call.proxy.registry);
        return Ok(c.quotas.admit(&c.redis, tiers, registry, call.key, &ask, now).await?);
    }
    Ok(admit(&call.rt.tiers, &call.proxy.registry, call.key, &ask, now)?)
}

/// The upstream request: upstream URI, the real key instead of the caller's, no hop-by-hop
/// headers.
fn upstream_request(
    rt: &Runtime,
    mut parts: http::request::Parts,
    path: &str,
    query: Option<&str>,
    body: ProxyBody,
    openai: bool,
) -> Result<Request<ProxyBody>, ApiError> {
    let uri = upstream_uri(&rt.config.upstream.base_url, path, query)?;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::AUTHORIZATION);
    // A field mask could trim the usage report the call is billed from.
    parts.headers.remove("x-goog-fieldmask");
    let bad_key = || ApiError::internal("The upstream key is not a valid header value.");
    let upstream_key = rt.upstream_headers.key.clone().ok_or_else(bad_key)?;
    if openai {
        let bearer = rt.upstream_headers.bearer.clone().ok_or_else(bad_key)?;
        parts.headers.insert(header::AUTHORIZATION, bearer);
    }
    parts.headers.insert(GOOG_API_KEY, upstream_key);
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// Sends the request and waits for the answer's head; a failure settles the metered call as
/// unanswered (or, for a body we refused ourselves, gives its message back).
async fn send(
    call: &Call<'_>,
    req: Request<ProxyBody>,
    metered: Option<MeteredCall>,
) -> Result<(Response<UpstreamBody>, Option<MeteredCall>), ApiError> {
    let sent_at = Instant::now();
    let fut = call.proxy.upstream.request(req);
    let result = match call.rt.config.upstream.read_timeout {
        Some(d) => tokio::time::timeout(d, fut).await.map_err(|_| UpstreamFailure::Timeout),
        None => Ok(fut.await),
    };
    let failure = match result {
        Ok(Ok(resp)) => {
            call.proxy.metrics.upstream_latency.observe(sent_at.elapsed());
            return Ok((resp, metered));
        }
        Err(f) => f,
        Ok(Err(e)) if call.tally.foreign_reference.get().is_some() => {
            drop(e);
            if let Some(m) = metered {
                m.refused();
            }
            return Err(guard::foreign_refusal(&call.tally).unwrap_or_else(|| ApiError::internal("refused")));
        }
        Ok(Err(e)) if call.tally.too_large.load(Ordering::Relaxed) => {
            drop(e);
            if let Some(m) = metered {
                m.refused();
            }
            return Err(ApiError::too_large(call.rt.config.server.max_request_bytes));
        }
        Ok(Err(e)) => UpstreamFailure::of(&e),
    };
    let err = failure.to_api_error();
    tracing::warn!(error = %err.message, "upstream request failed");
    if let Some(m) = metered
        && let Some(wait) = m.failed(err.status)
    {
        wait.await;
    }
    Err(err)
}

/// The answer's head: quota headers, then what the route does with it.
async fn answer(
    call: Call<'_>,
    resp: Response<UpstreamBody>,
    admitted: Admitted,
    metered: Option<MeteredCall>,
    gateway_base: Option<String>,
    body_stream: bool,
) -> Result<Response<ProxyBody>, ApiError> {
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    // Browsers would try HTTP/3 on our host otherwise.
    rparts.headers.remove(header::ALT_SVC);
    for (n, v) in admitted.quota_headers(&call.rt.tiers) {
        rparts.headers.insert(n, v);
    }
    if let Some(c) = admitted.capped {
        rparts.headers.insert(OUTPUT_CAPPED, HeaderValue::from(c));
    }
    let body = match (call.route.answer(), metered) {
        (Answer::Metered, Some(m)) => metered_body(&call, &rparts, rbody, m, body_stream).await,
        (Answer::Images, _) => {
            let model = match &call.route {
                Route::Predict { model } => model.as_str(),
                _ => "",
            };
            surfaces::bill_images(call.proxy, call.key, call.tags.clone(), model, &mut rparts, rbody).await?
        }
        (Answer::UploadStart { declared }, _) => {
            upload_started(&call, &mut rparts, declared, gateway_base.as_deref()).await;
            ProxyBody::stream(rbody)
        }
        (Answer::UploadBytes { upload_id }, _) => {
            let p = call.proxy;
            p.record_upload(call.key, &rparts, &call.tally, call.tags.clone(), upload_id)
                .await;
            if let Some(id) = upload_id
                && upload_status(&rparts) == Some("final")
            {
                p.uploads.remove(id);
            }
            owned_body(&call, &mut rparts, rbody).await?
        }
        _ => owned_body(&call, &mut rparts, rbody).await?,
    };
    Ok(Response::from_parts(rparts, body))
}

fn upload_status(rparts: &http::response::Parts) -> Option<&str> {
    rparts.headers.get("x-goog-upload-status").and_then(|v| v.to_str().ok())
}

/// The answer's body, with what it does to owned resources: a created resource is recorded as
/// the caller's before its name is passed on; a deleted one is forgotten.
async fn owned_body(
    call: &Call<'_>,
    rparts: &mut http::response::Parts,
    rbody: UpstreamBody,
) -> Result<ProxyBody, ApiError> {
    match call.decision.access {
        Access::Create(kind) | Access::PathCreate(kind) if creates_now(call, rparts) => {
            let user = call
                .proxy
                .registry
                .user_of(call.key)
                .ok_or_else(ApiError::invalid_key)?;
            let (body, created) =
                tenancy::record_created(&call.proxy.owners, &user.id_arc(), kind, rparts, rbody).await?;
            match (&call.route, created) {
                (Route::CacheCreate, Some(v)) => {
                    surfaces::bill_cache_created(call.proxy, call.key, call.tags.clone(), &v).await;
                }
                (Route::VideoCreate { model }, Some(v)) => {
                    let seconds = call.tally.video_seconds.load(Ordering::Relaxed);
                    surfaces::video_started(call.proxy, model, seconds, &v).await?;
                }
                _ => {}
            }
            Ok(body)
        }
        Access::Delete => {
            tenancy::deleted(&call.proxy.owners, rparts.status, call.path);
            Ok(ProxyBody::stream(rbody))
        }
        Access::Path if call.adopts => {
            let user = call
                .proxy
                .registry
                .user_of(call.key)
                .ok_or_else(ApiError::invalid_key)?;
            let host = call
                .rt
                .config
                .upstream
                .base_url
                .host()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let (body, read) =
                tenancy::adopt_produced(&call.proxy.owners, &user.id_arc(), &host, rparts, rbody).await?;
            let read_of = crate::ownership::resource_of(tenancy::rest_of(call.path));
            match (read, read_of) {
                (Some(v), Some((Kind::Batch, name))) => {
                    surfaces::bill_batch_read(call.proxy, call.key, call.tags.clone(), &name, &v).await;
                }
                (Some(v), Some((Kind::Operation, name))) => {
                    surfaces::bill_video_read(call.proxy, call.key, call.tags.clone(), &name, &v).await;
                }
                _ => {}
            }
            Ok(body)
        }
        _ => Ok(ProxyBody::stream(rbody)),
    }
}

/// Whether this answer is the one that names a new resource (an upload's, only when final).
fn creates_now(call: &Call<'_>, rparts: &http::response::Parts) -> bool {
    if !rparts.status.is_success() {
        return false;
    }
    match call.route {
        Route::UploadChunk { .. } => upload_status(rparts) == Some("final"),
        Route::UploadOther => upload_status(rparts).is_none_or(|s| s == "final"),
        Route::UploadStart { .. } => false,
        _ => true,
    }
}

/// A list of the caller's own resources, answered by the gateway (after admission, which rate
/// limits it like any call).
async fn list_phase(call: &Call<'_>, kind: Kind, query: Option<&str>) -> Result<Response<ProxyBody>, ApiError> {
    let _admitted = admit_phase(call, None, false, None).await?;
    let user = call
        .proxy
        .registry
        .user_of(call.key)
        .ok_or_else(ApiError::invalid_key)?;
    let (v, items) = super::lists::list(call.proxy, &call.rt, user.id(), kind, query).await?;
    if kind == Kind::Batch {
        // A finished batch read through the list is billed as through a get.
        for (name, item) in &items {
            surfaces::bill_batch_read(call.proxy, call.key, call.tags.clone(), name, item).await;
        }
    }
    Ok(json_response(http::StatusCode::OK, &v))
}

/// Settles the call's message and wraps the body in the meter.
async fn metered_body(
    call: &Call<'_>,
    rparts: &http::response::Parts,
    rbody: UpstreamBody,
    metered: MeteredCall,
    body_stream: bool,
) -> ProxyBody {
    let status = rparts.status;
    let content_type = rparts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let sse = content_type.is_some_and(|v| v.starts_with("text/event-stream"));
    let format = call.route.response_format(status, sse, body_stream);
    let ce = rparts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let fail_on_error = status.as_u16() < 300 && !matches!(format, Format::UnaryJson | Format::OpenAiJson);
    let (end, wait) = metered.responded(status, format);
    let body = ProxyBody::stream(MeteredBody::new(rbody, ce, format, fail_on_error, end));
    if let Some(w) = wait {
        w.await;
    }
    body
}

/// An upload session started: remember whose it is, and point its URL at the gateway.
async fn upload_started(
    call: &Call<'_>,
    rparts: &mut http::response::Parts,
    declared: Option<u64>,
    base: Option<&str>,
) {
    if !rparts.status.is_success() {
        return;
    }
    let Some(url) = rparts
        .headers
        .get("x-goog-upload-url")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return;
    };
    let p = call.proxy;
    if let Some(id) = url.split_once('?').and_then(|(_, q)| query_param(q, "upload_id")) {
        p.uploads.insert(id, call.key, declared, &p.registry).await;
    }
    let prefix = call.rt.config.upstream.base_url.path();
    if let Some(base) = base
        && let Some(new) = rewrite_upload_url(&url, base, prefix)
        && let Ok(v) = HeaderValue::from_str(&new)
    {
        rparts.headers.insert("x-goog-upload-url", v);
    }
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
