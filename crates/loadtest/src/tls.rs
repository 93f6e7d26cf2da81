//! `--tls`: what TLS termination costs the gateway. A second gateway serves the same mock over
//! TLS (a CA and an ECDSA P-256 certificate for 127.0.0.1 made with the openssl command line in
//! the run's temp dir); unary load runs, interleaved in rounds, against the plain gateway and
//! the TLS one, on keep-alive connections and with a new connection per request.
//!
//! Per-request cost over TLS = CPU per request (TLS, keep-alive) - (plain, keep-alive).
//! Handshake cost = CPU per request (TLS, new connection each) - (plain, new connection each)
//! - the per-request cost: what a TLS handshake adds to a TCP connect, on the server.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_rustls::TlsConnector;

use super::admin::Admin;
use super::client::{Phase, TlsClient, run_phase};
use super::procs::{self, Launch};
use super::stats::Tally;
use super::{CallKind, LoadError, Options, configs};

/// One row of the TLS table.
#[derive(Debug, Clone)]
pub struct TlsRow {
    /// `plain keep-alive`, `tls keep-alive`, `plain new conn`, `tls new conn`.
    pub name: &'static str,
    /// What the client saw.
    pub tally: Tally,
    /// Gateway CPU per request over the measured rounds.
    pub cpu_per_request: Option<Duration>,
}

/// The `--tls` figures, or why there are none.
#[derive(Debug, Clone, Default)]
pub struct TlsFigures {
    /// The four rows, in the order above.
    pub rows: Vec<TlsRow>,
    /// Why the TLS measurement did not run.
    pub skipped: Option<String>,
}

impl TlsFigures {
    fn cpu(&self, i: usize) -> Option<f64> {
        self.rows.get(i)?.cpu_per_request.map(|d| d.as_secs_f64() * 1e6)
    }

    /// Extra gateway CPU per request over TLS on a kept-alive connection, µs.
    pub fn per_request_us(&self) -> Option<f64> {
        Some(self.cpu(1)? - self.cpu(0)?)
    }

    /// Extra gateway CPU of a TLS handshake over a plain TCP connection, µs.
    pub fn handshake_us(&self) -> Option<f64> {
        Some(self.cpu(3)? - self.cpu(2)? - self.per_request_us()?)
    }
}

/// The plain gateway of the main run, which the TLS one is compared with.
pub struct Plain<'a> {
    /// Its process id (for CPU time).
    pub pid: u32,
    /// Its address.
    pub addr: SocketAddr,
    /// Its load users' keys.
    pub keys: &'a Arc<Vec<HeaderValue>>,
}

/// Runs the TLS comparison; `gateway_ok`/`gateway_failed` get the plain gateway's requests
/// (the main run's metering check counts them).
pub async fn measure(
    opts: &Options,
    mock: SocketAddr,
    dir: &Path,
    plain: Plain<'_>,
    gateway_ok: &mut u64,
    gateway_failed: &mut u64,
) -> TlsFigures {
    match run(opts, mock, dir, plain, gateway_ok, gateway_failed).await {
        Ok(f) => f,
        Err(e) => TlsFigures {
            rows: Vec::new(),
            skipped: Some(e.to_string()),
        },
    }
}

async fn run(
    opts: &Options,
    mock: SocketAddr,
    dir: &Path,
    plain: Plain<'_>,
    gateway_ok: &mut u64,
    gateway_failed: &mut u64,
) -> Result<TlsFigures, LoadError> {
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir).map_err(LoadError::io("creating the TLS dir"))?;
    make_certs(&tls_dir)?;
    let client = client(&tls_dir.join("ca.pem"))?;
    let config = dir.join("gemini-meter-tls.toml");
    let text = format!(
        "{}\n[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        configs::gateway_toml(mock, &dir.join("data-tls")),
        tls_dir.join("server.pem").display(),
        tls_dir.join("server.key").display()
    );
    std::fs::write(&config, text).map_err(LoadError::io("writing the TLS gateway config"))?;
    let secret = super::run::gemini_meter_secret()?;
    let (gw, addr) = procs::start_gateway(
        &opts.binary,
        Launch::Direct,
        &config,
        &secret,
        "loadtest-upstream-key",
        opts.gateway_workers,
    )
    .await?;
    let admin = Admin::with_tls(addr, secret, client.clone());
    let mut keys = Vec::with_capacity(opts.users);
    for i in 0..opts.users {
        let key = admin.user_with_key(&format!("tls-{i}"), configs::TIER).await?;
        keys.push(HeaderValue::from_str(&key).map_err(|e| LoadError::Admin(e.to_string()))?);
    }
    let tls_keys = Arc::new(keys);

    // (name, pid, addr, keys, tls, fresh)
    type Target<'k> = (&'static str, u32, SocketAddr, &'k Arc<Vec<HeaderValue>>, bool, bool);
    let targets: [Target<'_>; 4] = [
        ("plain keep-alive", plain.pid, plain.addr, plain.keys, false, false),
        ("tls keep-alive", gw.pid(), addr, &tls_keys, true, false),
        ("plain new conn", plain.pid, plain.addr, plain.keys, false, true),
        ("tls new conn", gw.pid(), addr, &tls_keys, true, true),
    ];
    let phase = |t: &Target<'_>, duration: Duration| Phase {
        addr: t.2,
        kind: CallKind::Unary,
        keys: t.3.clone(),
        concurrency: opts.concurrency,
        duration,
        chunks: opts.chunks,
        stagger: Duration::ZERO,
        requests: None,
        tls: t.4.then(|| client.clone()),
        fresh: t.5,
    };
    let mut rows: Vec<TlsRow> = targets
        .iter()
        .map(|t| TlsRow {
            name: t.0,
            tally: Tally::default(),
            cpu_per_request: None,
        })
        .collect();
    let mut cpu = [Duration::ZERO; 4];
    let count = |t: &Target<'_>, tally: &Tally, ok: &mut u64, failed: &mut u64| {
        if t.1 == plain.pid {
            *ok += tally.ok;
            *failed += tally.errors.total();
        }
    };
    if !opts.warmup.is_zero() {
        for t in &targets {
            tracing::info!("tls warm-up: {}", t.0);
            let tally = run_phase(&phase(t, opts.warmup)).await;
            count(t, &tally, gateway_ok, gateway_failed);
        }
    }
    for round in 1..=opts.rounds {
        for (i, t) in targets.iter().enumerate() {
            tracing::info!("tls round {round}/{}: {}", opts.rounds, t.0);
            let before = procs::cpu_time(t.1).unwrap_or_default();
            let tally = run_phase(&phase(t, opts.duration)).await;
            cpu[i] += procs::cpu_time(t.1).unwrap_or_default().saturating_sub(before);
            count(t, &tally, gateway_ok, gateway_failed);
            rows[i].tally.merge(&tally);
        }
    }
    for (row, c) in rows.iter_mut().zip(cpu) {
        let n = row.tally.ok + row.tally.errors.total();
        row.cpu_per_request = (n > 0).then(|| c / u32::try_from(n).unwrap_or(u32::MAX));
    }
    gw.stop().await;
    Ok(TlsFigures { rows, skipped: None })
}

