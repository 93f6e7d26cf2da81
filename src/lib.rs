//! gemini-meter: a metering gateway for the Gemini API.
//!
//! Requests flow one way: `server` accepts them; `proxy` identifies the caller (`identity`),
//! admits it (`admission`), forwards it, meters the response as it streams (`metering`), and
//! hands the usage to `settle`, which updates the in-memory counters, fires alerts and sends
//! the record to the durable ledger (`ledger`). `api` serves the usage and admin routes.
//!
//! The built-in mock upstream and the load tool are crates of their own (`gemini-meter-mock`,
//! `gemini-meter-loadtest`), linked only by the binary and the tests.

#![forbid(unsafe_code)]

pub mod accept;
pub mod admin_cli;
pub mod admission;
pub mod alerts;
pub mod api;
pub mod app;
pub mod audit;
pub mod body;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod identity;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub mod nesting;
pub mod ownership;
pub mod percent;
pub mod policy;
pub mod proxy;
pub mod replica;
pub mod runtime;
pub mod server;
pub mod settle;
pub mod statement;
pub mod tls;
