//! The request-side text counter.

use memchr::memchr2;

use crate::nesting::Nesting;

/// Counts characters of JSON string values whose key is "text" or "content" (when the value is a string) in a JSON document fed in arbitrary pieces; used on REQUEST bodies to estimate prompt tokens. Never panics, tolerates truncation.
pub struct TextCounter {
    chars: u64,
    /// The open containers.
    nesting: Nesting,
    /// Next string in this object is a key.
    expect_key: bool,
    /// The last key was `text` or `content`; its value is not seen yet.
    key_hit: bool,
    str_kind: StrKind,
    esc: Esc,
    key: [u8; 8],
    key_len: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StrKind {
    None,
    Key,
    Skip,
    Count,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    /// Inside `\uXXXX`: digits read so far and their value.
    Unicode(u8, u16),
}

impl Default for TextCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl TextCounter {
    /// Creates a counter at the start of a document.
    pub fn new() -> Self {
        Self {
            chars: 0,
            nesting: Nesting::default(),
            expect_key: false,
            key_hit: false,
            str_kind: StrKind::None,
            esc: Esc::None,
            key: [0; 8],
            key_len: 0,
        }
    }

    /// Characters counted so far.
    pub fn chars(&self) -> u64 {
        self.chars
    }

    /// Feeds the next bytes of the document.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0usize;
        while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
            if self.str_kind == StrKind::None {
                if let Some(&b) = rest.first() {
                    self.structural(b);
                }
                i += 1;
                continue;
            }
            if self.esc != Esc::None {
                if let Some(&b) = rest.first() {
                    self.escape_byte(b);
                }
                i += 1;
                continue;
            }
            let end = memchr2(b'"', b'\\', rest);
            let seg = rest.get(..end.unwrap_or(rest.len())).unwrap_or_default();
            match self.str_kind {
                StrKind::Count => self.add(utf8_chars(seg)),
                StrKind::Key => self.key_bytes(seg),
                StrKind::Skip | StrKind::None => {}
            }
            i += seg.len();
            if let Some(k) = end {
                if rest.get(k) == Some(&b'"') {
                    self.close_string();
                } else {
                    self.esc = Esc::Backslash;
                }
                i += 1;
            }
        }
    }

    fn add(&mut self, n: u64) {
        self.chars = self.chars.saturating_add(n);
    }

    fn structural(&mut self, b: u8) {
        match b {
            b'"' => {
                if self.expect_key && self.nesting.in_object() {
                    self.str_kind = StrKind::Key;
                    self.key_len = 0;
                } else {
                    self.str_kind = if self.key_hit { StrKind::Count } else { StrKind::Skip };
                    self.key_hit = false;
                }
                self.expect_key = false;
            }
            b'{' => {
                self.nesting.push(true);
                self.expect_key = true;
                self.key_hit = false;
            }
            b'[' => {
                self.nesting.push(false);
                self.expect_key = false;
                self.key_hit = false;
            }
            b'}' | b']' => {
                self.nesting.pop();
                self.expect_key = false;
                self.key_hit = false;
            }
            b',' => {
                self.expect_key = self.nesting.in_object();
                self.key_hit = false;
            }
            b':' | b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => self.key_hit = false,
        }
    }

    fn key_bytes(&mut self, seg: &[u8]) {
        for &b in seg {
            match self.key.get_mut(self.key_len) {
                Some(slot) => {
                    *slot = b;
                    self.key_len += 1;
                }
                None => {
                    // Longer than any key we look for.
                    self.key_len = usize::MAX;
                    return;
                }
            }
        }
    }

    fn close_string(&mut self) {
        if self.str_kind == StrKind::Key {
            let key = self.key.get(..self.key_len).unwrap_or_default();
            self.key_hit = key == b"text" || key == b"content";
        }
        self.str_kind = StrKind::None;
    }

    fn escape_byte(&mut self, b: u8) {
        match self.esc {
            Esc::Backslash => {
                if self.str_kind == StrKind::Key {
                    // Escaped keys never match.
                    self.key_len = usize::MAX;
                }
                if b == b'u' {
                    self.esc = Esc::Unicode(0, 0);
                } else {
                    if self.str_kind == StrKind::Count {
                        self.add(1);
                    }
                    self.esc = Esc::None;
                }
            }
            Esc::Unicode(n, v) => {
                let digit = char::from(b).to_digit(16).and_then(|d| u16::try_from(d).ok());
                let v = v.wrapping_shl(4) | digit.unwrap_or(0);
                if n >= 3 || digit.is_none() {
                    // A low surrogate completes a pair already counted.
                    if self.str_kind == StrKind::Count && !(0xDC00..=0xDFFF).contains(&v) {
                        self.add(1);
                    }
                    self.esc = Esc::None;
                    if digit.is_none() && b == b'"' {
                        self.close_string();
                    }
                } else {
                    self.esc = Esc::Unicode(n + 1, v);
                }
            }
            Esc::None => {}
        }
    }
}

/// Unicode scalar values in a UTF-8 slice (continuation bytes are not counted).
fn utf8_chars(s: &[u8]) -> u64 {
    let n = s.iter().filter(|&&b| (b as i8) >= -0x40).count();
    u64::try_from(n).unwrap_or(u64::MAX)
}
