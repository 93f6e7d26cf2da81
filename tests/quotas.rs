//! Tiers, monthly quotas and rate limits, end to end over real sockets: exact message quotas
//! under concurrency, the error envelopes of every refusal, `x-quota-*` headers, tier changes,
//! hot reload of the config file and the month rollover.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use common::{Harness, base_config};
use futures_util::StreamExt;
use gemini_meter::clock::Clock;
use gemini_meter_mock::MockOptions;
use reqwest::Method;
use reqwest::header::HeaderMap;
use rust_decimal::Decimal;
use serde_json::{Value, json};

const QUOTA_MESSAGES: &str = "You have reached your monthly message limit. Upgrade your plan to increase limit.";
const QUOTA_TOKENS: &str = "You have reached your monthly token limit.";
const QUOTA_COST: &str = "You have reached your monthly spending limit.";

/// A response read to its end.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HeaderMap,
    text: String,
    body: Value,
}

impl Resp {
    async fn read(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("read the response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII header"))
    }

    /// Asserts the Gemini error envelope: code, status and the start of the message.
    fn assert_error(&self, code: u16, status: &str, prefix: &str) {
        assert_eq!(self.status, code, "expected {code}, got {}: {}", self.status, self.text);
        let e = &self.body["error"];
        assert_eq!(e["code"], code, "envelope code: {}", self.text);
        assert_eq!(e["status"], status, "envelope status: {}", self.text);
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with(prefix), "message {msg:?} should start with {prefix:?}");
    }

    /// Asserts a 403 MONTHLY_QUOTA_EXCEEDED for `quota`; returns its metadata.
    fn assert_quota_refusal(&self, quota: &str, prefix: &str) -> &Value {
        self.assert_error(403, "PERMISSION_DENIED", prefix);
        let d = &self.body["error"]["details"][0];
        assert_eq!(d["@type"], "type.googleapis.com/google.rpc.ErrorInfo", "{}", self.text);
        assert_eq!(d["reason"], "MONTHLY_QUOTA_EXCEEDED", "{}", self.text);
        assert_eq!(d["domain"], "gemini-meter", "{}", self.text);
        let md = &d["metadata"];
        assert_eq!(md["quota"], quota, "{}", self.text);
        for k in ["used", "limit", "resets_at"] {
            assert!(md[k].is_string(), "metadata.{k} must be a string: {}", self.text);
        }
        md
    }

    /// Asserts a 429 RESOURCE_EXHAUSTED with a whole-seconds Retry-After of at least 1.
    fn assert_rate_limited(&self) -> u64 {
        self.assert_error(429, "RESOURCE_EXHAUSTED", "Rate limit exceeded");
        let ra = self.header("retry-after").expect("a 429 carries Retry-After");
        let secs: u64 = ra
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {ra:?} is not whole seconds"));
        assert!(secs >= 1, "Retry-After {secs} must be at least 1");
        secs
    }
}

async fn call(h: &Harness, key: &str, model: &str) -> Resp {
    Resp::read(h.generate(key, model, false).await).await
}

async fn call_sse(h: &Harness, key: &str, model: &str) -> Resp {
    Resp::read(h.generate(key, model, true).await).await
}

async fn admin_json(h: &Harness, method: Method, path: &str, body: Option<Value>) -> Resp {
    let mut rb = h.admin(method, path);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    Resp::read(rb.send().await.unwrap()).await
}

fn start_of_next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap()
}

fn month_label(t: DateTime<Utc>) -> String {
    t.format("%Y-%m").to_string()
}

