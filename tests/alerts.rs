//! Quota alerts end to end, over real sockets: a webhook receiver (hyper) and an SMTP server
//! (plain tokio) in this process, the gateway in process (the harness) or as the real binary
//! (`kill -9`).
//!
//! What is shown: one alert per threshold and channel, never more; the signature verifies; a
//! receiver that is down gets the alert once it is back, across a restart; a slow receiver never
//! slows requests; thresholds on tokens, bytes and cost as well as messages; a hot-reloaded
//! threshold list applies to the next crossing; a delivery is given up a day after its alert;
//! `kill -9` right after a crossing neither loses the alert nor sends it twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ADMIN_TOKEN, Harness, UPSTREAM_KEY, base_config};
use gemini_meter::clock::{Clock, Month};
use gemini_meter_mock::{MockOptions, MockServer};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const SECRET_ENV: &str = "GM_TEST_WEBHOOK_SECRET";
const SECRET: &str = "whsec_test_9c1f3e";
const ENV: &[(&str, &str)] = &[(SECRET_ENV, SECRET)];
const MODEL: &str = "gemini-2.5-flash";

// ---------------------------------------------------------------------------------------------
// A webhook receiver

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers 200.
    Accept,
    /// Answers 503.
    Fail,
    /// Reads the request and never answers.
    Hang,
}

#[derive(Debug, Clone)]
struct Hook {
    headers: HeaderMap,
    body: Bytes,
    accepted: bool,
}

impl Hook {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Receiver {
    addr: SocketAddr,
    hooks: Arc<Mutex<Vec<Hook>>>,
    mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(addr: SocketAddr, mode: Mode) -> Receiver {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let (h, m) = (hooks.clone(), mode.clone());
        let task = tokio::spawn(async move {
            // Connections live in this task: aborting it closes them all, like a dead host.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, m) = (h.clone(), m.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, m) = (h.clone(), m.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let mode = *m.lock().unwrap();
                            if mode == Mode::Hang {
                                std::future::pending::<()>().await;
                            }
                            let accepted = mode == Mode::Accept;
                            h.lock().unwrap().push(Hook {
                                headers: parts.headers,
                                body,
                                accepted,
                            });
                            let status = if accepted { 200 } else { 503 };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            hooks,
            mode,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Deliveries answered with 200.
    fn accepted(&self) -> Vec<Hook> {
        self.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.accepted)
            .cloned()
            .collect()
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn stop(self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal SMTP server: 220, EHLO/HELO 250, MAIL/RCPT 250, DATA 354 .. 250, QUIT 221.

#[derive(Debug, Clone)]
struct Mail {
    from: String,
    to: Vec<String>,
    data: String,
}

impl Mail {
    fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        // Unfold continuation lines first.
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        unfolded.split("\r\n").find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The body, quoted-printable soft breaks undone.
    fn body(&self) -> String {
        let body = self.data.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
        if self
            .header("Content-Transfer-Encoding")
            .is_some_and(|e| e.eq_ignore_ascii_case("quoted-printable"))
        {
            body.replace("=\r\n", "").replace("=3D", "=")
        } else {
            body.to_string()
        }
        .replace("\r\n", "\n")
    }
}

struct SmtpServer {
    addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpServer {
    async fn start(addr: SocketAddr) -> SmtpServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let m = mails.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let m = m.clone();
                conns.spawn(async move {
                    let _ = smtp_session(stream, m).await;
                });
            }
        });
        SmtpServer { addr, mails, task }
    }

    fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}

fn angle(arg: &str) -> String {
    let a = arg.find('<').map_or(0, |i| i + 1);
    let b = arg.rfind('>').unwrap_or(arg.len());
    arg.get(a..b).unwrap_or_default().to_string()
}

async fn smtp_session(stream: tokio::net::TcpStream, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    w.write_all(b"220 test-smtp ESMTP ready\r\n").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250 test-smtp\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = angle(&line);
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            to.push(angle(&line));
            b"250 OK\r\n"
        } else if upper == "DATA" {
            w.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(l.strip_prefix('.').filter(|_| l.starts_with("..")).unwrap_or(&l));
            }
            mails.lock().unwrap().push(Mail {
                from: std::mem::take(&mut from),
                to: std::mem::take(&mut to),
                data,
            });
            b"250 OK queued\r\n"
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else if upper == "RSET" || upper == "NOOP" {
            b"250 OK\r\n"
        } else {
            b"502 not implemented\r\n"
        };
        w.write_all(reply).await?;
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A loopback port nobody listens on (a receiver that is down).
fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::spare_port()))
}

