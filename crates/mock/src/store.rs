//! In-memory state of the mock's stateful resources (files, cachedContents, batches,
//! operations, tuned models, file search stores) and the request log.
//!
//! Owns: one mutex-guarded collection per resource kind, Google-style paging (newest first,
//! opaque page tokens, an empty page is `{}`), and the bounded log of received requests.
//! Must not: be touched by generateContent beyond one push onto the request log, or hold a
//! lock across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::{Method, Response, StatusCode, Uri};
use serde::Serialize;
use serde::ser::SerializeMap;

use super::body::MockBody;
use super::{error_json, json, query_param, wire};

/// Default `pageSize` of every list.
const DEFAULT_PAGE: usize = 10;
/// Largest `pageSize` honoured; larger values are clamped as Google does.
const MAX_PAGE: usize = 100;
/// Requests kept by the log; older ones are dropped.
pub(crate) const LOG_CAP: usize = 10_000;

// A poisoned lock only means a panic mid-update of a mock's map: reuse it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One kind of resource: items by id, listed newest first.
#[derive(Debug)]
pub(crate) struct Collection<T> {
    inner: Mutex<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    next_seq: u64,
    by_seq: BTreeMap<u64, String>,
    items: HashMap<String, (u64, T)>,
}

impl<T> Default for Collection<T> {
    fn default() -> Self {
        Collection {
            inner: Mutex::new(Inner {
                next_seq: 1,
                by_seq: BTreeMap::new(),
                items: HashMap::new(),
            }),
        }
    }
}

impl<T: Clone> Collection<T> {
    /// Adds (or replaces) an item; it becomes the newest.
    pub(crate) fn insert(&self, id: &str, item: T) {
        let mut g = lock(&self.inner);
        let seq = g.next_seq;
        g.next_seq += 1;
        if let Some((old, _)) = g.items.insert(id.to_owned(), (seq, item)) {
            g.by_seq.remove(&old);
        }
        g.by_seq.insert(seq, id.to_owned());
    }

    /// A copy of the item.
    pub(crate) fn get(&self, id: &str) -> Option<T> {
        lock(&self.inner).items.get(id).map(|(_, t)| t.clone())
    }

    /// Runs `f` on the item under the lock.
    pub(crate) fn update<R>(&self, id: &str, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        lock(&self.inner).items.get_mut(id).map(|(_, t)| f(t))
    }

    /// Removes the item.
    pub(crate) fn remove(&self, id: &str) -> Option<T> {
        let mut g = lock(&self.inner);
        let (seq, item) = g.items.remove(id)?;
        g.by_seq.remove(&seq);
        Some(item)
    }

    /// Removes every item `keep` rejects (lazy expiry).
    pub(crate) fn retain(&self, mut keep: impl FnMut(&T) -> bool) {
        let mut g = lock(&self.inner);
        let Inner { by_seq, items, .. } = &mut *g;
        items.retain(|_, (seq, t)| {
            let k = keep(t);
            if !k {
                by_seq.remove(seq);
            }
            k
        });
    }

    /// Folds over every item (any order).
    pub(crate) fn fold<A>(&self, init: A, f: impl FnMut(A, &T) -> A) -> A {
        lock(&self.inner).items.values().map(|(_, t)| t).fold(init, f)
    }

    /// True when there is no item.
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.inner).items.is_empty()
    }

    /// One page, newest first, starting at `from` (a sequence number from a page token).
    fn page(&self, size: usize, from: Option<u64>) -> (Vec<T>, Option<u64>) {
        let g = lock(&self.inner);
        let mut it = g.by_seq.range(..=from.unwrap_or(u64::MAX)).rev();
        let items = it
            .by_ref()
            .take(size)
            .filter_map(|(_, id)| g.items.get(id).map(|(_, t)| t.clone()))
            .collect();
        (items, it.next().map(|(seq, _)| *seq))
    }

    /// Answers a list call: `{"<field>": [...], "nextPageToken": ".."}`, or `{}` when empty.
    pub(crate) fn list_response(&self, field: &'static str, query: Option<&str>) -> Response<MockBody>
    where
        T: Serialize,
    {
        self.list_with(field, query, |t| t)
    }

    /// [`Collection::list_response`] with each item rendered through `view`.
    pub(crate) fn list_with<U: Serialize>(
        &self,
        field: &'static str,
        query: Option<&str>,
        view: impl FnMut(T) -> U,
    ) -> Response<MockBody> {
        let size = match query_param(query, "pageSize") {
            None | Some("") => DEFAULT_PAGE,
            Some(s) => match s.parse::<usize>() {
                Ok(0) => DEFAULT_PAGE,
                Ok(n) => n.min(MAX_PAGE),
                Err(_) => return error_json(StatusCode::BAD_REQUEST, wire::ERR_BAD_REQUEST),
            },
        };
        let from = match query_param(query, "pageToken").filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => match decode_token(t) {
                Some(seq) => Some(seq),
                None => return error_status(StatusCode::BAD_REQUEST, "Invalid page token.", "INVALID_ARGUMENT"),
            },
        };
        let (items, next) = self.page(size, from);
        let items: Vec<U> = items.into_iter().map(view).collect();
        let page = Page {
            field,
            items: &items,
            next: next.map(encode_token),
        };
        pretty(StatusCode::OK, &page)
    }
}

