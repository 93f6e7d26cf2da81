//! `GET /api/usage/stream`: the caller's `current` body as Server-Sent Events.
//!
//! The first `event: usage` goes out at once; after that, one goes out after every change of
//! the caller's usage (announced on [`App::usage_events`]). Bursts are coalesced: at most one
//! event per [`StreamTiming::min_gap`], and the latest state always follows within that gap.
//! A comment line (`: ping`) every [`StreamTiming::ping`] keeps proxies from closing an idle
//! stream. No task is spawned: the body is a stream polled by the connection, so a client that
//! leaves drops it (and its broadcast subscription) with the connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::StreamBody;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, sleep_until};

use crate::app::App;
use crate::identity::KeyEntry;
use crate::metering::observer::BoxError;
use crate::proxy::body::ProxyBody;

/// The user id announced on [`App::usage_events`] to close every open usage stream (shutdown):
/// real user ids are never empty.
const CLOSE_ALL: &str = "";

/// Open usage streams in this process.
static OPEN_STREAMS: AtomicU64 = AtomicU64::new(0);

/// How often a usage stream may speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTiming {
    /// Least time between two `usage` events; changes within it are coalesced into one.
    pub min_gap: Duration,
    /// Time between two heartbeat comments.
    pub ping: Duration,
}

impl Default for StreamTiming {
    fn default() -> Self {
        Self {
            min_gap: Duration::from_millis(100),
            ping: Duration::from_secs(15),
        }
    }
}

/// Number of usage streams open in this process (for metrics and tests).
pub fn open_streams() -> u64 {
    OPEN_STREAMS.load(Ordering::Relaxed)
}

/// Ends every open usage stream of `app` (called when the server starts draining, so that
/// open dashboards do not hold the drain until its timeout).
pub fn close_all(app: &App) {
    // Nobody listening is fine.
    let _ = app.usage_events.send(Arc::from(CLOSE_ALL));
}

/// The response of `GET /api/usage/stream` for an identified caller.
pub fn response(app: &Arc<App>, key: KeyEntry) -> Response<ProxyBody> {
    let frames = events(app.clone(), key, StreamTiming::default());
    let body = StreamBody::new(futures_util::StreamExt::map(frames, |b| {
        Ok::<_, BoxError>(Frame::data(b))
    }));
    let mut resp = Response::new(ProxyBody::stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, no-transform"),
    );
    // nginx and friends: do not buffer this response.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The bytes of a usage stream for `key`'s user: SSE frames, each a complete event or comment.
/// Ends when the key is revoked (seen at the next heartbeat), when [`close_all`] is called, or
/// when the app goes away.
pub fn events(app: Arc<App>, key: KeyEntry, timing: StreamTiming) -> impl Stream<Item = Bytes> + Send + 'static {
    let user_id = app.registry.user_of(key).map_or_else(|| Arc::from(""), |u| u.id_arc());
    let state = State {
        rx: app.usage_events.subscribe(),
        user_id,
        app,
        key,
        timing,
        started: false,
        dirty: false,
        next_allowed: Instant::now(),
        next_ping: Instant::now() + timing.ping,
        _open: OpenGuard::new(),
    };
    futures_util::stream::unfold(state, |mut st| async move { st.next().await.map(|b| (b, st)) })
}

/// Counts an open stream for as long as it lives.
struct OpenGuard;

impl OpenGuard {
    fn new() -> Self {
        OPEN_STREAMS.fetch_add(1, Ordering::Relaxed);
        OpenGuard
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

struct State {
    app: Arc<App>,
    key: KeyEntry,
    user_id: Arc<str>,
    rx: Receiver<Arc<str>>,
    timing: StreamTiming,
    started: bool,
    /// The user's usage changed since the last event.
    dirty: bool,
    /// Earliest time the next `usage` event may go.
    next_allowed: Instant,
    next_ping: Instant,
    _open: OpenGuard,
}

/// What woke the stream up.
enum Wake {
    Flush,
    Ping,
    Event(Result<Arc<str>, RecvError>),
}

impl State {
    fn usage_event(&mut self) -> Bytes {
        let body = match self.app.registry.user_of(self.key) {
            Some(user) => super::current::current(&self.app, user),
            None => serde_json::Value::Null,
        };
        self.next_allowed = Instant::now() + self.timing.min_gap;
        self.dirty = false;
        let mut s = String::with_capacity(512);
        if !self.started {
            // EventSource clients reconnect after this many milliseconds.
            s.push_str("retry: 3000\n");
            self.started = true;
        }
        s.push_str("event: usage\ndata: ");
        s.push_str(&body.to_string());
        s.push_str("\n\n");
        Bytes::from(s)
    }

    async fn next(&mut self) -> Option<Bytes> {
        if !self.started {
            return Some(self.usage_event());
        }
        loop {
            let wake = tokio::select! {
                // Timers first, so that a flood of other users' events cannot starve them.
                biased;
                _ = sleep_until(self.next_allowed), if self.dirty => Wake::Flush,
                _ = sleep_until(self.next_ping) => Wake::Ping,
                r = self.rx.recv() => Wake::Event(r),
            };
            match wake {
                Wake::Flush => {
                    if !self.app.registry.key_active(self.key) {
                        return None;
                    }
                    return Some(self.usage_event());
                }
                Wake::Ping => {
                    if !self.app.registry.key_active(self.key) {
                        return None;
                    }
                    self.next_ping = Instant::now() + self.timing.ping;
                    return Some(Bytes::from_static(b": ping\n\n"));
                }
                Wake::Event(Ok(id)) if &*id == CLOSE_ALL => return None,
                Wake::Event(Ok(id)) => {
                    if *id == *self.user_id {
                        self.dirty = true;
                    }
                }
                // Missed announcements may have been ours: send the state to be sure.
                Wake::Event(Err(RecvError::Lagged(_))) => self.dirty = true,
                Wake::Event(Err(RecvError::Closed)) => return None,
            }
        }
    }
}
