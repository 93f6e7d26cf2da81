//! Operations (Veo), tuned models, file search stores and the billable extras over real
//! sockets: create, get, list paging, empty list `{}`, delete, the exact error of a missing one.

use reqwest::Method as M;

use super::resources::{Api, error_body, walk};
use super::*;

fn not_found() -> String {
    error_body(404, "Requested entity was not found.", "NOT_FOUND")
}

fn name_of(v: &Value) -> String {
    v["name"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn veo_operations() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    assert_eq!(api.get("/v1beta/operations").await?, (200, "{}".to_owned()));

    let (status, text) = api
        .post(
            "/v1beta/models/veo-3.0-generate-001:predictLongRunning",
            r#"{"instances":[{"prompt":"a cat"}],"parameters":{"sampleCount":2}}"#,
        )
        .await?;
    assert_eq!(status, 200);
    let op: Value = serde_json::from_str(&text)?;
    let name = name_of(&op);
    assert!(name.starts_with("models/veo-3.0-generate-001/operations/"), "{name}");
    assert_eq!(op.as_object().map(serde_json::Map::len), Some(1), "{text}");

    let first = api.json(M::GET, &format!("/v1beta/{name}"), None).await?;
    assert_eq!(first.get("done"), None);
    let done = api.json(M::GET, &format!("/v1beta/{name}"), None).await?;
    assert_eq!(done["done"], true);
    let resp = &done["response"];
    assert_eq!(
        resp["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse"
    );
    let samples = resp["generateVideoResponse"]["generatedSamples"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(samples.len(), 2);
    // The video is a real generated file that downloads.
    let uri = samples[0]["video"]["uri"].as_str().unwrap_or_default().to_owned();
    let prefix = format!("http://{}/v1beta/files/", m.addr);
    assert!(
        uri.starts_with(&prefix) && uri.ends_with(":download?alt=media"),
        "{uri}"
    );
    let r = reqwest::Client::new()
        .get(&uri)
        .header("x-goog-api-key", "k")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "video/mp4");
    assert!(r.bytes().await?.windows(4).any(|w| w == b"ftyp"));

    // The same operation by its short name, and in the generic list.
    let id = name.rsplit('/').next().unwrap_or_default();
    let again = api.json(M::GET, &format!("/v1/operations/{id}"), None).await?;
    assert_eq!(again, done);
    for _ in 0..2 {
        api.post("/v1beta/models/veo-3.0-generate-001:predictLongRunning", "{}")
            .await?;
    }
    let (all, pages) = walk(&api, "/v1beta/operations", "operations", 2).await?;
    assert_eq!((all.len(), pages), (3, 2));
    assert_eq!(all.last(), Some(&name));

    // Missing, or a real id under the wrong parent: 404.
    assert_eq!(api.get("/v1beta/operations/nope").await?, (404, not_found()));
    assert_eq!(
        api.get("/v1beta/models/veo-3.0-generate-001/operations/nope").await?,
        (404, not_found())
    );
    assert_eq!(
        api.get(&format!("/v1beta/models/other/operations/{id}")).await?,
        (404, not_found())
    );
    Ok(())
}

#[tokio::test]
async fn tuned_models() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    assert_eq!(api.get("/v1beta/tunedModels").await?, (200, "{}".to_owned()));

    let body = r#"{"displayName":"my tune","baseModel":"models/gemini-1.5-flash-001-tuning",
      "tuningTask":{"hyperparameters":{"epochCount":3,"batchSize":2,"learningRate":0.001},
      "trainingData":{"examples":{"examples":[{"textInput":"1","output":"2"},{"textInput":"3","output":"4"},{"textInput":"5","output":"6"}]}}}}"#;
    let op = api.json(M::POST, "/v1beta/tunedModels", Some(body)).await?;
    let op_name = name_of(&op);
    let md = &op["metadata"];
    assert_eq!(
        md["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.CreateTunedModelMetadata"
    );
    let tuned = md["tunedModel"].as_str().unwrap_or_default().to_owned();
    assert!(op_name.starts_with(&format!("{tuned}/operations/")), "{op_name}");
    // ceil(3 examples × 3 epochs / batch 2)
    assert_eq!(md["totalSteps"], 5);

    let t = api.json(M::GET, &format!("/v1beta/{tuned}"), None).await?;
    assert_eq!(t["state"], "CREATING");
    assert_eq!(t["displayName"], "my tune");
    assert_eq!(t["baseModel"], "models/gemini-1.5-flash-001-tuning");
    let done = api.json(M::GET, &format!("/v1beta/{op_name}"), None).await?;
    assert_eq!(done["done"], true);
    assert_eq!(done["response"]["name"], tuned.as_str());
    assert_eq!(
        done["response"]["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.TunedModel"
    );
    let t = api.json(M::GET, &format!("/v1beta/{tuned}"), None).await?;
    assert_eq!(t["state"], "ACTIVE");

    // Generation on the tuned model is the models' generate.
    let v = api
        .json(M::POST, &format!("/v1beta/{tuned}:generateContent"), Some(BODY40))
        .await?;
    assert_eq!(v["usageMetadata"]["promptTokenCount"], 10);
    let (status, text) = api
        .post(&format!("/v1beta/{tuned}:streamGenerateContent?alt=sse"), BODY40)
        .await?;
    assert_eq!(status, 200);
    assert!(text.starts_with("data: "), "{text}");
    assert_eq!(stat(&m, |s| &s.generate_requests), 2);

    // A chosen id, a taken id, list paging, delete, missing.
    let op = api
        .json(
            M::POST,
            "/v1beta/tunedModels?tunedModelId=chosen-1",
            Some(r#"{"baseModel":"models/x"}"#),
        )
        .await?;
    assert_eq!(op["metadata"]["tunedModel"], "tunedModels/chosen-1");
    assert_eq!(
        api.post(
            "/v1beta/tunedModels?tunedModelId=chosen-1",
            r#"{"baseModel":"models/x"}"#
        )
        .await?
        .0,
        409
    );
    assert_eq!(api.post("/v1beta/tunedModels", "{}").await?.0, 400);
    api.post("/v1beta/tunedModels", r#"{"baseModel":"models/x"}"#).await?;
    let (all, pages) = walk(&api, "/v1beta/tunedModels", "tunedModels", 2).await?;
    assert_eq!((all.len(), pages), (3, 2));
    assert_eq!(all.last(), Some(&tuned));

    assert_eq!(api.delete(&format!("/v1beta/{tuned}")).await?, (200, "{}".to_owned()));
    assert_eq!(api.get(&format!("/v1beta/{tuned}")).await?, (404, not_found()));
    assert_eq!(api.delete(&format!("/v1beta/{tuned}")).await?, (404, not_found()));
    assert_eq!(
        api.post(&format!("/v1beta/{tuned}:generateContent"), BODY40).await?,
        (404, not_found())
    );
    assert_eq!(
        api.get("/v1beta/tunedModels/nope/operations/nope").await?,
        (404, not_found())
    );
    Ok(())
}

#[tokio::test]
async fn file_search_stores() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    assert_eq!(api.get("/v1beta/fileSearchStores").await?, (200, "{}".to_owned()));

    let s = api
        .json(M::POST, "/v1beta/fileSearchStores", Some(r#"{"displayName":"docs"}"#))
        .await?;
    let store = name_of(&s);
    assert!(store.starts_with("fileSearchStores/"), "{store}");
    assert_eq!(s["displayName"], "docs");
    assert_eq!(api.json(M::GET, &format!("/v1beta/{store}"), None).await?, s);
    assert_eq!(
        api.get(&format!("/v1beta/{store}/documents")).await?,
        (200, "{}".to_owned())
    );

    // importFile of an uploaded file.
    let f = api.upload("manual.txt", "text/plain", b"read me").await?;
    let body = format!(r#"{{"fileName":"{}"}}"#, name_of(&f));
    let op = api
        .json(M::POST, &format!("/v1beta/{store}:importFile"), Some(&body))
        .await?;
    let op_name = name_of(&op);
    assert!(op_name.starts_with(&format!("{store}/operations/")), "{op_name}");
    api.get(&format!("/v1beta/{op_name}")).await?;
    let done = api.json(M::GET, &format!("/v1beta/{op_name}"), None).await?;
    assert_eq!(done["done"], true);
    assert_eq!(
        done["response"]["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.ImportFileResponse"
    );
    let doc = done["response"]["documentName"].as_str().unwrap_or_default().to_owned();
    assert!(doc.starts_with(&format!("{store}/documents/")), "{doc}");
    let d = api.json(M::GET, &format!("/v1beta/{doc}"), None).await?;
    assert_eq!(d["displayName"], "manual.txt");
    assert_eq!(d["sizeBytes"], "7");
    assert_eq!(d["state"], "STATE_ACTIVE");
    let (status, _) = api
        .post(&format!("/v1beta/{store}:importFile"), r#"{"fileName":"files/nope"}"#)
        .await?;
    assert_eq!(status, 403);

    // Single-shot upload straight into the store.
    let r = reqwest::Client::new()
        .post(url(&m, &format!("/upload/v1beta/{store}:uploadToFileSearchStore")))
        .header("x-goog-api-key", "k")
        .header("x-goog-upload-file-name", "faq.md")
        .header("content-type", "text/markdown")
        .body("# FAQ\n")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-goog-upload-status"], "final");
    let op: Value = r.json().await?;
    let op_name = name_of(&op);
    assert!(op_name.starts_with(&format!("{store}/upload/operations/")), "{op_name}");
    api.get(&format!("/v1beta/{op_name}")).await?;
    let done = api.json(M::GET, &format!("/v1beta/{op_name}"), None).await?;
    assert_eq!(
        done["response"]["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.UploadToFileSearchStoreResponse"
    );

    // The SDKs' resumable form: start on the store, chunks to the session URL.
    let c = reqwest::Client::new();
    let start = c
        .post(url(&m, &format!("/upload/v1beta/{store}:uploadToFileSearchStore")))
        .header("x-goog-api-key", "k")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("x-goog-upload-header-content-type", "text/plain")
        .body(r#"{"displayName": "notes"}"#)
        .send()
        .await?;
    assert_eq!(start.status(), 200);
    let session = start.headers()["x-goog-upload-url"].to_str()?.to_owned();
    let prefix = format!(
        "http://{}/upload/v1beta/{store}:uploadToFileSearchStore?upload_id=",
        m.addr
    );
    assert!(session.starts_with(&prefix), "{session}");
    let r = c
        .post(&session)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body("abc")
        .send()
        .await?;
    assert_eq!(r.headers()["x-goog-upload-status"], "final");
    let op: Value = r.json().await?;
    assert!(name_of(&op).starts_with(&format!("{store}/upload/operations/")), "{op}");
    let (status, _) = api
        .send(
            M::POST,
            "/upload/v1beta/fileSearchStores/nope:uploadToFileSearchStore",
            None,
        )
        .await?;
    assert_eq!(status, 404);

    let (docs, _) = walk(&api, &format!("/v1beta/{store}/documents"), "documents", 1).await?;
    assert_eq!(docs.len(), 3);
    assert_eq!(docs.last(), Some(&doc));
    let s = api.json(M::GET, &format!("/v1beta/{store}"), None).await?;
    assert_eq!(s["activeDocumentsCount"], "3");
    assert_eq!(s["sizeBytes"], "16");

    // Stores page like the rest; a non-empty store needs force to go.
    api.post("/v1beta/fileSearchStores", "").await?;
    api.post("/v1beta/fileSearchStores", "{}").await?;
    let (all, pages) = walk(&api, "/v1beta/fileSearchStores", "fileSearchStores", 2).await?;
    assert_eq!((all.len(), pages), (3, 2));
    assert_eq!(api.delete(&format!("/v1beta/{store}")).await?.0, 400);
    assert_eq!(api.delete(&format!("/v1beta/{doc}")).await?, (200, "{}".to_owned()));
    assert_eq!(api.get(&format!("/v1beta/{doc}")).await?, (404, not_found()));
    assert_eq!(
        api.delete(&format!("/v1beta/{store}?force=true")).await?,
        (200, "{}".to_owned())
    );
    assert_eq!(api.get(&format!("/v1beta/{store}")).await?, (404, not_found()));
    assert_eq!(api.delete(&format!("/v1beta/{store}")).await?, (404, not_found()));
    assert_eq!(
        api.get(&format!("/v1beta/{store}/documents")).await?,
        (404, not_found())
    );
    assert_eq!(
        api.post(&format!("/v1beta/{store}:importFile"), &body).await?,
        (404, not_found())
    );
    Ok(())
}

#[tokio::test]
async fn billable_extras() -> TestResult {
    let m = mock(MockOptions::default()).await?;
    let api = Api::new(&m);
    let e = api
        .json(
            M::POST,
            "/v1beta/models/gemini-embedding-001:embedContent",
            Some(r#"{"content":{"parts":[{"text":"hi"}]}}"#),
        )
        .await?;
    let values = e["embedding"]["values"].as_array().cloned().unwrap_or_default();
    assert_eq!(values.len(), 8);
    assert!(
        values
            .iter()
            .all(|v| v.as_f64().is_some_and(|f| (-1.0..=1.0).contains(&f)))
    );
    assert_eq!(e.as_object().map(serde_json::Map::len), Some(1), "no usage");

    let b = api
        .json(
            M::POST,
            "/v1beta/models/gemini-embedding-001:batchEmbedContents",
            Some(r#"{"requests":[{"content":{"parts":[{"text":"a"}]}},{"content":{"parts":[{"text":"hi"}]}}]}"#),
        )
        .await?;
    let embs = b["embeddings"].as_array().cloned().unwrap_or_default();
    assert_eq!(embs.len(), 2);
    // Deterministic: the same content embeds the same.
    assert_eq!(embs[1]["values"], e["embedding"]["values"]);
    assert!(b.get("usageMetadata").is_none());

    let p = api
        .json(
            M::POST,
            "/v1beta/models/imagen-4.0-generate-001:predict",
            Some(r#"{"instances":[{"prompt":"a cat"}],"parameters":{"sampleCount":3}}"#),
        )
        .await?;
    let preds = p["predictions"].as_array().cloned().unwrap_or_default();
    assert_eq!(preds.len(), 3);
    assert_eq!(preds[0]["mimeType"], "image/png");
    assert!(
        preds[0]["bytesBase64Encoded"]
            .as_str()
            .is_some_and(|s| s.starts_with("iVBOR"))
    );

    let c = reqwest::Client::new();
    let body = r#"{"model":"gemini-embedding-001","input":["a","b"]}"#;
    let r = c
        .post(url(&m, "/v1beta/openai/embeddings"))
        .bearer_auth("AIzaTEST")
        .body(body)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await?;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["usage"]["prompt_tokens"], body.len().div_ceil(4) as u64);

    let r = c
        .post(url(&m, "/v1beta/openai/images/generations"))
        .bearer_auth("AIzaTEST")
        .body(r#"{"model":"imagen-4.0-generate-001","prompt":"a cat","n":2}"#)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await?;
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert!(v["data"][0]["b64_json"].is_string());

    // Keys are required; bad bodies are 400.
    let r = c.post(url(&m, "/v1beta/openai/embeddings")).body(body).send().await?;
    assert_eq!(r.status(), 403);
    let r = c
        .post(url(&m, "/v1beta/models/gemini-embedding-001:embedContent"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    assert_eq!(
        api.post("/v1beta/models/gemini-embedding-001:batchEmbedContents", "{}")
            .await?
            .0,
        400
    );
    assert_eq!(stat(&m, |s| &s.generate_requests), 0);
    Ok(())
}
