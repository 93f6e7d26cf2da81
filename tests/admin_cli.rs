//! `gemini-meter admin …` against a live gateway: every command, tables and `--json`, the exit
//! codes scripts rely on (0 ok, 2 usage, 3 refused, 4 unreachable), the token and address from
//! the environment or the gateway's config, and https with mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::tls::{Alg, TestCa};
use common::{ADMIN_TOKEN, Harness, spare_port};
use serde_json::Value;

/// Runs the binary's `admin` with `env` only (no GEMINI_METER_* of the test's environment).
fn admin(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemini-meter"));
    cmd.arg("admin").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("GEMINI_METER_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

struct Cli {
    env: Vec<(String, String)>,
}

impl Cli {
    fn for_harness(h: &Harness) -> Cli {
        Cli {
            env: vec![
                ("GEMINI_METER_ADDR".into(), h.base.clone()),
                ("GEMINI_METER_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ],
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        admin(&env, args)
    }

    /// Runs, expects exit 0, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Runs, expects exit `code`, returns stderr.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
        text(&out.stderr)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_admin_tasks_from_the_command_line() {
    let h = Harness::start("").await;
    let cli = Cli::for_harness(&h);

    let created = cli.ok(&[
        "users",
        "create",
        "alice",
        "--tier",
        "free",
        "--email",
        "alice@example.com",
    ]);
    assert!(created.contains("alice") && created.contains("free"), "{created}");
    let bob = cli.json(&["users", "create", "bob", "--tier", "free"]);
    assert_eq!(bob["id"], "bob");
    // A second create of the same id: refused, exit 3, the gateway's message on stderr.
    let err = cli.fails(3, &["users", "create", "bob", "--tier", "free"]);
    assert!(err.contains("409") && err.contains("already exists"), "{err}");
    // An unknown tier is the gateway's 400.
    let err = cli.fails(3, &["users", "create", "carol", "--tier", "gold"]);
    assert!(err.contains("Unknown tier"), "{err}");

    let list = cli.ok(&["users", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("TIER"), "{list}");
    assert!(
        lines[1].starts_with("alice ") && lines[1].contains("alice@example.com"),
        "{list}"
    );
    assert!(lines[2].starts_with("bob "), "{list}");
    let ids: Vec<String> = cli.json(&["users", "list"])["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["alice", "bob"]);

    let key = cli.json(&["keys", "create", "alice"]);
    let (plain, key_id) = (key["key"].as_str().unwrap(), key["key_id"].as_str().unwrap());
    assert!(plain.starts_with("gm_"));
    let people = cli.run(&["keys", "create", "alice"]);
    assert!(
        text(&people.stdout).lines().next().unwrap().starts_with("key "),
        "{}",
        text(&people.stdout)
    );
    assert!(text(&people.stderr).contains("shown once"));
    let keys = cli.ok(&["keys", "list", "alice"]);
    assert!(keys.contains(key_id) && !keys.contains(plain), "{keys}");
    assert_eq!(h.generate(plain, "gemini-2.5-flash", false).await.status(), 200);
    h.sync().await;

    let usage = cli.json(&["usage", "alice"]);
    assert_eq!(usage["current_month"]["messages"], 1);
    assert_eq!(usage["limits"]["messages"], 100);
    let table = cli.ok(&["usage", "alice"]);
    assert!(
        table.contains("QUOTA") && table.lines().any(|l| l.starts_with("messages ") && l.contains("100")),
        "{table}"
    );
    let month = usage["month"].as_str().unwrap().to_string();
    let totals = cli.json(&["usage", "alice", "--month", &month]);
    assert_eq!(totals["messages"], 1);
    assert_eq!(totals["records"], 2);
    assert_eq!(cli.json(&["usage", "alice", "--month", "2020-01"])["records"], 0);
    cli.fails(2, &["usage", "alice", "--month", "January"]);

    let csv = cli.ok(&["export", "--month", &month, "--format", "csv"]);
    let mut rows = csv.lines();
    assert_eq!(
        rows.next(),
        Some("id,user_id,type,tokens,messages,bytes,cost,metadata,created_at")
    );
    assert_eq!(rows.filter(|r| r.contains(",alice,")).count(), 2, "{csv}");
    let jsonl = cli.ok(&["export", "--format", "jsonl"]);
    assert_eq!(jsonl.lines().count(), 2);
    for l in jsonl.lines() {
        assert_eq!(serde_json::from_str::<Value>(l).unwrap()["user_id"], "alice");
    }

    let shown = cli.ok(&["users", "show", "alice"]);
    assert!(
        shown.contains("alice@example.com") && shown.contains("QUOTA"),
        "{shown}"
    );
    assert_eq!(
        cli.json(&["users", "set-tier", "alice", "unlimited"])["tier"],
        "unlimited"
    );
    assert_eq!(cli.json(&["users", "show", "alice"])["tier"], "unlimited");
    cli.fails(3, &["users", "show", "nobody"]);

    assert!(cli.ok(&["keys", "revoke", key_id]).contains(key_id));
    assert_eq!(h.generate(plain, "gemini-2.5-flash", false).await.status(), 401);
    cli.fails(3, &["keys", "revoke", "key_unknown"]);

    let st = cli.json(&["reload"]);
    assert_eq!(st["ok"], true);
    assert!(cli.ok(&["status"]).contains("config loaded_at"));
    // A config the gateway refuses: exit 3 with the reason, and the status shows it.
    std::fs::write(&h.config_path, "[server]\nlisten = 5\n").unwrap();
    let err = cli.fails(3, &["reload"]);
    assert!(err.contains("server.listen"), "{err}");
    assert!(
        cli.json(&["status"])["last_error"]
            .as_str()
            .unwrap()
            .contains("server.listen")
    );
    h.write_config_extra("");

    // Deleting needs --yes; the refusal is a usage error, checked before anything is sent.
    cli.fails(2, &["users", "delete", "bob"]);
    assert!(
        cli.ok(&["users", "delete", "bob", "--yes"])
            .contains("deleted user bob")
    );
    cli.fails(3, &["users", "delete", "bob", "--yes"]);

    // The audit trail shows all of it, newest first, with --all across pages.
    let audit = cli.json(&["audit", "--all", "--limit", "2"]);
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.first(), Some(&"user.delete"), "{actions:?}");
    for a in [
        "user.create",
        "key.create",
        "key.revoke",
        "user.set_tier",
        "export",
        "config.reload",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    assert_eq!(audit["next_cursor"], Value::Null);
    let page = cli.run(&["audit", "--limit", "1"]);
    assert!(text(&page.stdout).starts_with("AT "), "{}", text(&page.stdout));
    assert!(text(&page.stderr).contains("--cursor"), "{}", text(&page.stderr));
    // No secret reaches the trail.
    let all = serde_json::to_string(&audit).unwrap();
    assert!(!all.contains(plain) && !all.contains(ADMIN_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_scripts_can_trust() {
    let h = Harness::start("").await;
    let cli = Cli::for_harness(&h);
    // Usage errors: exit 2 (clap's own, and ours).
    cli.fails(2, &["users", "frobnicate"]);
    cli.fails(2, &["users", "create", "x"]);
    let err = admin(&[("GEMINI_METER_ADDR", &h.base)], &["users", "list"]);
    assert_eq!(err.status.code(), Some(2));
    assert!(
        text(&err.stderr).contains("GEMINI_METER_ADMIN_TOKEN"),
        "{}",
        text(&err.stderr)
    );
    cli.fails(2, &["--addr", "not a url", "users", "list"]);
    // A wrong token: the gateway's 401, exit 3.
    let err = admin(
        &[("GEMINI_METER_ADDR", &h.base), ("GEMINI_METER_ADMIN_TOKEN", "wrong")],
        &["users", "list"],
    );
    assert_eq!(err.status.code(), Some(3));
    assert!(text(&err.stderr).contains("401"), "{}", text(&err.stderr));
    // Nobody listening: exit 4.
    let port = spare_port();
    let err = cli.fails(4, &["--addr", &format!("http://127.0.0.1:{port}"), "users", "list"]);
    assert!(err.contains("cannot reach the gateway"), "{err}");
    // Flags win over the environment.
    let out = admin(
        &[
            ("GEMINI_METER_ADDR", "http://127.0.0.1:1"),
            ("GEMINI_METER_ADMIN_TOKEN", "wrong"),
        ],
        &["--addr", &h.base, "--token", ADMIN_TOKEN, "users", "list"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

fn tls_config_text(cert: &Path, key: &Path, ca: &Path) -> String {
    format!(
        "\n[server.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\nclient_ca_path = \"{}\"\n",
        cert.display(),
        key.display(),
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_with_a_client_certificate_and_the_gateways_config() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    let (cert, key) = ca.issue("server", Alg::Ec, true);
    let (client_cert, client_key) = ca.issue("operator", Alg::Ec, false);
    let h = Harness::start(&tls_config_text(&cert, &key, &ca.cert)).await;
    let port = h.server.as_ref().unwrap().addr.port();
    let url = format!("https://localhost:{port}");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let base_env = [
        ("GEMINI_METER_ADMIN_TOKEN", ADMIN_TOKEN),
        ("GEMINI_METER_ADDR", url.as_str()),
    ];

    // The CA and the client certificate from flags.
    let out = admin(
        &base_env,
        &[
            "--cacert",
            &s(&ca.cert),
            "--cert",
            &s(&client_cert),
            "--key",
            &s(&client_key),
            "users",
            "create",
            "dora",
            "--tier",
            "free",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // ... and from the environment.
    let mut env = base_env.to_vec();
    let (ca_s, cert_s, key_s) = (s(&ca.cert), s(&client_cert), s(&client_key));
    env.extend([
        ("GEMINI_METER_CACERT", ca_s.as_str()),
        ("GEMINI_METER_CLIENT_CERT", cert_s.as_str()),
        ("GEMINI_METER_CLIENT_KEY", key_s.as_str()),
    ]);
    let out = admin(&env, &["--json", "users", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("dora"));

    // Without the client certificate: the gateway's 403, exit 3.
    let out = admin(&base_env, &["--cacert", &s(&ca.cert), "users", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("client certificate"),
        "{}",
        text(&out.stderr)
    );
    // Without the CA the server's certificate is not trusted: exit 4.
    let out = admin(&base_env, &["users", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // An unreadable CA file is a usage error.
    let out = admin(&base_env, &["--cacert", "/nonexistent/ca.pem", "users", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // --config: the address (https, from [server.tls]) and the token's variable come from the
    // gateway's own config; here a copy with the port the test gateway got.
    let cfg = std::fs::read_to_string(&h.config_path)
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""));
    let cfg_path = certs.path().join("gm.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = admin(
        &[
            ("GM_TEST_ADMIN_TOKEN", ADMIN_TOKEN),
            ("GEMINI_METER_CACERT", ca_s.as_str()),
            ("GEMINI_METER_CLIENT_CERT", cert_s.as_str()),
            ("GEMINI_METER_CLIENT_KEY", key_s.as_str()),
        ],
        &["--config", &s(&cfg_path), "--json", "status"],
    );
    // The server's certificate names localhost and 127.0.0.1: either address verifies.
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let st: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert!(st["tls"]["loaded_at"].is_string(), "{st}");
}
