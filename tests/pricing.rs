//! The price model end to end: generate calls through the gateway against an upstream that
//! answers with chosen `usageMetadata` (long context, audio prompt, image output, tool use and
//! grounding, an unlisted model; unary and SSE), and the costs, exact to the last decimal and
//! computed by hand, in the ledger, the record's `metadata.price`, the usage API (history and
//! breakdown by model and modality), the CSV export and the admin analytics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;

use bytes::Bytes;
use common::{ADMIN_TOKEN, Harness};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Prices appended to the harness config (the models are named apart from the base config's
/// `gemini-2.5-flash`, which keeps its plain prices).
const PRICES: &str = r#"
[pricing.models."gemini-2.5-pro"]
input_per_million = "1.25"
output_per_million = "10.00"
cached_input_per_million = "0.125"
long_context_threshold = 200000
long_input_per_million = "2.50"
long_output_per_million = "15.00"
long_cached_input_per_million = "0.25"
cache_storage_per_million_per_hour = "4.50"

[pricing.models."audio-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
cached_input_per_million = "0.03"
input_per_million_by_modality = { AUDIO = "1.00" }

[pricing.models."flash-image"]
input_per_million = "0.30"
output_per_million = "2.50"
output_per_million_by_modality = { IMAGE = "30.00" }

[pricing.models."search-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
grounding_per_request = "0.035"
"#;

/// The usage block the upstream answers for a model.
fn usage_for(model: &str) -> Value {
    match model {
        "gemini-2.5-pro" => json!({"promptTokenCount": 250000, "candidatesTokenCount": 1000,
            "thoughtsTokenCount": 2000, "totalTokenCount": 253000,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 250000}]}),
        "audio-flash" => json!({"promptTokenCount": 1000, "candidatesTokenCount": 50, "totalTokenCount": 1050,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 200}, {"modality": "AUDIO", "tokenCount": 800}]}),
        "flash-image" => json!({"promptTokenCount": 10, "candidatesTokenCount": 1300, "totalTokenCount": 1310,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}],
            "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 10}, {"modality": "IMAGE", "tokenCount": 1290}]}),
        "search-flash" => json!({"promptTokenCount": 100, "toolUsePromptTokenCount": 400,
            "candidatesTokenCount": 20, "totalTokenCount": 520}),
        _ => json!({"promptTokenCount": 1204, "candidatesTokenCount": 440, "totalTokenCount": 1644}),
    }
}

fn answer(model: &str, usage: Value) -> Value {
    let mut candidate =
        json!({"content": {"parts": [{"text": "ok"}], "role": "model"}, "finishReason": "STOP", "index": 0});
    if model == "search-flash" {
        candidate["groundingMetadata"] =
            json!({"webSearchQueries": ["primes"], "groundingChunks": [{"web": {"uri": "https://example.com"}}]});
    }
    json!({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "r1"})
}

/// An upstream that answers generateContent with [`usage_for`] the model in the path, and
/// streamGenerateContent (SSE) with two events whose cumulative usage ends at the same.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let (model, method) = path
                        .rsplit('/')
                        .next()
                        .and_then(|last| last.split_once(':'))
                        .unwrap_or(("", ""));
                    let usage = usage_for(model);
                    let (body, ctype) = if method == "streamGenerateContent" {
                        // The first event has half the output so far; the last the full usage.
                        let mut early = usage.clone();
                        early["candidatesTokenCount"] = json!(usage["candidatesTokenCount"].as_u64().unwrap_or(0) / 2);
                        let text = format!(
                            "data: {}\r\n\r\ndata: {}\r\n\r\n",
                            answer(model, early),
                            answer(model, usage)
                        );
                        (text, "text/event-stream")
                    } else {
                        (answer(model, usage).to_string(), "application/json; charset=UTF-8")
                    };
                    let resp = Response::builder()
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    addr
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

