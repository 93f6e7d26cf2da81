//! Tests over real sockets with reqwest: every route and framing, the counters, uploads,
//! gzip, auth, failure injection, and the wire shape of each framing against the fixtures.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const FLASH: &str = "/v1beta/models/gemini-2.5-flash";
// 40 bytes: 10 prompt tokens.
const BODY40: &str = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;

async fn mock(opts: MockOptions) -> io::Result<MockServer> {
    MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
}

fn url(m: &MockServer, path: &str) -> String {
    format!("http://{}{}", m.addr, path)
}

fn stat(m: &MockServer, f: fn(&MockStats) -> &AtomicU64) -> u64 {
    f(&m.stats).load(Relaxed)
}

async fn post(m: &MockServer, path: &str, body: &'static str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .post(url(m, path))
        .header("x-goog-api-key", "AIzaTEST")
        .body(body)
        .send()
        .await
}

/// Reads every body frame separately.
async fn frames(mut resp: reqwest::Response) -> reqwest::Result<Vec<Bytes>> {
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await? {
        out.push(c);
    }
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixture(name: &str) -> Option<Vec<u8>> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        std::env::var_os("GEMINI_METER_FIXTURES").map(PathBuf::from),
        Some(manifest.join("../shared/fixtures")),
        Some(manifest.join("../../shared/fixtures")),
        Some(manifest.join("../../../shared/fixtures")),
        Some(PathBuf::from("/work/shared/fixtures")),
    ]
    .into_iter()
    .flatten()
    .find_map(|dir| std::fs::read(dir.join(name)).ok())
}

/// The comparable wire properties of an SSE body (native or OpenAI).
#[derive(Debug, PartialEq)]
struct SseShape {
    eol: &'static str,
    /// Every event is one `data: ` line holding single-line JSON (or `[DONE]`).
    single_line_events: bool,
    /// `": "` after keys (native style) vs none (OpenAI style).
    colon_space: bool,
    /// Which events carry usage (`usageMetadata` or `usage`).
    usage_on: Vec<bool>,
    /// Which events carry a finish reason.
    finish_on: Vec<bool>,
    done_sentinel: bool,
    /// What follows the last `data:` event, if anything (a raw error object).
    trailer: String,
}

fn sse_shape(body: &[u8]) -> SseShape {
    let s = text(body);
    let eol = if s.contains("\r\n") { "\r\n" } else { "\n" };
    let sep = format!("{eol}{eol}");
    let mut parts: Vec<&str> = s.split(sep.as_str()).collect();
    let trailer = parts.pop().unwrap_or_default().to_owned();
    let mut events = Vec::new();
    let mut trailer_parts = Vec::new();
    for p in parts {
        if p.starts_with("data: ") && !p.contains('\n') {
            events.push(&p[6..]);
        } else {
            trailer_parts.push(p);
        }
    }
    trailer_parts.push(&trailer);
    let done_sentinel = events.last() == Some(&"[DONE]");
    let json_events: Vec<&str> = events.iter().copied().filter(|e| *e != "[DONE]").collect();
    let values: Vec<Value> = json_events
        .iter()
        .map(|e| serde_json::from_str(e).expect("event is JSON"))
        .collect();
    SseShape {
        eol,
        single_line_events: !events.is_empty(),
        colon_space: json_events.iter().all(|e| e.contains("\": ")),
        usage_on: values
            .iter()
            .map(|v| v.get("usageMetadata").is_some() || v.get("usage").is_some())
            .collect(),
        finish_on: values
            .iter()
            .map(|v| {
                let c = v.get("candidates").or_else(|| v.get("choices"));
                let c0 = &c.expect("candidates")[0];
                c0.get("finishReason").is_some() || c0.get("finish_reason").is_some_and(|f| !f.is_null())
            })
            .collect(),
        done_sentinel,
        trailer: trailer_parts.join("|"),
    }
}

