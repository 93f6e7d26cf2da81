//! The closed-loop client: `concurrency` workers, each on its own keep-alive HTTP/1.1
//! connection, sending the next request as soon as the previous answer has fully arrived.
//!
//! One connection per worker (rather than a pool) so that every target sees exactly the same
//! client: the same number of connections, no pool bookkeeping, and connects outside the timed
//! part (workers connect, then all start together).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio_rustls::TlsConnector;

use super::CallKind;
use super::stats::Tally;

/// A keep-alive HTTP/1.1 connection's sending half.
pub type Sender = SendRequest<Full<Bytes>>;

/// Bound on one request, so a wedged target cannot hang a phase.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra time a phase may take past its deadline for streams in flight to end.
const PHASE_GRACE: Duration = Duration::from_secs(90);
/// Pause after a failed connect, so a dead target costs errors, not a spinning CPU.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);
/// The model every call asks for (priced in the gateway's config).
const MODEL: &str = "gemini-2.5-flash";
/// The prompt; small, like a chat turn.
const BODY: &[u8] = br#"{"contents":[{"role":"user","parts":[{"text":"Name three primes."}]}]}"#;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP/1 handshake failed.
    #[error("handshake: {0}")]
    Http(#[from] hyper::Error),
}

/// The client side of `--tls`: a connector that trusts the run's own CA.
#[derive(Clone)]
pub struct TlsClient(pub TlsConnector);

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient")
    }
}

/// Opens a keep-alive HTTP/1.1 connection to `addr`, over TLS when `tls` is set (the server
/// certificate names 127.0.0.1).
pub async fn connect_with(addr: SocketAddr, tls: Option<&TlsClient>) -> Result<Sender, ConnectError> {
    let Some(TlsClient(tls)) = tls else {
        return connect(addr).await;
    };
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
    let stream = tls.connect(name, stream).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Opens a keep-alive HTTP/1.1 connection to `addr`; the connection runs in its own task.
pub async fn connect(addr: SocketAddr) -> Result<Sender, ConnectError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the worker drops its sender or the peer closes; either is expected.
        let _ = conn.await;
    });
    Ok(sender)
}

/// One measured (or warm-up) stretch of load against one target.
#[derive(Debug, Clone)]
pub struct Phase {
    /// The target.
    pub addr: SocketAddr,
    /// Unary or SSE.
    pub kind: CallKind,
    /// Keys sent as `x-goog-api-key`; worker `i` uses key `i % len`.
    pub keys: Arc<Vec<HeaderValue>>,
    /// Workers (and connections).
    pub concurrency: usize,
    /// Time during which workers start new requests.
    pub duration: Duration,
    /// Events a complete stream has.
    pub chunks: u32,
    /// Worker `i` of `n` sends its first request `stagger * i / n` after the common start, so
    /// that streams are spread over one chunk interval instead of all ticking in the same
    /// millisecond (a thousand chat streams are not in lockstep); zero for unary.
    pub stagger: Duration,
    /// Requests to send in all, shared by the workers (`None`: as many as `duration` allows).
    pub requests: Option<u64>,
    /// Connect over TLS (`--tls`).
    pub tls: Option<TlsClient>,
    /// A new connection for every request (to measure what a connection, and its TLS
    /// handshake, costs) instead of keep-alive.
    pub fresh: bool,
}

impl Phase {
    fn path(&self) -> String {
        match self.kind {
            CallKind::Unary => format!("/v1beta/models/{MODEL}:generateContent"),
            CallKind::Sse => format!("/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"),
        }
    }
}

