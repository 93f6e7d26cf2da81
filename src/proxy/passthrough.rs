//! A plain hyper reverse proxy (`gemini-meter loadtest-passthrough`), the load tool's fourth
//! target: the gateway's own server and upstream client with the same settings, and nothing else
//! (no keys, quotas, metering or records). Its row shows what the HTTP stack costs by itself, so
//! the gateway's distance to nginx splits into hyper's part and the metering's. It lives here, not
//! in the load tool's crate, because it is the gateway's stack; the load tool starts it through
//! the binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::proxy::body::ProxyBody;
use crate::proxy::client::{UpstreamClient, build};

/// Serves on `listener`, forwarding every request to `upstream` over plain HTTP, until the
/// listener fails.
pub async fn serve(listener: TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    let base: Uri = format!("http://{upstream}")
        .parse()
        .map_err(|e| std::io::Error::other(format!("upstream address: {e}")))?;
    let client = Arc::new(build(&UpstreamConfig {
        base_url: base,
        api_key_env: String::new(),
        connect_timeout: std::time::Duration::from_secs(5),
        read_timeout: None,
    }));
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| forward(client.clone(), upstream, req));
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn forward(
    client: Arc<UpstreamClient>,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("http://{upstream}{pq}").parse() {
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