/// The comparable wire properties of a JSON-array stream.
#[derive(Debug, PartialEq)]
struct ArrayShape {
    starts: String,
    separators: usize,
    ends: String,
    /// Elements are pretty-printed: each starts with `{\n  "` and ends with `\n}`.
    pretty: bool,
    elements: usize,
}

fn array_shape(body: &[u8]) -> ArrayShape {
    let s = text(body);
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix("\r\n]"))
        .expect("array framing");
    let elems: Vec<&str> = inner.split("\r\n,\r\n").collect();
    let parsed: Value = serde_json::from_str(&s).expect("whole body is a JSON array");
    assert_eq!(parsed.as_array().map(Vec::len), Some(elems.len()));
    ArrayShape {
        starts: s.chars().take(5).collect(),
        separators: s.matches("\r\n,\r\n").count(),
        ends: s[s.len() - 4..].to_owned(),
        pretty: elems.iter().all(|e| e.starts_with("{\n  \"") && e.ends_with("\n}")),
        elements: elems.len(),
    }
}

#[tokio::test]
async fn unary_body_is_pretty_and_deterministic() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let resp = post(&m, "/v1beta/models/gemini-2.5-flash-thinking:generateContent", BODY40).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[CONTENT_TYPE], JSON);
    assert!(resp.headers()[ALT_SVC].to_str()?.starts_with("h3="));
    let body = resp.text().await?;
    let v: Value = serde_json::from_str(&body)?;
    let id = v["responseId"].as_str().unwrap_or_default().to_owned();
    assert_eq!(id.len(), 16);
    // Same layout as fixtures/unary.json (no cache fields, no trailing newline).
    let expected = format!(
        r#"{{
  "candidates": [
    {{
      "content": {{
        "parts": [
          {{
            "text": "lorem ipsum lorem ipsum lorem ipsum lorem ipsum lorem ipsum "
          }}
        ],
        "role": "model"
      }},
      "index": 0,
      "finishReason": "STOP"
    }}
  ],
  "usageMetadata": {{
    "promptTokenCount": 10,
    "candidatesTokenCount": 15,
    "totalTokenCount": 32,
    "promptTokensDetails": [
      {{
        "modality": "TEXT",
        "tokenCount": 10
      }}
    ],
    "thoughtsTokenCount": 7
  }},
  "modelVersion": "gemini-2.5-flash-thinking",
  "responseId": "{id}"
}}"#
    );
    assert_eq!(body, expected);
    if let Some(fx) = fixture("unary.json") {
        let fx = text(&fx);
        assert!(fx.starts_with("{\n  \"candidates\": [\n    {\n      \"content\": {\n"));
        assert!(fx.ends_with("\"\n}") && body.ends_with("\"\n}"));
    }

    // No thinking: thoughtsTokenCount is omitted; prompt is at least 1.
    let resp = post(&m, "/v1/models/gemini-2.5-flash:generateContent", "").await?;
    let v: Value = resp.json().await?;
    assert_eq!(v["usageMetadata"]["promptTokenCount"], 1);
    assert_eq!(v["usageMetadata"]["totalTokenCount"], 16);
    assert!(v["usageMetadata"].get("thoughtsTokenCount").is_none());
    assert!(v["usageMetadata"].get("cachedContentTokenCount").is_none());
    assert_eq!(stat(&m, |s| &s.generate_requests), 2);
    assert_eq!(stat(&m, |s| &s.streams_started), 0);
    Ok(())
}

