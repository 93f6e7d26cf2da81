//! `GET /openapi.json`: an OpenAPI 3.1 document that parses, and names every route the API's
//! routers match (read from their source, so a new route without its operation fails here) and
//! nothing else. schemathesis checks the answers against it (`scripts/schemathesis`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::Harness;
use serde_json::Value;

/// `(METHOD, /path/{param})` of each route matched in `src/api`'s routers.
fn routed() -> BTreeSet<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let read = |f: &str| std::fs::read_to_string(format!("{root}/src/api/{f}")).unwrap();
    let mut out = BTreeSet::new();
    // `(Method::GET, "/healthz")` (mod.rs) and `(&Method::GET, "/api/usage/current")` (usage.rs).
    for (file, marker) in [("mod.rs", "(Method::"), ("usage.rs", "(&Method::")] {
        let src = read(file);
        for part in src.split(marker).skip(1) {
            let Some((method, rest)) = part.split_once(", \"") else {
                continue;
            };
            let Some((path, _)) = rest.split_once("\")") else {
                continue;
            };
            out.insert((method.to_string(), path.to_string()));
        }
    }
    // `(Method::GET, ["admin", "users", id])` (admin.rs): literals and named segments.
    let src = read("admin.rs");
    for part in src.split("(Method::").skip(1) {
        let Some((method, rest)) = part.split_once(", [") else {
            continue;
        };
        let Some((segs, _)) = rest.split_once("])") else {
            continue;
        };
        let path: Vec<String> = segs
            .split(',')
            .map(str::trim)
            .map(|s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                Some(lit) => lit.to_string(),
                None => format!("{{{s}}}"),
            })
            .collect();
        out.insert((method.to_string(), format!("/{}", path.join("/"))));
    }
    // The one route matched before the token check.
    assert!(src.contains("path == \"/admin/dashboard\" && req.method() == Method::GET"));
    out.insert(("GET".into(), "/admin/dashboard".into()));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_openapi_3_1_and_names_every_route() {
    let h = Harness::start("").await;
    let r = h.http.get(h.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "gemini-meter");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((method.to_uppercase(), path.clone()));
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            // Every $ref resolves.
            let text = op.to_string();
            for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
                let name = part.split('"').next().unwrap();
                assert!(
                    doc["components"]["schemas"][name].is_object(),
                    "{method} {path}: {name}"
                );
            }
        }
    }
    let routed = routed();
    assert!(routed.len() >= 30, "the route scan found {routed:?}");
    let missing: Vec<_> = routed.difference(&documented).collect();
    assert!(missing.is_empty(), "routed but not in /openapi.json: {missing:?}");
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(extra.is_empty(), "in /openapi.json but not routed: {extra:?}");
    // No proxied Gemini route.
    assert!(documented.iter().all(|(_, p)| !p.starts_with("/v1")));

    // The security schemes the operations name exist.
    for s in ["api_key", "api_key_query", "bearer", "admin_token"] {
        assert!(doc["components"]["securitySchemes"][s].is_object(), "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_schemathesis_found_stays_fixed() {
    let h = Harness::start("").await;
    let key = h.user_with_key("alice", "free").await;
    // A documented path asked with a method it does not take: 405 with Allow, not 404 (with
    // the credentials it needs: the key for the usage API, the token for the admin API).
    for (method, path, allow) in [
        ("TRACE", "/healthz", "GET"),
        ("POST", "/api/usage/current", "GET"),
        ("PUT", "/admin/users/alice", "DELETE, GET, PATCH"),
        ("GET", "/admin/reload", "POST"),
    ] {
        let r = h
            .admin(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), path)
            .header("x-goog-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], 405);
    }
    // Unknown paths stay 404.
    let r = h.admin(reqwest::Method::GET, "/admin/nothing").send().await.unwrap();
    assert_eq!(r.status(), 404);
    // An email that is not a string is refused (it was dropped silently).
    let r = h
        .admin(reqwest::Method::POST, "/admin/users")
        .json(&serde_json::json!({"id": "e1", "tier": "free", "email": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The tier fields list the running config's tiers.
    let doc: Value = h
        .http
        .get(h.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["schemas"]["NewUser"]["properties"]["tier"]["enum"],
        serde_json::json!(["free", "unlimited"])
    );
}
