//! The gateway's HTTP front: proxied paths go to [`crate::proxy`], the rest to [`crate::api`].
//! The accept loop: HTTP/1.1 and h2c on one port, bounded connections, header timeouts, and a
//! graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api;
use crate::app::App;
use crate::body::ProxyBody;
use crate::proxy::forward::forward;
use crate::proxy::route::is_proxied;

/// Routes one request: proxied paths are forwarded, the rest is the gateway's own API.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    if is_proxied(req.uri().path()) {
        Ok(forward(app.proxy.clone(), req).await)
    } else {
        let resp = api::route(app.clone(), req).await;
        app.metrics
            .request(crate::metrics::route_index("api"), resp.status().as_u16());
        Ok(resp)
    }
}

/// A running server (tests and embedding).
#[derive(Debug)]
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` and serves `app` until [`Server::shutdown`].
    pub async fn start(app: Arc<App>, addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(app, listener, async {
                let _ = rx.await;
            })
            .await;
        });
        Ok(Server {
            addr,
            stop: Some(tx),
            task,
        })
    }

    /// Stops accepting, drains in-flight requests, and returns when done.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Serves until `shutdown` resolves, then drains open connections (bounded by the config's
/// drain timeout).
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let cfg = app.live.load().config.server.clone();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    // Connection tasks are kept so that, past the drain timeout, they can be aborted *before*
    // the final flush: an aborted stream settles (client_closed) instead of vanishing unrecorded.
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_bytes = cfg.header_read_timeout;
        conns.spawn(async move {
            // Telling HTTP/1 from h2c waits for the first bytes with no timer of its own, so a
            // connection that never sends anything would hold a slot forever.
            let mut probe = [0u8; 1];
            if !matches!(tokio::time::timeout(first_bytes, stream.peek(&mut probe)).await, Ok(Ok(n)) if n > 0) {
                drop(permit);
                return;
            }
            let svc = service_fn(move |req| handle(app.clone(), req));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn).await;
            drop(permit);
        });
    }
    drop(listener);
    crate::api::stream::close_all(&app);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(cfg.drain_timeout) => {
            tracing::warn!(timeout_ms = cfg.drain_timeout.as_millis() as u64, open = conns.len(), "drain timeout reached; closing the remaining connections");
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
