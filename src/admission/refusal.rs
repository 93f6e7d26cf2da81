//! Why admission refused a request: typed here, rendered as the error envelope by the HTTP
//! layer (`crate::error`).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::ledger::Quota;

/// Which rate limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    /// `requests_per_minute`, per key.
    RequestsPerMinute,
    /// `tokens_per_minute`, per user.
    TokensPerMinute,
}

impl RateLimit {
    /// How the limit is named to the caller.
    pub fn describe(self) -> &'static str {
        match self {
            RateLimit::RequestsPerMinute => "requests per minute for this key",
            RateLimit::TokensPerMinute => "tokens per minute for this user",
        }
    }
}

/// A request admission refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The user's tier is not in the running config.
    #[error("plan '{tier}' is not configured")]
    UnknownTier {
        /// The tier the user has.
        tier: Arc<str>,
    },
    /// The tier's allow-list does not name the model.
    #[error("model {model} is not available on the {tier} plan")]
    ModelNotAllowed {
        /// The model asked for.
        model: String,
        /// The user's tier.
        tier: Arc<str>,
    },
    /// A rate limit is exhausted for now.
    #[error("rate limit exceeded: {}", limit.describe())]
    RateLimited {
        /// Which limit.
        limit: RateLimit,
        /// Seconds until a retry can pass (at least 1).
        retry_secs: u64,
    },
    /// Cluster mode: the shared counters (Redis) cannot be reached or are being rebuilt, so
    /// nothing can be reserved; the request is refused rather than admitted unreserved.
    #[error("usage store unavailable")]
    StoreUnavailable {
        /// Seconds until a retry may pass.
        retry_secs: u64,
    },
    /// A monthly quota is used up (or a declared upload would pass it).
    #[error("monthly {} quota used up", quota.as_str())]
    Quota {
        /// Which quota.
        quota: Quota,
        /// Used so far, as rendered.
        used: String,
        /// The limit, as rendered.
        limit: String,
        /// When the quota resets.
        resets_at: DateTime<Utc>,
    },
}

/// The message SDKs show for a used-up quota.
pub fn quota_message(q: Quota) -> &'static str {
    match q {
        Quota::Messages => "You have reached your monthly message limit. Upgrade your plan to increase limit.",
        Quota::Tokens => "You have reached your monthly token limit. Upgrade your plan to increase limit.",
        Quota::Bytes => "You have reached your monthly storage limit. Upgrade your plan to increase limit.",
        Quota::Cost => "You have reached your monthly spending limit. Upgrade your plan to increase limit.",
    }
}
