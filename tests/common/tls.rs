//! Test certificates made with the openssl command line (a CA, server certificates signed by it
//! for localhost and 127.0.0.1, client certificates), and a small HTTPS client on tokio-rustls
//! that reports which certificate the server presented and which protocol ALPN chose.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Key algorithms of the generated certificates.
#[derive(Clone, Copy)]
pub enum Alg {
    /// ECDSA P-256.
    Ec,
    /// RSA 2048.
    Rsa,
}

/// A test CA in a directory; it signs certificates on request.
pub struct TestCa {
    pub dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line is needed for the TLS tests (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn newkey(alg: Alg) -> Vec<&'static str> {
    match alg {
        Alg::Ec => vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        Alg::Rsa => vec!["-newkey", "rsa:2048"],
    }
}

impl TestCa {
    /// A new CA (ECDSA P-256) in `dir`, named `name`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        let mut args = vec!["req", "-x509"];
        args.extend(newkey(Alg::Ec));
        let subj = format!("/CN={name}");
        args.extend([
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "3650",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A certificate signed by this CA: `(cert.pem, key.pem)` named `name` in the CA's
    /// directory; `server` makes a server certificate for localhost and 127.0.0.1, otherwise a
    /// client certificate.
    pub fn issue(&self, name: &str, alg: Alg, server: bool) -> (PathBuf, PathBuf) {
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let ext = self.dir.join(format!("{name}.ext"));
        let mut args = vec!["req", "-new"];
        args.extend(newkey(alg));
        let subj = format!("/CN={name}");
        args.extend([
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &subj,
        ]);
        openssl(&self.dir, &args);
        let ext_text = if server {
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        } else {
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
        };
        std::fs::write(&ext, ext_text).unwrap();
        let serial = format!("0x{:016x}", rand_u64());
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-set_serial",
                &serial,
                "-days",
                "365",
                "-out",
                cert.to_str().unwrap(),
                "-extfile",
                ext.to_str().unwrap(),
            ],
        );
        (cert, key)
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

/// The DER of the first certificate in a PEM file.
pub fn leaf_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Replaces `dst` with `src`'s content in one step (write aside, rename), as deploy tools do.
pub fn swap_file(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("swap-tmp");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// A TLS client trusting `ca`, offering `alpn`, with an optional client certificate.
pub fn client_config(ca: &Path, alpn: &[&[u8]], client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let certs: Vec<_> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// One open HTTPS connection (HTTP/1.1 or h2, as ALPN chose).
pub struct TlsConn {
    /// The server's leaf certificate (DER).
    pub server_cert: Vec<u8>,
    /// The ALPN protocol chosen.
    pub alpn: Option<Vec<u8>>,
    h1: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    h2: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
}

impl TlsConn {
    /// Connects to `addr` as `localhost`.
    pub async fn open(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<TlsConn> {
        let tcp = TcpStream::connect(addr).await?;
        let tls = TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        let (_, session) = tls.get_ref();
        let server_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let mut conn = TlsConn {
            server_cert,
            alpn: alpn.clone(),
            h1: None,
            h2: None,
        };
        if alpn.as_deref() == Some(b"h2") {
            let (send, c) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(c);
            conn.h2 = Some(send);
        } else {
            let (send, c) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(c);
            conn.h1 = Some(send);
        }
        Ok(conn)
    }

    /// Sends a request on this connection; returns the status, version and body.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, http::Version, String) {
        let mut b = http::Request::builder().method(method);
        b = if self.h2.is_some() {
            b.uri(format!("https://localhost{path}"))
        } else {
            b.uri(path).header("host", "localhost")
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = if let Some(h2) = &mut self.h2 {
            h2.send_request(req).await.unwrap()
        } else {
            let h1 = self.h1.as_mut().unwrap();
            h1.ready().await.unwrap();
            h1.send_request(req).await.unwrap()
        };
        let status = resp.status().as_u16();
        let version = resp.version();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, version, String::from_utf8_lossy(&bytes).into_owned())
    }
}
