//! The recorder's write path: batches of records written to the log (one write each), then the
//! log synced and their aggregates applied to sled, as the recorder thread does it: once per
//! batch (as it did before), and once for ten batches (what it does under load now, one apply
//! per `flush_interval`).
//!
//! `cargo bench --bench recorder` (GM_BENCH_BATCH sets the batch size, default 1,000; the
//! records spread over 1,000 users). Throughput is in records per second.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gemini_meter::ledger::{Record, RecordIds, SledStore};

#[path = "../tests/common/records.rs"]
mod records;

/// Records as the gateway settles them, over 1,000 users.
fn records(n: usize, ids: &RecordIds) -> Vec<(Record, Vec<gemini_meter::ledger::alerts::Alert>)> {
    let now = Utc::now();
    (0..n)
        .map(|i| {
            (
                records::settled(ids, i, &format!("user{}", (i / 2) % 1000), now),
                Vec::new(),
            )
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
    g.bench_function(format!("10 x (append {} + apply)", batch / 10), |b| {
        b.iter(|| {
            for part in items.chunks((batch / 10).max(1)) {
                let appended = store.append(black_box(part)).expect("append");
                store.apply_appended(part, &appended).expect("apply");
            }
        })
    });
    // Under load the recorder writes a batch per cycle and applies them all once per
    // flush_interval: the same records as ten writes and one sync and apply.
    g.bench_function(format!("append 10 x {} + one apply", batch / 10), |b| {
        b.iter(|| {
            let mut all: Option<gemini_meter::ledger::store::Appended> = None;
            for part in items.chunks((batch / 10).max(1)) {
                let appended = store.append(black_box(part)).expect("append");
                match &mut all {
                    Some(a) => a.merge(appended),
                    None => all = Some(appended),
                }
            }
            if let Some(a) = all {
                store.apply_appended(&items, &a).expect("apply");
            }
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
