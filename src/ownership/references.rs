//! References to upstream resources inside request bodies (`fileData.fileUri`,
//! `cachedContent`, a batch's `inputConfig.fileName`, `fileSearchStoreNames`, a tuned model
//! named as `model`), found by a streaming scanner that keeps no more of the body than one key
//! or one reference value: a 20 MB inline-data body is skipped string by string with `memchr`,
//! never buffered. Keys and values are unescaped as a JSON parser would (`"file\u0055ri"` is
//! `fileUri`), so escapes cannot hide a reference; both spellings Gemini's JSON accepts
//! (`fileUri`, `file_uri`) are keys.

use memchr::memchr2;

use crate::nesting::Nesting;

use super::{Kind, resource_of};

/// What a reference key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKey {
    /// `fileData.fileUri`: a Gemini file (full URI or `files/…`), or an outside URL.
    FileUri,
    /// `cachedContent`.
    CachedContent,
    /// `fileName` (a batch's input file, `importFile`).
    FileName,
    /// `fileSearchStoreNames` (a list).
    StoreNames,
    /// `model` / `baseModel`: a tuned model when it says `tunedModels/…`.
    Model,
}

fn ref_key(k: &[u8]) -> Option<RefKey> {
    Some(match k {
        // `uri` (a Veo input video or image), `url` (an OpenAI `image_url`) can name files too.
        b"fileUri" | b"file_uri" | b"uri" | b"url" => RefKey::FileUri,
        b"cachedContent" | b"cached_content" => RefKey::CachedContent,
        b"fileName" | b"file_name" => RefKey::FileName,
        b"fileSearchStoreNames" | b"file_search_store_names" => RefKey::StoreNames,
        b"model" | b"baseModel" | b"base_model" | b"tunedModel" | b"tuned_model" => RefKey::Model,
        _ => return None,
    })
}

/// A reference value found in a body, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The key it was the value of.
    pub key: RefKey,
    /// The value (bytes that are not UTF-8 are replaced).
    pub value: String,
}

/// Longest key kept (longer keys are not reference keys).
const MAX_KEY: usize = 64;
/// Longest reference value kept; a longer one is refused as no resource's name.
const MAX_VALUE: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Outside,
    Key,
    Capture(RefKey),
    Skip,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    Unicode(u8, u16),
}

/// The streaming scanner of one request body.
pub struct RefScanner {
    nesting: Nesting,
    expect_key: bool,
    /// The last key was a reference key; its value is next.
    pending: Option<RefKey>,
    /// Inside the array value of a reference key, at this depth.
    array: Option<(RefKey, u64)>,
    mode: Mode,
    esc: Esc,
    buf: Vec<u8>,
    overflow: bool,
    found: Vec<Reference>,
}

impl Default for RefScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl RefScanner {
    /// A scanner at the start of a document.
    pub fn new() -> Self {
        Self {
            nesting: Nesting::default(),
            expect_key: false,
            pending: None,
            array: None,
            mode: Mode::Outside,
            esc: Esc::None,
            buf: Vec::new(),
            overflow: false,
            found: Vec::new(),
        }
    }

    /// References completed so far and not yet taken.
    pub fn take_found(&mut self) -> Vec<Reference> {
        std::mem::take(&mut self.found)
    }

    /// Whether references are waiting to be taken.
    pub fn has_found(&self) -> bool {
        !self.found.is_empty()
    }

