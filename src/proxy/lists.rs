//! Lists of a caller's own resources, answered from the ownership index.

use http::{Method, StatusCode};
use serde_json::{Map, Value};

use super::Proxy;
use super::headers::query_param;
use super::own_call::upstream_call;
use crate::error::ApiError;
use crate::ownership::Kind;
use crate::runtime::Runtime;

/// Default and largest `pageSize` of lists (Gemini's for files).
const DEFAULT_PAGE: usize = 10;
const MAX_PAGE: usize = 100;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        assert_eq!(parse_token(&page_token("files/abc")).as_deref(), Some("files/abc"));
        assert_eq!(parse_token("!!"), None);
    }
}