fn rfc3339_z(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Polls `f` every 50 ms until it is true or `limit` passes; returns the time it took.
async fn wait_for<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if f().await {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn config_status(h: &Harness) -> Value {
    let r = admin_json(h, Method::GET, "/admin/config/status", None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn gen_requests(h: &Harness) -> u64 {
    h.mock_stats()["generate_requests"].as_u64().unwrap()
}

// 1. The message quota is exact under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_quota_is_exact_under_50_concurrent_requests() {
    let h = Harness::start("[tiers.five]\nmessages = 5\n").await;
    let key = h.user_with_key("racer", "five").await;
    let url = h.url("/v1beta/models/gemini-2.5-flash:generateContent");
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]});
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (client, url, key, body) = (h.http.clone(), url.clone(), key.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("x-goog-api-key", key)
                .json(&body)
                .send()
                .await
                .expect("send");
            Resp::read(r).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let ok = results.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Resp> = results.iter().filter(|r| r.status != 200).collect();
    assert_eq!(
        ok,
        5,
        "exactly the limit is admitted; statuses: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 45);
    let resets = rfc3339_z(start_of_next_month(h.clock.now()));
    for r in refused {
        let md = r.assert_quota_refusal("messages", QUOTA_MESSAGES);
        assert_eq!(md["used"], "5", "{}", r.text);
        assert_eq!(md["limit"], "5", "{}", r.text);
        assert_eq!(md["resets_at"], resets.as_str(), "{}", r.text);
    }
    assert_eq!(gen_requests(&h), 5, "only admitted requests reach the upstream");
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["messages"], 5, "{cur}");
    let sent = h
        .records("racer")
        .await
        .iter()
        .filter(|r| r.kind().as_str() == "message_sent" && r.messages == 1)
        .count();
    assert_eq!(sent, 5);
}

// 2. The limit-2 example from the contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_two_admits_two_then_refuses_with_remaining_headers() {
    let h = Harness::start("[tiers.two]\nmessages = 2\n").await;
    let key = h.user_with_key("bob", "two").await;
    let r1 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    assert_eq!(r1.header("x-quota-messages-limit"), Some("2"));
    assert_eq!(r1.header("x-quota-messages-remaining"), Some("1"));
    let r2 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r2.status, 200, "{}", r2.text);
    assert_eq!(r2.header("x-quota-messages-remaining"), Some("0"));
    let r3 = call(&h, &key, "gemini-2.5-flash").await;
    let md = r3.assert_quota_refusal("messages", QUOTA_MESSAGES);
    assert_eq!(md["used"], "2");
    assert_eq!(md["limit"], "2");
    // A refused streaming call is refused the same way, before anything is sent upstream.
    let r4 = call_sse(&h, &key, "gemini-2.5-flash").await;
    r4.assert_quota_refusal("messages", QUOTA_MESSAGES);
    assert_eq!(gen_requests(&h), 2);
}

// 3. An upstream 5xx does not use up a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_does_not_count_against_the_message_quota() {
    let h = Harness::start("[tiers.two]\nmessages = 2\n").await;
    let key = h.user_with_key("carol", "two").await;
    let e500 = call(&h, &key, "error-500").await;
    assert_eq!(e500.status, 500, "{}", e500.text);
    let e503 = call_sse(&h, &key, "error-503").await;
    assert_eq!(e503.status, 503, "{}", e503.text);
    let cur = h.current(&key).await;
    assert_eq!(
        cur["current_month"]["messages"], 0,
        "failed calls are not counted: {cur}"
    );
    let r1 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    assert_eq!(r1.header("x-quota-messages-remaining"), Some("1"));
    let r2 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r2.status, 200, "{}", r2.text);
    let r3 = call(&h, &key, "gemini-2.5-flash").await;
    r3.assert_quota_refusal("messages", QUOTA_MESSAGES);
    assert_eq!(
        gen_requests(&h),
        4,
        "two failed and two admitted calls reached the upstream"
    );
    let recs = h.records("carol").await;
    let failed: Vec<_> = recs
        .iter()
        .filter(|r| r.kind().as_str() == "message_sent" && r.metadata()["status"] == "upstream_error")
        .collect();
    assert_eq!(failed.len(), 2, "{recs:?}");
    assert!(failed.iter().all(|r| r.messages == 0), "{failed:?}");
    assert_eq!(common::sum(&recs).0, 2, "counters equal the sum of the records");
}

