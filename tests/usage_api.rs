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

/// One call with a `chat-id` tag; returns the status.
async fn tagged_call(h: &Harness, key: &str, model: &str, stream: bool, chat: &str) -> u16 {
    let path = if stream {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/models/{model}:generateContent")
    };
    h.http
        .post(h.url(&path))
        .header("x-goog-api-key", key)
        .header("x-meter-tag-chat-id", chat)
        .json(&serde_json::json!({"contents": [{"parts": [{"text": "Name three primes."}]}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Each metered request writes a `message_sent` and (once answered) an `ai_response` record,
/// both naming the model and carrying the tags: per-model and per-tag `requests` count the
/// requests, not the records (a request the upstream refused is still a request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_and_tag_analytics_count_requests_not_records() {
    let h = Harness::start("").await;
    let key = h.user_with_key("mia", "unlimited").await;
    for (stream, chat) in [(false, "c1"), (true, "c1"), (false, "c1"), (true, "c2"), (false, "c2")] {
        assert_eq!(tagged_call(&h, &key, "gemini-2.5-flash", stream, chat).await, 200);
    }
    assert_eq!(tagged_call(&h, &key, "error-500", false, "c2").await, 500);
    let recs = h.records("mia").await;
    assert!(recs.len() > 6, "more records than requests: {}", recs.len());
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let models: Value =
        serde_json::from_str(&admin_get(&h, &format!("/admin/analytics/models?month={month}")).await).unwrap();
    let row = |v: &Value, label: &str, name: &str| -> Value {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r[label] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no row {name} in {v}"))
    };
    let flash = row(&models, "model", "gemini-2.5-flash");
    assert_eq!(flash["requests"], 5, "{models}");
    assert_eq!(flash["messages"], 5, "{models}");
    let flash_tokens: u64 = recs
        .iter()
        .filter(|r| r.model() == Some("gemini-2.5-flash"))
        .map(|r| r.tokens)
        .sum();
    assert_eq!(flash["tokens"], flash_tokens, "tokens still count every record");
    let refused = row(&models, "model", "error-500");
    assert_eq!(refused["requests"], 1, "{models}");
    assert_eq!(refused["messages"], 0, "{models}");
    let tags: Value =
        serde_json::from_str(&admin_get(&h, &format!("/admin/analytics/tags?name=chat-id&month={month}")).await)
            .unwrap();
    assert_eq!(row(&tags, "value", "c1")["requests"], 3, "{tags}");
    assert_eq!(row(&tags, "value", "c2")["requests"], 3, "{tags}");
}

/// Everything the admin API shows of `user`'s usage this month: records (usage listing and
/// export) and the top-users row.
async fn admin_view_of(h: &Harness, user: &str) -> (Vec<Value>, Vec<Value>, Option<Value>) {
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let listed: Value =
        serde_json::from_str(&admin_get(h, &format!("/admin/usage?user_id={user}&limit=500")).await).unwrap();
    let exported: Vec<Value> = admin_get(h, &format!("/admin/export?month={month}&format=jsonl"))
        .await
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["user_id"] == user)
        .collect();
    let top: Value = serde_json::from_str(
        &admin_get(
            h,
            &format!("/admin/analytics/top-users?by=tokens&month={month}&limit=1000"),
        )
        .await,
    )
    .unwrap();
    let row = top["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user_id"] == user)
        .cloned();
    (listed["data"].as_array().unwrap().clone(), exported, row)
}

/// A stream still running when its user is deleted settles after the erasure: its records must
/// not land (nor re-create the user's history, aggregates or chain for a user created again
/// under the same id), before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_settled_after_a_users_deletion_never_land() {
    // `slow` waits 200 ms between events: 12 events keep the stream open while the user goes.
    let opts = gemini_meter_mock::MockOptions {
        chunks: 12,
        ..Default::default()
    };
    let h = Harness::start_with("", opts).await;
    let key = h.user_with_key("dora", "unlimited").await;
    let otto = h.user_with_key("otto", "unlimited").await;
    assert_eq!(h.generate(&key, "gemini-2.5-flash", false).await.status(), 200);
    assert_eq!(h.generate(&otto, "gemini-2.5-flash", false).await.status(), 200);
    let mut stream = h.generate(&key, "slow", true).await;
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some(), "first event");
    let r = h
        .admin(reqwest::Method::DELETE, "/admin/users/dora")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The erasure is done (the recorder ran it before answering) and the stream goes on.
    assert!(stream.chunk().await.unwrap().is_some(), "the stream outlives its user");
    while stream.chunk().await.unwrap().is_some() {}
    h.sync().await;
    let (listed, exported, top) = admin_view_of(&h, "dora").await;
    assert!(listed.is_empty(), "listed after the erasure: {listed:?}");
    assert!(exported.is_empty(), "exported after the erasure: {exported:?}");
    assert!(top.is_none(), "top-users row after the erasure: {top:?}");
    let metrics = h
        .http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\ngm_recorder_records_dropped_erased_total 1\n"),
        "the stream's ai_response was dropped: {metrics}"
    );

    // The same id created again is a new user: nothing of the old one shows.
    let key = h.user_with_key("dora", "unlimited").await;
    let history = get(&h, "/api/usage/history", &key).await;
    assert_eq!(history["data"].as_array().unwrap().len(), 0, "{history}");
    assert_eq!(get(&h, "/api/usage/daily", &key).await["data"], serde_json::json!([]));
    assert_eq!(h.current(&key).await["current_month"]["tokens"], 0);
    assert_eq!(h.generate(&key, "gemini-2.5-flash", false).await.status(), 200);
    let mine = h.records("dora").await;
    assert_eq!(mine.len(), 2, "the new user's own request: {mine:?}");
    let tokens: u64 = mine.iter().map(|r| r.tokens).sum();

    let h = h.reopen(&[]).await;
    let history = get(&h, "/api/usage/history", &key).await;
    assert_eq!(history["data"].as_array().unwrap().len(), 2, "{history}");
    let (listed, exported, top) = admin_view_of(&h, "dora").await;
    assert_eq!((listed.len(), exported.len()), (2, 2));
    assert_eq!(top.unwrap()["tokens"], tokens);
    assert_eq!(h.current(&key).await["current_month"]["tokens"], tokens);
    assert_eq!(h.records("otto").await.len(), 2, "other users keep their records");
}

