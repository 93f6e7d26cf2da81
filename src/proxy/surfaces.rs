//! Billable surfaces that are not model calls answered at once:
//! - a cached content is billed for its storage when it is created, for its
//!   `usageMetadata.totalTokenCount` and the TTL Gemini gave it (its `expireTime` minus its
//!   `createTime`), as a `cache_storage` record;
//! - an Imagen `predict` is billed per image returned (`predictions[]`), at the model's
//!   `per_image`, as an `ai_response` record with no tokens;
//! - a Veo video (`predictLongRunning`) is billed when its owner reads the operation finished,
//!   per second of video: the seconds each sample was asked for (`parameters.durationSeconds`,
//!   kept with the operation when it was created) times the samples produced, exactly once;
//! - a batch is billed when its owner reads it finished: one `ai_response` record per inlined
//!   response, from that response's own `usageMetadata`, at the batch price, exactly once however
//!   often it is read (a settlement claimed in the ownership store, marked done on disk once its
//!   records are).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Proxy;
use crate::identity::KeyEntry;
use crate::ledger::{AiResponse, CacheAction, Details, Record, ResponseFormat, Status, Tags, TokenSource};
use crate::metering::pricing::{Mode, Priced, image_cost, price_tokens, video_cost};
use crate::metering::usage::{CacheStored, cache_storage_usage, tokens_of_response};
use crate::settle::Against;

/// Seconds between two RFC 3339 times of a resource (0 when either is missing or unreadable).
fn seconds_between(from: Option<&str>, to: Option<&str>) -> u64 {
    let parse = |s: Option<&str>| {
        s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    match (parse(from), parse(to)) {
        (Some(a), Some(b)) => u64::try_from((b - a).num_seconds()).unwrap_or(0),
        _ => 0,
    }
}

/// Bills the storage of a cached content the upstream just created (its answer `v`). Waits
/// (without blocking) for an alert the record fired to reach the disk.
pub async fn bill_cache_created(proxy: &Proxy, key: KeyEntry, tags: Option<Arc<Tags>>, v: &Value) {
    let Some(user) = proxy.registry.user_of(key) else {
        return;
    };
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
    let model = model.strip_prefix("models/").unwrap_or(model);
    let stored = CacheStored {
        action: CacheAction::Create,
        cache: v.get("name").and_then(Value::as_str).map(Into::into),
        key_id: proxy.registry.key_id(key).into(),
        model: Arc::from(model),
        tags,
        token_count: v
            .pointer("/usageMetadata/totalTokenCount")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        ttl_seconds: seconds_between(
            v.get("createTime").and_then(Value::as_str),
            v.get("expireTime").and_then(Value::as_str),
        ),
    };
    let rt = proxy.live.load();
    let Some((details, cost)) = cache_storage_usage(&rt.config.pricing, stored) else {
        // Admission refuses a cache for a model without a storage price; a reload in between
        // leaves it unpriced.
        tracing::warn!(model, "cache storage not billed: the model has no storage price");
        return;
    };
    let s = &proxy.settler;
    let now = s.clock.now();
    let rec = Record {
        id: s.ids.next(now),
        user_id: user.id_arc(),
        tokens: 0,
        messages: 0,
        bytes: 0,
        cost,
        details: Details::CacheStorage(details),
        created_at: now,
    };
    if let Some(wait) = s.settle(key, rec, Against::Nothing) {
        wait.await;
    }
}

/// The inlined responses of a finished batch (`None` while it runs or when its results are in a
/// file).
fn finished_responses(v: &Value) -> Option<&Vec<Value>> {
    let done = v.get("done").and_then(Value::as_bool) == Some(true)
        || v.pointer("/metadata/state").and_then(Value::as_str) == Some("BATCH_STATE_SUCCEEDED");
    if !done {
        return None;
    }
    [
        "/response/inlinedResponses/inlinedResponses",
        "/metadata/output/inlinedResponses/inlinedResponses",
    ]
    .iter()
    .find_map(|p| v.pointer(p))
    .and_then(Value::as_array)
}

/// Bills a batch its owner just read (`v`), once it is finished: one record per inlined
/// response at the batch price. Exactly once: the first read that sees it finished claims it.
pub async fn bill_batch_read(proxy: &Proxy, key: KeyEntry, tags: Option<Arc<Tags>>, name: &str, v: &Value) {
    let Some(responses) = finished_responses(v) else {
        return;
    };
    let owners = &proxy.owners;
    match owners.claim_settlement_shared(name).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, "batch settlement not claimed; billed on a later read");
            return;
        }
    }
    let Some(user) = proxy.registry.user_of(key) else {
        owners.unclaim(name);
        return;
    };
    let model = v.pointer("/metadata/model").and_then(Value::as_str).unwrap_or_default();
    let model = model.strip_prefix("models/").unwrap_or(model);
    let rt = proxy.live.load();
    let s = &proxy.settler;
    let key_id: Box<str> = proxy.registry.key_id(key).into();
    for item in responses {
        let Some(resp) = item.get("response") else { continue };
        let Ok(bytes) = serde_json::to_vec(resp) else { continue };
        let Ok((_, t)) = tokens_of_response(&bytes, Some(model)) else {
            continue;
        };
        let priced = price_tokens(&rt.config.pricing, model, &t, Mode::Batch);
        let details = AiResponse {
            cached_tokens: t.cached,
            duration_ms: 0,
            error: None,
            format: ResponseFormat::Json,
            key_id: key_id.clone(),
            model: Arc::from(model),
            model_version: resp.get("modelVersion").and_then(Value::as_str).map(Into::into),
            output_tokens: t.output,
            price: Some(priced.price),
            prompt_tokens: t.prompt,
            response_bytes: bytes.len() as u64,
            status: Status::Ok,
            stream: false,
            tags: tags.clone(),
            thoughts_tokens: t.thoughts,
            token_source: TokenSource::Upstream,
            tool_use_prompt_tokens: t.tool_use,
            upstream_status: 200,
        };
        let now = s.clock.now();
        let rec = Record {
            id: s.ids.next(now),
            user_id: user.id_arc(),
            tokens: t.total,
            messages: 0,
            bytes: 0,
            cost: priced.cost,
            details: Details::AiResponse(details),
            created_at: now,
        };
        if let Some(wait) = s.settle(key, rec, crate::settle::Against::Nothing) {
            wait.await;
        }
    }
    mark_settled(proxy, name).await;
}

