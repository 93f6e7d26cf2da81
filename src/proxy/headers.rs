//! Header and query handling: where the caller's key is, what must not be forwarded, tags.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};

use crate::ledger::Tags;

/// Where the caller put their key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `x-goog-api-key` header.
    Header,
    /// `?key=` query parameter.
    Query,
    /// `Authorization: Bearer`.
    Bearer,
}

/// Prefix of tag headers.
pub const TAG_PREFIX: &str = "x-meter-tag-";
/// At most this many tags per request.
pub const MAX_TAGS: usize = 8;
/// Tag names and values are at most this long.
pub const MAX_TAG_LEN: usize = 64;

/// The caller's key, from the header, the query, or a bearer token (in that order). Borrowed
/// from the request (no allocation) unless the query form needs percent-decoding.
pub fn caller_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<(Cow<'a, str>, KeySource)> {
    if let Some(v) = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if !v.is_empty() {
            return Some((Cow::Borrowed(v), KeySource::Header));
        }
    }
    if let Some(k) = query.and_then(|q| query_value(q, "key"))
        && !k.is_empty()
    {
        let k = if k.contains(['%', '+']) {
            Cow::Owned(percent_decode(k))
        } else {
            Cow::Borrowed(k)
        };
        return Some((k, KeySource::Query));
    }
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            let t = v[7..].trim();
            if !t.is_empty() {
                return Some((Cow::Borrowed(t), KeySource::Bearer));
            }
        }
    }
    None
}

/// The first raw (still percent-encoded) value of a query parameter.
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The first value of a query parameter, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query_value(query, name).map(percent_decode)
}

/// The query without the `key` parameter (the caller's key never goes upstream).
pub fn strip_key_param(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if pair.is_empty() || !passes_upstream(name, value) {
            continue;
        }
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(pair);
    }
    out
}

/// Whether a query parameter goes upstream. Not the caller's key; not a field mask (`fields`,
/// `$fields`), which could trim the usage report the gateway bills from; not an `alt` other than
/// `sse`, `json` or `media` (a protobuf answer could not be metered). Names are compared
/// decoded, as the upstream reads them.
fn passes_upstream(name: &str, value: &str) -> bool {
    let plain = |s: &str| !s.contains(['%', '+']);
    let name = if plain(name) {
        name.to_string()
    } else {
        percent_decode(name)
    };
    match name.as_str() {
        "key" | "fields" | "$fields" => false,
        "alt" | "$alt" => {
            let v = if plain(value) {
                value.to_string()
            } else {
                percent_decode(value)
            };
            matches!(v.as_str(), "sse" | "json" | "media")
        }
        _ => true,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Headers that belong to one hop and are never forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let hop: Vec<HeaderName> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for n in hop {
        h.remove(n);
    }
}

/// Takes the `x-meter-tag-*` headers out of `h`, returning the valid ones (at most 8, names
/// and values at most 64 characters; others are dropped).
pub fn take_tags(h: &mut HeaderMap) -> Option<Arc<Tags>> {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with(TAG_PREFIX))
        .cloned()
        .collect();
    if names.is_empty() {
        return None;
    }
    let mut tags = Tags::new();
    for n in names {
        let tag = &n.as_str()[TAG_PREFIX.len()..];
        let value = h.get(&n).and_then(|v| v.to_str().ok()).map(str::to_string);
        h.remove(&n);
        if let Some(v) = value
            && !tag.is_empty()
            && tag.len() <= MAX_TAG_LEN
            && v.chars().count() <= MAX_TAG_LEN
            && tags.len() < MAX_TAGS
        {
            tags.insert(tag.to_string(), v);
        }
    }
    (!tags.is_empty()).then(|| Arc::new(tags))
}

/// The header the upstream key goes in (a constant: `from_static` validates on every call).
pub const GOOG_API_KEY: http::header::HeaderName = http::header::HeaderName::from_static("x-goog-api-key");

/// The upstream URI of a canonical path and the caller's query (without its `key`).
pub fn upstream_uri(base: &http::Uri, path: &str, query: Option<&str>) -> Result<http::Uri, crate::error::ApiError> {
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let prefix = base.path().trim_end_matches('/');
    let mut s = String::with_capacity(scheme.len() + authority.len() + prefix.len() + path.len() + 64);
    s.push_str(scheme);
    s.push_str("://");
    s.push_str(authority);
    s.push_str(prefix);
    s.push_str(path);
    if let Some(q) = query {
        let q = strip_key_param(q);
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q);
        }
    }
    s.parse()
        .map_err(|_| crate::error::ApiError::bad_request("The request path is not valid."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn key_forms_and_query_stripping() {
        let mut h = HeaderMap::new();
        assert_eq!(
            caller_key(&h, Some("alt=sse&key=gm_abc%2B")).unwrap(),
            ("gm_abc+".into(), KeySource::Query)
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer gm_b"));
        assert_eq!(caller_key(&h, None).unwrap(), ("gm_b".into(), KeySource::Bearer));
        h.insert("x-goog-api-key", HeaderValue::from_static("gm_h"));
        assert_eq!(caller_key(&h, Some("key=gm_q")).unwrap().1, KeySource::Header);
        assert_eq!(strip_key_param("key=1&alt=sse"), "alt=sse");
        assert_eq!(strip_key_param("alt=sse&key=1&upload_id=x"), "alt=sse&upload_id=x");
        assert_eq!(strip_key_param("key=1"), "");
        assert_eq!(
            strip_key_param("%6Bey=gm_x&fields=name&%24fields=a&alt=proto&alt=sse&x=1"),
            "alt=sse&x=1"
        );
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn tags_are_taken_and_bounded() {
        let mut h = HeaderMap::new();
        h.insert("x-meter-tag-chat-id", HeaderValue::from_static("123"));
        h.insert("x-meter-tag-long", HeaderValue::from_str(&"x".repeat(65)).unwrap());
        let t = take_tags(&mut h).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t["chat-id"], "123");
        assert!(h.is_empty());
    }
}