#[tokio::test]
async fn sse_stream_events_are_separate_frames_with_cumulative_usage() -> TestResult {
    let opts = MockOptions {
        chunk_interval: Duration::from_millis(30),
        ..MockOptions::default()
    };
    let m = mock(opts).await?;
    let resp = post(&m, &format!("{FLASH}:streamGenerateContent?alt=sse"), BODY40).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
    assert!(resp.headers().get("content-length").is_none());
    let fr = frames(resp).await?;
    assert_eq!(fr.len(), 5, "one frame per event: {fr:?}");
    for (i, f) in fr.iter().enumerate() {
        let f = text(f);
        assert!(f.starts_with("data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"lorem ipsum \"}],\"role\": \"model\"},\"index\": 0"));
        assert!(f.ends_with("}\r\n\r\n"));
        let v: Value = serde_json::from_str(f.trim_start_matches("data: ").trim_end())?;
        let u = &v["usageMetadata"];
        assert_eq!(u["promptTokenCount"], 10);
        assert_eq!(u["candidatesTokenCount"], 3 * (i as u64 + 1));
        assert_eq!(u["totalTokenCount"], 10 + 3 * (i as u64 + 1));
        let finish = v["candidates"][0].get("finishReason");
        assert_eq!(finish.is_some(), i == 4);
    }
    let body: Vec<u8> = fr.concat();
    let shape = sse_shape(&body);
    assert_eq!(shape.usage_on, vec![true; 5]);
    if let Some(fx) = fixture("stream-sse-crlf.txt") {
        assert_eq!(shape, sse_shape(&fx));
    }
    assert_eq!(stat(&m, |s| &s.streams_started), 1);
    assert_eq!(stat(&m, |s| &s.streams_completed), 1);
    assert_eq!(stat(&m, |s| &s.streams_cancelled), 0);
    Ok(())
}

#[tokio::test]
async fn json_array_stream_matches_fixture_framing() -> TestResult {
    let opts = MockOptions {
        chunk_interval: Duration::from_millis(20),
        ..MockOptions::default()
    };
    let m = mock(opts).await?;
    let resp = post(&m, &format!("{FLASH}:streamGenerateContent"), BODY40).await?;
    assert_eq!(resp.headers()[CONTENT_TYPE], JSON);
    let fr = frames(resp).await?;
    assert_eq!(fr.len(), 5, "one frame per element");
    assert!(text(&fr[0]).starts_with("[{\n"));
    assert!(text(&fr[1]).starts_with("\r\n,\r\n{\n"));
    assert!(text(&fr[4]).ends_with("}\r\n]"));
    let body = fr.concat();
    let shape = array_shape(&body);
    assert_eq!(shape.elements, 5);
    assert_eq!(shape.separators, 4);
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!(v[4]["usageMetadata"]["candidatesTokenCount"], 15);
    assert_eq!(v[4]["candidates"][0]["finishReason"], "STOP");
    if let Some(fx) = fixture("stream-json-array.txt") {
        assert_eq!(shape, array_shape(&fx));
    }
    Ok(())
}

#[tokio::test]
async fn midstream_error_both_framings() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let resp = post(
        &m,
        "/v1beta/models/midstream-error:streamGenerateContent?alt=sse",
        BODY40,
    )
    .await?;
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await?;
    let shape = sse_shape(&body);
    assert_eq!(shape.usage_on, vec![true, true]);
    assert_eq!(shape.finish_on, vec![false, false]);
    assert_eq!(shape.trailer, format!("{}\r\n", wire::ERR_OVERLOADED));
    if let Some(fx) = fixture("stream-sse-midstream-error.txt") {
        assert_eq!(shape, sse_shape(&fx));
    }

    let resp = post(&m, "/v1beta/models/midstream-error:streamGenerateContent", BODY40).await?;
    let body = resp.bytes().await?;
    let shape = array_shape(&body);
    assert_eq!(shape.elements, 3);
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!(v[2]["error"]["code"], 503);
    assert_eq!(v[2]["error"]["status"], "UNAVAILABLE");
    assert_eq!(stat(&m, |s| &s.streams_completed), 2);
    Ok(())
}

#[tokio::test]
async fn final_usage_only_uses_lf_and_last_event_usage() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let resp = post(
        &m,
        "/v1beta/models/final-usage-only:streamGenerateContent?alt=sse",
        BODY40,
    )
    .await?;
    let body = resp.bytes().await?;
    assert!(!body.contains(&b'\r'));
    let shape = sse_shape(&body);
    assert_eq!(shape.usage_on, vec![false, false, false, false, true]);
    if let Some(fx) = fixture("stream-sse-lf-final-usage.txt") {
        assert_eq!(shape, sse_shape(&fx));
    }
    Ok(())
}

