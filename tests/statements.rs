//! Monthly statements over the live gateway: the PDF renders (pdftoppm), its text (pdftotext)
//! and the CSV match the ledger's totals, records not yet applied included; the admin route
//! gives any user's, and bad parameters get a clear 400.
//!
//! Needs poppler-utils (`pdftoppm`, `pdftotext`); `.ci/run` installs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Harness, sum};
use gemini_meter::clock::Month;
use gemini_meter::ledger::{Record, Totals};

/// The PDF's text as pdftotext gives it (layout kept), with runs of spaces collapsed.
fn pdf_text(pdf: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.pdf");
    std::fs::write(&path, pdf).unwrap();
    let out = Command::new("pdftotext")
        .args(["-layout", path.to_str().unwrap(), "-"])
        .output()
        .expect("pdftotext (poppler-utils) is installed");
    assert!(
        out.status.success(),
        "pdftotext: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Renders every page to PNG with pdftoppm; returns the number of pages drawn.
fn pdf_pages_as_png(pdf: &[u8]) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.pdf");
    std::fs::write(&path, pdf).unwrap();
    let prefix = dir.path().join("page");
    let out = Command::new("pdftoppm")
        .args(["-png", "-r", "60", path.to_str().unwrap(), prefix.to_str().unwrap()])
        .output()
        .expect("pdftoppm (poppler-utils) is installed");
    assert!(
        out.status.success(),
        "pdftoppm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pages = 0;
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            let png = std::fs::read(&p).unwrap();
            assert!(png.starts_with(b"\x89PNG"), "{}", p.display());
            assert!(
                png.len() > 2000,
                "a page with text on it, not blank: {} bytes",
                png.len()
            );
            pages += 1;
        }
    }
    pages
}

/// Totals of `recs` grouped by `key`.
fn group(recs: &[Record], key: impl Fn(&Record) -> String) -> std::collections::BTreeMap<String, Totals> {
    let mut m = std::collections::BTreeMap::<String, Totals>::new();
    for r in recs {
        m.entry(key(r)).or_default().add(&Totals::of(r));
    }
    m
}

