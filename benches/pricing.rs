//! Pricing one usage report, as settle does once per response: tokens from the upstream's report,
//! then the exact decimal cost, for a model with prices (and cached input) and for an unlisted one.
//!
//! `cargo bench --bench pricing`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gemini_meter::config::Config;
use gemini_meter::metering::pricing::{Tokens, response_cost, upload_cost};
use gemini_meter::metering::scan::UsageReport;

fn bench(c: &mut Criterion) {
    // A config shaped like a real one: several priced models, so the lookup is not trivial.
    let cfg = Config::parse(
        r#"
[pricing]
ai_response_per_token = "0.0001"
file_upload_per_byte = "0.00000001"

[pricing.models."gemini-2.5-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
cached_input_per_million = "0.03"

[pricing.models."gemini-2.5-pro"]
input_per_million = "1.25"
output_per_million = "10.00"
cached_input_per_million = "0.31"

[pricing.models."gemini-2.5-flash-lite"]
input_per_million = "0.10"
output_per_million = "0.40"
"#,
        "bench.toml",
    )
    .unwrap_or_else(|e| panic!("bench config: {e}"));
    let report = UsageReport {
        prompt: Some(1204),
        candidates: Some(52),
        thoughts: Some(388),
        cached: Some(1000),
        tool_use_prompt: None,
        total: Some(1644),
    };
    let mut g = c.benchmark_group("pricing");
    g.bench_function("priced model (tokens + cost)", |b| {
        b.iter(|| {
            let t = Tokens::from_native(black_box(&report));
            response_cost(&cfg.pricing, black_box("gemini-2.5-flash"), &t)
        })
    });
    g.bench_function("priced model, models/ prefix", |b| {
        b.iter(|| {
            let t = Tokens::from_native(black_box(&report));
            response_cost(&cfg.pricing, black_box("models/gemini-2.5-pro"), &t)
        })
    });
    g.bench_function("unlisted model (per token)", |b| {
        b.iter(|| {
            let t = Tokens::from_native(black_box(&report));
            response_cost(&cfg.pricing, black_box("gemini-2.0-flash"), &t)
        })
    });
    g.bench_function("openai usage (tokens + cost)", |b| {
        b.iter(|| {
            let t = Tokens::from_openai(black_box(&report));
            response_cost(&cfg.pricing, black_box("gemini-2.5-flash"), &t)
        })
    });
    g.bench_function("upload bytes", |b| {
        b.iter(|| upload_cost(&cfg.pricing, black_box(2_010_585)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
