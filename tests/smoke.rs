//! First end-to-end checks: a call goes through, is metered once, and keys are handled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Harness, UPSTREAM_KEY};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_is_forwarded_and_metered_once() {
    let h = Harness::start("").await;
    let key = h.user_with_key("alice", "free").await;
    let r = h.generate(&key, "gemini-2.5-flash", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quota-messages-limit"], "100");
    assert_eq!(r.headers()["x-quota-messages-remaining"], "99");
    let body: Value = r.json().await.unwrap();
    let usage = &body["usageMetadata"];
    let recs = h.records("alice").await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    let ai = recs.iter().find(|r| r.kind().as_str() == "ai_response").unwrap();
    assert_eq!(ai.tokens, usage["totalTokenCount"].as_u64().unwrap());
    assert_eq!(ai.metadata()["token_source"], "upstream");
    assert_eq!(h.mock_stats()["leaked_gateway_keys"], 0);
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["messages"], 1);
    assert_eq!(cur["current_month"]["tokens"], ai.tokens);
    assert!(!std::fs::read_dir(h.dir.path()).unwrap().any(|_| false));
    let _ = UPSTREAM_KEY;
}

/// HTTP/1 connections skip the protocol sniffing; a client that opens with the HTTP/2 preface
/// (h2c with prior knowledge) is still served, unary and streamed, and metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_served_and_metered() {
    let h = Harness::start("").await;
    let key = h.user_with_key("hana", "free").await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for path in [":generateContent", ":streamGenerateContent?alt=sse"] {
        let r = h2
            .post(h.url(&format!("/v1beta/models/gemini-2.5-flash{path}")))
            .header("x-goog-api-key", &key)
            .json(&serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    let recs = h.records("hana").await;
    assert_eq!(recs.len(), 4, "{recs:?}");
    // And HTTP/1.1 on the same port.
    let r = h.generate(&key, "gemini-2.5-flash", false).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_refusals_and_tokens() {
    let h = Harness::start("").await;
    let key = h.user_with_key("mia", "free").await;
    assert_eq!(h.generate(&key, "gemini-2.5-flash", true).await.status(), 200);
    let r = h
        .http
        .post(h.url("/v1beta/models/gemini-2.5-flash:generateContent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    h.sync().await;
    let text = h
        .http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    assert_eq!(value("gm_requests_total{route=\"stream\",status=\"2xx\"}"), 1.0);
    assert_eq!(value("gm_admission_refusals_total{reason=\"missing_key\"}"), 1.0);
    let recs = h.records("mia").await;
    let tokens: u64 = recs.iter().map(|r| r.tokens).sum();
    assert!(tokens > 0);
    assert_eq!(value("gm_tokens_total"), tokens as f64);
    assert_eq!(value("gm_upstream_latency_seconds_count"), 1.0);
    assert_eq!(value("gm_open_streams"), 0.0);
    assert_eq!(value("gm_alert_deliveries_pending"), 0.0);
    assert!(value("gm_recorder_batches_total") >= 1.0);
    // The admin calls above (create user, issue key) count as "api" requests.
    assert!(value("gm_requests_total{route=\"api\",status=\"2xx\"}") >= 2.0);
}
