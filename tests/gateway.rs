//! The core gateway over real sockets: the mock upstream (or a raw TCP upstream written here)
//! and the gateway in this process on 127.0.0.1:0. Every test checks what the client saw
//! against what was recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Harness, UPSTREAM_KEY, sum};
use futures_util::StreamExt;
use gemini_meter::ledger::Record;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SSE_CRLF: &[u8] = include_bytes!("../../shared/fixtures/stream-sse-crlf.txt");
const JSON_ARRAY: &[u8] = include_bytes!("../../shared/fixtures/stream-json-array.txt");
const OPENAI_STREAM: &[u8] = include_bytes!("../../shared/fixtures/openai-stream.txt");
const UNARY: &[u8] = include_bytes!("../../shared/fixtures/unary.json");
const SSE_LF_FINAL: &[u8] = include_bytes!("../../shared/fixtures/stream-sse-lf-final-usage.txt");

const PROMPT: &str = r#"{"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]}"#;
const JSON_CT: &str = "application/json";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A client that neither asks for nor decodes gzip: it sees the body bytes as sent.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder().no_gzip().build().unwrap()
}

fn chat_body(model: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Name three primes."}]})
        .to_string()
}

fn gen_path(model: &str, stream: bool, sse: bool) -> String {
    match (stream, sse) {
        (false, _) => format!("/v1beta/models/{model}:generateContent"),
        (true, true) => format!("/v1beta/models/{model}:streamGenerateContent?alt=sse"),
        (true, false) => format!("/v1beta/models/{model}:streamGenerateContent"),
    }
}

/// The JSON objects of the `data:` lines of an SSE body (`[DONE]` left out).
fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).unwrap();
    text.split(['\r', '\n'])
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| !d.is_empty() && *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The last `field` object among `events` (usage is cumulative: the last report wins).
fn last_of(events: &[Value], field: &str) -> Value {
    events
        .iter()
        .rev()
        .find_map(|e| e.get(field).cloned())
        .unwrap_or_else(|| panic!("no {field} in {events:?}"))
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b).read_to_end(&mut out).unwrap();
    out
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn of_kind<'a>(records: &'a [Record], kind: &str) -> Vec<&'a Record> {
    records.iter().filter(|r| r.kind().as_str() == kind).collect()
}

/// A metadata field (Null when absent).
fn md(r: &Record, f: &str) -> Value {
    r.metadata().get(f).cloned().unwrap_or(Value::Null)
}

fn md_u64(r: &Record, f: &str) -> u64 {
    md(r, f)
        .as_u64()
        .unwrap_or_else(|| panic!("metadata.{f} missing or not a number in {r:?}"))
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn cost_str(r: &Record) -> String {
    r.cost.normalize().to_string()
}

/// interface.md's cost of a response priced per million, from the record's own token metadata.
fn priced_cost(r: &Record, input: &str, cached_input: &str, output: &str) -> String {
    let (p, c) = (md_u64(r, "prompt_tokens"), md_u64(r, "cached_tokens"));
    let (o, t) = (md_u64(r, "output_tokens"), md_u64(r, "thoughts_tokens"));
    let s =
        Decimal::from(p - c) * dec(input) + Decimal::from(c) * dec(cached_input) + Decimal::from(o + t) * dec(output);
    (s / Decimal::from(1_000_000u32)).normalize().to_string()
}

/// gemini-2.5-flash prices of the harness config.
fn flash_cost(r: &Record) -> String {
    priced_cost(r, "0.30", "0.03", "2.50")
}

/// Reads a body frame by frame: `Ok` when it ended cleanly, `Err((bytes so far, error))` when
/// it broke off.
async fn read_body(mut r: reqwest::Response) -> Result<Vec<u8>, (Vec<u8>, String)> {
    let mut out = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c),
            Ok(None) => return Ok(out),
            Err(e) => return Err((out, format!("{e:?}"))),
        }
    }
}

/// Waits (up to `within`) until `user` has a record of `kind`; returns all the user's records.
async fn wait_for_record(h: &Harness, user: &str, kind: &str, within: Duration) -> Vec<Record> {
    let deadline = Instant::now() + within;
    loop {
        let recs = h.records(user).await;
        if !of_kind(&recs, kind).is_empty() || Instant::now() > deadline {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Checks a gateway error: status, `application/json`, and the Gemini envelope.
async fn assert_envelope(r: reqwest::Response, code: u16, status: &str, prefix: &str) -> Value {
    assert_eq!(r.status().as_u16(), code, "status of {}", r.url());
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with(JSON_CT), "content-type {ct:?}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status, "{v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {v}"));
    assert!(msg.starts_with(prefix), "message {msg:?} should start with {prefix:?}");
    v
}

/// A local address nobody listens on.
fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::spare_port()))
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 upstream: answers every request with 200, chunked, the body of a fixture
// written as two chunks split at a chosen offset. The query picks the answer:
// `fx=sse|lf|array|openai|unary` (default unary), `split=K` (default: the middle), `gz=1` (gzip
// the fixture). It keeps the target and headers of every request it got.

#[derive(Debug, Clone)]
struct Captured {
    target: String,
    headers: Vec<(String, String)>,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct RawUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Captured>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fixture(fx: &str) -> (&'static [u8], &'static str) {
    match fx {
        "sse" => (SSE_CRLF, "text/event-stream"),
        "lf" => (SSE_LF_FINAL, "text/event-stream"),
        "array" => (JSON_ARRAY, "application/json; charset=UTF-8"),
        "openai" => (OPENAI_STREAM, "text/event-stream"),
        _ => (UNARY, "application/json; charset=UTF-8"),
    }
}

/// The answer body of a raw-upstream fixture as the client should receive it.
fn fixture_bytes(fx: &str, gz: bool) -> Vec<u8> {
    let raw = fixture(fx).0;
    if gz { gzip(raw) } else { raw.to_vec() }
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve_raw(sock, s).await;
                });
            }
        });
        RawUpstream { addr, seen, task }
    }

    fn seen(&self) -> Vec<Captured> {
        self.seen.lock().unwrap().clone()
    }
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut tmp = [0u8; 8192];
    let n = sock.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n > 0)
}

