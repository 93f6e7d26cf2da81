//! Metering: reading usage out of response bodies as they stream past, and pricing it.
//!
//! `scan` holds the incremental scanners per framing, `decode` meters compressed bodies,
//! `observer` wraps a response body (forwarding every frame untouched) and settles exactly
//! once however the body ends, `pricing` turns a usage report into an exact cost, `usage` puts
//! them together into what one response used.

pub mod decode;
pub mod estimate;
pub mod observer;
pub mod pricing;
pub mod scan;
pub mod table;
pub mod usage;
