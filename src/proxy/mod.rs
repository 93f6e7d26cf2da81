//! Forwarding to the upstream: routing a proxied request, identifying and admitting its caller,
//! rewriting and sending it, and metering the answer. Settling belongs to [`crate::settle`];
//! this module decides what to settle and when.

pub mod body;
pub mod client;
mod failure;
pub mod forward;
pub mod guard;
pub mod headers;
pub mod lists;
mod metered;
pub mod own_call;
pub mod passthrough;
pub mod route;
mod surfaces;
pub mod tenancy;
pub mod upload;

use std::sync::Arc;

use crate::clock::SharedClock;
use crate::identity::Registry;
use crate::metrics::Metrics;
use crate::runtime::Live;
use crate::settle::Settler;

pub use failure::UpstreamFailure;

/// What forwarding needs, shared by every request.
#[derive(Debug)]
pub struct Proxy {
    /// The live config snapshot.
    pub live: Arc<Live>,
    /// Users and keys.
    pub registry: Arc<Registry>,
    /// Where usage is settled.
    pub settler: Arc<Settler>,
    /// The pooled upstream client.
    pub upstream: client::UpstreamClient,
    /// Upload sessions started here.
    pub uploads: upload::UploadSessions,
    /// Who owns which upstream resource.
    pub owners: Arc<crate::ownership::Owners>,
    /// Operational metrics.
    pub metrics: Arc<Metrics>,
    /// The clock.
    pub clock: SharedClock,
    /// Cluster mode: admission reserves in Redis.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}
