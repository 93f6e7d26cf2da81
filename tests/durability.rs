//! "Nothing lost, nothing double-counted": the real `gemini-meter` binary as a child process,
//! killed with SIGKILL, stopped with SIGTERM / SIGINT, started twice on one storage path, started
//! with bad settings, moved in time for retention, and hit with mixed concurrent traffic.
//!
//! The mock upstream runs in this test process; each gateway is a child with its own temporary
//! config file and sled directory. Every child is killed when its guard drops, also on failure.
//! Figures (responses, records, loss) are printed; see them with `-- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use common::{ADMIN_TOKEN, UPSTREAM_KEY, base_config};
use gemini_meter_mock::{MockOptions, MockServer};
use rust_decimal::Decimal;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_gemini-meter");
/// Env var names used by `common::base_config`.
const ADMIN_ENV: &str = "GM_TEST_ADMIN_TOKEN";
const UPSTREAM_ENV: &str = "GM_TEST_UPSTREAM_KEY";
/// Concurrent client loops of the load tests.
const LOOPS: usize = 8;
/// How long the load runs before the signal.
const LOAD_FOR: Duration = Duration::from_millis(1500);

fn free_port() -> u16 {
    common::spare_port()
}

fn http_client() -> reqwest::Client {
    // No gzip: the bytes a client reads are the bytes the gateway meters as response_bytes.
    reqwest::Client::builder().no_proxy().no_gzip().build().unwrap()
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "common::base_config no longer contains {from:?}"
    );
    text.replacen(from, to, 1)
}

/// A temporary directory (config files, sled data) and a mock upstream in this process.
struct Site {
    dir: tempfile::TempDir,
    mock: MockServer,
}

impl Site {
    async fn new() -> Site {
        let opts = MockOptions {
            api_key: Some(UPSTREAM_KEY.into()),
            ..MockOptions::default()
        };
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), opts).await.unwrap();
        Site {
            dir: tempfile::tempdir().unwrap(),
            mock,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes `name` from `common::base_config` with `listen` on `port`, `storage_extra` added to
    /// `[storage]` and `tier_extra` to `[tiers.unlimited]` (the tier the load tests use: no limits,
    /// every model allowed).
    fn config(&self, name: &str, port: u16, storage_extra: &str, tier_extra: &str) -> PathBuf {
        let text = base_config(self.mock.addr, &self.data(), tier_extra);
        let text = replace_once(
            &text,
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        );
        let text = replace_once(
            &text,
            "flush_interval_ms = 20",
            &format!("flush_interval_ms = 20\n{storage_extra}"),
        );
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The mock's count of generate calls that reached it.
    fn upstream_generate_calls(&self) -> u64 {
        self.mock.stats.snapshot()["generate_requests"].as_u64().unwrap()
    }
}

/// One `gemini-meter serve` child. Dropping it kills the process.
struct Gateway {
    child: Child,
    base: String,
    http: reqwest::Client,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// How to start a child.
#[derive(Default)]
struct Opts<'a> {
    /// Extra environment variables.
    env: Vec<(&'a str, String)>,
    /// Variables removed from the environment.
    remove: Vec<&'a str>,
}

impl Gateway {
    /// Starts `serve --config PATH` with the upstream key and admin token set; does not wait.
    fn spawn(site: &Site, config: &Path, port: u16, opts: Opts<'_>) -> Gateway {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .current_dir(site.dir.path())
            .env(UPSTREAM_ENV, UPSTREAM_KEY)
            .env(ADMIN_ENV, ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .env_remove("GEMINI_METER_FAKE_NOW")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        for k in &opts.remove {
            cmd.env_remove(k);
        }
        let mut child = cmd.spawn().expect("spawn gemini-meter");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let lines = stdout.clone();
        let r1 = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let text = stderr.clone();
        let r2 = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(err).read_to_string(&mut s);
            text.lock().unwrap().push_str(&s);
        });
        Gateway {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: http_client(),
            stdout,
            stderr,
            readers: vec![r1, r2],
        }
    }

    /// Starts a gateway and waits until it serves.
    async fn start(site: &Site, config: &Path, port: u16, opts: Opts<'_>) -> Gateway {
        let mut g = Gateway::spawn(site, config, port, opts);
        g.wait_ready().await;
        g
    }

    fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// Waits for the "listening on" line and a 200 from /healthz.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.join_readers();
                panic!(
                    "gateway exited before it was ready ({st}); stderr: {}\nstdout: {}",
                    self.stderr.lock().unwrap(),
                    self.stdout_text()
                );
            }
            let logged = self.stdout.lock().unwrap().iter().any(|l| l.contains("listening on"));
            if logged {
                let ok = self
                    .http
                    .get(self.url("/healthz"))
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false);
                if ok {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready after 30 s; stdout: {}",
                self.stdout_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1).
    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} failed");
    }

    /// SIGKILL.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
    }

    /// Waits for the process to exit (without blocking the runtime); None on timeout.
    async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.join_readers();
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN)
    }

    async fn create_user(&self, id: &str, tier: &str) {
        let r = self
            .admin(reqwest::Method::POST, "/admin/users")
            .json(&json!({"id": id, "tier": tier}))
            .send()
            .await
            .unwrap();
        let st = r.status();
        assert_eq!(st, 201, "create user {id}: {}", r.text().await.unwrap());
    }

    /// Issues a key: (plaintext, key_id).
    async fn create_key(&self, user: &str) -> (String, String) {
        let r = self
            .admin(reqwest::Method::POST, &format!("/admin/users/{user}/keys"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        (
            v["key"].as_str().unwrap().to_string(),
            v["key_id"].as_str().unwrap().to_string(),
        )
    }

    async fn user_with_key(&self, id: &str, tier: &str) -> String {
        self.create_user(id, tier).await;
        self.create_key(id).await.0
    }

    /// A unary generate call; returns the status.
    async fn generate(&self, key: &str, model: &str) -> u16 {
        let r = unary(&self.http, &self.base, key, model).await.unwrap();
        let st = r.status().as_u16();
        r.bytes().await.unwrap();
        st
    }

    async fn get_json(&self, path: &str, key: &str) -> Value {
        let r = self
            .http
            .get(self.url(path))
            .header("x-goog-api-key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    async fn current(&self, key: &str) -> Value {
        self.get_json("/api/usage/current", key).await
    }

    /// Every record of the key's user, newest first, through /api/usage/history paging.
    async fn history(&self, key: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/usage/history?limit=500&cursor={c}"),
                None => "/api/usage/history?limit=500".to_string(),
            };
            let page = self.get_json(&path, key).await;
            out.extend(page["data"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gen_body() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]})
}

async fn unary(http: &reqwest::Client, base: &str, key: &str, model: &str) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{base}/v1beta/models/{model}:generateContent"))
        .header("x-goog-api-key", key)
        .json(&gen_body())
        .send()
        .await
}

