//! Read speed with a big ledger (issue 5): 1M records for one user, 10M in all. Ignored by
//! default (it writes ~10 GB); run with
//! `GM_BIG_RECORDS=10000000 GM_BIG_HEAVY=1000000 cargo test --release --test big_ledger -- --ignored --nocapture`
//! (`GM_BIG_HEAVY` is the one user's share, default a tenth).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use gemini_meter::app::App;
use gemini_meter::clock::{Month, SystemClock};
use gemini_meter::config::Config;
use gemini_meter::ledger::{Details, Record, RecordIds, RecordKind, SledStore};
use gemini_meter::server::Server;
use rust_decimal::Decimal;
use serde_json::{Value, json};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0;
    format!("p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", p(0.5), p(0.99), p(1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn reads_stay_fast_with_a_big_ledger() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let total: usize = std::env::var("GM_BIG_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let heavy_n: usize = std::env::var("GM_BIG_HEAVY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(total / 10)
        .clamp(1, total);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = Utc::now();
    let month = Month::of(now);
    let month_start = month.start();
    // The heavy user's records fill this month up to now; the others sit in the 3 months before.
    let t0 = Instant::now();
    {
        let store = SledStore::open(&data).unwrap();
        let ids = RecordIds::new();
        let span_now = (now - month_start).num_milliseconds().max(1);
        let prev_start = month.minus(3).start();
        let span_prev = (month_start - prev_start).num_milliseconds().max(1);
        let mut i = 0usize;
        while i < total {
            let n = 20_000.min(total - i);
            let batch: Vec<Record> = (i..i + n)
                .map(|j| {
                    let heavy = j < heavy_n;
                    let at = if heavy {
                        month_start + chrono::Duration::milliseconds(j as i64 * span_now / heavy_n as i64)
                    } else {
                        prev_start
                            + chrono::Duration::milliseconds(
                                (j - heavy_n) as i64 * span_prev / (total - heavy_n).max(1) as i64,
                            )
                    };
                    let user = if heavy {
                        "heavy".to_string()
                    } else {
                        format!("u{}", j % 10_000)
                    };
                    Record {
                        id: ids.next(at),
                        user_id: Arc::from(user.as_str()),
                        tokens: if j % 2 == 0 { 0 } else { 27 },
                        messages: u64::from(j % 2 == 0),
                        bytes: 0,
                        cost: if j % 2 == 0 {
                            Decimal::ZERO
                        } else {
                            Decimal::new(4110, 8)
                        },
                        details: Details::from_value(
                            if j % 2 == 0 {
                                RecordKind::MessageSent
                            } else {
                                RecordKind::AiResponse
                            },
                            &json!({"model": "gemini-2.5-flash", "status": "ok"}),
                        )
                        .unwrap(),
                        created_at: at,
                    }
                })
                .collect();
            store.write_records(&batch).unwrap();
            i += n;
        }
        store.flush_sync().unwrap();
    }
    println!(
        "wrote {total} records ({heavy_n} for one user this month) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let mock = gemini_meter_mock::MockServer::start("127.0.0.1:0".parse().unwrap(), Default::default())
        .await
        .unwrap();
    let text = common::base_config(mock.addr, &data, "");
    let cfg = Config::parse(&text, "big.toml").unwrap();
    let env: gemini_meter::runtime::EnvLookup = Arc::new(|n| match n {
        "GM_TEST_UPSTREAM_KEY" => Some(common::UPSTREAM_KEY.into()),
        "GM_TEST_ADMIN_TOKEN" => Some(common::ADMIN_TOKEN.into()),
        _ => None,
    });
    let t_open = Instant::now();
    let (app, recorder) = App::open(cfg, None, Arc::new(SystemClock::default()), env).unwrap();
    println!("open (sled replay + load): {:.2} s", t_open.elapsed().as_secs_f64());
    recorder.spawn().unwrap();
    let now_c = app.clock.now();
    app.registry
        .create_user("heavy", "unlimited", None, now_c, Month::of(now_c))
        .unwrap();
    let (key, _) = app.registry.create_key("heavy", now_c).unwrap();
    let server = Server::start(app.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();

    let cur: Value = http
        .get(format!("{base}/api/usage/current"))
        .header("x-goog-api-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        cur["current_month"]["messages"].as_u64().unwrap(),
        heavy_n.div_ceil(2) as u64
    );

    let time_n = |path: String, admin: bool| {
        let http = http.clone();
        let key = key.clone();
        async move {
            let mut v = Vec::with_capacity(1000);
            for _ in 0..1000 {
                let t = Instant::now();
                let mut rb = http.get(&path);
                rb = if admin {
                    rb.bearer_auth(common::ADMIN_TOKEN)
                } else {
                    rb.header("x-goog-api-key", &key)
                };
                let r = rb.send().await.unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
                v.push(t.elapsed());
            }
            percentiles(v)
        }
    };
    println!(
        "history first page (50): {}",
        time_n(format!("{base}/api/usage/history?limit=50"), false).await
    );
    // A page deep in the history: the cursor of a record half way back.
    let mid = app
        .store
        .records(
            &gemini_meter::ledger::store::RecordFilter {
                user_id: Some("heavy".into()),
                ..Default::default()
            },
            heavy_n / 2,
        )
        .unwrap();
    let cursor = gemini_meter::ledger::store::format_cursor(mid.last().unwrap().0);
    println!(
        "history deep page (50): {}",
        time_n(format!("{base}/api/usage/history?limit=50&cursor={cursor}"), false).await
    );
    println!(
        "current month: {}",
        time_n(format!("{base}/api/usage/current"), false).await
    );
    let m = month.to_string();
    println!(
        "admin month totals: {}",
        time_n(format!("{base}/admin/analytics/summary?month={m}"), true).await
    );

    // Export of this month (the heavy user's records) in bounded memory.
    let before = rss_bytes();
    let mut peak = before;
    let t = Instant::now();
    let mut resp = http
        .get(format!("{base}/admin/export?month={m}&format=csv"))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let mut rows = 0usize;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rows += chunk.iter().filter(|b| **b == b'\n').count();
        peak = peak.max(rss_bytes());
    }
    println!(
        "export of {} rows: {:.1} s, RSS before {:.0} MB, peak {:.0} MB",
        rows - 1,
        t.elapsed().as_secs_f64(),
        before as f64 / 1e6,
        peak as f64 / 1e6
    );
    assert_eq!(rows - 1, heavy_n);
    drop(mock);
}
