//! The proxy's side of the route policy and of resource ownership: refuse what the table does
//! not allow, answer "not found" for resources the caller does not own, record what the
//! upstream creates (before the caller learns its name) and forget what it deletes. Bodies are
//! guarded in [`super::guard`], lists answered in [`super::lists`].

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use super::body::{BoxError, ProxyBody};
use super::client::UpstreamBody;
use super::headers::query_param;
use crate::error::ApiError;
use crate::ownership::references::required;
use crate::ownership::{Kind, Owners, resource_of};
use crate::policy::{Access, Decision, Denial, Target, decide};
use crate::runtime::Runtime;

/// Largest answer of a create call read to learn the new resource's name.
const MAX_CREATED_BODY: usize = 4 << 20;

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
    }
}
