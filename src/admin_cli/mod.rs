//! `gemini-meter admin …`: the command line over the admin API (users, keys, usage, export,
//! reload, config status, audit trail).
//!
//! Owns the commands, where the address and token come from, the output (tables for people,
//! `--json` for scripts) and the exit codes. It talks to a running gateway over HTTP(S) only
//! (never to its storage), so it works against a remote gateway and never fights it for the
//! database lock.
//!
//! Exit codes: 0 done; 1 anything else (e.g. stdout closed); 2 usage error (bad arguments, no
//! token, unreadable TLS files); 3 the gateway refused (4xx: not found, conflict, bad input,
//! bad token); 4 the gateway could not be reached (connection, TLS, timeout); 5 the gateway
//! failed (5xx).

mod client;
mod out;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use http_body_util::BodyExt;
use serde_json::{Value, json};

pub use client::{AdminClient, TlsFiles};

use crate::config::Config;

/// Default gateway address when neither `--addr`, `GEMINI_METER_ADDR` nor `--config` gives one.
const DEFAULT_ADDR: &str = "http://127.0.0.1:8080";

/// Why a command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or local files (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The gateway answered 4xx (exit 3).
    #[error("{0}")]
    Refused(String),
    /// The gateway could not be reached (exit 4).
    #[error("cannot reach the gateway at {addr}: {why}")]
    Connect {
        /// The base URL.
        addr: String,
        /// The cause.
        why: String,
    },
    /// The gateway answered 5xx (exit 5).
    #[error("{0}")]
    Server(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Other(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Refused(_) => 3,
            CliError::Connect { .. } => 4,
            CliError::Server(_) => 5,
        }
    }
}

/// `gemini-meter admin [options] <command>`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Gateway base URL, http:// or https:// [env: GEMINI_METER_ADDR; default: from --config,
    /// else http://127.0.0.1:8080].
    #[arg(long, global = true, value_name = "URL")]
    addr: Option<String>,
    /// Admin token; prefer the environment, which other users cannot see in the process list
    /// [env: GEMINI_METER_ADMIN_TOKEN, or the variable --config names in server.admin_token_env].
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// The gateway's config file: its server.listen (https with [server.tls]) is the default
    /// address and its server.admin_token_env names the token's variable.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https gateway, besides the public roots
    /// [env: GEMINI_METER_CACERT].
    #[arg(long, global = true, value_name = "PATH")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for a gateway whose admin API needs one (mutual TLS)
    /// [env: GEMINI_METER_CLIENT_CERT].
    #[arg(long, global = true, value_name = "PATH", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM) [env: GEMINI_METER_CLIENT_KEY].
    #[arg(long, global = true, value_name = "PATH", requires = "cert")]
    key: Option<PathBuf>,
    /// Print the gateway's JSON instead of a table (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Users: list, create, show, set-tier, delete.
    #[command(subcommand)]
    Users(UsersCommand),
    /// API keys: create, list, revoke.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// A user's usage: this month against the tier's limits, or the totals of --month.
    Usage {
        /// The user id.
        user: String,
        /// A past month, YYYY-MM (totals only).
        #[arg(long)]
        month: Option<String>,
    },
    /// Every usage record of a month, to stdout (redirect it to a file).
    Export {
        /// The month, YYYY-MM (default: this month).
        #[arg(long)]
        month: Option<String>,
        /// csv (header id,user_id,type,tokens,messages,bytes,cost,metadata,created_at) or jsonl.
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
    },
    /// Reloads the config (and the TLS files) now; exit 3 when the new config is refused.
    Reload,
    /// When the running config (and certificate) was loaded, and the last reload error.
    Status,
    /// Cluster mode: the live replicas (version, config hash, shipping backlog) and the health
    /// of Redis and PostgreSQL; exit 3 when the gateway runs alone.
    Cluster,
    /// The audit trail of admin actions, newest first.
    Audit {
        /// Entries per page (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (printed after a page).
        #[arg(long)]
        cursor: Option<String>,
        /// Every entry, following the cursors.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Lists users by id.
    List,
    /// Creates a user.
    Create {
        /// User id: 1 to 64 characters of a-z A-Z 0-9 _ - .
        id: String,
        /// Tier name from the config.
        #[arg(long)]
        tier: String,
        /// Email for quota alerts.
        #[arg(long)]
        email: Option<String>,
    },
    /// Shows a user and this month's usage.
    Show {
        /// The user id.
        id: String,
    },
    /// Moves a user to another tier.
    SetTier {
        /// The user id.
        id: String,
        /// The new tier.
        tier: String,
    },
    /// Deletes a user, their keys and their usage records.
    Delete {
        /// The user id.
        id: String,
        /// Confirms the deletion (it cannot be undone).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Issues a key for a user; the key is printed once.
    Create {
        /// The user id.
        user: String,
    },
    /// Lists a user's keys (ids and prefixes, never the keys).
    List {
        /// The user id.
        user: String,
    },
    /// Revokes a key, effective at once.
    Revoke {
        /// The key id (`key_…`).
        key_id: String,
    },
}

/// `export --format` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormat {
    Csv,
    Jsonl,
}

