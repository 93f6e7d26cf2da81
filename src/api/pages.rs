//! The two HTML pages served from the binary: `GET /dashboard` (a person's usage, with their
//! key) and `GET /admin/dashboard` (the operator's analytics, with the admin token).
//!
//! Each page is one self-contained document: the HTML under `assets/` with the shared
//! stylesheet and its scripts inlined at first use. Nothing is fetched from elsewhere (the
//! charts are SVG drawn by `assets/charts.js`). The Content-Security-Policy allows exactly
//! these inline blocks (by hash), connections to this origin, and nothing else.

use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::proxy::body::ProxyBody;

const BASE_CSS: &str = include_str!("assets/base.css");
const CHARTS_JS: &str = include_str!("assets/charts.js");
const DASHBOARD_HTML: &str = include_str!("assets/dashboard.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const ADMIN_HTML: &str = include_str!("assets/admin.html");
const ADMIN_JS: &str = include_str!("assets/admin.js");

/// A page ready to serve: the assembled document and its security policy.
#[derive(Debug)]
struct Page {
    html: Bytes,
    csp: HeaderValue,
}

impl Page {
    /// Inlines `css` and `js` into `template` at its `{{style}}` and `{{script}}` markers.
    fn build(template: &str, css: &str, js: &[&str]) -> Page {
        let script = js.join("\n");
        let csp = format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src 'self' data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(&script),
            hash(css)
        );
        let html = template
            .replacen("{{style}}", css, 1)
            .replacen("{{script}}", &script, 1);
        Page {
            html: Bytes::from(html),
            // The policy is ASCII by construction; an empty value would only drop the policy.
            csp: HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'")),
        }
    }

    fn response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(self.html.clone()));
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        resp
    }
}

/// The CSP source for an inline block.
fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

static DASHBOARD: LazyLock<Page> = LazyLock::new(|| Page::build(DASHBOARD_HTML, BASE_CSS, &[CHARTS_JS, DASHBOARD_JS]));
static ADMIN: LazyLock<Page> = LazyLock::new(|| Page::build(ADMIN_HTML, BASE_CSS, &[CHARTS_JS, ADMIN_JS]));

/// `GET /dashboard`: the usage page for a person (public; the key is entered on the page).
pub fn dashboard() -> Response<ProxyBody> {
    DASHBOARD.response()
}

/// `GET /admin/dashboard`: the operator's analytics page (public; it asks for the admin token).
pub fn admin_dashboard() -> Response<ProxyBody> {
    ADMIN.response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_self_contained_and_the_policy_matches_the_inline_blocks() {
        for (template, js) in [
            (DASHBOARD_HTML, &[CHARTS_JS, DASHBOARD_JS]),
            (ADMIN_HTML, &[CHARTS_JS, ADMIN_JS]),
        ] {
            assert_eq!(template.matches("{{style}}").count(), 1);
            assert_eq!(template.matches("{{script}}").count(), 1);
            let page = Page::build(template, BASE_CSS, js);
            let html = std::str::from_utf8(&page.html).unwrap();
            // One inline script and one stylesheet, whose hashes the policy names.
            assert_eq!(html.matches("<script").count(), 1, "no other script element");
            let script = html
                .split_once("<script>")
                .unwrap()
                .1
                .split_once("</script>")
                .unwrap()
                .0;
            let style = html.split_once("<style>").unwrap().1.split_once("</style>").unwrap().0;
            let csp = page.csp.to_str().unwrap();
            assert!(csp.contains(&hash(script)), "{csp}");
            assert!(csp.contains(&hash(style)), "{csp}");
            // Nothing from elsewhere (no absolute or protocol-relative URLs to load), and the
            // key never goes to persistent storage.
            for needle in [
                "src=\"http",
                "href=\"http",
                "src=\"//",
                "href=\"//",
                "url(",
                "@import",
                "fetch('http",
                "localStorage",
            ] {
                assert!(!html.contains(needle), "page contains {needle}");
            }
        }
    }

    #[test]
    fn pages_are_html_with_a_policy() {
        for resp in [dashboard(), admin_dashboard()] {
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
            assert!(
                resp.headers()[header::CONTENT_SECURITY_POLICY]
                    .to_str()
                    .unwrap()
                    .starts_with("default-src 'none'")
            );
        }
    }
}
