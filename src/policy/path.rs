//! One spelling per path. `%2F`, `//`, `.`/`..` segments and escaped letters would otherwise let
//! a path that the gateway reads as one thing reach Gemini as another; the canonical path is
//! both what the policy judges and what goes upstream. A path that needs more than decoding and
//! dropping empty segments (dot segments, characters no Gemini path has) is refused.

use std::borrow::Cow;

/// Why a path has no canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The request path is not valid.")]
pub struct BadPath;

/// Characters a Gemini path can hold (resource ids, model ids with dots, `:verb`, `$discovery`).
fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~' | b':' | b'$')
}

/// The canonical spelling of a request path: percent-escapes decoded, empty segments dropped;
/// dot segments and characters outside Gemini's paths are refused. Borrowed when the path is
/// already canonical (every SDK's path).
pub fn canonical(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let b = path.as_bytes();
    let clean = b.iter().all(|&c| allowed(c))
        && !path.contains("//")
        && !path.contains("/.")
        && !path.ends_with('/')
        && path.starts_with('/');
    if clean {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = crate::percent::decode(path).map_err(|_| BadPath)?;
    let mut out = String::with_capacity(decoded.len());
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || !seg.bytes().all(allowed) {
            return Err(BadPath);
        }
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling() {
        let c = |p| canonical(p).map(Cow::into_owned);
        assert!(matches!(
            canonical("/v1beta/models/gemini-2.5-flash:generateContent"),
            Ok(Cow::Borrowed(_))
        ));
        assert_eq!(c("/v1beta/files%2Fabc").unwrap(), "/v1beta/files/abc");
        assert_eq!(c("/v1beta//files///abc/").unwrap(), "/v1beta/files/abc");
        assert_eq!(c("/v1beta/%66iles/abc").unwrap(), "/v1beta/files/abc");
        assert_eq!(
            c("/v1beta/models/x%3AgenerateContent").unwrap(),
            "/v1beta/models/x:generateContent"
        );
        assert_eq!(c("/v1beta/files/abc/../def"), Err(BadPath));
        assert_eq!(c("/v1beta/files/%2e%2e/def"), Err(BadPath));
        assert_eq!(c("/v1beta/files/./abc"), Err(BadPath));
        assert_eq!(c("/v1beta/files/a%20b"), Err(BadPath));
        assert_eq!(c("/v1beta/files/a%zz"), Err(BadPath));
        assert_eq!(c("/v1beta/files/%ff"), Err(BadPath));
        assert_eq!(c("/v1beta/files/a%252Fb"), Err(BadPath));
    }
}
