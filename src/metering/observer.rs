//! The response-body observer: forwards every frame untouched and at once, feeds the bytes to
//! the scanner, and calls its end-of-stream callback exactly once however the body ends: at
//! its end (`None`, or `is_end_stream` turning true, since hyper may never poll again), on an
//! upstream error, or when dropped because the client went away (dropping it also drops the
//! upstream body, which closes the upstream connection so the upstream stops generating).
//!
//! The body is generic over its callback ([`OnEnd`]), so it is tested here with a scripted
//! body and a callback that only remembers what it was told.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::decode::DecodingScanner;
use super::scan::{Format, ScanSummary};
pub use crate::body::BoxError;

/// How a metered body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The upstream body ended cleanly.
    Complete,
    /// The upstream body broke off (reset, truncated chunked body).
    UpstreamCut,
    /// The client went away before the end.
    ClientClosed,
}

/// What the body saw, handed to the callback at its end.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    /// What the scanner read.
    pub summary: &'a ScanSummary,
    /// Bytes of body passed to the client.
    pub response_bytes: u64,
    /// How it ended.
    pub ending: Ending,
}

/// One poll's result of a body.
type Item = Option<Result<Frame<Bytes>, BoxError>>;

/// A wait the body holds its end on (the settled record's alert reaching the disk).
pub type Hold = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The end-of-stream callback of a [`MeteredBody`].
pub trait OnEnd: Send + Unpin + 'static {
    /// The first bytes of the body passed (for time-to-first-byte).
    fn first_byte(&mut self) {}

    /// The body ended; called exactly once. A returned hold delays the end of the body toward
    /// the client until it resolves (ignored when the client is gone).
    fn on_end(self, end: End<'_>) -> Option<Hold>;
}

/// A response body that meters what passes through it.
pub struct MeteredBody<B, E: OnEnd> {
    inner: B,
    scanner: DecodingScanner,
    response_bytes: u64,
    on_end: Option<E>,
    /// Whether an in-band error object ends the stream as an error (a 2xx stream's).
    fail_on_error: bool,
    /// Set after forwarding an in-band error object of a 2xx stream: the next poll fails, so
    /// the client's stream ends as an error, not as a clean end.
    fail_next: bool,
    /// True once the frames before a deliberate failure had their chance to be written.
    flushed: bool,
    /// The end, held back until `hold` resolves.
    held: Option<(Hold, Item)>,
}

impl<B, E: OnEnd> MeteredBody<B, E> {
    /// Wraps `inner`; `content_encoding` is the response's Content-Encoding, `format` its
    /// framing; `fail_on_error` for a successful stream, whose in-band error must reach the
    /// client as a failed stream.
    pub fn new(inner: B, content_encoding: Option<&str>, format: Format, fail_on_error: bool, on_end: E) -> Self {
        Self {
            inner,
            scanner: DecodingScanner::new(content_encoding, format),
            response_bytes: 0,
            on_end: Some(on_end),
            fail_on_error,
            fail_next: false,
            flushed: false,
            held: None,
        }
    }

    fn end(&mut self, ending: Ending) -> Option<Hold> {
        let e = self.on_end.take()?;
        e.on_end(End {
            summary: &self.scanner.summary(),
            response_bytes: self.response_bytes,
            ending,
        })
    }

    /// Ends with `ending`, then yields `item`, after the callback's hold if it returned one.
    fn finish(&mut self, cx: &mut Context<'_>, ending: Ending, item: Item) -> Poll<Item> {
        match self.end(ending) {
            None => Poll::Ready(item),
            Some(hold) => {
                self.held = Some((hold, item));
                self.poll_held(cx)
            }
        }
    }

    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        let Some((hold, _)) = &mut self.held else {
            return Poll::Ready(None);
        };
        ready!(hold.as_mut().poll(cx));
        Poll::Ready(self.held.take().and_then(|(_, item)| item))
    }
}

impl<B, E> Body for MeteredBody<B, E>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    E: OnEnd,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.held.is_some() {
            return this.poll_held(cx);
        }
        if this.fail_next {
            if !this.flushed {
                // Give hyper one turn to write out the error object it already holds before the
                // failure aborts the connection; otherwise the client never sees it.
                this.flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            this.fail_next = false;
            let err: BoxError = "the upstream reported an error inside the stream".into();
            return this.finish(cx, Ending::Complete, Some(Err(err)));
        }
        if this.on_end.is_none() {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if this.response_bytes == 0
                        && let Some(e) = &mut this.on_end
                    {
                        e.first_byte();
                    }
                    this.response_bytes += data.len() as u64;
                    this.scanner.feed(data);
                    if this.fail_on_error && this.scanner.has_error() {
                        this.fail_next = true;
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                if this.inner.is_end_stream() {
                    return this.finish(cx, Ending::Complete, Some(Ok(frame)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => this.finish(cx, Ending::UpstreamCut, Some(Err(e.into()))),
            None => this.finish(cx, Ending::Complete, None),
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.fail_next && self.held.is_none() && self.on_end.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, E: OnEnd> Drop for MeteredBody<B, E> {
    fn drop(&mut self) {
        // The client is gone: nobody to hold the end for.
        drop(self.end(Ending::ClientClosed));
    }
}

#[cfg(test)]
mod tests;
