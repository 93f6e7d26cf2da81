//! The metered body against scripted bodies, one test per way a body ends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;

use super::*;

const USAGE: &[u8] = br#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}}"#;

/// A body that yields a script of data frames and errors; with `eos`, it says it has ended as
/// soon as its last item is out (as hyper's bodies do with a known length).
struct Script {
    items: VecDeque<Result<Bytes, &'static str>>,
    eos: bool,
}

impl Script {
    fn new(items: Vec<Result<&'static [u8], &'static str>>, eos: bool) -> Self {
        Script {
            items: items.into_iter().map(|i| i.map(Bytes::from_static)).collect(),
            eos,
        }
    }
}

impl Body for Script {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.items.pop_front().map(|i| i.map(Frame::data).map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.eos && self.items.is_empty()
    }
}

/// What an end-of-stream callback was told.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    ending: Ending,
    bytes: u64,
    usage_seen: bool,
    error: bool,
}

#[derive(Default)]
struct Log {
    ends: Mutex<Vec<Seen>>,
    first_bytes: Mutex<u32>,
}

struct Recorder {
    log: Arc<Log>,
    hold: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl OnEnd for Recorder {
    fn first_byte(&mut self) {
        *self.log.first_bytes.lock().unwrap() += 1;
    }

    fn on_end(self, end: End<'_>) -> Option<Hold> {
        self.log.ends.lock().unwrap().push(Seen {
            ending: end.ending,
            bytes: end.response_bytes,
            usage_seen: end.summary.usage_seen,
            error: end.summary.error.is_some(),
        });
        let rx = self.hold?;
        Some(Box::pin(async move {
            let _ = rx.await;
        }))
    }
}

fn metered(script: Script, format: Format, fail_on_error: bool) -> (MeteredBody<Script, Recorder>, Arc<Log>) {
    let log = Arc::new(Log::default());
    let rec = Recorder {
        log: log.clone(),
        hold: None,
    };
    (MeteredBody::new(script, None, format, fail_on_error, rec), log)
}

fn ends(log: &Log) -> Vec<Seen> {
    log.ends.lock().unwrap().clone()
}

#[tokio::test]
async fn a_body_that_ends_with_none_settles_complete_once() {
    let (body, log) = metered(
        Script::new(vec![Ok(&USAGE[..20]), Ok(&USAGE[20..])], false),
        Format::UnaryJson,
        false,
    );
    let out = body.collect().await.unwrap().to_bytes();
    assert_eq!(&out[..], USAGE);
    let e = ends(&log);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].ending, Ending::Complete);
    assert_eq!(e[0].bytes, USAGE.len() as u64);
    assert!(e[0].usage_seen);
    assert_eq!(*log.first_bytes.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_body_that_says_it_ended_settles_before_the_next_poll() {
    let (mut body, log) = metered(Script::new(vec![Ok(USAGE)], true), Format::UnaryJson, false);
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.data_ref().map(Bytes::len), Some(USAGE.len()));
    // hyper stops here: the body says it has ended, and it has already settled.
    assert!(body.is_end_stream());
    assert_eq!(ends(&log).len(), 1);
    assert_eq!(ends(&log)[0].ending, Ending::Complete);
    drop(body);
    assert_eq!(ends(&log).len(), 1, "dropping after the end settles nothing more");
}

#[tokio::test]
async fn an_upstream_error_settles_as_cut_and_reaches_the_client() {
    let (mut body, log) = metered(
        Script::new(vec![Ok(b"{\"a\":"), Err("reset")], false),
        Format::UnaryJson,
        false,
    );
    assert!(body.frame().await.unwrap().is_ok());
    assert!(body.frame().await.unwrap().is_err());
    drop(body);
    let e = ends(&log);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].ending, Ending::UpstreamCut);
    assert_eq!(e[0].bytes, 5);
}

#[tokio::test]
async fn a_client_gone_mid_stream_settles_as_closed() {
    let (mut body, log) = metered(
        Script::new(vec![Ok(b"data: {}\n\n"), Ok(b"data: {}\n\n")], false),
        Format::Sse,
        true,
    );
    assert!(body.frame().await.unwrap().is_ok());
    assert!(ends(&log).is_empty());
    drop(body);
    let e = ends(&log);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].ending, Ending::ClientClosed);
    assert_eq!(e[0].bytes, 10);
}

#[tokio::test]
async fn an_empty_body_settles_complete_with_nothing() {
    let (body, log) = metered(Script::new(vec![], true), Format::UnaryJson, false);
    assert!(!body.is_end_stream(), "not ended before it settled");
    assert!(body.collect().await.unwrap().to_bytes().is_empty());
    let e = ends(&log);
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].ending, e[0].bytes, e[0].usage_seen), (Ending::Complete, 0, false));
    assert_eq!(*log.first_bytes.lock().unwrap(), 0);
}

#[tokio::test]
async fn an_in_band_error_of_a_stream_ends_it_as_an_error_after_its_bytes() {
    let err = b"data: {\"error\":{\"code\":503,\"status\":\"UNAVAILABLE\"}}\n\n";
    let (mut body, log) = metered(
        Script::new(vec![Ok(err), Ok(b"data: {}\n\n")], false),
        Format::Sse,
        true,
    );
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.data_ref().map(Bytes::len), Some(err.len()));
    assert!(body.frame().await.unwrap().is_err());
    let e = ends(&log);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].ending, Ending::Complete);
    assert!(e[0].error);
}

#[tokio::test]
async fn the_end_is_held_until_the_hold_resolves() {
    let log = Arc::new(Log::default());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rec = Recorder {
        log: log.clone(),
        hold: Some(rx),
    };
    let mut body = MeteredBody::new(Script::new(vec![Ok(USAGE)], true), None, Format::UnaryJson, false, rec);
    let mut next = Box::pin(async move {
        let f = body.frame().await;
        (f, body)
    });
    // The last frame is held back while the settled record is not on disk.
    let once = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx).is_pending()));
    assert!(once.await);
    assert_eq!(ends(&log).len(), 1);
    tx.send(()).unwrap();
    let (f, body) = next.await;
    assert_eq!(f.unwrap().unwrap().data_ref().map(Bytes::len), Some(USAGE.len()));
    assert!(body.is_end_stream());
}
