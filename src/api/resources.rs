//! The admin API's view of upstream resources: who owns what, the resources no one owns
//! (created before ownership was recorded, or outside the gateway), assigning them, and
//! deleting them upstream (a deleted user's resources stay until an operator does).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{query_map, read_json};
use crate::app::App;
use crate::error::{ApiError, json_response};
use crate::ownership::{Kind, OwnedEntry, resource_of};
use crate::proxy::body::ProxyBody;
use crate::proxy::own_call::upstream_call;

/// The JSON of an owned entry.
pub fn entry_json(e: &OwnedEntry) -> Value {
    json!({
        "name": e.name,
        "kind": e.kind.collection(),
        "user_id": &*e.user,
        "created_at_ms": e.created_ms,
    })
}

fn kind_param(q: &std::collections::HashMap<String, String>) -> Result<Option<Kind>, ApiError> {
    match q.get("kind") {
        None => Ok(None),
        Some(k) => Kind::of_collection(k).map(Some).ok_or_else(|| {
            ApiError::bad_request(
                "kind must be files, cachedContents, batches, tunedModels, fileSearchStores or operations",
            )
        }),
    }
}

/// `GET /admin/resources?user=…&kind=…` (owned), or `?unowned=true&kind=…&pageToken=…` (one
/// upstream page, filtered to the resources no one owns).
pub async fn list(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let q = query_map(req);
    let kind = kind_param(&q)?;
    if q.get("unowned").is_some_and(|v| v == "true") {
        return unowned(app, kind.unwrap_or(Kind::File), q.get("pageToken").map(String::as_str)).await;
    }
    let want = |k: Kind| kind.is_none_or(|w| w == k);
    let owners = &app.proxy.owners;
    let entries = match q.get("user") {
        Some(u) => owners.page(u, want, u64::MAX, usize::MAX),
        None => owners.all().into_iter().filter(|e| want(e.kind)).collect(),
    };
    let data: Vec<Value> = entries.iter().map(entry_json).collect();
    Ok(json_response(StatusCode::OK, &json!({ "data": data })))
}

async fn unowned(app: &Arc<App>, kind: Kind, page_token: Option<&str>) -> Result<Response<ProxyBody>, ApiError> {
    let rt = app.live.load();
    let mut query = String::from("pageSize=100");
    if let Some(t) = page_token.filter(|t| t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b))) {
        query.push_str("&pageToken=");
        query.push_str(t);
    }
    let path = format!("/v1beta/{}", kind.collection());
    let (status, body) = upstream_call(&app.proxy, &rt, Method::GET, &path, Some(&query)).await?;
    if !status.is_success() {
        return Err(ApiError::upstream_unavailable(
            "the upstream could not list the resources",
        ));
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::upstream_unavailable("the upstream's answer is not JSON"))?;
    let items = v
        .get(kind.list_field())
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let data: Vec<Value> = items
        .into_iter()
        .filter(|item| {
            let name = item.get("name").and_then(Value::as_str).and_then(resource_of);
            name.is_some_and(|(_, n)| app.proxy.owners.owner(&n).is_none())
        })
        .collect();
    let mut out = json!({ "data": data });
    if let Some(t) = v.get("nextPageToken") {
        out["nextPageToken"] = t.clone();
    }
    Ok(json_response(StatusCode::OK, &out))
}

/// The index name in `/admin/resources/{name…}`.
fn name_of(segs: &[&str]) -> Result<(Kind, String), ApiError> {
    resource_of(&segs.join("/")).ok_or_else(|| ApiError::bad_request("Not a resource name (e.g. files/abc)."))
}

/// `PUT /admin/resources/{name}` with `{"user": "…"}`: gives the resource to a user.
pub async fn assign(app: &Arc<App>, segs: &[&str], req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    let (kind, name) = name_of(segs)?;
    let body = read_json(req).await?;
    let user = body
        .get("user")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("Body must name a user."))?;
    let u = app
        .registry
        .user(user)
        .ok_or_else(|| ApiError::not_found(format!("User {user} not found.")))?;
    app.proxy
        .owners
        .assign(&u.id_arc(), kind, &name)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"name": name, "kind": kind.collection(), "user_id": user}),
    ))
}

/// `DELETE /admin/resources/{name}`: deletes it upstream and forgets it.
pub async fn delete(app: &Arc<App>, segs: &[&str]) -> Result<Response<ProxyBody>, ApiError> {
    let (_, name) = name_of(segs)?;
    let rt = app.live.load();
    let (status, _) = upstream_call(&app.proxy, &rt, Method::DELETE, &format!("/v1beta/{name}"), None).await?;
    let gone = status.is_success() || status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN;
    if !gone {
        return Err(ApiError::upstream_unavailable(
            "the upstream did not delete the resource",
        ));
    }
    app.proxy
        .owners
        .forget(&name)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"deleted": name, "upstream_status": status.as_u16()}),
    ))
}