/// A caller's own reads (history, daily, breakdown) show every record of the responses they
/// already got, at once, though the aggregates are applied only every `flush_interval_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_own_reads_show_what_they_were_answered_at_once() {
    // The longest interval the config takes: nothing here waits for the recorder otherwise.
    let h = Harness::start_flushing_every(10_000, "").await;
    let key = h.user_with_key("lou", "unlimited").await;
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let started = std::time::Instant::now();
    for (i, stream) in [false, true, false].into_iter().enumerate() {
        let r = h.generate(&key, "gemini-2.5-flash", stream).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let history = get(&h, "/api/usage/history?limit=500", &key).await;
        let data = history["data"].as_array().unwrap();
        assert_eq!(data.len(), 2 * (i + 1), "right after response {i}: {history}");
        assert_eq!(data[0]["type"], "ai_response");
        let tokens = h.current(&key).await["current_month"]["tokens"].as_u64().unwrap();
        let listed: u64 = data.iter().map(|r| r["tokens"].as_u64().unwrap()).sum();
        assert_eq!(listed, tokens, "history and current agree");
        let daily = get(&h, "/api/usage/daily", &key).await;
        let by_day: u64 = daily["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(by_day, tokens, "daily and current agree: {daily}");
        let breakdown = get(&h, &format!("/api/usage/breakdown?month={month}"), &key).await;
        assert_eq!(breakdown["total"]["tokens"], tokens, "{breakdown}");
    }
    // The aggregates were not applied meanwhile: what the caller read came from the log.
    let summary: Value =
        serde_json::from_str(&admin_get(&h, &format!("/admin/analytics/summary?month={month}")).await).unwrap();
    if started.elapsed() < std::time::Duration::from_secs(9) {
        assert_eq!(summary["tokens"], 0, "{summary}");
    }
}

fn p50_p99(mut v: Vec<std::time::Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    format!("p50 {:.3} ms, p99 {:.3} ms", p(0.5), p(0.99))
}

/// What the barrier before a caller's reads costs, idle and under proxy load, and what a
/// caller polling their history does to the proxy's throughput. A measurement, not a check:
/// `cargo test --test usage_api measure_the_read_barrier -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_the_read_barrier() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let h = Arc::new(Harness::start_flushing_every(50, "").await);
    let key = h.user_with_key("mo", "unlimited").await;
    for _ in 0..50 {
        assert_eq!(h.generate(&key, "gemini-2.5-flash", false).await.status(), 200);
    }
    h.sync().await;
    let barrier = |n: usize| {
        let h = h.clone();
        async move {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                h.app.recorder.written().await.unwrap();
                v.push(t.elapsed());
            }
            p50_p99(v)
        }
    };
    let history = |n: usize| {
        let (h, key) = (h.clone(), key.clone());
        async move {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                get(&h, "/api/usage/history?limit=50", &key).await;
                v.push(t.elapsed());
            }
            p50_p99(v)
        }
    };
    println!(
        "idle: barrier alone {}; history page of 50 {}",
        barrier(1000).await,
        history(1000).await
    );

    // Proxy load: 16 workers; a window with nobody reading, one with a caller polling history.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (h, key, stop, done) = (h.clone(), key.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(h.generate(&key, "gemini-2.5-flash", false).await.status(), 200);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let window = Duration::from_secs(5);
    let rate = |from: u64, t: Instant| (done.load(Ordering::Relaxed) - from) as f64 / t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let alone = rate(n0, t0);
    let (n1, t1) = (done.load(Ordering::Relaxed), Instant::now());
    let mut v = Vec::new();
    while t1.elapsed() < window {
        let t = Instant::now();
        get(&h, "/api/usage/history?limit=50", &key).await;
        v.push(t.elapsed());
    }
    let polled = rate(n1, t1);
    let reads = v.len();
    // The barrier alone, as often as it answers: what it adds to the proxy's work.
    let (n2, t2) = (done.load(Ordering::Relaxed), Instant::now());
    let mut barriers = 0u64;
    while t2.elapsed() < window {
        h.app.recorder.written().await.unwrap();
        barriers += 1;
    }
    let barred = rate(n2, t2);
    let under_load = barrier(300).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    println!(
        "under load (16 workers): {alone:.0} req/s with no reader, {polled:.0} req/s with a caller polling history ({reads} reads in {window:?}, {}), {barred:.0} req/s with barriers alone in a loop ({barriers} in {window:?}); barrier alone {under_load}",
        p50_p99(v)
    );
}
