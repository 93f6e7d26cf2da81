//! First end-to-end checks: a call goes through, is metered once, and keys are handled.

mod common;

use common::{Harness, UPSTREAM_KEY};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_is_forwarded_and_metered_once() {
    let h = Harness::start("").await;
    let key = h.user_with_key("alice", "free").await;
    let r = h.generate(&key, "gemini-2.5-flash", false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quota-messages-limit"], "100");
    assert_eq!(r.headers()["x-quota-messages-remaining"], "99");
    let body: Value = r.json().await.unwrap();
    let usage = &body["usageMetadata"];
    let recs = h.records("alice").await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    let ai = recs.iter().find(|r| r.kind.as_str() == "ai_response").unwrap();
    assert_eq!(ai.tokens, usage["totalTokenCount"].as_u64().unwrap());
    assert_eq!(ai.metadata["token_source"], "upstream");
    assert_eq!(h.mock_stats()["leaked_gateway_keys"], 0);
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["messages"], 1);
    assert_eq!(cur["current_month"]["tokens"], ai.tokens);
    assert!(!std::fs::read_dir(h.dir.path()).unwrap().any(|_| false));
    let _ = UPSTREAM_KEY;
}
