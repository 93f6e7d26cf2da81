//! `GET /api/usage/stream`: Server-Sent Events of the caller's usage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Harness;
use futures_util::StreamExt;
use gemini_meter::api::stream::{StreamTiming, events};
use serde_json::Value;

/// One item of an SSE stream.
#[derive(Debug)]
enum Sse {
    Event { event: String, data: String },
    Comment,
}

/// Reads SSE items from a response.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    fn new(resp: reqwest::Response) -> Self {
        SseReader {
            resp,
            buf: String::new(),
        }
    }

    /// The next item, or `None` when the stream ended or nothing came within `within`.
    async fn next(&mut self, within: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                if let Some(item) = parse_block(block.trim_end_matches('\n')) {
                    return Some(item);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?
                .ok()??;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next `usage` event's body.
    async fn usage(&mut self, within: Duration) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next(left).await? {
                Sse::Event { event, data } if event == "usage" => {
                    return Some(serde_json::from_str(&data).unwrap());
                }
                _ => continue,
            }
        }
    }
}

fn parse_block(block: &str) -> Option<Sse> {
    let mut event = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    let mut comment = false;
    for line in block.lines() {
        if line.starts_with(':') {
            comment = true;
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_string(),
            "data" => data.push(value),
            _ => {}
        }
    }
    if !data.is_empty() {
        Some(Sse::Event {
            event,
            data: data.join("\n"),
        })
    } else {
        comment.then_some(Sse::Comment)
    }
}

