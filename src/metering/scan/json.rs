//! The JSON framings: top-level objects found in a byte stream (unary bodies, JSON-array
//! streams, and raw JSON lines inside SSE).

use memchr::{memchr2, memchr3};

use super::State;
use super::buffer::EventBuf;

/// Finds top-level JSON objects (brace depth 0 → 0) in a byte stream,
/// string-aware; used for unary bodies, JSON-array streams and raw JSON inside SSE.
pub(super) struct Splitter {
    pub(super) depth: u32,
    in_str: bool,
    esc: bool,
    buf: EventBuf,
}

impl Splitter {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            depth: 0,
            in_str: false,
            esc: false,
            buf: EventBuf::new(cap),
        }
    }

    pub(super) fn feed(&mut self, input: &[u8], st: &mut State) {
        // An object begun in an earlier feed lives in `buf`; one begun here is
        // parsed straight from `input` when it also ends here.
        let mut carried = self.depth > 0;
        let mut start = 0usize;
        let mut i = 0usize;
        while let Some(rest) = input.get(i..).filter(|r| !r.is_empty()) {
            if self.in_str {
                if self.esc {
                    self.esc = false;
                    i += 1;
                    continue;
                }
                let Some(k) = memchr2(b'"', b'\\', rest) else {
                    break;
                };
                if rest.get(k) == Some(&b'"') {
                    self.in_str = false;
                } else {
                    self.esc = true;
                }
                i += k + 1;
                continue;
            }
            let Some(k) = memchr3(b'{', b'}', b'"', rest) else {
                break;
            };
            let p = i + k;
            i = p + 1;
            match rest.get(k) {
                Some(b'"') => self.in_str = true,
                Some(b'{') => {
                    if self.depth == 0 {
                        start = p;
                    }
                    self.depth = self.depth.saturating_add(1);
                }
                _ => {
                    if self.depth == 0 {
                        continue;
                    }
                    self.depth -= 1;
                    if self.depth == 0 {
                        let obj = input.get(start..i).unwrap_or_default();
                        if carried {
                            self.buf.push(obj);
                            self.buf.finish(st, false);
                            carried = false;
                        } else {
                            st.process(obj);
                        }
                    }
                }
            }
        }
        if self.depth > 0 {
            self.buf.push(input.get(start..).unwrap_or_default());
        }
    }

    /// Raw JSON inside SSE is line-based: a string never spans lines in valid
    /// JSON, so a stray quote must not swallow the following lines.
    pub(super) fn line_end(&mut self, st: &mut State) {
        if self.depth > 0 {
            self.feed(b"\n", st);
        }
        self.in_str = false;
        self.esc = false;
    }

    pub(super) fn reset(&mut self) {
        self.depth = 0;
        self.in_str = false;
        self.esc = false;
        self.buf.reset();
    }
}
