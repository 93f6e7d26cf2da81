//! identify + admit with many users loaded: single thread and under contention from all cores.
//! Also prints the memory each user costs (RSS delta over creating them).
//!
//! `cargo bench --bench admission` (GM_BENCH_USERS sets the user count, default 1,000,000).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use gemini_meter::admission::{Ask, admit};
use gemini_meter::clock::Month;
use gemini_meter::config::Config;
use gemini_meter::identity::Registry;
use gemini_meter::ledger::SledStore;
use gemini_meter::runtime::{EnvLookup, Runtime};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

struct Setup {
    rt: Runtime,
    registry: Registry,
    keys: Vec<String>,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let n: usize = std::env::var("GM_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cfg = Config::parse(
        r#"
[tiers.free]
messages = 1000000000
tokens = 1000000000
requests_per_minute = 1000000
tokens_per_minute = 1000000000
models = ["gemini-2.5-flash"]
"#,
        "bench.toml",
    )
    .expect("bench config");
    let env: EnvLookup = Arc::new(|_| Some("bench-upstream-key".to_string()));
    let now = chrono::Utc::now();
    let rt = Runtime::build(cfg, None, now, &env).expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    // A small page cache, so the RSS growth below is the in-memory index and counters.
    let store = SledStore::open_with_cache(&dir.path().join("data"), 8 * 1024 * 1024).expect("store");
    let registry = Registry::load(store, Month::of(now)).expect("registry");
    let before = rss_bytes();
    let t0 = Instant::now();
    let mut keys = Vec::with_capacity(4096);
    for i in 0..n {
        let id = format!("user-{i:07}");
        registry
            .create_user(&id, "free", None, now, Month::of(now))
            .expect("user");
        let (key, _) = registry.create_key(&id, now).expect("key");
        if keys.len() < 4096 {
            keys.push(key);
        }
    }
    let after = rss_bytes();
    eprintln!(
        "loaded {n} users with one key each in {:.1} s; RSS grew {:.1} MB = {} bytes per user (sled page cache capped at 8 MB)",
        t0.elapsed().as_secs_f64(),
        (after.saturating_sub(before)) as f64 / 1e6,
        after.saturating_sub(before) / n.max(1) as u64
    );
    Setup {
        rt,
        registry,
        keys,
        _dir: dir,
    }
}

fn bench(c: &mut Criterion) {
    let s = Arc::new(setup());
    let ask = Ask::Generate {
        model: "gemini-2.5-flash",
    };
    let now = chrono::Utc::now();
    let mut g = c.benchmark_group("admission");
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    g.bench_function("identify_admit_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) % s.keys.len();
            let k = s.registry.identify(&s.keys[i]).expect("known key");
            black_box(admit(&s.rt, &k, &ask, now).is_ok())
        })
    });
    g.bench_function("identify_only", |b| {
        b.iter(|| {
            i = (i + 1) % s.keys.len();
            black_box(s.registry.identify(&s.keys[i]).is_some())
        })
    });
    let entries: Vec<_> = s.keys.iter().filter_map(|k| s.registry.identify(k)).collect();
    g.bench_function("admit_only", |b| {
        b.iter(|| {
            i = (i + 1) % entries.len();
            black_box(admit(&s.rt, &entries[i], &ask, now).is_ok())
        })
    });
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    g.bench_function(format!("identify_admit_{threads}_threads"), |b| {
        b.iter_custom(|iters| {
            let per = iters / threads as u64 + 1;
            let t0 = Instant::now();
            std::thread::scope(|scope| {
                for t in 0..threads {
                    let s = s.clone();
                    scope.spawn(move || {
                        // All threads hit the same few users too: the worst case for the per-user lock.
                        for j in 0..per as usize {
                            let k = s.registry.identify(&s.keys[(j * 7 + t) % 64]).expect("known key");
                            black_box(admit(&s.rt, &k, &ask, now).is_ok());
                        }
                    });
                }
            });
            // Wall time for `iters` admissions spread over all threads: criterion's per-iteration
            // figure is then the machine's cost per admission (1 / throughput).
            t0.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
