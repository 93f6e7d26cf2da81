//! Calls the gateway makes to the upstream itself, with the real key (an owner's list items,
//! the admin API's deletes and listings of unowned resources).

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::Proxy;
use super::body::ProxyBody;
use crate::error::ApiError;
use crate::runtime::Runtime;

/// Largest answer read.
const MAX_ANSWER: usize = 4 << 20;

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
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|_| ApiError::upstream_unavailable("the upstream's answer could not be read"))?
        .to_bytes();
    Ok((status, body))
}
