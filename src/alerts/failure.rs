//! The outcome of a failed delivery attempt, shared by the channels (which report it) and the
//! delivery task (which retries or gives up on it).

/// Why an attempt failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// Worth retrying (receiver down, timeout, error status, channel not configured now).
    Retry(String),
    /// Can never succeed (e.g. an address that is not one).
    Permanent(String),
}

impl Failure {
    pub(super) fn message(&self) -> &str {
        match self {
            Failure::Retry(m) | Failure::Permanent(m) => m,
        }
    }
}
