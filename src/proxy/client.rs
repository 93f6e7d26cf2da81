//! The upstream client: hyper's HTTP/1 and HTTP/2 connections over rustls (http:// allowed for
//! tests and mocks), pooled here for the configured upstream.
//!
//! Why not hyper-util's pooled `legacy::Client`: per request it hashed the pool key (SipHash over
//! the authority, byte by byte) three times, raced a checkout against a lazily built connect
//! future, formatted the `Host` header, and spawned a task to put the connection back once the
//! response was read: about a fifth of the user-space instructions of a proxied request. The
//! gateway talks to one host, so its pool is a stack of idle HTTP/1 connections (or one shared
//! HTTP/2 connection when TLS negotiates h2) and a response body that gives its connection back
//! when it ends. Requests to any other host (a reload that changed `base_url`) still go through
//! hyper-util's client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use tower_service::Service;

use super::body::ProxyBody;
use crate::body::BoxError;
use crate::config::UpstreamConfig;

/// How long an idle connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most idle connections kept.
const MAX_IDLE: usize = 4096;

type Connector = HttpsConnector<HttpConnector>;

/// Why an upstream request failed before its response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made (DNS, TCP, TLS, or the connect timeout).
    #[error("connecting to the upstream: {0}")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or its answer awaited.
    #[error(transparent)]
    Request(#[from] hyper::Error),
    /// A new connection closed before the request could be sent on it.
    #[error("the upstream connection closed before the request was sent")]
    Closed,
    /// A request to another host than the configured upstream, sent by hyper-util's client.
    #[error(transparent)]
    Other(#[from] legacy::Error),
}

impl Error {
    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        match self {
            Error::Connect(_) => true,
            Error::Request(_) | Error::Closed => false,
            Error::Other(e) => e.is_connect(),
        }
    }
}

/// The upstream client (cheap to clone: clones share the pool).
#[derive(Clone)]
pub struct UpstreamClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("origin", &self.shared.origin.as_ref().map(|o| o.authority.as_str()))
            .field("idle", &self.shared.idle.lock().len())
            .finish_non_exhaustive()
    }
}

struct Shared {
    connector: Connector,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// The configured upstream: requests to it use the pool below.
    origin: Option<Origin>,
    /// Idle HTTP/1 connections, the most recently used last.
    idle: Mutex<VecDeque<Idle>>,
    /// The HTTP/2 connection, once TLS has negotiated h2.
    h2_conn: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// Requests to any other host.
    other: legacy::Client<Connector, ProxyBody>,
}

struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// `Host` as hyper-util would send it: the host, with the port when not the default.
    host: HeaderValue,
    /// `scheme://authority/`, what the connector is called with.
    root: Uri,
}

struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    since: Instant,
}

enum Conn {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl UpstreamClient {
    /// Sends `req` (an absolute URI) on a pooled connection; resolves to the response head.
    ///
    /// A request whose connection turns out closed before it was sent is sent again on
    /// another (a kept-alive connection may be closed by the upstream at any moment).
    pub async fn request(&self, mut req: Request<ProxyBody>) -> Result<Response<UpstreamBody>, Error> {
        let shared = &self.shared;
        let Some(origin) = shared.origin.as_ref().filter(|o| o.serves(req.uri())) else {
            let resp = shared.other.request(req).await?;
            return Ok(resp.map(UpstreamBody::unpooled));
        };
        if let Some(tx) = shared.h2_sender() {
            req = match send_h2(tx, req).await {
                Ok(r) => return r,
                Err(req) => req,
            };
        }
        let body_sent = track_body(&mut req);
        loop {
            let (mut tx, reused) = match shared.pop_idle() {
                Some(tx) => (tx, true),
                None => match shared.connect(origin).await? {
                    Conn::H1(tx) => (tx, false),
                    Conn::H2(tx) => {
                        *shared.h2_conn.lock() = Some(tx.clone());
                        let req = origin.absolute(req);
                        return match send_h2(tx, req).await {
                            Ok(r) => r,
                            Err(_) => Err(Error::Closed),
                        };
                    }
                },
            };
            if let Err(e) = tx.ready().await {
                if reused {
                    continue;
                }
                return Err(Error::Request(e));
            }
            origin.to_origin_form(&mut req);
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = UpstreamBody::pooled(body, tx, self.shared.clone(), body_sent);
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(Error::Request(e.into_error())),
                },
            }
        }
    }
}

/// Makes a streamed request body tell when hyper has taken its last frame; `None` when there is
/// nothing to stream (a whole body goes out with the head).
fn track_body(req: &mut Request<ProxyBody>) -> Option<Arc<AtomicBool>> {
    if matches!(req.body(), ProxyBody::Full(_)) || req.body().is_end_stream() {
        return None;
    }
    let sent = Arc::new(AtomicBool::new(false));
    let inner = std::mem::replace(req.body_mut(), ProxyBody::empty());
    *req.body_mut() = ProxyBody::stream(Sending {
        inner,
        sent: sent.clone(),
    });
    Some(sent)
}

/// A request body that flags when its last frame has been taken.
struct Sending {
    inner: ProxyBody,
    sent: Arc<AtomicBool>,
}