async fn serve_raw(mut sock: TcpStream, seen: Arc<Mutex<Vec<Captured>>>) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(8192);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if !read_more(&mut sock, &mut buf).await? {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let cap = Captured {
        target: target.clone(),
        headers,
    };
    // Read the whole request body, so that closing the socket later is a clean FIN.
    if let Some(len) = cap.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while buf.len() < head_end + len {
            if !read_more(&mut sock, &mut buf).await? {
                break;
            }
        }
    } else if cap.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while !buf[head_end..].ends_with(b"0\r\n\r\n") {
            if !read_more(&mut sock, &mut buf).await? {
                break;
            }
        }
    }
    seen.lock().unwrap().push(cap);

    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let fx = param("fx").unwrap_or_else(|| "unary".into());
    let gz = param("gz").as_deref() == Some("1");
    let ctype = fixture(&fx).1;
    let body = fixture_bytes(&fx, gz);
    let split = param("split")
        .and_then(|v| v.parse().ok())
        .unwrap_or(body.len() / 2)
        .min(body.len());

    let mut out =
        format!("HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n");
    if gz {
        out.push_str("content-encoding: gzip\r\n");
    }
    out.push_str("\r\n");
    sock.write_all(out.as_bytes()).await?;
    for part in [&body[..split], &body[split..]] {
        if part.is_empty() {
            continue;
        }
        let mut chunk = format!("{:x}\r\n", part.len()).into_bytes();
        chunk.extend_from_slice(part);
        chunk.extend_from_slice(b"\r\n");
        sock.write_all(&chunk).await?;
        sock.flush().await?;
    }
    sock.write_all(b"0\r\n\r\n").await?;
    sock.flush().await?;
    sock.shutdown().await?;
    // Wait for the gateway to close its side (bounded), so nothing is reset under it.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(true) = read_more(&mut sock, &mut rest).await {}
    })
    .await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Every format: the record holds the usage the client saw

/// What the client saw of one call.
#[derive(Debug)]
struct Seen {
    prompt: u64,
    output: u64,
    total: u64,
    bytes: u64,
    stream: bool,
}