#[tokio::test]
async fn cut_aborts_the_body() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    for path in [
        "/v1beta/models/cut:streamGenerateContent?alt=sse",
        "/v1beta/models/cut:streamGenerateContent",
    ] {
        let resp = post(&m, path, BODY40).await?;
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.is_err(), "{path}: truncated body must fail");
    }
    assert_eq!(stat(&m, |s| &s.streams_started), 2);
    assert_eq!(stat(&m, |s| &s.streams_completed), 0);
    assert_eq!(stat(&m, |s| &s.streams_cancelled), 0);
    Ok(())
}

#[tokio::test]
async fn client_drop_mid_stream_counts_cancelled() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let mut resp = post(&m, "/v1beta/models/slow:streamGenerateContent?alt=sse", BODY40).await?;
    let first = resp.chunk().await?.unwrap_or_default();
    assert!(text(&first).starts_with("data: "));
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&m, |s| &s.streams_cancelled) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stat(&m, |s| &s.streams_cancelled), 1);
    assert_eq!(stat(&m, |s| &s.streams_completed), 0);
    Ok(())
}

#[tokio::test]
async fn openai_compat_unary_and_stream() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::new();
    let req =
        serde_json::json!({"model": "gemini-2.5-flash-thinking", "messages": [{"role": "user", "content": "hi"}]});
    let resp = c
        .post(url(&m, "/v1beta/openai/chat/completions"))
        .bearer_auth("AIzaTEST")
        .json(&req)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let len = serde_json::to_vec(&req)?.len() as u64;
    let prompt = len.div_ceil(4);
    let v: Value = resp.json().await?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 15 + 7);
    assert_eq!(v["usage"]["total_tokens"], prompt + 22);

    let resp = c
        .post(url(&m, "/v1beta/openai/chat/completions"))
        .bearer_auth("AIzaTEST")
        .json(&serde_json::json!({"model": "models/gemini-2.5-flash", "stream": true}))
        .send()
        .await?;
    assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
    let body = resp.bytes().await?;
    assert!(body.ends_with(b"}\n\ndata: [DONE]\n\n"));
    let shape = sse_shape(&body);
    assert!(shape.done_sentinel);
    assert_eq!(shape.usage_on, vec![false, false, false, false, true]);
    assert_eq!(shape.finish_on, vec![false, false, false, false, true]);
    assert!(!shape.colon_space);
    if let Some(fx) = fixture("openai-stream.txt") {
        assert_eq!(shape, sse_shape(&fx));
    }

    let resp = c
        .post(url(&m, "/v1beta/openai/chat/completions"))
        .json(&req)
        .send()
        .await?;
    assert_eq!(resp.status(), 403);
    let resp = c
        .post(url(&m, "/v1beta/openai/chat/completions"))
        .bearer_auth("k")
        .body("not json")
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    assert_eq!(stat(&m, |s| &s.generate_requests), 3);
    Ok(())
}

