//! Webhook deliveries: a JSON `POST` of the alert, signed with HMAC-SHA256 when a secret is set.
//!
//! Headers: `content-type: application/json`, `x-gemini-meter-event: quota.threshold`,
//! `x-gemini-meter-delivery: <delivery id>` (stable across retries and restarts: receivers
//! deduplicate on it), and with a secret `x-gemini-meter-signature: sha256=<hex HMAC-SHA256 of
//! the raw body>`. Any 2xx answer is a success; anything else, a timeout or a refused connection
//! is retried.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::Sha256;

use super::failure::Failure;
use crate::config::AlertsConfig;
use crate::ledger::alerts::Delivery;
use crate::runtime::EnvLookup;

/// Connect deadline of a delivery.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a whole delivery (connect, send, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of a receiver's answer that is read (and thrown away).
const MAX_ANSWER: usize = 64 * 1024;

/// The client deliveries go through.
pub(super) type WebhookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A small pooled client of its own (TLS with the bundled roots; http:// allowed).
pub(super) fn client() -> WebhookClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4)
        .build(https)
}

/// The `x-gemini-meter-signature` value of a body: `sha256=` and the hex HMAC-SHA256 of the
/// body's bytes under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; the error branch cannot happen.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        }
        Err(_) => String::new(),
    }
}

/// Sends one webhook delivery.
pub(super) async fn send(
    client: &WebhookClient,
    cfg: &AlertsConfig,
    env: &EnvLookup,
    d: &Delivery,
) -> Result<(), Failure> {
    let Some(url) = &cfg.webhook_url else {
        return Err(Failure::Retry("alerts.webhook_url is not configured".into()));
    };
    let body = serde_json::to_vec(&d.alert.body()).map_err(|e| Failure::Permanent(e.to_string()))?;
    let mut req = Request::post(url.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, concat!("gemini-meter/", env!("CARGO_PKG_VERSION")))
        .header("x-gemini-meter-event", "quota.threshold")
        .header("x-gemini-meter-delivery", d.id.as_str());
    if let Some(secret) = cfg
        .webhook_secret_env
        .as_deref()
        .and_then(|n| env(n))
        .filter(|s| !s.is_empty())
    {
        req = req.header("x-gemini-meter-signature", signature(secret.as_bytes(), &body));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Failure::Permanent(format!("bad webhook request: {e}")))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| Failure::Retry(describe(&e)))?;
        let status = resp.status();
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::Retry(format!("HTTP {}", status.as_u16())))
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Retry(format!(
            "no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

/// The innermost cause of a client error ("connection refused" rather than "client error").
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
