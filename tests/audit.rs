//! The audit trail: every admin action leaves one entry (time, action, target, caller, outcome),
//! reads do not, `GET /admin/audit` pages through them newest first, the entries survive a
//! restart, and neither a created key nor the admin token ever reaches the trail or any file of
//! the data directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{ADMIN_TOKEN, Harness};
use reqwest::Method;
use serde_json::{Value, json};

async fn all_entries(h: &Harness) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/admin/audit?limit=3".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = h.admin(Method::GET, &path).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let page: Value = serde_json::from_str(&text).unwrap();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        out.extend(data.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    out
}

fn files_containing(dir: &Path, needle: &[u8], found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_containing(&path, needle, found);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_action_is_recorded_and_no_secret_is() {
    let h = Harness::start("").await;
    let send = |m: Method, path: &str, body: Option<Value>| {
        let mut b = h.admin(m, path);
        if let Some(v) = body {
            b = b.json(&v);
        }
        b.send()
    };
    assert_eq!(
        send(
            Method::POST,
            "/admin/users",
            Some(json!({"id": "alice", "tier": "free"}))
        )
        .await
        .unwrap()
        .status(),
        201
    );
    // A failed action is recorded too.
    assert_eq!(
        send(
            Method::POST,
            "/admin/users",
            Some(json!({"id": "alice", "tier": "free"}))
        )
        .await
        .unwrap()
        .status(),
        409
    );
    let created: Value = send(Method::POST, "/admin/users/alice/keys", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    assert_eq!(h.generate(&key, "gemini-2.5-flash", false).await.status(), 200);
    assert_eq!(
        send(Method::PATCH, "/admin/users/alice", Some(json!({"tier": "unlimited"})))
            .await
            .unwrap()
            .status(),
        200
    );
    // Reads are not actions.
    assert_eq!(
        send(Method::GET, "/admin/users/alice", None).await.unwrap().status(),
        200
    );
    assert_eq!(
        send(Method::GET, "/admin/users/alice/keys", None)
            .await
            .unwrap()
            .status(),
        200
    );
    // Nor are requests without the token.
    let anon = h
        .http
        .post(h.url("/admin/users"))
        .json(&json!({"id": "mallory", "tier": "free"}));
    assert_eq!(anon.send().await.unwrap().status(), 401);
    let export = send(Method::GET, "/admin/export?month=2026-11&format=jsonl", None)
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    let _ = export.text().await.unwrap();
    assert_eq!(send(Method::POST, "/admin/reload", None).await.unwrap().status(), 200);
    assert_eq!(
        send(Method::POST, "/admin/retention/run", None).await.unwrap().status(),
        200
    );
    assert_eq!(
        send(Method::DELETE, &format!("/admin/keys/{key_id}"), None)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        send(Method::DELETE, "/admin/users/alice", None).await.unwrap().status(),
        200
    );

    let entries = all_entries(&h).await;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .rev()
        .map(|e| (e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("user.create", "ok"),
            ("user.create", "failed"),
            ("key.create", "ok"),
            ("user.set_tier", "ok"),
            ("export", "ok"),
            ("config.reload", "ok"),
            ("retention.run", "ok"),
            ("key.revoke", "ok"),
            ("user.delete", "ok"),
        ],
        "{entries:#?}"
    );
    let by = |a: &str| {
        entries
            .iter()
            .find(|e| e["action"] == a && e["outcome"] == "ok")
            .unwrap()
    };
    for e in &entries {
        assert!(e["caller"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
        assert!(e["at"].as_str().unwrap().ends_with('Z'), "{e}");
        assert!(e["id"].is_string(), "{e}");
    }
    assert_eq!(by("user.create")["target"], "alice");
    assert_eq!(by("user.create")["status"], 201);
    let dup = entries.iter().find(|e| e["outcome"] == "failed").unwrap();
    assert_eq!(dup["status"], 409);
    assert!(dup["detail"]["error"].as_str().unwrap().contains("alice"), "{dup}");
    assert_eq!(by("key.create")["target"], "alice");
    assert_eq!(by("key.create")["detail"]["key_id"], key_id.as_str());
    let tier = by("user.set_tier");
    assert_eq!(tier["target"], "alice");
    assert_eq!(tier["detail"]["previous_tier"], "free");
    assert_eq!(tier["detail"]["tier"], "unlimited");
    assert_eq!(by("export")["target"], "2026-11");
    assert_eq!(by("export")["detail"]["format"], "jsonl");
    assert_eq!(by("key.revoke")["target"], key_id.as_str());
    assert_eq!(by("user.delete")["detail"]["records_deleted"], 2);
    assert!(by("retention.run")["detail"]["cutoff"].is_string());

    // No secret in the trail, nor anywhere in the data directory.
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains(&key), "{text}");
    assert!(!text.contains(ADMIN_TOKEN), "{text}");
    let mut h = h;
    h.stop().await;
    h.app.store.flush().await.unwrap();
    let data = h.dir.path().join("data");
    for secret in [key.as_str(), ADMIN_TOKEN, &key[3..]] {
        let mut found = Vec::new();
        files_containing(&data, secret.as_bytes(), &mut found);
        assert!(found.is_empty(), "a secret is stored in {found:?}");
    }
    // The audit trail itself is in the data directory (kept with the ledger).
    let mut found = Vec::new();
    files_containing(&data, b"user.set_tier", &mut found);
    assert!(!found.is_empty(), "the audit trail is not in the data directory");

    // Entries survive a restart, and new ones continue the sequence.
    let h = h.reopen(&[]).await;
    let r = h
        .admin(Method::POST, "/admin/users")
        .json(&json!({"id": "bob", "tier": "free"}));
    assert_eq!(r.send().await.unwrap().status(), 201);
    let after = all_entries(&h).await;
    assert_eq!(after.len(), entries.len() + 1);
    assert_eq!(after[0]["action"], "user.create");
    assert_eq!(after[0]["target"], "bob");
    let first: u64 = after[0]["id"].as_str().unwrap().parse().unwrap();
    let second: u64 = after[1]["id"].as_str().unwrap().parse().unwrap();
    assert!(first > second);
    // A cursor that was never given out.
    let r = h.admin(Method::GET, "/admin/audit?cursor=abc").send().await.unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_change_is_recorded_with_its_outcome() {
    let h = Harness::start("").await;
    h.app
        .live
        .spawn_watcher(std::time::Duration::from_millis(50), h.app.clock.clone());
    // In one step (write aside, rename): the watcher never sees a half-written file.
    let replace = |text: String| {
        let tmp = h.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &h.config_path).unwrap();
    };
    let good = std::fs::read_to_string(&h.config_path).unwrap();
    replace(good.replace("messages = 100", "messages = 50"));
    let mut seen = Vec::new();
    for _ in 0..400 {
        seen = all_entries(&h).await;
        if seen.iter().any(|e| e["outcome"] == "ok") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        seen.iter()
            .any(|e| e["action"] == "config.reload" && e["caller"] == "file-watch" && e["outcome"] == "ok"),
        "{seen:#?}"
    );
    replace(good + "\n[nonsense]\n");
    for _ in 0..400 {
        seen = all_entries(&h).await;
        if seen.iter().any(|e| e["outcome"] == "failed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let e = seen
        .iter()
        .find(|e| e["action"] == "config.reload" && e["outcome"] == "failed")
        .unwrap_or_else(|| panic!("{seen:#?}"));
    assert_eq!(e["caller"], "file-watch");
    assert!(e["detail"]["error"].as_str().unwrap().contains("nonsense"), "{e}");
    assert_eq!(e["target"], h.config_path.display().to_string());
}