async fn open(h: &Harness, key: &str) -> SseReader {
    let r = h
        .http
        .get(h.url("/api/usage/stream"))
        .header("x-goog-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    SseReader::new(r)
}

/// Waits until `f` holds (the broadcast subscription appears or goes away).
async fn eventually(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn stream_delivers_an_update_within_a_second_of_a_request_ending() {
    let h = Harness::start("").await;
    let key = h.user_with_key("sse-user", "free").await;
    let mut s = open(&h, &key).await;
    let first = s
        .usage(Duration::from_secs(2))
        .await
        .expect("the current state at once");
    assert_eq!(first["user_id"], "sse-user");
    assert_eq!(first["current_month"]["messages"], 0);
    assert_eq!(first["limits"]["messages"], 100);
    assert_eq!(first, h.current(&key).await, "the event carries the `current` body");

    for (n, stream) in [(1u64, false), (2, true)] {
        let r = h.generate(&key, "gemini-2.5-flash", stream).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let ended = Instant::now();
        let want = h.current(&key).await;
        assert_eq!(want["current_month"]["messages"], n);
        // Events until the state matches the settled counters (tokens included).
        loop {
            let left = Duration::from_secs(1)
                .checked_sub(ended.elapsed())
                .expect("no update within a second of the request ending");
            let v = s
                .usage(left)
                .await
                .expect("no update within a second of the request ending");
            if v["current_month"] == want["current_month"] {
                break;
            }
        }
        let took = ended.elapsed();
        eprintln!("call {n} (stream={stream}): update {took:?} after the response ended");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}

#[tokio::test]
async fn stream_takes_every_key_form_and_refuses_bad_keys() {
    let h = Harness::start("").await;
    let key = h.user_with_key("forms", "free").await;
    let by_query = h
        .http
        .get(h.url(&format!("/api/usage/stream?key={key}")))
        .send()
        .await
        .unwrap();
    let by_bearer = h
        .http
        .get(h.url("/api/usage/stream"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    for r in [by_query, by_bearer] {
        assert_eq!(r.status(), 200);
        let mut s = SseReader::new(r);
        let v = s.usage(Duration::from_secs(2)).await.unwrap();
        assert_eq!(v["user_id"], "forms");
    }
    let bad = h
        .http
        .get(h.url("/api/usage/stream"))
        .header("x-goog-api-key", "gm_0123456789abcdefghijABCDEFGHIJ0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let v: Value = bad.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().starts_with("API key not valid"));
    let none = h.http.get(h.url("/api/usage/stream")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let v: Value = none.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().starts_with("Missing API key"));
}

#[tokio::test]
async fn stream_reports_only_the_callers_changes_and_coalesces_bursts() {
    let h = Harness::start("").await;
    let key = h.user_with_key("watched", "unlimited").await;
    let other = h.user_with_key("someone-else", "unlimited").await;
    let mut s = open(&h, &key).await;
    s.usage(Duration::from_secs(2)).await.unwrap();

    // Another user's calls say nothing on this stream.
    for _ in 0..3 {
        h.generate(&other, "gemini-2.5-flash", false)
            .await
            .bytes()
            .await
            .unwrap();
    }
    assert!(
        s.usage(Duration::from_millis(400)).await.is_none(),
        "an event for someone else's usage"
    );

    // A burst of 20 concurrent calls: far fewer events than changes, the last one exact.
    let started = Instant::now();
    let burst = futures_util::future::join_all((0..20).map(|i| {
        let h = &h;
        let key = key.clone();
        async move {
            h.generate(&key, "gemini-2.5-flash", i % 2 == 0)
                .await
                .bytes()
                .await
                .unwrap()
        }
    }));
    let (_, events) = tokio::join!(burst, async {
        let mut n = 0u32;
        let mut last = Instant::now();
        loop {
            let Some(v) = s.usage(Duration::from_secs(2)).await else {
                break;
            };
            n += 1;
            last = Instant::now();
            if v["current_month"]["messages"] == 20
                && v["current_month"]["tokens"].as_u64() == h.current(&key).await["current_month"]["tokens"].as_u64()
            {
                break;
            }
        }
        (n, last)
    });
    let (n, last) = events;
    let span = last.duration_since(started);
    // At most one event per ~100 ms (plus the one that may start the burst).
    let allowed = (span.as_millis() / 100) as u32 + 2;
    eprintln!("{n} events for 40 changes over {span:?} (allowed {allowed})");
    assert!(n <= allowed, "{n} events in {span:?}");
    assert!(n >= 1);
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["messages"], 20);
}

#[tokio::test]
async fn stream_goes_away_with_its_client_and_with_the_server() {
    let mut h = Harness::start("").await;
    let key = h.user_with_key("leaver", "free").await;
    let app = h.app.clone();
    assert_eq!(app.usage_events.receiver_count(), 0);
    let mut s = open(&h, &key).await;
    s.usage(Duration::from_secs(2)).await.unwrap();
    assert_eq!(app.usage_events.receiver_count(), 1);
    // The client leaves: the body (and its subscription) is dropped; nothing lingers.
    drop(s);
    eventually(
        "the stream to be dropped after the client left",
        Duration::from_secs(5),
        || app.usage_events.receiver_count() == 0,
    )
    .await;

    // Shutdown ends open streams instead of waiting for the drain timeout.
    let mut s = open(&h, &key).await;
    s.usage(Duration::from_secs(2)).await.unwrap();
    let t = Instant::now();
    h.stop().await;
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "shutdown waited {:?} for an open stream",
        t.elapsed()
    );
    assert!(
        s.next(Duration::from_secs(2)).await.is_none(),
        "the stream ends at shutdown"
    );
    eventually("the stream to be dropped at shutdown", Duration::from_secs(5), || {
        app.usage_events.receiver_count() == 0
    })
    .await;
}

#[tokio::test]
async fn stream_sends_heartbeats_and_ends_when_the_key_is_revoked() {
    let h = Harness::start("").await;
    let (key, key_id) = h.user_with_key_id("beats", "free").await;
    let entry = h.app.registry.identify(&key).unwrap();
    let timing = StreamTiming {
        min_gap: Duration::from_millis(100),
        ping: Duration::from_millis(200),
    };
    assert_eq!(StreamTiming::default().ping, Duration::from_secs(15));
    let mut st = Box::pin(events(Arc::clone(&h.app), entry, timing));
    let first = String::from_utf8(st.next().await.unwrap().to_vec()).unwrap();
    assert!(first.starts_with("retry: 3000\nevent: usage\ndata: {"), "{first}");
    assert!(first.ends_with("}\n\n"));
    let t = Instant::now();
    let ping = tokio::time::timeout(Duration::from_secs(2), st.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&ping[..], b": ping\n\n");
    assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());

    let r = h
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{key_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let end = tokio::time::timeout(Duration::from_secs(2), st.next()).await.unwrap();
    assert!(end.is_none(), "the stream of a revoked key ends at the next heartbeat");
}
