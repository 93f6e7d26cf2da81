//! The ledger in PostgreSQL (cluster mode), against a real PostgreSQL and Redis: every record
//! shipped exactly once (across a shipper restart with its position lost, and PostgreSQL
//! stopped and started again), deleted users' records kept out, and the reads from PostgreSQL
//! equal the embedded reads of the same records, byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gemini_meter::app::App;
use gemini_meter::clock::{Month, SystemClock};
use gemini_meter::cluster::Cluster;
use gemini_meter::cluster::ledger::{self, ShipperHandle, reads};
use gemini_meter::config::Config;
use gemini_meter::ledger::{Details, Record, RecordIds, RecordKind};
use gemini_meter::server::Server;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use common::engines::{Postgres, Redis};
use common::{ADMIN_TOKEN, base_config, test_env};

const FLUSH: Duration = Duration::from_secs(90);

/// A gateway in this process on `dir`, in cluster mode or embedded.
struct Node {
    app: Arc<App>,
    server: Option<Server>,
    shipper: Option<ShipperHandle>,
    base: String,
    http: reqwest::Client,
}

fn env(redis: &Redis, pg: &Postgres) -> gemini_meter::runtime::EnvLookup {
    test_env(&[("GM_TEST_REDIS_URL", &redis.url()), ("GM_TEST_DATABASE_URL", &pg.url())])
}