/// What a body read whole must not ask for: a batch whose input is a file (its results come
/// back in a file the gateway does not meter yet).
pub fn screen_body(route: &super::route::Route, v: &Value) -> Result<(), crate::error::ApiError> {
    let file_input = ["/batch/inputConfig/fileName", "/batch/input_config/file_name"]
        .iter()
        .any(|p| v.pointer(p).is_some());
    if matches!(route, super::route::Route::BatchCreate { .. }) && file_input {
        return Err(crate::error::ApiError::new(
            http::StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "not_metered",
            "This method is not available through this gateway: a batch whose input is a file is not metered yet; send its requests inline.",
        ));
    }
    Ok(())
}

/// Veo's default length of a video when the request names none.
const DEFAULT_VIDEO_SECONDS: u64 = 8;

/// The seconds per video a `predictLongRunning` body asks for.
pub fn requested_seconds(v: &Value) -> u64 {
    let d = v.pointer("/parameters/durationSeconds");
    d.and_then(Value::as_u64)
        .or_else(|| d.and_then(Value::as_f64).map(|f| f.max(0.0).ceil() as u64))
        .or_else(|| {
            d.and_then(Value::as_str)
                .and_then(|s| s.trim_end_matches('s').parse().ok())
        })
        .unwrap_or(DEFAULT_VIDEO_SECONDS)
}

/// A video generation was accepted (its operation `v`): what it asked for is kept with the
/// operation, to bill when it is done.
pub async fn video_started(proxy: &Proxy, model: &str, seconds: u64, v: &Value) -> Result<(), crate::error::ApiError> {
    let Some((_, name)) = v
        .get("name")
        .and_then(Value::as_str)
        .and_then(crate::ownership::resource_of)
    else {
        return Ok(());
    };
    let note = serde_json::json!({"model": model, "seconds": seconds}).to_string();
    proxy
        .owners
        .set_note(&name, note.as_bytes())
        .await
        .map_err(|_| crate::error::ApiError::internal("The video generation could not be recorded for billing."))
}

/// Bills a video generation its owner just read (`v`), once it is done: seconds asked per
/// sample times the samples produced, at the model's `per_second`. Exactly once.
pub async fn bill_video_read(proxy: &Proxy, key: KeyEntry, tags: Option<Arc<Tags>>, name: &str, v: &Value) {
    if v.get("done").and_then(Value::as_bool) != Some(true) || v.get("error").is_some() {
        return;
    }
    let Some(note) = proxy
        .owners
        .note(name)
        .and_then(|n| serde_json::from_slice::<Value>(&n).ok())
    else {
        return;
    };
    let samples = v
        .pointer("/response/generateVideoResponse/generatedSamples")
        .and_then(Value::as_array)
        .map_or(0, Vec::len) as u64;
    let model = note.get("model").and_then(Value::as_str).unwrap_or_default();
    let seconds = note
        .get("seconds")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_VIDEO_SECONDS)
        .saturating_mul(samples);
    let owners = &proxy.owners;
    match owners.claim_settlement_shared(name).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!(error = %e, "video settlement not claimed; billed on a later read");
            return;
        }
    }
    let rt = proxy.live.load();
    if let Some(priced) = video_cost(&rt.config.pricing, model, seconds, Mode::Interactive)
        && seconds > 0
    {
        let details = unit_details(proxy.registry.key_id(key).into(), model, tags, &priced, 0);
        settle_unit(proxy, key, details, priced.cost).await;
    }
    mark_settled(proxy, name).await;
}

