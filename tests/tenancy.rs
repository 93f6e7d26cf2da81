//! Tenancy (issue 13): two users behind one upstream key. Each sees, uses, changes and deletes
//! only what they created, through any route, key form or path spelling; anything else is
//! answered exactly like "not found" and never reaches the upstream. Methods outside the route
//! table never reach it either.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Harness;
use reqwest::Method;
use serde_json::{Value, json};

/// A price for the Veo model the tests start operations with, and a billable method not
/// metered yet, allowed unbilled.
const ALLOW: &str = r#"
[pricing.models."veo-3.0-generate-preview"]
per_second = "0.40"

[routes]
allow_unmetered = ["openai.images.generations", "POST interactions"]
"#;

/// The requests the mock received, as `METHOD path?query`.
async fn mock_log(h: &Harness) -> Vec<String> {
    let v: Value = reqwest::get(format!("http://{}/mock/requests", h.mock.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let q = r["query"].as_str().unwrap_or("");
            let sep = if q.is_empty() { "" } else { "?" };
            format!(
                "{} {}{sep}{q}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .collect()
}

async fn reset_mock_log(h: &Harness) {
    reqwest::Client::new()
        .post(format!("http://{}/mock/reset", h.mock.addr))
        .send()
        .await
        .unwrap();
}

/// A call with the key in the header; status and JSON body (`null` when not JSON).
async fn call(h: &Harness, key: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut rb = h.http.request(method, h.url(path)).header("x-goog-api-key", key);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Uploads a small file through the gateway (resumable, as the SDKs do); its name.
async fn upload(h: &Harness, key: &str, bytes: &[u8]) -> String {
    let c = &h.http;
    let r = c
        .post(h.url("/upload/v1beta/files"))
        .header("x-goog-api-key", key)
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header("X-Goog-Upload-Header-Content-Length", bytes.len().to_string())
        .header("X-Goog-Upload-Header-Content-Type", "text/plain")
        .json(&json!({"file": {"displayName": "notes"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let url = r.headers()["x-goog-upload-url"].to_str().unwrap().to_string();
    let r = c
        .post(&url)
        .header("X-Goog-Upload-Command", "upload, finalize")
        .header("X-Goog-Upload-Offset", "0")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["file"]["name"].as_str().unwrap().to_string()
}

async fn create_cache(h: &Harness, key: &str, text: &str) -> String {
    let (s, v) = call(
        h,
        key,
        Method::POST,
        "/v1beta/cachedContents",
        Some(json!({"model": "models/gemini-2.5-flash", "ttl": "3600s",
            "contents": [{"role": "user", "parts": [{"text": text}]}]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["name"].as_str().unwrap().to_string()
}

async fn create_batch(h: &Harness, key: &str) -> String {
    let (s, v) = call(
        h,
        key,
        Method::POST,
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        Some(
            json!({"batch": {"displayName": "b", "inputConfig": {"requests": {"requests": [
            {"request": {"contents": [{"parts": [{"text": "hi"}]}]}, "metadata": {"key": "r1"}}]}}}}),
        ),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["name"].as_str().unwrap().to_string()
}

/// Every spelling of a path a caller could try for `name` (an `x/y` resource name).
fn spellings(name: &str) -> Vec<String> {
    let (coll, id) = name.split_once('/').unwrap();
    vec![
        format!("/v1beta/{name}"),
        format!("/v1/{name}"),
        format!("/v1beta/{coll}%2F{id}"),
        format!("/v1beta/{coll}%2f{id}"),
        format!("/v1beta//{coll}//{id}"),
        format!("/v1beta/{coll}/{}", id.to_uppercase()),
        format!("/v1beta/{coll}/zz/../{id}"),
        format!("/v1beta/{coll}/%2E%2E/{coll}/{id}"),
        format!("/v1beta/{coll}/{id}/"),
        format!("/v1alpha/{name}?key=ignored"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_file_is_not_found_through_every_route_and_spelling() {
    let h = Harness::start(ALLOW).await;
    let alice = h.user_with_key("alice", "free").await;
    let bob = h.user_with_key("bob", "free").await;
    let name = upload(&h, &alice, b"alice's private notes").await;
    let id = name.strip_prefix("files/").unwrap();

    // Alice reads her own file.
    let (s, v) = call(&h, &alice, Method::GET, &format!("/v1beta/{name}"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], name);

    // What a file that never existed answers (same id length), for comparison.
    let never = format!("files/{}", "q".repeat(id.len()));
    let (ns, nv) = call(&h, &bob, Method::GET, &format!("/v1beta/{never}"), None).await;
    assert_eq!(ns, 403);
    assert_eq!(nv["error"]["status"], "PERMISSION_DENIED");

    reset_mock_log(&h).await;
    let lower = id.to_lowercase();
    let nid = &never[6..];
    for (path, npath) in spellings(&name).into_iter().zip(spellings(&never)) {
        for (method, suffix) in [
            (Method::GET, ""),
            (Method::DELETE, ""),
            (Method::GET, ":download?alt=media"),
        ] {
            let (p, np) = (format!("{path}{suffix}"), format!("{npath}{suffix}"));
            let (s, v) = call(&h, &bob, method.clone(), &p, None).await;
            assert!(s == 403 || s == 400, "{method} {p}: {s} {v}");
            // Indistinguishable from the same spelling of a file that never existed.
            let (ns, nv) = call(&h, &bob, method.clone(), &np, None).await;
            let norm = |v: &Value, id: &str| v.to_string().replace(id, "ID").replace(&id.to_uppercase(), "ID");
            assert_eq!((s, norm(&v, &lower)), (ns, norm(&nv, nid)), "{method} {p}");
        }
    }
    // Other key forms: ?key= and Bearer.
    let r = h
        .http
        .get(h.url(&format!("/v1beta/{name}?key={bob}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = h
        .http
        .get(h.url(&format!("/v1beta/{name}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let log = mock_log(&h).await;
    assert!(
        log.iter().all(|l| !l.to_lowercase().contains(&id.to_lowercase())),
        "bob's attempts reached the upstream: {log:?}"
    );

    // Lists: bob sees nothing (Gemini's empty answer is `{}`), alice sees her file.
    let (s, v) = call(&h, &bob, Method::GET, "/v1beta/files", None).await;
    assert_eq!((s, v), (200, json!({})));
    let (s, v) = call(&h, &alice, Method::GET, "/v1beta/files", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["files"].as_array().unwrap().len(), 1);
    assert_eq!(v["files"][0]["name"], name);

    // Alice deletes it; afterwards it is gone for her too.
    let (s, _) = call(&h, &alice, Method::DELETE, &format!("/v1beta/{name}"), None).await;
    assert_eq!(s, 200);
    let (s, _) = call(&h, &alice, Method::GET, &format!("/v1beta/{name}"), None).await;
    assert_eq!(s, 403);
    let (s, v) = call(&h, &alice, Method::GET, "/v1beta/files", None).await;
    assert_eq!((s, v), (200, json!({})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_to_another_users_resources_are_refused_before_the_upstream() {
    let h = Harness::start(ALLOW).await;
    let alice = h.user_with_key("alice", "free").await;
    let bob = h.user_with_key("bob", "free").await;
    let file = upload(&h, &alice, b"alice's data").await;
    let cache = create_cache(&h, &alice, "alice's long context").await;
    let id = file.strip_prefix("files/").unwrap();
    let full_uri = format!("https://generativelanguage.googleapis.com/v1beta/{file}");

    let with_file = |uri: &str| {
        json!({"contents": [{"role": "user", "parts": [
            {"text": "Summarise this."},
            {"fileData": {"mimeType": "text/plain", "fileUri": uri}}]}]})
    };
    // Alice may use her own file and cache.
    let (s, v) = call(
        &h,
        &alice,
        Method::POST,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        Some(with_file(&full_uri)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        &h,
        &alice,
        Method::POST,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        Some(json!({"cachedContent": cache, "contents": [{"parts": [{"text": "q"}]}]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    reset_mock_log(&h).await;
    let unary = "/v1beta/models/gemini-2.5-flash:generateContent";
    let stream = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    let count = "/v1beta/models/gemini-2.5-flash:countTokens";
    let upper = full_uri.replace("generativelanguage", "GenerativeLanguage");
    let cases: Vec<(&str, Value, u16)> = vec![
        (unary, with_file(&full_uri), 403),
        (unary, with_file(&file), 403),
        (unary, with_file(&upper), 403),
        (stream, with_file(&full_uri), 403),
        (count, with_file(&full_uri), 403),
        (
            unary,
            json!({"cachedContent": cache, "contents": [{"parts": [{"text": "q"}]}]}),
            403,
        ),
        (
            unary,
            json!({"cached_content": cache, "contents": [{"parts": [{"text": "q"}]}]}),
            403,
        ),
    ];
    for (path, body, want) in cases {
        let (s, v) = call(&h, &bob, Method::POST, path, Some(body.clone())).await;
        assert_eq!(s, want, "{path} {body}: {v}");
        assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    }
    // An escaped key is still the key (a JSON parser reads `file\u0055ri` as `fileUri`).
    let raw = format!(
        r#"{{"contents":[{{"parts":[{{"fileData":{{"mimeType":"text/plain","file\u0055ri":"{full_uri}"}}}}]}}]}}"#
    );
    let r = h
        .http
        .post(h.url(unary))
        .header("x-goog-api-key", &bob)
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A reference after a large inline part: the body streams, and is stopped at the reference.
    let big = "QUJD".repeat(200_000);
    let body = json!({"contents": [{"parts": [
        {"inlineData": {"mimeType": "application/octet-stream", "data": big}},
        {"fileData": {"mimeType": "text/plain", "fileUri": full_uri}}]}]});
    let log = mock_log(&h).await;
    assert!(log.is_empty(), "refused bodies reached the upstream: {log:?}");
    // Past the look-ahead the body streams, and is stopped at the reference: the upstream
    // gets no whole request (nor the reference), the caller the same refusal.
    let (s, v) = call(&h, &bob, Method::POST, unary, Some(body)).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");

    // Never existed and someone else's: the same answer.
    let (s1, v1) = call(&h, &bob, Method::POST, unary, Some(with_file("files/zzzzzzzzzzzz"))).await;
    let (s2, v2) = call(&h, &bob, Method::POST, unary, Some(with_file(&file))).await;
    assert_eq!(s1, s2);
    assert_eq!(
        v1["error"]["message"].as_str().unwrap().replace("zzzzzzzzzzzz", "ID"),
        v2["error"]["message"].as_str().unwrap().replace(id, "ID")
    );
    // Bob's message was given back: refused calls are not billed.
    let recs = h.records("bob").await;
    assert!(recs.iter().all(|r| r.messages == 0), "{recs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_through_the_callers_own_resources_only() {
    let h = Harness::start(ALLOW).await;
    let alice = h.user_with_key("alice", "free").await;
    let bob = h.user_with_key("bob", "free").await;
    let carol = h.user_with_key("carol", "free").await;
    let mut mine = Vec::new();
    let mut his = Vec::new();
    for i in 0..5 {
        mine.push(create_cache(&h, &alice, &format!("a{i}")).await);
        if i < 4 {
            his.push(create_cache(&h, &bob, &format!("b{i}")).await);
        }
    }
    let page = |key: String, token: Option<String>| {
        let h = &h;
        async move {
            let mut p = "/v1beta/cachedContents?pageSize=2".to_string();
            if let Some(t) = token {
                p.push_str(&format!("&pageToken={t}"));
            }
            let (s, v) = call(h, &key, Method::GET, &p, None).await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    let mut seen = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let v = page(alice.clone(), token.clone()).await;
        pages += 1;
        for c in v["cachedContents"].as_array().unwrap() {
            seen.push(c["name"].as_str().unwrap().to_string());
            assert!(c["usageMetadata"]["totalTokenCount"].as_u64().unwrap() > 0);
        }
        match v.get("nextPageToken") {
            Some(t) => token = Some(t.as_str().unwrap().to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    mine.reverse(); // newest first
    assert_eq!(seen, mine);
    let v = page(bob.clone(), None).await;
    let names: Vec<&str> = v["cachedContents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [his[3].as_str(), his[2].as_str()]);
    assert_eq!(page(carol.clone(), None).await, json!({}));
    // Another user's resource as a token: refused like any bad token.
    let forged = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mine[0])
    };
    let (s, _) = call(
        &h,
        &carol,
        Method::GET,
        &format!("/v1beta/cachedContents?pageToken={forged}"),
        None,
    )
    .await;
    assert_eq!(s, 400);
    let (s, v) = call(
        &h,
        &carol,
        Method::GET,
        "/v1beta/cachedContents?pageToken=nonsense",
        None,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // Bob cannot read, extend or delete alice's cache.
    for (m, body) in [(Method::GET, None), (Method::DELETE, None)] {
        let (s, v) = call(&h, &bob, m, &format!("/v1beta/{}", mine[0]), body).await;
        assert_eq!(s, 403, "{v}");
        assert_eq!(v["error"]["message"], "CachedContent not found (or permission denied)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_operations_belong_to_their_creator() {
    let h = Harness::start(ALLOW).await;
    let alice = h.user_with_key("alice", "unlimited").await;
    let bob = h.user_with_key("bob", "free").await;
    let batch = create_batch(&h, &alice).await;
    assert!(batch.starts_with("batches/"), "{batch}");
    let (s, v) = call(
        &h,
        &alice,
        Method::POST,
        "/v1beta/models/veo-3.0-generate-preview:predictLongRunning",
        Some(json!({"instances": [{"prompt": "a cat"}]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let op = v["name"].as_str().unwrap().to_string();

    reset_mock_log(&h).await;
    let never = |n: &str| format!("{}/{}", n.rsplit_once('/').unwrap().0, "nosuchthing1");
    for name in [&batch, &op] {
        let (ns, nv) = call(&h, &bob, Method::GET, &format!("/v1beta/{}", never(name)), None).await;
        assert_eq!(ns, 404);
        for (m, suffix) in [(Method::GET, ""), (Method::POST, ":cancel"), (Method::DELETE, "")] {
            let (s, v) = call(&h, &bob, m.clone(), &format!("/v1beta/{name}{suffix}"), None).await;
            if name == &op && (!suffix.is_empty() || m == Method::DELETE) {
                // Operations of a model can only be read: other methods are not in the table.
                assert_eq!(s, 403, "{v}");
                continue;
            }
            assert_eq!((s, &v), (ns, &nv), "{m} {name}{suffix}");
        }
    }
    assert!(mock_log(&h).await.is_empty());
    let (s, v) = call(&h, &bob, Method::GET, "/v1beta/batches", None).await;
    assert_eq!((s, v), (200, json!({})));
    let (s, v) = call(&h, &alice, Method::GET, "/v1beta/batches", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["operations"][0]["name"], batch);
    let (s, _) = call(&h, &alice, Method::GET, &format!("/v1beta/{batch}"), None).await;
    assert_eq!(s, 200);
    // Alice polls her video operation until it is done; the video file it produced becomes
    // hers (she can download it), not bob's.
    let mut video = None;
    for _ in 0..5 {
        let (s, v) = call(&h, &alice, Method::GET, &format!("/v1beta/{op}"), None).await;
        assert_eq!(s, 200, "{v}");
        if v["done"] == true {
            let uri = v
                .pointer("/response/generateVideoResponse/generatedSamples/0/video/uri")
                .unwrap();
            video = Some(uri.as_str().unwrap().to_string());
            break;
        }
    }
    let uri = video.expect("the operation finishes");
    let file = uri
        .split("/v1beta/")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let (s, _) = call(
        &h,
        &alice,
        Method::GET,
        &format!("/v1beta/{file}:download?alt=media"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &h,
        &bob,
        Method::GET,
        &format!("/v1beta/{file}:download?alt=media"),
        None,
    )
    .await;
    assert_eq!(s, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_outside_the_table_and_unmetered_billable_ones_never_reach_the_upstream() {
    let h = Harness::start("").await;
    let key = h.user_with_key("alice", "free").await;
    reset_mock_log(&h).await;
    let m = "/v1beta/models";
    let cases: Vec<(Method, String, &str)> = vec![
        (
            Method::POST,
            format!("{m}/text-embedding-004:asyncBatchEmbedContent"),
            "models.asyncBatchEmbedContent",
        ),
        (
            Method::POST,
            "/v1beta/openai/images/generations".into(),
            "openai.images.generations",
        ),
        (Method::POST, "/v1beta/interactions".into(), "POST /v1beta/interactions"),
        (
            Method::POST,
            "/v1beta/files:register".into(),
            "POST /v1beta/files:register",
        ),
        (
            Method::GET,
            "/v1beta/tunedModels/x/permissions".into(),
            "GET /v1beta/tunedModels/x/permissions",
        ),
        (Method::PUT, "/v1beta/files/abc".into(), "PUT /v1beta/files/abc"),
        (Method::GET, "/v1beta/FILES".into(), "GET /v1beta/FILES"),
        (
            Method::GET,
            "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent".into(),
            "Live API",
        ),
    ];
    for (method, path, names) in cases {
        let (s, v) = call(
            &h,
            &key,
            method.clone(),
            &path,
            Some(json!({"content": {"parts": [{"text": "x"}]}})),
        )
        .await;
        assert_eq!(s, 403, "{method} {path}: {v}");
        assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("This method is not available through this gateway"),
            "{msg}"
        );
        assert!(msg.contains(names), "{msg} should name {names}");
    }
    assert!(mock_log(&h).await.is_empty(), "refused methods reached the upstream");
    // The free methods still pass.
    let (s, _) = call(&h, &key, Method::GET, "/v1beta/models", None).await;
    assert_eq!(s, 200);
    // allow_unmetered opens a method (unbilled) after a reload.
    h.write_config_extra(ALLOW);
    let r = h.admin(Method::POST, "/admin/reload").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .http
        .post(h.url("/v1beta/openai/images/generations"))
        .bearer_auth(&key)
        .json(&json!({"model": "imagen-3.0-generate-002", "prompt": "a cat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_survives_a_restart_and_deleted_users_resources_go_to_the_operator() {
    let h = Harness::start(ALLOW).await;
    let alice = h.user_with_key("alice", "free").await;
    let bob = h.user_with_key("bob", "free").await;
    let file = upload(&h, &alice, b"kept").await;
    let cache = create_cache(&h, &alice, "kept too").await;
    let h = h.reopen(&[]).await;
    let (s, _) = call(&h, &alice, Method::GET, &format!("/v1beta/{file}"), None).await;
    assert_eq!(s, 200);
    let (s, _) = call(&h, &bob, Method::GET, &format!("/v1beta/{file}"), None).await;
    assert_eq!(s, 403);

    let r = h
        .admin(Method::GET, "/admin/resources?user=alice")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let names: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [cache.as_str(), file.as_str()]);

    // Deleting alice lists her resources; they stay for the operator.
    let r = h.admin(Method::DELETE, "/admin/users/alice").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resources"].as_array().unwrap().len(), 2, "{v}");
    let r = h
        .admin(Method::DELETE, &format!("/admin/resources/{file}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(
        mock_log(&h)
            .await
            .iter()
            .any(|l| l == &format!("DELETE /v1beta/{file}"))
    );

    // A resource created outside the gateway has no owner: only the admin API shows it, and
    // an admin can give it to someone.
    let up = reqwest::Client::new()
        .post(format!("http://{}/v1beta/cachedContents", h.mock.addr))
        .header("x-goog-api-key", common::UPSTREAM_KEY)
        .json(&json!({"model": "models/gemini-2.5-flash"}))
        .send()
        .await
        .unwrap();
    let orphan: Value = up.json().await.unwrap();
    let orphan = orphan["name"].as_str().unwrap().to_string();
    let (s, _) = call(&h, &bob, Method::GET, &format!("/v1beta/{orphan}"), None).await;
    assert_eq!(s, 403);
    let r = h
        .admin(Method::GET, "/admin/resources?unowned=true&kind=cachedContents")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let unowned: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(unowned, [orphan.as_str()], "{v}");
    let r = h
        .admin(Method::PUT, &format!("/admin/resources/{orphan}"))
        .json(&json!({"user": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = call(&h, &bob, Method::GET, &format!("/v1beta/{orphan}"), None).await;
    assert_eq!(s, 200);
}

/// One step of the property test: who calls, what, and on which of the names created so far.
#[derive(Debug, Clone)]
enum Step {
    Upload(usize),
    Cache(usize),
    Batch(usize),
    Get(usize, usize),
    Delete(usize, usize),
    List(usize, usize),
    Refer(usize, usize),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let who = 0usize..2;
    prop_oneof![
        who.clone().prop_map(Step::Upload),
        who.clone().prop_map(Step::Cache),
        who.clone().prop_map(Step::Batch),
        (who.clone(), 0usize..16).prop_map(|(w, i)| Step::Get(w, i)),
        (who.clone(), 0usize..16).prop_map(|(w, i)| Step::Delete(w, i)),
        (who.clone(), 0usize..3).prop_map(|(w, k)| Step::List(w, k)),
        (who, 0usize..16).prop_map(|(w, i)| Step::Refer(w, i)),
    ]
}

/// Runs `steps` by two users; every answer to one user is checked for the other's names (those
/// the caller did not name in the request itself).
async fn run_steps(steps: Vec<Step>) {
    let h = Harness::start(ALLOW).await;
    let keys = [
        h.user_with_key("alice", "free").await,
        h.user_with_key("bob", "free").await,
    ];
    let mut created: Vec<(usize, String)> = Vec::new();
    for st in steps {
        let pick = |i: usize| created.get(i % created.len().max(1)).cloned();
        let (who, asked, answer): (usize, String, String) = match st {
            Step::Upload(w) => {
                let n = upload(&h, &keys[w], b"data").await;
                created.push((w, n.clone()));
                (w, n.clone(), n)
            }
            Step::Cache(w) => {
                let n = create_cache(&h, &keys[w], "ctx").await;
                created.push((w, n.clone()));
                (w, n.clone(), n)
            }
            Step::Batch(w) => {
                let n = create_batch(&h, &keys[w]).await;
                created.push((w, n.clone()));
                (w, n.clone(), n)
            }
            Step::Get(w, i) | Step::Delete(w, i) => {
                let Some((owner, n)) = pick(i) else { continue };
                let m = if matches!(st, Step::Get(..)) {
                    Method::GET
                } else {
                    Method::DELETE
                };
                let (s, v) = call(&h, &keys[w], m, &format!("/v1beta/{n}"), None).await;
                assert!(s == 200 || s == 403 || s == 404, "{s} {v}");
                assert!(owner == w || s != 200, "user {w} reached {n} of user {owner}: {v}");
                (w, n, v.to_string())
            }
            Step::List(w, k) => {
                let coll = ["files", "cachedContents", "batches"][k];
                let (s, v) = call(&h, &keys[w], Method::GET, &format!("/v1beta/{coll}"), None).await;
                assert_eq!(s, 200, "{v}");
                (w, String::new(), v.to_string())
            }
            Step::Refer(w, i) => {
                let Some((owner, n)) = pick(i) else { continue };
                if n.starts_with("batches/") {
                    continue;
                }
                let body = if n.starts_with("cachedContents/") {
                    json!({"cachedContent": n, "contents": [{"parts": [{"text": "q"}]}]})
                } else {
                    json!({"contents": [{"parts": [{"fileData": {"mimeType": "text/plain", "fileUri": n}}]}]})
                };
                let (s, v) = call(
                    &h,
                    &keys[w],
                    Method::POST,
                    "/v1beta/models/gemini-2.5-flash:generateContent",
                    Some(body),
                )
                .await;
                assert!(s == 200 || s == 403, "{s} {v}");
                assert!(owner == w || s != 200, "user {w} used {n} of user {owner}: {v}");
                (w, n, v.to_string())
            }
        };
        for (owner, name) in &created {
            if *owner != who && *name != asked {
                let id = name.rsplit('/').next().unwrap();
                assert!(
                    !answer.contains(id),
                    "user {who} was shown {name} of user {owner}: {answer}"
                );
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 6, ..Default::default() })]

    /// No sequence of calls by one user ever shows them a name the other created.
    #[test]
    fn no_sequence_of_calls_shows_one_user_the_others_names(steps in proptest::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_steps(steps));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_upstream_acts_on_is_what_the_policy_judged() {
    let h = Harness::start(ALLOW).await;
    let alice = h.user_with_key("alice", "free").await;
    let bob = h.user_with_key("bob", "free").await;
    reset_mock_log(&h).await;
    // A method override would turn an allowed create into a list of everyone's resources.
    let r = h
        .http
        .post(h.url("/v1beta/cachedContents"))
        .header("x-goog-api-key", &bob)
        .header("X-HTTP-Method-Override", "GET")
        .json(&json!({"model": "models/gemini-2.5-flash"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A body that can name resources must be JSON, the form the scanner reads.
    let r = h
        .http
        .post(h.url("/v1beta/models/gemini-2.5-flash:generateContent"))
        .header("x-goog-api-key", &bob)
        .header("content-type", "application/x-protobuf")
        .body(vec![0u8, 1, 2])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(mock_log(&h).await.is_empty());
    // Field masks (which could trim the usage billed from) and the caller's key never go up.
    let (s, _) = call(
        &h,
        &bob,
        Method::GET,
        "/v1beta/models?fields=models.name&%24fields=x&%6Bey=leak&alt=proto",
        None,
    )
    .await;
    assert_eq!(s, 200);
    let log = mock_log(&h).await;
    assert_eq!(log, ["GET /v1beta/models"], "{log:?}");

    // A batch whose metadata names a file no one owns (to have it echoed back and adopted) is
    // refused like any other reference to it.
    let orphan = reqwest::Client::new()
        .post(format!("http://{}/upload/v1beta/files", h.mock.addr))
        .header("x-goog-api-key", common::UPSTREAM_KEY)
        .header("X-Goog-Upload-Command", "upload, finalize")
        .header("X-Goog-Upload-Offset", "0")
        .body("not yours")
        .send()
        .await
        .unwrap();
    let orphan: Value = orphan.json().await.unwrap();
    let orphan = orphan["file"]["name"].as_str().unwrap().to_string();
    let (s, v) = call(
        &h,
        &bob,
        Method::POST,
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        Some(json!({"batch": {"inputConfig": {"requests": {"requests": [
            {"request": {"contents": [{"parts": [{"text": "hi"}]}]}, "metadata": {"uri": orphan, "responsesFile": orphan}}]}}}})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, _) = call(&h, &bob, Method::GET, &format!("/v1beta/{orphan}"), None).await;
    assert_eq!(s, 403, "a file no one owns stays the operator's");
    // A batch whose input is a file is refused (its results are not metered yet).
    let (s, v) = call(
        &h,
        &alice,
        Method::POST,
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        Some(json!({"batch": {"inputConfig": {"fileName": "files/whatever"}}})),
    )
    .await;
    assert!(s == 403, "{v}");
    // Names are Gemini's to choose: a chosen one would tell whether someone else holds it.
    let r = h
        .http
        .post(h.url("/upload/v1beta/files"))
        .header("x-goog-api-key", &bob)
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .json(&json!({"file": {"name": "files/guess-alices-name"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, _) = call(
        &h,
        &bob,
        Method::POST,
        "/v1beta/tunedModels?tunedModelId=mine",
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 400);
    // A list through /v1 reads the resources under v1beta and keeps them.
    let file = upload(&h, &alice, b"kept").await;
    let (s, v) = call(&h, &alice, Method::GET, "/v1/files", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = call(&h, &alice, Method::GET, &format!("/v1beta/{file}"), None).await;
    assert_eq!(s, 200);
}
