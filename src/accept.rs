//! The accept loop and connection setup shared by the gateway ([`crate::server`]) and the load
//! tool's plain hyper proxy ([`crate::proxy::passthrough`]): HTTP/1.1 and h2c on one port,
//! bounded connections, header timeouts, and a graceful drain on shutdown. Sharing it is what
//! makes the load tool's `hyper` target measure exactly the gateway's HTTP stack.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;

use crate::body::ProxyBody;
use crate::config::ServerConfig;
use crate::tls::TlsReloader;

/// The HTTP/2 connection preface, which an h2c client with prior knowledge opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How accepted connections are spoken to: HTTP/1.1, or HTTP/2 for a client that opens with
/// the HTTP/2 preface (h2c with prior knowledge). The gateway and the load tool's plain hyper
/// proxy both serve with this, so the latter measures the former's HTTP stack.
#[derive(Clone)]
pub struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: Builder<TokioExecutor>,
    first_bytes: Duration,
}

/// What a connection's service knows about the connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// True on the TLS listener.
    pub tls: bool,
    /// True when the client presented a certificate that the client CA verified.
    pub client_cert: bool,
}

impl Protocols {
    /// The settings of `[server]`: header read timeout and largest head.
    pub fn new(cfg: &ServerConfig) -> Protocols {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_buf_size(cfg.max_header_bytes)
            .keep_alive(true);
        let mut auto = Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_buf_size(cfg.max_header_bytes)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32);
        Protocols {
            http1,
            http2,
            auto,
            first_bytes: cfg.header_read_timeout,
        }
    }

    /// Serves one accepted connection to its end (or to `watcher`'s graceful shutdown).
    ///
    /// The first bytes are peeked with the header read timeout (telling HTTP/1 from h2c has no
    /// timer of its own, so a silent connection would otherwise hold its slot forever). When
    /// they cannot be the start of the HTTP/2 preface, which is what every HTTP/1 request
    /// looks like, hyper's HTTP/1 connection gets the socket directly; otherwise hyper-util's
    /// auto builder reads the preface and picks the protocol.
    pub async fn serve_connection<S>(&self, stream: TcpStream, svc: S, watcher: Watcher)
    where
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let mut probe = [0u8; H2_PREFACE.len()];
        let n = match tokio::time::timeout(self.first_bytes, stream.peek(&mut probe)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        let seen = &probe[..n];
        if !H2_PREFACE.starts_with(seen) {
            let conn = self.http1.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
        } else {
            let conn = self.auto.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
        }
    }
}

impl Protocols {
    /// Serves one TLS connection: HTTP/2 when ALPN chose `h2`, HTTP/1.1 otherwise.
    pub async fn serve_tls<S>(&self, stream: TlsStream<TcpStream>, svc: S, watcher: Watcher)
    where
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let conn = self.http2.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
        } else {
            let conn = self.http1.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
        }
    }

    /// Shakes hands (bounded by the header read timeout) and serves the connection.
    async fn serve_accepted<M, S>(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<&TlsReloader>,
        make_service: &M,
        watcher: Watcher,
    ) where
        M: Fn(ConnInfo) -> S,
        S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let Some(tls) = tls else {
            let svc = make_service(ConnInfo {
                peer,
                tls: false,
                client_cert: false,
            });
            return self.serve_connection(stream, svc, watcher).await;
        };
        let stream = match tokio::time::timeout(self.first_bytes, tls.acceptor().accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let client_cert = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
        let svc = make_service(ConnInfo {
            peer,
            tls: true,
            client_cert,
        });
        self.serve_tls(stream, svc, watcher).await;
    }
}

/// Accepts connections on `listener` and serves each with a service from `make_service`, at
/// most `max_connections` at once, until `shutdown` resolves; then calls `on_stop` and drains
/// the open connections (bounded by the drain timeout).
pub async fn accept_loop<M, S>(
    listener: TcpListener,
    cfg: &ServerConfig,
    make_service: M,
    shutdown: impl Future<Output = ()>,
    on_stop: impl FnOnce(),
) where
    M: Fn() -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    accept_loop_with(listener, cfg, None, move |_| make_service(), shutdown, on_stop).await;
}

/// [`accept_loop`] with TLS when `tls` is set (the handshake runs in the connection's task, so
/// a slow client never holds up the loop), and a service that knows its connection.
pub async fn accept_loop_with<M, S>(
    listener: TcpListener,
    cfg: &ServerConfig,
    tls: Option<Arc<TlsReloader>>,
    make_service: M,
    shutdown: impl Future<Output = ()>,
    on_stop: impl FnOnce(),
) where
    M: Fn(ConnInfo) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let make_service = Arc::new(make_service);
    let protocols = Arc::new(Protocols::new(cfg));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    // Connection tasks are kept so that, past the drain timeout, they can be aborted *before*
    // the final flush: an aborted stream settles (client_closed) instead of vanishing unrecorded.
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = cfg.max_connections,
                "connection limit reached; closing a new connection"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let protocols = protocols.clone();
        let watcher = graceful.watcher();
        let make_service = make_service.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            protocols
                .serve_accepted(stream, peer, tls.as_deref(), &*make_service, watcher)
                .await;
            drop(permit);
        });
    }
    drop(listener);
    on_stop();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(cfg.drain_timeout) => {
            tracing::warn!(timeout_ms = cfg.drain_timeout.as_millis() as u64, open = conns.len(), "drain timeout reached; closing the remaining connections");
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
