//! Hard enforcement of token and cost quotas (issue 14): a call reserves its worst case at
//! admission, its output cap is lowered to what is left, and the reservation is replaced by the
//! actual usage (or released) however the call ends. Real sockets, the built-in mock upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use common::Harness;
use gemini_meter_mock::MockOptions;
use rust_decimal::Decimal;
use serde_json::{Value, json};

const CAPPED: &str = "x-quota-output-capped";

fn body(cap: u64) -> Value {
    json!({
        "contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}],
        "generationConfig": {"maxOutputTokens": cap}
    })
}

/// The prompt estimate of a body: one token per byte of the JSON sent.
fn estimate(b: &Value) -> u64 {
    serde_json::to_vec(b).unwrap().len() as u64
}

struct Answer {
    status: u16,
    capped: Option<u64>,
    /// `x-quota-tokens-reserved`: what calls in flight hold as of admission, this one included.
    reserved: Option<u64>,
    body: Value,
}

async fn send(h: &Harness, key: &str, model: &str, b: &Value) -> Answer {
    let r = h
        .http
        .post(h.url(&format!("/v1beta/models/{model}:generateContent")))
        .header("x-goog-api-key", key)
        .json(b)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let num = |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().parse().unwrap());
    let (capped, reserved) = (num(CAPPED), num("x-quota-tokens-reserved"));
    let body = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        capped,
        reserved,
        body,
    }
}

/// Polls until nothing is reserved for the user (every call in flight has settled); returns
/// the `current` body then.
async fn settled(h: &Harness, key: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let cur = h.current(key).await;
        if cur["reserved"]["tokens"] == 0 && cur["reserved"]["cost"] == "0" {
            return cur;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "still reserved: {cur}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mock_caps(h: &Harness) -> Vec<u64> {
    h.mock.stats.output_caps.lock().unwrap().clone()
}

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap()).unwrap()
}

// A sequence of calls: each fits whole while it can, then is lowered to exactly what is left
// (the mock sees the lowered cap), then refused only once not even 16 output tokens fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_are_lowered_to_what_is_left_and_refused_only_when_nothing_fits() {
    let limit = 600u64;
    let h = Harness::start(&format!("[tiers.hard]\ntokens = {limit}\n")).await;
    let key = h.user_with_key("seq", "hard").await;
    let b = body(100);
    let prompt = estimate(&b);
    let mut capped_seen = 0;
    for _ in 0..50 {
        let used = h.current(&key).await["current_month"]["tokens"].as_u64().unwrap();
        let left = limit - used;
        let a = send(&h, &key, "gemini-2.5-flash", &b).await;
        if left < prompt + 16 {
            assert_eq!(a.status, 403, "nothing fits with {left} left: {:?}", a.body);
            assert_eq!(a.body["error"]["details"][0]["metadata"]["quota"], "tokens");
            break;
        }
        assert_eq!(a.status, 200, "{left} left: {:?}", a.body);
        assert_eq!(
            a.reserved,
            Some(prompt + a.capped.unwrap_or(100)),
            "this call's worst case, shown apart"
        );
        if left >= prompt + 100 {
            assert_eq!(a.capped, None);
        } else {
            let want = left - prompt;
            assert_eq!(a.capped, Some(want), "{left} left");
            assert_eq!(mock_caps(&h).last(), Some(&want), "the mock saw the lowered cap");
            let u = &a.body["usageMetadata"];
            let out = u["candidatesTokenCount"].as_u64().unwrap_or(0) + u["thoughtsTokenCount"].as_u64().unwrap_or(0);
            assert!(out <= want, "{u}");
            capped_seen += 1;
        }
        settled(&h, &key).await;
    }
    assert!(capped_seen > 0, "some call was capped");
    let cur = settled(&h, &key).await;
    assert!(cur["current_month"]["tokens"].as_u64().unwrap() <= limit, "{cur}");
    // Calls under the cap went as sent: the mock saw the request's own cap, never a higher one.
    assert!(mock_caps(&h).iter().all(|&c| c <= 100));
}