/// The `[alerts]` section.
fn alerts_toml(thresholds: &str, webhook: Option<&str>, smtp: Option<SocketAddr>) -> String {
    let mut s = format!("\n[alerts]\nthresholds = {thresholds}\n");
    if let Some(url) = webhook {
        s.push_str(&format!(
            "webhook_url = \"{url}\"\nwebhook_secret_env = \"{SECRET_ENV}\"\n"
        ));
    }
    if let Some(addr) = smtp {
        s.push_str(&format!(
            "\n[alerts.smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"billing@example.com\"\nstarttls = false\n",
            addr.port()
        ));
    }
    s
}

async fn create_user(h: &Harness, id: &str, tier: &str, email: Option<&str>) -> String {
    let r = h
        .admin(reqwest::Method::POST, "/admin/users")
        .json(&json!({"id": id, "tier": tier, "email": email}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create user {id}: {}", r.text().await.unwrap());
    h.create_key(id).await
}

/// One unary call; its status and body.
async fn call(h: &Harness, key: &str) -> (u16, Value) {
    let r = h.generate(key, MODEL, false).await;
    let st = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (st, body)
}

async fn alerts_of(h: &Harness, query: &str) -> Value {
    let r = h
        .admin(reqwest::Method::GET, &format!("/admin/alerts{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_for_json(
    limit: Duration,
    what: &str,
    mut get: impl AsyncFnMut() -> Value,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = get().await;
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn thresholds_of(hooks: &[Hook]) -> Vec<u64> {
    let mut t: Vec<u64> = hooks.iter().map(|h| h.json()["threshold"].as_u64().unwrap()).collect();
    t.sort_unstable();
    t
}

fn every_delivery(alerts: &Value) -> Vec<Value> {
    alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["deliveries"].as_array().unwrap().clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. One alert per threshold and channel, never more; signed; listed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_per_threshold_on_both_channels_signed_and_never_more() {
    let hook = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Accept).await;
    let smtp = SmtpServer::start("127.0.0.1:0".parse().unwrap()).await;
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml("[80, 95, 100]", Some(&hook.url()), Some(smtp.addr))
    );
    let h = Harness::start_alerting(&extra, ENV).await;
    let ann = create_user(&h, "ann", "ten", Some("ann@example.com")).await;
    // A user without an email gets the webhook only.
    let bob = create_user(&h, "bob", "ten", None).await;

    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(call(&h, &ann).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 403, 403]);
    for _ in 0..8 {
        assert_eq!(call(&h, &bob).await.0, 200);
    }
    wait_for(Duration::from_secs(20), "4 webhooks and 3 mails", || {
        hook.accepted().len() >= 4 && smtp.mails().len() >= 3
    })
    .await;
    // Never more: a pause, and the count is the same.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hooks = hook.accepted();
    let mails = smtp.mails();
    assert_eq!(hooks.len(), 4, "3 thresholds for ann, 1 for bob: {hooks:#?}");
    assert_eq!(mails.len(), 3, "bob has no email: {mails:#?}");

    let month = Month::of(h.clock.now()).to_string();
    let ann_hooks: Vec<Hook> = hooks.iter().filter(|h| h.json()["user_id"] == "ann").cloned().collect();
    assert_eq!(thresholds_of(&ann_hooks), [80, 95, 100]);
    let mut ids = std::collections::HashSet::new();
    for hk in &hooks {
        let b = hk.json();
        let keys: std::collections::BTreeSet<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "at",
                "event",
                "id",
                "limit",
                "month",
                "quota",
                "threshold",
                "tier",
                "used",
                "user_id"
            ]
            .into(),
            "exactly the contract's fields: {b}"
        );
        assert_eq!(b["event"], "quota.threshold");
        assert_eq!(b["quota"], "messages");
        assert_eq!(b["tier"], "ten");
        assert_eq!(b["limit"], 10);
        assert_eq!(b["month"], month);
        assert!(
            chrono::DateTime::parse_from_rfc3339(b["at"].as_str().unwrap()).is_ok(),
            "{b}"
        );
        let expected_used = if b["threshold"] == 80 { 8 } else { 10 };
        assert_eq!(b["used"], expected_used, "used as of the crossing record: {b}");
        assert!(b["id"].as_str().unwrap().starts_with("alrt_"), "{b}");
        // The signature is the HMAC-SHA256 of the raw body under the secret.
        assert_eq!(
            hk.header("x-gemini-meter-signature"),
            Some(format!("sha256={}", hmac_hex(SECRET, &hk.body)).as_str())
        );
        assert_ne!(
            hk.header("x-gemini-meter-signature"),
            Some(format!("sha256={}", hmac_hex("wrong", &hk.body)).as_str())
        );
        assert!(hk.header("content-type").unwrap().starts_with("application/json"));
        let delivery = hk.header("x-gemini-meter-delivery").unwrap().to_string();
        assert!(delivery.starts_with("dlv_"), "{delivery}");
        assert!(ids.insert(delivery), "each delivery has its own id");
    }

    let mut subjects: Vec<String> = Vec::new();
    for m in &mails {
        assert_eq!(m.from, "billing@example.com");
        assert_eq!(m.to, ["ann@example.com"]);
        let subject = m.header("Subject").unwrap();
        assert!(subject.contains("messages"), "the subject names the quota: {subject}");
        let body = m.body();
        assert!(body.contains("of 10 messages"), "used and limit: {body}");
        assert!(
            body.contains(&format!("{}-01T00:00:00Z", Month::of(h.clock.now()).next())),
            "when it resets: {body}"
        );
        assert!(body.contains("upgrade your plan"), "where to upgrade: {body}");
        assert!(
            m.header("Message-ID").is_some_and(|id| id.contains("dlv_")),
            "{:?}",
            m.header("Message-ID")
        );
        subjects.push(subject);
    }
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "You have used 100% of your monthly messages quota",
            "You have used 80% of your monthly messages quota",
            "You have used 95% of your monthly messages quota",
        ],
        "the subject names the percentage"
    );

    let listed = wait_for_json(
        Duration::from_secs(5),
        "every delivery listed as sent",
        async || alerts_of(&h, "?user_id=ann").await,
        |v| v["counts"]["sent"] == 6,
    )
    .await;
    assert_eq!(listed["counts"]["alerts"], 3, "{listed:#}");
    assert_eq!(listed["counts"]["pending"], 0);
    assert_eq!(listed["counts"]["failed"], 0);
    for d in every_delivery(&listed) {
        assert_eq!(d["status"], "sent", "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
    }
    let all = alerts_of(&h, &format!("?month={month}")).await;
    assert_eq!(all["counts"]["alerts"], 4, "everyone's alerts of the month: {all:#}");
    assert_eq!(all["metrics"]["sent"], 7);
    assert_eq!(all["metrics"]["fired"], 4);
    assert_eq!(all["metrics"]["failed"], 0);
    let unauth = h.http.get(h.url("/admin/alerts")).send().await.unwrap();
    assert_eq!(unauth.status(), 401, "the listing needs the admin token");
    hook.stop();
    smtp.stop();
}