async fn node(dir: &std::path::Path, engines: Option<(&Redis, &Postgres)>) -> Node {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let path = dir.join("gemini-meter.toml");
    let extra = if engines.is_some() {
        "[cluster]\nredis_url_env = \"GM_TEST_REDIS_URL\"\npostgres_url_env = \"GM_TEST_DATABASE_URL\"\n"
    } else {
        ""
    };
    // The upstream is never called here.
    std::fs::write(
        &path,
        base_config("127.0.0.1:9".parse().unwrap(), &dir.join("data"), extra),
    )
    .unwrap();
    let cfg = Config::load(&path).unwrap();
    let env = match engines {
        Some((r, p)) => env(r, p),
        None => test_env(&[]),
    };
    let cluster = Cluster::connect(&cfg, &env).await.unwrap();
    assert_eq!(cluster.is_some(), engines.is_some());
    let clock = Arc::new(SystemClock::default());
    let (app, recorder) = App::open_with(cfg, Some(path), clock, env, cluster).unwrap();
    recorder.spawn().unwrap();
    let shipper = gemini_meter::replica::spawn_shipper(&app);
    let server = Server::start(app.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Node {
        base: format!("http://{}", server.addr),
        app,
        server: Some(server),
        shipper,
        http: reqwest::Client::new(),
    }
}

impl Node {
    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        if let Some(s) = self.shipper.take() {
            s.stop().await;
        }
        self.app.recorder.sync().await.unwrap();
        self.app.store.flush().await.unwrap();
    }

    async fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        req = match key {
            Some(k) => req.header("x-goog-api-key", k),
            None => req.bearer_auth(ADMIN_TOKEN),
        };
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn json(&self, path: &str, key: Option<&str>) -> Value {
        let (status, body) = self.get(path, key).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Every record of a paged read, following `next_cursor` (pages of `limit`).
    async fn all_pages(&self, path: &str, key: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}cursor={c}"),
                None => path.to_string(),
            };
            let v = self.json(&p, key).await;
            out.extend(v["data"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    async fn user_with_key(&self, id: &str) -> String {
        let r = self
            .http
            .post(format!("{}/admin/users", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"id": id, "tier": "free"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = self
            .http
            .post(format!("{}/admin/users/{id}/keys", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        v["key"].as_str().unwrap().to_string()
    }
}

/// A record of type `kind` for `user` at `at`, with tags and amounts varying with `i`.
fn record(i: usize, user: &str, kind: RecordKind, at: DateTime<Utc>) -> Record {
    let tags =
        json!({"chat-id": format!("c{}", i % 3), "team": if i.is_multiple_of(2) { "a" } else { "b,\"quoted\"" }});
    let model = if i.is_multiple_of(4) {
        "gemini-2.5-flash-lite"
    } else {
        "gemini-2.5-flash"
    };
    let (metadata, tokens, messages, bytes, cost) = match kind {
        RecordKind::MessageSent => (
            json!({"model": model, "status": "ok", "upstream_status": 200, "key_id": "key_x", "tags": tags}),
            0,
            1,
            0,
            Decimal::ZERO,
        ),
        RecordKind::AiResponse => (
            json!({"model": model, "prompt_tokens": 10 + i, "output_tokens": 5, "thoughts_tokens": 0,
                   "cached_tokens": 0, "response_bytes": 100 + i, "stream": i.is_multiple_of(2), "format": "json",
                   "upstream_status": 200, "status": "ok", "token_source": "upstream", "key_id": "key_x",
                   "duration_ms": 3, "tags": tags}),
            15 + i as u64,
            0,
            0,
            Decimal::new(137 * (i as i64 + 1), 9),
        ),
        _ => (
            json!({"bytes_sent": 1000 + i, "key_id": "key_x", "status": "ok", "upstream_status": 200, "tags": tags}),
            0,
            0,
            1000 + i as u64,
            Decimal::new(1000 + i as i64, 8),
        ),
    };
    Record {
        id: 0,
        user_id: Arc::from(user),
        tokens,
        messages,
        bytes,
        cost,
        details: Details::from_value(kind, &metadata).unwrap(),
        created_at: at,
    }
}

/// Hands `n` records to the recorder: users and types in turn, one every 97 minutes ending
/// now (so they span this month and the last).
fn write_records(app: &App, users: &[&str], n: usize, ids: &RecordIds) {
    let now = Utc::now();
    let kinds = [RecordKind::MessageSent, RecordKind::AiResponse, RecordKind::FileUpload];
    for i in 0..n {
        let at = now - chrono::Duration::minutes(97 * (n - i) as i64);
        let mut r = record(i, users[i % users.len()], kinds[i % 3], at);
        r.id = ids.next(at);
        assert!(app.recorder.record(r));
    }
}

fn pg_count(pg: &Postgres, filter: &str) -> (u64, u64) {
    let rows = pg.query(&format!(
        "SELECT count(*), count(DISTINCT id) FROM gm_usage_records {filter}"
    ));
    (rows[0][0].parse().unwrap(), rows[0][1].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_shipped_once_across_a_lost_position_and_postgres_stopped_and_started() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mut n = node(dir.path(), Some((&redis, &pg))).await;
    let ids = RecordIds::new();

    write_records(&n.app, &["carol", "dan"], 300, &ids);
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    assert_eq!(pg_count(&pg, ""), (300, 300));
    let shipped = pg.query("SELECT count(*) FROM gm_replicas_shipped");
    assert_eq!(shipped, vec![vec!["1".to_string()]]);

    // PostgreSQL stopped: records wait on disk, the backlog shows them, nothing is refused.
    pg.stop();
    write_records(&n.app, &["carol", "dan"], 200, &ids);
    n.app.recorder.sync().await.unwrap();
    let err = gemini_meter::replica::flush(&n.app, Duration::from_millis(300)).await;
    assert!(err.is_err(), "flushed with PostgreSQL stopped");
    assert_eq!(ledger::unshipped_records(&n.app.store).unwrap().len(), 200);
    let state = n.app.cluster.as_ref().unwrap().shipping.clone();
    let deadline = std::time::Instant::now() + FLUSH;
    while state.backlog() != 200 || state.last_error().is_none() {
        assert!(std::time::Instant::now() < deadline, "backlog {}", state.backlog());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = n.json("/healthz", None).await;
    assert_eq!(health["cluster"]["shipping_backlog"], 200, "{health}");
    assert!(health["cluster"]["oldest_unshipped_seconds"].as_f64().unwrap() > 0.0);
    let (_, metrics) = n.get("/metrics", None).await;
    assert!(metrics.contains("gm_cluster_shipping_backlog 200"), "{metrics}");
    // Reads that need PostgreSQL answer 503 with a clear message.
    let (status, body) = n.get("/admin/analytics/summary", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("PostgreSQL"), "{body}");

    pg.start_again();
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    assert_eq!(pg_count(&pg, ""), (500, 500));
    assert_eq!(state.backlog(), 0);

    // The position lost (as after a crash before sled kept it): everything ships again and the
    // primary key absorbs it.
    n.shipper.take().unwrap().stop().await;
    n.app.store.meta().remove(ledger::ship::POSITION_KEY).unwrap();
    n.shipper = gemini_meter::replica::spawn_shipper(&n.app);
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    assert_eq!(pg_count(&pg, ""), (500, 500));

    // Month totals (what counters are rebuilt from) equal the local aggregates; the unshipped
    // records are added once, even when PostgreSQL already has them.
    let pgc = &n.app.cluster.as_ref().unwrap().pg;
    for m in [Month::of(Utc::now()), Month::of(Utc::now()).minus(1)] {
        let local = n.app.store.month_users(m).unwrap();
        assert_eq!(reads::month_totals(pgc, m).await.unwrap(), local, "month {m}");
        let all = n.app.store.records(&Default::default(), 1000).unwrap();
        let again: Vec<Record> = all.into_iter().map(|(_, r)| r).collect();
        assert_eq!(reads::month_totals_with(pgc, m, &again).await.unwrap(), local);
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_users_records_waiting_in_the_log_are_not_shipped_after_the_deletion() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mut n = node(dir.path(), Some((&redis, &pg))).await;
    let ids = RecordIds::new();
    write_records(&n.app, &["erin", "fay"], 40, &ids);
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    n.shipper.take().unwrap().stop().await;
    write_records(&n.app, &["erin", "fay"], 20, &ids);
    n.app.recorder.sync().await.unwrap();
    let pgc = &n.app.cluster.as_ref().unwrap().pg;
    let deleted = reads::delete_user(pgc, "erin", Utc::now()).await.unwrap();
    assert_eq!(deleted, 20);
    n.shipper = gemini_meter::replica::spawn_shipper(&n.app);
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    assert_eq!(pg_count(&pg, "WHERE user_id = 'erin'"), (0, 0));
    assert_eq!(pg_count(&pg, "WHERE user_id = 'fay'"), (30, 30));
    // A user of the same id made again later is shipped.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut r = record(1, "erin", RecordKind::AiResponse, Utc::now());
    r.id = ids.next(r.created_at);
    n.app.recorder.record(r);
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    assert_eq!(pg_count(&pg, "WHERE user_id = 'erin'"), (1, 1));

    // Retention drops the partitions of whole months before the cutoff.
    let start = Month::of(Utc::now()).start();
    let old = pg.query(&format!(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'gm_usage_records' \
         AND c.relname < '{}' ORDER BY 1",
        ledger::schema::partition_name(Month::of(start))
    ));
    let c = n.app.cluster.clone().unwrap();
    let mut dropped = ledger::retention(&c, start).await.unwrap();
    dropped.sort();
    assert_eq!(dropped, old.into_iter().map(|r| r[0].clone()).collect::<Vec<_>>());
    assert_eq!(
        pg_count(&pg, &format!("WHERE created_at < '{}'", start.to_rfc3339())),
        (0, 0)
    );
    assert!(pg_count(&pg, "").0 > 0);
    n.stop().await;
}

/// Every read that cluster mode answers from PostgreSQL, as (path, caller key or admin).
fn reads_of(month: Month, key: &str) -> Vec<(String, Option<String>)> {
    let last = month.minus(1);
    let mut v: Vec<(String, Option<String>)> = vec![
        ("/api/usage/daily?days=60".into(), Some(key.into())),
        (format!("/api/usage/breakdown?month={month}"), Some(key.into())),
        (format!("/api/usage/breakdown?month={last}"), Some(key.into())),
        ("/admin/analytics/daily?days=60".into(), None),
    ];
    for m in [month, last] {
        v.push((format!("/admin/analytics/summary?month={m}"), None));
        v.push((format!("/admin/analytics/models?month={m}"), None));
        for by in ["cost", "tokens", "messages"] {
            v.push((format!("/admin/analytics/top-users?by={by}&month={m}"), None));
        }
        v.push((format!("/admin/analytics/tags?name=chat-id&month={m}"), None));
        v.push((format!("/admin/analytics/tags?name=team&month={m}"), None));
        v.push((format!("/admin/export?month={m}&format=csv"), None));
        v.push((format!("/admin/export?month={m}&format=jsonl"), None));
    }
    v
}

/// Every paged read, followed to its end.
fn paged_reads(key: &str) -> Vec<(String, Option<String>)> {
    vec![
        ("/api/usage/history?limit=7".into(), Some(key.into())),
        ("/api/usage/history?limit=500".into(), Some(key.into())),
        ("/admin/usage?limit=11".into(), None),
        ("/admin/usage?limit=5&user_id=gus&type=ai_response".into(), None),
        ("/admin/usage?limit=9&type=file_upload".into(), None),
    ]
}

async fn collect(n: &Node, key: &str) -> Vec<(String, String)> {
    let month = Month::of(Utc::now());
    let mut out = Vec::new();
    for (path, k) in reads_of(month, key) {
        let (status, body) = n.get(&path, k.as_deref()).await;
        assert_eq!(status, 200, "{path}: {body}");
        out.push((path, body));
    }
    for (path, k) in paged_reads(key) {
        let all = n.all_pages(&path, k.as_deref()).await;
        out.push((path, serde_json::to_string(&all).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_postgres_equal_the_embedded_reads_of_the_same_records() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), Some((&redis, &pg))).await;
    let key = n.user_with_key("gus").await;
    n.user_with_key("hal").await;
    write_records(&n.app, &["gus", "hal"], 240, &RecordIds::new());
    gemini_meter::replica::flush(&n.app, FLUSH).await.unwrap();
    assert_eq!(pg_count(&pg, ""), (240, 240));
    let from_pg = collect(&n, &key).await;
    let bad = n.get("/api/usage/history?cursor=0000000000000001", Some(&key)).await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    let bad = n.get("/admin/usage?cursor=zz", None).await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    n.stop().await;

    let e = node(dir.path(), None).await;
    let embedded = collect(&e, &key).await;
    e.stop().await;
    assert_eq!(from_pg.len(), embedded.len());
    for ((path, a), (_, b)) in from_pg.iter().zip(&embedded) {
        assert!(!b.is_empty() && b != "[]", "{path}: nothing to compare");
        assert_eq!(a, b, "{path} differs");
    }
}

/// `n` generate calls at once; returns how many got 200.
async fn load(r: &common::engines::Replica, key: &str, n: usize) -> usize {
    let calls = (0..n).map(|_| r.generate(key, "gemini-2.5-flash"));
    let answers = futures_util::future::join_all(calls).await;
    answers.iter().filter(|a| a.status() == 200).count()
}

async fn health(r: &common::engines::Replica) -> Value {
    reqwest::get(r.url("/healthz")).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_then_the_replica_killed_every_record_reaches_postgres_once() {
    use gemini_meter_mock::{MockOptions, MockServer};
    let redis = Redis::start();
    let pg = Postgres::start();
    let opts = MockOptions {
        api_key: Some(common::UPSTREAM_KEY.into()),
        ..MockOptions::default()
    };
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
    let mut r = common::engines::Replica::start(mock.addr, &redis.url(), &pg.url()).await;
    let key = r.user_with_key("ivy", "unlimited").await;
    let mut ok = load(&r, &key, 40).await;
    assert_eq!(ok, 40);
    pg.stop();
    // Nothing is refused while PostgreSQL is down.
    assert_eq!(load(&r, &key, 40).await, 40);
    ok += 40;
    // Every record handed to the recorder is in the log, then the process dies.
    let deadline = std::time::Instant::now() + FLUSH;
    while health(&r).await["storage"]["queued_records"] != 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.kill9();
    pg.start_again();
    r.restart().await;
    let want = 2 * ok as u64;
    let deadline = std::time::Instant::now() + FLUSH;
    loop {
        let (n, _) = pg_count(&pg, "");
        let h = health(&r).await;
        if n >= want && h["cluster"]["shipping_backlog"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} of {want} shipped; {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pg_count(&pg, ""), (want, want));
    let messages = pg.query("SELECT sum(messages) FROM gm_usage_records WHERE user_id = 'ivy'");
    assert_eq!(messages[0][0], ok.to_string());
    assert!(r.stop().await, "{}", r.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_ship_to_one_ledger_and_each_reads_all_of_it() {
    use gemini_meter_mock::{MockOptions, MockServer};
    let redis = Redis::start();
    let pg = Postgres::start();
    let opts = MockOptions {
        api_key: Some(common::UPSTREAM_KEY.into()),
        ..MockOptions::default()
    };
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
    let a = common::engines::Replica::start(mock.addr, &redis.url(), &pg.url()).await;
    let b = common::engines::Replica::start(mock.addr, &redis.url(), &pg.url()).await;
    let ka = a.user_with_key("jo", "unlimited").await;
    let kb = b.user_with_key("kim", "unlimited").await;
    assert_eq!(load(&a, &ka, 15).await, 15);
    assert_eq!(load(&b, &kb, 25).await, 25);
    let deadline = std::time::Instant::now() + FLUSH;
    while pg_count(&pg, "").0 < 80 {
        assert!(std::time::Instant::now() < deadline, "not shipped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pg_count(&pg, ""), (80, 80));
    let replicas = pg.query("SELECT count(DISTINCT replica) FROM gm_usage_records");
    assert_eq!(replicas[0][0], "2");
    for r in [&a, &b] {
        let page: Value = r
            .admin(reqwest::Method::GET, "/admin/usage?limit=500")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["data"].as_array().unwrap().len(), 80);
        let top: Value = r
            .admin(reqwest::Method::GET, "/admin/analytics/top-users?by=messages")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(top["data"][0]["user_id"], "kim", "{top}");
        assert_eq!(top["data"][0]["messages"], 25);
        assert_eq!(top["data"][1]["messages"], 15);
    }
    // A caller's own history on the replica they used: every one of their records.
    let mine: Value = a.user_json("/api/usage/history?limit=500", &ka).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 30);
}
