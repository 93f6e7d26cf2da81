//! The recorder's write path: a batch of records appended to the log (one write, one fdatasync)
//! and its aggregates applied to sled, as the recorder thread does it.
//!
//! `cargo bench --bench recorder` (GM_BENCH_BATCH sets the batch size, default 1,000; the
//! records spread over 1,000 users). Throughput is in records per second.

use std::hint::black_box;
use std::sync::Arc;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gemini_meter::ledger::{Record, RecordIds, RecordKind, SledStore};
use rust_decimal::Decimal;
use serde_json::json;

/// Records as the gateway settles them: a message and its response, with real metadata.
fn records(n: usize, ids: &RecordIds) -> Vec<(Record, Vec<gemini_meter::ledger::alerts::Alert>)> {
    let now = Utc::now();
    (0..n)
        .map(|i| {
            let ai = i % 2 == 1;
            let metadata = if ai {
                json!({"model": "gemini-2.5-flash", "prompt_tokens": 12, "output_tokens": 15, "thoughts_tokens": 0,
                       "cached_tokens": 0, "tool_use_prompt_tokens": 0, "response_bytes": 1234, "stream": true,
                       "format": "sse", "upstream_status": 200, "status": "ok", "token_source": "upstream",
                       "key_id": "key_0123456789abcdef", "duration_ms": 3})
            } else {
                json!({"model": "gemini-2.5-flash", "status": "ok", "upstream_status": 200, "key_id": "key_0123456789abcdef"})
            };
            let rec = Record {
                id: ids.next(now),
                user_id: Arc::from(format!("user{}", (i / 2) % 1000)),
                kind: if ai { RecordKind::AiResponse } else { RecordKind::MessageSent },
                tokens: if ai { 27 } else { 0 },
                messages: u64::from(!ai),
                bytes: 0,
                cost: if ai { Decimal::new(4110, 8) } else { Decimal::ZERO },
                metadata: metadata.as_object().cloned().unwrap_or_default(),
                created_at: now,
            };
            (rec, Vec::new())
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let batch: usize = std::env::var("GM_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(&dir.path().join("data")).expect("open store");
    let ids = RecordIds::new();
    let items = records(batch, &ids);
    let mut g = c.benchmark_group("recorder");
    g.throughput(Throughput::Elements(batch as u64));
    g.bench_function(format!("append+apply batch of {batch}"), |b| {
        b.iter(|| {
            let appended = store.append(black_box(&items)).expect("append");
            store.apply_appended(&items, &appended).expect("apply");
        })
    });
    g.bench_function(format!("serialize {batch} records"), |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            for (r, _) in &items {
                out.clear();
                r.write_json(&mut out).expect("json");
                black_box(&out);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
