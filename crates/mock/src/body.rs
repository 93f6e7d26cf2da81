//! Response bodies of the mock: a whole body, or a paced event stream that renders each event
//! lazily, sends it as its own frame, and settles the stream counters exactly once.

use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::MockStats;
use super::wire::{self, Tokens};

/// Minimum pause before a `cut` stream aborts.
const CUT_PAUSE: Duration = Duration::from_millis(10);

/// Why a mock body ended with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MockBodyError {
    /// The `cut` model: the stream is aborted on purpose.
    #[error("mock stream cut on purpose (model `cut`)")]
    Cut,
    /// Serialising an event failed (not expected).
    #[error("mock could not render an event: {0}")]
    Render(#[from] serde_json::Error),
    /// Compressing an event failed (not expected: it writes to memory).
    #[error("mock could not gzip an event: {0}")]
    Gzip(#[from] io::Error),
}

/// Every body the mock sends.
pub(crate) enum MockBody {
    /// A complete body (sent with Content-Length); `None` once taken.
    Full(Option<Bytes>),
    /// A paced stream of events (chunked / h2 DATA frames).
    Stream(Box<EventStream>),
}

impl MockBody {
    /// A complete body.
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(b.into()))
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        MockBody::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockBodyError>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            MockBody::Stream(s) => s.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(b) => b.is_none(),
            MockBody::Stream(s) => s.settled,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            MockBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// How the events of a stream are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `data: {json}` + blank line; `crlf` picks `\r\n` over `\n`.
    Sse { crlf: bool },
    /// `[` + pretty elements joined by `\r\n,\r\n` + `\r\n]`.
    JsonArray,
    /// OpenAI-compat chunks (`data: {json}\n\n`), then `data: [DONE]\n\n`.
    OpenAi,
}

/// How a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// All pieces, the last with finishReason STOP.
    Complete,
    /// Two events, then an error object (model `midstream-error`).
    MidstreamError,
    /// Two events, then the body fails (model `cut`).
    Cut,
}

/// Everything needed to render the events of one stream.
#[derive(Debug)]
pub(crate) struct StreamPlan {
    pub framing: Framing,
    pub ending: Ending,
    /// Number of text events.
    pub events: u32,
    pub model: String,
    pub response_id: String,
    /// OpenAI `created`.
    pub created: u64,
    pub prompt: u64,
    pub thoughts: u64,
    /// Usage only on the final event (model `final-usage-only`).
    pub usage_last_only: bool,
    /// Gap before every event but the first.
    pub interval: Duration,
    pub gzip: bool,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Event(u32),
    MidError,
    Done,
    Cut,
}

impl Step {
    // The [DONE] sentinel follows the last chunk at once; everything else is paced.
    fn paced(self) -> bool {
        !matches!(self, Step::Done)
    }
}

impl StreamPlan {
    fn step_at(&self, pos: u32) -> Option<Step> {
        if pos < self.events {
            return Some(Step::Event(pos));
        }
        if pos > self.events {
            return None;
        }
        match (self.ending, self.framing) {
            (Ending::Complete, Framing::OpenAi) => Some(Step::Done),
            (Ending::Complete, _) => None,
            (Ending::MidstreamError, _) => Some(Step::MidError),
            (Ending::Cut, _) => Some(Step::Cut),
        }
    }

    fn steps(&self) -> u32 {
        let tail = match (self.ending, self.framing) {
            (Ending::Complete, Framing::OpenAi) => 1,
            (Ending::Complete, _) => 0,
            _ => 1,
        };
        self.events + tail
    }

    fn eol(&self) -> &'static [u8] {
        match self.framing {
            Framing::Sse { crlf: true } => b"\r\n",
            _ => b"\n",
        }
    }

    /// Renders one step as raw (uncompressed) bytes; `Step::Cut` has no bytes.
    fn render(&self, step: Step) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(512);
        match step {
            Step::Event(i) => self.render_event(i, &mut out)?,
            Step::MidError => match self.framing {
                Framing::Sse { .. } => {
                    out.extend_from_slice(wire::ERR_OVERLOADED.as_bytes());
                    out.extend_from_slice(self.eol());
                }
                Framing::JsonArray => {
                    out.extend_from_slice(b"\r\n,\r\n");
                    out.extend_from_slice(wire::ERR_OVERLOADED.as_bytes());
                    out.extend_from_slice(b"\r\n]");
                }
                Framing::OpenAi => {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(wire::ERR_OVERLOADED_COMPACT.as_bytes());
                    out.extend_from_slice(b"\n\n");
                }
            },
            Step::Done => out.extend_from_slice(b"data: [DONE]\n\n"),
            Step::Cut => {}
        }
        Ok(out)
    }

    fn render_event(&self, i: u32, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let last = i + 1 == self.events;
        let finished = last && self.ending == Ending::Complete;
        let tokens = Tokens {
            prompt: self.prompt,
            candidates: wire::TOKENS_PER_PIECE * u64::from(i + 1),
            thoughts: self.thoughts,
        };
        let usage = (!self.usage_last_only || last).then_some(tokens);
        let event = || wire::GenerateResponse::new(wire::PIECE, finished, usage, &self.model, &self.response_id);
        match self.framing {
            Framing::Sse { .. } => {
                out.extend_from_slice(b"data: ");
                wire::write_sse_json(out, &event())?;
                out.extend_from_slice(self.eol());
                out.extend_from_slice(self.eol());
            }
            Framing::JsonArray => {
                out.extend_from_slice(if i == 0 { b"[" } else { b"\r\n,\r\n" });
                wire::write_pretty_json(out, &event())?;
                if finished {
                    out.extend_from_slice(b"\r\n]");
                }
            }
            Framing::OpenAi => {
                let chunk = wire::ChatChunk {
                    id: &self.response_id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: [wire::ChunkChoice {
                        index: 0,
                        delta: wire::Delta { content: wire::PIECE },
                        finish_reason: finished.then_some("stop"),
                    }],
                    // Like Gemini's compat layer: usage rides on the finish chunk only.
                    usage: finished.then(|| tokens.into()),
                };
                out.extend_from_slice(b"data: ");
                serde_json::to_writer(&mut *out, &chunk)?;
                out.extend_from_slice(b"\n\n");
            }
        }
        Ok(())
    }
}

