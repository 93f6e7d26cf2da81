//! The child processes (mock, gateway, nginx): start, wait until ready, read /proc, stop.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::LoadError;

/// How long a child may take to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The same under a tool such as valgrind, which runs it some fifty times slower.
const WRAPPED_START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a child may take to exit after SIGTERM (the gateway drains and flushes).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Output lines kept per child, for error messages.
const KEPT_LINES: usize = 20;
/// Linux reports utime/stime in USER_HZ, which is 100 on every architecture (it is ABI).
const TICKS_PER_SEC: u64 = 100;

/// A running child process; dropping it sends SIGTERM.
#[derive(Debug)]
pub struct Proc {
    name: &'static str,
    child: Child,
    pid: u32,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines it printed (stdout and stderr), for error messages.
    pub fn tail(&self) -> String {
        match self.tail.lock() {
            Ok(t) => t.iter().cloned().collect::<Vec<_>>().join(" | "),
            Err(_) => String::new(),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within the stop timeout. Returns whether it
    /// exited on its own with status 0.
    pub async fn stop(mut self) -> bool {
        terminate(self.pid);
        let clean = match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                false
            }
        };
        // Already reaped: nothing left for Drop to signal.
        self.pid = 0;
        clean
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM rather than SIGKILL: nginx's master only takes its workers down on a signal it
        // can handle. tokio reaps the child in the background.
        if self.pid != 0 && matches!(self.child.try_wait(), Ok(None)) {
            terminate(self.pid);
        }
    }
}

/// Sends SIGTERM to our child `pid` (not yet reaped, so not reused).
fn terminate(pid: u32) {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return;
    };
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
}

/// How the gateway binary is started: as itself, or under a tool given by its command line
/// (`valgrind --tool=callgrind ...`), whose process is then the child.
#[derive(Debug, Clone, Copy)]
pub enum Launch<'a> {
    /// `binary args...`
    Direct,
    /// `tool... binary args...`
    Under(&'a [OsString]),
}

impl Launch<'_> {
    fn command(self, binary: &Path) -> Command {
        match self {
            Launch::Under([tool, args @ ..]) => {
                let mut c = Command::new(tool);
                c.args(args).arg(binary);
                c
            }
            Launch::Direct | Launch::Under([]) => Command::new(binary),
        }
    }

    fn start_timeout(self) -> Duration {
        match self {
            Launch::Direct => START_TIMEOUT,
            Launch::Under(_) => WRAPPED_START_TIMEOUT,
        }
    }
}

/// Spawns `cmd` with piped output, and waits (up to `within`) until a line contains `ready`;
/// returns the child and the rest of that line after `ready`.
pub(crate) async fn spawn_until(
    name: &'static str,
    mut cmd: Command,
    ready: &'static str,
    within: Duration,
) -> Result<(Proc, String), LoadError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| LoadError::Start {
        name,
        reason: e.to_string(),
    })?;
    let pid = child.id().unwrap_or(0);
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        drain(out, tail.clone(), tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        drain(err, tail.clone(), tx);
    }
    let proc = Proc { name, child, pid, tail };
    let found = tokio::time::timeout(within, async {
        while let Some(line) = rx.recv().await {
            if let Some((_, rest)) = line.split_once(ready) {
                return Some(rest.to_string());
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(rest)) => Ok((proc, rest)),
        Ok(None) => Err(LoadError::Start {
            name,
            reason: format!("exited: {}", proc.tail()),
        }),
        Err(_) => Err(LoadError::Start {
            name,
            reason: format!("no `{ready}` within {within:?}: {}", proc.tail()),
        }),
    }
}

/// Reads a child's output to its end (so the pipe never fills and blocks it), keeping the last
/// lines and passing each on while someone listens.
fn drain(
    out: impl AsyncRead + Unpin + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    tx: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut t) = tail.lock() {
                if t.len() == KEPT_LINES {
                    t.pop_front();
                }
                t.push_back(line.clone());
            }
            let _ = tx.send(line);
        }
    });
}

fn parse_addr(name: &'static str, rest: &str) -> Result<SocketAddr, LoadError> {
    rest.split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| LoadError::Start {
            name,
            reason: format!("cannot read the address from `{rest}`"),
        })
}

/// Starts `gemini-meter mock-upstream` on a free loopback port.
pub async fn start_mock(
    binary: &Path,
    chunks: u32,
    chunk_delay: Duration,
    ttfb: Duration,
) -> Result<(Proc, SocketAddr), LoadError> {
    let args = [
        "--chunks".to_string(),
        chunks.to_string(),
        "--chunk-interval-ms".to_string(),
        chunk_delay.as_millis().to_string(),
        "--ttfb-ms".to_string(),
        ttfb.as_millis().to_string(),
    ];
    start_listener(binary, Launch::Direct, "mock upstream", "mock-upstream", &args).await
}

