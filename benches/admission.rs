//! identify + admit with a million users loaded (issue 3: under 1 µs per admission and under
//! 300 bytes per user with its counters).
//!
//! Run: `cargo bench --bench admission` (`GM_BENCH_USERS` sets the user count, default 1,000,000).
//!
//! Method:
//! - Setup writes N users with one key each straight into a fresh sled store (the records
//!   `Registry::create_user` / `create_key` write), then loads them with `Registry::load`, as
//!   a restart does. The tier limits messages, tokens, requests per minute (governor, per key),
//!   tokens per minute and models, so every check of admission runs.
//! - Memory per user, idle: the live heap bytes after `Registry::load` minus those still live
//!   once that registry is dropped (so the store's own cache is left out), divided by N. A
//!   wrapping global allocator counts each block as glibc's malloc holds it (usable size plus
//!   its 8-byte header), so rounding and per-block overhead are included. RSS is not used: in
//!   one process with sled, its growth mostly measures sled (writing N users leaves gigabytes
//!   of sled state that is released during the load), not the registry.
//! - Memory per user, active: every user's key is then identified and admitted once (and the
//!   user's counters and token window updated as settling does), which creates its rate-limit
//!   cell; the heap growth over that, divided by N, is added to the idle figure.
//! - Time: criterion, per identify + admit of a `generateContent` ask. `hot`: 4,096 keys in turn
//!   (their slots stay in cache); `spread`: all N keys in a shuffled order (most lookups miss
//!   the CPU caches, as with many users at once). `identify_only` and `admit_only` split the
//!   hot case. On all cores: each thread runs its share of the iterations and the figure is
//!   wall time / iterations, i.e. the machine's cost per admission (1 / throughput); `hot64`
//!   has every thread hit the same 64 keys (worst case for the per-user lock and the rate
//!   limiter's cells), `spread` spreads them over all users.
//! - `quota_headers`: rendering the `x-quota-*` headers of an admitted request, which happens
//!   when its response goes out (not part of admission, shown for completeness).
//!
//! Figures (2 shared vCPUs, AMD EPYC with SHA-NI, 1,000,000 users, 2026-11-28, three runs; other
//! engineers' builds ran on the machine, so times are ranges):
//! - memory: idle 247 bytes per user, active 255 (the 8 more are the rate-limit cell);
//! - hot: identify + admit 0.77-0.82 µs on 1 thread (identify 0.31-0.52 µs and admit
//!   0.08 µs measured apart), 0.16-0.22 µs per admission on 2 threads hitting the same 64 keys;
//! - spread: 3.2-3.9 µs on 1 thread, 1.4-1.6 µs per admission on 2 threads. Each admission
//!   then misses the CPU caches about 6 times (the bench's key string, index bucket, key slot,
//!   user slot, rate-limit cell) and this VM's memory latency dominates;
//! - quota headers, rendered with the response: 0.24-0.25 µs.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// The counting allocator below (GlobalAlloc, malloc_usable_size) is the only unsafe code in the
// workspace: a measurement harness, never part of the gateway.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use gemini_meter::admission::{Ask, admit};
use gemini_meter::clock::{Month, rfc3339};
use gemini_meter::config::Config;
use gemini_meter::identity::{KeyEntry, Registry, generate_key, hash_key};
use gemini_meter::ledger::SledStore;
use gemini_meter::runtime::{EnvLookup, Runtime};

/// Counts live heap bytes as glibc's malloc holds them: each block's usable size plus its
/// 8-byte header, so small blocks count with their rounding and overhead.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe extern "C" {
    fn malloc_usable_size(p: *mut std::ffi::c_void) -> usize;
}

fn block(p: *mut u8) -> i64 {
    if p.is_null() {
        return 0;
    }
    // SAFETY: `p` is a live block from the system allocator (glibc malloc).
    unsafe { malloc_usable_size(p.cast()) as i64 + 8 }
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(l) };
        LIVE.fetch_add(block(p), Ordering::Relaxed);
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(block(p), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(l) };
        LIVE.fetch_add(block(p), Ordering::Relaxed);
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let old = block(p);
        // SAFETY: same contract as ours.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(block(q) - old, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

struct Setup {
    rt: Runtime,
    registry: Arc<Registry>,
    keys: Vec<String>,
    _dir: tempfile::TempDir,
}

