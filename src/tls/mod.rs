//! TLS termination: the rustls server config built from `[server.tls]`'s PEM files, and its
//! reload when the files change on disk.
//!
//! Owns reading and checking the certificate, key and client CA files, and the live
//! `rustls::ServerConfig` that each new handshake takes. It does not accept connections (that is
//! [`crate::accept`]) and does not decide what a client certificate allows (the admin API does).
//! Connections already open keep the config they shook hands with, so a reload drops nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::audit::{AuditLog, Entry, Outcome};
use crate::clock::SharedClock;
use crate::config::TlsConfig;
use crate::runtime::Live;

/// What is wrong with the TLS files. Messages name the file and never hold key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or is not PEM.
    #[error("{key}: cannot read {path}: {why}")]
    Read {
        /// The config key naming the file (e.g. `server.tls.cert_path`).
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The file has no item of the kind expected.
    #[error("{key}: {path} holds no {what}")]
    Empty {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What was looked for.
        what: &'static str,
    },
    /// rustls refused the material (key not matching the certificate, unsupported key, bad CA).
    #[error("{key}: {why}")]
    Refused {
        /// The config key naming the file.
        key: &'static str,
        /// rustls's reason.
        why: String,
    },
}

/// The ALPN protocols offered, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads and checks the files of `cfg` and builds the server config: the certificate chain and
/// its key (RSA or ECDSA), ALPN h2 and http/1.1, and with `client_ca_path` a verifier that checks
/// a client certificate when one is presented (whether one is required is the route's call).
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = read_certs("server.tls.cert_path", &cfg.cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            key: "server.tls.key_path",
            path: cfg.key_path.display().to_string(),
            what: "private key (PKCS#8, RSA or EC)",
        },
        other => TlsError::Read {
            key: "server.tls.key_path",
            path: cfg.key_path.display().to_string(),
            why: other.to_string(),
        },
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| refused("server.tls", e))?;
    let builder = match &cfg.client_ca_path {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in read_certs("server.tls.client_ca_path", path)? {
                roots.add(ca).map_err(|e| refused("server.tls.client_ca_path", e))?;
            }
            // Optional at the handshake: the usage API and the proxied routes stay open to
            // callers without a certificate; the admin routes check that one was verified.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| refused("server.tls.client_ca_path", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    // with_single_cert also checks that the key belongs to the leaf certificate.
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InvalidCertificate(why) => TlsError::Refused {
            key: "server.tls.cert_path",
            why: format!("{}: the certificate cannot be used: {why:?}", cfg.cert_path.display()),
        },
        rustls::Error::InconsistentKeys(_) => TlsError::Refused {
            key: "server.tls.key_path",
            why: format!(
                "{} is not the private key of the certificate in {}",
                cfg.key_path.display(),
                cfg.cert_path.display()
            ),
        },
        other => TlsError::Refused {
            key: "server.tls.key_path",
            why: format!("{}: {other}", cfg.key_path.display()),
        },
    })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn refused(key: &'static str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Refused {
        key,
        why: e.to_string(),
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |e: rustls::pki_types::pem::Error| TlsError::Read {
        key,
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The state of the certificate in use, for `GET /admin/config/status`.
#[derive(Debug, Clone, Default)]
pub struct TlsStatus {
    /// When the certificate in use was loaded.
    pub loaded_at: Option<DateTime<Utc>>,
    /// The error of the last failed reload, until a good one clears it.
    pub last_error: Option<String>,
}

/// What each new handshake takes.
struct Loaded {
    config: Arc<rustls::ServerConfig>,
    client_ca: bool,
}

/// The live TLS config and its reload from disk.
pub struct TlsReloader {
    current: ArcSwap<Loaded>,
    live: Arc<Live>,
    audit: Arc<AuditLog>,
    status: Mutex<TlsStatus>,
    /// Digest of the file names and contents last tried, so a file is re-read only on change.
    fingerprint: Mutex<Option<[u8; 32]>>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader").finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Loads the files named by the running config; `None` when it has no `[server.tls]`.
    /// Reloads the watcher starts are written to `audit`.
    pub fn start(live: Arc<Live>, audit: Arc<AuditLog>, now: DateTime<Utc>) -> Result<Option<Arc<Self>>, TlsError> {
        let Some(cfg) = live.load().config.server.tls.clone() else {
            return Ok(None);
        };
        let config = server_config(&cfg)?;
        Ok(Some(Arc::new(TlsReloader {
            current: ArcSwap::from_pointee(Loaded {
                config,
                client_ca: cfg.client_ca_path.is_some(),
            }),
            live,
            audit,
            status: Mutex::new(TlsStatus {
                loaded_at: Some(now),
                last_error: None,
            }),
            fingerprint: Mutex::new(fingerprint(&cfg)),
        })))
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().config.clone())
    }

    /// True when the certificate in use came with a client CA: the admin routes then need a
    /// verified client certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.current.load().client_ca
    }

    /// The reload status.
    pub fn status(&self) -> TlsStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Re-reads the files now. A bad file keeps the certificate in use and is reported.
    pub fn reload(&self, now: DateTime<Utc>) -> Result<(), String> {
        let Some(cfg) = self.live.load().config.server.tls.clone() else {
            return Err("[server.tls] was removed: TLS stays on until a restart".into());
        };
        if let Ok(mut fp) = self.fingerprint.lock() {
            *fp = fingerprint(&cfg);
        }
        let result = server_config(&cfg);
        let mut st = match self.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match result {
            Ok(config) => {
                self.current.store(Arc::new(Loaded {
                    config,
                    client_ca: cfg.client_ca_path.is_some(),
                }));
                st.loaded_at = Some(now);
                st.last_error = None;
                tracing::info!(cert = %cfg.cert_path.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "TLS reload rejected; the certificate in use stays");
                st.last_error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// Reloads when a file (or a file name in the config) changed since the last attempt.
    pub fn reload_if_changed(&self, now: DateTime<Utc>) {
        let Some(cfg) = self.live.load().config.server.tls.clone() else {
            return;
        };
        let changed = self
            .fingerprint
            .lock()
            .map(|g| *g != fingerprint(&cfg))
            .unwrap_or(false);
        if changed {
            let result = self.reload(now);
            self.audit.record_blocking(&Entry {
                at: now,
                action: "tls.reload",
                target: Some(cfg.cert_path.display().to_string()),
                caller: "file-watch".into(),
                outcome: if result.is_ok() { Outcome::Ok } else { Outcome::Failed },
                status: None,
                detail: match result {
                    Ok(()) => serde_json::json!({}),
                    Err(e) => serde_json::json!({ "error": e }),
                },
            });
        }
    }

    /// Polls the files every `every` (as the config file is polled) until the handle is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration, clock: SharedClock) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let this = this.clone();
                let now = clock.now();
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed(now)).await;
            }
        })
    }
}

/// Digest of the file names and their contents (`None` for a file that cannot be read, so its
/// reappearance counts as a change).
fn fingerprint(cfg: &TlsConfig) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    let files: [Option<&PathBuf>; 3] = [Some(&cfg.cert_path), Some(&cfg.key_path), cfg.client_ca_path.as_ref()];
    for path in files.into_iter().flatten() {
        h.update(path.as_os_str().as_encoded_bytes());
        h.update([0]);
        let bytes = std::fs::read(path).ok()?;
        h.update(Sha256::digest(&bytes));
    }
    Some(h.finalize().into())
}
