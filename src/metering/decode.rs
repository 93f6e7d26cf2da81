//! TEMPORARY STUB: replaced by the real decoder.
#![allow(missing_docs, dead_code)]
use super::scan::{Format, ScanSummary, Scanner};
pub struct DecodingScanner { s: Scanner }
impl DecodingScanner { pub fn new(_ce: Option<&str>, f: Format) -> Self { Self { s: Scanner::new(f) } } pub fn feed(&mut self, b: &[u8]) { self.s.feed(b) } pub fn summary(&self) -> ScanSummary { self.s.summary() } pub fn has_error(&self) -> bool { self.s.has_error() } }