// ---------------------------------------------------------------------------------------------
// 2. A receiver that is down gets the alert once it is back, across a restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_gets_the_alert_once_back_across_a_restart() {
    let hook_addr = closed_port();
    let smtp_addr = closed_port();
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml("[80]", Some(&format!("http://{hook_addr}/hooks")), Some(smtp_addr))
    );
    let h = Harness::start_alerting(&extra, ENV).await;
    let key = create_user(&h, "cleo", "ten", Some("cleo@example.com")).await;
    for _ in 0..8 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    let listed = wait_for_json(
        Duration::from_secs(10),
        "both deliveries attempted and pending",
        async || alerts_of(&h, "?user_id=cleo").await,
        |v| v["counts"]["pending"] == 2 && every_delivery(v).iter().all(|d| d["attempts"].as_u64() >= Some(1)),
    )
    .await;
    for d in every_delivery(&listed) {
        assert!(
            d["last_error"].as_str().is_some_and(|e| !e.is_empty()),
            "the failure is recorded: {d}"
        );
        assert!(d["next_attempt_at"].is_string(), "{d}");
    }
    assert!(listed["metrics"]["retries"].as_u64() >= Some(2), "{listed:#}");

    // Restart the gateway, then bring the receivers up on the same addresses.
    let h = h.reopen(ENV).await;
    let hook = Receiver::start(hook_addr, Mode::Accept).await;
    let smtp = SmtpServer::start(smtp_addr).await;
    wait_for(Duration::from_secs(30), "the webhook and the mail", || {
        hook.accepted().len() + smtp.mails().len() >= 2
    })
    .await;
    // More use above the threshold fires nothing new.
    assert_eq!(call(&h, &key).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(hook.accepted().len(), 1, "exactly once: {:#?}", hook.accepted());
    assert_eq!(smtp.mails().len(), 1, "exactly once");
    let b = hook.accepted()[0].json();
    assert_eq!(
        (b["threshold"].as_u64(), b["used"].as_u64()),
        (Some(80), Some(8)),
        "{b}"
    );
    let listed = alerts_of(&h, "?user_id=cleo").await;
    assert_eq!(listed["counts"]["sent"], 2, "{listed:#}");
    assert!(
        every_delivery(&listed)
            .iter()
            .all(|d| d["attempts"].as_u64() >= Some(2)),
        "{listed:#}"
    );
    hook.stop();
    smtp.stop();
}

