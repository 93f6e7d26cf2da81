//! A monthly statement of a user with 10,000 records in the month (issue 17's target: under a
//! second): gathering it from the ledger (day runs and the user's records), rendering the PDF,
//! and both, as `GET /api/usage/statement` does.
//!
//! `cargo bench --bench statement` (GM_BENCH_RECORDS sets the records, default 10,000, spread
//! over the month's 30 days; GM_STATEMENT_PDF=path also writes the PDF there, to look at).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use chrono::{Duration, TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use gemini_meter::clock::Month;
use gemini_meter::ledger::{RecordIds, SledStore};
use gemini_meter::statement;

#[path = "../tests/common/records.rs"]
mod records;

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("GM_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(&dir.path().join("data")).expect("open store");
    let ids = RecordIds::new();
    let month = Month(202611);
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let step_ms = 30 * 86_400_000 / n as i64;
    let recs: Vec<_> = (0..n)
        .map(|i| records::settled(&ids, i, "heavy", start + Duration::milliseconds(i as i64 * step_ms)))
        .collect();
    for chunk in recs.chunks(1000) {
        store.write_records(chunk).expect("write");
    }
    let now = Utc::now();
    let s = statement::gather(&store, "heavy", "pro", month, now).expect("gather");
    assert_eq!(s.total.records, n as u64);
    let pdf = statement::render_pdf(&s).expect("pdf");
    if let Ok(path) = std::env::var("GM_STATEMENT_PDF") {
        std::fs::write(path, &pdf).expect("write the PDF");
    }

    let mut g = c.benchmark_group("statement");
    g.sample_size(10);
    g.bench_function(format!("gather {n} records"), |b| {
        b.iter(|| black_box(statement::gather(&store, "heavy", "pro", month, now).expect("gather")))
    });
    g.bench_function("render pdf", |b| {
        b.iter(|| black_box(statement::render_pdf(black_box(&s)).expect("pdf")))
    });
    g.bench_function(format!("gather + render pdf, {n} records"), |b| {
        b.iter(|| {
            let s = statement::gather(&store, "heavy", "pro", month, now).expect("gather");
            black_box(statement::render_pdf(&s).expect("pdf"))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
