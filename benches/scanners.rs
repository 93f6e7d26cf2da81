//! Throughput of the response scanners on the wire fixtures, repeated to about 1 MiB.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io::Write;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flate2::Compression;
use flate2::write::GzEncoder;
use gemini_meter::metering::decode::DecodingScanner;
use gemini_meter::metering::scan::{Format, Scanner, TextCounter};

/// Where the shared wire fixtures live.
const FIXTURES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");
/// Size of one simulated network frame.
const FRAME: usize = 16 << 10;
const TARGET: usize = 1 << 20;

fn repeated(name: &str) -> Vec<u8> {
    let path = format!("{FIXTURES_DIR}/{name}");
    let one = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mut out = Vec::with_capacity(TARGET + one.len());
    while out.len() < TARGET {
        out.extend_from_slice(&one);
    }
    out
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("unary", Format::UnaryJson, "unary.json"),
        ("sse_crlf", Format::Sse, "stream-sse-crlf.txt"),
        ("sse_lf", Format::Sse, "stream-sse-lf-final-usage.txt"),
        ("json_array", Format::JsonArray, "stream-json-array.txt"),
        ("openai_sse", Format::OpenAiSse, "openai-stream.txt"),
        ("openai_json", Format::OpenAiJson, "openai-stream.txt"),
    ];
    let mut g = c.benchmark_group("scan");
    for (label, format, file) in cases {
        let body = repeated(file);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(label, |b| {
            b.iter(|| {
                let mut s = Scanner::new(format);
                for frame in body.chunks(FRAME) {
                    s.feed(black_box(frame));
                }
                black_box(s.summary())
            })
        });
    }

    let body = repeated("stream-sse-crlf.txt");
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(&body).expect("gzip");
    let gz = enc.finish().expect("gzip");
    // Throughput counts decompressed bytes, comparable with the plain cases.
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("sse_crlf_gzip", |b| {
        b.iter(|| {
            let mut s = DecodingScanner::new(Some("gzip"), Format::Sse);
            for frame in gz.chunks(FRAME) {
                s.feed(black_box(frame));
            }
            black_box(s.summary())
        })
    });

    let body = repeated("unary.json");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("text_counter", |b| {
        b.iter(|| {
            let mut t = TextCounter::new();
            for frame in body.chunks(FRAME) {
                t.feed(black_box(frame));
            }
            black_box(t.chars())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