    /// Feeds the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0usize;
        while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
            if self.mode == Mode::Outside {
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
            if self.mode != Mode::Skip {
                self.keep(seg);
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

    fn pop(&mut self) {
        self.nesting.pop();
        if self.array.is_some_and(|(_, d)| d > self.nesting.depth()) {
            self.array = None;
        }
    }

    fn structural(&mut self, b: u8) {
        match b {
            b'"' => {
                self.buf.clear();
                self.overflow = false;
                self.mode = if self.expect_key && self.nesting.in_object() {
                    Mode::Key
                } else if let Some(k) = self.pending.take() {
                    Mode::Capture(k)
                } else {
                    match self.array {
                        Some((k, d)) if d == self.nesting.depth() => Mode::Capture(k),
                        _ => Mode::Skip,
                    }
                };
                self.expect_key = false;
            }
            b'{' => {
                self.nesting.push(true);
                self.expect_key = true;
                self.pending = None;
            }
            b'[' => {
                self.nesting.push(false);
                if let Some(k) = self.pending.take() {
                    self.array = Some((k, self.nesting.depth()));
                }
                self.expect_key = false;
            }
            b'}' | b']' => {
                self.pop();
                self.expect_key = false;
                self.pending = None;
            }
            b',' => {
                self.expect_key = self.nesting.in_object();
                self.pending = None;
            }
            b':' | b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => self.pending = None,
        }
    }

    fn keep(&mut self, seg: &[u8]) {
        let cap = if self.mode == Mode::Key { MAX_KEY } else { MAX_VALUE };
        if self.buf.len() + seg.len() > cap {
            self.overflow = true;
        } else {
            self.buf.extend_from_slice(seg);
        }
    }

    fn close_string(&mut self) {
        match self.mode {
            Mode::Key => self.pending = if self.overflow { None } else { ref_key(&self.buf) },
            Mode::Capture(key) => {
                let value = if self.overflow {
                    // Too long to be a name: kept as a value no resource has.
                    "\u{fffd}overlong".to_string()
                } else {
                    String::from_utf8_lossy(&self.buf).into_owned()
                };
                self.found.push(Reference { key, value });
            }
            Mode::Skip | Mode::Outside => {}
        }
        self.mode = Mode::Outside;
    }

    fn escape_byte(&mut self, b: u8) {
        match self.esc {
            Esc::Backslash => {
                let decoded = match b {
                    b'u' => {
                        self.esc = Esc::Unicode(0, 0);
                        return;
                    }
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    other => other,
                };
                if !matches!(self.mode, Mode::Skip | Mode::Outside) {
                    self.keep(&[decoded]);
                }
                self.esc = Esc::None;
            }
            Esc::Unicode(n, v) => {
                let digit = char::from(b).to_digit(16).and_then(|d| u16::try_from(d).ok());
                let v = v.wrapping_shl(4) | digit.unwrap_or(0);
                if n >= 3 || digit.is_none() {
                    if !matches!(self.mode, Mode::Skip | Mode::Outside) {
                        // Surrogates (never part of a name) become U+FFFD, which no name has.
                        let c = char::from_u32(u32::from(v))
                            .filter(|_| digit.is_some())
                            .unwrap_or('\u{fffd}');
                        let mut tmp = [0u8; 4];
                        self.keep(c.encode_utf8(&mut tmp).as_bytes());
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

/// The resource a reference needs the caller to own: its kind and index name. `None` when the
/// reference names no Gemini resource (an outside URL, a base model). A value that looks like a
/// Gemini resource but is not a clean name gets a name no one owns, so it is refused as not
/// found; `upstream_host` is the configured upstream's host (lowercase).
pub fn required(r: &Reference, upstream_host: &str) -> Option<(Kind, String)> {
    let v = r.value.as_str();
    let of = |kind: Kind, v: &str| match resource_of(v) {
        Some((k, name)) if k == kind && v.split('/').count() == 2 => (kind, name),
        _ => (kind, format!("\u{fffd}{v}")),
    };
    match r.key {
        RefKey::CachedContent if !v.is_empty() => Some(of(Kind::CachedContent, v)),
        RefKey::FileName if !v.is_empty() => Some(of(Kind::File, v)),
        RefKey::StoreNames => Some(of(Kind::FileSearchStore, v)),
        RefKey::Model if v.contains("tunedModels") || v.contains("tuned_models") => Some(of(Kind::TunedModel, v)),
        RefKey::FileUri => file_uri(v, upstream_host),
        _ => None,
    }
}

/// A `fileUri`: `files/{id}`, or a URL on Gemini's (or the configured upstream's) host naming
/// one; any other URL is the caller's own business.
fn file_uri(v: &str, upstream_host: &str) -> Option<(Kind, String)> {
    let bad = || Some((Kind::File, format!("\u{fffd}{v}")));
    if v.starts_with("files/") {
        return match resource_of(v) {
            Some((Kind::File, name)) if v.split('/').count() == 2 && !v.contains(':') => Some((Kind::File, name)),
            _ => bad(),
        };
    }
    let Some((_, after)) = v.split_once("://") else {
        return v.contains("files/").then(bad).flatten();
    };
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let authority = after.get(..end).unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host
        .split(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ours = host.ends_with("googleapis.com") || (!upstream_host.is_empty() && host == upstream_host);
    if !ours {
        return None;
    }
    let path = after.get(end..).unwrap_or_default();
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let Ok(path) = crate::percent::decode(path) else {
        return bad();
    };
    // A generated file's download link names the file too.
    match path
        .split_once("/files/")
        .map(|(_, id)| (id, id.strip_suffix(":download").unwrap_or(id)))
    {
        Some((_, id)) if !id.contains(['/', ':']) => match resource_of(&format!("files/{id}")) {
            Some((Kind::File, name)) => Some((Kind::File, name)),
            _ => bad(),
        },
        _ => bad(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_whole(body: &[u8]) -> Vec<Reference> {
        let mut s = RefScanner::new();
        s.feed(body);
        s.take_found()
    }

    fn scan_split(body: &[u8], at: usize) -> Vec<Reference> {
        let mut s = RefScanner::new();
        s.feed(&body[..at]);
        let mut v = s.take_found();
        s.feed(&body[at..]);
        v.extend(s.take_found());
        v
    }

    const BODY: &str = r#"{"contents":[{"parts":[{"text":"see files/zzz and \"fileUri\": x"},
        {"fileData":{"mimeType":"application/pdf","fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc"}},
        {"inlineData":{"data":"QUJD\"fileUri\"","mimeType":"x"}}]}],
        "cached\u0043ontent":"cachedContents\/c1",
        "tools":[{"fileSearch":{"file_search_store_names":["fileSearchStores/s1","fileSearchStores/s2"]}}],
        "model":"tunedModels/t1","generationConfig":{"model":3}}"#;

    #[test]
    fn finds_every_reference_however_the_body_is_split() {
        let want = vec![
            Reference {
                key: RefKey::FileUri,
                value: "https://generativelanguage.googleapis.com/v1beta/files/abc".into(),
            },
            Reference {
                key: RefKey::CachedContent,
                value: "cachedContents/c1".into(),
            },
            Reference {
                key: RefKey::StoreNames,
                value: "fileSearchStores/s1".into(),
            },
            Reference {
                key: RefKey::StoreNames,
                value: "fileSearchStores/s2".into(),
            },
            Reference {
                key: RefKey::Model,
                value: "tunedModels/t1".into(),
            },
        ];
        assert_eq!(scan_whole(BODY.as_bytes()), want);
        for at in 0..=BODY.len() {
            assert_eq!(scan_split(BODY.as_bytes(), at), want, "split at {at}");
        }
    }

    #[test]
    fn requirements_of_references() {
        let r = |key, v: &str| required(&Reference { key, value: v.into() }, "127.0.0.1");
        assert_eq!(r(RefKey::FileUri, "files/abc"), Some((Kind::File, "files/abc".into())));
        assert_eq!(
            r(
                RefKey::FileUri,
                "https://GenerativeLanguage.googleapis.com./v1beta/files/%61bc?x=1"
            ),
            Some((Kind::File, "files/abc".into()))
        );
        assert_eq!(
            r(RefKey::FileUri, "http://127.0.0.1:9/v1beta/files/ABC"),
            Some((Kind::File, "files/abc".into()))
        );
        assert_eq!(r(RefKey::FileUri, "https://www.youtube.com/watch?v=9hE5-98ZeCg"), None);
        // Looks like a Gemini file but is not a clean name: refused (a name no one has).
        for v in [
            "files/abc/../def",
            "https://generativelanguage.googleapis.com/v1beta/files/a%2Fb",
            " files/abc",
            "https://generativelanguage.googleapis.com/v1beta/cachedContents/x",
        ] {
            let got = r(RefKey::FileUri, v).unwrap();
            assert!(got.1.starts_with('\u{fffd}'), "{v}: {got:?}");
        }
        assert_eq!(r(RefKey::Model, "models/gemini-2.5-flash"), None);
        assert_eq!(
            r(RefKey::Model, "tunedModels/t1"),
            Some((Kind::TunedModel, "tunedModels/t1".into()))
        );
        assert!(
            r(RefKey::Model, "models/../tunedModels/t1")
                .unwrap()
                .1
                .starts_with('\u{fffd}')
        );
        assert_eq!(r(RefKey::CachedContent, ""), None);
        assert!(r(RefKey::CachedContent, "c1").unwrap().1.starts_with('\u{fffd}'));
    }
}
