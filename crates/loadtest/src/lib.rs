//! The load tool behind `gemini-meter loadtest`: the built-in mock upstream driven directly,
//! through the gateway and through nginx, interleaved in one run, with HDR histograms of what the
//! client saw, the gateway's memory and CPU, and a check that every gateway request was metered.
//!
//! It owns: starting and stopping the three child processes (mock, gateway, nginx) on loopback
//! ports in a temp dir, the closed-loop client, the statistics and the report.
//!
//! It must not: reach anything but 127.0.0.1, run unbounded in time (every phase has a deadline and
//! every wait a timeout), or touch the gateway's internals: it sees the gateway as a user would,
//! through its binary, its admin API and /proc.

#![forbid(unsafe_code)]

mod admin;
mod callgrind;
mod client;
mod cluster;
mod configs;
mod engines;
mod procs;
mod report;
mod run;
mod stats;
mod tls;

use std::time::Duration;

pub use callgrind::{Callgrind, CallgrindStatus, Count};
pub use report::Report;
pub use run::{run, run_with_replicas};
pub use tls::{TlsFigures, TlsRow};

/// Which calls to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `:generateContent` only.
    Unary,
    /// `:streamGenerateContent?alt=sse` only.
    Sse,
    /// Unary first, then SSE.
    Both,
}

impl Mode {
    /// The call kinds this mode runs, in order.
    pub fn kinds(self) -> &'static [CallKind] {
        match self {
            Mode::Unary => &[CallKind::Unary],
            Mode::Sse => &[CallKind::Sse],
            Mode::Both => &[CallKind::Unary, CallKind::Sse],
        }
    }
}

/// One kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `:generateContent`.
    Unary,
    /// `:streamGenerateContent?alt=sse`.
    Sse,
}

impl CallKind {
    /// Name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Unary => "unary",
            CallKind::Sse => "sse",
        }
    }
}

/// What the load tool is asked to do (the `loadtest` flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// Unary, SSE or both.
    pub mode: Mode,
    /// Requests (or streams) in flight per target, each on its own keep-alive connection.
    pub concurrency: usize,
    /// Seconds of load per target per round.
    pub duration: Duration,
    /// Rounds; each round runs direct, gateway, nginx in turn.
    pub rounds: u32,
    /// Load before the first round, per target, not measured (but metered and checked).
    pub warmup: Duration,
    /// Stream chunks the mock sends per answer.
    pub chunks: u32,
    /// Gap between stream chunks at the mock.
    pub chunk_delay: Duration,
    /// Mock delay before the first byte.
    pub ttfb: Duration,
    /// Gateway users the requests are spread over (one key each).
    pub users: usize,
    /// Skip nginx even when it is installed.
    pub no_nginx: bool,
    /// Leave out the plain hyper proxy (the "hyper" target).
    pub no_hyper: bool,
    /// Tokio worker threads of the gateway (`None`: one per core).
    pub gateway_workers: Option<usize>,
    /// The `gemini-meter` binary to start as mock and gateway (normally this process's own).
    pub binary: std::path::PathBuf,
    /// Also count, under valgrind's callgrind, the user-space instructions of this many unary
    /// requests through the gateway and the hyper target.
    pub callgrind: Option<u64>,
    /// Also measure TLS: a second gateway serving TLS, keep-alive and a new connection per
    /// request, against the plain one (needs the openssl command line).
    pub tls: bool,
}

/// Why a load run could not be carried out (a failed request is a figure, not an error).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A temp dir, config file or /proc read failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A child process did not come up.
    #[error("{name} did not start: {reason}")]
    Start {
        /// Which process.
        name: &'static str,
        /// Why, with its last output lines.
        reason: String,
    },
    /// The gateway's admin API did not answer as expected.
    #[error("admin API: {0}")]
    Admin(String),
    /// Options that cannot work.
    #[error("invalid options: {0}")]
    Options(String),
}

impl LoadError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadError {
        let what = what.into();
        move |source| LoadError::Io { what, source }
    }
}
