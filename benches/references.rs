//! The reference scanner on request bodies (issue 13): a 20 MB inline-data `generateContent`
//! body (the look-ahead's worst case: every byte is scanned), and a typical small body without
//! references, fed in 16 KiB frames as they arrive from a socket. Compare with the text counter
//! that already scans every generate body.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gemini_meter::metering::scan::TextCounter;
use gemini_meter::ownership::references::RefScanner;
use serde_json::json;

const FRAME: usize = 16 << 10;

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let data = "QUJD".repeat(5 << 20); // 20 MiB of base64
    let big = json!({"contents": [{"role": "user", "parts": [
        {"text": "Describe this video."},
        {"inlineData": {"mimeType": "video/mp4", "data": data}},
        {"fileData": {"mimeType": "application/pdf", "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc123"}}]}],
        "generationConfig": {"maxOutputTokens": 512}});
    let small = json!({"contents": [{"role": "user", "parts": [{"text": "Write a haiku about the sea. ".repeat(30)}]}],
        "generationConfig": {"temperature": 0.7, "maxOutputTokens": 256}});
    vec![
        ("inline_20MiB", serde_json::to_vec(&big).unwrap()),
        ("small_no_refs", serde_json::to_vec(&small).unwrap()),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_body");
    for (label, body) in bodies() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        if body.len() > 1 << 20 {
            g.sample_size(10);
        } else {
            g.sample_size(100);
        }
        g.bench_function(format!("refs/{label}"), |b| {
            b.iter(|| {
                let mut s = RefScanner::new();
                for f in body.chunks(FRAME) {
                    s.feed(black_box(f));
                }
                black_box(s.take_found())
            })
        });
        g.bench_function(format!("text/{label}"), |b| {
            b.iter(|| {
                let mut t = TextCounter::new();
                for f in body.chunks(FRAME) {
                    t.feed(black_box(f));
                }
                black_box(t.chars())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