/// A paced stream of events. Dropped before it settled means the client went away:
/// that is what `streams_cancelled` counts.
pub(crate) struct EventStream {
    plan: StreamPlan,
    pos: u32,
    total: u32,
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping: bool,
    // The pause before `pos` has been taken.
    waited: bool,
    gz: Option<GzEncoder<Vec<u8>>>,
    settled: bool,
    stats: Arc<MockStats>,
}

impl EventStream {
    /// Starts a stream (counts `streams_started`).
    pub(crate) fn new(plan: StreamPlan, stats: Arc<MockStats>) -> Self {
        stats.streams_started.fetch_add(1, Relaxed);
        let gz = plan
            .gzip
            .then(|| GzEncoder::new(Vec::with_capacity(512), Compression::fast()));
        EventStream {
            total: plan.steps(),
            plan,
            pos: 0,
            sleep: None,
            sleeping: false,
            waited: false,
            gz,
            settled: false,
            stats,
        }
    }

    fn settle(&mut self, completed: bool) {
        if !self.settled {
            self.settled = true;
            if completed {
                self.stats.streams_completed.fetch_add(1, Relaxed);
            }
        }
    }

    fn fail(&mut self, e: MockBodyError) -> Poll<Option<Result<Frame<Bytes>, MockBodyError>>> {
        // A deliberate or internal abort is neither completed nor cancelled by the client.
        self.settle(false);
        Poll::Ready(Some(Err(e)))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, MockBodyError>>> {
        loop {
            if self.sleeping {
                if let Some(sleep) = self.sleep.as_mut() {
                    ready!(sleep.as_mut().poll(cx));
                }
                self.sleeping = false;
            }
            if self.settled {
                return Poll::Ready(None);
            }
            let Some(step) = self.plan.step_at(self.pos) else {
                self.settle(true);
                return Poll::Ready(None);
            };
            let pause = match step {
                // Give the server time to flush the headers and events before the abort, or
                // the client would see no response at all instead of a truncated one.
                Step::Cut => self.plan.interval.max(CUT_PAUSE),
                _ => self.plan.interval,
            };
            if self.pos > 0 && step.paced() && !self.waited && !pause.is_zero() {
                let deadline = Instant::now() + pause;
                match self.sleep.as_mut() {
                    Some(s) => s.as_mut().reset(deadline),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.sleeping = true;
                self.waited = true;
                continue;
            }
            self.waited = false;
            self.pos += 1;
            if matches!(step, Step::Cut) {
                return self.fail(MockBodyError::Cut);
            }
            let raw = match self.plan.render(step) {
                Ok(raw) => raw,
                Err(e) => return self.fail(e.into()),
            };
            let last = self.pos == self.total;
            let data = match self.gz.as_mut() {
                None => Bytes::from(raw),
                Some(gz) => match compress(gz, &raw, last) {
                    Ok(data) => data,
                    Err(e) => return self.fail(e.into()),
                },
            };
            if last {
                // hyper may not poll again once is_end_stream() is true: settle now.
                self.settle(true);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }
}

/// Compresses one event and sync-flushes it, so that it can be decoded before the next one
/// arrives; the last event also carries the gzip trailer.
fn compress(gz: &mut GzEncoder<Vec<u8>>, raw: &[u8], last: bool) -> io::Result<Bytes> {
    gz.write_all(raw)?;
    if last {
        gz.try_finish()?;
    } else {
        gz.flush()?;
    }
    Ok(Bytes::from(std::mem::take(gz.get_mut())))
}

/// Gzips a whole body.
pub(crate) fn gzip_all(raw: &[u8]) -> io::Result<Bytes> {
    let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 2 + 64), Compression::fast());
    gz.write_all(raw)?;
    gz.finish().map(Bytes::from)
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.settled {
            self.stats.streams_cancelled.fetch_add(1, Relaxed);
        }
    }
}
