//! The gateway's HTTP front: the server loop, routing, and forwarding to the upstream.

pub mod body;
pub mod client;
pub mod forward;
pub mod headers;
pub mod passthrough;
pub mod route;
pub mod server;
pub mod upload;

pub use server::{Server, serve};
