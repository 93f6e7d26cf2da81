//! TLS termination: HTTP/1.1 and h2 by ALPN, RSA and ECDSA certificates, a certificate swapped
//! on disk served to new connections without dropping open ones, a bad file keeping the old
//! certificate (and showing in `/admin/config/status`), mutual TLS for the admin API, curl, and
//! `check-config` on the files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tls::{Alg, TestCa, TlsConn, client_config, leaf_der, swap_file};
use common::{ADMIN_TOKEN, Harness};
use serde_json::Value;

fn tls_extra(cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
    let mut s = format!(
        "\n[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        cert.display(),
        key.display()
    );
    if let Some(ca) = client_ca {
        s.push_str(&format!("client_ca_path = \"{}\"\n", ca.display()));
    }
    s
}

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

async fn status(h: &Harness, ca: &Path) -> Value {
    let mut c = TlsConn::open(h.server.as_ref().unwrap().addr, client_config(ca, &[b"http/1.1"], None))
        .await
        .unwrap();
    let (code, _, body) = c
        .send("GET", "/admin/config/status", &[("authorization", &bearer())], "")
        .await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits (polling, up to 20 s) for new connections to present `want`.
async fn wait_for_cert(addr: std::net::SocketAddr, ca: &Path, want: &[u8]) {
    for _ in 0..400 {
        let c = TlsConn::open(addr, client_config(ca, &[b"http/1.1"], None))
            .await
            .unwrap();
        if c.server_cert == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the swapped certificate was never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_by_alpn_with_rsa_and_ecdsa_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    for (name, alg) in [("ec", Alg::Ec), ("rsa", Alg::Rsa)] {
        let (cert, key) = ca.issue(name, alg, true);
        let mut h = Harness::start(&tls_extra(&cert, &key, None)).await;
        let addr = h.server.as_ref().unwrap().addr;
        let key_gm = {
            let mut c = TlsConn::open(addr, client_config(&ca.cert, &[b"http/1.1"], None))
                .await
                .unwrap();
            let (code, _, body) = c
                .send(
                    "POST",
                    "/admin/users",
                    &[("authorization", &bearer()), ("content-type", "application/json")],
                    r#"{"id":"alice","tier":"free"}"#,
                )
                .await;
            assert_eq!(code, 201, "{body}");
            let (code, _, body) = c
                .send("POST", "/admin/users/alice/keys", &[("authorization", &bearer())], "")
                .await;
            assert_eq!(code, 201, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_string()
        };
        for (alpn, version) in [
            (&b"h2"[..], http::Version::HTTP_2),
            (b"http/1.1", http::Version::HTTP_11),
        ] {
            let mut c = TlsConn::open(addr, client_config(&ca.cert, &[alpn], None))
                .await
                .unwrap();
            assert_eq!(c.alpn.as_deref(), Some(alpn));
            assert_eq!(c.server_cert, leaf_der(&cert));
            let (code, v, body) = c
                .send(
                    "POST",
                    "/v1beta/models/gemini-2.5-flash:generateContent",
                    &[("x-goog-api-key", &key_gm), ("content-type", "application/json")],
                    r#"{"contents":[{"parts":[{"text":"Hello"}]}]}"#,
                )
                .await;
            assert_eq!(code, 200, "{name} {alpn:?}: {body}");
            assert_eq!(v, version);
            assert!(body.contains("usageMetadata"), "{body}");
        }
        // A client that offers no ALPN gets HTTP/1.1.
        let mut c = TlsConn::open(addr, client_config(&ca.cert, &[], None)).await.unwrap();
        assert_eq!(c.alpn, None);
        assert_eq!(c.send("GET", "/healthz", &[], "").await.0, 200);
        // Plain HTTP on the TLS port gets no answer.
        let plain = reqwest::Client::new()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await;
        assert!(plain.is_err(), "{plain:?}");
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_certificate_is_served_to_new_connections_and_open_ones_keep_going() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    let (a_cert, a_key) = ca.issue("a", Alg::Ec, true);
    let (b_cert, b_key) = ca.issue("b", Alg::Rsa, true);
    let live_cert = certs.path().join("live.pem");
    let live_key = certs.path().join("live.key");
    swap_file(&a_cert, &live_cert);
    swap_file(&a_key, &live_key);
    let mut h = Harness::start(&tls_extra(&live_cert, &live_key, None)).await;
    let addr = h.server.as_ref().unwrap().addr;

    let mut open_h1 = TlsConn::open(addr, client_config(&ca.cert, &[b"http/1.1"], None))
        .await
        .unwrap();
    let mut open_h2 = TlsConn::open(addr, client_config(&ca.cert, &[b"h2"], None))
        .await
        .unwrap();
    assert_eq!(open_h1.server_cert, leaf_der(&a_cert));
    assert_eq!(open_h1.send("GET", "/healthz", &[], "").await.0, 200);
    let loaded_before = status(&h, &ca.cert).await["tls"]["loaded_at"].clone();

    // The key first, then the certificate: between the two the pair does not match, which the
    // gateway refuses and then takes once both are in place.
    swap_file(&b_key, &live_key);
    swap_file(&b_cert, &live_cert);
    wait_for_cert(addr, &ca.cert, &leaf_der(&b_cert)).await;
    let st = status(&h, &ca.cert).await;
    assert_eq!(st["tls"]["last_error"], Value::Null, "{st}");
    assert_ne!(st["tls"]["loaded_at"], Value::Null);
    let _ = loaded_before;

    // The connections opened before the swap are still served.
    assert_eq!(open_h1.send("GET", "/healthz", &[], "").await.0, 200);
    assert_eq!(open_h2.send("GET", "/healthz", &[], "").await.0, 200);

    // A bad certificate file: the one in use stays, and the status says why.
    std::fs::write(
        &live_cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut err = Value::Null;
    for _ in 0..400 {
        err = status(&h, &ca.cert).await["tls"]["last_error"].clone();
        if err != Value::Null {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let msg = err.as_str().expect("a bad certificate shows in /admin/config/status");
    assert!(msg.contains("server.tls.cert_path"), "{msg}");
    let c = TlsConn::open(addr, client_config(&ca.cert, &[b"http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(c.server_cert, leaf_der(&b_cert));
    // A key that does not match the certificate is refused as well.
    swap_file(&b_cert, &live_cert);
    swap_file(&a_key, &live_key);
    let mut err = Value::Null;
    for _ in 0..400 {
        err = status(&h, &ca.cert).await["tls"]["last_error"].clone();
        if err.as_str().is_some_and(|m| m.contains("key_path")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(err.as_str().is_some_and(|m| m.contains("server.tls.key_path")), "{err}");
    let c = TlsConn::open(addr, client_config(&ca.cert, &[b"http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(c.server_cert, leaf_der(&b_cert));
    // Audited as file-watch reloads.
    let mut c = TlsConn::open(addr, client_config(&ca.cert, &[b"http/1.1"], None))
        .await
        .unwrap();
    let (_, _, body) = c
        .send("GET", "/admin/audit?limit=100", &[("authorization", &bearer())], "")
        .await;
    let audit: Value = serde_json::from_str(&body).unwrap();
    let tls_reloads: Vec<&Value> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "tls.reload" && e["caller"] == "file-watch")
        .collect();
    assert!(tls_reloads.iter().any(|e| e["outcome"] == "ok"), "{audit}");
    assert!(tls_reloads.iter().any(|e| e["outcome"] == "failed"), "{audit}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_the_admin_api_needs_a_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    let (cert, key) = ca.issue("server", Alg::Ec, true);
    let (client_cert, client_key) = ca.issue("operator", Alg::Ec, false);
    let other = TestCa::new(&certs.path().join("other"), "other-ca");
    let (stranger_cert, stranger_key) = other.issue("stranger", Alg::Ec, false);
    let mut h = Harness::start(&tls_extra(&cert, &key, Some(&ca.cert))).await;
    let addr = h.server.as_ref().unwrap().addr;

    let mut anon = TlsConn::open(addr, client_config(&ca.cert, &[b"h2"], None))
        .await
        .unwrap();
    let (code, _, body) = anon
        .send("GET", "/admin/config/status", &[("authorization", &bearer())], "")
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    assert_eq!(anon.send("GET", "/admin/dashboard", &[], "").await.0, 403);
    // The rest stays open to callers without a certificate.
    assert_eq!(anon.send("GET", "/healthz", &[], "").await.0, 200);
    assert_eq!(
        anon.send("GET", "/api/usage/current", &[("x-goog-api-key", "gm_nope")], "")
            .await
            .0,
        401
    );

    let mut op = TlsConn::open(
        addr,
        client_config(&ca.cert, &[b"h2"], Some((&client_cert, &client_key))),
    )
    .await
    .unwrap();
    let (code, _, body) = op
        .send("GET", "/admin/config/status", &[("authorization", &bearer())], "")
        .await;
    assert_eq!(code, 200, "{body}");
    // The certificate does not replace the token.
    assert_eq!(op.send("GET", "/admin/config/status", &[], "").await.0, 401);

    // A certificate from another CA fails the handshake.
    let stranger = TlsConn::open(
        addr,
        client_config(&ca.cert, &[b"h2"], Some((&stranger_cert, &stranger_key))),
    )
    .await;
    match stranger {
        Err(_) => {}
        // TLS 1.3: the client learns of the refusal on its first read.
        Ok(mut c) => {
            let r = tokio::spawn(async move { c.send("GET", "/healthz", &[], "").await }).await;
            assert!(r.is_err(), "a certificate of another CA was accepted");
        }
    }
    h.stop().await;
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is needed for the TLS tests (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_tls_with_the_test_ca_and_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    let (cert, key) = ca.issue("server", Alg::Ec, true);
    let (client_cert, client_key) = ca.issue("operator", Alg::Rsa, false);
    let mut h = Harness::start(&tls_extra(&cert, &key, Some(&ca.cert))).await;
    let port = h.server.as_ref().unwrap().addr.port();
    let base = format!("https://localhost:{port}");
    let cacert = ca.cert.to_str().unwrap().to_string();
    let auth = format!("authorization: {}", bearer());
    let (c, k) = (client_cert.to_str().unwrap(), client_key.to_str().unwrap());
    let resolve = format!("localhost:{port}:127.0.0.1");

    // Without the CA, curl refuses the certificate.
    let (ok, _, err) = curl(&["--resolve", &resolve, &format!("{base}/healthz")]);
    assert!(!ok, "{err}");

    let admin = |args: &[&str]| {
        let mut all = vec![
            "--resolve",
            &resolve,
            "--cacert",
            &cacert,
            "--cert",
            c,
            "--key",
            k,
            "-H",
            &auth,
        ];
        all.extend_from_slice(args);
        curl(&all)
    };
    let (ok, out, err) = admin(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"id":"carol","tier":"free"}"#,
        &format!("{base}/admin/users"),
    ]);
    assert!(ok && out.contains("carol"), "{out} {err}");
    let (ok, out, err) = admin(&["-X", "POST", &format!("{base}/admin/users/carol/keys")]);
    assert!(ok, "{err}");
    let key = serde_json::from_str::<Value>(&out).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();

    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out, err) = curl(&[
            "--resolve",
            &resolve,
            "--cacert",
            &cacert,
            flag,
            "-w",
            "\n%{http_version} %{http_code}",
            "-H",
            &format!("x-goog-api-key: {key}"),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"contents":[{"parts":[{"text":"Hello"}]}]}"#,
            &format!("{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
        ]);
        assert!(ok, "{err}");
        assert!(out.ends_with(&format!("\n{want} 200")), "{flag}: {out}");
        assert!(out.contains("data: "), "{out}");
    }
    // Without a client certificate, the admin API answers 403.
    let (ok, out, err) = curl(&[
        "--resolve",
        &resolve,
        "--cacert",
        &cacert,
        "-H",
        &auth,
        "-w",
        "\n%{http_code}",
        &format!("{base}/admin/users/carol"),
    ]);
    assert!(ok, "{err}");
    assert!(out.ends_with("\n403"), "{out}");
    h.stop().await;
}

#[test]
fn check_config_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let (cert, key) = ca.issue("server", Alg::Rsa, true);
    let (_, other_key) = ca.issue("other", Alg::Rsa, true);
    let run = |tls: &str| {
        let path = dir.path().join("gm.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = \"127.0.0.1:0\"\n{tls}\n[tiers.free]\n"),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gemini-meter"))
            .args(["check-config", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&tls_extra(&cert, &key, Some(&ca.cert)));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&tls_extra(&cert, &other_key, None));
    assert_eq!(code, Some(1));
    assert!(err.contains("server.tls.key_path"), "{err}");
    let (code, err) = run(&tls_extra(&dir.path().join("missing.pem"), &key, None));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("server.tls.cert_path") && err.contains("missing.pem"),
        "{err}"
    );
    let (code, err) = run(&tls_extra(&cert, &key, Some(&dir.path().join("server.csr"))));
    assert_eq!(code, Some(1));
    assert!(err.contains("server.tls.client_ca_path"), "{err}");
}
