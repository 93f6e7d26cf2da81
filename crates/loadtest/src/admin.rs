//! The gateway's admin API as the load tool uses it: create the load users and their keys, and
//! read the month totals that the metering check compares with the tool's own count.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::LoadError;
use super::client::{TlsClient, connect_with};

/// Bound on one admin call, so a wedged gateway cannot hang the tool.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for one gateway's admin API.
#[derive(Debug, Clone)]
pub struct Admin {
    addr: SocketAddr,
    token: String,
    tls: Option<TlsClient>,
}

/// What the ledger holds for the current month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Messages (one per successful generate call).
    pub messages: u64,
    /// Usage records (a `message_sent` and an `ai_response` per call).
    pub records: u64,
    /// Tokens billed.
    pub tokens: u64,
}

impl Admin {
    /// An admin client for the gateway at `addr`.
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Admin { addr, token, tls: None }
    }

    /// An admin client for the gateway at `addr` serving TLS (`--tls`).
    pub fn with_tls(addr: SocketAddr, token: String, tls: TlsClient) -> Self {
        Admin {
            addr,
            token,
            tls: Some(tls),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(StatusCode, Value), LoadError> {
        let fut = async {
            let mut sender = connect_with(self.addr, self.tls.as_ref())
                .await
                .map_err(|e| LoadError::Admin(format!("connect: {e}")))?;
            let body = match body {
                Some(v) => Full::new(Bytes::from(v.to_string())),
                None => Full::new(Bytes::new()),
            };
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, self.addr.to_string())
                .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .map_err(|e| LoadError::Admin(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| LoadError::Admin(format!("{path}: {e}")))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| LoadError::Admin(format!("{path}: {e}")))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok((status, v))
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| LoadError::Admin(format!("{path}: no answer within {CALL_TIMEOUT:?}")))?
    }

    /// Creates user `id` in `tier` and returns a new key for it.
    pub async fn user_with_key(&self, id: &str, tier: &str) -> Result<String, LoadError> {
        let (s, v) = self
            .call(Method::POST, "/admin/users", Some(json!({"id": id, "tier": tier})))
            .await?;
        if s != StatusCode::CREATED {
            return Err(LoadError::Admin(format!("create user {id}: {s} {v}")));
        }
        let (s, v) = self
            .call(Method::POST, &format!("/admin/users/{id}/keys"), None)
            .await?;
        match v.get("key").and_then(Value::as_str) {
            Some(k) if s == StatusCode::CREATED => Ok(k.to_string()),
            _ => Err(LoadError::Admin(format!("create key for {id}: {s} {v}"))),
        }
    }

    /// The current month's totals (`GET /admin/analytics/summary`).
    pub async fn summary(&self) -> Result<Summary, LoadError> {
        let (s, v) = self.call(Method::GET, "/admin/analytics/summary", None).await?;
        if s != StatusCode::OK {
            return Err(LoadError::Admin(format!("summary: {s} {v}")));
        }
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(Summary {
            messages: n("messages"),
            records: n("records"),
            tokens: n("tokens"),
        })
    }
}
