//! The stateful resources over real sockets: files, cachedContents, batches and the request
//! log (create, get, list paging, empty list `{}`, delete, the exact error of a missing one).

use super::*;

/// A keyed client of one mock.
pub(super) struct Api<'a> {
    m: &'a MockServer,
    c: reqwest::Client,
}

impl<'a> Api<'a> {
    pub(super) fn new(m: &'a MockServer) -> Self {
        Api {
            m,
            c: reqwest::Client::new(),
        }
    }

    pub(super) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> reqwest::Result<(u16, String)> {
        let mut rb = self
            .c
            .request(method, url(self.m, path))
            .header("x-goog-api-key", "AIzaTEST");
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b.to_owned());
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    pub(super) async fn get(&self, path: &str) -> reqwest::Result<(u16, String)> {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub(super) async fn post(&self, path: &str, body: &str) -> reqwest::Result<(u16, String)> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub(super) async fn delete(&self, path: &str) -> reqwest::Result<(u16, String)> {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    pub(super) async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let (status, text) = self.send(method, path, body).await?;
        assert_eq!(status, 200, "{path}: {text}");
        Ok(serde_json::from_str(&text)?)
    }

    /// A single-shot upload; returns the file object.
    pub(super) async fn upload(
        &self,
        name: &str,
        mime: &str,
        data: &'static [u8],
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let r = self
            .c
            .post(url(self.m, "/upload/v1beta/files"))
            .header("x-goog-api-key", "AIzaTEST")
            .header("x-goog-upload-command", "upload, finalize")
            .header("x-goog-upload-offset", "0")
            .header("x-goog-upload-file-name", name)
            .header("x-goog-upload-header-content-type", mime)
            .body(data)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-goog-upload-status"], "final");
        let v: Value = r.json().await?;
        Ok(v["file"].clone())
    }
}

pub(super) fn error_body(code: u16, message: &str, status: &str) -> String {
    format!(
        "{{\n  \"error\": {{\n    \"code\": {code},\n    \"message\": \"{message}\",\n    \"status\": \"{status}\"\n  }}\n}}"
    )
}

pub(super) fn names(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Walks every page of a list with `pageSize`, returning the names in order and the number
/// of pages.
pub(super) async fn walk(
    api: &Api<'_>,
    path: &str,
    field: &str,
    size: usize,
) -> Result<(Vec<String>, usize), Box<dyn std::error::Error + Send + Sync>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let p = match &token {
            Some(t) => format!("{path}?pageSize={size}&pageToken={t}"),
            None => format!("{path}?pageSize={size}"),
        };
        let v = api.json(reqwest::Method::GET, &p, None).await?;
        pages += 1;
        let page = names(&v, field);
        assert!(page.len() <= size);
        out.extend(page);
        match v["nextPageToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok((out, pages)),
        }
    }
}

