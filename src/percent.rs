//! Strict percent-decoding, for what is judged after decoding (a request path, a resource URI
//! in a body): a malformed escape or bytes that are not UTF-8 are an error, never passed on.

/// A `%XX` escape that is malformed or decodes to bytes that are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed percent-encoding")]
pub struct BadEscape;

/// `%XX` decoded; an error when an escape is malformed or the result is not UTF-8.
pub fn decode(s: &str) -> Result<String, BadEscape> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| BadEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| BadEscape)?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| BadEscape)
}
