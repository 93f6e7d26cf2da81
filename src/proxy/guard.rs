//! Request bodies that can name resources, guarded against references to resources the
//! caller does not own: the first [`LOOKAHEAD`] bytes are scanned before anything is sent, the
//! rest as it streams.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::Proxy;
use super::body::{BoxError, ProxyBody, RequestTally};
use super::tenancy::not_found;
use crate::error::ApiError;
use crate::identity::{KeyEntry, Registry};
use crate::ownership::references::{RefScanner, required};
use crate::ownership::{Kind, Owners};
use crate::runtime::Runtime;

/// Checks references in a body: every resource they name must be the caller's. Built per
/// request without allocating; the caller and the upstream host are looked up only when a
/// reference turns up.
#[derive(Clone)]
pub struct RefCheck {
    owners: Arc<Owners>,
    registry: Arc<Registry>,
    key: KeyEntry,
    rt: Arc<Runtime>,
}

impl RefCheck {
    /// A check for the bodies of `key`'s user.
    pub fn new(proxy: &Proxy, rt: &Arc<Runtime>, key: KeyEntry) -> Self {
        Self {
            owners: proxy.owners.clone(),
            registry: proxy.registry.clone(),
            key,
            rt: rt.clone(),
        }
    }

    /// The first reference among those found that the caller does not own.
    fn first_foreign(&self, scanner: &mut RefScanner) -> Option<(Kind, String)> {
        let found = scanner.take_found();
        if found.is_empty() {
            return None;
        }
        let host = self
            .rt
            .config
            .upstream
            .base_url
            .host()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let user = self.registry.user_of(self.key).map(|u| u.id());
        found
            .iter()
            .filter_map(|r| required(r, &host))
            .find(|(_, name)| !user.is_some_and(|u| self.owners.owns(u, name)))
    }

    /// Checks a body read whole.
    pub fn whole(&self, bytes: &[u8]) -> Result<(), ApiError> {
        let mut s = RefScanner::new();
        s.feed(bytes);
        match self.first_foreign(&mut s) {
            Some((kind, name)) => Err(not_found(kind, &name)),
            None => Ok(()),
        }
    }
}

/// How much of a body that can carry references is scanned before any of it goes upstream.
/// A body this size or smaller (nearly every call) is refused before the upstream sees a byte;
/// a larger one (inline media) streams on once this much is clean, and is stopped at a foreign
/// reference, so the upstream never receives a whole request nor the reference itself.
pub const LOOKAHEAD: usize = 256 << 10;

/// The body of a call that can name resources, guarded: the first [`LOOKAHEAD`] bytes are read
/// and scanned before anything is sent; the rest is scanned as it streams ([`GuardedBody`]).
pub async fn guarded<B>(mut body: B, check: RefCheck, tally: Arc<RequestTally>, max: u64) -> Result<ProxyBody, ApiError>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    let mut scanner = RefScanner::new();
    let mut head: Vec<Bytes> = Vec::new();
    let mut held = 0usize;
    while held <= LOOKAHEAD {
        let Some(frame) = body.frame().await else {
            return Ok(whole(head));
        };
        let frame = frame.map_err(|_| {
            if tally.too_large.load(std::sync::atomic::Ordering::Relaxed) {
                ApiError::too_large(max)
            } else {
                ApiError::bad_request("The request body could not be read.")
            }
        })?;
        // Trailers of a request (Gemini's have none) are not passed on.
        let Ok(data) = frame.into_data() else { continue };
        scanner.feed(&data);
        if let Some((kind, name)) = check.first_foreign(&mut scanner) {
            super::body::drain(body).await;
            return Err(not_found(kind, &name));
        }
        held += data.len();
        head.push(data);
    }
    let rest = GuardedBody {
        inner: body,
        scanner,
        check,
        tally,
    };
    Ok(ProxyBody::stream(Prefixed {
        head: head.into(),
        rest,
    }))
}

fn whole(mut head: Vec<Bytes>) -> ProxyBody {
    if head.len() <= 1 {
        return head.pop().map_or_else(ProxyBody::empty, ProxyBody::full);
    }
    let mut all = bytes::BytesMut::with_capacity(head.iter().map(Bytes::len).sum());
    for b in head {
        all.extend_from_slice(&b);
    }
    ProxyBody::full(all.freeze())
}

/// Chunks already read, then the rest of the body.
struct Prefixed<B> {
    head: std::collections::VecDeque<Bytes>,
    rest: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }
}

/// The rest of a guarded body, scanned as it streams. A chunk that completes a reference to
/// someone else's resource is not sent: the body fails there, and the refusal is kept in the
/// request's tally for the answer.
pub struct GuardedBody<B> {
    inner: B,
    scanner: RefScanner,
    check: RefCheck,
    tally: Arc<RequestTally>,
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            this.scanner.feed(d);
            if this.scanner.has_found()
                && let Some(foreign) = this.check.first_foreign(&mut this.scanner)
            {
                let _ = this.tally.foreign_reference.set(foreign);
                return Poll::Ready(Some(Err("the body names a resource the caller does not own".into())));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The refusal a guarded body left in the tally, if it stopped for a foreign reference.
pub fn foreign_refusal(tally: &RequestTally) -> Option<ApiError> {
    tally.foreign_reference.get().map(|(k, n)| not_found(*k, n))
}
