//! Real engines for the cluster tests: a `redis-server` and a throwaway PostgreSQL cluster on
//! free loopback ports, a TCP proxy that can lose a reply or cut connections, and gateway
//! replicas as child processes (`gemini-meter serve`). Every engine that cannot be started
//! panics with the reason: CI must fail, never skip.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ADMIN_TOKEN, UPSTREAM_KEY, base_config, spare_port};

/// How long an engine or a replica may take to come up before the test gives up (generous:
/// two cores, several test binaries at once).
const START_WITHIN: Duration = Duration::from_secs(120);

/// True when this process runs as root (initdb and postgres refuse root).
fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|u| u == "0")
        })
        .unwrap_or(false)
}

/// Sends `signal` (e.g. "KILL") to `pid` with kill(1) (the package has no signal crate).
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn sigkill(pid: u32) {
    signal(pid, "KILL");
}

fn sigterm(pid: u32) {
    signal(pid, "TERM");
}

/// Whether `pid` is alive (a zombie, which pid 1 may never reap here, counts as dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(parent)
        })
        .collect()
}

fn wait_dead(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "processes {pids:?} survive SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a file, for panic messages.
fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Redis

/// The `redis-server` binary: `GM_TEST_REDIS_SERVER`, else `redis-server` on the PATH.
fn redis_server_bin() -> PathBuf {
    std::env::var_os("GM_TEST_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A `redis-server` on a free loopback port, without persistence, in its own temp dir.
pub struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Starts it and waits until it answers PING.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut r = Redis {
            port: spare_port(),
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = self.dir.path().join("redis.log");
        let child = Command::new(redis_server_bin())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); the cluster tests need it: apt-get install redis-server")
            });
        self.child = Some(child);
        let deadline = Instant::now() + START_WITHIN;
        while !self.pings() {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("redis-server exited ({status}) at start: {}", tail_of(&log));
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} does not answer PING: {}",
                self.port,
                tail_of(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Whether the process runs (not killed or stopped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a clean shutdown; nothing is saved), and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigterm(c.id());
            let _ = c.wait();
        }
    }

    /// Kills it if it runs and starts a new, empty process on the same port (a new `run_id`).
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A synchronous connection, for assertions.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("a connection to the test redis")
    }

    /// Runs one command and returns its reply.
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.connection()).expect("redis command")
    }

    /// The server's `run_id` (INFO server), which changes with every process.
    pub fn run_id(&self) -> String {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut self.connection())
            .expect("INFO server");
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_string())
            .expect("run_id in INFO server")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// The PostgreSQL binaries' directory: `GM_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/N/bin` (Debian), else the PATH.
fn pg_bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("GM_TEST_PG_BIN") {
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

/// The `postgres` OS user's uid and gid, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres") && f.len() > 3)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .unwrap_or_else(|| {
            panic!(
                "running as root, and there is no `postgres` OS user to run PostgreSQL as: apt-get install postgresql"
            )
        })
}

/// A throwaway PostgreSQL cluster (initdb) on a free loopback port with a database `gm`; its
/// directory is removed on drop.
pub struct Postgres {
    port: u16,
    dir: tempfile::TempDir,
    bin: Option<PathBuf>,
}