#[tokio::test]
async fn files_are_real() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    // Empty list is exactly `{}`, under any version.
    for v in ["v1beta", "v1", "v1alpha"] {
        assert_eq!(api.get(&format!("/{v}/files")).await?, (200, "{}".to_owned()));
    }

    let f = api.upload("hello.txt", "text/plain", b"hello world").await?;
    let name = f["name"].as_str().unwrap_or_default().to_owned();
    let id = name.strip_prefix("files/").unwrap_or_default().to_owned();
    assert!(
        id.len() == 12 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert_eq!(f["displayName"], "hello.txt");
    assert_eq!(f["mimeType"], "text/plain");
    assert_eq!(f["sizeBytes"], "11");
    // base64 of the hex sha256 of "hello world".
    assert_eq!(
        f["sha256Hash"],
        "Yjk0ZDI3Yjk5MzRkM2UwOGE1MmU1MmQ3ZGE3ZGFiZmFjNDg0ZWZlMzdhNTM4MGVlOTA4OGY3YWNlMmVmY2RlOQ=="
    );
    assert_eq!(f["uri"], format!("http://{}/v1beta/{name}", m.addr).as_str());
    let keys: Vec<&str> = f
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for k in ["createTime", "updateTime", "expirationTime", "state", "source"] {
        assert!(keys.contains(&k), "{k} missing");
    }

    // get, download (any version), content type of the file.
    let (status, text) = api.get(&format!("/v1/{name}")).await?;
    assert_eq!(status, 200);
    assert!(text.starts_with("{\n  \"name\": "), "pretty: {text}");
    assert_eq!(serde_json::from_str::<Value>(&text)?, f);
    let r = reqwest::Client::new()
        .get(url(&m, &format!("/v1beta/{name}:download?alt=media")))
        .header("x-goog-api-key", "k")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "text/plain");
    assert_eq!(r.bytes().await?.as_ref(), b"hello world");

    // The key is required like everywhere else.
    let r = reqwest::Client::new()
        .get(url(&m, &format!("/v1beta/{name}")))
        .send()
        .await?;
    assert_eq!(r.status(), 403);

    // Paging: newest first, 10 by default, pageSize honoured, every file exactly once.
    for i in 0..11 {
        let n: &'static str = Box::leak(format!("f{i}").into_boxed_str());
        api.upload(n, "text/plain", b"x").await?;
    }
    let v = api.json(reqwest::Method::GET, "/v1beta/files", None).await?;
    let first = names(&v, "files");
    assert_eq!(first.len(), 10);
    assert!(v["nextPageToken"].is_string());
    let newest = api
        .json(reqwest::Method::GET, &format!("/v1beta/{}", first[0]), None)
        .await?;
    assert_eq!(newest["displayName"], "f10");
    let (all, pages) = walk(&api, "/v1beta/files", "files", 5).await?;
    assert_eq!((all.len(), pages), (12, 3));
    assert_eq!(all.last(), Some(&name));
    assert_eq!(all[..10], first[..]);
    let (all, pages) = walk(&api, "/v1beta/files", "files", 500).await?;
    assert_eq!((all.len(), pages), (12, 1));
    assert_eq!(api.get("/v1beta/files?pageToken=bogus").await?.0, 400);

    // delete, then every call on it is Google's 403.
    assert_eq!(api.delete(&format!("/v1beta/{name}")).await?, (200, "{}".to_owned()));
    let missing = error_body(
        403,
        &format!("You do not have permission to access the File {id} or it may not exist."),
        "PERMISSION_DENIED",
    );
    assert_eq!(api.get(&format!("/v1beta/{name}")).await?, (403, missing.clone()));
    assert_eq!(api.delete(&format!("/v1beta/{name}")).await?, (403, missing.clone()));
    assert_eq!(
        api.get(&format!("/v1beta/{name}:download?alt=media")).await?,
        (403, missing)
    );
    Ok(())
}

