//! The admin command line's HTTP client: hyper over rustls (the stack the gateway itself uses
//! upstream), HTTP/1.1 or h2 by ALPN, a custom CA and a client certificate for mutual TLS.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use super::CliError;

/// Deadline for a whole answer other than an export (which streams as long as it takes).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// TLS files of the command line.
#[derive(Debug, Default, Clone)]
pub struct TlsFiles<'a> {
    /// Extra CA certificates (PEM) to trust, besides the public roots.
    pub ca: Option<&'a Path>,
    /// Client certificate chain and key (PEM), for a gateway with a client CA.
    pub client: Option<(&'a Path, &'a Path)>,
}

/// A client bound to one gateway and its admin token.
pub struct AdminClient {
    base: String,
    token: String,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn read_pem_err(what: &str, path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("cannot read the {what} {}: {e}", path.display()))
}

fn tls_config(files: &TlsFiles<'_>) -> Result<rustls::ClientConfig, CliError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = files.ca {
        let certs = CertificateDer::pem_file_iter(ca).map_err(|e| read_pem_err("CA file", ca, e))?;
        let mut n = 0;
        for c in certs {
            let c = c.map_err(|e| read_pem_err("CA file", ca, e))?;
            roots.add(c).map_err(|e| read_pem_err("CA file", ca, e))?;
            n += 1;
        }
        if n == 0 {
            return Err(CliError::Usage(format!("{} holds no certificate", ca.display())));
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Other(e.to_string()))?
        .with_root_certificates(roots);
    // ALPN (h2, http/1.1) is set by the connector builder.
    let cfg = match files.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| read_pem_err("client certificate", cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| read_pem_err("client certificate", cert, e))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_pem_err("client key", key, e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| CliError::Usage(format!("client certificate and key: {e}")))?
        }
    };
    Ok(cfg)
}

impl AdminClient {
    /// A client for the gateway at `base` (`http://host:port` or `https://…`).
    pub fn new(base: &str, token: String, tls: &TlsFiles<'_>) -> Result<AdminClient, CliError> {
        let base = base.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|_| CliError::Usage(format!("{base:?} is not a URL such as http://127.0.0.1:8080")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(CliError::Usage(format!(
                "{base:?} is not an http:// or https:// URL with a host"
            )));
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(tls)?)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Ok(AdminClient {
            base,
            token,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sends a request and returns the response if its status is a success; otherwise the
    /// gateway's error (its envelope's message) as a [`CliError`].
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Response<Incoming>, CliError> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(
                header::USER_AGENT,
                concat!("gemini-meter-admin/", env!("CARGO_PKG_VERSION")),
            );
        let bytes = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = b
            .body(Full::new(bytes))
            .map_err(|e| CliError::Usage(format!("bad request: {e}")))?;
        let resp = self.http.request(req).await.map_err(|e| CliError::Connect {
            addr: self.base.clone(),
            why: error_chain(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = tokio::time::timeout(ANSWER_TIMEOUT, resp.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Err(http_error(status, &body))
    }

    /// Sends a request and parses its JSON answer.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        let resp = self.send(method, path, body).await?;
        let collected = tokio::time::timeout(ANSWER_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| CliError::Connect {
                addr: self.base.clone(),
                why: "no complete answer in time".into(),
            })?
            .map_err(|e| CliError::Connect {
                addr: self.base.clone(),
                why: error_chain(&e),
            })?;
        serde_json::from_slice(&collected.to_bytes())
            .map_err(|e| CliError::Other(format!("the gateway's answer is not JSON: {e}")))
    }
}

/// The error for a non-success answer: the message of the Gemini error envelope when there is
/// one, else the body's start.
fn http_error(status: StatusCode, body: &[u8]) -> CliError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            // The error envelope's message; a refused reload's reason.
            let m = v["error"]["message"]
                .as_str()
                .or_else(|| v["last_error"].as_str())
                .or_else(|| v["tls"]["last_error"].as_str());
            m.map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string());
    let message = format!("{} {}", status.as_u16(), message);
    if status.is_server_error() {
        CliError::Server(message)
    } else {
        CliError::Refused(message)
    }
}

/// An error and its sources on one line (hyper's own message alone says little).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = inner.source();
    }
    s
}
