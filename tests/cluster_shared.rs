//! Cluster mode, item 4 of issue 16: users, keys, tiers, upload sessions, resource ownership and
//! alert marks shared by two gateway processes on one PostgreSQL (and one Redis), over real
//! sockets. Changes reach the other replica through LISTEN/NOTIFY; the tests wait for them with
//! a generous deadline (never a timed assertion) and print how long they took.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::engines::{Postgres, Redis, Replica, ReplicaOptions};
use gemini_meter_mock::{MockOptions, MockServer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use reqwest::Method;
use serde_json::{Value, json};

const MODEL: &str = "gemini-2.5-flash";
/// Generous: two cores, several test binaries at once. The contract is 1 s; the observed time
/// is printed.
const DEADLINE: Duration = Duration::from_secs(20);

/// Dropped in this order: the replicas first, then the engines.
struct Site {
    a: Replica,
    b: Replica,
    mock: MockServer,
    _redis: Redis,
    pg: Postgres,
}

impl Site {
    async fn start(extra: &str) -> Site {
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockOptions::default())
            .await
            .expect("mock upstream");
        let redis = Redis::start();
        let pg = Postgres::start();
        let opts = ReplicaOptions::new(mock.addr, &redis.url(), &pg.url()).extra(extra);
        let a = Replica::start_with(opts.clone()).await;
        let b = Replica::start_with(opts).await;
        Site {
            a,
            b,
            mock,
            _redis: redis,
            pg,
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Polls `f` until it is true; panics after [`DEADLINE`] with what the replicas printed.
/// Returns how long it took.
async fn eventually<F, Fut>(s: &Site, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            let took = start.elapsed();
            eprintln!("{what}: {took:?}");
            return took;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}\n--- A:\n{}\n--- B:\n{}",
            s.a.output(),
            s.b.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status_of_generate(r: &Replica, key: &str) -> u16 {
    r.generate(key, MODEL).await.status().as_u16()
}

async fn create_key_full(r: &Replica, user: &str) -> (String, String) {
    let resp = r
        .admin(Method::POST, &format!("/admin/users/{user}/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    (
        v["key"].as_str().unwrap().to_string(),
        v["key_id"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_tiers_and_deletions_reach_the_other_replica() {
    let s = Site::start("[tiers.pro]\nmessages = 1000\n").await;
    // Created on A, used on B.
    s.a.create_user("ann", "free").await;
    let (key, key_id) = create_key_full(&s.a, "ann").await;
    eventually(&s, "key created on A works on B", || async {
        status_of_generate(&s.b, &key).await == 200
    })
    .await;
    assert_eq!(status_of_generate(&s.a, &key).await, 200);
    // The user as B sees it: same tier, email and creation time.
    let ua: Value =
        s.a.admin(Method::GET, "/admin/users/ann")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let ub: Value =
        s.b.admin(Method::GET, "/admin/users/ann")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(
        (&ua["tier"], &ua["created_at"]),
        (&ub["tier"], &ub["created_at"]),
        "{ua} {ub}"
    );
    // Tier changed on B, seen on A.
    let r =
        s.b.admin(Method::PATCH, "/admin/users/ann")
            .json(&json!({"tier": "pro"}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    eventually(&s, "tier set on B seen on A", || async {
        let v: Value =
            s.a.admin(Method::GET, "/admin/users/ann")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        v["tier"] == "pro"
    })
    .await;
    // Revoked on B, refused on A.
    let r =
        s.b.admin(Method::DELETE, &format!("/admin/keys/{key_id}"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status_of_generate(&s.b, &key).await, 401);
    eventually(&s, "key revoked on B refused on A", || async {
        status_of_generate(&s.a, &key).await == 401
    })
    .await;
    // A second key, the user deleted on A: refused on B; the id can be taken again.
    let key2 = s.a.create_key("ann").await;
    eventually(&s, "second key works on B", || async {
        status_of_generate(&s.b, &key2).await == 200
    })
    .await;
    let r = s.a.admin(Method::DELETE, "/admin/users/ann").send().await.unwrap();
    assert_eq!(r.status(), 200);
    eventually(&s, "user deleted on A refused on B", || async {
        status_of_generate(&s.b, &key2).await == 401
    })
    .await;
    let r = s.b.admin(Method::GET, "/admin/users/ann").send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Taken again on B (a 409 on A while it exists).
    s.b.create_user("ann", "free").await;
    let r =
        s.a.admin(Method::POST, "/admin/users")
            .json(&json!({"id": "ann", "tier": "free"}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 409, "the id is taken on the other replica");
    assert_eq!(status_of_generate(&s.a, &key2).await, 401, "old keys stay dead");
    let rows = s.pg.query("SELECT count(*) FROM gm_keys WHERE user_id = 'ann'");
    assert_eq!(rows, vec![vec!["0".to_string()]], "the old incarnation's keys are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_answer_503_while_postgres_is_down_and_change_nothing() {
    let s = Site::start("").await;
    s.a.create_user("bob", "free").await;
    let (key, key_id) = create_key_full(&s.a, "bob").await;
    eventually(&s, "bob's key on B", || async {
        status_of_generate(&s.b, &key).await == 200
    })
    .await;
    s.pg.stop();
    let r =
        s.a.admin(Method::POST, "/admin/users")
            .json(&json!({"id": "cy", "tier": "free"}))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    let r =
        s.a.admin(Method::DELETE, &format!("/admin/keys/{key_id}"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 503);
    let r = s.a.admin(Method::POST, "/admin/users/bob/keys").send().await.unwrap();
    assert_eq!(r.status(), 503);
    // Nothing changed here, and requests still pass (Postgres down refuses nothing).
    assert_eq!(
        s.a.admin(Method::GET, "/admin/users/cy").send().await.unwrap().status(),
        404
    );
    assert_eq!(status_of_generate(&s.a, &key).await, 200);
    s.pg.start_again();
    // After the listeners reconnect, writes work again and reach the other replica.
    eventually(&s, "admin writes work again", || async {
        s.a.admin(Method::DELETE, &format!("/admin/keys/{key_id}"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    eventually(&s, "revocation after the outage reaches B", || async {
        status_of_generate(&s.b, &key).await == 401
    })
    .await;
    assert_eq!(
        s.b.admin(Method::GET, "/admin/users/cy").send().await.unwrap().status(),
        404
    );
}

async fn upload_start(base: &str, key: &str, n: u64) -> String {
    let r = http()
        .post(format!("{base}/upload/v1beta/files"))
        .header("x-goog-api-key", key)
        .header("content-type", "application/json")
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header("X-Goog-Upload-Header-Content-Length", n.to_string())
        .header("X-Goog-Upload-Header-Content-Type", "application/pdf")
        .body(json!({"file": {"displayName": "report", "mimeType": "application/pdf"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-goog-upload-url"].to_str().unwrap().to_string()
}

/// A chunk the way python-genai sends it: no key.
async fn upload_chunk(url: &str, command: &str, offset: usize, data: &[u8]) -> reqwest::Response {
    http()
        .post(url)
        .header("content-type", "application/json")
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", command)
        .header("X-Goog-Upload-Offset", offset.to_string())
        .body(data.to_vec())
        .send()
        .await
        .unwrap()
}

async fn get_file(r: &Replica, name: &str, key: &str) -> u16 {
    http()
        .get(r.url(&format!("/v1beta/{name}")))
        .header("x-goog-api-key", key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_resources_are_shared() {
    let s = Site::start("").await;
    let key = s.a.user_with_key("up", "free").await;
    let other = s.a.user_with_key("eve", "free").await;
    eventually(&s, "keys on B", || async {
        status_of_generate(&s.b, &key).await == 200 && status_of_generate(&s.b, &other).await == 200
    })
    .await;

    // Started through A, finished through B (the URL points at A; the client goes to B).
    let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let url_a = upload_start(&s.a.base(), &key, 2000).await;
    let url_b = url_a.replacen(&s.a.base(), &s.b.base(), 1);
    assert_ne!(url_a, url_b, "{url_a}");
    let r = upload_chunk(&url_b, "upload", 0, &data[..800]).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = upload_chunk(&url_b, "upload, finalize", 800, &data[800..]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-goog-upload-status"], "final");
    let file: Value = r.json().await.unwrap();
    let name = file["file"]["name"].as_str().unwrap().to_string();
    assert_eq!(s.mock.stats.snapshot()["upload_bytes"], 2000);
    // The bytes were billed to the user on B (settled into shared counters asynchronously).
    eventually(&s, "upload bytes billed", || async {
        let cur: Value = s.b.user_json("/api/usage/current", &key).await;
        cur["current_month"]["bytes"] == 2000
    })
    .await;
    // The file finished on B is its owner's on A too, and nobody else's.
    assert_eq!(get_file(&s.b, &name, &key).await, 200);
    assert_eq!(get_file(&s.a, &name, &key).await, 200);
    // Gemini answers a file of another project 403, and so does the gateway a file not owned.
    assert_eq!(get_file(&s.a, &name, &other).await, 403);

    // A resource created through A: read by its owner through B at once, not by another user.
    let url = upload_start(&s.a.base(), &key, 300).await;
    let r = upload_chunk(&url, "upload, finalize", 0, &data[..300]).await;
    assert_eq!(r.status(), 200);
    let file: Value = r.json().await.unwrap();
    let name2 = file["file"]["name"].as_str().unwrap().to_string();
    assert_eq!(get_file(&s.b, &name2, &key).await, 200);
    assert_eq!(get_file(&s.b, &name2, &other).await, 403);
    let rows =
        s.pg.query(&format!("SELECT user_id FROM gm_resources WHERE name = '{name2}'"));
    assert_eq!(rows, vec![vec!["up".to_string()]]);
    // Deleted through B: gone on A as well.
    let r = http()
        .delete(s.b.url(&format!("/v1beta/{name2}")))
        .header("x-goog-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(&s, "deletion reaches A", || async {
        get_file(&s.a, &name2, &key).await == 403
    })
    .await;
}

/// A webhook receiver that counts what it is sent.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let h = hooks.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let h = h.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                            h.lock().unwrap().push(v);
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hooks)
}

async fn alerts_of(r: &Replica) -> Value {
    r.admin(Method::GET, "/admin/alerts")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_once_across_two_replicas() {
    let (hook, hooks) = receiver().await;
    let extra =
        format!("[tiers.alerty]\nmessages = 4\n\n[alerts]\nthresholds = [50]\nwebhook_url = \"http://{hook}/hook\"\n");
    let s = Site::start(&extra).await;
    let key = s.a.user_with_key("al", "alerty").await;
    eventually(&s, "key on B", || async { status_of_generate(&s.b, &key).await == 200 }).await;
    // Two on each replica: with counters local to each replica both cross 50 % of 4 messages;
    // with shared counters one does. Either way: one webhook.
    for r in [&s.b, &s.a, &s.a] {
        let resp = r.generate(&key, MODEL).await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(
            status,
            200,
            "{body}\n--- A:\n{}\n--- B:\n{}",
            s.a.output(),
            s.b.output()
        );
    }
    eventually(&s, "the alert is delivered", || async {
        !hooks.lock().unwrap().is_empty()
    })
    .await;
    eventually(&s, "no delivery left pending on either replica", || async {
        let (a, b) = (alerts_of(&s.a).await, alerts_of(&s.b).await);
        a["counts"]["pending"] == 0 && b["counts"]["pending"] == 0
    })
    .await;
    let (a, b) = (alerts_of(&s.a).await, alerts_of(&s.b).await);
    let fired = a["metrics"]["fired"].as_u64().unwrap() + b["metrics"]["fired"].as_u64().unwrap();
    let sent = a["metrics"]["sent"].as_u64().unwrap() + b["metrics"]["sent"].as_u64().unwrap();
    eprintln!("fired on the replicas: {fired}; sent: {sent}");
    assert!(fired >= 1, "{a} {b}");
    assert_eq!(sent, 1, "one delivery across replicas: {a} {b}");
    let got = hooks.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        (got[0]["user_id"].as_str(), got[0]["threshold"].as_u64()),
        (Some("al"), Some(50))
    );
    let rows = s.pg.query("SELECT user_id, quota, threshold FROM gm_alert_marks");
    assert_eq!(
        rows,
        vec![vec!["al".to_string(), "messages".to_string(), "50".to_string()]]
    );
}

const LITE: &str = r#"
[pricing.models."gemini-2.5-flash-lite"]
input_per_million = "0.10"
output_per_million = "0.40"
batch_discount = "0.5"
"#;

/// Every record of the key's user one replica shows, by id.
async fn history(r: &Replica, key: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/usage/history?limit=500&cursor={c}"),
            None => "/api/usage/history?limit=500".to_string(),
        };
        let page: Value = r.user_json(&path, key).await;
        out.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_finished_through_both_replicas_at_once_is_billed_once() {
    let s = Site::start(LITE).await;
    let key = s.a.user_with_key("batcher", "unlimited").await;
    eventually(&s, "key on B", || async { status_of_generate(&s.b, &key).await == 200 }).await;
    let reqs: Vec<Value> = (0..3)
        .map(|i| json!({"request": {"contents": [{"parts": [{"text": format!("question {i}")}]}]}}))
        .collect();
    let r = http()
        .post(s.a.url("/v1beta/models/gemini-2.5-flash-lite:batchGenerateContent"))
        .header("x-goog-api-key", &key)
        .json(&json!({"batch": {"displayName": "three", "inputConfig": {"requests": {"requests": reqs}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let name = v["name"].as_str().unwrap().to_string();
    // Read through both replicas at once, again and again, until it is done on both.
    let mut done = 0;
    for _ in 0..10 {
        let (ra, rb) = tokio::join!(get_json(&s.a, &name, &key), get_json(&s.b, &name, &key));
        done = [&ra, &rb].iter().filter(|v| v["done"] == true).count();
        if done == 2 {
            break;
        }
    }
    assert_eq!(done, 2, "the mock finishes a batch after a few reads");
    // The records of both replicas, by id (whether each shows its own or the shared ledger),
    // once every record is written and, in cluster mode, shipped.
    let ids = std::cell::RefCell::new(std::collections::BTreeSet::new());
    eventually(&s, "batch records written and shipped", || async {
        let mut got = std::collections::BTreeSet::new();
        let mut backlog = 0;
        for r in [&s.a, &s.b] {
            let h: Value = http()
                .get(r.url("/healthz"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            backlog += h["cluster"]["shipping_backlog"].as_u64().unwrap_or(0);
            for rec in history(r, &key).await {
                if rec["type"] == "ai_response" && rec["metadata"]["model"] == "gemini-2.5-flash-lite" {
                    got.insert(rec["id"].as_str().unwrap().to_string());
                }
            }
        }
        let done = backlog == 0 && got.len() >= 3;
        *ids.borrow_mut() = got;
        done
    })
    .await;
    let ids = ids.into_inner();
    assert_eq!(ids.len(), 3, "one record per inlined response, once: {ids:?}");
    let rows = s.pg.query(&format!(
        "SELECT settled, settling IS NULL FROM gm_resources WHERE name = '{}'",
        name.to_lowercase()
    ));
    assert_eq!(rows, vec![vec!["t".to_string(), "t".to_string()]]);
}

async fn get_json(r: &Replica, name: &str, key: &str) -> Value {
    http()
        .get(r.url(&format!("/v1beta/{name}")))
        .header("x-goog-api-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Value::Null)
}

/// A gateway in this process on `data` (embedded, or in cluster mode on these engines).
async fn open_in_process(
    mock: SocketAddr,
    data: &std::path::Path,
    engines: Option<(&Redis, &Postgres)>,
) -> std::sync::Arc<gemini_meter::app::App> {
    use gemini_meter::runtime::EnvLookup;
    let mut text = common::base_config(mock, data, "");
    let mut vars = vec![
        ("GM_TEST_UPSTREAM_KEY".to_string(), common::UPSTREAM_KEY.to_string()),
        ("GM_TEST_ADMIN_TOKEN".to_string(), common::ADMIN_TOKEN.to_string()),
    ];
    if let Some((redis, pg)) = engines {
        text.push_str(common::engines::CLUSTER_SECTION);
        vars.push(("GEMINI_METER_REDIS_URL".into(), redis.url()));
        vars.push(("GEMINI_METER_DATABASE_URL".into(), pg.url()));
    }
    let env: EnvLookup =
        std::sync::Arc::new(move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
    let config = gemini_meter::config::Config::parse(&text, "test").unwrap();
    let clock = std::sync::Arc::new(gemini_meter::clock::SystemClock::default());
    let cluster = gemini_meter::cluster::Cluster::connect(&config, &env).await.unwrap();
    let (app, _recorder) = gemini_meter::app::App::open_with(config, None, clock, env, cluster).unwrap();
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_before_cluster_mode_are_pushed_at_the_first_resync() {
    use gemini_meter::clock::Month;
    use gemini_meter::ownership::Kind;
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Embedded: a user, an active key, a revoked key, an owned file.
    let (key, revoked) = {
        let app = open_in_process(mock.addr, &data, None).await;
        let now = chrono::Utc::now();
        app.registry
            .create_user("old", "free", Some("old@example.com"), now, Month::of(now))
            .unwrap();
        let (key, _) = app.registry.create_key("old", now).unwrap();
        let (revoked, revoked_id) = app.registry.create_key("old", now).unwrap();
        app.registry.revoke(&revoked_id, now).unwrap();
        app.proxy
            .owners
            .record(&std::sync::Arc::from("old"), Kind::File, "files/oldfile")
            .await
            .unwrap();
        app.store.flush().await.unwrap();
        (key, revoked)
    };
    let redis = Redis::start();
    let pg = Postgres::start();
    // The same data in cluster mode: the first resync pushes what PostgreSQL lacks.
    let app = open_in_process(mock.addr, &data, Some((&redis, &pg))).await;
    let listener = gemini_meter::replica::start_shared(&app).await.unwrap();
    assert!(listener.is_some());
    assert_eq!(
        pg.query("SELECT id, tier, email, deleted FROM gm_users"),
        vec![vec![
            "old".to_string(),
            "free".into(),
            "old@example.com".into(),
            "f".into()
        ]]
    );
    let keys = pg.query("SELECT hash, revoked_at IS NULL FROM gm_keys ORDER BY 2");
    assert_eq!(keys.len(), 2, "{keys:?}");
    let hex_of = |k: &str| hex::encode(gemini_meter::identity::hash_key(k));
    assert_eq!(keys[0], vec![hex_of(&revoked), "f".to_string()]);
    assert_eq!(keys[1], vec![hex_of(&key), "t".to_string()]);
    let dump = pg.query("SELECT * FROM gm_keys").concat().join(" ");
    assert!(!dump.contains(&key), "a plaintext key reached PostgreSQL");
    assert_eq!(
        pg.query("SELECT user_id FROM gm_resources WHERE name = 'files/oldfile'"),
        vec![vec!["old".to_string()]]
    );
    // Another replica, started on the shared store, knows them.
    let b = Replica::start(mock.addr, &redis.url(), &pg.url()).await;
    assert_eq!(status_of_generate(&b, &key).await, 200);
    assert_eq!(status_of_generate(&b, &revoked).await, 401);
    let other = b.user_with_key("new", "free").await;
    assert_eq!(get_file(&b, "files/oldfile", &other).await, 403);
    drop(b);
    drop(app);
}
