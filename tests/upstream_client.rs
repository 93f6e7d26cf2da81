//! The upstream client's own pool: connections are reused, an HTTP/2 upstream (ALPN over TLS)
//! gets one multiplexed connection, a connection the upstream closed is replaced without the
//! caller seeing an error, a body dropped early does not break the next request, and requests to
//! another host than the configured one still work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gemini_meter::config::UpstreamConfig;
use gemini_meter::proxy::body::ProxyBody;
use gemini_meter::proxy::client::{UpstreamClient, build, build_with_tls};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

const CA: &[u8] = include_bytes!("fixtures/tls/ca.pem");
const CERT: &[u8] = include_bytes!("fixtures/tls/server.pem");
const KEY: &[u8] = include_bytes!("fixtures/tls/server.key");

/// How the test upstream answers.
#[derive(Clone, Copy)]
enum Serve {
    /// Plain TCP, keep-alive.
    Plain,
    /// Plain TCP, one request per connection (`connection: close`).
    PlainOnce,
    /// TLS offering these ALPN protocols.
    Tls(&'static [&'static [u8]]),
}

struct Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

/// An upstream that answers every request with "<version> <uri> host=<host>", or with 1 MiB
/// when the path is /big.
async fn upstream(how: Serve) -> Upstream {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let tls = match how {
        Serve::Tls(alpn) => {
            let certs = vec![CertificateDer::from_pem_slice(CERT).expect("cert")];
            let key = PrivateKeyDer::from_pem_slice(KEY).expect("key");
            let mut cfg = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .expect("server config");
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        }
        _ => None,
    };
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(answer);
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if matches!(how, Serve::PlainOnce) {
                    builder.http1().keep_alive(false);
                }
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    });
    Upstream { addr, accepted }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/early" {
        // Answers at once and reads the request body on the side, keeping the connection.
        let (parts, body) = req.into_parts();
        tokio::spawn(async move {
            let _ = body.collect().await;
        });
        let text = format!("{:?} {}", parts.version, parts.uri);
        return Ok(Response::new(Full::new(Bytes::from(text))));
    }
    if req.uri().path() == "/big" {
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20]))));
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body = format!("{:?} {} host={host}", req.version(), req.uri());
    Ok(Response::new(Full::new(Bytes::from(body))))
}

fn client(base: &str, tls: bool) -> UpstreamClient {
    let cfg = UpstreamConfig {
        base_url: base.parse().expect("base url"),
        api_key_env: String::new(),
        connect_timeout: Duration::from_secs(5),
        read_timeout: None,
    };
    if tls {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CA).expect("ca"))
            .expect("add ca");
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        build_with_tls(&cfg, tls)
    } else {
        build(&cfg)
    }
}

async fn get(c: &UpstreamClient, uri: &str) -> String {
    let req = Request::builder()
        .uri(uri.parse::<Uri>().expect("uri"))
        .body(ProxyBody::empty())
        .expect("request");
    let resp = c.request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_http1_on_one_reused_connection() {
    let up = upstream(Serve::Plain).await;
    let c = client(&format!("http://{}", up.addr), false);
    for i in 0..5 {
        let got = get(&c, &format!("http://{}/v1beta/x?n={i}", up.addr)).await;
        // Origin-form path and the Host header, as hyper-util's client sent them.
        assert_eq!(got, format!("HTTP/1.1 /v1beta/x?n={i} host={}", up.addr));
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_offering_h2_gets_one_multiplexed_connection() {
    let up = upstream(Serve::Tls(&[b"h2", b"http/1.1"])).await;
    let base = format!("https://localhost:{}", up.addr.port());
    let c = client(&base, true);
    // The first request makes the connection; the rest share it, ten at a time.
    let first = get(&c, &format!("{base}/first")).await;
    assert_eq!(first, format!("HTTP/2.0 {base}/first host=-"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let c = c.clone();
        let uri = format!("{base}/v1beta/m?i={i}");
        tasks.spawn(async move { get(&c, &uri).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.expect("task").starts_with("HTTP/2.0 https://localhost:"));
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_without_h2_gets_pooled_http1() {
    let up = upstream(Serve::Tls(&[b"http/1.1"])).await;
    let base = format!("https://localhost:{}", up.addr.port());
    let c = client(&base, true);
    for _ in 0..3 {
        let got = get(&c, &format!("{base}/p")).await;
        assert_eq!(got, format!("HTTP/1.1 /p host=localhost:{}", up.addr.port()));
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_replaced() {
    let up = upstream(Serve::PlainOnce).await;
    let c = client(&format!("http://{}", up.addr), false);
    for _ in 0..4 {
        let got = get(&c, &format!("http://{}/once", up.addr)).await;
        assert!(got.starts_with("HTTP/1.1 /once"), "{got}");
        // Let the close reach the client, as it would between requests in production.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_dropped_early_does_not_break_the_next_request() {
    let up = upstream(Serve::Plain).await;
    let c = client(&format!("http://{}", up.addr), false);
    let req = Request::builder()
        .uri(format!("http://{}/big", up.addr))
        .body(ProxyBody::empty())
        .expect("request");
    let resp = c.request(req).await.expect("response");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    let got = get(&c, &format!("http://{}/after", up.addr)).await;
    assert!(got.starts_with("HTTP/1.1 /after"), "{got}");
    // The half-read connection could not be reused.
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    // A body read to its end gives its connection back.
    let big = get(&c, &format!("http://{}/big", up.addr)).await;
    assert_eq!(big.len(), 1 << 20);
    let _ = get(&c, &format!("http://{}/again", up.addr)).await;
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
}

/// An upstream that answers before reading the request body: its connection is still busy
/// sending that body, so the next request must not be handed it (it would wait behind the upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_sending_its_request_body_is_not_reused_meanwhile() {
    let up = upstream(Serve::Plain).await;
    let c = client(&format!("http://{}", up.addr), false);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(1);
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"first part"))))
        .await
        .unwrap();
    let body = http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{}/early", up.addr))
        .body(ProxyBody::stream(body))
        .expect("request");
    let resp = c.request(req).await.expect("response");
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(got.starts_with(b"HTTP/1.1 /early"));
    // The upload is still open (tx not dropped); the next request gets another connection.
    let next = tokio::time::timeout(Duration::from_secs(2), get(&c, &format!("http://{}/next", up.addr))).await;
    assert!(next.expect("not stuck behind the upload").starts_with("HTTP/1.1 /next"));
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_host_than_the_configured_one_still_works() {
    let configured = upstream(Serve::Plain).await;
    let other = upstream(Serve::Plain).await;
    let c = client(&format!("http://{}", configured.addr), false);
    let got = get(&c, &format!("http://{}/elsewhere", other.addr)).await;
    assert_eq!(got, format!("HTTP/1.1 /elsewhere host={}", other.addr));
    assert_eq!(configured.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_connect_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let c = client(&format!("http://{addr}"), false);
    let req = Request::builder()
        .uri(format!("http://{addr}/x"))
        .body(ProxyBody::empty())
        .expect("request");
    let err = c.request(req).await.expect_err("nothing listens there");
    assert!(err.is_connect(), "{err:?}");
}