impl Postgres {
    /// initdb, start, and `CREATE DATABASE gm`.
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        if is_root() {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the postgres temp dir");
        }
        let pg = Postgres {
            port: spare_port(),
            dir,
            bin: pg_bin_dir(),
        };
        pg.initdb();
        pg.start_again();
        pg.psql("postgres", "CREATE DATABASE gm");
        pg
    }

    /// A command for one of the PostgreSQL programs, as the `postgres` user when we are root.
    fn tool(&self, name: &str) -> Command {
        let program = self
            .bin
            .as_ref()
            .map(|b| b.join(name))
            .unwrap_or_else(|| PathBuf::from(name));
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, what: &str, mut cmd: Command) {
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("cannot run {what} ({e}); the cluster tests need PostgreSQL 15+: apt-get install postgresql")
        });
        assert!(
            out.status.success(),
            "{what} failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail_of(&self.log())
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn initdb(&self) {
        let mut c = self.tool("initdb");
        c.arg("-D").arg(self.data());
        c.args(["-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C", "-U", "postgres"]);
        self.run("initdb", c);
        // Settings in the file, so that a start after a stop or a kill needs no options.
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n",
            self.port,
            self.dir.path().display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .expect("open postgresql.conf");
        f.write_all(conf.as_bytes()).expect("write postgresql.conf");
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/gm`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/gm", self.port)
    }

    /// Starts the server on the existing data directory and port (after `stop` or `kill`);
    /// waits until it accepts connections.
    pub fn start_again(&self) {
        let mut c = self.tool("pg_ctl");
        c.args(["start", "-w", "-t", "120", "-D"]).arg(self.data());
        c.arg("-l").arg(self.log());
        // pg_ctl leaves the server running with our pipes: let it inherit nothing.
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let status = c.status().unwrap_or_else(|e| {
            panic!("cannot run pg_ctl ({e}); the cluster tests need PostgreSQL 15+: apt-get install postgresql")
        });
        assert!(
            status.success(),
            "pg_ctl start failed ({status}): {}",
            tail_of(&self.log())
        );
    }

    /// A fast shutdown (clients disconnected, a clean checkpoint); waits for the exit.
    pub fn stop(&self) {
        let mut c = self.tool("pg_ctl");
        c.args(["stop", "-w", "-m", "fast", "-D"]).arg(self.data());
        self.run("pg_ctl stop", c);
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// SIGKILL to the postmaster and its backends (a crash); waits until they are gone.
    pub fn kill(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        // The postmaster first: a backend killed before it would make it reinitialize.
        let mut pids = vec![pid];
        pids.extend(children_of(pid));
        for p in &pids {
            sigkill(*p);
        }
        wait_dead(&pids);
        // Their zombies may never be reaped here (pid 1 is not init), and the postmaster takes
        // a live pid in its lock file for a running server.
        let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
        let _ = std::fs::remove_file(self.dir.path().join(format!(".s.PGSQL.{}.lock", self.port)));
    }

    /// Runs `sql` in database `gm` through psql; returns the rows' fields as text (NULL is "").
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        self.psql("gm", sql)
    }

    fn psql(&self, db: &str, sql: &str) -> Vec<Vec<String>> {
        let program = self
            .bin
            .as_ref()
            .map(|b| b.join("psql"))
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(program)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            // Separators that never occur in our data: unit and record separators.
            .args(["-F", "\u{1f}", "-R", "\u{1e}"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql ({e}): apt-get install postgresql-client"));
        assert!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_psql(&String::from_utf8_lossy(&out.stdout))
    }
}

fn parse_psql(text: &str) -> Vec<Vec<String>> {
    text.split('\u{1e}')
        .map(|r| r.strip_suffix('\n').unwrap_or(r))
        .filter(|r| !r.is_empty())
        .map(|r| r.split('\u{1f}').map(str::to_string).collect())
        .collect()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.pid().is_some() {
            let mut c = self.tool("pg_ctl");
            c.args(["stop", "-w", "-m", "immediate", "-D"]).arg(self.data());
            c.stdout(Stdio::null()).stderr(Stdio::null());
            let _ = c.status();
            self.kill();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that loses replies

#[derive(Default)]
struct ProxyState {
    drop_next_reply: AtomicBool,
    refuse: AtomicBool,
    dropped: AtomicU64,
    accepted: AtomicU64,
    /// Client connections being piped now.
    open: AtomicU64,
}

/// Counts a piped connection while it lives.
struct OpenGuard(Arc<ProxyState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`. Armed with [`DropProxy::drop_next_reply`],
/// it swallows the next bytes the upstream sends (on any connection) and closes that client
/// connection: the request ran upstream, its reply is lost. It can also refuse new connections
/// and cut the open ones (an engine out of reach).
pub struct DropProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl DropProxy {
    /// Starts it (inside a tokio runtime).
    pub async fn start(upstream: SocketAddr) -> DropProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState::default());
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(accept_loop(listener, upstream, state.clone(), cut.clone()));
        DropProxy { addr, state, cut, task }
    }

    /// Its address (give this to the client instead of the upstream's).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://ADDR/` for a Redis behind it.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Arms the switch: the upstream's next reply bytes are swallowed and that client's
    /// connection closed.
    pub fn drop_next_reply(&self) {
        self.state.drop_next_reply.store(true, Ordering::SeqCst);
    }

    /// Whether the armed switch is still waiting for a reply.
    pub fn armed(&self) -> bool {
        self.state.drop_next_reply.load(Ordering::SeqCst)
    }

    /// How many replies were swallowed so far.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::SeqCst)
    }

    /// How many client connections it accepted (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// While set, new connections are accepted and closed at once (no bytes forwarded).
    pub fn set_refusing(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Closes every open connection (both sides) without waiting.
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Connections being piped now.
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Refuses new connections and cuts the open ones: the engine is out of reach. Returns
    /// once every connection is closed (nothing sent after this reaches the upstream).
    pub async fn go_dark(&self) {
        self.set_refusing(true);
        self.cut_all();
        while self.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Undoes [`DropProxy::go_dark`].
    pub fn go_live(&self) {
        self.set_refusing(false);
    }
}

impl Drop for DropProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    state: Arc<ProxyState>,
    cut: tokio::sync::watch::Sender<u64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        state.accepted.fetch_add(1, Ordering::SeqCst);
        state.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(state.clone());
        // Subscribed before the refusal is read: a go_dark in between is seen by one or the
        // other (it sets the refusal, then cuts).
        let cut_rx = cut.subscribe();
        if state.refuse.load(Ordering::SeqCst) {
            drop(client);
            drop(guard);
            continue;
        }
        tokio::spawn(pipe(client, upstream, state.clone(), cut_rx, guard));
    }
}