#[tokio::test]
async fn other_routes() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::new();
    let get = |p: &str| c.get(url(&m, p)).header("x-goog-api-key", "k").send();

    let v: Value = post(&m, &format!("{FLASH}:countTokens"), "123456789")
        .await?
        .json()
        .await?;
    assert_eq!(v, serde_json::json!({"totalTokens": 3}));

    let v: Value = get("/v1beta/models").await?.json().await?;
    assert!(v["models"].as_array().is_some_and(|a| a.len() == 3));
    let v: Value = get("/v1alpha/models/gemini-x").await?.json().await?;
    assert_eq!(v["name"], "models/gemini-x");
    let v: Value = get("/v1beta/tunedModels/my-tune").await?.json().await?;
    assert_eq!(v["name"], "tunedModels/my-tune");
    assert_eq!(get("/v1beta/files").await?.text().await?, "{}");
    let v: Value = get("/v1beta/files/abc123").await?.json().await?;
    assert_eq!(v["name"], "files/abc123");
    assert_eq!(v["state"], "ACTIVE");
    assert_eq!(v["uri"], format!("http://{}/v1beta/files/abc123", m.addr).as_str());

    for p in ["/v1beta/nothing", "/v2/models", "/", "/v1beta/models/x:nope"] {
        let resp = get(p).await?;
        assert_eq!(resp.status(), 404, "{p}");
        let v: Value = resp.json().await?;
        assert_eq!(v["error"]["status"], "NOT_FOUND");
    }
    // GET on a POST method is not found either.
    assert_eq!(get(&format!("{FLASH}:generateContent")).await?.status(), 404);
    Ok(())
}

#[tokio::test]
async fn auth_errors_like_google() -> TestResult {
    let opts = MockOptions {
        api_key: Some("good".into()),
        ..MockOptions::default()
    };
    let m = mock(opts).await?;
    let c = reqwest::Client::new();
    let path = format!("{FLASH}:generateContent");

    let resp = c.post(url(&m, &path)).body(BODY40).send().await?;
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await?;
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|s| s.starts_with("Method doesn't allow unregistered callers"))
    );

    let resp = c.post(url(&m, &path)).header("x-goog-api-key", "bad").send().await?;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await?;
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(v["error"]["message"], "API key not valid. Please pass a valid API key.");
    assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");

    let resp = c.post(url(&m, &format!("{path}?key=good"))).send().await?;
    assert_eq!(resp.status(), 200);
    let resp = c.post(url(&m, &path)).header("x-goog-api-key", "good").send().await?;
    assert_eq!(resp.status(), 200);
    let resp = c.post(url(&m, &path)).bearer_auth("good").send().await?;
    assert_eq!(resp.status(), 401);
    let resp = c.post(url(&m, &path)).header("x-goog-api-key", "").send().await?;
    assert_eq!(resp.status(), 403);
    // Only authenticated calls count as generate requests.
    assert_eq!(stat(&m, |s| &s.generate_requests), 2);
    assert_eq!(stat(&m, |s| &s.requests), 6);
    Ok(())
}

#[tokio::test]
async fn injected_errors() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    for (model, code, status) in [
        ("error-500", 500, "INTERNAL"),
        ("error-503", 503, "UNAVAILABLE"),
        ("error-429", 429, "RESOURCE_EXHAUSTED"),
        ("error-400", 400, "INVALID_ARGUMENT"),
    ] {
        for suffix in [":generateContent", ":streamGenerateContent?alt=sse"] {
            let resp = post(&m, &format!("/v1beta/models/{model}{suffix}"), BODY40).await?;
            assert_eq!(resp.status(), code);
            assert_eq!(resp.headers()[CONTENT_TYPE], JSON);
            let body = resp.bytes().await?;
            let v: Value = serde_json::from_slice(&body)?;
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["status"], status);
            if code == 429 {
                if let Some(fx) = fixture("error-429.json") {
                    assert_eq!(text(&body), text(&fx));
                }
                assert_eq!(v["error"]["details"][1]["retryDelay"], "15s");
            }
        }
        // Without alt=sse the error comes as an array.
        let resp = post(&m, &format!("/v1beta/models/{model}:streamGenerateContent"), BODY40).await?;
        assert_eq!(resp.status(), code);
        let v: Value = resp.json().await?;
        assert_eq!(v[0]["error"]["code"], code);
    }
    let v: Value = post(&m, "/v1beta/models/error-503:generateContent", "")
        .await?
        .json()
        .await?;
    assert_eq!(
        v["error"]["message"],
        "The model is overloaded. Please try again later."
    );
    assert_eq!(stat(&m, |s| &s.streams_started), 0);
    Ok(())
}

