//! Cluster mode's shared counters, over real sockets: two gateway replicas on one Redis and one
//! PostgreSQL hold every quota exactly as one gateway does, through concurrency, a Redis that
//! dies and one that comes back empty, and a reply lost after the admission script ran.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::engines::{DropProxy, Postgres, Redis, Replica, ReplicaOptions};
use gemini_meter_mock::{MockOptions, MockServer};
use serde_json::{Value, json};

const TIERS: &str = r#"
[tiers.fifty]
messages = 50

[tiers.budget]
cost = "0.05"
enforcement = "hard"
min_output_tokens = 1
"#;

async fn mock() -> MockServer {
    MockServer::start("127.0.0.1:0".parse().unwrap(), MockOptions::default())
        .await
        .expect("mock upstream")
}

async fn two(mock: &MockServer, redis_url: &str, pg: &Postgres) -> (Replica, Replica) {
    let o = ReplicaOptions::new(mock.addr, redis_url, &pg.url()).extra(TIERS);
    tokio::join!(Replica::start_with(o.clone()), Replica::start_with(o))
}

/// Waits until the replica knows the key (keys are shared through PostgreSQL within a second).
async fn known(r: &Replica, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = reqwest::Client::new()
            .get(r.url("/api/usage/current"))
            .header("x-goog-api-key", key)
            .send()
            .await
            .unwrap()
            .status();
        if s == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "key unknown on the other replica: {s}\n{}",
            tail(r)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A generate call with a small output cap, sent to `r`.
async fn call(http: &reqwest::Client, r: &str, key: &str) -> reqwest::Response {
    http.post(format!("{r}/v1beta/models/unpriced-model:generateContent"))
        .header("x-goog-api-key", key)
        .json(&json!({
            "contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}],
            "generationConfig": {"maxOutputTokens": 40}
        }))
        .send()
        .await
        .expect("generate")
}

/// Sends `n` concurrent calls spread at random over the replicas; returns the statuses.
async fn burst(bases: &[String], key: &str, n: usize) -> Vec<u16> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::with_capacity(n);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ n as u64;
    for _ in 0..n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let base = bases[(seed % bases.len() as u64) as usize].clone();
        let (http, key) = (http.clone(), key.to_string());
        tasks.push(tokio::spawn(
            async move { call(&http, &base, &key).await.status().as_u16() },
        ));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// This user's rows in the PostgreSQL ledger, once every replica has shipped: (records,
/// messages, sum of cost).
async fn ledger(pg: &Postgres, user: &str, expect_messages: Option<u64>) -> (u64, u64, String) {
    // Every admitted call ends with two records: wait for both.
    let expect = expect_messages.map(|m| (2 * m, m));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = pg.query(&format!(
            "SELECT count(*), coalesce(sum(messages),0), coalesce(sum(cost),0)::text FROM gm_usage_records WHERE user_id = '{user}'"
        ));
        let r = &rows[0];
        let got = (r[0].parse().unwrap(), r[1].parse().unwrap(), r[2].clone());
        if expect.is_none_or(|e| e == (got.0, got.1)) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines a replica printed (for failure messages).
fn tail(r: &Replica) -> String {
    let out = r.output();
    let lines: Vec<&str> = out.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_fifty_of_four_hundred_every_round() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mock = mock().await;
    let (a, b) = two(&mock, &redis.url(), &pg).await;
    let bases = [a.base(), b.base()];
    for round in 0..20 {
        let user = format!("fifty-{round}");
        let key = a.user_with_key(&user, "fifty").await;
        known(&b, &key).await;
        let statuses = burst(&bases, &key, 400).await;
        let ok = statuses.iter().filter(|s| **s == 200).count();
        let refused = statuses.iter().filter(|s| **s == 403).count();
        assert_eq!(
            (ok, refused),
            (50, 350),
            "round {round}: {statuses:?}\nA: {}\nB: {}",
            tail(&a),
            tail(&b)
        );
        let (records, messages, _) = ledger(&pg, &user, Some(50)).await;
        // Each admitted call is a message_sent and an ai_response record.
        assert_eq!((records, messages), (100, 50), "round {round}: the ledger");
    }
    // What reached the upstream is exactly what was admitted.
    let upstream = mock.stats.generate_requests.load(Ordering::Relaxed);
    assert_eq!(upstream, 20 * 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_cost_limit_is_never_overshot_across_replicas() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mock = mock().await;
    let (a, b) = two(&mock, &redis.url(), &pg).await;
    let bases = [a.base(), b.base()];
    for round in 0..20 {
        let user = format!("budget-{round}");
        let key = a.user_with_key(&user, "budget").await;
        known(&b, &key).await;
        let statuses = burst(&bases, &key, 400).await;
        let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
        assert!(ok > 0, "round {round}: nothing admitted");
        let (records, messages, cost) = ledger(&pg, &user, Some(ok)).await;
        assert_eq!((records, messages), (2 * ok, ok), "round {round}");
        let cost: rust_decimal::Decimal = cost.parse().unwrap();
        assert!(cost <= "0.05".parse().unwrap(), "round {round}: spent {cost} of 0.05");
        // The counters both replicas show equal the ledger.
        for r in [&a, &b] {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let c = r.user_json("/api/usage/current", &key).await;
                let shown: rust_decimal::Decimal = c["current_month"]["cost"].as_str().unwrap_or("0").parse().unwrap();
                if shown == cost || Instant::now() > deadline {
                    assert_eq!(shown, cost, "round {round}: {c}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_refuses_with_503_and_restarted_empty_is_rebuilt_from_the_ledger() {
    let mut redis = Redis::start();
    let pg = Postgres::start();
    let mock = mock().await;
    let (a, b) = two(&mock, &redis.url(), &pg).await;
    let bases = [a.base(), b.base()];
    let key = a.user_with_key("survivor", "fifty").await;
    known(&b, &key).await;
    let first = burst(&bases, &key, 20).await;
    assert!(first.iter().all(|s| *s == 200), "{first:?}");

    // Load while Redis dies: only 200s (admitted before) and 503s, never an unreserved call.
    let ok = Arc::new(AtomicU64::new(20));
    let loader = {
        let (bases, key, ok) = (bases.clone(), key.clone(), ok.clone());
        tokio::spawn(async move {
            let mut unavailable = 0u64;
            let http = reqwest::Client::new();
            for i in 0..60 {
                let r = call(&http, &bases[i % 2], &key).await;
                match r.status().as_u16() {
                    200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    503 => {
                        assert!(r.headers().get("retry-after").is_some(), "503 without Retry-After");
                        let v: Value = r.json().await.unwrap();
                        assert_eq!(v["error"]["message"], "Usage store unavailable");
                        unavailable += 1;
                    }
                    s => panic!("status {s}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            unavailable
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let unavailable = loader.await.unwrap();
    assert!(unavailable > 0, "no 503 while Redis was down");
    let upstream = mock.stats.generate_requests.load(Ordering::Relaxed);
    assert_eq!(upstream, ok.load(Ordering::Relaxed), "a call went upstream unreserved");

    // Back, empty: admission resumes once the month is rebuilt; the limit still holds.
    redis.restart_empty();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admitted = ok.load(Ordering::Relaxed);
    let http = reqwest::Client::new();
    loop {
        let s = call(&http, &bases[(admitted % 2) as usize], &key)
            .await
            .status()
            .as_u16();
        match s {
            200 => admitted += 1,
            403 => break,
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            s => panic!("status {s}"),
        }
        assert!(Instant::now() < deadline, "admission did not resume");
    }
    assert_eq!(admitted, 50, "the quota after the rebuild");
    assert_eq!(mock.stats.generate_requests.load(Ordering::Relaxed), 50);
    let (_, messages, _) = ledger(&pg, "survivor", Some(50)).await;
    assert_eq!(messages, 50);
    for r in [&a, &b] {
        assert_eq!(
            r.user_json("/api/usage/current", &key).await["current_month"]["messages"],
            50,
            "totals equal the ledger"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_after_the_admission_script_ran_counts_once() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mock = mock().await;
    let proxy = DropProxy::start(redis.addr()).await;
    let a = Replica::start_with(ReplicaOptions::new(mock.addr, &proxy.redis_url(), &pg.url()).extra(TIERS)).await;
    let key = a.user_with_key("retry", "fifty").await;
    let http = reqwest::Client::new();
    let mut sent = 0;
    while proxy.dropped() < 3 && sent < 40 {
        proxy.drop_next_reply();
        let r = call(&http, &a.base(), &key).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        sent += 1;
    }
    assert!(proxy.dropped() >= 1, "no reply was lost");
    let month = chrono::Utc::now().format("%Y%m").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = redis.cmd(&["HGET", &format!("gm:q:{{retry}}:{month}"), "m"]);
        let m = match m {
            redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
            other => format!("{other:?}"),
        };
        if m == sent.to_string() || Instant::now() > deadline {
            assert_eq!(m, sent.to_string(), "messages counted in Redis");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, messages, _) = ledger(&pg, "retry", Some(sent)).await;
    assert_eq!(messages, sent);
}

#[test]
fn the_admission_script_answers_a_retry_with_the_same_verdict() {
    let redis = Redis::start();
    let script = redis::Script::new(include_str!("../src/cluster/quota/admit.lua"));
    let mut conn = redis.connection();
    let call = |conn: &mut redis::Connection, res: &str| -> Vec<redis::Value> {
        script
            .key("gm:q:{u}:202612")
            .key(format!("gm:r:{{u}}:{res}"))
            .key("gm:rz:{u}")
            .key("gm:rl:{u}:k")
            .key("gm:tpm:{u}")
            .arg("gen")
            .arg(2)
            .arg(-1)
            .arg(-1)
            .arg(-1)
            .arg(0)
            .arg(-1)
            .arg(-1)
            .arg(0)
            .arg(0)
            .arg(1)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(60_000)
            .arg(3600)
            .arg(res)
            .invoke(conn)
            .unwrap()
    };
    let first = call(&mut conn, "r1");
    let again = call(&mut conn, "r1");
    assert_eq!(first[0], redis::Value::Int(1));
    assert_eq!(again[0], redis::Value::Int(1), "the retry is admitted too");
    assert_eq!(again[3], redis::Value::Int(1), "and counted once: {again:?}");
    assert_eq!(call(&mut conn, "r2")[3], redis::Value::Int(2));
    // The third call is refused: two is the limit.
    assert_eq!(call(&mut conn, "r3")[0], redis::Value::Int(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_status_lists_live_replicas_and_a_config_that_differs() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mock = mock().await;
    let (a, mut b) = two(&mock, &redis.url(), &pg).await;
    let status = |r: &Replica| {
        let req = r.admin(reqwest::Method::GET, "/admin/cluster");
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = status(&a).await;
        if v["replicas"].as_array().is_some_and(|r| r.len() == 2) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["redis"]["status"], "ok", "{v}");
    assert_eq!(v["postgres"]["status"], "ok", "{v}");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["config_hashes_differ"], false, "{v}");
    assert!(v["replicas"].as_array().unwrap().iter().any(|r| r["this"] == true));

    // B's TOML changes (a new tier): its heartbeat shows another hash.
    b.write_config_extra(&format!("{TIERS}\n[tiers.extra]\nmessages = 1\n"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = status(&a).await;
        if v["config_hashes_differ"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the differing config never showed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The admin command line prints it; a killed replica leaves the list once its heartbeat expires.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gemini-meter"))
        .args(["admin", "--addr", &a.base(), "--token", common::ADMIN_TOKEN, "cluster"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("REPLICA") && text.contains("config hashes differ"),
        "{text}"
    );
    b.kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = status(&a).await;
        if v["replicas"].as_array().is_some_and(|r| r.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "a dead replica stays listed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_requests_per_minute_hold_across_replicas() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mock = mock().await;
    let o = ReplicaOptions::new(mock.addr, &redis.url(), &pg.url()).extra("[tiers.slow]\nrequests_per_minute = 3\n");
    let (a, b) = tokio::join!(Replica::start_with(o.clone()), Replica::start_with(o));
    let key = a.user_with_key("paced", "slow").await;
    known(&b, &key).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let base = if i % 2 == 0 { a.base() } else { b.base() };
        let r = call(&http, &base, &key).await;
        if r.status() == 429 {
            assert!(r.headers().get("retry-after").is_some(), "429 without Retry-After");
        }
        statuses.push(r.status().as_u16());
    }
    // One limiter for the key on both replicas: three calls a minute, not three per replica.
    assert_eq!(statuses, vec![200, 200, 200, 429, 429, 429], "{statuses:?}");
    // Each admission was one Redis round trip, as the replicas' metrics count them.
    let mut trips = 0u64;
    for r in [&a, &b] {
        let text = reqwest::get(r.url("/metrics")).await.unwrap().text().await.unwrap();
        trips += text
            .lines()
            .find_map(|l| l.strip_prefix("gm_cluster_admission_round_trips_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("the admission round trips in /metrics");
    }
    assert!(trips >= 6, "{trips} round trips for 6 admissions");
}