/// Starts `gemini-meter loadtest-passthrough` (a plain hyper proxy) in front of `upstream`.
pub async fn start_passthrough(
    binary: &Path,
    launch: Launch<'_>,
    upstream: SocketAddr,
) -> Result<(Proc, SocketAddr), LoadError> {
    let args = ["--upstream".to_string(), upstream.to_string()];
    start_listener(binary, launch, "hyper passthrough", "loadtest-passthrough", &args).await
}

/// Starts `gemini-meter <command> --listen 127.0.0.1:0 <args>` and returns the address it
/// says it listens on.
async fn start_listener(
    binary: &Path,
    launch: Launch<'_>,
    name: &'static str,
    command: &str,
    args: &[String],
) -> Result<(Proc, SocketAddr), LoadError> {
    let mut cmd = launch.command(binary);
    cmd.arg(command)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(args)
        .env("RUST_LOG", "info");
    let (p, rest) = spawn_until(name, cmd, "listening on ", launch.start_timeout()).await?;
    let addr = parse_addr(name, &rest)?;
    Ok((p, addr))
}

/// Starts `gemini-meter serve --config PATH` with the admin token and upstream key in its env
/// (and `workers` tokio worker threads, if set).
pub async fn start_gateway(
    binary: &Path,
    launch: Launch<'_>,
    config: &Path,
    admin_token: &str,
    upstream_key: &str,
    workers: Option<usize>,
) -> Result<(Proc, SocketAddr), LoadError> {
    start_gateway_env(binary, launch, config, admin_token, upstream_key, workers, &[]).await
}

/// [`start_gateway`] with more environment variables (a replica's engine URLs).
pub async fn start_gateway_env(
    binary: &Path,
    launch: Launch<'_>,
    config: &Path,
    admin_token: &str,
    upstream_key: &str,
    workers: Option<usize>,
    env: &[(String, String)],
) -> Result<(Proc, SocketAddr), LoadError> {
    let mut cmd = launch.command(binary);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env(super::configs::ADMIN_TOKEN_ENV, admin_token)
        .env(super::configs::UPSTREAM_KEY_ENV, upstream_key)
        .env("RUST_LOG", "info")
        .env_remove("GEMINI_METER_FAKE_NOW");
    if let Some(n) = workers {
        // Read by tokio's runtime builder when the program sets no count itself.
        cmd.env("TOKIO_WORKER_THREADS", n.to_string());
    }
    let (p, rest) = spawn_until("gateway", cmd, "listening on ", launch.start_timeout()).await?;
    let addr = parse_addr("gateway", &rest)?;
    Ok((p, addr))
}

/// `nginx` on PATH, else Debian's /usr/sbin/nginx.
pub fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
}

/// Starts nginx on `conf` and waits until `listen` accepts connections (nginx prints nothing
/// when it is ready).
pub async fn start_nginx(nginx: &Path, prefix: &Path, conf: &Path, listen: SocketAddr) -> Result<Proc, LoadError> {
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(prefix.join("nginx-tmp").join(sub)).map_err(LoadError::io("nginx temp dir"))?;
    }
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(prefix.join("nginx-error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| LoadError::Start {
        name: "nginx",
        reason: e.to_string(),
    })?;
    let pid = child.id().unwrap_or(0);
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
    let (tx, _rx) = mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        drain(out, tail.clone(), tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        drain(err, tail.clone(), tx);
    }
    let mut proc = Proc {
        name: "nginx",
        child,
        pid,
        tail,
    };
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(proc);
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            let log = std::fs::read_to_string(prefix.join("nginx-error.log")).unwrap_or_default();
            return Err(LoadError::Start {
                name: proc.name,
                reason: format!("exited with {status}: {} {}", proc.tail(), log.trim()),
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(LoadError::Start {
                name: proc.name,
                reason: format!("{listen} not accepting within {START_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback port (bind, read, release; nginx needs a fixed one in its config).
pub fn free_port() -> Result<SocketAddr, LoadError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(LoadError::io("finding a free port"))?;
    l.local_addr().map_err(LoadError::io("finding a free port"))
}

/// Resident memory of `pid` in bytes (`VmRSS`), or `None` once it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system, all threads) of `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let after = &s[s.rfind(')')? + 1..];
    let mut f = after.split_whitespace();
    // After ')' come state (field 3) ... utime is field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / TICKS_PER_SEC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(cpu_time(pid).is_some());
    }
}