async fn race(h: &Harness, key: &str, n: usize, model: &str, cap: u64) -> (usize, usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (http, url, key) = (
            h.http.clone(),
            h.url(&format!("/v1beta/models/{model}:generateContent")),
            key.to_string(),
        );
        let b = body(cap);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .header("x-goog-api-key", key)
                .json(&b)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let capped = r
                .headers()
                .get(CAPPED)
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let _ = r.bytes().await;
            (status, capped)
        }));
    }
    let (mut ok, mut refused, mut capped) = (0, 0, 0);
    for t in tasks {
        let (status, c) = t.await.unwrap();
        match status {
            200 => ok += 1,
            403 => refused += 1,
            s => panic!("unexpected status {s}"),
        }
        if let Some(c) = c {
            assert!(c < cap, "capped below what was asked");
            assert!(c >= 16, "never below min_output_tokens");
            capped += 1;
        }
    }
    (ok, refused, capped)
}

// 200 calls at once against a token limit, over several rounds: the month never ends past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_take_tokens_past_the_limit() {
    let limit = 3000u64;
    let h = Harness::start(&format!("[tiers.hard]\ntokens = {limit}\n")).await;
    for round in 0..5 {
        let key = h.user_with_key(&format!("tok{round}"), "hard").await;
        let (ok, refused, capped) = race(&h, &key, 200, "gemini-2.5-flash", 120).await;
        let cur = settled(&h, &key).await;
        let used = cur["current_month"]["tokens"].as_u64().unwrap();
        assert!(used <= limit, "round {round}: {used} > {limit}: {cur}");
        assert!(
            ok > 0 && refused > 0,
            "round {round}: only some admitted ({ok} ok, {refused} refused)"
        );
        assert_eq!(cur["current_month"]["messages"].as_u64().unwrap(), ok as u64, "{cur}");
        eprintln!("round {round}: {ok} ok, {refused} refused, {capped} capped, {used} used");
    }
}

// The same against a cost limit (gemini-2.5-flash: $0.30 in, $2.50 out per million).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_take_cost_past_the_limit() {
    let limit = Decimal::from_str("0.001").unwrap();
    let h = Harness::start("[tiers.hard]\ncost = \"0.001\"\n").await;
    for round in 0..5 {
        let key = h.user_with_key(&format!("cost{round}"), "hard").await;
        let (ok, refused, _) = race(&h, &key, 200, "gemini-2.5-flash", 120).await;
        let cur = settled(&h, &key).await;
        let spent = dec(&cur["current_month"]["cost"]);
        assert!(spent <= limit, "round {round}: {spent} > {limit}: {cur}");
        assert!(ok > 0 && refused > 0, "round {round}: {ok} ok, {refused} refused");
    }
}

// Nothing stays reserved however a call ends: an upstream 5xx, a stream the upstream cuts, a
// client that leaves mid-stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_released_however_a_call_ends() {
    let h = Harness::start("[tiers.hard]\ntokens = 100000\n").await;
    let key = h.user_with_key("ends", "hard").await;
    let b = body(100);

    let a = send(&h, &key, "error-500", &b).await;
    assert_eq!(a.status, 500);
    let cur = settled(&h, &key).await;
    assert_eq!(
        cur["current_month"]["messages"], 0,
        "a failed call uses no message: {cur}"
    );

    // The upstream cuts the stream.
    let r = h
        .http
        .post(h.url("/v1beta/models/cut:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", &key)
        .json(&b)
        .send()
        .await
        .unwrap();
    let _ = r.bytes().await;
    settled(&h, &key).await;

    // The client leaves after the first event.
    let mut r = h
        .http
        .post(h.url("/v1beta/models/slow:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", &key)
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.chunk().await.unwrap();
    drop(r);
    let cur = settled(&h, &key).await;
    assert!(cur["current_month"]["tokens"].as_u64().unwrap() > 0, "{cur}");
}

// The client leaves before the upstream answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_before_the_answer_releases_its_reservation() {
    let opts = MockOptions {
        ttfb: Duration::from_millis(500),
        ..MockOptions::default()
    };
    let h = Harness::start_with("[tiers.hard]\ntokens = 100000\n", opts).await;
    let key = h.user_with_key("early", "hard").await;
    let (http, url, k) = (
        h.http.clone(),
        h.url("/v1beta/models/gemini-2.5-flash:generateContent"),
        key.clone(),
    );
    let task = tokio::spawn(async move { http.post(url).header("x-goog-api-key", k).json(&body(100)).send().await });
    let t0 = Instant::now();
    while h.mock_stats()["generate_requests"] == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the call reached the mock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cur = h.current(&key).await;
    assert!(cur["reserved"]["tokens"].as_u64().unwrap() > 0, "in flight: {cur}");
    task.abort();
    let cur = settled(&h, &key).await;
    assert_eq!(cur["current_month"]["messages"], 0, "{cur}");
}

