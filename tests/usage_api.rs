//! The usage and admin read APIs against the ledger: pagination, isolation, daily sums, export.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::str::FromStr;

use common::Harness;
use rust_decimal::Decimal;
use serde_json::Value;

async fn get(h: &Harness, path: &str, key: &str) -> Value {
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

/// GET an admin route (admin token), expecting 200; the body as text.
async fn admin_get(h: &Harness, path: &str) -> String {
    let r = h.admin(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_have_no_gaps_or_repeats_and_stay_per_user() {
    let h = Harness::start("").await;
    let alice = h.user_with_key("alice", "unlimited").await;
    let bob = h.user_with_key("bob", "unlimited").await;
    // 62 calls = 124 records for alice (message_sent + ai_response each), 2 for bob.
    let mut tasks = Vec::new();
    for i in 0..62 {
        let (http, url, key) = (
            h.http.clone(),
            h.url("/v1beta/models/gemini-2.5-flash:generateContent"),
            alice.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"contents": [{"parts": [{"text": format!("call {i}")}]}]});
            http.post(url)
                .header("x-goog-api-key", key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(h.generate(&bob, "gemini-2.5-flash", false).await.status(), 200);
    h.sync().await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/usage/history?limit=7&cursor={c}"),
            None => "/api/usage/history?limit=7".to_string(),
        };
        let page = get(&h, &path, &alice).await;
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 7);
        for r in data {
            assert_eq!(r["user_id"], "alice", "a caller sees only their own records");
            seen.push(r["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 124, "every record once");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 124, "no repeats");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    // The ledger holds exactly these.
    let ledger: HashSet<String> = h.records("alice").await.iter().map(|r| r.id_string()).collect();
    assert_eq!(ledger, seen.into_iter().collect::<HashSet<_>>());
    // limit is capped at 500; a bad cursor is a 400.
    let page = get(&h, "/api/usage/history?limit=100000", &alice).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 124);
    let r = h
        .http
        .get(h.url("/api/usage/history?cursor=zzz"))
        .header("x-goog-api-key", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_and_export_add_up_to_the_ledger_exactly() {
    let h = Harness::start("").await;
    let a = h.user_with_key("ann", "unlimited").await;
    let b = h.user_with_key("ben", "unlimited").await;
    for _ in 0..5 {
        assert_eq!(h.generate(&a, "gemini-2.5-flash", true).await.status(), 200);
        assert_eq!(h.generate(&b, "gemini-2.0-flash", false).await.status(), 200);
    }
    let mut all = h.records("ann").await;
    all.extend(h.records("ben").await);
    let ledger_cost: Decimal = all.iter().map(|r| r.cost).sum();
    let ledger_tokens: u64 = all.iter().map(|r| r.tokens).sum();

    // Daily, per user: sums equal that user's records.
    let daily = get(&h, "/api/usage/daily?days=30", &a).await;
    let mut tokens = 0;
    let mut cost = Decimal::ZERO;
    for row in daily["data"].as_array().unwrap() {
        tokens += row["tokens"].as_u64().unwrap();
        cost += Decimal::from_str(row["cost"].as_str().unwrap()).unwrap();
    }
    let ann = h.records("ann").await;
    assert_eq!(tokens, ann.iter().map(|r| r.tokens).sum::<u64>());
    assert_eq!(cost, ann.iter().map(|r| r.cost).sum::<Decimal>());

    // CSV export: the contract's header, one row per record, exact cost sum.
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let csv = admin_get(&h, &format!("/admin/export?month={month}&format=csv")).await;
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,user_id,type,tokens,messages,bytes,cost,metadata,created_at"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), all.len());
    let mut csv_cost = Decimal::ZERO;
    let mut csv_tokens = 0u64;
    for row in &rows {
        // id,user_id,type,tokens,messages,bytes,cost, then the quoted metadata JSON.
        let f: Vec<&str> = row.splitn(8, ',').collect();
        csv_tokens += f[3].parse::<u64>().unwrap();
        csv_cost += Decimal::from_str(f[6]).unwrap();
    }
    assert_eq!(csv_cost, ledger_cost);
    assert_eq!(csv_tokens, ledger_tokens);

    // JSON lines: same records.
    let jsonl = h
        .admin(
            reqwest::Method::GET,
            &format!("/admin/export?month={month}&format=jsonl"),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let recs: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), all.len());
    let sum: Decimal = recs
        .iter()
        .map(|r| Decimal::from_str(r["cost"].as_str().unwrap()).unwrap())
        .sum();
    assert_eq!(sum, ledger_cost);

    // Month summary and per-model analytics agree with the ledger too.
    let s: Value =
        serde_json::from_str(&admin_get(&h, &format!("/admin/analytics/summary?month={month}")).await).unwrap();
    assert_eq!(Decimal::from_str(s["cost"].as_str().unwrap()).unwrap(), ledger_cost);
    assert_eq!(s["tokens"].as_u64().unwrap(), ledger_tokens);
    assert_eq!(s["active_users"], 2);
    let top: Value = h
        .admin(
            reqwest::Method::GET,
            &format!("/admin/analytics/top-users?by=tokens&month={month}"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(top["data"].as_array().unwrap().len(), 2);
}