#[tokio::test]
async fn leaked_gateway_keys_are_counted() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::new();
    let path = format!("{FLASH}:generateContent");
    c.post(url(&m, &path))
        .header("x-goog-api-key", "gm_live_abc")
        .send()
        .await?;
    c.post(url(&m, &format!("{path}?key=gm_abc"))).send().await?;
    c.post(url(&m, &path))
        .header("x-goog-api-key", "k")
        .header("x-trace", "Bearer gm_xyz")
        .send()
        .await?;
    // Not a token start: no count.
    c.post(url(&m, &path))
        .header("x-goog-api-key", "k")
        .header("x-trace", "algm_x")
        .send()
        .await?;
    assert_eq!(stat(&m, |s| &s.leaked_gateway_keys), 3);
    Ok(())
}

#[tokio::test]
async fn stats_endpoint_and_reset() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    post(&m, &format!("{FLASH}:generateContent"), BODY40).await?;
    let c = reqwest::Client::new();
    let v: Value = c.get(url(&m, "/mock/stats")).send().await?.json().await?;
    assert_eq!(v["requests"], 1);
    assert_eq!(v["generate_requests"], 1);
    for k in [
        "streams_started",
        "streams_completed",
        "streams_cancelled",
        "upload_bytes",
        "leaked_gateway_keys",
    ] {
        assert_eq!(v[k], 0, "{k}");
    }
    assert_eq!(v, m.stats.snapshot());
    let resp = c.post(url(&m, "/mock/reset")).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(stat(&m, |s| &s.requests), 0);
    assert_eq!(stat(&m, |s| &s.generate_requests), 0);
    Ok(())
}

#[tokio::test]
async fn resumable_upload_with_absolute_url() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::new();
    let start = c
        .post(url(&m, "/upload/v1beta/files"))
        .header("x-goog-api-key", "k")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("x-goog-upload-header-content-length", "11")
        .header("x-goog-upload-header-content-type", "text/plain")
        .json(&serde_json::json!({"file": {"displayName": "notes"}}))
        .send()
        .await?;
    assert_eq!(start.status(), 200);
    assert_eq!(start.headers()["x-goog-upload-status"], "active");
    let upload_url = start.headers()["x-goog-upload-url"].to_str()?.to_owned();
    assert!(start.bytes().await?.is_empty());
    let prefix = format!("http://{}/upload/v1beta/files?upload_id=", m.addr);
    assert!(upload_url.starts_with(&prefix), "{upload_url}");
    assert!(upload_url.ends_with("&upload_protocol=resumable"));

    // Chunks carry no API key, as python-genai sends them.
    let chunk = |cmd: &'static str, offset: u64, data: &'static str| {
        c.post(&upload_url)
            .header("x-goog-upload-command", cmd)
            .header("x-goog-upload-offset", offset.to_string())
            .body(data)
            .send()
    };
    let r = chunk("upload", 0, "hello").await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-goog-upload-status"], "active");
    assert!(r.bytes().await?.is_empty());
    let r = chunk("upload", 3, "lo").await?;
    assert_eq!(r.status(), 400);
    assert!(r.headers()[CONTENT_TYPE].to_str()?.starts_with("text/plain"));
    let r = chunk("upload, finalize", 5, " world").await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-goog-upload-status"], "final");
    let v: Value = r.json().await?;
    let f = &v["file"];
    assert_eq!(f["sizeBytes"], "11");
    assert_eq!(f["mimeType"], "text/plain");
    assert_eq!(f["displayName"], "notes");
    assert_eq!(f["state"], "ACTIVE");
    assert_eq!(f["source"], "UPLOADED");
    let name = f["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("files/"));
    let uri = format!("http://{}/v1beta/{name}", m.addr);
    assert_eq!(f["uri"], uri.as_str());
    assert_eq!(stat(&m, |s| &s.upload_bytes), 11);

    // The session is gone after finalize.
    let r = chunk("upload", 11, "x").await?;
    assert_eq!(r.status(), 404);
    assert!(r.headers()[CONTENT_TYPE].to_str()?.starts_with("text/plain"));

    // The URL names the host the client used.
    let start = c
        .post(url(&m, "/upload/v1beta/files"))
        .header("host", "gateway.example:8080")
        .header("x-goog-api-key", "k")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .send()
        .await?;
    let u = start.headers()["x-goog-upload-url"].to_str()?;
    assert!(u.starts_with("http://gateway.example:8080/upload/v1beta/files?upload_id="));
    // Start needs a key.
    let r = c
        .post(url(&m, "/upload/v1beta/files"))
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    Ok(())
}

