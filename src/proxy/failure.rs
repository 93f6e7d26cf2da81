//! Why the upstream gave no answer, told by the error's type (never by its text).

use crate::error::ApiError;

/// An upstream request that got no response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No answer within the read or connect timeout.
    Timeout,
    /// No connection could be made.
    Connect,
    /// The connection failed before the answer's head.
    Broken,
}

impl UpstreamFailure {
    /// Classifies a client error by the types in its source chain.
    pub fn of(e: &super::client::Error) -> Self {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = src {
            let timed_out = s
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                || s.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
                || s.is::<tokio::time::error::Elapsed>();
            if timed_out {
                return UpstreamFailure::Timeout;
            }
            src = s.source();
        }
        if e.is_connect() {
            UpstreamFailure::Connect
        } else {
            UpstreamFailure::Broken
        }
    }

    /// The error the caller gets.
    pub fn to_api_error(self) -> ApiError {
        match self {
            UpstreamFailure::Timeout => ApiError::upstream_timeout(),
            UpstreamFailure::Connect => ApiError::upstream_unavailable("could not connect to the upstream API."),
            UpstreamFailure::Broken => {
                ApiError::upstream_unavailable("the upstream connection failed before it answered.")
            }
        }
    }
}
