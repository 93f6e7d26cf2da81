//! Pricing one usage report, as settle does once per response: tokens from the upstream's report,
//! then the exact decimal cost, for a model with prices (and cached input) and for an unlisted one,
//! and with modality details, long context and batch (the cost and its line-by-line explanation,
//! as records carry it in `metadata.price`).
//!
//! `cargo bench --bench pricing`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gemini_meter::config::Config;
use gemini_meter::metering::pricing::{Mode, Tokens, price_tokens, response_cost, upload_cost};
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
input_per_million_by_modality = { AUDIO = "1.00" }

[pricing.models."gemini-2.5-pro"]
input_per_million = "1.25"
output_per_million = "10.00"
cached_input_per_million = "0.125"
long_context_threshold = 200000
long_input_per_million = "2.50"
long_output_per_million = "15.00"
long_cached_input_per_million = "0.25"

[pricing.models."gemini-2.5-flash-image"]
input_per_million = "0.30"
output_per_million = "2.50"
output_per_million_by_modality = { IMAGE = "30.00" }

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
        ..UsageReport::default()
    };
    // An audio prompt partly cached, with tool-use tokens: four modality lines and two more.
    let audio = UsageReport {
        prompt: Some(5000),
        candidates: Some(300),
        thoughts: Some(900),
        cached: Some(3000),
        tool_use_prompt: Some(120),
        total: Some(6320),
        prompt_details: Some([2000, 0, 3000, 0, 0]),
        cache_details: Some([1000, 0, 2000, 0, 0]),
        candidates_details: Some([300, 0, 0, 0, 0]),
    };
    // A long-context prompt on 2.5 Pro and an image-output response.
    let long = UsageReport {
        prompt: Some(250_000),
        candidates: Some(1000),
        thoughts: Some(2000),
        total: Some(253_000),
        prompt_details: Some([250_000, 0, 0, 0, 0]),
        ..UsageReport::default()
    };
    let image = UsageReport {
        prompt: Some(10),
        candidates: Some(1300),
        total: Some(1310),
        prompt_details: Some([10, 0, 0, 0, 0]),
        candidates_details: Some([10, 1290, 0, 0, 0]),
        ..UsageReport::default()
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
    g.bench_function(
        "modality details: audio prompt, cached, tool use (with explanation)",
        |b| {
            b.iter(|| {
                let t = Tokens::from_native(black_box(&audio));
                price_tokens(&cfg.pricing, black_box("gemini-2.5-flash"), &t, Mode::Interactive)
            })
        },
    );
    g.bench_function("modality details: long context on 2.5 Pro (with explanation)", |b| {
        b.iter(|| {
            let t = Tokens::from_native(black_box(&long));
            price_tokens(&cfg.pricing, black_box("gemini-2.5-pro"), &t, Mode::Interactive)
        })
    });
    g.bench_function("modality details: image output, batch (with explanation)", |b| {
        b.iter(|| {
            let t = Tokens::from_native(black_box(&image));
            price_tokens(&cfg.pricing, black_box("gemini-2.5-flash-image"), &t, Mode::Batch)
        })
    });
    g.bench_function("upload bytes", |b| {
        b.iter(|| upload_cost(&cfg.pricing, black_box(2_010_585)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
