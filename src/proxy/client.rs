//! The pooled upstream client: hyper over rustls (http:// allowed for tests and mocks).

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ProxyBody;
use crate::config::UpstreamConfig;

/// The upstream client type.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// Builds the pooled client. TLS uses the bundled webpki roots, so a fresh machine needs no CA
/// store; HTTP/2 is negotiated by ALPN when the upstream offers it.
pub fn build(cfg: &UpstreamConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(4096)
        .build(https)
}
