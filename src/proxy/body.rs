//! Body types of the gateway: a whole buffer, or a stream passed through.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub use crate::body::{BoxError, ProxyBody};
use crate::metering::scan::TextCounter;

/// Most a refused request's unread body is drained of, and for how long.
const DRAIN_BYTES: usize = 4 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads (bounded) what is left of a refused request's body before the refusal is sent: a
/// connection closed on a client still sending its body resets, and the client sees a broken
/// connection instead of the answer.
pub async fn drain<B>(mut body: B)
where
    B: Body + Unpin,
    B::Data: bytes::Buf,
{
    use bytes::Buf;
    use http_body_util::BodyExt;
    let mut left = DRAIN_BYTES;
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            left = left.saturating_sub(frame.data_ref().map_or(0, Buf::remaining));
            if left == 0 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// What a request body told us as it went upstream.
#[derive(Debug, Default)]
pub struct RequestTally {
    /// Bytes passed upstream.
    pub bytes: AtomicU64,
    /// Characters of prompt text seen (generate calls only).
    pub text_chars: Arc<AtomicU64>,
    /// Set when the body went over the size limit.
    pub too_large: AtomicBool,
    /// Set when the body named a resource the caller does not own (and was stopped there).
    pub foreign_reference: std::sync::OnceLock<(crate::ownership::Kind, String)>,
    /// Seconds of video per sample a video generation asked for (`parameters.durationSeconds`).
    pub video_seconds: AtomicU64,
}

/// A request body on its way upstream: counts bytes, enforces the size limit, and (for model
/// calls) counts prompt text for estimates. Frames pass through unchanged.
pub struct CountingBody<B> {
    inner: B,
    tally: Arc<RequestTally>,
    limit: u64,
    seen: u64,
    text: Option<TextCounter>,
}

impl<B> CountingBody<B> {
    /// Wraps a request body.
    pub fn new(inner: B, tally: Arc<RequestTally>, limit: u64, count_text: bool) -> Self {
        Self {
            inner,
            tally,
            limit,
            seen: 0,
            text: count_text.then(TextCounter::new),
        }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.limit {
                        this.tally.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err("request body too large".into())));
                    }
                    this.tally.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if let Some(tc) = &mut this.text {
                        tc.feed(d);
                        this.tally.text_chars.store(tc.chars(), Ordering::Relaxed);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
