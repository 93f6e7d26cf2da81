//! TEMPORARY STUB: replaced by the real scanners.
#![allow(missing_docs, dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format { UnaryJson, Sse, JsonArray, OpenAiJson, OpenAiSse }
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageReport { pub prompt: Option<u64>, pub candidates: Option<u64>, pub thoughts: Option<u64>, pub cached: Option<u64>, pub tool_use_prompt: Option<u64>, pub total: Option<u64> }
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError { pub code: Option<u16>, pub status: Option<String>, pub message: Option<String> }
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary { pub usage: UsageReport, pub usage_seen: bool, pub text_chars: u64, pub model_version: Option<String>, pub error: Option<BodyError>, pub done_marker: bool, pub events: u64 }
pub struct Scanner { f: Format }
impl Scanner { pub fn new(f: Format) -> Self { Self { f } } pub fn feed(&mut self, _b: &[u8]) {} pub fn summary(&self) -> ScanSummary { ScanSummary::default() } pub fn has_error(&self) -> bool { false } }
#[derive(Default)]
pub struct TextCounter { n: u64 }
impl TextCounter { pub fn new() -> Self { Self { n: 0 } } pub fn feed(&mut self, b: &[u8]) { self.n += b.len() as u64 } pub fn chars(&self) -> u64 { self.n } }
