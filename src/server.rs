//! The gateway's HTTP front: proxied paths go to [`crate::proxy`], the rest to [`crate::api`],
//! served by [`crate::accept`]'s loop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::accept::{ConnInfo, accept_loop_with};
use crate::api;
use crate::app::App;
use crate::body::ProxyBody;
use crate::proxy::forward::forward;
use crate::proxy::route::is_proxied;

/// Routes one request: proxied paths are forwarded, the rest is the gateway's own API (which
/// finds `conn` in the request's extensions: the admin API audits the caller's address and
/// checks the client certificate).
pub async fn handle(
    app: Arc<App>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if is_proxied(req.uri().path()) {
        Ok(forward(app.proxy.clone(), req).await)
    } else {
        req.extensions_mut().insert(conn);
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
    let on_stop = {
        let app = app.clone();
        move || crate::api::stream::close_all(&app)
    };
    let tls = app.tls.clone();
    // Certificates are polled like the config file: a swapped file is served within a second.
    let tls_watcher = tls
        .as_ref()
        .map(|t| t.spawn_watcher(Duration::from_millis(500), app.clock.clone()));
    accept_loop_with(
        listener,
        &cfg,
        tls,
        move |conn| {
            let app = app.clone();
            service_fn(move |req| handle(app.clone(), conn, req))
        },
        shutdown,
        on_stop,
    )
    .await;
    if let Some(w) = tls_watcher {
        w.abort();
    }
}