/// Runs the command and returns the process exit code; errors go to stderr on one line.
pub fn run(args: AdminArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gemini-meter admin: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gemini-meter admin: {}", e.to_string().replace('\n', " "));
            e.exit_code()
        }
    }
}

/// Where to connect and with what, from the flags, the environment and the gateway's config.
fn connect(args: &AdminArgs) -> Result<AdminClient, CliError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let cfg = match &args.config {
        Some(p) => Some(Config::load(p).map_err(|e| CliError::Usage(e.to_string()))?),
        None => None,
    };
    let addr = args
        .addr
        .clone()
        .or_else(|| env("GEMINI_METER_ADDR"))
        .or_else(|| cfg.as_ref().map(config_addr))
        .unwrap_or_else(|| DEFAULT_ADDR.to_string());
    let token_env = cfg
        .as_ref()
        .map_or("GEMINI_METER_ADMIN_TOKEN", |c| c.server.admin_token_env.as_str());
    let token = args
        .token
        .clone()
        .or_else(|| env(token_env))
        .or_else(|| env("GEMINI_METER_ADMIN_TOKEN"))
        .ok_or_else(|| CliError::Usage(format!("no admin token: set {token_env} or pass --token")))?;
    let path = |flag: &Option<PathBuf>, var: &str| flag.clone().or_else(|| env(var).map(PathBuf::from));
    let ca = path(&args.cacert, "GEMINI_METER_CACERT");
    let cert = path(&args.cert, "GEMINI_METER_CLIENT_CERT");
    let key = path(&args.key, "GEMINI_METER_CLIENT_KEY");
    let client = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        _ => {
            return Err(CliError::Usage(
                "a client certificate needs both --cert and --key".into(),
            ));
        }
    };
    AdminClient::new(
        &addr,
        token,
        &TlsFiles {
            ca: ca.as_deref(),
            client,
        },
    )
}

/// The address a config's gateway is reached at on this machine.
fn config_addr(cfg: &Config) -> String {
    let mut listen = cfg.server.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let scheme = if cfg.server.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{listen}")
}

/// Path segments are user ids and key ids: only a-z A-Z 0-9 _ - . are left as they are.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn month_arg(month: &Option<String>) -> Result<String, CliError> {
    match month {
        None => Ok(String::new()),
        Some(m) => match crate::clock::Month::parse(m) {
            Some(m) => Ok(format!("month={m}")),
            None => Err(CliError::Usage(format!("--month {m:?}: expected YYYY-MM"))),
        },
    }
}

async fn execute(args: AdminArgs) -> Result<(), CliError> {
    // Checked before connecting: a usage error must not depend on the network.
    if let AdminCommand::Users(UsersCommand::Delete { id, yes: false }) = &args.command {
        return Err(CliError::Usage(format!(
            "deleting {id} removes its keys and usage records for good: add --yes"
        )));
    }
    let month = match &args.command {
        AdminCommand::Usage { month, .. } | AdminCommand::Export { month, .. } => month_arg(month)?,
        _ => String::new(),
    };
    let c = connect(&args)?;
    let json = args.json;
    match args.command {
        AdminCommand::Users(cmd) => users(&c, cmd, json).await,
        AdminCommand::Keys(cmd) => keys(&c, cmd, json).await,
        AdminCommand::Usage { user, month: m } => {
            if m.is_some() {
                let v = c
                    .json(Method::GET, &format!("/admin/users/{}/usage?{month}", seg(&user)), None)
                    .await?;
                emit(json, &v, out::month_totals)
            } else {
                let v = c
                    .json(Method::GET, &format!("/admin/users/{}", seg(&user)), None)
                    .await?;
                emit(json, &v["current"], out::current)
            }
        }
        AdminCommand::Export { format, .. } => {
            let f = match format {
                ExportFormat::Csv => "csv",
                ExportFormat::Jsonl => "jsonl",
            };
            let q = if month.is_empty() {
                String::new()
            } else {
                format!("&{month}")
            };
            export(&c, &format!("/admin/export?format={f}{q}")).await
        }
        AdminCommand::Reload => {
            // A refused config is answered 400 with the reason: exit 3 with it.
            let v = c.json(Method::POST, "/admin/reload", None).await?;
            emit(json, &v, out::status)
        }
        AdminCommand::Status => {
            let v = c.json(Method::GET, "/admin/config/status", None).await?;
            emit(json, &v, out::status)
        }
        AdminCommand::Cluster => {
            let v = c.json(Method::GET, "/admin/cluster", None).await?;
            emit(json, &v, out::cluster)
        }
        AdminCommand::Audit { limit, cursor, all } => audit(&c, limit, cursor, all, json).await,
    }
}

