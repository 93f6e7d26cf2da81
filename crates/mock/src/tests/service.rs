//! Everything around the bodies: other routes, auth, failure injection, leaked gateway keys,
//! the counters, resumable uploads, gzip, h2c, the timing options and the server's lifecycle.

use super::*;

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
    // Tuned models are real now: an unknown one is 404 (more in tests/resources.rs).
    assert_eq!(get("/v1beta/tunedModels/my-tune").await?.status(), 404);
    assert_eq!(get("/v1beta/files").await?.text().await?, "{}");
    // Files are real now: an unknown one is Google's 403 (more in tests/resources.rs).
    assert_eq!(get("/v1beta/files/abc123").await?.status(), 403);

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