fn gunzip(b: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b).read_to_end(&mut out)?;
    Ok(out)
}

#[tokio::test]
async fn gzip_by_google_rule_and_by_model() -> TestResult {
    let opts = MockOptions {
        chunk_interval: Duration::from_millis(30),
        ..MockOptions::default()
    };
    let m = mock(opts).await?;
    let raw = reqwest::Client::builder().no_gzip().build()?;
    let send = |path: String, ua: &'static str| {
        raw.post(url(&m, &path))
            .header("x-goog-api-key", "k")
            .header("accept-encoding", "gzip")
            .header("user-agent", ua)
            .body(BODY40)
            .send()
    };

    // Unary: gzip only when the UA says gzip too.
    let r = send(format!("{FLASH}:generateContent"), "my-app (gzip)").await?;
    assert_eq!(r.headers()[CONTENT_ENCODING], "gzip");
    let v: Value = serde_json::from_slice(&gunzip(&r.bytes().await?)?)?;
    assert_eq!(v["usageMetadata"]["totalTokenCount"], 25);
    let r = send(format!("{FLASH}:generateContent"), "my-app").await?;
    assert!(r.headers().get(CONTENT_ENCODING).is_none());
    serde_json::from_slice::<Value>(&r.bytes().await?)?;

    // SSE: every frame decodes on arrival (sync flush), so the stream still streams.
    let r = send(format!("{FLASH}:streamGenerateContent?alt=sse"), "x gzip").await?;
    assert_eq!(r.headers()[CONTENT_ENCODING], "gzip");
    let fr = frames(r).await?;
    assert_eq!(fr.len(), 5);
    let mut dec = flate2::write::GzDecoder::new(Vec::new());
    for (i, f) in fr.iter().enumerate() {
        dec.write_all(f)?;
        dec.flush()?;
        let so_far = text(dec.get_ref());
        assert_eq!(so_far.matches("\r\n\r\n").count(), i + 1, "event {i} decodable at once");
    }
    let all = dec.finish()?;
    assert_eq!(sse_shape(&all).usage_on, vec![true; 5]);

    // gzip-always, with reqwest decoding transparently.
    let r = reqwest::Client::new()
        .post(url(&m, "/v1beta/models/gzip-always:streamGenerateContent"))
        .header("x-goog-api-key", "k")
        .body(BODY40)
        .send()
        .await?;
    assert_eq!(array_shape(&r.bytes().await?).elements, 5);
    let r = raw
        .post(url(&m, "/v1beta/models/gzip-always:generateContent"))
        .header("x-goog-api-key", "k")
        .send()
        .await?;
    assert_eq!(r.headers()[CONTENT_ENCODING], "gzip");
    serde_json::from_slice::<Value>(&gunzip(&r.bytes().await?)?)?;
    Ok(())
}