async fn users(c: &AdminClient, cmd: UsersCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        UsersCommand::List => {
            let mut all = Vec::new();
            let mut cursor = String::new();
            loop {
                let v = c
                    .json(Method::GET, &format!("/admin/users?limit=1000{cursor}"), None)
                    .await?;
                all.extend(v["data"].as_array().cloned().unwrap_or_default());
                match v["next_cursor"].as_str() {
                    Some(next) => cursor = format!("&cursor={}", seg(next)),
                    None => break,
                }
            }
            emit(json, &json!({ "data": all }), out::users)
        }
        UsersCommand::Create { id, tier, email } => {
            let mut body = json!({"id": id, "tier": tier});
            if let Some(e) = email {
                body["email"] = json!(e);
            }
            let v = c.json(Method::POST, "/admin/users", Some(&body)).await?;
            emit(json, &v, out::user)
        }
        UsersCommand::Show { id } => {
            let v = c.json(Method::GET, &format!("/admin/users/{}", seg(&id)), None).await?;
            emit(json, &v, |v| {
                let mut s = out::user(v);
                s.push('\n');
                s.push_str(&out::current(&v["current"]));
                s
            })
        }
        UsersCommand::SetTier { id, tier } => {
            let v = c
                .json(
                    Method::PATCH,
                    &format!("/admin/users/{}", seg(&id)),
                    Some(&json!({"tier": tier})),
                )
                .await?;
            emit(json, &v, out::user)
        }
        UsersCommand::Delete { id, .. } => {
            let v = c
                .json(Method::DELETE, &format!("/admin/users/{}", seg(&id)), None)
                .await?;
            emit(json, &v, |v| {
                format!(
                    "deleted user {} and its keys ({} usage records)\n",
                    v["deleted"].as_str().unwrap_or_default(),
                    v["records_deleted"]
                )
            })
        }
    }
}

async fn keys(c: &AdminClient, cmd: KeysCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        KeysCommand::Create { user } => {
            let v = c
                .json(Method::POST, &format!("/admin/users/{}/keys", seg(&user)), None)
                .await?;
            if !json {
                eprintln!("the key is shown once; only its hash is stored");
            }
            emit(json, &v, |v| {
                out::pairs(&[
                    ("key", v["key"].as_str().unwrap_or_default().to_string()),
                    ("key_id", v["key_id"].as_str().unwrap_or_default().to_string()),
                    ("user_id", v["user_id"].as_str().unwrap_or_default().to_string()),
                ])
            })
        }
        KeysCommand::List { user } => {
            let v = c
                .json(Method::GET, &format!("/admin/users/{}/keys", seg(&user)), None)
                .await?;
            emit(json, &v, out::keys)
        }
        KeysCommand::Revoke { key_id } => {
            let v = c
                .json(Method::DELETE, &format!("/admin/keys/{}", seg(&key_id)), None)
                .await?;
            emit(json, &v, |v| {
                format!("revoked {}\n", v["revoked"].as_str().unwrap_or_default())
            })
        }
    }
}

async fn audit(c: &AdminClient, limit: usize, cursor: Option<String>, all: bool, json: bool) -> Result<(), CliError> {
    let mut cursor = cursor;
    let mut entries = Vec::new();
    let next = loop {
        let mut path = format!("/admin/audit?limit={limit}");
        if let Some(cur) = &cursor {
            path.push_str(&format!("&cursor={}", seg(cur)));
        }
        let v = c.json(Method::GET, &path, None).await?;
        entries.extend(v["data"].as_array().cloned().unwrap_or_default());
        let next = v["next_cursor"].as_str().map(str::to_string);
        match next {
            Some(n) if all => cursor = Some(n),
            other => break other,
        }
    };
    let v = json!({"data": entries, "next_cursor": next});
    emit(json, &v, out::audit)?;
    if !json && let Some(n) = next {
        eprintln!("more: --cursor {n}");
    }
    Ok(())
}

/// Streams the export's body to stdout as it arrives.
async fn export(c: &AdminClient, path: &str) -> Result<(), CliError> {
    let resp = c.send(Method::GET, path, None).await?;
    let mut body = resp.into_body();
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CliError::Connect {
            addr: "the gateway".into(),
            why: format!("the export was cut off: {e}"),
        })?;
        if let Ok(data) = frame.into_data() {
            w.write_all(&data).map_err(stdout_err)?;
        }
    }
    w.flush().map_err(stdout_err)
}

fn stdout_err(e: std::io::Error) -> CliError {
    CliError::Other(format!("cannot write to stdout: {e}"))
}

/// Writes `v` as JSON, or as `render` makes it for people.
fn emit(json: bool, v: &Value, render: impl Fn(&Value) -> String) -> Result<(), CliError> {
    let text = if json {
        let mut s = serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))?;
        s.push('\n');
        s
    } else {
        render(v)
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).map_err(stdout_err)?;
    stdout.flush().map_err(stdout_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("alice.b-c_1"), "alice.b-c_1");
        assert_eq!(seg("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn exit_codes_are_distinct() {
        let codes = [
            CliError::Other(String::new()).exit_code(),
            CliError::Usage(String::new()).exit_code(),
            CliError::Refused(String::new()).exit_code(),
            CliError::Connect {
                addr: String::new(),
                why: String::new(),
            }
            .exit_code(),
            CliError::Server(String::new()).exit_code(),
        ];
        assert_eq!(codes, [1, 2, 3, 4, 5]);
    }
}