// 4. requests_per_minute is per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_is_enforced_per_key() {
    let h = Harness::start("[tiers.rpm]\nrequests_per_minute = 2\n").await;
    let key = h.user_with_key("dave", "rpm").await;
    for i in 0..2 {
        let r = call(&h, &key, "gemini-2.5-flash").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
    }
    let r3 = call(&h, &key, "gemini-2.5-flash").await;
    r3.assert_rate_limited();
    // Non-metered routes are rate limited too.
    let list = Resp::read(
        h.http
            .get(h.url("/v1beta/models"))
            .header("x-goog-api-key", &key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    list.assert_rate_limited();
    assert_eq!(gen_requests(&h), 2, "a rate-limited call never reaches the upstream");
    // Another key of the same user has its own budget.
    let key2 = h.create_key("dave").await;
    for i in 0..2 {
        let r = call(&h, &key2, "gemini-2.5-flash").await;
        assert_eq!(r.status, 200, "second key, request {i}: {}", r.text);
    }
    call(&h, &key2, "gemini-2.5-flash").await.assert_rate_limited();
    let cur = h.current(&key).await;
    assert_eq!(
        cur["current_month"]["messages"], 4,
        "refused calls use no message: {cur}"
    );
}

// 5. tokens_per_minute is per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_is_enforced_per_user() {
    let h = Harness::start("[tiers.tpm]\ntokens_per_minute = 10\n").await;
    let key = h.user_with_key("erin", "tpm").await;
    let r1 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    let used = r1.body["usageMetadata"]["totalTokenCount"].as_u64().unwrap();
    assert!(used > 10, "the first call must exceed the per-minute budget ({used})");
    let r2 = call(&h, &key, "gemini-2.5-flash").await;
    r2.assert_rate_limited();
    // Per user: another key of the same user is limited as well ...
    let key2 = h.create_key("erin").await;
    call(&h, &key2, "gemini-2.5-flash").await.assert_rate_limited();
    // ... but another user of the same tier is not.
    let other = h.user_with_key("frank", "tpm").await;
    let r = call(&h, &other, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(gen_requests(&h), 2);
}

// 6. The model allow-list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_outside_the_allow_list_is_refused_before_the_upstream() {
    let h = Harness::start("[tiers.flash]\nmodels = [\"gemini-2.5-flash\"]\n").await;
    let key = h.user_with_key("gina", "flash").await;
    let r = call(&h, &key, "gemini-2.5-pro").await;
    r.assert_error(403, "PERMISSION_DENIED", "Model");
    let r = call_sse(&h, &key, "gemini-2.5-pro").await;
    r.assert_error(403, "PERMISSION_DENIED", "Model");
    assert_eq!(h.mock_stats()["requests"], 0, "nothing reaches the upstream");
    let ok = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let cur = h.current(&key).await;
    assert_eq!(
        cur["current_month"]["messages"], 1,
        "refused calls use no message: {cur}"
    );
}

// 7a. The monthly token quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_token_quota_refuses_once_used() {
    let h = Harness::start("[tiers.tok]\ntokens = 1\n").await;
    let key = h.user_with_key("hank", "tok").await;
    let r1 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r1.status, 200, "used 0 < 1 passes: {}", r1.text);
    let r2 = call(&h, &key, "gemini-2.5-flash").await;
    let md = r2.assert_quota_refusal("tokens", QUOTA_TOKENS);
    assert_eq!(md["limit"], "1");
    let used: u64 = md["used"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        used,
        r1.body["usageMetadata"]["totalTokenCount"].as_u64().unwrap(),
        "tokens used are the upstream's usageMetadata.totalTokenCount"
    );
    assert_eq!(gen_requests(&h), 1);
}