/// One client connection: bytes to the upstream as they come; the upstream's bytes back,
/// unless the drop switch is armed.
async fn pipe(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    state: Arc<ProxyState>,
    mut cut: tokio::sync::watch::Receiver<u64>,
    _open: OpenGuard,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if state.drop_next_reply.swap(false, Ordering::SeqCst) {
                state.dropped.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first (a side closed, a reply dropped, a cut) closes both sides.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway replicas

/// The `[cluster]` section of a replica's config.
pub const CLUSTER_SECTION: &str = r#"
[cluster]
redis_url_env = "GEMINI_METER_REDIS_URL"
postgres_url_env = "GEMINI_METER_DATABASE_URL"
on_redis_unavailable = "deny"
"#;

/// How a replica is started.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// The upstream (usually the in-process `MockServer`'s address).
    pub upstream: SocketAddr,
    /// `GEMINI_METER_REDIS_URL` (None: unset).
    pub redis_url: Option<String>,
    /// `GEMINI_METER_DATABASE_URL` (None: unset).
    pub postgres_url: Option<String>,
    /// TOML appended to the test config (after `[tiers.unlimited]`, before `[cluster]`).
    pub extra: String,
    /// Leave out the `[cluster]` section (embedded mode).
    pub embedded: bool,
    /// More environment variables.
    pub env: Vec<(String, String)>,
}

impl ReplicaOptions {
    /// A replica of `upstream` on these engines.
    pub fn new(upstream: SocketAddr, redis_url: &str, postgres_url: &str) -> ReplicaOptions {
        ReplicaOptions {
            upstream,
            redis_url: Some(redis_url.to_string()),
            postgres_url: Some(postgres_url.to_string()),
            extra: String::new(),
            embedded: false,
            env: Vec::new(),
        }
    }

    /// With `extra` TOML.
    pub fn extra(mut self, extra: &str) -> ReplicaOptions {
        self.extra = extra.to_string();
        self
    }
}

/// Lines a child printed (stdout and stderr), the last few thousand.
type Tail = Arc<Mutex<VecDeque<String>>>;

/// A gateway (`gemini-meter serve`) as a child process, in cluster mode, with its own data
/// directory and port; `Drop` kills it.
pub struct Replica {
    opts: ReplicaOptions,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    output: Tail,
    http: reqwest::Client,
}

impl Replica {
    /// Starts a replica of `upstream` on these engines and waits until `/healthz` answers
    /// (the future borrows nothing: `tokio::join!` several with temporary URLs).
    pub fn start(
        upstream: SocketAddr,
        redis_url: &str,
        postgres_url: &str,
    ) -> impl std::future::Future<Output = Replica> + use<> {
        Self::start_with(ReplicaOptions::new(upstream, redis_url, postgres_url))
    }

    /// Starts a replica as `opts` say and waits until `/healthz` answers.
    pub async fn start_with(opts: ReplicaOptions) -> Replica {
        let dir = tempfile::tempdir().expect("temp dir for a replica");
        let mut r = Replica {
            opts,
            port: spare_port(),
            dir,
            child: None,
            output: Arc::new(Mutex::new(VecDeque::new())),
            http: reqwest::Client::new(),
        };
        r.write_config();
        r.spawn();
        r.wait_healthy().await;
        r
    }

    /// Runs `serve` with these options to its exit (for a start that must fail); returns the
    /// status, stdout and stderr. Panics if it is still running after two minutes.
    pub fn serve_to_exit(opts: ReplicaOptions) -> (ExitStatus, String, String) {
        let dir = tempfile::tempdir().expect("temp dir for a replica");
        let r = Replica {
            opts,
            port: spare_port(),
            dir,
            child: None,
            output: Arc::new(Mutex::new(VecDeque::new())),
            http: reqwest::Client::new(),
        };
        r.write_config();
        let mut child = r
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gemini-meter serve");
        let out = read_all(child.stdout.take());
        let err = read_all(child.stderr.take());
        let deadline = Instant::now() + START_WITHIN;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for serve") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve still runs after {START_WITHIN:?}; it should have refused to start");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        (status, out, err)
    }

    fn config_text(&self) -> String {
        let data = self.dir.path().join("data");
        let mut text = base_config(self.opts.upstream, &data, &self.opts.extra).replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"", self.port),
            1,
        );
        if !self.opts.embedded {
            text.push_str(CLUSTER_SECTION);
        }
        text
    }

    fn write_config(&self) {
        std::fs::write(self.config_path(), self.config_text()).expect("write the replica's config");
    }

    /// Replaces the config's extra TOML and rewrites the file (the watcher picks it up).
    pub fn write_config_extra(&mut self, extra: &str) {
        self.opts.extra = extra.to_string();
        self.write_config();
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gemini-meter"));
        c.arg("serve").arg("--config").arg(self.config_path());
        c.env("GM_TEST_UPSTREAM_KEY", UPSTREAM_KEY);
        c.env("GM_TEST_ADMIN_TOKEN", ADMIN_TOKEN);
        c.env_remove("GEMINI_METER_REDIS_URL");
        c.env_remove("GEMINI_METER_DATABASE_URL");
        if let Some(u) = &self.opts.redis_url {
            c.env("GEMINI_METER_REDIS_URL", u);
        }
        if let Some(u) = &self.opts.postgres_url {
            c.env("GEMINI_METER_DATABASE_URL", u);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        c.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn spawn(&mut self) {
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gemini-meter serve");
        keep_lines(child.stdout.take(), self.output.clone());
        keep_lines(child.stderr.take(), self.output.clone());
        self.child = Some(child);
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("replica exited at start ({status}): {}", self.output());
            }
            if self.http.get(self.url("/healthz")).send().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica on port {} does not answer /healthz: {}",
                self.port,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://ADDR`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// A URL on it.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    /// Its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gemini-meter.toml")
    }

    /// Its data directory (`storage.path`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything it printed so far (the last few thousand lines).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// `kill -9`, and waits for the exit.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (drain and flush), and waits for the exit; returns whether it exited with 0.
    pub async fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        sigterm(c.id());
        tokio::task::spawn_blocking(move || c.wait().map(|s| s.success()).unwrap_or(false))
            .await
            .unwrap_or(false)
    }

    /// Kills it if it runs, then starts it again on the same data directory, config and port;
    /// waits until `/healthz` answers.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_healthy().await;
    }

    /// An admin request builder.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(ADMIN_TOKEN)
    }

    /// Creates a user through the admin API.
    pub async fn create_user(&self, id: &str, tier: &str) {
        let r = self
            .admin(reqwest::Method::POST, "/admin/users")
            .json(&json!({"id": id, "tier": tier}))
            .send()
            .await
            .expect("POST /admin/users");
        let status = r.status();
        assert_eq!(status, 201, "create user {id}: {}", r.text().await.unwrap_or_default());
    }

    /// Issues a key through the admin API.
    pub async fn create_key(&self, user: &str) -> String {
        let r = self
            .admin(reqwest::Method::POST, &format!("/admin/users/{user}/keys"))
            .send()
            .await
            .expect("POST keys");
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.expect("key JSON");
        v["key"].as_str().expect("key").to_string()
    }

    /// A user in `tier` with one key.
    pub async fn user_with_key(&self, id: &str, tier: &str) -> String {
        self.create_user(id, tier).await;
        self.create_key(id).await
    }

    /// GETs `path` with a user's key in the header and reads the JSON answer.
    pub async fn user_json(&self, path: &str, key: &str) -> Value {
        self.http
            .get(self.url(path))
            .header("x-goog-api-key", key)
            .send()
            .await
            .expect("GET with a user's key")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// POSTs a native generate call with the key in the header.
    pub async fn generate(&self, key: &str, model: &str) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1beta/models/{model}:generateContent")))
            .header("x-goog-api-key", key)
            .json(&json!({"contents": [{"role": "user", "parts": [{"text": "Name three primes."}]}]}))
            .send()
            .await
            .expect("generate")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Keeps a child's output lines (so the pipe never fills and blocks it).
fn keep_lines(out: Option<impl Read + Send + 'static>, tail: Tail) {
    let Some(out) = out else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(mut t) = tail.lock() {
                if t.len() == 5000 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
}

fn read_all(out: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut o) = out {
            let _ = o.read_to_string(&mut s);
        }
        s
    })
}