/// A CA and a server certificate for 127.0.0.1 signed by it, with the openssl command line.
fn make_certs(dir: &Path) -> Result<(), LoadError> {
    let run = |args: &[&str]| -> Result<(), LoadError> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| LoadError::Options(format!("--tls needs the openssl command line: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LoadError::Options(format!(
                "openssl {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=gemini-meter loadtest CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&ca)?;
    let mut csr = vec!["req", "-new"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    run(&csr)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(LoadError::io("writing server.ext"))?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "1",
        "-days",
        "2",
        "-out",
        "server.pem",
        "-extfile",
        "server.ext",
    ])
}

/// A TLS client trusting only the run's CA, offering HTTP/1.1 (as the other targets speak).
fn client(ca: &Path) -> Result<TlsClient, LoadError> {
    let bad = |e: &dyn std::fmt::Display| LoadError::Options(format!("the run's CA: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every new connection does a full handshake: the figure is what a new client costs, not a
    // resumption (which rustls clients would otherwise attempt).
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsClient(TlsConnector::from(Arc::new(cfg))))
}

impl TlsFigures {
    /// The TLS section of the report.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::from(
            "\nTLS (--tls): unary, the plain gateway and a TLS one (ECDSA P-256, TLS 1.3, HTTP/1.1, full handshakes)\n",
        );
        if let Some(why) = &self.skipped {
            let _ = writeln!(s, "  skipped: {why}");
            return s;
        }
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "  {:<18} {:>9} {:>8} {:>8} {:>13} {:>13} {:>8} {:>10}",
            "target", "req/s", "p50 ms", "p99 ms", "connect p50", "connect p99", "errors", "CPU/req"
        );
        for r in &self.rows {
            let t = &r.tally;
            let _ = writeln!(
                s,
                "  {:<18} {:>9.0} {:>8} {:>8} {:>13} {:>13} {:>8} {:>10}",
                r.name,
                t.rps(),
                ms(t.latency.ms(0.5)),
                ms(t.latency.ms(0.99)),
                ms(t.connect.ms(0.5)),
                ms(t.connect.ms(0.99)),
                t.errors.total(),
                r.cpu_per_request
                    .map_or("-".into(), |d| format!("{:.1} µs", d.as_secs_f64() * 1e6)),
            );
        }
        let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} µs"));
        let _ = writeln!(
            s,
            "  gateway CPU added by TLS: {} per request on a kept-alive connection, {} per handshake",
            us(self.per_request_us()),
            us(self.handshake_us())
        );
        s
    }

    /// The TLS section of the JSON report.
    pub fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "target": r.name, "ok": r.tally.ok, "errors": r.tally.errors.total(), "rps": r.tally.rps(),
                    "p50_ms": r.tally.latency.ms(0.5), "p99_ms": r.tally.latency.ms(0.99),
                    "connect_p50_ms": r.tally.connect.ms(0.5), "connect_p99_ms": r.tally.connect.ms(0.99),
                    "cpu_per_request_us": r.cpu_per_request.map(|d| d.as_secs_f64() * 1e6),
                })
            })
            .collect();
        serde_json::json!({
            "skipped": self.skipped, "rows": rows,
            "per_request_us": self.per_request_us(), "handshake_us": self.handshake_us(),
        })
    }
}