// 7b. The monthly cost cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_cost_cap_refuses_once_reached() {
    let h = Harness::start("[tiers.cheap]\ncost = \"0.000001\"\n").await;
    let key = h.user_with_key("iris", "cheap").await;
    let r1 = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r1.status, 200, "{}", r1.text);
    let cur = h.current(&key).await;
    let spent = Decimal::from_str(cur["current_month"]["cost"].as_str().unwrap()).unwrap();
    assert!(
        spent > Decimal::from_str("0.000001").unwrap(),
        "the call is priced above the cap: {cur}"
    );
    let r2 = call(&h, &key, "gemini-2.5-flash").await;
    let md = r2.assert_quota_refusal("cost", QUOTA_COST);
    assert_eq!(
        Decimal::from_str(md["limit"].as_str().unwrap()).unwrap(),
        Decimal::from_str("0.000001").unwrap()
    );
    assert_eq!(Decimal::from_str(md["used"].as_str().unwrap()).unwrap(), spent);
    assert_eq!(gen_requests(&h), 1);
}

// 8a. x-quota headers: one pair per limited quota, none for unlimited ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_headers_are_present_exactly_for_limited_quotas() {
    let h = Harness::start(
        "[tiers.all4]\nmessages = 10\ntokens = 100000\nbytes = 1000000\ncost = \"5.00\"\n[tiers.msgs]\nmessages = 7\n",
    )
    .await;
    let all4 = h.user_with_key("jack", "all4").await;
    let r = call(&h, &all4, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-quota-messages-limit"), Some("10"));
    assert_eq!(r.header("x-quota-messages-remaining"), Some("9"));
    assert_eq!(r.header("x-quota-tokens-limit"), Some("100000"));
    assert_eq!(r.header("x-quota-tokens-remaining"), Some("100000"));
    assert_eq!(r.header("x-quota-bytes-limit"), Some("1000000"));
    assert_eq!(r.header("x-quota-bytes-remaining"), Some("1000000"));
    let dec = |r: &Resp, n: &str| Decimal::from_str(r.header(n).unwrap_or_else(|| panic!("missing {n}"))).unwrap();
    assert_eq!(dec(&r, "x-quota-cost-limit"), Decimal::from(5));
    assert_eq!(dec(&r, "x-quota-cost-remaining"), Decimal::from(5));
    assert!(r.header("x-quota-warning").is_none());
    let tokens = r.body["usageMetadata"]["totalTokenCount"].as_u64().unwrap();
    // A stream carries them too, as of its admission (after the first call settled).
    let s = call_sse(&h, &all4, "gemini-2.5-flash").await;
    assert_eq!(s.status, 200, "{}", s.text);
    assert_eq!(s.header("x-quota-messages-remaining"), Some("8"));
    assert_eq!(
        s.header("x-quota-tokens-remaining"),
        Some((100000 - tokens).to_string().as_str()),
        "tokens counted are the upstream's usageMetadata.totalTokenCount"
    );
    assert!(dec(&s, "x-quota-cost-remaining") < Decimal::from(5));
    // Every proxied response, not only metered ones.
    let list = Resp::read(
        h.http
            .get(h.url("/v1beta/models"))
            .header("x-goog-api-key", &all4)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.header("x-quota-messages-limit"), Some("10"));

    let msgs = h.user_with_key("kate", "msgs").await;
    let r = call(&h, &msgs, "gemini-2.5-flash").await;
    assert_eq!(r.header("x-quota-messages-limit"), Some("7"));
    assert_eq!(r.header("x-quota-messages-remaining"), Some("6"));
    for n in ["tokens", "bytes", "cost"] {
        assert!(
            r.header(&format!("x-quota-{n}-limit")).is_none(),
            "{n} is unlimited in this tier"
        );
        assert!(
            r.header(&format!("x-quota-{n}-remaining")).is_none(),
            "{n} is unlimited in this tier"
        );
    }

    let unl = h.user_with_key("liam", "unlimited").await;
    let r = call(&h, &unl, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let quota_headers: Vec<_> = r
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-quota-"))
        .collect();
    assert!(
        quota_headers.is_empty(),
        "an unlimited tier has no x-quota headers: {quota_headers:?}"
    );
}

// 8b. x-quota-warning from 90 % on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_warning_appears_from_ninety_percent() {
    let h = Harness::start("[tiers.ten]\nmessages = 10\n").await;
    let key = h.user_with_key("mia", "ten").await;
    for i in 1..=10u64 {
        let r = call(&h, &key, "gemini-2.5-flash").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
        assert_eq!(
            r.header("x-quota-messages-remaining"),
            Some((10 - i).to_string().as_str())
        );
        if i < 9 {
            assert!(
                r.header("x-quota-warning").is_none(),
                "request {i} ({}0 %) has no warning",
                i
            );
        } else {
            let w = r
                .header("x-quota-warning")
                .unwrap_or_else(|| panic!("request {i} ({}0 %) carries x-quota-warning", i));
            assert!(w.contains("messages"), "the warning names the quota: {w:?}");
        }
    }
    call(&h, &key, "gemini-2.5-flash")
        .await
        .assert_quota_refusal("messages", QUOTA_MESSAGES);
}