#[tokio::test]
async fn h2c_prior_knowledge() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let r = c
        .post(url(&m, &format!("{FLASH}:streamGenerateContent?alt=sse")))
        .header("x-goog-api-key", "k")
        .body(BODY40)
        .send()
        .await?;
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(sse_shape(&r.bytes().await?).usage_on.len(), 5);
    let r = c
        .post(url(&m, "/upload/v1beta/files"))
        .header("x-goog-api-key", "k")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .send()
        .await?;
    let u = r.headers()["x-goog-upload-url"].to_str()?;
    assert!(u.starts_with(&format!("http://{}/upload/", m.addr)), "{u}");

    // A cut stream fails the h2 stream; a dropped h2 stream cancels the body.
    let r = c
        .post(url(&m, "/v1beta/models/cut:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", "k")
        .send()
        .await?;
    assert!(r.bytes().await.is_err());
    let mut r = c
        .post(url(&m, "/v1beta/models/slow:streamGenerateContent?alt=sse"))
        .header("x-goog-api-key", "k")
        .send()
        .await?;
    assert!(r.chunk().await?.is_some());
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&m, |s| &s.streams_cancelled) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stat(&m, |s| &s.streams_cancelled), 1);
    assert_eq!(stat(&m, |s| &s.streams_completed), 1);
    Ok(())
}

#[tokio::test]
async fn ttfb_and_chunk_count_options() -> TestResult {
    let opts = MockOptions {
        ttfb: Duration::from_millis(150),
        chunks: 2,
        ..MockOptions::default()
    };
    let m = mock(opts).await?;
    let t0 = Instant::now();
    let r = post(&m, &format!("{FLASH}:streamGenerateContent?alt=sse"), BODY40).await?;
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert_eq!(sse_shape(&r.bytes().await?).usage_on.len(), 2);
    let v: Value = post(&m, &format!("{FLASH}:generateContent"), BODY40)
        .await?
        .json()
        .await?;
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 6);
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_the_listener() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let addr = m.addr;
    m.shutdown();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "listener still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn serve_runs_on_a_bound_listener() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, MockOptions::default()));
    let r = reqwest::Client::new()
        .post(format!("http://{addr}{FLASH}:generateContent"))
        .header("x-goog-api-key", "k")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    task.abort();
    Ok(())
}

/// Raw speed: `cargo test --release -- --ignored --nocapture bench_unary`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_unary() -> TestResult {
    const TOTAL: usize = 20_000;
    const CONCURRENCY: usize = 64;
    let m = mock(MockOptions::default()).await?;
    let target = url(&m, &format!("{FLASH}:generateContent"));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            for _ in 0..TOTAL / CONCURRENCY {
                let r = c
                    .post(&target)
                    .header("x-goog-api-key", "k")
                    .body(BODY40)
                    .send()
                    .await?;
                r.bytes().await?;
            }
            Ok::<_, reqwest::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = (TOTAL / CONCURRENCY) * CONCURRENCY;
    let secs = t0.elapsed().as_secs_f64();
    println!("bench_unary: {n} requests in {secs:.2}s = {:.0} req/s", n as f64 / secs);
    assert_eq!(stat(&m, |s| &s.generate_requests), n as u64);
    Ok(())
}

/// Raw speed with a minimal keep-alive HTTP/1.1 client (reqwest costs more than the mock):
/// `cargo test --release -- --ignored --nocapture bench_unary_raw`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_unary_raw() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOTAL: usize = 100_000;
    const CONCURRENCY: usize = 64;
    let m = mock(MockOptions::default()).await?;
    let request = format!(
        "POST {FLASH}:generateContent HTTP/1.1\r\nhost: {}\r\nx-goog-api-key: k\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY40}",
        m.addr,
        BODY40.len()
    );
    let request = Arc::new(request.into_bytes());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let request = request.clone();
        let addr = m.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(4096);
            for _ in 0..TOTAL / CONCURRENCY {
                s.write_all(&request).await?;
                buf.clear();
                // Read headers, then exactly content-length bytes.
                let (head_end, len) = loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await?;
                    assert!(n > 0, "server closed");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = text(&buf[..i]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .expect("content-length");
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await?;
                    assert!(n > 0, "server closed");
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Ok::<_, io::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = (TOTAL / CONCURRENCY) * CONCURRENCY;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "bench_unary_raw: {n} requests in {secs:.2}s = {:.0} req/s",
        n as f64 / secs
    );
    assert_eq!(stat(&m, |s| &s.generate_requests), n as u64);
    Ok(())
}
