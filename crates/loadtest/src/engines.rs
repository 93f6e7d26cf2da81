//! `--replicas`: the engines of cluster mode for the run, started by the tool itself on free
//! loopback ports in its temp dir: a `redis-server` without persistence and a throwaway
//! PostgreSQL cluster (`initdb`, then `pg_ctl`; as the `postgres` OS user when the tool runs as
//! root, since initdb and postgres refuse root). Both are stopped at the end of the run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::LoadError;
use super::procs::{self, Proc};

/// How long an engine may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The two engines of a cluster-mode run.
#[derive(Debug)]
pub struct Engines {
    /// `None` once stopped.
    redis: Option<Proc>,
    redis_port: u16,
    pg_port: u16,
    pg_dir: PathBuf,
    pg_bin: Option<PathBuf>,
    as_postgres: bool,
}

impl Engines {
    /// Starts Redis and PostgreSQL (with a database `gm`) under `dir`.
    ///
    /// # Errors
    /// When either cannot be started (not installed, no `postgres` user when root, ...).
    pub async fn start(dir: &Path) -> Result<Engines, LoadError> {
        let redis_port = procs::free_port()?.port();
        let redis = start_redis(dir, redis_port).await?;
        let pg_dir = dir.join("postgres");
        std::fs::create_dir_all(&pg_dir).map_err(LoadError::io("creating the postgres dir"))?;
        let as_postgres = running_as_root();
        if as_postgres {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(&pg_dir, Some(uid), Some(gid)).map_err(LoadError::io("chown the postgres dir"))?;
            // The postgres user must be able to reach its dir through the run's private one.
            allow_traverse(dir)?;
        }
        let engines = Engines {
            redis: Some(redis),
            redis_port,
            pg_port: procs::free_port()?.port(),
            pg_dir,
            pg_bin: pg_bin_dir(),
            as_postgres,
        };
        engines.init_postgres().await?;
        Ok(engines)
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.redis_port)
    }

    /// `postgres://postgres@127.0.0.1:PORT/gm`.
    pub fn postgres_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/gm", self.pg_port)
    }

    /// Redis's process id (0 once stopped).
    pub fn redis_pid(&self) -> u32 {
        self.redis.as_ref().map_or(0, Proc::pid)
    }

    /// The postmaster's process id (its backends are its children), while it runs.
    pub fn postgres_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.pg_dir.join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Commands Redis has processed so far (`INFO stats`), for round trips per request.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn redis_commands(&self) -> Result<u64, LoadError> {
        let info = redis_call(self.redis_port, "*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n").await?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| LoadError::Admin("Redis INFO stats has no total_commands_processed".into()))
    }

    /// Runs one SQL statement in `gm` with psql and returns its single value (`-At`), or
    /// psql's error on one line.
    pub async fn sql_value(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.program("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args(["-p", &self.pg_port.to_string(), "-U", "postgres", "-d", "gm", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(err.lines().next().unwrap_or("psql failed").trim().to_string());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops PostgreSQL (immediate: a throwaway cluster) and Redis.
    pub async fn stop(mut self) {
        let mut c = self.tool("pg_ctl");
        c.args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(self.pg_dir.join("data"));
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status().await;
        if let Some(r) = self.redis.take() {
            r.stop().await;
        }
    }

    fn program(&self, name: &str) -> PathBuf {
        self.pg_bin
            .as_ref()
            .map_or_else(|| PathBuf::from(name), |b| b.join(name))
    }

    /// A PostgreSQL program, as the `postgres` user when the tool runs as root.
    fn tool(&self, name: &str) -> Command {
        let program = self.program(name);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    async fn run(&self, what: &'static str, mut cmd: Command) -> Result<(), LoadError> {
        let out = cmd.output().await.map_err(|e| LoadError::Start {
            name: what,
            reason: format!("{e} (PostgreSQL 15+ needed: apt-get install postgresql)"),
        })?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.pg_dir.join("postgres.log")).unwrap_or_default();
        Err(LoadError::Start {
            name: what,
            reason: format!(
                "{}: {} {} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            ),
        })
    }

    /// initdb, settings for a throwaway cluster, start, `CREATE DATABASE gm`.
    async fn init_postgres(&self) -> Result<(), LoadError> {
        let data = self.pg_dir.join("data");
        let mut c = self.tool("initdb");
        c.arg("-D").arg(&data);
        c.args(["-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C", "-U", "postgres"]);
        self.run("initdb", c).await?;
        // Durability is not measured here; the shipping work is.
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n",
            self.pg_port,
            self.pg_dir.display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        let mut c = self.tool("pg_ctl");
        c.args(["start", "-w", "-t", "60", "-D"]).arg(&data);
        c.arg("-l").arg(self.pg_dir.join("postgres.log"));
        // The server outlives pg_ctl: it must not hold our pipes.
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let status = c.status().await.map_err(|e| LoadError::Start {
            name: "pg_ctl",
            reason: e.to_string(),
        })?;
        if !status.success() {
            let log = std::fs::read_to_string(self.pg_dir.join("postgres.log")).unwrap_or_default();
            return Err(LoadError::Start {
                name: "postgres",
                reason: format!("pg_ctl start: {status}: {}", log.trim()),
            });
        }
        let mut c = Command::new(self.program("psql"));
        c.args(["-X", "-q", "-h", "127.0.0.1", "-p", &self.pg_port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c", "CREATE DATABASE gm"]);
        self.run("createdb", c).await
    }
}

impl Drop for Engines {
    /// A run that ends early still stops its PostgreSQL (it runs detached, as pg_ctl starts
    /// it); Redis is the tool's child and gets SIGTERM from its `Proc`.
    fn drop(&mut self) {
        if self.postgres_pid().is_none() {
            return;
        }
        let program = self.program("pg_ctl");
        let mut c = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        c.args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(self.pg_dir.join("data"));
        let _ = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts `redis-server` on `port` (no persistence) and waits until it answers PING.
async fn start_redis(dir: &Path, port: u16) -> Result<Proc, LoadError> {
    let bin = std::env::var_os("GM_LOADTEST_REDIS_SERVER").map_or_else(|| PathBuf::from("redis-server"), PathBuf::from);
    let mut cmd = Command::new(bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args(["--daemonize", "no", "--protected-mode", "no"])
    .arg("--dir")
    .arg(dir);
    // redis-server prints its banner; "Ready to accept connections" comes after the listen.
    let (p, _) = procs::spawn_until("redis", cmd, "Ready to accept connections", START_TIMEOUT)
        .await
        .map_err(|e| match e {
            LoadError::Start { name, reason } => LoadError::Start {
                name,
                reason: format!("{reason} (apt-get install redis-server)"),
            },
            other => other,
        })?;
    match redis_call(port, "*1\r\n$4\r\nPING\r\n").await {
        Ok(s) if s.contains("PONG") => Ok(p),
        Ok(s) => Err(LoadError::Start {
            name: "redis",
            reason: format!("PING answered {s:?}"),
        }),
        Err(e) => Err(e),
    }
}

/// Sends one RESP command and returns the reply's text (enough for PING and INFO).
async fn redis_call(port: u16, command: &str) -> Result<String, LoadError> {
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(command.as_bytes()).await?;
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if reply_complete(&out) {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(10), talk).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(LoadError::Admin(format!("Redis: {e}"))),
        Err(_) => Err(LoadError::Admin("Redis: no answer within 10 s".into())),
    }
}

/// A simple-string reply ends at its CRLF; a bulk string (`$len\r\n...\r\n`) at its length.
fn reply_complete(b: &[u8]) -> bool {
    let Some(head_end) = b.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if b.first() != Some(&b'$') {
        return true;
    }
    let len: Option<usize> = std::str::from_utf8(&b[1..head_end]).ok().and_then(|s| s.parse().ok());
    len.is_none_or(|n| b.len() >= head_end + 2 + n + 2)
}

fn append(path: &Path, text: &str) -> Result<(), LoadError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(LoadError::io("opening postgresql.conf"))?;
    f.write_all(text.as_bytes())
        .map_err(LoadError::io("writing postgresql.conf"))
}

/// Adds search (x) permission for others to `dir` (the run's temp dir is 0700).
fn allow_traverse(dir: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut perm = std::fs::metadata(dir)
        .map_err(LoadError::io("reading the temp dir's mode"))?
        .permissions();
    perm.set_mode(perm.mode() | 0o001);
    std::fs::set_permissions(dir, perm).map_err(LoadError::io("setting the temp dir's mode"))
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The `postgres` OS user's uid and gid, from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), LoadError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(LoadError::io("reading /etc/passwd"))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() != Some(&"postgres") || f.len() < 4 {
                return None;
            }
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        })
        .ok_or_else(|| LoadError::Start {
            name: "postgres",
            reason: "running as root and there is no `postgres` OS user (apt-get install postgresql)".into(),
        })
}

/// `GM_LOADTEST_PG_BIN`, else the newest `/usr/lib/postgresql/N/bin` (Debian), else the PATH.
fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("GM_LOADTEST_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_complete_at_their_end() {
        assert!(reply_complete(b"+PONG\r\n"));
        assert!(!reply_complete(b"+PONG"));
        assert!(!reply_complete(b"$10\r\nabc"));
        assert!(reply_complete(b"$3\r\nabc\r\n"));
        assert!(reply_complete(b"-ERR x\r\n"));
    }
}
