//! A plain hyper reverse proxy (`gemini-meter loadtest-passthrough`), the load tool's fourth
//! target: the gateway's own server and upstream client with the same settings, and nothing else
//! (no keys, quotas, metering or records). Its row shows what the HTTP stack costs by itself, so
//! the gateway's distance to nginx splits into hyper's part and the metering's. It lives here, not
//! in the load tool's crate, because it is the gateway's stack; the load tool starts it through
//! the binary.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::accept::accept_loop;
use crate::config::{ServerConfig, UpstreamConfig};
use crate::error::ApiError;
use crate::proxy::body::ProxyBody;
use crate::proxy::client::{UpstreamClient, build};

/// Serves on `listener`, forwarding every request to `upstream` over plain HTTP, until
/// `shutdown` resolves; then drains like the gateway.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let base: Uri = format!("http://{upstream}")
        .parse()
        .map_err(|e| std::io::Error::other(format!("upstream address: {e}")))?;
    let authority = base
        .authority()
        .cloned()
        .ok_or_else(|| std::io::Error::other("upstream address has no authority"))?;
    let client = build(&UpstreamConfig {
        base_url: base,
        api_key_env: String::new(),
        connect_timeout: std::time::Duration::from_secs(5),
        read_timeout: None,
    });
    let cfg = ServerConfig::default();
    accept_loop(
        listener,
        &cfg,
        move || {
            let client = client.clone();
            let authority = authority.clone();
            service_fn(move |req| forward(client.clone(), authority.clone(), req))
        },
        shutdown,
        || {},
    )
    .await;
    Ok(())
}

async fn forward(
    client: UpstreamClient,
    authority: Authority,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    // The request's path and query under the upstream's authority, without formatting and
    // parsing a string (which cost more than the rest of this function).
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.uri = match Uri::from_parts(uri) {
        Ok(u) => u,
        Err(_) => return Ok(ApiError::bad_request("The request path is not valid.").into_response()),
    };
    parts.headers.remove(http::header::HOST);
    match client
        .request(Request::from_parts(parts, ProxyBody::stream(body)))
        .await
    {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Ok(Response::from_parts(parts, ProxyBody::stream(body)))
        }
        Err(_) => {
            Ok(ApiError::upstream_unavailable("the upstream connection failed before it answered.").into_response())
        }
    }
}