/// A small deterministic shuffle (xorshift), so runs are comparable.
fn shuffle<T>(v: &mut [T]) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
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
    let store = SledStore::open_with_cache(&dir.path().join("data"), 8 * 1024 * 1024).expect("store");

    // The records Registry::create_user and create_key write, in batches.
    let t0 = Instant::now();
    let created = rfc3339(now);
    let mut keys = Vec::with_capacity(n);
    let (mut ub, mut kb) = (sled::Batch::default(), sled::Batch::default());
    for i in 0..n {
        let id = format!("user-{i:07}");
        let key = generate_key().expect("key");
        let key_id = format!("key_{i:016}");
        let user = serde_json::json!({"id": id, "tier": "free", "email": null, "created_at": created});
        let rec = serde_json::json!({
            "key_id": key_id, "user_id": id, "hash": hex::encode(hash_key(&key)),
            "prefix": &key[..7], "created_at": created, "revoked_at": null,
        });
        ub.insert(id.as_bytes(), user.to_string().into_bytes());
        kb.insert(format!("{id}/{key_id}").as_bytes(), rec.to_string().into_bytes());
        keys.push(key);
        if i % 10_000 == 9_999 || i + 1 == n {
            store.users().apply_batch(std::mem::take(&mut ub)).expect("users batch");
            store.keys().apply_batch(std::mem::take(&mut kb)).expect("keys batch");
        }
    }
    eprintln!(
        "wrote {n} users with one key each in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let month = Month::of(now);
    let per = |bytes: i64| bytes as f64 / n.max(1) as f64;
    // Idle: what loading the users costs, the store's cache left out.
    let t0 = Instant::now();
    let registry = Registry::load(store.clone(), month).expect("registry");
    let load_s = t0.elapsed().as_secs_f64();
    let live1 = live();
    drop(registry);
    let live_store = live();
    let registry_heap = live1 - live_store;
    let t0 = Instant::now();
    let registry = Arc::new(Registry::load(store.clone(), month).expect("registry"));
    store.flush_sync().expect("flush");
    eprintln!(
        "idle: {n} users loaded in {load_s:.1} s ({:.1} s again); {:.0} bytes of registry heap per user",
        t0.elapsed().as_secs_f64(),
        per(registry_heap),
    );

    // Active: every user's key admitted once (creates its rate-limiter state).
    let ask = Ask::Generate {
        model: "gemini-2.5-flash",
    };
    let live2 = live();
    for k in &keys {
        let e = registry.identify(k).expect("known key");
        let user = registry.user_of(e).expect("user");
        let a = admit(&rt.tiers, &registry, e, &ask, now).expect("admitted");
        // What settling does to the user's slot: counters and token window, in place.
        if let Some(r) = a.reservation {
            r.commit(&Default::default());
        }
        user.tpm.add(100, Some(1_000_000_000));
    }
    let live3 = live();
    eprintln!(
        "active: each user admitted once adds {:.0} bytes of heap per user => {:.0} bytes per active user",
        per(live3 - live2),
        per(registry_heap + live3 - live2),
    );
    Setup {
        rt,
        registry,
        keys,
        _dir: dir,
    }
}

fn one(s: &Setup, key: &str, ask: &Ask<'_>, now: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(e) = s.registry.identify(key) else {
        return false;
    };
    // The reservation is released when the result is dropped, as a request's is when it ends.
    admit(&s.rt.tiers, &s.registry, e, ask, now).is_ok()
}

/// Runs `iters` admissions over `threads` threads; `pick(thread, j)` chooses the key.
fn on_threads(
    s: &Arc<Setup>,
    threads: usize,
    iters: u64,
    pick: impl Fn(usize, usize) -> usize + Sync,
    now: chrono::DateTime<chrono::Utc>,
) -> Duration {
    let ask = Ask::Generate {
        model: "gemini-2.5-flash",
    };
    let per = iters / threads as u64 + 1;
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (s, pick, ask) = (s.clone(), &pick, &ask);
            scope.spawn(move || {
                for j in 0..per as usize {
                    black_box(one(&s, &s.keys[pick(t, j)], ask, now));
                }
            });
        }
    });
    t0.elapsed()
}

fn bench(c: &mut Criterion) {
    let s = Arc::new(setup());
    let ask = Ask::Generate {
        model: "gemini-2.5-flash",
    };
    let now = chrono::Utc::now();
    let n = s.keys.len();
    let hot = n.min(4096);
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order);
    let order = Arc::new(order);

    let mut g = c.benchmark_group("admission");
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    g.bench_function("identify_admit_1_thread_hot", |b| {
        b.iter(|| {
            i = (i + 1) % hot;
            black_box(one(&s, &s.keys[i], &ask, now))
        })
    });
    g.bench_function("identify_admit_1_thread_spread", |b| {
        b.iter(|| {
            i = (i + 1) % n;
            black_box(one(&s, &s.keys[order[i]], &ask, now))
        })
    });
    g.bench_function("identify_only_hot", |b| {
        b.iter(|| {
            i = (i + 1) % hot;
            black_box(s.registry.identify(&s.keys[i]).is_some())
        })
    });
    let entries: Vec<KeyEntry> = s.keys[..hot].iter().filter_map(|k| s.registry.identify(k)).collect();
    g.bench_function("admit_only_hot", |b| {
        b.iter(|| {
            i = (i + 1) % entries.len();
            let e = entries[i];
            black_box(admit(&s.rt.tiers, &s.registry, e, &ask, now).is_ok())
        })
    });
    let admitted = {
        let e = entries[0];
        admit(&s.rt.tiers, &s.registry, e, &ask, now).expect("admitted")
    };
    g.bench_function("quota_headers", |b| {
        b.iter(|| black_box(admitted.quota_headers(&s.rt.tiers).len()))
    });

    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    g.bench_function(format!("identify_admit_{threads}_threads_hot64"), |b| {
        b.iter_custom(|iters| on_threads(&s, threads, iters, |t, j| (j * 7 + t) % 64, now))
    });
    let ord = order.clone();
    g.bench_function(format!("identify_admit_{threads}_threads_spread"), |b| {
        b.iter_custom(|iters| on_threads(&s, threads, iters, |t, j| ord[(j * threads + t) % n], now))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