/// Totals as the usage API shows them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sums {
    messages: u64,
    tokens: u64,
    bytes: u64,
    cost: Decimal,
    response_bytes: u64,
}

fn dec(v: &Value) -> Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("cost is not a string: {v}"))
        .parse()
        .unwrap()
}

fn sum_records(recs: &[Value]) -> Sums {
    let mut s = Sums::default();
    for r in recs {
        s.messages += r["messages"].as_u64().unwrap();
        s.tokens += r["tokens"].as_u64().unwrap();
        s.bytes += r["bytes"].as_u64().unwrap();
        s.cost += dec(&r["cost"]);
        s.response_bytes += r["metadata"]["response_bytes"].as_u64().unwrap_or(0);
    }
    s
}

fn current_sums(cur: &Value) -> Sums {
    let c = &cur["current_month"];
    Sums {
        messages: c["messages"].as_u64().unwrap(),
        tokens: c["tokens"].as_u64().unwrap(),
        bytes: c["bytes"].as_u64().unwrap(),
        cost: dec(&c["cost"]),
        response_bytes: c["response_bytes"].as_u64().unwrap(),
    }
}

/// Waits (up to 2 s) until the user's records add up to /api/usage/current: counters move at
/// once, records reach disk within the flush interval.
async fn wait_ledger(g: &Gateway, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if current_sums(&g.current(key).await) == sum_records(&g.history(key).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that /api/usage/current equals the sum of the user's records; returns the records.
async fn assert_counters_equal_ledger(g: &Gateway, user: &str, key: &str) -> Vec<Value> {
    // Counters move when a request settles; its record reaches disk a flush later.
    wait_ledger(g, key).await;
    let cur = g.current(key).await;
    let recs = g.history(key).await;
    let want = sum_records(&recs);
    let got = current_sums(&cur);
    assert_eq!(
        got,
        want,
        "user {user}: /api/usage/current != sum of {} records",
        recs.len()
    );
    // Exact decimal strings: the counter's rendering is the normalized sum.
    assert_eq!(
        cur["current_month"]["cost"].as_str().unwrap(),
        want.cost.normalize().to_string(),
        "user {user}: cost string"
    );
    recs
}

fn is_ok_message(r: &Value) -> bool {
    r["type"] == "message_sent" && r["messages"] == 1
}

/// Runs `LOOPS` client loops of unary calls over `keys`; each loop counts its 200 responses
/// whose body arrived whole, until `stop`.
fn spawn_load(base: &str, keys: &[String], stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<(u64, u64, u64)>> {
    (0..LOOPS)
        .map(|i| {
            let base = base.to_string();
            let key = keys[i % keys.len()].clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = http_client();
                let (mut ok, mut failed, mut truncated) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match unary(&http, &base, &key, "gemini-2.5-flash").await {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(_) => ok += 1,
                            // Headers said 200, the body broke off.
                            Err(_) => truncated += 1,
                        },
                        _ => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (ok, failed, truncated)
            })
        })
        .collect()
}

/// Polls /healthz every 25 ms until `stop` (or the gateway is gone): (max, last) of
/// `storage.queued_records`, the records handed to the recorder and not yet on disk.
fn spawn_queue_sampler(base: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    let url = format!("{base}/healthz");
    tokio::spawn(async move {
        let http = http_client();
        let (mut max, mut last) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let Ok(r) = http.get(&url).send().await else {
                break;
            };
            let Ok(v) = r.json::<Value>().await else {
                break;
            };
            last = v["storage"]["queued_records"].as_u64().unwrap_or(0);
            max = max.max(last);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        (max, last)
    })
}

/// Outcome of the load loops.
struct LoadCounts {
    /// 200 responses whose body arrived whole, per user index.
    ok: Vec<u64>,
    /// Calls that failed (connection refused or reset, non-200).
    failed: u64,
    /// 200 responses whose body broke off.
    truncated: u64,
}

async fn join_load(handles: Vec<tokio::task::JoinHandle<(u64, u64, u64)>>, users: usize) -> LoadCounts {
    let mut c = LoadCounts {
        ok: vec![0u64; users],
        failed: 0,
        truncated: 0,
    };
    for (i, h) in handles.into_iter().enumerate() {
        let (o, f, t) = h.await.unwrap();
        c.ok[i % users] += o;
        c.failed += f;
        c.truncated += t;
    }
    c
}

const LOAD_USERS: usize = 4;

/// The load tests take turns: on two cores, two of them at once starve each other's gateway and
/// the figures would measure the machine rather than the gateway.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a gateway with `LOAD_USERS` unlimited users and one key each.
async fn load_setup(site: &Site) -> (Gateway, Vec<String>) {
    let port = free_port();
    let cfg = site.config("a.toml", port, "", "");
    let g = Gateway::start(site, &cfg, port, Opts::default()).await;
    let mut keys = Vec::new();
    for u in 0..LOAD_USERS {
        keys.push(g.user_with_key(&format!("load{u}"), "unlimited").await);
    }
    (g, keys)
}

/// Restarts on the same data dir (a fresh port: the old one may linger in TIME_WAIT) and checks
/// counters == ledger per user; returns (message_sent records with messages = 1, all records).
async fn restart_and_audit(site: &Site, keys: &[String]) -> (Gateway, u64, Vec<Value>) {
    let port = free_port();
    let cfg = site.config("b.toml", port, "", "");
    let g = Gateway::start(site, &cfg, port, Opts::default()).await;
    let mut all = Vec::new();
    for (u, key) in keys.iter().enumerate() {
        let recs = assert_counters_equal_ledger(&g, &format!("load{u}"), key).await;
        all.extend(recs);
    }
    let ids: HashSet<&str> = all.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "duplicate record ids in the ledger");
    let ok_msgs = all.iter().filter(|r| is_ok_message(r)).count() as u64;
    (g, ok_msgs, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_at_most_the_last_flush_and_never_doubles() {
    let _turn = HEAVY.lock().await;
    let site = Site::new().await;
    let (mut g, keys) = load_setup(&site).await;
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn_load(&g.base, &keys, stop.clone());
    let sampler = spawn_queue_sampler(&g.base, stop.clone());
    tokio::time::sleep(LOAD_FOR).await;
    g.kill9();
    let st = g
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("SIGKILLed process did not exit");
    stop.store(true, Ordering::Relaxed);
    let counts = join_load(handles, LOAD_USERS).await;
    let (ok, failed) = (counts.ok.iter().sum::<u64>(), counts.failed + counts.truncated);
    let (max_queued, last_queued) = sampler.await.unwrap();
    assert!(!st.success());
    assert!(ok > 50, "too little load to judge: {ok} responses");
    let upstream = site.upstream_generate_calls();

    let (_g2, ok_msgs, all) = restart_and_audit(&site, &keys).await;
    let lost = ok.saturating_sub(ok_msgs);
    let extra = ok_msgs.saturating_sub(ok);
    let lost_ms = lost as f64 * LOAD_FOR.as_millis() as f64 / ok as f64;
    println!(
        "kill -9: {ok} responses 200 ({failed} failed calls), {upstream} calls reached upstream, \
         {ok_msgs} message_sent records with messages=1, {} records in all; lost {lost} (~{lost_ms:.0} ms of traffic), extra {extra}; \
         /healthz queued_records max {max_queued}, last seen before the kill {last_queued}",
        all.len()
    );
    // Loss: only records not yet flushed when the process died (the last flush window).
    let allowed = (ok * 5 / 100).max(LOOPS as u64);
    assert!(
        lost <= allowed,
        "lost {lost} of {ok} acknowledged messages (allowed {allowed})"
    );
    // No doubles: never more billed messages than calls that reached the upstream; and at most
    // the requests in flight at the kill (answered upstream and settled, response not yet read
    // by the client) beyond the 200s the clients saw.
    assert!(
        ok_msgs <= upstream,
        "{ok_msgs} billed messages but only {upstream} upstream calls"
    );
    assert!(
        ok_msgs <= ok + LOOPS as u64,
        "{ok_msgs} billed messages for {ok} responses with {LOOPS} in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_flushes_and_exits_0_with_zero_loss() {
    let _turn = HEAVY.lock().await;
    let site = Site::new().await;
    let (mut g, keys) = load_setup(&site).await;
    let drain_key = g.user_with_key("drain", "unlimited").await;
    let stop = Arc::new(AtomicBool::new(false));
    let handles = spawn_load(&g.base, &keys, stop.clone());
    tokio::time::sleep(LOAD_FOR).await;
    // Two `slow` streams (5 events, 200 ms apart) in flight when the signal arrives: the drain
    // (2 s here) must let them finish.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let r = g
            .http
            .post(g.url("/v1beta/models/slow:streamGenerateContent?alt=sse"))
            .header("x-goog-api-key", &drain_key)
            .json(&gen_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        slow.push(tokio::spawn(async move { r.text().await }));
    }
    let t0 = Instant::now();
    g.signal("TERM");
    let st = g
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("no exit within 15 s of SIGTERM");
    let stop_ms = t0.elapsed().as_millis();
    stop.store(true, Ordering::Relaxed);
    let counts = join_load(handles, LOAD_USERS).await;
    let ok: u64 = counts.ok.iter().sum();
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM; stderr: {}", g.stderr());
    assert!(
        g.stdout_text().contains("stopped cleanly"),
        "no clean-stop line: {}",
        g.stdout_text()
    );
    assert!(ok > 50, "too little load to judge: {ok} responses");
    assert_eq!(counts.truncated, 0, "200 responses cut off by the shutdown");
    let mut slow_bytes = Vec::new();
    for s in slow {
        let body = s.await.unwrap().expect("a stream in flight at SIGTERM was cut off");
        assert_eq!(body.matches("data:").count(), 5, "stream not complete: {body}");
        slow_bytes.push(body.len() as u64);
    }

    let (g2, ok_msgs, all) = restart_and_audit(&site, &keys).await;
    println!(
        "SIGTERM: {ok} responses 200 ({} failed calls, {} truncated), stopped in {stop_ms} ms, \
         {ok_msgs} message_sent records with messages=1, {} records in all",
        counts.failed,
        counts.truncated,
        all.len()
    );
    assert_eq!(ok_msgs, ok, "SIGTERM must lose nothing and add nothing");
    // Per user too.
    for (u, key) in keys.iter().enumerate() {
        let n = g2.history(key).await.iter().filter(|r| is_ok_message(r)).count() as u64;
        assert_eq!(n, counts.ok[u], "user load{u}");
    }
    // The drained streams were metered to the end (token figures are the metering module's
    // business; here: the stream is recorded as complete, with every byte the client got).
    let recs = assert_counters_equal_ledger(&g2, "drain", &drain_key).await;
    let ai: Vec<&Value> = recs.iter().filter(|r| r["type"] == "ai_response").collect();
    assert_eq!(ai.len(), 2, "{recs:#?}");
    for r in &ai {
        assert_eq!(r["metadata"]["status"], "ok", "{r}");
    }
    let mut metered: Vec<u64> = ai
        .iter()
        .map(|r| r["metadata"]["response_bytes"].as_u64().unwrap())
        .collect();
    metered.sort_unstable();
    slow_bytes.sort_unstable();
    assert_eq!(metered, slow_bytes, "response_bytes of the drained streams");
    assert_eq!(recs.iter().filter(|r| is_ok_message(r)).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_cleanly_with_exit_0() {
    let site = Site::new().await;
    let port = free_port();
    let cfg = site.config("a.toml", port, "", "");
    let mut g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let key = g.user_with_key("int", "unlimited").await;
    assert_eq!(g.generate(&key, "gemini-2.5-flash").await, 200);
    g.signal("INT");
    let st = g
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("no exit within 15 s of SIGINT");
    assert_eq!(st.code(), Some(0), "exit status after SIGINT; stderr: {}", g.stderr());
    assert!(g.stdout_text().contains("stopped cleanly"), "{}", g.stdout_text());
    let g2 = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let recs = assert_counters_equal_ledger(&g2, "int", &key).await;
    assert_eq!(recs.iter().filter(|r| is_ok_message(r)).count(), 1);
}

/// Asserts a failed start: non-zero exit and exactly one non-empty line on stderr; returns it.
async fn failed_start(site: &Site, config: &Path, port: u16, opts: Opts<'_>) -> String {
    let mut g = Gateway::spawn(site, config, port, opts);
    let st = g
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("a start that must fail is still running after 20 s");
    assert!(!st.success(), "exit status {st}; stdout: {}", g.stdout_text());
    let err = g.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr must be one line: {err:?}");
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_on_the_same_storage_fails_and_the_first_keeps_serving() {
    let site = Site::new().await;
    let port = free_port();
    let cfg = site.config("a.toml", port, "", "");
    let g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let key = g.user_with_key("first", "unlimited").await;
    let port2 = free_port();
    let cfg2 = site.config("b.toml", port2, "", "");
    let line = failed_start(&site, &cfg2, port2, Opts::default()).await;
    println!("second process: {line}");
    let l = line.to_lowercase();
    assert!(
        l.contains("lock") || l.contains("another process"),
        "reason does not name the lock: {line}"
    );
    // The first one is unharmed.
    assert_eq!(g.generate(&key, "gemini-2.5-flash").await, 200);
    let r = g.http.get(g.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_counters_equal_ledger(&g, "first", &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_exit_non_zero_with_a_one_line_reason() {
    let site = Site::new().await;

    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = site.config("busy.toml", port, "", "");
    let line = failed_start(&site, &cfg, port, Opts::default()).await;
    println!("port in use: {line}");
    assert!(
        line.contains(&port.to_string()),
        "reason does not name the address: {line}"
    );
    drop(taken);

    // Missing upstream key variable.
    let port = free_port();
    let cfg = site.config("nokey.toml", port, "", "");
    let line = failed_start(
        &site,
        &cfg,
        port,
        Opts {
            remove: vec![UPSTREAM_ENV],
            ..Opts::default()
        },
    )
    .await;
    println!("missing key: {line}");
    assert!(line.contains(UPSTREAM_ENV), "reason does not name the variable: {line}");

    // Bad config: a typo'd key, and a float for money.
    let cfg = site.config("typo.toml", port, "", "mesages = 5");
    let line = failed_start(&site, &cfg, port, Opts::default()).await;
    println!("bad config: {line}");
    assert!(line.contains("typo.toml"), "reason does not name the file: {line}");
    assert!(
        line.contains("tiers.unlimited.mesages"),
        "reason does not name the key path: {line}"
    );

    let cfg = site.config("float.toml", port, "", "cost = 5.0");
    let line = failed_start(&site, &cfg, port, Opts::default()).await;
    println!("float money: {line}");
    assert!(
        line.contains("float.toml") && line.contains("tiers.unlimited.cost"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_with_a_moved_clock_deletes_old_records_and_keeps_month_totals() {
    let site = Site::new().await;
    let past = gemini_meter::clock::Month::of(Utc::now()).minus(30);
    let fake_now = Utc
        .with_ymd_and_hms(past.year() as i32, past.month(), 15, 12, 0, 0)
        .unwrap();
    let fake = fake_now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let month = past.to_string();

    let port = free_port();
    let cfg = site.config("old.toml", port, "", "");
    let mut g = Gateway::start(
        &site,
        &cfg,
        port,
        Opts {
            env: vec![("GEMINI_METER_FAKE_NOW", fake.clone())],
            ..Opts::default()
        },
    )
    .await;
    let key = g.user_with_key("old", "unlimited").await;
    for _ in 0..3 {
        assert_eq!(g.generate(&key, "gemini-2.5-flash").await, 200);
    }
    let cur = g.current(&key).await;
    assert_eq!(cur["month"], month.as_str(), "the fake clock is not in effect");
    wait_ledger(&g, &key).await;
    let recs = assert_counters_equal_ledger(&g, "old", &key).await;
    assert_eq!(recs.len(), 6, "3 calls, 2 records each: {recs:?}");
    assert!(
        recs.iter()
            .all(|r| r["created_at"].as_str().unwrap().starts_with(&month)),
        "{recs:?}"
    );
    let old_tokens = sum_records(&recs).tokens;
    g.signal("TERM");
    let st = g
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("no exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", g.stderr());

    // Today, keeping everything (120 months): the old records survive the restart.
    let port = free_port();
    let cfg = site.config("keep.toml", port, "retention_months = 120", "");
    let mut g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let after = g.history(&key).await;
    assert_eq!(after, recs, "records must survive the restart");
    let r = g
        .admin(reqwest::Method::POST, "/admin/retention/run")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["deleted"], 0, "nothing is older than 120 months: {v}");
    g.signal("TERM");
    let st = g
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("no exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", g.stderr());

    // Today, keeping 24 months. The gateway also runs retention once at start (then daily), so
    // the records go either in that pass (logged) or in the explicit run; together exactly 6.
    let port = free_port();
    let cfg = site.config("now.toml", port, "retention_months = 24", "");
    let g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let r = g
        .admin(reqwest::Method::POST, "/admin/retention/run")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let cutoff = gemini_meter::clock::Month::of(Utc::now()).minus(24).start();
    assert_eq!(v["cutoff"], gemini_meter::clock::rfc3339(cutoff), "{v}");
    let by_run = v["deleted"].as_u64().unwrap();
    let mut at_start = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while by_run + at_start < 6 && Instant::now() < deadline {
        at_start = g
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("retention: old records deleted"))
            .filter_map(|l| {
                l.split("deleted=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("retention: start-up pass deleted {at_start}, POST /admin/retention/run {v}");
    assert_eq!(by_run + at_start, 6, "run: {v}; stdout: {}", g.stdout_text());
    assert!(g.history(&key).await.is_empty(), "old records are still listed");
    let r = g
        .admin(reqwest::Method::GET, "/admin/usage?user_id=old")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["data"].as_array().unwrap().is_empty(), "{v}");
    // Month totals stay.
    let r = g
        .admin(reqwest::Method::GET, &format!("/admin/analytics/summary?month={month}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s: Value = r.json().await.unwrap();
    println!("summary {month} after retention: {s}");
    assert_eq!(s["messages"], 3, "{s}");
    assert_eq!(s["tokens"], old_tokens, "{s}");
    assert_eq!(s["active_users"], 1, "{s}");
    // This month starts from zero, and counters still equal the (now empty) ledger.
    assert_counters_equal_ledger(&g, "old", &key).await;
}

/// The kinds of request of the mixed test.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Unary,
    Sse,
    JsonArray,
    OpenAi,
    OpenAiStream,
    Error500,
    SlowDisconnect,
}

const KINDS: [Kind; 7] = [
    Kind::Unary,
    Kind::Sse,
    Kind::JsonArray,
    Kind::OpenAi,
    Kind::OpenAiStream,
    Kind::Error500,
    Kind::SlowDisconnect,
];

/// Sends one request of `kind`; returns the status.
async fn mixed_call(http: &reqwest::Client, base: &str, key: &str, kind: Kind) -> u16 {
    let native = |model: &str, verb: &str| {
        http.post(format!("{base}/v1beta/models/{model}:{verb}"))
            .header("x-goog-api-key", key)
            .json(&gen_body())
    };
    let openai = |stream: bool| {
        http.post(format!("{base}/v1beta/openai/chat/completions"))
            .bearer_auth(key)
            .json(&json!({
                "model": "gemini-2.5-flash",
                "messages": [{"role": "user", "content": "Name three primes."}],
                "stream": stream,
            }))
    };
    let req = match kind {
        Kind::Unary => native("gemini-2.5-flash", "generateContent"),
        Kind::Sse => native("gemini-2.5-flash", "streamGenerateContent?alt=sse"),
        Kind::JsonArray => native("gemini-2.5-flash", "streamGenerateContent"),
        Kind::OpenAi => openai(false),
        Kind::OpenAiStream => openai(true),
        Kind::Error500 => native("error-500", "generateContent"),
        Kind::SlowDisconnect => native("slow", "streamGenerateContent?alt=sse"),
    };
    let mut r = req.send().await.unwrap();
    let st = r.status().as_u16();
    if let Kind::SlowDisconnect = kind {
        // First event, then go away.
        let first = r.chunk().await.unwrap();
        assert!(first.is_some_and(|c| !c.is_empty()));
        drop(r);
    } else {
        r.bytes().await.unwrap();
    }
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_requests_counters_equal_ledger() {
    let _turn = HEAVY.lock().await;
    let site = Site::new().await;
    let port = free_port();
    let cfg = site.config("a.toml", port, "", "");
    let g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let mut keys = Vec::new();
    for u in 0..5 {
        keys.push(g.user_with_key(&format!("mix{u}"), "unlimited").await);
    }
    let http = http_client();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (http, base, key) = (http.clone(), g.base.clone(), keys[i % 5].clone());
        let kind = KINDS[i % KINDS.len()];
        tasks.push(tokio::spawn(async move {
            (i % 5, kind, mixed_call(&http, &base, &key, kind).await)
        }));
    }
    let mut ok_per_user = [0u64; 5];
    for t in tasks {
        let (u, kind, st) = t.await.unwrap();
        match kind {
            Kind::Error500 => assert_eq!(st, 500, "{kind:?}"),
            _ => {
                assert_eq!(st, 200, "{kind:?}");
                ok_per_user[u] += 1;
            }
        }
    }
    // Abandoned streams settle when the gateway notices the client is gone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut records = 0;
    for (u, key) in keys.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let recs = loop {
            let cur = current_sums(&g.current(key).await);
            let recs = g.history(key).await;
            if cur == sum_records(&recs) || Instant::now() > deadline {
                break recs;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let recs_checked = assert_counters_equal_ledger(&g, &format!("mix{u}"), key).await;
        assert_eq!(recs_checked.len(), recs.len());
        let msgs = sum_records(&recs).messages;
        assert_eq!(
            msgs, ok_per_user[u],
            "user mix{u}: one message per request answered with success"
        );
        let errors = recs
            .iter()
            .filter(|r| r["type"] == "message_sent" && r["messages"] == 0)
            .count();
        assert!(
            errors >= 2,
            "user mix{u}: error-500 calls must be recorded with messages = 0: {errors}"
        );
        records += recs.len();
    }
    println!("mixed: 100 requests, {records} records; counters == ledger for 5 users");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_users_and_keys_and_revocations() {
    let site = Site::new().await;
    let port = free_port();
    let cfg = site.config("a.toml", port, "", "");
    let mut g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    g.create_user("keeper", "free").await;
    let (good, _) = g.create_key("keeper").await;
    let (bad, bad_id) = g.create_key("keeper").await;
    assert_eq!(g.generate(&bad, "gemini-2.5-flash").await, 200);
    let r = g
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{bad_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(g.generate(&bad, "gemini-2.5-flash").await, 401);
    assert_eq!(g.generate(&good, "gemini-2.5-flash").await, 200);
    // SIGKILL: identity writes must be durable without a clean stop; usage records are on disk
    // within the flush interval (20 ms here), so wait well past it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.kill9();
    g.wait_exit(Duration::from_secs(10))
        .await
        .expect("no exit after SIGKILL");

    let port = free_port();
    let cfg = site.config("b.toml", port, "", "");
    let g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    assert_eq!(
        g.generate(&good, "gemini-2.5-flash").await,
        200,
        "a key issued before the restart must work"
    );
    let r = unary(&g.http, &g.base, &bad, "gemini-2.5-flash").await.unwrap();
    assert_eq!(r.status(), 401, "a revoked key must stay revoked");
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().starts_with("API key not valid"),
        "{v}"
    );
    let r = g
        .admin(reqwest::Method::GET, "/admin/users/keeper")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let u: Value = r.json().await.unwrap();
    assert_eq!(u["tier"], "free");
    let r = g
        .admin(reqwest::Method::GET, "/admin/users/keeper/keys")
        .send()
        .await
        .unwrap();
    let keys: Value = r.json().await.unwrap();
    let list = keys["data"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{keys}");
    let revoked = list.iter().find(|k| k["key_id"] == bad_id.as_str()).unwrap();
    assert_eq!(revoked["active"], false, "{keys}");
    // Usage survived too: 2 successful calls before, 1 after.
    let recs = assert_counters_equal_ledger(&g, "keeper", &good).await;
    assert_eq!(recs.iter().filter(|r| is_ok_message(r)).count(), 3);
}

/// An upload started before a restart can be finished after it, keyless, and is billed to the
/// key that started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_session_survives_a_restart() {
    let site = Site::new().await;
    let port = free_port();
    let cfg = site.config("a.toml", port, "", "");
    let g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let key = g.user_with_key("uploader", "free").await;
    let data = vec![7u8; 5000];
    let r = g
        .http
        .post(g.url("/upload/v1beta/files"))
        .header("x-goog-api-key", &key)
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header("X-Goog-Upload-Header-Content-Length", data.len().to_string())
        .json(&serde_json::json!({"file": {"displayName": "a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = r.headers()["x-goog-upload-url"].to_str().unwrap().to_string();
    let path_and_query = url.split_once(&format!("127.0.0.1:{port}")).unwrap().1.to_string();
    let mut g = g;
    g.signal("TERM");
    assert!(g.wait_exit(Duration::from_secs(10)).await.expect("exit").success());

    let port = free_port();
    let cfg = site.config("b.toml", port, "", "");
    let g = Gateway::start(&site, &cfg, port, Opts::default()).await;
    let r = g
        .http
        .post(g.url(&path_and_query))
        .header("X-Goog-Upload-Command", "upload, finalize")
        .header("X-Goog-Upload-Offset", "0")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "keyless chunk after restart: {}",
        r.text().await.unwrap()
    );
    let recs = assert_counters_equal_ledger(&g, "uploader", &key).await;
    let bytes: u64 = recs
        .iter()
        .filter(|r| r["type"] == "file_upload")
        .map(|r| r["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(bytes, data.len() as u64);
}

/// Size of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    n
}

/// Measures (does not assert) writing 1,000,000 records and the start-up cost of a store that
/// holds them. Run: `cargo test --release --test durability -- --ignored --nocapture`
/// (GM_RESTART_RECORDS, GM_RESTART_USERS and GM_RESTART_DAYS set the shape). The store is
/// dropped, not snapshotted: sled writes its snapshot only at open, so the first restart pays
/// for every aggregate write since, as after a `kill -9`.
#[test]
#[ignore]
fn measure_restart_time_with_a_million_records() {
    use gemini_meter::clock::Month;
    use gemini_meter::identity::Registry;
    use gemini_meter::ledger::{Record, RecordIds, SledStore};

    let total: usize = std::env::var("GM_RESTART_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    const BATCH: usize = 10_000;
    // Users and the days the records spread over (each user-day is an aggregate key).
    let users = env("GM_RESTART_USERS", 1_000);
    let days = env("GM_RESTART_DAYS", 1) as i64;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let now = Utc::now();
    let month = Month::of(now);
    {
        let store = SledStore::open(&path).unwrap();
        let reg = Registry::load(store.clone(), month).unwrap();
        for u in 0..users {
            reg.create_user(&format!("user{u}"), "free", None, now, month).unwrap();
        }
        let ids = RecordIds::new();
        let t0 = Instant::now();
        let mut written = 0;
        let mut batch_ms: Vec<f64> = Vec::new();
        while written < total {
            let batch: Vec<Record> = (written..written + BATCH)
                .map(|i| {
                    let step = (days * 86_400_000 / total as i64).max(1);
                    let at = now - chrono::Duration::milliseconds((total - i) as i64 * step);
                    common::records::settled(&ids, i, &format!("user{}", (i / 2) % users), at)
                })
                .collect();
            let tb = Instant::now();
            store.write_records(&batch).unwrap();
            batch_ms.push(tb.elapsed().as_secs_f64() * 1000.0);
            written += BATCH;
        }
        let tf = Instant::now();
        store.flush_sync().unwrap();
        let flush_s = tf.elapsed().as_secs_f64();
        let secs = t0.elapsed().as_secs_f64();
        let (first, last) = (batch_ms[0], batch_ms[batch_ms.len() - 1]);
        let mut sorted = batch_ms.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "write_records per batch of {BATCH}: first {first:.0} ms, median {:.0} ms, max {:.0} ms, \
             last {last:.0} ms; final flush {flush_s:.2} s",
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
        println!(
            "wrote {total} records ({users} users, {days} days) in {secs:.2} s: {:.0} records/s (batches of {BATCH}, one flush at the end)",
            total as f64 / secs
        );
        println!("size_on_disk {} bytes", store.size_on_disk());
    }
    println!(
        "directory {} bytes ({:.1} MiB)",
        dir_bytes(&path),
        dir_bytes(&path) as f64 / 1048576.0
    );
    let t0 = Instant::now();
    let store = SledStore::open(&path).unwrap();
    let t_open = t0.elapsed();
    let reg = Registry::load(store.clone(), month).unwrap();
    let t_load = t0.elapsed() - t_open;
    println!(
        "restart: SledStore::open {:.3} s + Registry::load {:.3} s = {:.3} s ({} users)",
        t_open.as_secs_f64(),
        t_load.as_secs_f64(),
        (t_open + t_load).as_secs_f64(),
        reg.user_count()
    );
    let u0 = reg.user("user0").unwrap().usage.snapshot(month);
    println!("user0 this month: {} messages, {} tokens", u0.messages, u0.tokens);
    let t1 = Instant::now();
    let n = store.count_records().unwrap();
    println!("count_records {n} in {:.3} s", t1.elapsed().as_secs_f64());
    drop(reg);
    drop(store);
    // sled replays its log since the last open, then writes a snapshot: a second restart with
    // nothing written in between shows the cost of the snapshot alone.
    let t2 = Instant::now();
    let store = SledStore::open(&path).unwrap();
    let reg = Registry::load(store, month).unwrap();
    println!(
        "second restart: {:.3} s ({} users)",
        t2.elapsed().as_secs_f64(),
        reg.user_count()
    );
}