#[tokio::test]
async fn resumable_upload_makes_a_downloadable_file() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::new();
    let start = c
        .post(url(&m, "/upload/v1beta/files"))
        .header("x-goog-api-key", "k")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("x-goog-upload-header-content-type", "application/pdf")
        .body(r#"{"file": {"displayName": "report"}}"#)
        .send()
        .await?;
    let upload_url = start.headers()["x-goog-upload-url"].to_str()?.to_owned();
    for (cmd, offset, body) in [("upload", 0, "%PDF-"), ("upload, finalize", 5, "1.7")] {
        let r = c
            .post(&upload_url)
            .header("x-goog-upload-command", cmd)
            .header("x-goog-upload-offset", offset.to_string())
            .body(body)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        if cmd.ends_with("finalize") {
            let v: Value = r.json().await?;
            let name = v["file"]["name"].as_str().unwrap_or_default().to_owned();
            let api = Api::new(&m);
            let got = api.json(reqwest::Method::GET, &format!("/v1beta/{name}"), None).await?;
            assert_eq!(got, v["file"]);
            assert_eq!(got["displayName"], "report");
            let (status, text) = api.get(&format!("/v1beta/{name}:download?alt=media")).await?;
            assert_eq!((status, text.as_str()), (200, "%PDF-1.7"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn cached_contents() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    assert_eq!(api.get("/v1beta/cachedContents").await?, (200, "{}".to_owned()));

    let body = r#"{"model":"models/gemini-2.5-flash","displayName":"doc","ttl":"3600s","contents":[{"role":"user","parts":[{"text":"a long document"}]}]}"#;
    let (status, text) = api.post("/v1beta/cachedContents", body).await?;
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("{\n  \"name\": \"cachedContents/"), "{text}");
    let c: Value = serde_json::from_str(&text)?;
    // Wire order of the keys.
    let at = |k: &str| text.find(&format!("\"{k}\": ")).unwrap_or(usize::MAX);
    let order = [
        "name",
        "model",
        "displayName",
        "createTime",
        "updateTime",
        "expireTime",
        "usageMetadata",
    ];
    assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
    assert_eq!(c["model"], "models/gemini-2.5-flash");
    assert_eq!(c["displayName"], "doc");
    assert_eq!(c["usageMetadata"]["totalTokenCount"], body.len().div_ceil(4) as u64);
    let name = c["name"].as_str().unwrap_or_default().to_owned();
    let create = caches::parse_rfc3339(c["createTime"].as_str().unwrap_or_default()).unwrap_or_default();
    let expire = caches::parse_rfc3339(c["expireTime"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(expire.0 - create.0, 3600);

    assert_eq!(api.json(reqwest::Method::GET, &format!("/v1/{name}"), None).await?, c);
    let patched = api
        .json(
            reqwest::Method::PATCH,
            &format!("/v1beta/{name}"),
            Some(r#"{"ttl":"7200s"}"#),
        )
        .await?;
    let expire2 = caches::parse_rfc3339(patched["expireTime"].as_str().unwrap_or_default()).unwrap_or_default();
    assert!(expire2.0 >= create.0 + 7200, "{patched}");
    let patched = api
        .json(
            reqwest::Method::PATCH,
            &format!("/v1beta/{name}"),
            Some(r#"{"expireTime":"2099-01-02T03:04:05Z"}"#),
        )
        .await?;
    assert_eq!(patched["expireTime"], "2099-01-02T03:04:05.000000Z");
    assert_eq!(
        api.json(reqwest::Method::GET, &format!("/v1beta/{name}"), None).await?,
        patched
    );
    assert_eq!(
        api.send(reqwest::Method::PATCH, &format!("/v1beta/{name}"), Some("{}"))
            .await?
            .0,
        400
    );

    // Bad input is 400; an expireTime in the past makes a cache that is already gone.
    assert_eq!(api.post("/v1beta/cachedContents", r#"{"ttl":"60s"}"#).await?.0, 400);
    assert_eq!(
        api.post("/v1beta/cachedContents", r#"{"model":"models/m","ttl":"soon"}"#)
            .await?
            .0,
        400
    );

    for i in 0..4 {
        let b = format!(r#"{{"model":"gemini-2.5-flash","displayName":"c{i}"}}"#);
        api.post("/v1beta/cachedContents", &b).await?;
    }
    let (all, pages) = walk(&api, "/v1beta/cachedContents", "cachedContents", 2).await?;
    assert_eq!((all.len(), pages), (5, 3));
    assert_eq!(all.last(), Some(&name));

    assert_eq!(api.delete(&format!("/v1beta/{name}")).await?, (200, "{}".to_owned()));
    let missing = error_body(
        403,
        "CachedContent not found (or permission denied)",
        "PERMISSION_DENIED",
    );
    assert_eq!(api.get(&format!("/v1beta/{name}")).await?, (403, missing.clone()));
    assert_eq!(api.delete(&format!("/v1beta/{name}")).await?, (403, missing.clone()));
    assert_eq!(
        api.send(
            reqwest::Method::PATCH,
            &format!("/v1beta/{name}"),
            Some(r#"{"ttl":"1s"}"#)
        )
        .await?,
        (403, missing)
    );
    Ok(())
}

const BATCH: &str = r#"{"batch":{"displayName":"nightly","inputConfig":{"requests":{"requests":[
  {"request":{"contents":[{"parts":[{"text":"hi"}]}]},"metadata":{"key":"a"}},
  {"request":{"contents":[{"parts":[{"text":"hello there"}]}],"generationConfig":{"maxOutputTokens":4}},"metadata":{"key":"b"}}
]}}}}"#;

#[tokio::test]
async fn batches_advance_and_answer_usage() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    assert_eq!(api.get("/v1beta/batches").await?, (200, "{}".to_owned()));

    let b = api
        .json(
            reqwest::Method::POST,
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            Some(BATCH),
        )
        .await?;
    let name = b["name"].as_str().unwrap_or_default().to_owned();
    assert!(name.starts_with("batches/"));
    let md = &b["metadata"];
    assert_eq!(
        md["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
    );
    assert_eq!(md["model"], "models/gemini-2.5-flash");
    assert_eq!(md["displayName"], "nightly");
    assert_eq!(md["state"], "BATCH_STATE_PENDING");
    assert_eq!(md["name"], name.as_str());
    assert_eq!(
        md["batchStats"],
        serde_json::json!({"requestCount": "2", "pendingRequestCount": "2"})
    );
    assert!(b.get("done").is_none() && b.get("response").is_none());

    let r1 = api.json(reqwest::Method::GET, &format!("/v1beta/{name}"), None).await?;
    assert_eq!(r1["metadata"]["state"], "BATCH_STATE_RUNNING");
    assert!(r1.get("done").is_none());
    let r2 = api.json(reqwest::Method::GET, &format!("/v1/{name}"), None).await?;
    assert_eq!(r2["metadata"]["state"], "BATCH_STATE_SUCCEEDED");
    assert_eq!(r2["done"], true);
    let resp = &r2["response"];
    assert_eq!(
        resp["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
    );
    let items = resp["inlinedResponses"]["inlinedResponses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(items.len(), 2);
    // Usage by the mock's rule over each request's compact JSON.
    let req_a = r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;
    let u = &items[0]["response"]["usageMetadata"];
    assert_eq!(u["promptTokenCount"], req_a.len().div_ceil(4) as u64);
    assert_eq!(u["candidatesTokenCount"], 15);
    assert_eq!(items[0]["metadata"]["key"], "a");
    assert!(items[0]["response"]["candidates"][0]["content"]["parts"][0]["text"].is_string());
    let req_b = r#"{"contents":[{"parts":[{"text":"hello there"}]}],"generationConfig":{"maxOutputTokens":4}}"#;
    let u = &items[1]["response"]["usageMetadata"];
    assert_eq!(u["promptTokenCount"], req_b.len().div_ceil(4) as u64);
    assert_eq!(u["candidatesTokenCount"], 4);
    assert_eq!(items[1]["metadata"]["key"], "b");
    // The output is mirrored in the metadata (without @type).
    assert_eq!(r2["metadata"]["output"]["inlinedResponses"], resp["inlinedResponses"]);
    assert_eq!(r2["metadata"]["batchStats"]["successfulRequestCount"], "2");
    // Later gets stay succeeded.
    let r3 = api.json(reqwest::Method::GET, &format!("/v1beta/{name}"), None).await?;
    assert_eq!(r3["metadata"]["state"], "BATCH_STATE_SUCCEEDED");

    // cancel: `{}` and CANCELLED (done, no response).
    let other = api
        .json(
            reqwest::Method::POST,
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            Some(BATCH),
        )
        .await?;
    let other = other["name"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        api.post(&format!("/v1beta/{other}:cancel"), "").await?,
        (200, "{}".to_owned())
    );
    let c = api
        .json(reqwest::Method::GET, &format!("/v1beta/{other}"), None)
        .await?;
    assert_eq!(c["metadata"]["state"], "BATCH_STATE_CANCELLED");
    assert_eq!(c["done"], true);
    assert!(c.get("response").is_none());

    // list (operations), paging, delete, missing.
    for _ in 0..3 {
        api.post("/v1beta/models/gemini-2.5-flash:batchGenerateContent", BATCH)
            .await?;
    }
    let (all, pages) = walk(&api, "/v1beta/batches", "operations", 2).await?;
    assert_eq!((all.len(), pages), (5, 3));
    assert_eq!(all.last(), Some(&name));
    assert_eq!(api.delete(&format!("/v1beta/{name}")).await?, (200, "{}".to_owned()));
    let missing = error_body(404, "Requested entity was not found.", "NOT_FOUND");
    assert_eq!(api.get(&format!("/v1beta/{name}")).await?, (404, missing.clone()));
    assert_eq!(api.delete(&format!("/v1beta/{name}")).await?, (404, missing.clone()));
    assert_eq!(api.post(&format!("/v1beta/{name}:cancel"), "").await?, (404, missing));

    // Bad bodies are 400.
    for bad in ["", "{}", r#"{"batch":{}}"#, "not json"] {
        let (status, _) = api
            .post("/v1beta/models/gemini-2.5-flash:batchGenerateContent", bad)
            .await?;
        assert_eq!(status, 400, "{bad}");
    }
    Ok(())
}

#[tokio::test]
async fn file_batches_and_embed_batches() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    let jsonl: &'static [u8] = b"{\"key\":\"r1\",\"request\":{\"contents\":[{\"parts\":[{\"text\":\"hi\"}]}]}}\n{\"key\":\"r2\",\"request\":{\"contents\":[{\"parts\":[{\"text\":\"yo\"}]}]}}\n";
    let input = api.upload("in.jsonl", "application/jsonl", jsonl).await?;
    let body = format!(
        r#"{{"batch":{{"displayName":"f","inputConfig":{{"fileName":"{}"}}}}}}"#,
        input["name"].as_str().unwrap_or_default()
    );
    let b = api
        .json(
            reqwest::Method::POST,
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            Some(&body),
        )
        .await?;
    assert_eq!(b["metadata"]["batchStats"]["requestCount"], "2");
    let name = b["name"].as_str().unwrap_or_default().to_owned();
    api.get(&format!("/v1beta/{name}")).await?;
    let done = api.json(reqwest::Method::GET, &format!("/v1beta/{name}"), None).await?;
    let out = done["response"]["responsesFile"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(out.starts_with("files/"), "{done}");
    assert_eq!(done["metadata"]["output"]["responsesFile"], out.as_str());
    let (status, text) = api.get(&format!("/v1beta/{out}:download?alt=media")).await?;
    assert_eq!(status, 200);
    let lines: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["key"], "r2");
    assert_eq!(lines[0]["response"]["usageMetadata"]["promptTokenCount"], 10);

    // A missing input file is the file's 403.
    let (status, _) = api
        .post(
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            r#"{"batch":{"inputConfig":{"fileName":"files/nope"}}}"#,
        )
        .await?;
    assert_eq!(status, 403);

    let embed = r#"{"batch":{"displayName":"e","inputConfig":{"requests":{"requests":[{"request":{"content":{"parts":[{"text":"x"}]}},"metadata":{"key":"k1"}}]}}}}"#;
    let e = api
        .json(
            reqwest::Method::POST,
            "/v1beta/models/gemini-embedding-001:asyncBatchEmbedContent",
            Some(embed),
        )
        .await?;
    assert_eq!(
        e["metadata"]["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1main.EmbedContentBatch"
    );
    let name = e["name"].as_str().unwrap_or_default().to_owned();
    api.get(&format!("/v1beta/{name}")).await?;
    let done = api.json(reqwest::Method::GET, &format!("/v1beta/{name}"), None).await?;
    let items = &done["response"]["inlinedEmbedContentResponses"]["inlinedResponses"];
    let values = items[0]["response"]["embedding"]["values"].as_array().map(Vec::len);
    assert_eq!(values, Some(8));
    assert_eq!(items[0]["metadata"]["key"], "k1");
    Ok(())
}

#[tokio::test]
async fn request_log() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let c = reqwest::Client::new();
    c.get(url(&m, "/v1beta/files/abc?key=AIzaSECRET&pageSize=3"))
        .send()
        .await?;
    post(&m, &format!("{FLASH}:generateContent"), BODY40).await?;
    c.get(url(&m, "/mock/stats")).send().await?;
    let v: Value = c.get(url(&m, "/mock/requests")).send().await?.json().await?;
    assert_eq!(
        v,
        serde_json::json!([
            {"method": "GET", "path": "/v1beta/files/abc", "query": "key=REDACTED&pageSize=3"},
            {"method": "POST", "path": "/v1beta/models/gemini-2.5-flash:generateContent", "query": ""},
        ])
    );
    c.post(url(&m, "/mock/reset")).send().await?;
    let v: Value = c.get(url(&m, "/mock/requests")).send().await?.json().await?;
    assert_eq!(v, serde_json::json!([]));
    Ok(())
}