/// Page tokens are opaque to clients; these are `CgQ` plus the hex sequence number.
fn encode_token(seq: u64) -> String {
    format!("CgQ{seq:x}")
}

fn decode_token(t: &str) -> Option<u64> {
    u64::from_str_radix(t.strip_prefix("CgQ")?, 16).ok()
}

struct Page<'a, T> {
    field: &'static str,
    items: &'a [T],
    next: Option<String>,
}

impl<T: Serialize> Serialize for Page<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        // An empty list is `{}` on the real API, not `{"files": []}`.
        if !self.items.is_empty() {
            m.serialize_entry(self.field, self.items)?;
        }
        if let Some(t) = &self.next {
            m.serialize_entry("nextPageToken", t)?;
        }
        m.end()
    }
}

/// A pretty-printed JSON answer of any serializable value.
pub(crate) fn pretty<T: Serialize>(status: StatusCode, v: &T) -> Response<MockBody> {
    let mut out = Vec::with_capacity(512);
    match wire::write_pretty_json(&mut out, v) {
        Ok(()) => json(status, out),
        Err(_) => error_json(StatusCode::INTERNAL_SERVER_ERROR, wire::ERR_INTERNAL),
    }
}

/// `{}` with 200, the answer of deletes and cancels.
pub(crate) fn empty_ok() -> Response<MockBody> {
    json(StatusCode::OK, Bytes::from_static(b"{}"))
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u16,
    message: &'a str,
    status: &'a str,
}

/// Google's error envelope with a message built at run time.
pub(crate) fn error_status(status: StatusCode, message: &str, name: &str) -> Response<MockBody> {
    let env = Envelope {
        error: ErrorBody {
            code: status.as_u16(),
            message,
            status: name,
        },
    };
    pretty(status, &env)
}

/// 400 INVALID_ARGUMENT with a message.
pub(crate) fn invalid(message: &str) -> Response<MockBody> {
    error_status(StatusCode::BAD_REQUEST, message, "INVALID_ARGUMENT")
}

/// 404 NOT_FOUND "Requested entity was not found."
pub(crate) fn not_found() -> Response<MockBody> {
    error_json(StatusCode::NOT_FOUND, wire::ERR_NOT_FOUND)
}

// ---------------------------------------------------------------------------------------------
// Request log

/// The last [`LOG_CAP`] requests outside `/mock/*`, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct RequestLog {
    // An owned copy of the target: keeping the request's own `Uri` would pin hyper's read
    // buffer (its bytes are a slice of it) and force a fresh buffer per request.
    entries: Mutex<VecDeque<(Method, Box<str>)>>,
}

#[derive(Serialize)]
struct LogEntry<'a> {
    method: &'a str,
    path: &'a str,
    query: String,
}

impl RequestLog {
    /// Records one request.
    pub(crate) fn push(&self, method: &Method, uri: &Uri) {
        let target: Box<str> = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()).into();
        let entry = (method.clone(), target);
        let old = {
            let mut g = lock(&self.entries);
            let old = if g.len() >= LOG_CAP { g.pop_front() } else { None };
            g.push_back(entry);
            old
        };
        // Freed outside the lock.
        drop(old);
    }

    /// Forgets every request.
    pub(crate) fn clear(&self) {
        lock(&self.entries).clear();
    }

    /// `GET /mock/requests`: `[{"method","path","query"}...]`, oldest first.
    pub(crate) fn response(&self) -> Response<MockBody> {
        let entries: Vec<(Method, Box<str>)> = lock(&self.entries).iter().cloned().collect();
        let out: Vec<LogEntry<'_>> = entries
            .iter()
            .map(|(m, t)| {
                let (path, query) = t.split_once('?').unwrap_or((t, ""));
                LogEntry {
                    method: m.as_str(),
                    path,
                    query: redact_key(query),
                }
            })
            .collect();
        pretty(StatusCode::OK, &out)
    }
}

/// The query with the value of `key=` replaced: the mock never keeps API keys.
fn redact_key(q: &str) -> String {
    q.split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("key", _)) => "key=REDACTED",
            _ => kv,
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_newest_first_with_tokens() {
        let c: Collection<u32> = Collection::default();
        for i in 0..5 {
            c.insert(&format!("id{i}"), i);
        }
        let (p1, next) = c.page(2, None);
        assert_eq!(p1, vec![4, 3]);
        let (p2, next) = c.page(2, next);
        assert_eq!(p2, vec![2, 1]);
        let (p3, next) = c.page(2, next);
        assert_eq!(p3, vec![0]);
        assert_eq!(next, None);
        assert_eq!(decode_token(&encode_token(42)), Some(42));
        assert_eq!(decode_token("bogus"), None);
    }

    #[test]
    fn log_keeps_the_last_entries() {
        let log = RequestLog::default();
        for i in 0..LOG_CAP + 5 {
            let uri: Uri = format!("/v1beta/files/{i}").parse().unwrap_or_default();
            log.push(&Method::GET, &uri);
        }
        let g = lock(&log.entries);
        assert_eq!(g.len(), LOG_CAP);
        assert_eq!(g.front().map(|(_, t)| &**t), Some("/v1beta/files/5"));
    }

    #[test]
    fn key_is_redacted() {
        assert_eq!(redact_key("alt=sse&key=AIzaX"), "alt=sse&key=REDACTED");
        assert_eq!(redact_key(""), "");
    }
}
