//! Records on disk stay readable: `tests/fixtures/records-v1/` holds a record log written by the
//! gateway before records were typed (every kind of record it settled then: answered, streamed,
//! OpenAI, upstream error, in-stream error, client gone, upload, tags), and `expected.jsonl` the
//! JSON those records rendered to then. Today's code must decode every frame to the same JSON,
//! and write it back byte for byte as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Harness;
use gemini_meter::ledger::Record;
use gemini_meter::ledger::log::RecordLog;
use serde_json::{Value, json};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/records-v1")
}

/// Every record frame of the log in `dir`, in log order: the record's stored JSON bytes.
fn frames(dir: &Path) -> Vec<Vec<u8>> {
    let log = RecordLog::open(dir).unwrap();
    let mut out = Vec::new();
    let end = log.recover(log.first(), |_| Ok(())).unwrap();
    log.set_visible(end);
    log.scan(log.first(), end, |f| {
        out.push(f.record().to_vec());
        true
    })
    .unwrap();
    out
}

#[test]
fn records_written_before_typing_decode_to_the_same_json() {
    let tmp = tempfile::tempdir().unwrap();
    // The log may write on open (recovery); work on a copy.
    for e in std::fs::read_dir(fixture_dir().join("records")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let expected: Vec<Value> = std::fs::read_to_string(fixture_dir().join("expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = frames(tmp.path());
    assert_eq!(got.len(), expected.len());
    assert!(got.len() >= 12, "the fixture covers every kind of record");
    for (raw, want) in got.iter().zip(&expected) {
        let v: Value = serde_json::from_slice(raw).unwrap();
        let rec = Record::from_json(&v).unwrap_or_else(|| panic!("frame does not decode: {v}"));
        assert_eq!(&rec.to_json(), want, "decoded record renders as before");
        let mut again = Vec::new();
        rec.write_json(&mut again).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&again),
            String::from_utf8_lossy(raw),
            "re-encoding gives the bytes on disk"
        );
    }
}

/// Writes the fixture (run by hand, with the code whose format is to be kept):
/// `cargo test --test golden_records -- --ignored write_fixture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn write_fixture() {
    let h = Harness::start("").await;
    let key = h.user_with_key("golden", "free").await;
    let c = reqwest::Client::new();
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]});
    let call = |path: &str| {
        c.post(h.url(path))
            .header("x-goog-api-key", &key)
            .header("x-meter-tag-chat-id", "c-42")
            .json(&body)
            .send()
    };
    call("/v1beta/models/gemini-2.5-flash:generateContent")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    call("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    call("/v1beta/models/gemini-2.5-flash:streamGenerateContent")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    call("/v1beta/models/gemini-2.0-flash:generateContent")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    call("/v1beta/models/error-500:generateContent")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let _ = call("/v1beta/models/midstream-error:streamGenerateContent?alt=sse")
        .await
        .unwrap()
        .bytes()
        .await;
    let _ = call("/v1beta/models/cut:streamGenerateContent?alt=sse")
        .await
        .unwrap()
        .bytes()
        .await;
    let chat = |stream: bool| {
        c.post(h.url("/v1beta/openai/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "gemini-2.5-flash", "stream": stream,
                          "messages": [{"role": "user", "content": "Hi"}]}))
            .send()
    };
    chat(false).await.unwrap().bytes().await.unwrap();
    chat(true).await.unwrap().bytes().await.unwrap();
    // A client that leaves while the upstream is still thinking.
    let slow = async {
        let r = call("/v1beta/models/slow:streamGenerateContent?alt=sse").await.unwrap();
        r.bytes().await
    };
    let _ = tokio::time::timeout(Duration::from_millis(300), slow).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An upload: start, then one chunk that finalizes.
    let r = c
        .post(h.url("/upload/v1beta/files"))
        .header("x-goog-api-key", &key)
        .header("X-Goog-Upload-Protocol", "resumable")
        .header("X-Goog-Upload-Command", "start")
        .header("X-Goog-Upload-Header-Content-Length", "100")
        .json(&json!({"file": {"displayName": "f"}}))
        .send()
        .await
        .unwrap();
    let url = r.headers()["x-goog-upload-url"].to_str().unwrap().to_string();
    c.post(&url)
        .header("X-Goog-Upload-Command", "upload, finalize")
        .header("X-Goog-Upload-Offset", "0")
        .body(vec![7u8; 100])
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    h.sync().await;

    let data = h.dir.path().join("data/records");
    let out = fixture_dir();
    std::fs::create_dir_all(out.join("records")).unwrap();
    let mut lines = String::new();
    for raw in frames(&data) {
        let v: Value = serde_json::from_slice(&raw).unwrap();
        let rec = Record::from_json(&v).unwrap();
        lines.push_str(&rec.to_json().to_string());
        lines.push('\n');
    }
    std::fs::write(out.join("expected.jsonl"), lines).unwrap();
    for e in std::fs::read_dir(&data).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join("records").join(e.file_name())).unwrap();
    }
}
