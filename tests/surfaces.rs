//! Billable surfaces beyond generateContent (issue 15, part 2): embeddings are metered (Gemini
//! reports no usage for them: the prompt is estimated from its text and flagged
//! `token_source: estimated`; the OpenAI-compatible endpoint's own `usage` is used when present).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Harness;
use gemini_meter::ledger::Record;
use serde_json::{Value, json};

fn of_kind<'a>(records: &'a [Record], kind: &str) -> Vec<&'a Record> {
    records.iter().filter(|r| r.kind().as_str() == kind).collect()
}

/// GETs a resource with `key`: status and JSON.
async fn get(h: &Harness, key: &str, name: &str) -> (u16, Value) {
    let r = h
        .http
        .get(h.url(&format!("/v1beta/{name}")))
        .header("x-goog-api-key", key)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn post(h: &Harness, key: &str, path: &str, body: Value) -> (u16, Value) {
    let r = h
        .http
        .post(h.url(path))
        .header("x-goog-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_metered_with_estimated_prompt_tokens() {
    let h = Harness::start("").await;
    let key = h.user_with_key("emb", "unlimited").await;
    // 40 characters of text: an estimate of ceil(40 / 4) = 10 tokens.
    let text = "abcdefghij".repeat(4);
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/gemini-embedding-001:embedContent",
        json!({"content": {"parts": [{"text": text}]}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["embedding"]["values"].is_array());
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/gemini-embedding-001:batchEmbedContents",
        json!({"requests": (0..10)
            .map(|_| json!({"model": "models/gemini-embedding-001", "content": {"parts": [{"text": text}]}}))
            .collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 10);
    let recs = h.records("emb").await;
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), 2, "{recs:?}");
    let mut tokens: Vec<u64> = ai.iter().map(|r| r.tokens).collect();
    tokens.sort_unstable();
    // One input of 10 estimated tokens; a batch of 10 of them.
    assert_eq!(tokens, [10, 100]);
    for r in &ai {
        let md = r.metadata();
        assert_eq!(md["token_source"], "estimated", "{md}");
        assert_eq!(md["model"], "gemini-embedding-001");
        assert_eq!(md["output_tokens"], 0);
        // An unlisted model: the config's ai_response_per_token (0.0001) per token, exactly.
        assert_eq!(
            r.cost.normalize(),
            (rust_decimal::Decimal::from(r.tokens) * rust_decimal::Decimal::new(1, 4)).normalize()
        );
    }
    assert_eq!(of_kind(&recs, "message_sent").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embeddings_use_the_upstreams_usage() {
    let h = Harness::start("").await;
    let key = h.user_with_key("oemb", "unlimited").await;
    let r = h
        .http
        .post(h.url("/v1beta/openai/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": "gemini-embedding-001", "input": ["one two three", "four five"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let upstream_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let recs = h.records("oemb").await;
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), 1, "{recs:?}");
    assert_eq!(ai[0].tokens, upstream_tokens);
    assert_eq!(ai[0].metadata()["token_source"], "upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_count_against_quotas_before_forwarding() {
    let h = Harness::start("[tiers.one]\nmessages = 1\n").await;
    let key = h.user_with_key("quota", "one").await;
    let body = json!({"content": {"parts": [{"text": "hello"}]}});
    let path = "/v1beta/models/gemini-embedding-001:embedContent";
    assert_eq!(post(&h, &key, path, body.clone()).await.0, 200);
    let before = h.mock_stats()["requests"].as_u64().unwrap();
    let (s, v) = post(&h, &key, path, body).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["details"][0]["reason"], "MONTHLY_QUOTA_EXCEEDED");
    assert_eq!(h.mock_stats()["requests"].as_u64().unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_is_billed_for_its_storage_when_created() {
    let h = Harness::start("").await;
    let key = h.user_with_key("cache", "unlimited").await;
    let body = json!({"model": "models/gemini-2.5-flash", "ttl": "3600s",
        "contents": [{"role": "user", "parts": [{"text": "a long document ".repeat(100)}]}]});
    let (s, v) = post(&h, &key, "/v1beta/cachedContents", body).await;
    assert_eq!(s, 200, "{v}");
    let tokens = v["usageMetadata"]["totalTokenCount"].as_u64().unwrap();
    let recs = h.records("cache").await;
    let cs = of_kind(&recs, "cache_storage");
    assert_eq!(cs.len(), 1, "{recs:?}");
    let md = cs[0].metadata();
    assert_eq!(md["token_count"], tokens);
    assert_eq!(md["ttl_seconds"], 3600);
    assert_eq!(md["cache"], v["name"]);
    assert_eq!((cs[0].messages, cs[0].tokens), (0, 0));
    // tokens x 1.00 USD per million per hour x 1 hour.
    let want = rust_decimal::Decimal::from(tokens) / rust_decimal::Decimal::from(1_000_000u64);
    assert_eq!(cs[0].cost.normalize(), want.normalize());
    // The current month's cost counts it.
    let cur = h.current(&key).await;
    let cost: rust_decimal::Decimal = cur["current_month"]["cost"].as_str().unwrap().parse().unwrap();
    assert_eq!(cost.normalize(), want.normalize());

    // A model without a storage price: refused before the upstream.
    let before = h.mock_stats()["requests"].as_u64().unwrap();
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/cachedContents",
        json!({"model": "models/gemini-2.5-pro"}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(h.mock_stats()["requests"].as_u64().unwrap(), before);
}

const LITE: &str = r#"
[pricing.models."gemini-2.5-flash-lite"]
input_per_million = "0.10"
output_per_million = "0.40"
batch_discount = "0.5"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_billed_once_when_its_owner_reads_it_finished() {
    let h = Harness::start(LITE).await;
    let key = h.user_with_key("batcher", "unlimited").await;
    let reqs: Vec<Value> = (0..3)
        .map(|i| json!({"request": {"contents": [{"parts": [{"text": format!("question {i}")}]}]}, "metadata": {"key": format!("r{i}")}}))
        .collect();
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/gemini-2.5-flash-lite:batchGenerateContent",
        json!({"batch": {"displayName": "three", "inputConfig": {"requests": {"requests": reqs}}}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let name = v["name"].as_str().unwrap().to_string();
    assert!(h.records("batcher").await.is_empty(), "nothing is billed at submission");
    let mut last = Value::Null;
    for _ in 0..5 {
        let (s, v) = get(&h, &key, &name).await;
        assert_eq!(s, 200);
        last = v;
    }
    assert_eq!(last["done"], true, "{last}");
    let inlined = last
        .pointer("/response/inlinedResponses/inlinedResponses")
        .and_then(Value::as_array)
        .unwrap()
        .clone();
    assert_eq!(inlined.len(), 3);
    let recs = h.records("batcher").await;
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), 3, "billed exactly once per inlined response: {recs:?}");
    // Hand-computed from each response's own usage: (prompt x 0.10 + output x 0.40) / 1e6, halved.
    let d = |n: u64| rust_decimal::Decimal::from(n);
    let mut want = rust_decimal::Decimal::ZERO;
    let mut want_tokens = 0;
    for r in &inlined {
        let u = &r["response"]["usageMetadata"];
        let p = u["promptTokenCount"].as_u64().unwrap();
        let o = u["candidatesTokenCount"].as_u64().unwrap() + u["thoughtsTokenCount"].as_u64().unwrap_or(0);
        want += (d(p) * rust_decimal::Decimal::new(10, 2) + d(o) * rust_decimal::Decimal::new(40, 2)) / d(1_000_000)
            * rust_decimal::Decimal::new(5, 1);
        want_tokens += u["totalTokenCount"].as_u64().unwrap();
    }
    let got: rust_decimal::Decimal = ai.iter().map(|r| r.cost).sum();
    assert_eq!(got.normalize(), want.normalize());
    assert_eq!(ai.iter().map(|r| r.tokens).sum::<u64>(), want_tokens);
    for r in &ai {
        assert_eq!(r.metadata()["price"]["batch_discount"], "0.5", "{}", r.metadata());
    }
    // A restart does not bill it again.
    let h = h.reopen(&[]).await;
    assert_eq!(get(&h, &key, &name).await.0, 200);
    assert_eq!(of_kind(&h.records("batcher").await, "ai_response").len(), 3);
}

const IMAGEN: &str = r#"
[pricing.models."imagen-4.0-generate-001"]
per_image = "0.04"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imagen_is_billed_per_image_returned() {
    let h = Harness::start(IMAGEN).await;
    let key = h.user_with_key("painter", "unlimited").await;
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/imagen-4.0-generate-001:predict",
        json!({"instances": [{"prompt": "a lighthouse"}], "parameters": {"sampleCount": 3}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let n = v["predictions"].as_array().unwrap().len();
    assert_eq!(n, 3);
    let recs = h.records("painter").await;
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), 1, "{recs:?}");
    assert_eq!(ai[0].cost, rust_decimal::Decimal::new(12, 2));
    assert_eq!(ai[0].tokens, 0);
    assert_eq!(
        ai[0].metadata()["price"]["lines"][0]["quantity"],
        3,
        "{}",
        ai[0].metadata()
    );
    // A model without a per-image price is refused before the upstream.
    let before = h.mock_stats()["requests"].as_u64().unwrap();
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/imagen-3.0-generate-002:predict",
        json!({"instances": [{"prompt": "x"}]}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(h.mock_stats()["requests"].as_u64().unwrap(), before);
}

const VEO: &str = r#"
[pricing.models."veo-3.0-generate-preview"]
per_second = "0.40"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_is_billed_per_second_once_its_owner_reads_it_done() {
    let h = Harness::start(VEO).await;
    let key = h.user_with_key("director", "unlimited").await;
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/veo-3.0-generate-preview:predictLongRunning",
        json!({"instances": [{"prompt": "a cat surfing"}], "parameters": {"durationSeconds": 6}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let op = v["name"].as_str().unwrap().to_string();
    assert!(
        h.records("director").await.is_empty(),
        "nothing is billed before the video exists"
    );
    let mut done = Value::Null;
    for _ in 0..4 {
        let (s, v) = get(&h, &key, &op).await;
        assert_eq!(s, 200);
        if v["done"] == true {
            done = v;
        }
    }
    let samples = done
        .pointer("/response/generateVideoResponse/generatedSamples")
        .and_then(Value::as_array)
        .unwrap()
        .len() as i64;
    let recs = h.records("director").await;
    let ai = of_kind(&recs, "ai_response");
    assert_eq!(ai.len(), 1, "billed once however often it is read: {recs:?}");
    // 6 seconds x samples x 0.40.
    assert_eq!(
        ai[0].cost.normalize(),
        rust_decimal::Decimal::new(240 * samples, 2).normalize()
    );
    assert_eq!(ai[0].metadata()["price"]["lines"][0]["quantity"], 6 * samples);
    // Unpriced video models are refused before the upstream.
    let (s, v) = post(
        &h,
        &key,
        "/v1beta/models/veo-2.0-generate-001:predictLongRunning",
        json!({"instances": [{"prompt": "x"}]}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
}