// Soft enforcement behaves as before: checked against what is used, charged at the end, the
// body forwarded as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_mode_checks_used_and_charges_at_the_end() {
    let h = Harness::start("[tiers.soft]\ntokens = 1\nenforcement = \"soft\"\n").await;
    let key = h.user_with_key("soft", "soft").await;
    let a = send(&h, &key, "gemini-2.5-flash", &body(100)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.capped, None);
    let cur = settled(&h, &key).await;
    assert!(cur["current_month"]["tokens"].as_u64().unwrap() > 1, "{cur}");
    assert_eq!(send(&h, &key, "gemini-2.5-flash", &body(100)).await.status, 403);
}

// The OpenAI-compatible endpoint: `max_tokens` is lowered the same way, and a native call's
// thinking budget counts against the same cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_thinking_calls_are_capped_too() {
    let chat = json!({
        "model": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "Name three primes."}],
        "max_tokens": 100
    });
    let think = json!({
        "contents": [{"role": "user", "parts": [{"text": "Think."}]}],
        "generationConfig": {"maxOutputTokens": 500, "thinkingConfig": {"thinkingBudget": 400}}
    });
    let limit = estimate(&chat) + 40;
    let think_limit = estimate(&think) + 60;
    let h = Harness::start(&format!(
        "[tiers.hard]\ntokens = {limit}\n[tiers.think]\ntokens = {think_limit}\n"
    ))
    .await;
    let key = h.user_with_key("oa", "hard").await;
    let r = h
        .http
        .post(h.url("/v1beta/openai/chat/completions"))
        .bearer_auth(&key)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get(CAPPED).unwrap(), "40");
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 40, "{v}");
    assert_eq!(mock_caps(&h), [40]);
    let cur = settled(&h, &key).await;
    assert!(cur["current_month"]["tokens"].as_u64().unwrap() <= limit, "{cur}");

    // A thinking model with a budget above the cap: thoughts plus answer stay within it.
    let key = h.user_with_key("thinker", "think").await;
    let left = 60;
    let a = send(&h, &key, "gemini-2.5-flash-thinking", &think).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.capped, Some(left));
    let u = &a.body["usageMetadata"];
    let out = u["candidatesTokenCount"].as_u64().unwrap_or(0) + u["thoughtsTokenCount"].as_u64().unwrap_or(0);
    assert!(out <= left, "{u}");
    assert!(u["thoughtsTokenCount"].as_u64().unwrap() > 0, "{u}");
    let cur = settled(&h, &key).await;
    assert!(cur["current_month"]["tokens"].as_u64().unwrap() <= think_limit, "{cur}");
}

// SIGTERM while a call streams: the drain settles it, and after the restart nothing is
// reserved and the month's counters are what the records say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_leaves_nothing_reserved() {
    let h = Harness::start("[tiers.hard]\ntokens = 100000\n").await;
    let key = h.user_with_key("restart", "hard").await;
    let mut r = h
        .http
        .post(h.url("/v1beta/models/slow:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", &key)
        .json(&body(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.chunk().await.unwrap();
    let cur = h.current(&key).await;
    assert!(cur["reserved"]["tokens"].as_u64().unwrap() > 0, "in flight: {cur}");
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = r.chunk().await {} });
    let h = h.reopen(&[]).await;
    let _ = reader.await;
    let cur = h.current(&key).await;
    assert_eq!(cur["reserved"]["tokens"], 0, "{cur}");
    assert_eq!(cur["reserved"]["cost"], "0", "{cur}");
    let (messages, tokens, _, _) = common::sum(&h.records("restart").await);
    assert_eq!(cur["current_month"]["tokens"].as_u64().unwrap(), tokens, "{cur}");
    assert_eq!(cur["current_month"]["messages"].as_u64().unwrap(), messages, "{cur}");
    assert!(tokens > 0 && tokens <= 100000, "{cur}");
}