/// Marks a claimed settlement done once its records are on disk: a crash before that bills it
/// again on the next read, never loses it.
async fn mark_settled(proxy: &Proxy, name: &str) {
    match proxy.settler.recorder.sync().await {
        Ok(()) => {
            if let Err(e) = proxy.owners.settled(name).await {
                tracing::error!(error = %e, "settlement not marked; it may be billed twice after a restart");
            }
        }
        Err(e) => tracing::error!(error = %e, "records not confirmed on disk"),
    }
}

/// Work billed per unit needs its price before it goes upstream: a cached content's storage, an
/// image. Refused (403) for a model whose price is missing, never forwarded unbilled.
pub fn check_priced(
    route: &super::route::Route,
    pricing: &crate::config::Pricing,
    body_model: Option<&str>,
) -> Result<(), crate::error::ApiError> {
    use super::route::Route;
    let (model, what, priced) = match route {
        Route::CacheCreate => {
            let m = body_model.unwrap_or_default();
            (
                m,
                "Cached contents",
                pricing
                    .model(m)
                    .and_then(|p| p.cache_storage_per_million_per_hour)
                    .is_some(),
            )
        }
        Route::Predict { model } => (
            model.as_str(),
            "Images",
            pricing.model(model).and_then(|p| p.per_image).is_some(),
        ),
        Route::VideoCreate { model } => (
            model.as_str(),
            "Videos",
            pricing.model(model).and_then(|p| p.per_second).is_some(),
        ),
        _ => return Ok(()),
    };
    if priced {
        return Ok(());
    }
    Err(crate::error::ApiError::new(
        http::StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        "not_priced",
        format!("{what} of {model} are not available through this gateway: they have no price."),
    ))
}

/// Largest `predict` answer read (images come base64-encoded in it).
const MAX_PREDICT_BODY: usize = 256 << 20;

/// An `ai_response` record's details for work priced per unit (no tokens).
fn unit_details(key_id: Box<str>, model: &str, tags: Option<Arc<Tags>>, priced: &Priced, bytes: u64) -> AiResponse {
    AiResponse {
        cached_tokens: 0,
        duration_ms: 0,
        error: None,
        format: ResponseFormat::Json,
        key_id,
        model: Arc::from(model),
        model_version: None,
        output_tokens: 0,
        price: Some(priced.price.clone()),
        prompt_tokens: 0,
        response_bytes: bytes,
        status: Status::Ok,
        stream: false,
        tags,
        thoughts_tokens: 0,
        token_source: TokenSource::Upstream,
        tool_use_prompt_tokens: 0,
        upstream_status: 200,
    }
}

/// Settles a record of `cost` with `details` for `key`'s user.
async fn settle_unit(proxy: &Proxy, key: KeyEntry, details: AiResponse, cost: rust_decimal::Decimal) {
    let Some(user) = proxy.registry.user_of(key) else {
        return;
    };
    let s = &proxy.settler;
    let now = s.clock.now();
    let rec = Record {
        id: s.ids.next(now),
        user_id: user.id_arc(),
        tokens: 0,
        messages: 0,
        bytes: 0,
        cost,
        details: Details::AiResponse(details),
        created_at: now,
    };
    if let Some(wait) = s.settle(key, rec, crate::settle::Against::Nothing) {
        wait.await;
    }
}

/// The answer of an Imagen `predict`: read (bounded), billed per image returned, passed on.
pub async fn bill_images(
    proxy: &Proxy,
    key: KeyEntry,
    tags: Option<Arc<Tags>>,
    model: &str,
    rparts: &mut http::response::Parts,
    body: super::client::UpstreamBody,
) -> Result<super::body::ProxyBody, crate::error::ApiError> {
    use http_body_util::{BodyExt, Limited};
    let bytes = Limited::new(body, MAX_PREDICT_BODY)
        .collect()
        .await
        .map_err(|_| crate::error::ApiError::upstream_unavailable("the upstream's answer could not be read"))?
        .to_bytes();
    if rparts.status.is_success() {
        let images = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("predictions").and_then(Value::as_array).map(Vec::len))
            .unwrap_or(0);
        let rt = proxy.live.load();
        match image_cost(&rt.config.pricing, model, images as u64, Mode::Interactive) {
            Some(priced) if images > 0 => {
                let details = unit_details(
                    proxy.registry.key_id(key).into(),
                    model,
                    tags,
                    &priced,
                    bytes.len() as u64,
                );
                settle_unit(proxy, key, details, priced.cost).await;
            }
            Some(_) => {}
            None => tracing::warn!(model, "images not billed: the model has no per_image price"),
        }
    }
    rparts.headers.remove(http::header::CONTENT_LENGTH);
    rparts.headers.remove(http::header::TRANSFER_ENCODING);
    Ok(super::body::ProxyBody::full(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_of_a_cache() {
        assert_eq!(
            seconds_between(Some("2026-12-03T10:00:00.123456Z"), Some("2026-12-03T11:00:00.123456Z")),
            3600
        );
        assert_eq!(seconds_between(None, Some("2026-12-03T11:00:00Z")), 0);
        assert_eq!(
            seconds_between(Some("2026-12-03T11:00:00Z"), Some("2026-12-03T10:00:00Z")),
            0
        );
    }
}
