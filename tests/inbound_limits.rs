//! Inbound limits over real sockets: body size (413, by Content-Length and while streaming),
//! the header read timeout (slowloris) and the connection limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gemini_meter::app::App;
use gemini_meter::clock::SystemClock;
use gemini_meter::config::Config;
use gemini_meter::server::Server;
use gemini_meter_mock::{MockOptions, MockServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Gw {
    mock: MockServer,
    app: Arc<App>,
    server: Server,
    _dir: tempfile::TempDir,
}

/// A gateway with a 1 MiB body limit, a 500 ms header read timeout and at most 2 connections.
async fn start() -> Gw {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let opts = MockOptions {
        api_key: Some(common::UPSTREAM_KEY.into()),
        ..MockOptions::default()
    };
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = common::base_config(mock.addr, &dir.path().join("data"), "").replace(
        "drain_timeout_ms = 2000",
        "drain_timeout_ms = 2000\nheader_read_timeout_ms = 500\nmax_connections = 2",
    );
    let cfg = Config::parse(&text, "limits.toml").unwrap();
    let (app, recorder) = App::open(cfg, None, Arc::new(SystemClock::default()), common::test_env(&[])).unwrap();
    recorder.spawn().unwrap();
    let server = Server::start(app.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Gw {
        mock,
        app,
        server,
        _dir: dir,
    }
}

async fn key(gw: &Gw) -> String {
    let now = gw.app.clock.now();
    gw.app
        .registry
        .create_user("lim", "free", None, now, gemini_meter::clock::Month::of(now))
        .unwrap();
    gw.app.registry.create_key("lim", now).unwrap().0
}

fn big_body(bytes: usize) -> Vec<u8> {
    let text = "x".repeat(bytes);
    serde_json::to_vec(&json!({"contents": [{"parts": [{"text": text}]}]})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_and_cost_nothing() {
    let gw = start().await;
    let key = key(&gw).await;
    let url = format!(
        "http://{}/v1beta/models/gemini-2.5-flash:generateContent",
        gw.server.addr
    );
    let http = reqwest::Client::new();

    // Declared by Content-Length: refused before the body is read or anything is sent upstream.
    // Over a raw socket that sends only the head: a client still pushing the 2 MB body when the
    // gateway answers and closes may see a broken pipe instead of the answer (reqwest does).
    let mut sock = TcpStream::connect(gw.server.addr).await.unwrap();
    let head = format!(
        "POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nhost: x\r\n\
         x-goog-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        2 << 20
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut raw))
        .await
        .expect("the gateway answers without waiting for the body")
        .unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request body too large"),
        "{v}"
    );

    // Streamed without a length: cut off once it passes the limit.
    let body = big_body(2 << 20);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let r = http
        .post(&url)
        .header("x-goog-api-key", &key)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    // Neither was admitted as a message, and neither produced upstream generation.
    let u = gw.app.registry.user("lim").unwrap();
    assert_eq!(
        u.usage
            .snapshot(gemini_meter::clock::Month::of(gw.app.clock.now()))
            .messages,
        0
    );
    assert_eq!(gw.mock.stats.snapshot()["streams_completed"], 0);

    // A body under the limit still works.
    let r = http
        .post(&url)
        .header("x-goog-api-key", &key)
        .body(big_body(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Reads until EOF or error; returns how long that took.
async fn wait_closed(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let gw = start().await;
    let mut s = TcpStream::connect(gw.server.addr).await.unwrap();
    s.write_all(b"POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the gateway closes the connection after the header timeout.
    let closed = wait_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("slowloris connection stayed open");
    assert!(closed >= Duration::from_millis(300), "closed too early: {closed:?}");
    assert_eq!(gw.mock.stats.snapshot()["requests"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_and_the_gateway_recovers() {
    let gw = start().await;
    let _a = TcpStream::connect(gw.server.addr).await.unwrap();
    let _b = TcpStream::connect(gw.server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = TcpStream::connect(gw.server.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.ok();
    let closed = wait_closed(&mut c, Duration::from_millis(400)).await;
    assert!(
        closed.is_some(),
        "a third connection must be refused while two are open"
    );
    // The two idle ones hit the header timeout; then new connections are served again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = reqwest::get(format!("http://{}/healthz", gw.server.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