// ---------------------------------------------------------------------------------------------
// A whole cluster

/// The mock upstream (in this process), one Redis, one PostgreSQL and `n` replicas on them:
/// the usual start of a cluster test.
pub struct Fleet {
    /// The mock upstream the replicas forward to.
    pub mock: gemini_meter_mock::MockServer,
    /// The shared Redis.
    pub redis: Redis,
    /// The shared PostgreSQL.
    pub pg: Postgres,
    /// The replicas, started one after the other (the first runs the migrations).
    pub replicas: Vec<Replica>,
}

impl Fleet {
    /// Starts everything; `extra` TOML goes into every replica's config (e.g. tiers).
    pub async fn start(n: usize, extra: &str) -> Fleet {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let opts = gemini_meter_mock::MockOptions {
            api_key: Some(UPSTREAM_KEY.into()),
            ..gemini_meter_mock::MockOptions::default()
        };
        let mock = gemini_meter_mock::MockServer::start("127.0.0.1:0".parse().expect("address"), opts)
            .await
            .expect("start the mock upstream");
        let redis = Redis::start();
        let pg = Postgres::start();
        let mut replicas = Vec::with_capacity(n);
        for _ in 0..n {
            let o = ReplicaOptions::new(mock.addr, &redis.url(), &pg.url()).extra(extra);
            replicas.push(Replica::start_with(o).await);
        }
        Fleet {
            mock,
            redis,
            pg,
            replicas,
        }
    }

    /// Options for one more replica on the same engines (e.g. behind a [`DropProxy`]).
    pub fn options(&self, extra: &str) -> ReplicaOptions {
        ReplicaOptions::new(self.mock.addr, &self.redis.url(), &self.pg.url()).extra(extra)
    }
}
