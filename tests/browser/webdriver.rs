//! A small W3C WebDriver client for the browser tests: starts Debian's `chromedriver`, opens a
//! headless Chromium session and drives it over HTTP with reqwest.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// Where Debian's chromium-driver puts the driver.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Debian's chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// True when the browser tests can run. Without the driver they fail with a clear message,
/// unless `GEMINI_METER_SKIP_BROWSER=1` asks to skip them.
pub fn browser_available(test: &str) -> bool {
    let present = Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists();
    if present {
        return true;
    }
    if std::env::var("GEMINI_METER_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: {CHROMEDRIVER} or {CHROMIUM} not found and GEMINI_METER_SKIP_BROWSER=1");
        return false;
    }
    panic!(
        "{test}: browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}), which are not installed. \
         Install them with `apt-get install -y chromium chromium-driver` (as .ci/run does), \
         or set GEMINI_METER_SKIP_BROWSER=1 to skip the browser tests."
    );
}

/// Where screenshots go (gitignored).
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running chromedriver with one headless Chromium session. Dropping it ends the session
/// and stops the driver.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a session.
    pub async fn start() -> Browser {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        // A port can be taken between the probe and chromedriver's bind: try a few.
        for attempt in 0..3 {
            let port = free_port();
            let driver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {CHROMEDRIVER}: {e}"));
            let profile = tempfile::tempdir().unwrap();
            let mut b = Browser {
                driver,
                port,
                session: String::new(),
                http: http.clone(),
                _profile: profile,
            };
            if b.wait_ready().await {
                b.session = b.new_session().await;
                return b;
            }
            // Dropping `b` stops this driver.
            eprintln!("chromedriver on port {port} did not become ready (attempt {attempt})");
        }
        panic!("chromedriver did not start");
    }

    async fn wait_ready(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(r) = self
                .http
                .get(format!("http://127.0.0.1:{}/status", self.port))
                .send()
                .await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == json!(true)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    async fn new_session(&self) -> String {
        let profile = self._profile.path().display().to_string();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            &format!("--user-data-dir={profile}"),
            "--window-size=1200,900",
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let r = self
            .http
            .post(format!("http://127.0.0.1:{}/session", self.port))
            .json(&caps)
            .send()
            .await
            .expect("create a WebDriver session");
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "chromedriver refused the session: {v}");
        v["value"]["sessionId"].as_str().expect("sessionId").to_string()
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://127.0.0.1:{}/session/{}{}", self.port, self.session, path);
        let mut rb = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            rb = rb.json(&b);
        } else if method == reqwest::Method::POST {
            rb = rb.json(&json!({}));
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "WebDriver {method} {path} failed: {v}");
        v["value"].clone()
    }

    /// Opens a URL.
    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    /// Runs a script (a function body: use `return`) and returns its result.
    pub async fn exec(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Evaluates a JS expression.
    pub async fn eval(&self, expr: &str) -> Value {
        self.exec(&format!("return ({expr});"), json!([])).await
    }

    /// Polls `expr` until `ok` accepts its value; panics with the last value after `timeout`.
    pub async fn wait_for(&self, what: &str, expr: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr).await;
            if ok(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                let shot = self.screenshot("failure-last.png").await;
                panic!(
                    "timed out after {timeout:?} waiting for {what}; `{expr}` is {v} (screenshot {})",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the text of the first element matching `css` equals `want`.
    pub async fn wait_text(&self, css: &str, want: &str, timeout: Duration) {
        let expr = format!(
            "document.querySelector({}) && document.querySelector({}).textContent.trim()",
            json!(css),
            json!(css)
        );
        self.wait_for(&format!("{css} to read {want:?}"), &expr, timeout, |v| {
            v.as_str() == Some(want)
        })
        .await;
    }

    /// Waits until the element matching `css` exists and is shown.
    pub async fn wait_visible(&self, css: &str, timeout: Duration) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); return !!e && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden'; }})()",
            json!(css)
        );
        self.wait_for(&format!("{css} to be visible"), &expr, timeout, |v| v == &json!(true))
            .await;
    }

    /// The text of the first element matching `css` (empty when there is none).
    pub async fn text(&self, css: &str) -> String {
        let expr = format!(
            "(document.querySelector({}) || {{textContent: ''}}).textContent.trim()",
            json!(css)
        );
        self.eval(&expr).await.as_str().unwrap_or_default().to_string()
    }

    /// True when an element matching `css` is shown.
    pub async fn visible(&self, css: &str) -> bool {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); return !!e && e.getClientRects().length > 0; }})()",
            json!(css)
        );
        self.eval(&expr).await == json!(true)
    }

    /// Finds an element with WebDriver (not by script), returning its reference.
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element for {css}: {v}"))
            .to_string()
    }

    /// Types text into an element, as a user would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/clear"), None)
            .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Clicks an element.
    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/click"), None)
            .await;
    }

    /// Resizes the window.
    pub async fn set_window(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Saves a PNG screenshot under `tests/artifacts/` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = artifacts_dir().join(name);
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Saves a screenshot of the whole page (the window grows to the page's height for it).
    pub async fn screenshot_full(&self, name: &str) -> PathBuf {
        let size = self
            .eval("[window.outerWidth, window.outerHeight, window.outerHeight - window.innerHeight, document.documentElement.scrollHeight]")
            .await;
        let n = |i: usize| size[i].as_u64().unwrap_or(0) as u32;
        let (w, h, chrome, page) = (n(0), n(1), n(2), n(3));
        self.set_window(w, (page + chrome).clamp(h, 6000)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let path = self.screenshot(name).await;
        self.set_window(w, h).await;
        path
    }

    /// The browser console since the last call (chromedriver's log endpoint).
    pub async fn console(&self) -> Vec<Value> {
        let url = format!("http://127.0.0.1:{}/session/{}/se/log", self.port, self.session);
        match self.http.post(&url).json(&json!({"type": "browser"})).send().await {
            Ok(r) if r.status().is_success() => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["value"].as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Console entries at SEVERE level (script errors, CSP violations, failed loads).
    pub async fn console_errors(&self) -> Vec<String> {
        self.console()
            .await
            .into_iter()
            .filter(|e| e["level"] == json!("SEVERE"))
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// Ends the session (blocking, so that it also runs when a test panics) and stops the driver.
impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = delete_session(self.port, &self.session);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn delete_session(port: u16, session: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(())
}