// 9. Tier changes through the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_change_applies_to_the_next_request() {
    let h = Harness::start("[tiers.one]\nmessages = 1\n").await;
    let key = h.user_with_key("noah", "one").await;
    assert_eq!(call(&h, &key, "gemini-2.5-flash").await.status, 200);
    call(&h, &key, "gemini-2.5-flash")
        .await
        .assert_quota_refusal("messages", QUOTA_MESSAGES);

    let p = admin_json(&h, Method::PATCH, "/admin/users/noah", Some(json!({"tier": "free"}))).await;
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.body["tier"], "free");
    let r = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "the new tier applies at once: {}", r.text);
    assert_eq!(r.header("x-quota-messages-limit"), Some("100"));
    assert_eq!(r.header("x-quota-messages-remaining"), Some("98"));
    assert_eq!(h.current(&key).await["tier"], "free");

    let p = admin_json(&h, Method::PATCH, "/admin/users/noah", Some(json!({"tier": "one"}))).await;
    assert_eq!(p.status, 200, "{}", p.text);
    call(&h, &key, "gemini-2.5-flash")
        .await
        .assert_quota_refusal("messages", QUOTA_MESSAGES);

    let bad = admin_json(
        &h,
        Method::PATCH,
        "/admin/users/noah",
        Some(json!({"tier": "platinum"})),
    )
    .await;
    assert_eq!(bad.status, 400, "unknown tier: {}", bad.text);
    let u = admin_json(&h, Method::GET, "/admin/users/noah", None).await;
    assert_eq!(u.body["tier"], "one", "a refused change changes nothing: {}", u.text);

    let bad = admin_json(
        &h,
        Method::POST,
        "/admin/users",
        Some(json!({"id": "olga", "tier": "platinum"})),
    )
    .await;
    assert_eq!(bad.status, 400, "unknown tier: {}", bad.text);
    let u = admin_json(&h, Method::GET, "/admin/users/olga", None).await;
    assert_eq!(u.status, 404, "{}", u.text);

    let dup = admin_json(
        &h,
        Method::POST,
        "/admin/users",
        Some(json!({"id": "noah", "tier": "free"})),
    )
    .await;
    assert_eq!(dup.status, 409, "duplicate: {}", dup.text);
    let ghost = admin_json(&h, Method::PATCH, "/admin/users/ghost", Some(json!({"tier": "free"}))).await;
    assert_eq!(ghost.status, 404, "unknown user: {}", ghost.text);
    let u = admin_json(&h, Method::GET, "/admin/users/noah", None).await;
    assert_eq!(u.body["tier"], "one", "a duplicate does not overwrite: {}", u.text);
}

