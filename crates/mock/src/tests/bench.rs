//! Raw speed of the mock (and of the request log), ignored by default:
//! `cargo test -p gemini-meter-mock --release -- --ignored --nocapture bench_unary`.

use super::*;

/// Raw speed: `cargo test --release -- --ignored --nocapture bench_unary`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_unary() -> TestResult {
    const TOTAL: usize = 20_000;
    const CONCURRENCY: usize = 64;
    let m = mock(MockOptions::default()).await?;
    let target = url(&m, &format!("{FLASH}:generateContent"));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            for _ in 0..TOTAL / CONCURRENCY {
                let r = c
                    .post(&target)
                    .header("x-goog-api-key", "k")
                    .body(BODY40)
                    .send()
                    .await?;
                r.bytes().await?;
            }
            Ok::<_, reqwest::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = (TOTAL / CONCURRENCY) * CONCURRENCY;
    let secs = t0.elapsed().as_secs_f64();
    println!("bench_unary: {n} requests in {secs:.2}s = {:.0} req/s", n as f64 / secs);
    assert_eq!(stat(&m, |s| &s.generate_requests), n as u64);
    Ok(())
}

/// Raw speed with a minimal keep-alive HTTP/1.1 client (reqwest costs more than the mock):
/// `cargo test --release -- --ignored --nocapture bench_unary_raw`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_unary_raw() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOTAL: usize = 100_000;
    const CONCURRENCY: usize = 64;
    let m = mock(MockOptions::default()).await?;
    let request = format!(
        "POST {FLASH}:generateContent HTTP/1.1\r\nhost: {}\r\nx-goog-api-key: k\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY40}",
        m.addr,
        BODY40.len()
    );
    let request = Arc::new(request.into_bytes());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let request = request.clone();
        let addr = m.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(4096);
            for _ in 0..TOTAL / CONCURRENCY {
                s.write_all(&request).await?;
                buf.clear();
                // Read headers, then exactly content-length bytes.
                let (head_end, len) = loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await?;
                    assert!(n > 0, "server closed");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = text(&buf[..i]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .expect("content-length");
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await?;
                    assert!(n > 0, "server closed");
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Ok::<_, io::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = (TOTAL / CONCURRENCY) * CONCURRENCY;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "bench_unary_raw: {n} requests in {secs:.2}s = {:.0} req/s",
        n as f64 / secs
    );
    assert_eq!(stat(&m, |s| &s.generate_requests), n as u64);
    Ok(())
}

/// Cost of one request-log push (the only resource work on the generate path):
/// `cargo test --release -- --ignored --nocapture bench_request_log`.
#[test]
#[ignore]
fn bench_request_log() -> TestResult {
    const N: usize = 1_000_000;
    let log = store::RequestLog::default();
    let uri: http::Uri = format!("{FLASH}:generateContent?alt=sse").parse()?;
    let t0 = Instant::now();
    for _ in 0..N {
        log.push(&Method::POST, &uri);
    }
    let ns = t0.elapsed().as_nanos() as f64 / N as f64;
    println!(
        "bench_request_log: {ns:.0} ns per push (log full after {})",
        store::LOG_CAP
    );
    Ok(())
}