async fn get_json(h: &Harness, path: &str, key: &str) -> Value {
    let r = h
        .http
        .get(h.url(path))
        .header("x-goog-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn admin_text(h: &Harness, path: &str) -> String {
    let r = h.http.get(h.url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

/// One CSV row of the export: (id, cost, metadata JSON).
fn csv_row(row: &str) -> (String, Decimal, Value) {
    let f: Vec<&str> = row.splitn(8, ',').collect();
    let (meta, _created) = f[7].rsplit_once(',').unwrap();
    let meta = meta.strip_prefix('"').and_then(|m| m.strip_suffix('"')).unwrap_or(meta);
    (
        f[0].to_string(),
        dec(f[6]),
        serde_json::from_str(&meta.replace("\"\"", "\"")).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_price_rule_is_exact_in_ledger_api_export_and_analytics() {
    let up = upstream().await;
    let h = Harness::start_against(up, PRICES).await;
    let key = h.user_with_key("payer", "unlimited").await;

    // (model, streamed, expected cost), each computed by hand:
    let cases = [
        // 250k prompt > 200k: (250000 x 2.50 + (1000 + 2000) x 15.00) / 1e6 = 0.625 + 0.045
        ("gemini-2.5-pro", false, "0.67"),
        // (200 x 0.30 + 800 x 1.00 + 50 x 2.50) / 1e6 = 985 / 1e6
        ("audio-flash", false, "0.000985"),
        // the same streamed: the last cumulative report counts, never a sum of events
        ("audio-flash", true, "0.000985"),
        // (10 x 0.30 + 10 x 2.50 + 1290 x 30.00) / 1e6 = 38728 / 1e6
        ("flash-image", false, "0.038728"),
        // (100 x 0.30 + 400 x 0.30 (tool use) + 20 x 2.50) / 1e6 + 0.035 (grounded)
        ("search-flash", false, "0.0352"),
        // unlisted: 1644 x 0.0001
        ("gemini-9-unlisted", false, "0.1644"),
    ];
    for (model, stream, _) in cases {
        let r = h.generate(&key, model, stream).await;
        assert_eq!(r.status(), 200, "{model}");
        let _ = r.bytes().await.unwrap();
    }

    // The ledger: one ai_response per call, newest first.
    let records = h.records("payer").await;
    let mut ai: Vec<_> = records.iter().filter(|r| r.kind().as_str() == "ai_response").collect();
    ai.reverse();
    assert_eq!(ai.len(), cases.len());
    for (r, (model, _, cost)) in ai.iter().zip(cases) {
        assert_eq!(
            (r.model(), r.cost.normalize().to_string()),
            (Some(model), cost.to_string()),
            "{model}"
        );
    }
    // The explanation of the long-context one, exactly.
    assert_eq!(
        ai[0].metadata()["price"],
        json!({"context": "long", "entry": "gemini-2.5-pro", "lines": [
            {"cost": "0.625", "modality": "TEXT", "part": "input", "quantity": 250000, "rate": "2.50"},
            {"cost": "0.015", "part": "output", "quantity": 1000, "rate": "15.00"},
            {"cost": "0.03", "part": "thoughts", "quantity": 2000, "rate": "15.00"}]})
    );
    assert_eq!(
        ai[4].metadata()["price"]["lines"][3],
        json!({"cost": "0.035", "part": "grounding", "quantity": 1, "rate": "0.035"})
    );
    assert_eq!(ai[4].metadata()["tool_use_prompt_tokens"], 400);
    assert_eq!(
        ai[5].metadata()["price"],
        json!({"lines": [{"cost": "0.1644", "part": "tokens", "quantity": 1644, "rate": "0.0001"}]})
    );
    let ledger_cost: Decimal = records.iter().map(|r| r.cost).sum();
    assert_eq!(
        ledger_cost,
        dec("0.67") + dec("0.000985") * Decimal::TWO + dec("0.038728") + dec("0.0352") + dec("0.1644")
    );

    // The usage API's history: the same records, cost and explanation.
    let hist = get_json(&h, "/api/usage/history?limit=500", &key).await;
    let data = hist["data"].as_array().unwrap();
    assert_eq!(data.len(), records.len());
    for (v, r) in data.iter().zip(&records) {
        assert_eq!(v, &r.to_json());
    }

    // The breakdown: by model, by modality and part; both add up to the total.
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let b = get_json(&h, &format!("/api/usage/breakdown?month={month}"), &key).await;
    assert_eq!(dec(b["total"]["cost"].as_str().unwrap()), ledger_cost);
    let model_cost = |m: &str| {
        b["by_model"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == m)
            .map(|r| r["cost"].as_str().unwrap().to_string())
    };
    assert_eq!(model_cost("gemini-2.5-pro").as_deref(), Some("0.67"));
    assert_eq!(model_cost("audio-flash").as_deref(), Some("0.00197"));
    assert_eq!(model_cost("flash-image").as_deref(), Some("0.038728"));
    let rows = b["by_modality"].as_array().unwrap();
    let row = |m: Value, part: &str| {
        rows.iter()
            .find(|r| r["modality"] == m && r["part"] == part)
            .map(|r| (r["quantity"].as_u64().unwrap(), r["cost"].as_str().unwrap().to_string()))
    };
    // 2 x 800 audio tokens at 1.00; 1290 image tokens at 30.00; 1 grounded request.
    assert_eq!(row(json!("AUDIO"), "input"), Some((1600, "0.0016".into())));
    assert_eq!(row(json!("IMAGE"), "output"), Some((1290, "0.0387".into())));
    assert_eq!(row(Value::Null, "grounding"), Some((1, "0.035".into())));
    assert_eq!(row(Value::Null, "tool_use"), Some((400, "0.00012".into())));
    assert_eq!(row(Value::Null, "tokens"), Some((1644, "0.1644".into())));
    let modality_sum: Decimal = rows.iter().map(|r| dec(r["cost"].as_str().unwrap())).sum();
    assert_eq!(modality_sum, ledger_cost);

    // The CSV export: every record, the same cost and metadata (price included).
    let csv = admin_text(&h, &format!("/admin/export?month={month}&format=csv")).await;
    let mut csv_rows: Vec<(String, Decimal, Value)> = csv.lines().skip(1).map(csv_row).collect();
    csv_rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut by_id: Vec<_> = records.iter().map(|r| (r.id_string(), r.cost, r.metadata())).collect();
    by_id.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(csv_rows, by_id);

    // The admin analytics: per model and the month's total.
    let models: Value =
        serde_json::from_str(&admin_text(&h, &format!("/admin/analytics/models?month={month}")).await).unwrap();
    let text = models.to_string();
    let find = |m: &str| {
        models["data"]
            .as_array()
            .or_else(|| models.as_array())
            .and_then(|a| a.iter().find(|r| r["model"] == m))
            .map(|r| dec(r["cost"].as_str().unwrap()))
    };
    assert_eq!(find("gemini-2.5-pro"), Some(dec("0.67")), "{text}");
    assert_eq!(find("search-flash"), Some(dec("0.0352")), "{text}");
    let summary: Value =
        serde_json::from_str(&admin_text(&h, &format!("/admin/analytics/summary?month={month}")).await).unwrap();
    assert_eq!(dec(summary["cost"].as_str().unwrap()), ledger_cost);
    // And the live counters.
    let current = h.current(&key).await;
    assert_eq!(dec(current["current_month"]["cost"].as_str().unwrap()), ledger_cost);
}

/// `gemini-meter prices` with the shipped config: the table, and the README's two examples.
#[test]
fn the_prices_command_prices_the_readme_examples_with_the_shipped_config() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemini-meter"))
            .args(["prices", "--config", "config/gemini-meter.toml"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&[]);
    assert!(
        table.contains("long (prompt > 200000 tokens), per 1M tokens:"),
        "{table}"
    );
    assert!(table.contains("input 0.30; AUDIO 1.00"), "{table}");
    assert!(table.contains("cache storage 4.50 per 1M tokens per hour"), "{table}");
    // (200 x 0.30 + 800 x 1.00 + (50 + 120) x 2.50) / 1e6
    let audio = run(&["--request", "tests/fixtures/pricing/audio-prompt.json"]);
    assert!(audio.ends_with("cost 0.001285\n"), "{audio}");
    // (150000 x 2.50 + 100000 x 0.25 + (1000 + 2000) x 15.00) / 1e6, and half that in a batch.
    let long = run(&["--request", "tests/fixtures/pricing/long-context.json"]);
    assert!(long.ends_with("cost 0.445\n"), "{long}");
    let batch = run(&["--request", "tests/fixtures/pricing/long-context.json", "--batch"]);
    assert!(batch.ends_with("cost 0.2225\n"), "{batch}");
    // Not a usage report: exit 1 with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemini-meter"))
        .args(["prices", "--request", "Cargo.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usageMetadata"));
}

/// A `cache_storage` record as the lead's cachedContents route will write it (from the pure
/// function): exact in the ledger, the history, the breakdown (by type and by modality) and the
/// CSV export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_stored_for_an_hour_is_billed_exactly_everywhere() {
    use gemini_meter::ledger::{CacheAction, Details, Record, RecordIds};
    use gemini_meter::metering::usage::{CacheStored, cache_storage_usage};
    use std::sync::Arc;

    let up = upstream().await;
    let h = Harness::start_against(up, PRICES).await;
    let key = h.user_with_key("cacher", "unlimited").await;
    let pricing = h.app.live.load().config.pricing.clone();
    // 250000 tokens x 4.50 per 1M per hour x 1 hour = 1.125
    let (details, cost) = cache_storage_usage(
        &pricing,
        CacheStored {
            action: CacheAction::Create,
            cache: Some("cachedContents/c1".into()),
            key_id: "key_x".into(),
            model: Arc::from("models/gemini-2.5-pro"),
            tags: None,
            token_count: 250_000,
            ttl_seconds: 3600,
        },
    )
    .unwrap();
    assert_eq!(cost.to_string(), "1.125");
    let now = chrono::Utc::now();
    assert!(h.app.recorder.record(Record {
        id: RecordIds::new().next(now),
        user_id: Arc::from("cacher"),
        tokens: 0,
        messages: 0,
        bytes: 0,
        cost,
        details: Details::CacheStorage(details),
        created_at: now,
    }));
    let records = h.records("cacher").await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r.kind().as_str(), r.messages, r.cost.to_string()),
        ("cache_storage", 0, "1.125".into())
    );
    assert_eq!(
        r.metadata()["price"],
        json!({"entry": "gemini-2.5-pro", "lines": [{"cost": "1.125", "part": "cache_storage", "quantity": 250000, "rate": "4.50"}]})
    );
    let hist = get_json(&h, "/api/usage/history", &key).await;
    assert_eq!(hist["data"][0], r.to_json());
    let month = now.format("%Y-%m").to_string();
    let b = get_json(&h, &format!("/api/usage/breakdown?month={month}"), &key).await;
    assert_eq!(
        b["by_type"],
        json!([{"type": "cache_storage", "records": 1, "messages": 0, "tokens": 0, "bytes": 0, "cost": "1.125"}])
    );
    assert_eq!(
        b["by_modality"],
        json!([{"modality": null, "part": "cache_storage", "lines": 1, "quantity": 250000, "cost": "1.125"}])
    );
    let csv = admin_text(&h, &format!("/admin/export?month={month}&format=csv")).await;
    let rows: Vec<_> = csv.lines().skip(1).map(csv_row).collect();
    assert_eq!(rows, [(r.id_string(), r.cost, r.metadata())]);
}