/// Runs a phase: every worker connects, all start at once, and each sends requests until the
/// phase's duration is over, then finishes the one in flight. Returns the merged tally, with
/// `elapsed` from the common start to the last answer.
pub async fn run_phase(p: &Phase) -> Tally {
    let n = p.concurrency.max(1);
    let barrier = Arc::new(Barrier::new(n + 1));
    let path: Arc<str> = p.path().into();
    let host = HeaderValue::from_str(&p.addr.to_string()).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
    let tickets = p.requests.map(|n| Arc::new(AtomicU64::new(n)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let key = match p.keys.len() {
            0 => HeaderValue::from_static("loadtest"),
            len => p.keys[i % len].clone(),
        };
        let offset = p.stagger.mul_f64(i as f64 / n as f64);
        let w = Worker {
            addr: p.addr,
            kind: p.kind,
            path: path.clone(),
            host: host.clone(),
            key,
            chunks: p.chunks,
            tickets: tickets.clone(),
            tls: p.tls.clone(),
            fresh: p.fresh,
        };
        let barrier = barrier.clone();
        let duration = p.duration;
        tasks.spawn(async move { w.run(barrier, duration, offset).await });
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut total = Tally::default();
    let hard_stop = tokio::time::Instant::now() + p.duration + PHASE_GRACE;
    loop {
        match tokio::time::timeout_at(hard_stop, tasks.join_next()).await {
            Ok(Some(Ok(t))) => total.merge(&t),
            // A worker that panicked counts as one transport error; the run goes on.
            Ok(Some(Err(_))) => total.errors.transport += 1,
            Ok(None) => break,
            Err(_) => {
                // Past the grace: whatever is still running is abandoned and counted.
                total.errors.transport += tasks.len() as u64;
                tasks.abort_all();
                break;
            }
        }
    }
    total.elapsed = start.elapsed();
    total
}

struct Worker {
    addr: SocketAddr,
    kind: CallKind,
    path: Arc<str>,
    host: HeaderValue,
    key: HeaderValue,
    chunks: u32,
    tickets: Option<Arc<AtomicU64>>,
    tls: Option<TlsClient>,
    fresh: bool,
}

/// How one request ended.
enum Outcome {
    Ok,
    Status,
    Transport,
    Short,
}

impl Worker {
    async fn run(self, barrier: Arc<Barrier>, duration: Duration, offset: Duration) -> Tally {
        let mut t = Tally::default();
        let mut sender = match connect_with(self.addr, self.tls.as_ref()).await {
            Ok(s) => Some(s),
            Err(_) => {
                t.errors.transport += 1;
                None
            }
        };
        barrier.wait().await;
        let deadline = Instant::now() + duration;
        if !offset.is_zero() {
            tokio::time::sleep(offset).await;
        }
        while Instant::now() < deadline {
            let mut s = match sender.take() {
                Some(s) if !s.is_closed() => s,
                _ => match self.timed_connect(&mut t).await {
                    Ok(s) => s,
                    Err(_) => {
                        t.errors.transport += 1;
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                },
            };
            // A keep-alive connection the peer closed while idle is replaced, not an error.
            if s.ready().await.is_err() {
                continue;
            }
            if !self.take_ticket() {
                break;
            }
            let (outcome, keep) = match tokio::time::timeout(REQUEST_TIMEOUT, self.one(&mut s, &mut t)).await {
                Ok(r) => r,
                Err(_) => (Outcome::Transport, false),
            };
            match outcome {
                Outcome::Ok => t.ok += 1,
                Outcome::Status => t.errors.status += 1,
                Outcome::Transport => t.errors.transport += 1,
                Outcome::Short => t.errors.short_stream += 1,
            }
            // A fresh connection per request: this one is dropped (closed) here.
            if keep && !self.fresh {
                sender = Some(s);
            }
        }
        t
    }

    /// Connects (over TLS when set) and records how long connect and handshakes took.
    async fn timed_connect(&self, t: &mut Tally) -> Result<Sender, ConnectError> {
        let started = Instant::now();
        let s = connect_with(self.addr, self.tls.as_ref()).await?;
        t.connect.record(started.elapsed());
        Ok(s)
    }

    /// Whether another request may be sent (always, unless the phase has a request count).
    fn take_ticket(&self) -> bool {
        self.tickets.as_ref().is_none_or(|t| {
            t.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        })
    }

    /// Sends one request and reads its answer to the end; returns how it ended and whether the
    /// connection may be reused.
    async fn one(&self, s: &mut Sender, t: &mut Tally) -> (Outcome, bool) {
        let req = Request::builder()
            .method(Method::POST)
            .uri(&*self.path)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("x-goog-api-key", self.key.clone())
            .body(Full::new(Bytes::from_static(BODY)));
        let Ok(req) = req else {
            return (Outcome::Transport, true);
        };
        let started = Instant::now();
        let resp = match s.send_request(req).await {
            Ok(r) => r,
            Err(_) => return (Outcome::Transport, false),
        };
        let status = resp.status();
        let keep = resp
            .headers()
            .get(CONNECTION)
            .is_none_or(|v| !v.as_bytes().eq_ignore_ascii_case(b"close"));
        let mut body = resp.into_body();
        let mut first: Option<Instant> = None;
        let mut events = EventCounter::default();
        let mut last_event: Option<Instant> = None;
        let mut gaps = Vec::new();
        while let Some(frame) = body.frame().await {
            let now = Instant::now();
            let frame = match frame {
                Ok(f) => f,
                Err(_) => return (Outcome::Transport, false),
            };
            let Some(data) = frame.data_ref() else { continue };
            if data.is_empty() {
                continue;
            }
            first.get_or_insert(now);
            if self.kind == CallKind::Sse {
                // Every event ending in this frame arrived now; gaps are between arrivals.
                for _ in 0..events.feed(data) {
                    if let Some(prev) = last_event {
                        gaps.push(now - prev);
                    }
                    last_event = Some(now);
                }
            }
        }
        let done = Instant::now();
        if status != StatusCode::OK {
            return (Outcome::Status, keep);
        }
        if self.kind == CallKind::Sse && events.events < u64::from(self.chunks.max(1)) {
            return (Outcome::Short, keep);
        }
        // Only successful requests enter the histograms: an error's timing is not a latency.
        t.latency.record(done - started);
        if let Some(f) = first {
            t.ttfb.record(f - started);
        }
        for g in gaps {
            t.gap.record(g);
        }
        (Outcome::Ok, keep)
    }
}

/// Counts SSE events (a blank line ends one) across frame boundaries, for LF and CRLF endings.
#[derive(Debug, Default)]
struct EventCounter {
    // The previous significant byte was a line feed (carriage returns are skipped).
    after_newline: bool,
    events: u64,
}

impl EventCounter {
    /// Feeds bytes; returns how many events ended in them.
    fn feed(&mut self, data: &[u8]) -> u64 {
        let mut ended = 0;
        for &b in data {
            match b {
                b'\r' => {}
                b'\n' if self.after_newline => {
                    ended += 1;
                    self.after_newline = false;
                }
                b'\n' => self.after_newline = true,
                _ => self.after_newline = false,
            }
        }
        self.events += ended;
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_across_frames_and_line_endings() {
        let mut c = EventCounter::default();
        assert_eq!(c.feed(b"data: {}\r\n\r\ndata: {"), 1);
        assert_eq!(c.feed(b"}\r\n\r"), 0);
        assert_eq!(c.feed(b"\ndata: x\n\ndata: y\n"), 2);
        assert_eq!(c.feed(b"\n"), 1);
        assert_eq!(c.events, 4);
    }
}