// ---------------------------------------------------------------------------------------------
// 3. A slow receiver never slows requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_never_slows_requests() {
    let hook = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Hang).await;
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml("[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]", Some(&hook.url()), None)
    );
    let h = Harness::start_alerting(&extra, ENV).await;
    let key = create_user(&h, "dan", "ten", None).await;
    let t0 = Instant::now();
    for _ in 0..10 {
        let t = Instant::now();
        assert_eq!(call(&h, &key).await.0, 200);
        assert!(t.elapsed() < Duration::from_secs(1), "a call took {:?}", t.elapsed());
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "10 crossing calls took {took:?} with a hanging receiver"
    );
    // The deliveries are in flight (or waiting), not lost.
    wait_for_json(
        Duration::from_secs(5),
        "10 pending alerts",
        async || alerts_of(&h, "?user_id=dan").await,
        |v| v["counts"]["alerts"] == 10 && v["counts"]["pending"] == 10,
    )
    .await;
    // The receiver comes to its senses: each is then delivered once (after the 10 s timeout).
    hook.set_mode(Mode::Accept);
    wait_for(Duration::from_secs(40), "10 deliveries", || hook.accepted().len() >= 10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        thresholds_of(&hook.accepted()),
        [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    );
    hook.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. Tokens, bytes and cost.

/// The first prefix sum of `values` that reaches `percent` % of `limit`.
fn crossing(values: &[Decimal], limit: Decimal, percent: u64) -> Option<Decimal> {
    let mut sum = Decimal::ZERO;
    for v in values {
        sum += *v;
        if sum * Decimal::from(100) >= limit * Decimal::from(percent) {
            return Some(sum);
        }
    }
    None
}

async fn upload(h: &Harness, key: &str, chunks: &[usize]) {
    let c = reqwest::Client::builder().no_gzip().build().unwrap();
    let total: usize = chunks.iter().sum();
    let r = c
        .post(h.url("/upload/v1beta/files"))
        .header("x-goog-api-key", key)
        .header("content-type", "application/json")
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header("X-Goog-Upload-Header-Content-Length", total.to_string())
        .header("X-Goog-Upload-Header-Content-Type", "application/pdf")
        .body(json!({"file": {"displayName": "report"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "upload start");
    let url = r.headers()["x-goog-upload-url"].to_str().unwrap().to_string();
    let mut offset = 0;
    for (i, n) in chunks.iter().enumerate() {
        let command = if i + 1 == chunks.len() {
            "upload, finalize"
        } else {
            "upload"
        };
        let r = c
            .post(&url)
            .header("X-Goog-Upload-Protocol", "resumable")
            .header("X-Goog-Upload-Command", command)
            .header("X-Goog-Upload-Offset", offset.to_string())
            .body(vec![7u8; *n])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "chunk {i}");
        offset += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_apply_to_tokens_bytes_and_cost() {
    let hook = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Accept).await;
    let extra = format!(
        "[tiers.tok]\ntokens = 100\n[tiers.up]\nbytes = 1000\n[tiers.cheap]\ncost = \"0.0001\"\n{}",
        alerts_toml("[80, 95, 100]", Some(&hook.url()), None)
    );
    let h = Harness::start_alerting(&extra, ENV).await;

    // Tokens and cost: calls until the quota refuses.
    for (user, tier, quota) in [("tara", "tok", "tokens"), ("carl", "cheap", "cost")] {
        let key = create_user(&h, user, tier, None).await;
        let mut n = 0;
        while call(&h, &key).await.0 == 200 {
            n += 1;
            assert!(n < 100, "{quota} never ran out");
        }
        assert!(n >= 1, "the {quota} limit takes a call or more ({n})");
    }
    // Bytes: an upload in chunks of 50 %, 30 % and 20 % of the quota.
    let key = create_user(&h, "ursula", "up", None).await;
    upload(&h, &key, &[500, 300, 200]).await;

    wait_for(Duration::from_secs(20), "9 alerts", || hook.accepted().len() >= 9).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let hooks = hook.accepted();
    assert_eq!(
        hooks.len(),
        9,
        "3 thresholds x 3 quotas: {:#?}",
        hooks.iter().map(Hook::json).collect::<Vec<_>>()
    );
    for (user, quota, limit) in [
        ("tara", "tokens", "100"),
        ("carl", "cost", "0.0001"),
        ("ursula", "bytes", "1000"),
    ] {
        let mine: Vec<Value> = hooks.iter().map(Hook::json).filter(|b| b["user_id"] == user).collect();
        assert_eq!(mine.len(), 3, "{user}: {mine:#?}");
        // What each record added, in ledger order.
        let mut recs = h.records(user).await;
        recs.reverse();
        let values: Vec<Decimal> = recs
            .iter()
            .map(|r| match quota {
                "tokens" => Decimal::from(r.tokens),
                "bytes" => Decimal::from(r.bytes),
                _ => r.cost,
            })
            .collect();
        let limit: Decimal = limit.parse().unwrap();
        for b in &mine {
            assert_eq!(b["quota"], quota, "{b}");
            let t = b["threshold"].as_u64().unwrap();
            let used = match quota {
                "cost" => {
                    assert!(
                        b["used"].is_string() && b["limit"].is_string(),
                        "money is a string: {b}"
                    );
                    b["used"].as_str().unwrap().parse::<Decimal>().unwrap()
                }
                _ => Decimal::from(b["used"].as_u64().unwrap()),
            };
            assert_eq!(
                Some(used),
                crossing(&values, limit, t),
                "{user} {t}%: used is the total at the crossing record: {b}"
            );
            let l = match quota {
                "cost" => b["limit"].as_str().unwrap().parse::<Decimal>().unwrap(),
                _ => Decimal::from(b["limit"].as_u64().unwrap()),
            };
            assert_eq!(l, limit);
        }
        let mut ts: Vec<u64> = mine.iter().map(|b| b["threshold"].as_u64().unwrap()).collect();
        ts.sort_unstable();
        assert_eq!(ts, [80, 95, 100], "{user}");
    }
    let ub: Vec<Value> = hooks
        .iter()
        .map(Hook::json)
        .filter(|b| b["user_id"] == "ursula")
        .collect();
    let used_at = |t: u64| {
        ub.iter().find(|b| b["threshold"] == t).unwrap()["used"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        (used_at(80), used_at(95), used_at(100)),
        (800, 1000, 1000),
        "bytes cross at 800 and 1000"
    );
    hook.stop();
}

// ---------------------------------------------------------------------------------------------
// 5. A hot-reloaded threshold list applies to the next crossing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_reloaded_threshold_list_applies_to_the_next_crossing() {
    let hook = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Accept).await;
    let tier = "[tiers.ten]\nmessages = 10\n";
    let h = Harness::start_alerting(&format!("{tier}{}", alerts_toml("[80]", Some(&hook.url()), None)), ENV).await;
    let key = create_user(&h, "hana", "ten", None).await;
    for _ in 0..3 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    h.write_config_extra(&format!("{tier}{}", alerts_toml("[40, 60]", Some(&hook.url()), None)));
    let r = h.admin(reqwest::Method::POST, "/admin/reload").send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for _ in 0..5 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    wait_for(Duration::from_secs(10), "2 alerts", || hook.accepted().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bodies: Vec<Value> = hook.accepted().iter().map(Hook::json).collect();
    assert_eq!(
        thresholds_of(&hook.accepted()),
        [40, 60],
        "80 left the list; 40 and 60 joined it: {bodies:#?}"
    );
    for b in &bodies {
        assert_eq!(
            b["used"].as_u64().unwrap() * 10,
            b["threshold"].as_u64().unwrap(),
            "fired at the crossing: {b}"
        );
    }
    hook.stop();
}

// ---------------------------------------------------------------------------------------------
// 6. Retried for a day, then given up and listed as failed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_given_up_a_day_after_its_alert() {
    let hook_addr = closed_port();
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml("[80]", Some(&format!("http://{hook_addr}/hooks")), None)
    );
    let h = Harness::start_alerting(&extra, ENV).await;
    let month = Month::of(h.clock.now()).to_string();
    let key = create_user(&h, "gus", "ten", None).await;
    for _ in 0..8 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    let q = format!("?user_id=gus&month={month}");
    wait_for_json(
        Duration::from_secs(10),
        "a failed attempt",
        async || alerts_of(&h, &q).await,
        |v| {
            every_delivery(v)
                .first()
                .is_some_and(|d| d["attempts"].as_u64() >= Some(1))
        },
    )
    .await;
    h.clock.advance_ms(25 * 3600 * 1000);
    let listed = wait_for_json(
        Duration::from_secs(10),
        "the delivery given up",
        async || alerts_of(&h, &q).await,
        |v| v["counts"]["failed"] == 1 && v["metrics"]["pending"] == 0,
    )
    .await;
    let d = &every_delivery(&listed)[0];
    assert_eq!(d["status"], "failed", "{d}");
    assert!(d["finished_at"].is_string() && d["last_error"].is_string(), "{d}");
    assert_eq!(listed["metrics"]["failed"], 1);
    assert_eq!(listed["metrics"]["pending"], 0, "{listed:#}");
    // Back up now: a failed delivery is not sent any more.
    let hook = Receiver::start(hook_addr, Mode::Accept).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(hook.hooks.lock().unwrap().is_empty());
    hook.stop();
}

// ---------------------------------------------------------------------------------------------
// 7. A receiver answering errors is retried with backoff until it accepts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erroring_receiver_is_retried_until_it_accepts() {
    let hook = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Fail).await;
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml("[80]", Some(&hook.url()), None)
    );
    let h = Harness::start_alerting(&extra, ENV).await;
    let key = create_user(&h, "ivy", "ten", None).await;
    for _ in 0..8 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    wait_for(Duration::from_secs(10), "two refused attempts", || {
        hook.hooks.lock().unwrap().len() >= 2
    })
    .await;
    let listed = alerts_of(&h, "?user_id=ivy").await;
    let d = &every_delivery(&listed)[0];
    assert_eq!(d["status"], "pending", "{d}");
    assert_eq!(d["last_error"], "HTTP 503", "{d}");
    hook.set_mode(Mode::Accept);
    wait_for(Duration::from_secs(20), "the delivery", || hook.accepted().len() == 1).await;
    let all = hook.hooks.lock().unwrap().clone();
    let ids: std::collections::HashSet<_> = all
        .iter()
        .map(|h| h.header("x-gemini-meter-delivery").unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "every retry carries the same delivery id");
    let at: Vec<_> = all.iter().map(|h| h.json()["at"].clone()).collect();
    assert!(at.windows(2).all(|w| w[0] == w[1]), "and the same body");
    hook.stop();
}