impl Body for Sending {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let done = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if done {
            self.sent.store(true, Ordering::Release);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Sends on the shared HTTP/2 connection; gives the request back when the connection turned
/// out closed before it was sent.
async fn send_h2(
    mut tx: http2::SendRequest<ProxyBody>,
    req: Request<ProxyBody>,
) -> Result<Result<Response<UpstreamBody>, Error>, Request<ProxyBody>> {
    match tx.try_send_request(req).await {
        Ok(resp) => Ok(Ok(resp.map(UpstreamBody::unpooled))),
        Err(mut e) => match e.take_message() {
            Some(req) => Err(req),
            None => Ok(Err(Error::Request(e.into_error()))),
        },
    }
}

impl Shared {
    fn h2_sender(&self) -> Option<http2::SendRequest<ProxyBody>> {
        let mut slot = self.h2_conn.lock();
        match slot.as_ref() {
            Some(tx) if !tx.is_closed() => Some(tx.clone()),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }

    /// The most recently used idle connection that is still open and not past the idle timeout.
    fn pop_idle(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock();
        while let Some(c) = idle.pop_back() {
            if c.tx.is_closed() {
                continue;
            }
            if c.since.elapsed() > IDLE_TIMEOUT {
                // The rest waited longer still.
                idle.clear();
                return None;
            }
            return Some(c.tx);
        }
        None
    }

    /// Puts a connection whose response has been read back for reuse, dropping the ones that
    /// have waited too long.
    fn put_idle(&self, tx: http1::SendRequest<ProxyBody>) {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while idle
            .front()
            .is_some_and(|c| c.tx.is_closed() || now.duration_since(c.since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { tx, since: now });
        }
    }

    /// A new connection: HTTP/2 when TLS negotiated it, else HTTP/1.1.
    async fn connect(&self, origin: &Origin) -> Result<Conn, Error> {
        let io = self
            .connector
            .clone()
            .call(origin.root.clone())
            .await
            .map_err(Error::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (mut tx, conn) = self.h2.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            tx.ready().await?;
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = self.h1.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Conn::H1(tx))
        }
    }
}

impl Origin {
    fn of(base: &Uri) -> Option<Origin> {
        let scheme = base.scheme()?.clone();
        let authority = base.authority()?.clone();
        let default_port = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        let host = match authority.port_u16() {
            Some(p) if Some(p) != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        let root = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        Some(Origin {
            host: HeaderValue::from_str(&host).ok()?,
            scheme,
            authority,
            root,
        })
    }

    /// Whether `uri` is on this origin (spelled exactly as configured, which is how the
    /// gateway builds its upstream URIs; any other spelling takes the general client).
    fn serves(&self, uri: &Uri) -> bool {
        uri.authority().map(Authority::as_str) == Some(self.authority.as_str()) && uri.scheme() == Some(&self.scheme)
    }

    /// HTTP/1 sends the path and query only, and the `Host` header.
    fn to_origin_form(&self, req: &mut Request<ProxyBody>) {
        req.headers_mut().entry(HOST).or_insert_with(|| self.host.clone());
        if req.uri().scheme().is_some() {
            let pq = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
    }

    /// HTTP/2 needs the scheme and authority in the URI.
    fn absolute(&self, mut req: Request<ProxyBody>) -> Request<ProxyBody> {
        if req.uri().scheme().is_none() {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(
                req.uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            if let Ok(u) = Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
        req
    }
}

/// An upstream response body; an HTTP/1 connection goes back to the pool once its body has
/// been read to the end (a body dropped before that takes its connection down with it, as
/// hyper cannot reuse a connection with unread response bytes).
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<Back>,
}

/// Where an HTTP/1 connection goes back to, and whether its request body has all been taken
/// (`None`: it had none to stream).
struct Back {
    tx: http1::SendRequest<ProxyBody>,
    shared: Arc<Shared>,
    body_sent: Option<Arc<AtomicBool>>,
}

impl UpstreamBody {
    fn pooled(
        inner: Incoming,
        tx: http1::SendRequest<ProxyBody>,
        shared: Arc<Shared>,
        body_sent: Option<Arc<AtomicBool>>,
    ) -> Self {
        let mut b = UpstreamBody {
            inner,
            back: Some(Back { tx, shared, body_sent }),
        };
        if b.inner.is_end_stream() {
            b.release();
        }
        b
    }

    fn unpooled(inner: Incoming) -> Self {
        UpstreamBody { inner, back: None }
    }

    /// Gives the connection back. A connection whose response ended before its request body
    /// was all taken (an upstream that answered early, during an upload) is still busy
    /// sending it: it goes back only once done, so no other request waits behind the upload.
    /// Otherwise it goes back at once, even if hyper's connection task has not yet asked for
    /// the next request (it is about to, and the next checkout waits for that).
    fn release(&mut self) {
        let Some(Back {
            mut tx,
            shared,
            body_sent,
        }) = self.back.take()
        else {
            return;
        };
        if body_sent.is_none_or(|s| s.load(Ordering::Acquire)) || tx.is_ready() {
            shared.put_idle(tx);
        } else if !tx.is_closed()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if tx.ready().await.is_ok() {
                    shared.put_idle(tx);
                }
            });
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.back.is_some() && this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.back.is_some())
            .finish()
    }
}

/// Builds the client. TLS uses the bundled webpki roots, so a fresh machine needs no CA store;
/// HTTP/2 is negotiated by ALPN when the upstream offers it (plain http is HTTP/1.1 only).
pub fn build(cfg: &UpstreamConfig) -> UpstreamClient {
    build_with(cfg, hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots())
}

/// [`build`] with `tls` instead of the webpki roots (tests with their own CA).
pub fn build_with_tls(cfg: &UpstreamConfig, tls: rustls::ClientConfig) -> UpstreamClient {
    build_with(cfg, hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls))
}

fn build_with(
    cfg: &UpstreamConfig,
    tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    let connector = tls.https_or_http().enable_http1().enable_http2().wrap_connector(http);
    let other = legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE)
        .build(connector.clone());
    let h1 = http1::Builder::new();
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    UpstreamClient {
        shared: Arc::new(Shared {
            connector,
            h1,
            h2,
            origin: Origin::of(&cfg.base_url),
            idle: Mutex::new(VecDeque::new()),
            h2_conn: Mutex::new(None),
            other,
        }),
    }
}
