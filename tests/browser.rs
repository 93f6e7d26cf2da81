//! Browser tests: the usage dashboard and the operator page in real headless Chromium (Debian's
//! `chromium` + `chromium-driver`), driven over WebDriver. Screenshots go to `tests/artifacts/`.
//!
//! Without `/usr/bin/chromedriver` these tests fail with a message saying what to install,
//! unless `GEMINI_METER_SKIP_BROWSER=1` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "browser/webdriver.rs"]
mod webdriver;

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, Harness};
use serde_json::{Value, json};
use webdriver::{Browser, browser_available};

/// One Chromium at a time: the machine is small and the pages are timing-sensitive.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(15);

/// Makes `n` generate calls (alternating unary and SSE streaming) and reads each to the end.
async fn calls(h: &Harness, key: &str, n: usize) {
    for i in 0..n {
        let r = h.generate(key, "gemini-2.5-flash", i % 2 == 1).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The width of a quota's bar fill as a fraction of its track, once the transition settled.
async fn bar_fraction(b: &Browser, quota: &str, want: f64) -> f64 {
    let expr = format!(
        "(() => {{ const q = document.querySelector('.quota[data-quota=\"{quota}\"]'); \
         return q.querySelector('.fill').getBoundingClientRect().width / q.querySelector('.bar').getBoundingClientRect().width; }})()"
    );
    let v = b
        .wait_for(&format!("the {quota} bar at {want}"), &expr, WAIT, |v| {
            v.as_f64().is_some_and(|f| (f - want).abs() < 0.004)
        })
        .await;
    v.as_f64().unwrap()
}

/// No horizontal scrolling at the current window size.
async fn fits_width(b: &Browser) -> bool {
    b.eval("document.documentElement.scrollWidth <= window.innerWidth")
        .await
        == json!(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_this_months_numbers_and_bars() {
    if !browser_available("dashboard_shows_this_months_numbers_and_bars") {
        return;
    }
    let _one = BROWSER.lock().await;
    let h = Harness::start("").await;
    let key = h.user_with_key("alice", "free").await;
    calls(&h, &key, 3).await;
    h.sync().await;
    let cur = h.current(&key).await;
    assert_eq!(cur["current_month"]["messages"], 3);
    let tokens = cur["current_month"]["tokens"].as_u64().unwrap();
    assert!(tokens > 0);

    let b = Browser::start().await;
    b.goto(&h.url(&format!("/dashboard#key={key}"))).await;
    b.wait_text(".quota[data-quota=\"messages\"] .text", "3 / 100 messages", WAIT)
        .await;
    let frac = bar_fraction(&b, "messages", 0.03).await;
    assert!((frac - 0.03).abs() < 0.004, "messages bar is {frac} of its track");
    assert_eq!(
        b.eval("document.querySelector('.quota[data-quota=\"messages\"] .fill').style.width")
            .await,
        json!("3%")
    );
    assert_eq!(b.text(".quota[data-quota=\"messages\"] .pct").await, "3%");
    assert_eq!(
        b.text(".quota[data-quota=\"tokens\"] .text").await,
        format!("{} / 1,000,000 tokens", thousands(tokens))
    );
    // The free tier has no storage limit.
    assert_eq!(
        b.text(".quota[data-quota=\"bytes\"] .text").await,
        "0 B storage · unlimited"
    );
    assert_eq!(b.text(".quota[data-quota=\"bytes\"] .pct").await, "Unlimited");
    // Cost so far, exactly the counters' value, and its breakdowns (after they load).
    assert_eq!(
        b.eval("document.getElementById('cost-total').dataset.exact").await,
        cur["current_month"]["cost"]
    );
    b.wait_visible("#by-model tr[data-model=\"gemini-2.5-flash\"]", WAIT)
        .await;
    let model_row = b.text("#by-model tr[data-model=\"gemini-2.5-flash\"]").await;
    assert!(
        model_row.contains("gemini-2.5-flash") && model_row.contains(&thousands(tokens)),
        "{model_row}"
    );
    let total_cost = b
        .eval("document.querySelector('#by-type tr[data-type=\"total\"] td.num:last-child').title")
        .await;
    assert_eq!(total_cost, cur["current_month"]["cost"]);
    assert!(b.visible("#by-type tr[data-type=\"ai_response\"]").await);
    // The 30-day chart: today's bar holds the 3 messages.
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let bar = b
        .wait_for(
            "today's bar in the chart",
            &format!("(() => {{ const r = document.querySelector('#daily-chart svg rect.bar[data-day=\"{today}\"]'); return r && Number(r.dataset.value); }})()"),
            WAIT,
            |v| v.as_f64().is_some(),
        )
        .await;
    assert_eq!(bar, json!(3));
    assert_eq!(
        b.eval("document.querySelectorAll('#daily-chart svg rect.bar').length")
            .await,
        json!(1)
    );
    // Recent requests from the history: 3 messages and 3 responses.
    assert_eq!(
        b.eval("document.querySelectorAll('#recent tbody tr[data-id]').length")
            .await,
        json!(6)
    );
    assert!(
        b.text("#reset").await.starts_with("Resets "),
        "{}",
        b.text("#reset").await
    );
    assert_eq!(b.text("#plan-name").await, "free");
    assert!(!b.visible("#banner").await, "no warning below 90%");
    // The key: in sessionStorage, out of the address bar, never in localStorage.
    assert_eq!(b.eval("sessionStorage.getItem('gemini-meter.key')").await, json!(key));
    assert_eq!(b.eval("localStorage.length").await, json!(0));
    assert_eq!(b.eval("location.hash").await, json!(""));
    assert!(!b.eval("location.href").await.as_str().unwrap().contains(&key));
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let shot = b.screenshot_full("dashboard.png").await;
    eprintln!("screenshot: {}", shot.display());

    // A reload keeps the key for the tab.
    b.goto(&h.url("/dashboard")).await;
    b.wait_text(".quota[data-quota=\"messages\"] .text", "3 / 100 messages", WAIT)
        .await;

    // Readable on a phone: no sideways scrolling.
    b.set_window(390, 844).await;
    b.wait_for("the narrow layout", "window.innerWidth", WAIT, |v| {
        v.as_u64().is_some_and(|w| w <= 400)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(fits_width(&b).await, "the dashboard scrolls sideways at phone width");
    let shot = b.screenshot_full("dashboard-phone.png").await;
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_warns_from_90_percent_of_a_quota() {
    if !browser_available("dashboard_warns_from_90_percent_of_a_quota") {
        return;
    }
    let _one = BROWSER.lock().await;
    let h = Harness::start("[tiers.small]\nmessages = 10\n").await;
    let key = h.user_with_key("bob", "small").await;
    calls(&h, &key, 8).await;

    let b = Browser::start().await;
    b.goto(&h.url(&format!("/dashboard#key={key}"))).await;
    b.wait_text(".quota[data-quota=\"messages\"] .text", "8 / 10 messages", WAIT)
        .await;
    assert!(!b.visible("#banner").await, "no banner at 80%");

    // The ninth message crosses 90%: the banner appears (live, without a reload).
    calls(&h, &key, 1).await;
    b.wait_visible("#banner", WAIT).await;
    let text = b.text("#banner").await;
    assert!(
        text.contains("You have used 90% of your monthly messages (9 / 10)"),
        "{text}"
    );
    assert!(text.contains("Upgrade your plan"), "{text}");
    let href = b
        .eval("document.getElementById('upgrade-link').getAttribute('href')")
        .await;
    assert_eq!(href, json!("#plan"));
    assert_eq!(
        b.eval("document.querySelector('.quota[data-quota=\"messages\"] .fill').classList.contains('bad')")
            .await,
        json!(true)
    );
    bar_fraction(&b, "messages", 0.9).await;
    let shot = b.screenshot("dashboard-warning.png").await;
    eprintln!("screenshot: {}", shot.display());

    // A fresh load shows it too, and at 100% it says the limit is reached.
    calls(&h, &key, 1).await;
    b.goto(&h.url("/dashboard")).await;
    b.wait_text(".quota[data-quota=\"messages\"] .text", "10 / 10 messages", WAIT)
        .await;
    b.wait_visible("#banner", WAIT).await;
    let text = b.text("#banner").await;
    assert!(
        text.contains("You have reached your monthly message limit (10 / 10)"),
        "{text}"
    );
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_says_clearly_when_a_key_is_not_valid() {
    if !browser_available("dashboard_says_clearly_when_a_key_is_not_valid") {
        return;
    }
    let _one = BROWSER.lock().await;
    let h = Harness::start("").await;
    let key = h.user_with_key("carol", "free").await;

    let b = Browser::start().await;
    // A well-formed key that this gateway never issued, in the fragment.
    let bad = "gm_0123456789abcdefghijABCDEFGHIJ0123456789";
    b.goto(&h.url(&format!("/dashboard#key={bad}"))).await;
    b.wait_visible("#key-error", WAIT).await;
    let msg = b.text("#key-error").await;
    assert!(msg.starts_with("This key is not valid"), "{msg}");
    assert!(b.visible("#key-form").await);
    assert!(!b.visible("#usage").await);
    assert_eq!(b.eval("sessionStorage.getItem('gemini-meter.key')").await, Value::Null);
    let shot = b.screenshot("dashboard-bad-key.png").await;
    eprintln!("screenshot: {}", shot.display());

    // Typed into the form: garbage is refused the same way, the right key works.
    b.type_into("#key-input", "not-a-key").await;
    b.click("#key-submit").await;
    b.wait_for(
        "the error again",
        "document.getElementById('key-error').hidden === false && document.getElementById('key-form').hidden === false",
        WAIT,
        |v| v == &json!(true),
    )
    .await;
    assert!(b.text("#key-error").await.starts_with("This key is not valid"));
    b.type_into("#key-input", &key).await;
    b.click("#key-submit").await;
    b.wait_text(".quota[data-quota=\"messages\"] .text", "0 / 100 messages", WAIT)
        .await;
    assert!(!b.visible("#key-error").await);
    assert_eq!(b.eval("sessionStorage.getItem('gemini-meter.key')").await, json!(key));
    // Signing out forgets the key.
    b.click("#sign-out").await;
    b.wait_visible("#key-form", WAIT).await;
    assert_eq!(b.eval("sessionStorage.getItem('gemini-meter.key')").await, Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_updates_live_when_a_call_is_made() {
    if !browser_available("dashboard_updates_live_when_a_call_is_made") {
        return;
    }
    let _one = BROWSER.lock().await;
    let h = Harness::start("").await;
    let key = h.user_with_key("dave", "free").await;

    let b = Browser::start().await;
    b.goto(&h.url(&format!("/dashboard#key={key}"))).await;
    b.wait_text(".quota[data-quota=\"messages\"] .text", "0 / 100 messages", WAIT)
        .await;
    b.wait_text("#live-text", "Live", WAIT).await;

    for n in 1..=2u64 {
        let r = h.generate(&key, "gemini-2.5-flash", n == 2).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let ended = Instant::now();
        b.wait_text(
            ".quota[data-quota=\"messages\"] .text",
            &format!("{n} / 100 messages"),
            Duration::from_secs(3),
        )
        .await;
        eprintln!(
            "call {n}: the page showed it {:?} after the response ended",
            ended.elapsed()
        );
    }
    // The details (chart, breakdown) follow without a reload.
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    b.wait_for(
        "the chart to catch up",
        &format!("(() => {{ const r = document.querySelector('#daily-chart svg rect.bar[data-day=\"{today}\"]'); return r && Number(r.dataset.value); }})()"),
        WAIT,
        |v| v == &json!(2),
    )
    .await;
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_page_renders_its_charts() {
    if !browser_available("admin_page_renders_its_charts") {
        return;
    }
    let _one = BROWSER.lock().await;
    let h = Harness::start("").await;
    let k1 = h.user_with_key("heavy-user", "free").await;
    let k2 = h.user_with_key("light-user", "unlimited").await;
    calls(&h, &k1, 3).await;
    calls(&h, &k2, 1).await;
    h.sync().await;

    let b = Browser::start().await;
    b.goto(&h.url("/admin/dashboard")).await;
    b.wait_visible("#token-form", WAIT).await;
    b.type_into("#token-input", "wrong-token").await;
    b.click("#token-submit").await;
    b.wait_visible("#token-error", WAIT).await;
    assert_eq!(b.text("#token-error").await, "This admin token is not valid.");

    b.type_into("#token-input", ADMIN_TOKEN).await;
    b.click("#token-submit").await;
    b.wait_visible("#analytics", WAIT).await;
    // Month totals.
    assert_eq!(
        b.eval("document.querySelector('[data-stat=\"messages\"] .value').dataset.value")
            .await,
        json!("4")
    );
    assert_eq!(
        b.eval("document.querySelector('[data-stat=\"active_users\"] .value').dataset.value")
            .await,
        json!("2")
    );
    // Daily revenue and usage by type: bars with data.
    for chart in ["#revenue-chart", "#usage-chart"] {
        let n = b
            .eval(&format!("document.querySelectorAll('{chart} svg rect.bar').length"))
            .await;
        assert!(n.as_u64().unwrap() >= 1, "{chart} has no bars");
    }
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let msgs = b
        .eval(&format!("Number(document.querySelector('#usage-chart svg rect.bar[data-day=\"{today}\"][data-series=\"message_sent\"]').dataset.value)"))
        .await;
    assert_eq!(msgs, json!(4));
    let revenue = b
        .eval(&format!(
            "document.querySelectorAll('#revenue-chart svg rect.bar[data-day=\"{today}\"]').length"
        ))
        .await;
    assert!(revenue.as_u64().unwrap() >= 1);
    // Top users, most first, in each of the three charts.
    for by in ["cost", "tokens", "messages"] {
        let labels = b
            .eval(&format!(
                "[...document.querySelectorAll('#top-users [data-by=\"{by}\"] svg rect.bar')].map(r => r.dataset.label)"
            ))
            .await;
        assert_eq!(labels, json!(["heavy-user", "light-user"]), "top users by {by}");
    }
    // Usage by model: a chart and a table row.
    assert_eq!(
        b.eval("document.querySelectorAll('#models-chart svg rect.bar').length")
            .await,
        json!(1)
    );
    let row = b.text("#models tr[data-model=\"gemini-2.5-flash\"]").await;
    assert!(row.contains("gemini-2.5-flash") && row.contains("100.0%"), "{row}");
    // The token: sessionStorage only.
    assert_eq!(
        b.eval("sessionStorage.getItem('gemini-meter.admin-token')").await,
        json!(ADMIN_TOKEN)
    );
    assert_eq!(b.eval("localStorage.length").await, json!(0));
    let shot = b.screenshot_full("admin.png").await;
    eprintln!("screenshot: {}", shot.display());

    b.set_window(390, 844).await;
    b.wait_for("the narrow layout", "window.innerWidth", WAIT, |v| {
        v.as_u64().is_some_and(|w| w <= 400)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(fits_width(&b).await, "the admin page scrolls sideways at phone width");
    let shot = b.screenshot("admin-phone.png").await;
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_downloads_the_months_statement() {
    if !browser_available("dashboard_downloads_the_months_statement") {
        return;
    }
    let _one = BROWSER.lock().await;
    let h = Harness::start("").await;
    let key = h.user_with_key("alice", "free").await;
    calls(&h, &key, 2).await;
    h.sync().await;

    let b = Browser::start().await;
    b.goto(&h.url(&format!("/dashboard#key={key}"))).await;
    b.wait_visible("#statement-pdf", WAIT).await;
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    assert_eq!(
        b.eval("document.getElementById('statement-month').value").await,
        json!(month)
    );
    // What the button saves: the blob handed to the download link (its first bytes and type).
    b.exec(
        "window.__saved = []; const orig = URL.createObjectURL;
         URL.createObjectURL = (blob) => { blob.slice(0, 5).text().then((t) => window.__saved.push([blob.type, blob.size, t])); return orig(blob); };",
        json!([]),
    )
    .await;
    b.click("#statement-pdf").await;
    let saved = b
        .wait_for("the statement's blob", "window.__saved[0] || null", WAIT, |v| {
            v.is_array()
        })
        .await;
    assert_eq!(saved[0], "application/pdf");
    assert!(saved[1].as_u64().unwrap() > 1000, "{saved}");
    assert_eq!(saved[2], "%PDF-");
    assert!(!b.visible("#statement-error").await);
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
}
