//! Cluster mode through engine failures, over real sockets: PostgreSQL stopped for 30 s under
//! load refuses nothing, then a replica killed with `kill -9`; after recovery every record of
//! both replicas' logs is in PostgreSQL exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::engines::{Postgres, Redis, Replica, ReplicaOptions};
use gemini_meter_mock::{MockOptions, MockServer};
use serde_json::{Value, json};

/// Calls the replicas in turn until `stop`; counts what answered 200, 503 and anything else.
fn load(bases: Vec<String>, key: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<[u64; 3]> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut seen = [0u64; 3];
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let r = http
                .post(format!(
                    "{}/v1beta/models/gemini-2.5-flash:generateContent",
                    bases[i % bases.len()]
                ))
                .header("x-goog-api-key", &key)
                .json(&json!({"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}]}))
                .send()
                .await;
            match r.map(|r| r.status().as_u16()) {
                Ok(200) => seen[0] += 1,
                Ok(503) => seen[1] += 1,
                // A replica killed mid-call, or another status.
                _ => seen[2] += 1,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    })
}

async fn health(r: &Replica) -> Value {
    reqwest::get(r.url("/healthz")).await.unwrap().json().await.unwrap()
}

/// Waits until the replica has shipped everything it wrote.
async fn shipped(r: &Replica) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = health(r).await;
        if h["cluster"]["shipping_backlog"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "backlog never drained: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_s_then_a_replica_killed_loses_and_doubles_nothing() {
    let redis = Redis::start();
    let pg = Postgres::start();
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockOptions::default())
        .await
        .unwrap();
    let o = ReplicaOptions::new(mock.addr, &redis.url(), &pg.url());
    let (a, mut b) = tokio::join!(Replica::start_with(o.clone()), Replica::start_with(o));
    let key = a.user_with_key("steady", "unlimited").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(vec![a.base(), b.base()], key.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Nothing was refused while PostgreSQL was down: the records wait on local disk.
    let backlog = health(&a).await["cluster"]["shipping_backlog"].as_u64().unwrap_or(0);
    assert!(backlog > 0, "no backlog while PostgreSQL was down");
    pg.start_again();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let [ok, unavailable, other] = loader.await.unwrap();
    assert_eq!(unavailable, 0, "requests refused while only PostgreSQL was down");
    assert!(ok > 100, "too little load: {ok} ok, {other} other");

    b.restart().await;
    shipped(&a).await;
    shipped(&b).await;
    let (mut a, mut b) = (a, b);
    assert!(a.stop().await && b.stop().await, "a replica did not stop cleanly");

    // Every record of both logs, exactly once.
    let mut local = 0;
    for dir in [a.data_dir(), b.data_dir()] {
        let store = gemini_meter::ledger::SledStore::open(&dir).unwrap();
        local += store.count_records().unwrap();
    }
    let rows = pg.query("SELECT count(*), count(DISTINCT id), coalesce(sum(messages), 0) FROM gm_usage_records");
    let (count, distinct, messages): (u64, u64, u64) = (
        rows[0][0].parse().unwrap(),
        rows[0][1].parse().unwrap(),
        rows[0][2].parse().unwrap(),
    );
    assert_eq!(count, local, "records in PostgreSQL vs in the replicas' logs");
    assert_eq!(distinct, count);
    assert!(messages >= ok, "{messages} messages billed for {ok} answered calls");
    let upstream = mock.stats.generate_requests.load(Ordering::Relaxed);
    assert!(
        messages <= upstream,
        "{messages} messages billed, {upstream} calls reached the upstream"
    );
}
