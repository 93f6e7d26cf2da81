//! `--replicas` before the `loadtest` command has the flag: runs the load tool with N gateway
//! replicas in cluster mode next to the embedded gateway and prints the table.
//!
//! `cargo run -p gemini-meter-loadtest --example replicas -- target/debug/gemini-meter 2 [unary|sse|both] [concurrency] [secs]`

use std::time::Duration;

use gemini_meter_loadtest::{Mode, Options};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let Some(binary) = arg(1) else {
        eprintln!("usage: replicas BINARY [N] [unary|sse|both] [CONCURRENCY] [SECS]");
        return std::process::ExitCode::FAILURE;
    };
    let replicas = arg(2).and_then(|v| v.parse().ok()).unwrap_or(2);
    let mode = match arg(3) {
        Some("sse") => Mode::Sse,
        Some("both") => Mode::Both,
        _ => Mode::Unary,
    };
    let opts = Options {
        mode,
        concurrency: arg(4).and_then(|v| v.parse().ok()).unwrap_or(32),
        duration: Duration::from_secs_f64(arg(5).and_then(|v| v.parse().ok()).unwrap_or(3.0)),
        rounds: 3,
        warmup: Duration::from_secs(1),
        chunks: 5,
        chunk_delay: Duration::ZERO,
        ttfb: Duration::ZERO,
        users: 16,
        no_nginx: true,
        no_hyper: true,
        gateway_workers: None,
        binary: binary.into(),
        callgrind: None,
        tls: false,
    };
    match gemini_meter_loadtest::run_with_replicas(&opts, replicas).await {
        Ok(report) => {
            print!("{}", report.table());
            if report.metering_pass() {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("metering check failed");
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