async fn call_format(h: &Harness, c: &reqwest::Client, key: &str, fmt: &str) -> Seen {
    let model = "gemini-2.5-flash";
    let req = match fmt {
        "unary" => c
            .post(h.url(&gen_path(model, false, false)))
            .header("x-goog-api-key", key)
            .body(PROMPT),
        "sse" => c
            .post(h.url(&gen_path(model, true, true)))
            .header("x-goog-api-key", key)
            .body(PROMPT),
        "array" => c
            .post(h.url(&gen_path(model, true, false)))
            .header("x-goog-api-key", key)
            .body(PROMPT),
        "openai" => c
            .post(h.url("/v1beta/openai/chat/completions"))
            .bearer_auth(key)
            .body(chat_body(model, false)),
        "openai_stream" => c
            .post(h.url("/v1beta/openai/chat/completions"))
            .bearer_auth(key)
            .body(chat_body(model, true)),
        _ => unreachable!(),
    };
    let r = req.header("content-type", JSON_CT).send().await.unwrap();
    assert_eq!(r.status(), 200, "{fmt}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        r.headers().get("alt-svc").is_none(),
        "{fmt}: alt-svc must be stripped (gemini-wire.md section 8.4)"
    );
    let body = r.bytes().await.unwrap().to_vec();
    let bytes = body.len() as u64;
    let native = |u: &Value| {
        (
            u["promptTokenCount"].as_u64().unwrap(),
            u["candidatesTokenCount"].as_u64().unwrap(),
            u["totalTokenCount"].as_u64().unwrap(),
        )
    };
    let openai = |u: &Value| {
        (
            u["prompt_tokens"].as_u64().unwrap(),
            u["completion_tokens"].as_u64().unwrap(),
            u["total_tokens"].as_u64().unwrap(),
        )
    };
    let ((prompt, output, total), stream) = match fmt {
        "unary" => {
            let v: Value = serde_json::from_slice(&body).unwrap();
            (native(&v["usageMetadata"]), false)
        }
        "sse" => {
            assert!(ct.starts_with("text/event-stream"), "{ct}");
            let ev = sse_events(&body);
            assert_eq!(ev.len(), 5, "the mock streams 5 events");
            (native(&last_of(&ev, "usageMetadata")), true)
        }
        "array" => {
            assert!(ct.starts_with(JSON_CT), "{ct}");
            let ev: Vec<Value> = serde_json::from_slice(&body).unwrap();
            assert_eq!(ev.len(), 5, "the mock streams 5 elements");
            (native(&last_of(&ev, "usageMetadata")), true)
        }
        "openai" => {
            let v: Value = serde_json::from_slice(&body).unwrap();
            (openai(&v["usage"]), false)
        }
        _ => {
            assert!(ct.starts_with("text/event-stream"), "{ct}");
            assert!(contains(&body, b"data: [DONE]"));
            (openai(&last_of(&sse_events(&body), "usage")), true)
        }
    };
    assert!(total > 0 && prompt > 0 && output > 0, "{fmt}: {body:?}");
    Seen {
        prompt,
        output,
        total,
        bytes,
        stream,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_is_metered_as_the_client_saw_it() {
    let h = Harness::start("").await;
    let c = raw_client();
    for fmt in ["unary", "sse", "array", "openai", "openai_stream"] {
        let user = format!("fmt-{fmt}");
        let key = h.user_with_key(&user, "free").await;
        let seen = call_format(&h, &c, &key, fmt).await;
        let recs = h.records(&user).await;
        assert_eq!(recs.len(), 2, "{fmt}: one message_sent and one ai_response: {recs:?}");
        let ms = of_kind(&recs, "message_sent");
        assert_eq!(ms.len(), 1, "{fmt}: {recs:?}");
        assert_eq!(ms[0].messages, 1, "{fmt}");
        let ai = of_kind(&recs, "ai_response");
        assert_eq!(ai.len(), 1, "{fmt}: {recs:?}");
        let ai = ai[0];
        assert_eq!(ai.messages, 0, "{fmt}");
        assert_eq!(md(ai, "model"), "gemini-2.5-flash", "{fmt}");
        assert_eq!(md(ai, "status"), "ok", "{fmt}: {ai:?}");
        assert_eq!(md(ai, "token_source"), "upstream", "{fmt}: {ai:?}");
        assert_eq!(md(ai, "upstream_status"), 200, "{fmt}");
        assert_eq!(md(ai, "stream"), seen.stream, "{fmt}");
        assert_eq!(md(ai, "response_bytes"), seen.bytes, "{fmt}: bytes the client received");
        assert_eq!(
            ai.tokens, seen.total,
            "{fmt}: tokens = the usage the client saw ({seen:?})"
        );
        assert_eq!(md(ai, "prompt_tokens"), seen.prompt, "{fmt}");
        assert_eq!(md(ai, "output_tokens"), seen.output, "{fmt}");
        assert_eq!(cost_str(ai), flash_cost(ai), "{fmt}: cost from the record's tokens");

        let cur = h.current(&key).await;
        let (m, t, b, cost) = sum(&recs);
        let cm = &cur["current_month"];
        assert_eq!(cm["messages"], m, "{fmt}: {cur}");
        assert_eq!(m, 1);
        assert_eq!(cm["tokens"], t, "{fmt}: {cur}");
        assert_eq!(cm["bytes"], b, "{fmt}: {cur}");
        assert_eq!(cm["cost"], cost, "{fmt}: {cur}");
        let rb: u64 = recs.iter().map(Record::response_bytes).sum();
        assert_eq!(cm["response_bytes"], rb, "{fmt}: {cur}");
    }
    assert_eq!(h.mock_stats()["generate_requests"], 5);
}

// ---------------------------------------------------------------------------------------------
// 2. Usage survives a split at every offset (real socket, chunked transfer encoding)

/// What every `ai_response` of a split run must hold.
#[derive(Debug, PartialEq)]
struct Want {
    tokens: u64,
    prompt: u64,
    cached: u64,
    output: u64,
    thoughts: u64,
    cost: String,
    response_bytes: u64,
}

/// Runs one request per split offset through `h` (concurrently), then checks the records.
async fn run_splits(h: &Harness, user: &str, fx: &str, gz: bool, step: usize, want: Want) {
    let key = h.user_with_key(user, "unlimited").await;
    let c = raw_client();
    let expected = fixture_bytes(fx, gz);
    let ks: Vec<usize> = (1..expected.len()).step_by(step).collect();
    let n = ks.len();
    let gzq = if gz { "&gz=1" } else { "" };
    futures_util::stream::iter(ks)
        .map(|k| {
            let (c, key, expected) = (&c, &key, &expected);
            async move {
                let req = match fx {
                    "openai" => c
                        .post(h.url(&format!("/v1beta/openai/chat/completions?fx=openai&split={k}{gzq}")))
                        .bearer_auth(key)
                        .body(chat_body("gemini-2.5-flash", true)),
                    "unary" => c
                        .post(h.url(&format!(
                            "/v1beta/models/gemini-2.5-flash:generateContent?fx=unary&split={k}{gzq}"
                        )))
                        .header("x-goog-api-key", key)
                        .body(PROMPT),
                    "array" => c
                        .post(h.url(&format!(
                            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?fx=array&split={k}{gzq}"
                        )))
                        .header("x-goog-api-key", key)
                        .body(PROMPT),
                    // The LF fixture is served by gemini-2.0-flash, which has no price of its own.
                    "lf" => c
                        .post(h.url(&format!(
                            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&fx=lf&split={k}{gzq}"
                        )))
                        .header("x-goog-api-key", key)
                        .body(PROMPT),
                    _ => c
                        .post(h.url(&format!(
                            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&fx=sse&split={k}{gzq}"
                        )))
                        .header("x-goog-api-key", key)
                        .body(PROMPT),
                };
                let r = req
                    .header("content-type", JSON_CT)
                    .header("x-meter-tag-split", k.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{fx} split {k}");
                let ce = r
                    .headers()
                    .get("content-encoding")
                    .map(|v| v.to_str().unwrap().to_string());
                assert_eq!(ce.as_deref(), gz.then_some("gzip"), "{fx} split {k}");
                let body = r.bytes().await.unwrap();
                assert!(
                    body[..] == expected[..],
                    "{fx} split {k}: the client must get the upstream's bytes unchanged"
                );
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;

    let recs = h.records(user).await;
    assert_eq!(
        of_kind(&recs, "message_sent").len(),
        n,
        "{fx}: one message_sent per request"
    );
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), n, "{fx}: one ai_response per request");
    let mut bad = Vec::new();
    for r in ai {
        let got = Want {
            tokens: r.tokens,
            prompt: md(r, "prompt_tokens").as_u64().unwrap_or(u64::MAX),
            cached: md(r, "cached_tokens").as_u64().unwrap_or(u64::MAX),
            output: md(r, "output_tokens").as_u64().unwrap_or(u64::MAX),
            thoughts: md(r, "thoughts_tokens").as_u64().unwrap_or(u64::MAX),
            cost: cost_str(r),
            response_bytes: md(r, "response_bytes").as_u64().unwrap_or(u64::MAX),
        };
        let extra_ok =
            md(r, "status") == "ok" && md(r, "token_source") == "upstream" && md(r, "stream") == (fx != "unary");
        if got != want || !extra_ok {
            let k = r
                .metadata()
                .get("tags")
                .and_then(|t| t.get("split"))
                .cloned()
                .unwrap_or(Value::Null);
            bad.push(format!(
                "split {k}: {got:?} status={} source={}",
                md(r, "status"),
                md(r, "token_source")
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{fx} (gzip {gz}): {} of {n} splits metered wrong, want {want:?}; first: {:#?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_a_split_at_every_offset() {
    let up = RawUpstream::start().await;
    let h = Harness::start_against(up.addr, "").await;
    // fixtures/README.md: prompt 1204 (cached 1000), output 52, thoughts 388, total 1644.
    let native = |len: usize| Want {
        tokens: 1644,
        prompt: 1204,
        cached: 1000,
        output: 52,
        thoughts: 388,
        cost: "0.0011912".into(),
        response_bytes: len as u64,
    };
    run_splits(&h, "split-sse", "sse", false, 1, native(SSE_CRLF.len())).await;
    run_splits(&h, "split-array", "array", false, 7, native(JSON_ARRAY.len())).await;
    // prompt 1204, completion 440, total 1644: (1204 x 0.30 + 440 x 2.50) / 1e6.
    let openai = Want {
        tokens: 1644,
        prompt: 1204,
        cached: 0,
        output: 440,
        thoughts: 0,
        cost: "0.0014612".into(),
        response_bytes: OPENAI_STREAM.len() as u64,
    };
    run_splits(&h, "split-openai", "openai", false, 7, openai).await;
    // LF endings, usage only on the last event: prompt 88, output 52, tool-use 40, total 180;
    // gemini-2.0-flash is unpriced, so 180 x 0.0001.
    let lf = Want {
        tokens: 180,
        prompt: 88,
        cached: 0,
        output: 52,
        thoughts: 0,
        cost: "0.018".into(),
        response_bytes: SSE_LF_FINAL.len() as u64,
    };
    run_splits(&h, "split-lf", "lf", false, 3, lf).await;
    // unary.json: the same usage as the native streams, one JSON object.
    run_splits(&h, "split-unary", "unary", false, 7, native(UNARY.len())).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Gzip

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_from_the_mock_reaches_the_client_compressed_and_is_metered() {
    let h = Harness::start("").await;
    let c = raw_client();
    for (name, stream, sse) in [("unary", false, false), ("sse", true, true), ("array", true, false)] {
        let user = format!("gz-{name}");
        let key = h.user_with_key(&user, "free").await;
        let r = c
            .post(h.url(&gen_path("gzip-always", stream, sse)))
            .header("x-goog-api-key", &key)
            .header("content-type", JSON_CT)
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(
            r.headers().get("content-encoding").map(|v| v.to_str().unwrap()),
            Some("gzip"),
            "{name}"
        );
        let raw = r.bytes().await.unwrap().to_vec();
        assert_eq!(&raw[..2], &[0x1f, 0x8b], "{name}: the client gets the gzipped bytes");
        let plain = gunzip(&raw);
        let usage = match name {
            "unary" => serde_json::from_slice::<Value>(&plain).unwrap()["usageMetadata"].clone(),
            "sse" => last_of(&sse_events(&plain), "usageMetadata"),
            _ => last_of(&serde_json::from_slice::<Vec<Value>>(&plain).unwrap(), "usageMetadata"),
        };
        let total = usage["totalTokenCount"].as_u64().unwrap();
        let recs = h.records(&user).await;
        let ai = of_kind(&recs, "ai_response");
        assert_eq!(ai.len(), 1, "{name}: {recs:?}");
        let ai = ai[0];
        assert_eq!(ai.tokens, total, "{name}: {ai:?}");
        assert_eq!(md(ai, "prompt_tokens"), usage["promptTokenCount"], "{name}");
        assert_eq!(md(ai, "output_tokens"), usage["candidatesTokenCount"], "{name}");
        assert_eq!(md(ai, "token_source"), "upstream", "{name}");
        assert_eq!(md(ai, "status"), "ok", "{name}");
        assert_eq!(
            md(ai, "response_bytes"),
            raw.len() as u64,
            "{name}: bytes the client received"
        );
        // gzip-always has no price of its own: tokens x 0.0001.
        assert_eq!(
            cost_str(ai),
            (Decimal::from(total) * dec("0.0001")).normalize().to_string(),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_from_the_upstream_split_anywhere_is_metered() {
    let up = RawUpstream::start().await;
    let h = Harness::start_against(up.addr, "").await;
    let want = Want {
        tokens: 1644,
        prompt: 1204,
        cached: 1000,
        output: 52,
        thoughts: 388,
        cost: "0.0011912".into(),
        response_bytes: gzip(SSE_CRLF).len() as u64,
    };
    run_splits(&h, "split-gz-sse", "sse", true, 3, want).await;
    let want = Want {
        tokens: 1644,
        prompt: 1204,
        cached: 0,
        output: 440,
        thoughts: 0,
        cost: "0.0014612".into(),
        response_bytes: gzip(OPENAI_STREAM).len() as u64,
    };
    run_splits(&h, "split-gz-openai", "openai", true, 11, want).await;
}

// ---------------------------------------------------------------------------------------------
// 4. Key forms

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_form_works_and_only_the_upstream_key_goes_upstream() {
    let h = Harness::start("").await;
    let key = h.user_with_key("kf", "free").await;
    let c = raw_client();
    let flash = "gemini-2.5-flash";
    // x-goog-api-key
    let r = c
        .post(h.url(&gen_path(flash, false, false)))
        .header("x-goog-api-key", &key)
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "header: {}", r.text().await.unwrap());
    // ?key= after and before alt=sse (alt must survive the key's removal)
    for q in [format!("alt=sse&key={key}"), format!("key={key}&alt=sse")] {
        let r = c
            .post(h.url(&format!("/v1beta/models/{flash}:streamGenerateContent?{q}")))
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "query {q}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        assert_eq!(sse_events(&r.bytes().await.unwrap()).len(), 5, "query {q}");
    }
    // Authorization: Bearer on a native path and on the OpenAI-compatible one
    let r = c
        .post(h.url(&gen_path(flash, false, false)))
        .bearer_auth(&key)
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "bearer native: {}", r.text().await.unwrap());
    let r = c
        .post(h.url("/v1beta/openai/chat/completions"))
        .bearer_auth(&key)
        .body(chat_body(flash, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "bearer openai: {}", r.text().await.unwrap());
    // Unmetered routes take the key too.
    let r = c.get(h.url(&format!("/v1beta/models?key={key}"))).send().await.unwrap();
    assert_eq!(r.status(), 200, "models list");
    let r = c
        .post(h.url(&format!("/v1beta/models/{flash}:countTokens")))
        .bearer_auth(&key)
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "countTokens");

    let s = h.mock_stats();
    assert_eq!(s["leaked_gateway_keys"], 0, "{s}");
    assert_eq!(s["requests"], 7, "{s}");
    assert_eq!(s["generate_requests"], 5, "{s}");
    let recs = h.records("kf").await;
    let ms = of_kind(&recs, "message_sent");
    assert_eq!(ms.len(), 5, "{recs:?}");
    assert!(ms.iter().all(|r| r.messages == 1), "{ms:?}");
    assert_eq!(of_kind(&recs, "ai_response").len(), 5);
    assert_eq!(h.current(&key).await["current_month"]["messages"], 5);
}

// ---------------------------------------------------------------------------------------------
// 5. 401s

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_get_401_and_never_reach_the_upstream() {
    let h = Harness::start("").await;
    let c = raw_client();
    let (revoked, revoked_id) = h.user_with_key_id("rev", "free").await;
    let gone = h.user_with_key("gone", "free").await;
    for k in [&revoked, &gone] {
        assert_eq!(
            h.generate(k, "gemini-2.5-flash", false).await.status(),
            200,
            "the key works before"
        );
    }
    let r = h
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{revoked_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .admin(reqwest::Method::DELETE, "/admin/users/gone")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let before = h.mock_stats()["requests"].clone();

    let unary = h.url(&gen_path("gemini-2.5-flash", false, false));
    let sse = h.url(&gen_path("gemini-2.5-flash", true, true));
    let chat = h.url("/v1beta/openai/chat/completions");
    let missing = "Missing API key";
    assert_envelope(
        c.post(&unary).body(PROMPT).send().await.unwrap(),
        401,
        "UNAUTHENTICATED",
        missing,
    )
    .await;
    assert_envelope(
        c.post(&sse).body(PROMPT).send().await.unwrap(),
        401,
        "UNAUTHENTICATED",
        missing,
    )
    .await;
    assert_envelope(
        c.post(&chat)
            .body(chat_body("gemini-2.5-flash", false))
            .send()
            .await
            .unwrap(),
        401,
        "UNAUTHENTICATED",
        missing,
    )
    .await;
    assert_envelope(
        c.get(h.url("/v1beta/models")).send().await.unwrap(),
        401,
        "UNAUTHENTICATED",
        missing,
    )
    .await;

    let invalid = "API key not valid";
    let wrong = format!("gm_{}", "Q7x".repeat(12));
    for k in [&wrong, &revoked, &gone] {
        let r = c
            .post(&unary)
            .header("x-goog-api-key", k.as_str())
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_envelope(r, 401, "UNAUTHENTICATED", invalid).await;
        let r = c.post(format!("{sse}&key={k}")).body(PROMPT).send().await.unwrap();
        assert_envelope(r, 401, "UNAUTHENTICATED", invalid).await;
        let r = c
            .post(&chat)
            .bearer_auth(k)
            .body(chat_body("gemini-2.5-flash", true))
            .send()
            .await
            .unwrap();
        assert_envelope(r, 401, "UNAUTHENTICATED", invalid).await;
    }
    // The upstream's own key is not a gateway key either.
    let r = c
        .post(&unary)
        .header("x-goog-api-key", UPSTREAM_KEY)
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_envelope(r, 401, "UNAUTHENTICATED", invalid).await;

    assert_eq!(
        h.mock_stats()["requests"],
        before,
        "no refused request may reach the upstream"
    );
    // The revoked key's user keeps only the usage of the call made before the revocation.
    assert_eq!(of_kind(&h.records("rev").await, "message_sent").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 6. Uploads

async fn upload_start(h: &Harness, c: &reqwest::Client, key: &str, n: u64) -> reqwest::Response {
    c.post(h.url("/upload/v1beta/files"))
        .header("x-goog-api-key", key)
        .header("content-type", JSON_CT)
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header("X-Goog-Upload-Header-Content-Length", n.to_string())
        .header("X-Goog-Upload-Header-Content-Type", "application/pdf")
        .body(
            json!({"file": {"displayName": "report", "mimeType": "application/pdf", "sizeBytes": n.to_string()}})
                .to_string(),
        )
        .send()
        .await
        .unwrap()
}

/// A chunk the way python-genai sends it: no key, the start call's headers again.
async fn upload_chunk(c: &reqwest::Client, url: &str, command: &str, offset: usize, data: &[u8]) -> reqwest::Response {
    c.post(url)
        .header("content-type", JSON_CT)
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", command)
        .header("X-Goog-Upload-Offset", offset.to_string())
        .body(data.to_vec())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumable_upload_like_python_genai_is_metered_by_bytes() {
    let h = Harness::start("[tiers.small]\nbytes = 1000\n").await;
    let c = raw_client();
    let key = h.user_with_key("up", "free").await;
    let n: usize = 2500;
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();

    let r = upload_start(&h, &c, &key, n as u64).await;
    assert_eq!(r.status(), 200);
    let url = r
        .headers()
        .get("x-goog-upload-url")
        .expect("x-goog-upload-url")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        url.starts_with(&format!("{}/upload/v1beta/files?", h.base)),
        "the upload URL must point at the gateway ({}): {url}",
        h.base
    );
    assert!(url.contains("upload_id="), "{url}");

    let r = upload_chunk(&c, &url, "upload", 0, &data[..1000]).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["x-goog-upload-status"], "active");
    let r = upload_chunk(&c, &url, "upload, finalize", 1000, &data[1000..]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-goog-upload-status"], "final");
    let file: Value = r.json().await.unwrap();
    assert_eq!(file["file"]["sizeBytes"], n.to_string(), "{file}");
    assert_eq!(h.mock_stats()["upload_bytes"], n as u64);
    assert_eq!(h.mock_stats()["leaked_gateway_keys"], 0);

    let recs = h.records("up").await;
    let ups = of_kind(&recs, "file_upload");
    assert!(!ups.is_empty(), "{recs:?}");
    assert_eq!(
        ups.len(),
        recs.len(),
        "an upload makes only file_upload records: {recs:?}"
    );
    assert_eq!(ups.iter().map(|r| r.bytes).sum::<u64>(), n as u64, "{ups:?}");
    for r in &ups {
        assert_eq!(r.cost, Decimal::from(r.bytes) * dec("0.00000001"), "{r:?}");
    }
    let total: Decimal = ups.iter().map(|r| r.cost).sum();
    assert_eq!(total.normalize().to_string(), "0.000025", "2500 x 0.00000001");
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["bytes"], n as u64, "{cur}");
    assert_eq!(cur["current_month"]["cost"], "0.000025", "{cur}");

    // A keyless chunk for a session the gateway never started.
    let before = h.mock_stats()["requests"].clone();
    let r = upload_chunk(
        &c,
        &h.url("/upload/v1beta/files?upload_id=NoSuchSession123&upload_protocol=resumable"),
        "upload, finalize",
        0,
        b"xyz",
    )
    .await;
    assert_envelope(r, 401, "UNAUTHENTICATED", "Missing API key").await;
    assert_eq!(
        h.mock_stats()["requests"],
        before,
        "the unknown chunk must not reach the upstream"
    );

    // The storage quota is checked at start, from the declared size.
    let small = h.user_with_key("small", "small").await;
    let r = upload_start(&h, &c, &small, 1001).await;
    let v = assert_envelope(
        r,
        403,
        "PERMISSION_DENIED",
        "You have reached your monthly storage limit.",
    )
    .await;
    assert_eq!(v["error"]["details"][0]["metadata"]["quota"], "bytes", "{v}");
    assert_eq!(
        h.mock_stats()["requests"],
        before,
        "a refused start must not reach the upstream"
    );
    let r = upload_start(&h, &c, &small, 400).await;
    assert_eq!(r.status(), 200, "400 of 1000 bytes fits");
    let url = r.headers()["x-goog-upload-url"].to_str().unwrap().to_string();
    let r = upload_chunk(&c, &url, "upload, finalize", 0, &data[..400]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.current(&small).await["current_month"]["bytes"], 400);
    let r = upload_start(&h, &c, &small, 700).await;
    assert_envelope(
        r,
        403,
        "PERMISSION_DENIED",
        "You have reached your monthly storage limit.",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Exact costs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_are_exact_to_the_last_digit() {
    let extra =
        "[pricing.models.\"gemini-2.5-flash-thinking\"]\ninput_per_million = \"0.30\"\noutput_per_million = \"2.50\"\n";
    let h = Harness::start(extra).await;
    let c = raw_client();
    let cases = [
        ("cost-flash", "free", "gemini-2.5-flash"),
        ("cost-thinking", "unlimited", "gemini-2.5-flash-thinking"),
        ("cost-unlisted", "free", "gemini-2.0-flash"),
    ];
    for (user, tier, model) in cases {
        let key = h.user_with_key(user, tier).await;
        let r = c
            .post(h.url(&gen_path(model, false, false)))
            .header("x-goog-api-key", &key)
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{model}");
        let v: Value = r.json().await.unwrap();
        let total = v["usageMetadata"]["totalTokenCount"].as_u64().unwrap();
        let recs = h.records(user).await;
        let ai = of_kind(&recs, "ai_response");
        assert_eq!(ai.len(), 1, "{recs:?}");
        let ai = ai[0];
        assert_eq!(ai.tokens, total, "{model}: {ai:?}");
        let want = match model {
            "gemini-2.5-flash" => flash_cost(ai),
            // No cached price: cached tokens (none here) would be billed at the input price.
            "gemini-2.5-flash-thinking" => {
                assert_eq!(
                    md(ai, "thoughts_tokens"),
                    7,
                    "the mock reports 7 thoughts tokens: {ai:?}"
                );
                priced_cost(ai, "0.30", "0.30", "2.50")
            }
            _ => (Decimal::from(total) * dec("0.0001")).normalize().to_string(),
        };
        assert_eq!(cost_str(ai), want, "{model}: {ai:?}");
        // The API renders it the same, unrounded.
        let hist: Value = c
            .get(h.url("/api/usage/history"))
            .header("x-goog-api-key", &key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let api = hist["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "ai_response")
            .cloned()
            .unwrap();
        assert_eq!(api["cost"], want, "{model}: {api}");
        assert_eq!(h.current(&key).await["current_month"]["cost"], want, "{model}");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. No plaintext secrets at rest or in logs

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogSink;

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of this test binary (gateway at trace level) to [`LOGS`].
fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let sub = tracing_subscriber::fmt()
            .with_writer(|| LogSink)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("gemini_meter=trace,debug"))
            .finish();
        let _ = tracing::subscriber::set_global_default(sub);
    });
}

fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_secrets_at_rest_or_in_logs() {
    capture_logs();
    let mut h = Harness::start("").await;
    let c = raw_client();
    let k1 = h.user_with_key("sec", "free").await;
    let k2 = h.create_key("sec").await;
    let flash = "gemini-2.5-flash";
    let ok = |r: reqwest::Response| assert_eq!(r.status(), 200, "{}", r.url());
    ok(c.post(h.url(&gen_path(flash, false, false)))
        .header("x-goog-api-key", &k1)
        .body(PROMPT)
        .send()
        .await
        .unwrap());
    ok(c.post(h.url(&format!(
        "/v1beta/models/{flash}:streamGenerateContent?alt=sse&key={k1}"
    )))
    .body(PROMPT)
    .send()
    .await
    .unwrap());
    ok(c.post(h.url(&gen_path(flash, true, false)))
        .bearer_auth(&k2)
        .body(PROMPT)
        .send()
        .await
        .unwrap());
    ok(c.post(h.url("/v1beta/openai/chat/completions"))
        .bearer_auth(&k2)
        .body(chat_body(flash, true))
        .send()
        .await
        .unwrap());
    ok(c.get(h.url(&format!("/v1beta/models?key={k2}"))).send().await.unwrap());
    let r = upload_start(&h, &c, &k2, 300).await;
    assert_eq!(r.status(), 200);
    let url = r.headers()["x-goog-upload-url"].to_str().unwrap().to_string();
    ok(upload_chunk(&c, &url, "upload", 0, &[7u8; 100]).await);
    // js-genai style: a key on the chunk (here in the query).
    ok(upload_chunk(&c, &format!("{url}&key={k1}"), "upload, finalize", 100, &[7u8; 200]).await);
    let wrong = format!("gm_{}", "Zw9".repeat(12));
    assert_eq!(
        c.post(h.url(&format!("{}?key={wrong}", gen_path(flash, false, false))))
            .body(PROMPT)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // A gateway whose upstream is down logs the failure: the keys must not be in that line.
    let mut down = Harness::start_against(closed_port(), "").await;
    let k3 = down.user_with_key("sec3", "free").await;
    let r = c
        .post(down.url(&format!(
            "/v1beta/models/{flash}:streamGenerateContent?alt=sse&key={k3}"
        )))
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let r = c
        .post(down.url("/v1beta/openai/chat/completions"))
        .bearer_auth(&k3)
        .body(chat_body(flash, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);

    h.stop().await;
    down.stop().await;
    h.app.store.flush().await.unwrap();
    down.app.store.flush().await.unwrap();

    let secrets = [k1.as_str(), k2.as_str(), k3.as_str(), wrong.as_str(), UPSTREAM_KEY];
    let mut files = Vec::new();
    files_under(h.dir.path(), &mut files);
    files_under(down.dir.path(), &mut files);
    let mut all = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for s in secrets {
            assert!(
                !contains(&bytes, s.as_bytes()),
                "{} holds a secret in plaintext ({}...)",
                f.display(),
                &s[..6]
            );
        }
        all.extend_from_slice(&bytes);
    }
    // Sanity: the scan read the real store (records are on disk as JSON).
    assert!(
        contains(&all, b"ai_response") && contains(&all, b"file_upload"),
        "the data directory holds no records: {files:?}"
    );

    let logs = LOGS.lock().unwrap().clone();
    assert!(
        contains(&logs, b"upstream"),
        "log capture saw nothing: {}",
        String::from_utf8_lossy(&logs)
    );
    for s in secrets {
        assert!(
            !contains(&logs, s.as_bytes()),
            "a secret ({}...) is in the logs",
            &s[..6]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Error statuses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_status_is_forwarded_and_recorded() {
    let h = Harness::start("").await;
    let c = raw_client();
    for (user, stream, sse) in [
        ("e500", false, false),
        ("e500-sse", true, true),
        ("e500-array", true, false),
    ] {
        let key = h.user_with_key(user, "free").await;
        let path = gen_path("error-500", stream, sse);
        let direct = c
            .post(format!("http://{}{path}", h.mock.addr))
            .header("x-goog-api-key", UPSTREAM_KEY)
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), 500);
        let direct = direct.bytes().await.unwrap();
        let r = c
            .post(h.url(&path))
            .header("x-goog-api-key", &key)
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "{user}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(JSON_CT));
        assert_eq!(
            r.bytes().await.unwrap(),
            direct,
            "{user}: the upstream's error body, unchanged"
        );

        let recs = h.records(user).await;
        assert_eq!(recs.len(), 2, "{user}: {recs:?}");
        let ms = of_kind(&recs, "message_sent");
        assert_eq!(ms.len(), 1, "{user}");
        assert_eq!(ms[0].messages, 0, "{user}: an upstream error is not a message");
        assert_eq!(md(ms[0], "upstream_status"), 500, "{user}");
        let ai = of_kind(&recs, "ai_response");
        assert_eq!(ai.len(), 1, "{user}");
        let ai = ai[0];
        assert_eq!(md(ai, "status"), "upstream_error", "{user}: {ai:?}");
        assert_eq!(md(ai, "upstream_status"), 500, "{user}");
        assert_eq!(ai.tokens, 0, "{user}");
        assert!(ai.cost.is_zero(), "{user}");
        let cur = h.current(&key).await;
        assert_eq!(cur["current_month"]["messages"], 0, "{user}: {cur}");
        assert_eq!(cur["current_month"]["tokens"], 0, "{user}: {cur}");
        assert_eq!(cur["current_month"]["cost"], "0", "{user}: {cur}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502() {
    let h = Harness::start_against(closed_port(), "").await;
    let c = raw_client();
    let key = h.user_with_key("down", "free").await;
    for (stream, sse) in [(false, false), (true, true)] {
        let r = c
            .post(h.url(&gen_path("gemini-2.5-flash", stream, sse)))
            .header("x-goog-api-key", &key)
            .body(PROMPT)
            .send()
            .await
            .unwrap();
        assert_envelope(r, 502, "UNAVAILABLE", "Upstream").await;
    }
    let r = c
        .post(h.url("/v1beta/openai/chat/completions"))
        .bearer_auth(&key)
        .body(chat_body("gemini-2.5-flash", true))
        .send()
        .await
        .unwrap();
    assert_envelope(r, 502, "UNAVAILABLE", "Upstream").await;
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["messages"], 0, "nothing was answered: {cur}");
    let recs = h.records("down").await;
    let (m, t, _, _) = sum(&recs);
    assert_eq!((m, t), (0, 0), "{recs:?}");
}

// ---------------------------------------------------------------------------------------------
// 10. Tags, and what exactly goes upstream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_recorded_and_caller_secrets_are_not_forwarded() {
    let up = RawUpstream::start().await;
    let h = Harness::start_against(up.addr, "").await;
    let c = raw_client();
    let tagged = h.user_with_key("tagged", "free").await;
    let key = h.user_with_key("plain", "free").await;
    let unary = h.url("/v1beta/models/gemini-2.5-flash:generateContent?fx=unary");

    let r = c
        .post(&unary)
        .header("x-goog-api-key", &tagged)
        .header("x-meter-tag-chat-id", "123")
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), UNARY);
    let r = c.post(format!("{unary}&key={key}")).body(PROMPT).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.post(&unary).bearer_auth(&key).body(PROMPT).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(h.url("/v1beta/openai/chat/completions?fx=openai"))
        .bearer_auth(&key)
        .body(chat_body("gemini-2.5-flash", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), OPENAI_STREAM);

    let seen = up.seen();
    assert_eq!(seen.len(), 4, "{seen:#?}");
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.header("x-goog-api-key"), Some(UPSTREAM_KEY), "request {i}: {s:#?}");
        assert!(
            s.headers.iter().all(|(n, _)| !n.starts_with("x-meter-tag")),
            "request {i}: tags must not be forwarded: {s:#?}"
        );
        assert!(
            !s.target.contains("key="),
            "request {i}: the caller's key must leave the query: {}",
            s.target
        );
        assert!(
            s.target.contains("fx="),
            "request {i}: the rest of the query stays: {}",
            s.target
        );
        for (n, v) in &s.headers {
            assert!(
                !v.contains("gm_") && !v.contains(&key) && !v.contains(&tagged),
                "request {i}: header {n} carries a gateway key"
            );
        }
    }
    assert_eq!(
        seen[3].header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str()),
        "OpenAI compat is authorised by bearer"
    );

    let recs = h.records("tagged").await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        assert_eq!(
            md(r, "tags"),
            json!({"chat-id": "123"}),
            "{} record: {r:?}",
            r.kind().as_str()
        );
    }
    assert!(
        h.records("plain")
            .await
            .iter()
            .all(|r| r.metadata().get("tags").is_none())
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Streams that do not end cleanly

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_cancels_upstream_and_is_recorded() {
    let h = Harness::start("").await;
    let c = raw_client();
    let key = h.user_with_key("leaver", "free").await;
    let mut r = c
        .post(h.url(&gen_path("slow", true, true)))
        .header("x-goog-api-key", &key)
        .body(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut first = Vec::new();
    while !contains(&first, b"\r\n\r\n") {
        first.extend_from_slice(&r.chunk().await.unwrap().expect("the first event"));
    }
    drop(r);
    let usage = last_of(&sse_events(&first), "usageMetadata");
    let first_total = usage["totalTokenCount"].as_u64().unwrap();

    let deadline = Instant::now() + Duration::from_secs(2);
    while h.mock_stats()["streams_cancelled"] == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = h.mock_stats();
    assert_eq!(
        s["streams_cancelled"], 1,
        "the upstream stream must be cancelled within 2 s: {s}"
    );
    assert_eq!(s["streams_completed"], 0, "{s}");

    let recs = wait_for_record(&h, "leaver", "ai_response", Duration::from_secs(2)).await;
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), 1, "{recs:?}");
    let ai = ai[0];
    assert_eq!(md(ai, "status"), "client_closed", "{ai:?}");
    assert_eq!(
        md(ai, "token_source"),
        "upstream",
        "usage was on the first event: {ai:?}"
    );
    assert_eq!(md(ai, "prompt_tokens"), usage["promptTokenCount"], "{ai:?}");
    // The gateway may have read an event or two more before it noticed, but never less than
    // the client saw, and not the whole stream (5 events of 3 output tokens each).
    assert!(
        ai.tokens >= first_total && ai.tokens < first_total + 12,
        "{ai:?} vs first event total {first_total}"
    );
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["tokens"], ai.tokens, "{cur}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_and_midstream_error_end_the_client_stream_with_an_error() {
    let h = Harness::start("").await;
    let c = raw_client();
    let cases = [
        ("cut-sse", "cut", true, "upstream_closed"),
        ("cut-array", "cut", false, "upstream_closed"),
        ("mid-sse", "midstream-error", true, "upstream_error"),
    ];
    for (user, model, sse, want_status) in cases {
        let key = h.user_with_key(user, "free").await;
        let r = c
            .post(h.url(&gen_path(model, true, sse)))
            .header("x-goog-api-key", &key)
            .body(PROMPT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{user}: the whole response was lost, status line included: {e:?}"));
        assert_eq!(r.status(), 200, "{user}");
        let (got, err) = match read_body(r).await {
            Ok(b) => panic!(
                "{user}: the client's body must end in an error, not a clean end; got {:?}",
                String::from_utf8_lossy(&b)
            ),
            Err(e) => e,
        };
        assert!(!err.is_empty());
        let recs = wait_for_record(&h, user, "ai_response", Duration::from_secs(2)).await;
        let ai = of_kind(&recs, "ai_response");
        assert_eq!(ai.len(), 1, "{user}: {recs:?}");
        let ai = ai[0];
        assert_eq!(md(ai, "status"), want_status, "{user}: {ai:?}");
        assert_eq!(md(ai, "token_source"), "upstream", "{user}: {ai:?}");
        assert_eq!(md(ai, "upstream_status"), 200, "{user}");
        // Every byte the gateway forwarded (and counted) must reach the client before the error.
        assert_eq!(
            md(ai, "response_bytes"),
            got.len() as u64,
            "{user}: the client received only {:?}",
            String::from_utf8_lossy(&got)
        );
        if model == "midstream-error" {
            // SDKs raise the error from this object (gemini-wire.md section 3.3).
            assert!(
                contains(&got, b"\"error\""),
                "{user}: the upstream's error object must reach the client before the failure; got {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        let usage = if sse {
            last_of(&sse_events(&got), "usageMetadata")
        } else {
            // `[{...}\r\n,\r\n{...}` then the cut: parse the complete elements seen.
            let text = String::from_utf8_lossy(&got).to_string();
            let body = text.trim_start_matches('[');
            let ev: Vec<Value> = body
                .split("\r\n,\r\n")
                .filter_map(|e| serde_json::from_str(e).ok())
                .collect();
            assert_eq!(ev.len(), 2, "{user}: {text}");
            last_of(&ev, "usageMetadata")
        };
        assert_eq!(
            ai.tokens,
            usage["totalTokenCount"].as_u64().unwrap(),
            "{user}: the usage the client saw: {ai:?}"
        );
    }
}