fn amounts(t: &Totals) -> String {
    format!(
        "{} {} {} {} {}",
        t.records,
        t.messages,
        t.tokens,
        t.bytes,
        t.cost.normalize()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_pdf_and_csv_match_the_ledger_including_unapplied_records() {
    // Aggregates are applied only every 10 s here: the statement must read what is written.
    let h = Harness::start_flushing_every(10_000, "").await;
    let alice = h.user_with_key("alice", "free").await;
    let bob = h.user_with_key("bob", "free").await;
    for i in 0..5 {
        assert_eq!(h.generate(&alice, "gemini-2.5-flash", i % 2 == 0).await.status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(h.generate(&alice, "gemini-2.5-flash-lite", false).await.status(), 200);
    }
    assert_eq!(h.generate(&bob, "gemini-2.0-flash", false).await.status(), 200);

    let month = Month::of(h.app.clock.now()).to_string();
    let r = h
        .http
        .get(h.url(&format!("/api/usage/statement?month={month}&format=pdf")))
        .header("x-goog-api-key", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"statement-alice-{month}.pdf\"").as_str()
    );
    let pdf = r.bytes().await.unwrap();
    assert!(pdf.starts_with(b"%PDF-"));
    assert_eq!(pdf_pages_as_png(&pdf), 1, "a small month fits on one page");
    let text = pdf_text(&pdf);

    // The ledger's view (the records themselves, read after a sync).
    let recs = h.records("alice").await;
    assert_eq!(recs.len(), 16, "8 calls, two records each");
    let (messages, tokens, bytes, cost) = sum(&recs);
    for line in [
        "Usage statement".to_string(),
        "User alice".to_string(),
        "Tier free".to_string(),
        format!("Records {}", recs.len()),
        format!("Messages {messages}"),
        format!("Tokens {tokens}"),
        format!("Bytes {bytes}"),
        format!("Total cost {cost}"),
    ] {
        assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
    }
    assert!(text.contains(&format!("Period {month}-01 to {month}-")), "{text}");
    let t = group(&recs, |_| String::new())[""];
    assert!(text.contains(&format!("Total {}", amounts(&t))), "{text}");
    for (kind, t) in group(&recs, |r| r.kind().as_str().to_string()) {
        assert!(
            text.contains(&format!("{kind} {}", amounts(&t))),
            "type {kind}:\n{text}"
        );
    }
    for (model, t) in group(&recs, |r| r.model().unwrap_or_default().to_string()) {
        assert!(
            text.contains(&format!("{model} {}", amounts(&t))),
            "model {model}:\n{text}"
        );
        // Message records have no price rule: their rule is the type and model. Responses
        // carry theirs (`metadata.price`): one row per rule, its amounts on the next line when
        // the label is long.
        let by = group(&recs, |r| {
            format!("{} {}", r.kind().as_str(), r.model().unwrap_or_default())
        });
        let t = by[&format!("message_sent {model}")];
        assert!(
            text.contains(&format!("message_sent {model} {}", amounts(&t))),
            "{text}"
        );
        let t = by[&format!("ai_response {model}")];
        assert!(text.contains(&format!("ai_response {model} @ ")), "{text}");
        assert!(text.contains(&amounts(&t)), "{text}");
    }
    for (day, t) in group(&recs, |r| r.created_at.format("%Y-%m-%d").to_string()) {
        assert!(text.contains(&format!("{day} {}", amounts(&t))), "day {day}:\n{text}");
    }
    assert!(
        !text.contains("gemini-2.0-flash"),
        "bob's usage is not on alice's statement"
    );

    // The CSV says the same.
    let csv = h
        .http
        .get(h.url("/api/usage/statement?format=csv"))
        .header("x-goog-api-key", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("section,name,records,messages,tokens,bytes,cost\n"));
    assert!(
        csv.lines()
            .any(|l| l == format!("total,,{},{messages},{tokens},{bytes},{cost}", recs.len())),
        "{csv}"
    );
    assert!(csv.lines().any(|l| l == "user,alice,,,,,"), "{csv}");

    // The operator gets the same statement of any user.
    let admin = h
        .admin(
            reqwest::Method::GET,
            &format!("/admin/users/alice/statement?month={month}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    let admin_text = pdf_text(&admin.bytes().await.unwrap());
    assert!(admin_text.lines().any(|l| l == format!("Total cost {cost}")));
    let bob_csv = h
        .admin(reqwest::Method::GET, "/admin/users/bob/statement?format=csv")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(bob_csv.contains("model,gemini-2.0-flash,2,1,"), "{bob_csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_parameters_are_checked_and_an_empty_month_renders() {
    let h = Harness::start("").await;
    let key = h.user_with_key("carol", "free").await;
    let get = |path: &str| h.http.get(h.url(path)).header("x-goog-api-key", &key).send();
    for (path, want) in [
        ("/api/usage/statement?month=2026-13", "month must be YYYY-MM"),
        ("/api/usage/statement?month=nope", "month must be YYYY-MM"),
        ("/api/usage/statement?format=docx", "format must be pdf or csv"),
    ] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
        assert!(v["error"]["message"].as_str().unwrap().starts_with(want), "{v}");
    }
    let r = h.http.get(h.url("/api/usage/statement")).send().await.unwrap();
    assert_eq!(r.status(), 401, "no key");
    let r = h
        .admin(reqwest::Method::GET, "/admin/users/nobody/statement")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = h
        .http
        .get(h.url("/admin/users/carol/statement"))
        .header("x-goog-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a user key is not the admin token");

    // A month without usage still renders, and says so.
    let pdf = get("/api/usage/statement?month=2020-02")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(pdf_pages_as_png(&pdf), 1);
    let text = pdf_text(&pdf);
    assert!(text.lines().any(|l| l == "Records 0"), "{text}");
    assert!(text.contains("Period 2020-02-01 to 2020-02-29 (UTC)"), "{text}");
    assert!(text.contains("(no usage)"), "{text}");
}