// 10a. Hot reload: a lowered limit applies within 2 s; counters and open streams survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_lowers_a_limit_without_losing_counters_or_streams() {
    // 15 events 200 ms apart: the stream stays open for ~3 s, across the reload.
    let opts = MockOptions {
        chunks: 15,
        ..MockOptions::default()
    };
    let h = Harness::start_with("[tiers.hot]\nmessages = 10\n", opts).await;
    h.app.live.spawn_watcher(Duration::from_millis(500), h.clock.clone());
    let key = h.user_with_key("pia", "hot").await;
    for _ in 0..2 {
        let r = call(&h, &key, "gemini-2.5-flash").await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let stream = h.generate(&key, "slow", true).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["x-quota-messages-limit"], "10");
    let mut body = stream.bytes_stream();
    let first = body.next().await.expect("a first event").expect("no error");
    assert!(!first.is_empty());
    let reader = tokio::spawn(async move {
        let mut text = String::from_utf8_lossy(&first).into_owned();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(
                &chunk.expect("the open stream completes without error"),
            ));
        }
        text
    });

    h.write_config_extra("[tiers.hot]\nmessages = 3\n");
    let took = wait_for(Duration::from_secs(2), "the new limit", || async {
        h.current(&key).await["limits"]["messages"] == 3
    })
    .await;
    assert!(took <= Duration::from_secs(2));
    assert_eq!(
        h.mock_stats()["streams_completed"],
        0,
        "test precondition: the stream is still open after the reload"
    );
    let cur = h.current(&key).await;
    assert_eq!(
        cur["current_month"]["messages"], 3,
        "counters survive the reload: {cur}"
    );
    let r = call(&h, &key, "gemini-2.5-flash").await;
    let md = r.assert_quota_refusal("messages", QUOTA_MESSAGES);
    assert_eq!(md["limit"], "3");
    assert_eq!(md["used"], "3");
    assert!(config_status(&h).await["last_error"].is_null());

    let text = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the stream ends")
        .unwrap();
    let events = text.lines().filter(|l| l.starts_with("data:")).count();
    assert_eq!(events, 15, "every event arrives: {text}");
    assert!(text.contains("usageMetadata"));
    let mut ai = None;
    for _ in 0..40 {
        ai = h
            .records("pia")
            .await
            .into_iter()
            .find(|r| r.kind().as_str() == "ai_response" && r.metadata()["model"] == "slow");
        if ai.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ai = ai.expect("the stream opened before the reload is metered");
    assert_eq!(ai.metadata()["status"], "ok", "{ai:?}");
    assert_eq!(ai.metadata()["stream"], true, "{ai:?}");
    assert_eq!(ai.metadata()["token_source"], "upstream", "{ai:?}");
    assert!(ai.tokens > 0);
}

