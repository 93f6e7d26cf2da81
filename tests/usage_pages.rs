//! The month breakdown behind the dashboard (`GET /api/usage/breakdown`) and how the two pages
//! are served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Harness, sum};
use gemini_meter::api::usage::breakdown_body;
use gemini_meter::clock::Month;
use rust_decimal::Decimal;
use serde_json::Value;

fn dec(v: &Value) -> Decimal {
    v.as_str().unwrap().parse().unwrap()
}

async fn breakdown(h: &Harness, key: &str, query: &str) -> reqwest::Response {
    h.http
        .get(h.url(&format!("/api/usage/breakdown{query}")))
        .header("x-goog-api-key", key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn breakdown_adds_up_to_the_records_by_type_and_by_model() {
    let h = Harness::start("").await;
    let key = h.user_with_key("bd-user", "free").await;
    let other = h.user_with_key("bd-other", "free").await;
    for model in ["gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-flash-lite"] {
        let r = h.generate(&key, model, false).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let records = h.records("bd-user").await;
    assert_eq!(records.len(), 6);
    let (messages, tokens, _, cost) = sum(&records);

    let r = breakdown(&h, &key, "").await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["month"], Month::of(chrono::Utc::now()).to_string());
    assert_eq!(v["total"]["messages"], messages);
    assert_eq!(v["total"]["tokens"], tokens);
    assert_eq!(v["total"]["records"], 6);
    assert_eq!(v["total"]["cost"], cost.as_str());
    assert_eq!(v["models_complete"], true);
    assert_eq!(v["records_scanned"], 6);

    let types = v["by_type"].as_array().unwrap();
    let of_type = |t: &str| types.iter().find(|r| r["type"] == t).unwrap().clone();
    assert_eq!(of_type("message_sent")["messages"], 3);
    assert_eq!(of_type("ai_response")["tokens"], tokens);
    let type_cost: Decimal = types.iter().map(|r| dec(&r["cost"])).sum();
    assert_eq!(type_cost.normalize().to_string(), cost);

    let models = v["by_model"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    let flash = models.iter().find(|r| r["model"] == "gemini-2.5-flash").unwrap();
    assert_eq!(flash["messages"], 2);
    assert_eq!(flash["records"], 4);
    let model_cost: Decimal = models.iter().map(|r| dec(&r["cost"])).sum();
    assert_eq!(model_cost.normalize().to_string(), cost);
    let model_tokens: u64 = models.iter().map(|r| r["tokens"].as_u64().unwrap()).sum();
    assert_eq!(model_tokens, tokens);
    // Most expensive first.
    assert!(dec(&models[0]["cost"]) >= dec(&models[1]["cost"]));

    // Another caller sees only their own (nothing); another month is empty; a bad month is 400.
    let v: Value = breakdown(&h, &other, "").await.json().await.unwrap();
    assert_eq!(v["total"]["records"], 0);
    assert_eq!(v["by_model"].as_array().unwrap().len(), 0);
    let v: Value = breakdown(&h, &key, "?month=2020-01").await.json().await.unwrap();
    assert_eq!(v["month"], "2020-01");
    assert_eq!(v["total"]["records"], 0);
    assert_eq!(breakdown(&h, &key, "?month=2020-13").await.status(), 400);
    assert_eq!(
        breakdown(&h, "gm_0123456789abcdefghijABCDEFGHIJ0123456789", "")
            .await
            .status(),
        401
    );

    // The model rows are bounded: past the scan limit they say they are partial.
    let month = Month::of(chrono::Utc::now());
    let partial = breakdown_body(&h.app, "bd-user", month, 4).unwrap();
    assert_eq!(partial["models_complete"], false);
    assert_eq!(partial["records_scanned"], 4);
    assert_eq!(partial["total"]["records"], 6, "the type totals stay exact");
    let exact = breakdown_body(&h.app, "bd-user", month, 6).unwrap();
    assert_eq!(exact["models_complete"], true);
}

#[tokio::test]
async fn pages_are_public_html_with_a_strict_policy() {
    let h = Harness::start("").await;
    for path in ["/dashboard", "/admin/dashboard"] {
        let r = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
        let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        let html = r.text().await.unwrap();
        assert!(html.starts_with("<!doctype html>"));
        assert!(!html.contains("{{"), "a template marker was left in {path}");
    }
    // Only GET serves the admin page; anything else there is an admin route (token needed).
    let r = h.http.post(h.url("/admin/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}
