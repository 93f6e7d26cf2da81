//! Each framing on the wire: unary, SSE, JSON array and OpenAI bodies against the fixtures,
//! cumulative usage, mid-stream errors, cut and abandoned streams.

use super::*;

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