// 10b. Hot reload: an invalid file changes nothing and is reported; a valid edit clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_edit_keeps_the_running_config_and_is_reported() {
    let h = Harness::start("[tiers.hot]\nmessages = 5\n").await;
    h.app.live.spawn_watcher(Duration::from_millis(500), h.clock.clone());
    let key = h.user_with_key("quinn", "hot").await;
    let r = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r.header("x-quota-messages-limit"), Some("5"));
    let loaded_at = config_status(&h).await["loaded_at"].clone();
    assert!(loaded_at.is_string());

    // A typo in a key: the watcher rejects it, the old config keeps working.
    h.write_config_extra("[tiers.hot]\nmessagez = 1\n");
    wait_for(Duration::from_secs(2), "last_error after a typo", || async {
        config_status(&h).await["last_error"].is_string()
    })
    .await;
    let st = config_status(&h).await;
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("tiers.hot.messagez"),
        "last_error names the key path: {err}"
    );
    assert_eq!(st["loaded_at"], loaded_at, "the running config was not replaced");
    let r = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.header("x-quota-messages-limit"),
        Some("5"),
        "the old limit still applies"
    );
    assert_eq!(r.header("x-quota-messages-remaining"), Some("3"));

    // A float money value, through POST /admin/reload.
    h.write_config_extra("[tiers.hot]\nmessages = 5\ncost = 5.0\n");
    let rl = admin_json(&h, Method::POST, "/admin/reload", None).await;
    assert_eq!(rl.status, 400, "an invalid reload is refused: {}", rl.text);
    let err = rl.body["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("tiers.hot.cost"),
        "last_error names the key path: {}",
        rl.text
    );
    let st = config_status(&h).await;
    assert!(
        st["last_error"].as_str().unwrap_or_default().contains("tiers.hot.cost"),
        "{st}"
    );
    let r = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("x-quota-cost-limit").is_none(),
        "the rejected cost limit is not applied"
    );

    // A valid edit clears the error and applies.
    h.write_config_extra("[tiers.hot]\nmessages = 7\n");
    wait_for(Duration::from_secs(2), "a valid edit to apply", || async {
        config_status(&h).await["last_error"].is_null() && h.current(&key).await["limits"]["messages"] == 7
    })
    .await;
    let r = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r.header("x-quota-messages-limit"), Some("7"));
    assert_eq!(
        r.header("x-quota-messages-remaining"),
        Some("3"),
        "counters survive: 4 used"
    );
    assert_ne!(config_status(&h).await["loaded_at"], Value::Null);
}

// 10c. `gemini-meter check-config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_the_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let mock = "127.0.0.1:9".parse().unwrap();
    let data = dir.path().join("data");
    let cases = [
        ("typo.toml", "[tiers.hot]\nmessagez = 5\n", Some("tiers.hot.messagez")),
        ("float.toml", "[tiers.hot]\ncost = 5.0\n", Some("tiers.hot.cost")),
        ("valid.toml", "[tiers.hot]\nmessages = 5\ncost = \"5.00\"\n", None),
    ];
    for (name, extra, bad_path) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, base_config(mock, &data, extra)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gemini-meter"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match bad_path {
            Some(key) => {
                assert_eq!(out.status.code(), Some(1), "{name}: exit 1; stderr: {stderr}");
                assert!(stderr.contains(key), "{name}: stderr names {key}: {stderr}");
                assert!(stderr.contains(name), "{name}: stderr names the file: {stderr}");
            }
            None => assert_eq!(out.status.code(), Some(0), "{name}: exit 0; stderr: {stderr}"),
        }
    }
    assert!(!data.exists(), "check-config opens no storage");
}