// ---------------------------------------------------------------------------------------------
// 8. kill -9 right after a crossing, with the real binary.

const BIN: &str = env!("CARGO_BIN_EXE_gemini-meter");

struct Child9 {
    child: Child,
    base: String,
    lines: Arc<Mutex<Vec<String>>>,
    /// A client of its own: pooled connections to a killed process are dead.
    http: reqwest::Client,
}

impl Child9 {
    async fn start(dir: &Path, config: &Path, port: u16) -> Child9 {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .env("GM_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
            .env("GM_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
            .env(SECRET_ENV, SECRET)
            .env("RUST_LOG", "info")
            .env_remove("GEMINI_METER_FAKE_NOW")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gemini-meter");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push(line);
            }
        });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let g = Child9 {
            child,
            base: format!("http://127.0.0.1:{port}"),
            lines,
            http: http.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = g.lines.lock().unwrap().iter().any(|l| l.contains("listening on"))
                && http
                    .get(format!("{}/healthz", g.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
            if ready {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready: {:?}",
                g.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Child9 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_a_crossing_neither_loses_the_alert_nor_sends_it_twice() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mock = MockServer::start(
        "127.0.0.1:0".parse().unwrap(),
        MockOptions {
            api_key: Some(UPSTREAM_KEY.into()),
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port().port();
    let hook_addr = closed_port();
    let smtp = SmtpServer::start("127.0.0.1:0".parse().unwrap()).await;
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml(
            "[80, 95, 100]",
            Some(&format!("http://{hook_addr}/hooks")),
            Some(smtp.addr)
        )
    );
    let text = base_config(mock.addr, &dir.path().join("data"), &extra)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""));
    let config = dir.path().join("gemini-meter.toml");
    std::fs::write(&config, text).unwrap();
    let mut g = Child9::start(dir.path(), &config, port).await;
    let r = g
        .http
        .post(format!("{}/admin/users", g.base))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"id": "kim", "tier": "ten", "email": "kim@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = g
        .http
        .post(format!("{}/admin/users/kim/keys", g.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let key = r.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    let call = async |g: &Child9| -> u16 {
        let r = g
            .http
            .post(format!("{}/v1beta/models/{MODEL}:generateContent", g.base))
            .header("x-goog-api-key", &key)
            .json(&json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]}))
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let _ = r.bytes().await;
        st
    };

    let messages = async |g: &Child9| -> u64 {
        let cur: Value = g
            .http
            .get(format!("{}/api/usage/current", g.base))
            .header("x-goog-api-key", &key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        cur["current_month"]["messages"].as_u64().unwrap()
    };

    // Round 1: the webhook receiver is down; kill -9 right after the call that crosses 80 %.
    for _ in 0..8 {
        assert_eq!(call(&g).await, 200);
    }
    g.kill9();
    assert!(
        smtp.mails().is_empty(),
        "nothing went out in the moment before the kill"
    );
    let mut g = Child9::start(dir.path(), &config, port).await;
    assert_eq!(
        messages(&g).await,
        8,
        "the crossing call completed, so its record survived"
    );
    let hook = Receiver::start(hook_addr, Mode::Accept).await;
    // No more calls: the 80 % alert goes out from the outbox.
    wait_for(Duration::from_secs(30), "the 80 % webhook and mail", || {
        !hook.accepted().is_empty() && !smtp.mails().is_empty()
    })
    .await;

    // Round 2: the receivers are up; kill -9 right after the call that reaches 100 %.
    for _ in 0..2 {
        assert_eq!(call(&g).await, 200);
    }
    g.kill9();
    let g = Child9::start(dir.path(), &config, port).await;
    assert_eq!(messages(&g).await, 10);
    assert_eq!(call(&g).await, 403, "the quota is used up");
    wait_for(Duration::from_secs(30), "3 webhooks and 3 mails", || {
        hook.accepted().len() >= 3 && smtp.mails().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hooks = hook.accepted();
    assert_eq!(
        thresholds_of(&hooks),
        [80, 95, 100],
        "each threshold exactly once: {:#?}",
        hooks.iter().map(Hook::json).collect::<Vec<_>>()
    );
    assert_eq!(smtp.mails().len(), 3, "each mail exactly once");
    let listed: Value = g
        .http
        .get(format!("{}/admin/alerts?user_id=kim", g.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["counts"]["sent"], 6, "{listed:#}");
    assert_eq!(listed["counts"]["pending"], 0, "{listed:#}");
    hook.stop();
    smtp.stop();
}

// ---------------------------------------------------------------------------------------------
// 9. A deleted user's alerts go with it: the same id created again is alerted again.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_deleted_and_created_again_is_alerted_again() {
    let hook = Receiver::start("127.0.0.1:0".parse().unwrap(), Mode::Accept).await;
    let extra = format!(
        "[tiers.ten]\nmessages = 10\n{}",
        alerts_toml("[80]", Some(&hook.url()), None)
    );
    let h = Harness::start_alerting(&extra, ENV).await;
    let key = create_user(&h, "rae", "ten", None).await;
    for _ in 0..8 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    wait_for(Duration::from_secs(10), "the first alert", || {
        hook.accepted().len() == 1
    })
    .await;
    assert_eq!(alerts_of(&h, "?user_id=rae").await["counts"]["alerts"], 1);
    let r = h
        .admin(reqwest::Method::DELETE, "/admin/users/rae")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let gone = alerts_of(&h, "?user_id=rae").await;
    assert_eq!(
        gone["counts"]["alerts"], 0,
        "marks and deliveries go with the user: {gone:#}"
    );

    // Created again (most likely within the same second): a new user, alerted afresh.
    let key = create_user(&h, "rae", "ten", None).await;
    for _ in 0..8 {
        assert_eq!(call(&h, &key).await.0, 200);
    }
    wait_for(Duration::from_secs(10), "the second alert", || {
        hook.accepted().len() == 2
    })
    .await;
    let listed = alerts_of(&h, "?user_id=rae").await;
    assert_eq!(listed["counts"]["alerts"], 1, "{listed:#}");
    assert_eq!(listed["data"][0]["used"], 8, "{listed:#}");
    // Once per user and month still holds, also across a restart.
    let h = h.reopen(ENV).await;
    assert_eq!(call(&h, &key).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bodies: Vec<Value> = hook.accepted().iter().map(Hook::json).collect();
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    for b in &bodies {
        assert_eq!(
            (b["user_id"].as_str(), b["threshold"].as_u64(), b["used"].as_u64()),
            (Some("rae"), Some(80), Some(8))
        );
    }
    hook.stop();
}