// 11. Month rollover with a moved clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_month_resets_the_quota_and_keeps_the_previous_totals() {
    let h = Harness::start("[tiers.two]\nmessages = 2\n").await;
    let key = h.user_with_key("rosa", "two").await;
    let before = h.clock.now();
    let prev = month_label(before);
    for _ in 0..2 {
        let r = call(&h, &key, "gemini-2.5-flash").await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    call(&h, &key, "gemini-2.5-flash")
        .await
        .assert_quota_refusal("messages", QUOTA_MESSAGES);

    let next_start = start_of_next_month(before);
    let next = month_label(next_start);
    h.clock.set(next_start);
    let r = call(&h, &key, "gemini-2.5-flash").await;
    assert_eq!(r.status, 200, "a new month starts from zero: {}", r.text);
    assert_eq!(r.header("x-quota-messages-remaining"), Some("1"));

    let cur = h.current(&key).await;
    assert_eq!(cur["month"], next.as_str(), "{cur}");
    assert_eq!(cur["current_month"]["messages"], 1, "{cur}");
    assert_eq!(
        cur["resets_at"],
        rfc3339_z(start_of_next_month(next_start)).as_str(),
        "{cur}"
    );

    h.sync().await;
    let s = admin_json(&h, Method::GET, &format!("/admin/analytics/summary?month={prev}"), None).await;
    assert_eq!(s.status, 200, "{}", s.text);
    assert_eq!(
        s.body["messages"], 2,
        "the previous month's totals stay readable: {}",
        s.text
    );
    let s = admin_json(&h, Method::GET, &format!("/admin/analytics/summary?month={next}"), None).await;
    assert_eq!(s.body["messages"], 1, "{}", s.text);

    let hist = Resp::read(
        h.http
            .get(h.url("/api/usage/history?limit=500"))
            .header("x-goog-api-key", &key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(hist.status, 200, "{}", hist.text);
    let data = hist.body["data"].as_array().unwrap();
    let sent_in = |m: &str| {
        data.iter()
            .filter(|r| r["type"] == "message_sent" && r["messages"] == 1)
            .filter(|r| r["created_at"].as_str().unwrap_or_default().starts_with(m))
            .count()
    };
    assert_eq!(
        sent_in(&prev),
        2,
        "the earlier messages are still listed: {}",
        hist.text
    );
    assert_eq!(sent_in(&next), 1, "{}", hist.text);
}

/// The message reserved at admission is kept exactly when the upstream answered with success,
/// and given back on every other way a call ends: upstream error status, client gone before the
/// answer, a body the gateway refused as too large, an upstream that cannot be reached. A
/// client that leaves mid-stream was answered: its message counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_a_call_ends_keeps_or_gives_back_its_message() {
    let h = Harness::start_with(
        "[tiers.ten]\nmessages = 10\n",
        MockOptions {
            ttfb: Duration::from_millis(300),
            ..MockOptions::default()
        },
    )
    .await;
    let key = h.user_with_key("ends", "ten").await;
    let messages = |v: Value| v["current_month"]["messages"].as_u64().unwrap();
    let gen_url = h.url("/v1beta/models/gemini-2.5-flash:generateContent");
    let body = json!({"contents": [{"parts": [{"text": "hi"}]}]}).to_string();

    // Answered: 1.
    assert_eq!(call(&h, &key, "gemini-2.5-flash").await.status, 200);
    assert_eq!(messages(h.current(&key).await), 1);

    // Upstream error status: given back.
    assert_eq!(call(&h, &key, "error-500").await.status, 500);
    assert_eq!(messages(h.current(&key).await), 1);

    // The client leaves while the upstream is still thinking: given back.
    let req = h
        .http
        .post(&gen_url)
        .header("x-goog-api-key", &key)
        .body(body.clone())
        .send();
    assert!(tokio::time::timeout(Duration::from_millis(100), req).await.is_err());
    wait_for(Duration::from_secs(5), "the abandoned call settles", || async {
        h.sync().await;
        h.records("ends")
            .await
            .iter()
            .any(|r| r.metadata()["status"] == "client_closed")
    })
    .await;
    assert_eq!(messages(h.current(&key).await), 1);

    // A streamed body over the limit (no length up front): refused by the gateway, given back.
    let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..24).map(|_| Ok(chunk.clone())).collect();
    let r = h
        .http
        .post(&gen_url)
        .header("x-goog-api-key", &key)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    h.sync().await;
    assert_eq!(messages(h.current(&key).await), 1);

    // A client that leaves mid-stream was answered: counts.
    let r = h
        .http
        .post(h.url("/v1beta/models/slow:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", &key)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    assert!(s.next().await.is_some());
    drop(s);
    assert_eq!(messages(h.current(&key).await), 2);

    // An upstream that cannot be reached: given back.
    let down = Harness::start_against(
        format!("127.0.0.1:{}", common::spare_port()).parse().unwrap(),
        "[tiers.ten]\nmessages = 10\n",
    )
    .await;
    let key2 = down.user_with_key("ends", "ten").await;
    let r = down
        .http
        .post(down.url("/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("x-goog-api-key", &key2)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(messages(down.current(&key2).await), 0);
    let recs = down.records("ends").await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].metadata()["status"], "upstream_unavailable");
}
