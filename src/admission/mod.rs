//! Admission: whether a request may go upstream. In order: the tier's model allow-list, the
//! rate limits, then the monthly quotas. The message is reserved atomically here, so the message
//! quota is exact under any concurrency. Nothing is sent upstream before this passes.

mod cells;
mod window;

use chrono::{DateTime, Utc};
use governor::clock::{Clock as _, DefaultClock};
use http::{HeaderName, HeaderValue, StatusCode};
use rust_decimal::Decimal;
use serde_json::json;

pub use cells::KeyCells;
pub use window::TokenWindow;

use crate::clock::{Month, rfc3339};
use crate::error::ApiError;
use crate::identity::{KeyEntry, User};
use crate::ledger::Totals;
use crate::runtime::{Runtime, TierId, TierRuntime};

/// What kind of request is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask<'a> {
    /// A metered model call: reserves a message; tokens and cost must not be used up.
    Generate {
        /// The model id.
        model: &'a str,
    },
    /// The start of an upload declaring its size.
    UploadStart {
        /// Declared size in bytes.
        declared: Option<u64>,
    },
    /// Upload bytes (a chunk).
    UploadBytes,
    /// Anything else: authenticated and rate limited, not metered.
    Other {
        /// The model id, when the path names one.
        model: Option<&'a str>,
    },
}

/// A request that passed admission.
#[derive(Debug)]
pub struct Admitted {
    /// The month the request was admitted in.
    pub month: Month,
    /// When it was admitted.
    pub at: DateTime<Utc>,
    /// True when a message was reserved (to settle or give back).
    pub reserved_message: bool,
    /// The tier and the totals as of admission, for the `x-quota-*` headers; `None`: no headers.
    pub quota: Option<(TierId, Totals)>,
}

impl Admitted {
    /// The `x-quota-*` headers for the response, as of admission. Rendered when the response
    /// goes out rather than at admission: formatting numbers allocates, and a refused or failed
    /// request never needs them. `rt` is the snapshot the request was admitted under.
    pub fn quota_headers(&self, rt: &Runtime) -> Vec<(HeaderName, HeaderValue)> {
        match &self.quota {
            Some((tier, totals)) => match rt.tier_by_id(*tier) {
                Some(tr) => quota_headers(tr, totals),
                None => Vec::new(),
            },
            None => Vec::new(),
        }
    }
}

/// Which quota a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// Messages per month.
    Messages,
    /// Tokens per month.
    Tokens,
    /// Bytes per month.
    Bytes,
    /// Cost per month.
    Cost,
}

impl QuotaKind {
    /// Name used in details and headers.
    pub fn name(self) -> &'static str {
        match self {
            QuotaKind::Messages => "messages",
            QuotaKind::Tokens => "tokens",
            QuotaKind::Bytes => "bytes",
            QuotaKind::Cost => "cost",
        }
    }

    fn message(self) -> &'static str {
        match self {
            QuotaKind::Messages => "You have reached your monthly message limit. Upgrade your plan to increase limit.",
            QuotaKind::Tokens => "You have reached your monthly token limit. Upgrade your plan to increase limit.",
            QuotaKind::Bytes => "You have reached your monthly storage limit. Upgrade your plan to increase limit.",
            QuotaKind::Cost => "You have reached your monthly spending limit. Upgrade your plan to increase limit.",
        }
    }
}

/// The 403 for a used-up quota, with the contract's `ErrorInfo`.
pub fn quota_error(kind: QuotaKind, used: String, limit: String, month: Month) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "PERMISSION_DENIED", kind.name(), kind.message()).with_reason(
        "MONTHLY_QUOTA_EXCEEDED",
        json!({"quota": kind.name(), "used": used, "limit": limit, "resets_at": rfc3339(month.resets_at())}),
    )
}

fn rate_limited(what: &str, retry_secs: u64) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RESOURCE_EXHAUSTED",
        "rate_limited",
        format!("Rate limit exceeded: {what}. Retry in {} s.", retry_secs.max(1)),
    )
    .with_reason("RATE_LIMIT_EXCEEDED", json!({"limit": what}));
    e.retry_after = Some(retry_secs.max(1));
    e
}

/// Checks a request of `user` (the owner of `key`) against their tier and reserves what it
/// needs. No allocation unless it refuses.
pub fn admit(
    rt: &Runtime,
    user: &User,
    key: KeyEntry,
    ask: &Ask<'_>,
    now: DateTime<Utc>,
) -> Result<Admitted, ApiError> {
    let tier_id = user.tier_id();
    let Some(tr) = rt.tier_by_id(tier_id) else {
        let tier_name = user.tier();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "unknown_tier",
            format!("Plan '{tier_name}' is not configured on this gateway; ask the operator to assign a valid plan."),
        ));
    };
    let tier = &tr.tier;
    let month = Month::of(now);

    // 1. Model allow-list.
    let model = match ask {
        Ask::Generate { model } => Some(*model),
        Ask::Other { model } => *model,
        _ => None,
    };
    if let Some(m) = model
        && !tier.allows_model(m)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "model_not_allowed",
            format!(
                "Model {m} is not available on the {} plan. Upgrade your plan to use it.",
                tr.name
            ),
        )
        .with_reason("MODEL_NOT_ALLOWED", json!({"model": m, "tier": &*tr.name})));
    }

    // 2. Rate limits: per key, then tokens per minute per user.
    if let Some(lim) = &tr.rpm
        && let Err(not_until) = lim.check_key(&key.limiter_key())
    {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Err(rate_limited("requests per minute for this key", secs));
    }
    if let (Ask::Generate { .. }, Some(tpm)) = (ask, tier.tokens_per_minute)
        && let Err(secs) = user.tpm.check(tpm)
    {
        return Err(rate_limited("tokens per minute for this user", secs));
    }

    // 3. Monthly quotas, checked against what is used (`used >= limit` is used up).
    let used_up = |t: &Totals| -> Option<QuotaKind> {
        if tier.tokens.is_some_and(|l| t.tokens >= l) {
            return Some(QuotaKind::Tokens);
        }
        if tier.cost.is_some_and(|l| t.cost >= l) {
            return Some(QuotaKind::Cost);
        }
        None
    };
    let refuse = |kind: QuotaKind, t: &Totals| -> ApiError {
        let (used, limit) = match kind {
            QuotaKind::Messages => (t.messages.to_string(), tier.messages.unwrap_or(0).to_string()),
            QuotaKind::Tokens => (t.tokens.to_string(), tier.tokens.unwrap_or(0).to_string()),
            QuotaKind::Bytes => (t.bytes.to_string(), tier.bytes.unwrap_or(0).to_string()),
            QuotaKind::Cost => (
                t.cost.normalize().to_string(),
                tier.cost.unwrap_or_default().normalize().to_string(),
            ),
        };
        quota_error(kind, used, limit, month)
    };

    let (totals, reserved) = match ask {
        Ask::Generate { .. } => {
            let mut why = None;
            let res = user.usage.try_reserve(month, |t| {
                why = used_up(t).or_else(|| {
                    tier.messages
                        .is_some_and(|l| t.messages >= l)
                        .then_some(QuotaKind::Messages)
                });
                why.is_none()
            });
            match res {
                Ok(t) => (t, true),
                Err(t) => return Err(refuse(why.unwrap_or(QuotaKind::Messages), &t)),
            }
        }
        Ask::UploadStart { declared } => {
            let t = user.usage.snapshot(month);
            if let Some(l) = tier.bytes
                && (t.bytes >= l || t.bytes.saturating_add(declared.unwrap_or(0)) > l)
            {
                return Err(refuse(QuotaKind::Bytes, &t));
            }
            if tier.cost.is_some_and(|l| t.cost >= l) {
                return Err(refuse(QuotaKind::Cost, &t));
            }
            (t, false)
        }
        Ask::UploadBytes => {
            let t = user.usage.snapshot(month);
            if tier.bytes.is_some_and(|l| t.bytes >= l) {
                return Err(refuse(QuotaKind::Bytes, &t));
            }
            (t, false)
        }
        Ask::Other { .. } => (user.usage.snapshot(month), false),
    };

    Ok(Admitted {
        month,
        at: now,
        reserved_message: reserved,
        quota: Some((tier_id, totals)),
    })
}

/// The `x-quota-*` headers for `tr`'s limits and totals `t`.
pub fn quota_headers(tr: &TierRuntime, t: &Totals) -> Vec<(HeaderName, HeaderValue)> {
    let tier = &tr.tier;
    let mut h = Vec::with_capacity(8);
    let mut warn: Option<(&str, u64)> = None;
    let mut ints = |name: &'static str, limit: Option<u64>, value: &Option<HeaderValue>, used: u64| {
        if let (Some(l), Some(lv)) = (limit, value) {
            h.push((limit_header(name), lv.clone()));
            h.push((remaining_header(name), HeaderValue::from(l.saturating_sub(used))));
            let pct = used.saturating_mul(100).checked_div(l).unwrap_or(100);
            if pct >= 90 && warn.is_none_or(|(_, p)| pct > p) {
                warn = Some((name, pct));
            }
        }
    };
    ints("messages", tier.messages, &tr.limit_values[0], t.messages);
    ints("tokens", tier.tokens, &tr.limit_values[1], t.tokens);
    ints("bytes", tier.bytes, &tr.limit_values[2], t.bytes);
    if let Some(l) = tier.cost {
        let rem = (l - t.cost).max(Decimal::ZERO).normalize();
        if let (Some(lv), Ok(rv)) = (&tr.limit_values[3], HeaderValue::from_str(&rem.to_string())) {
            h.push((COST_LIMIT, lv.clone()));
            h.push((COST_REMAINING, rv));
        }
        if l > Decimal::ZERO {
            let pct = (t.cost * Decimal::from(100) / l).floor();
            let pct = u64::try_from(pct).unwrap_or(u64::MAX);
            if pct >= 90 && warn.is_none_or(|(_, p)| pct > p) {
                warn = Some(("cost", pct));
            }
        }
    }
    if let Some((name, pct)) = warn
        && let Ok(v) = HeaderValue::from_str(&format!("{name} quota at {pct}%"))
    {
        h.push((WARNING, v));
    }
    h
}

// Header names are built once: `HeaderName::from_static` re-validates its input on every call.
const MESSAGES_LIMIT: HeaderName = HeaderName::from_static("x-quota-messages-limit");
const MESSAGES_REMAINING: HeaderName = HeaderName::from_static("x-quota-messages-remaining");
const TOKENS_LIMIT: HeaderName = HeaderName::from_static("x-quota-tokens-limit");
const TOKENS_REMAINING: HeaderName = HeaderName::from_static("x-quota-tokens-remaining");
const BYTES_LIMIT: HeaderName = HeaderName::from_static("x-quota-bytes-limit");
const BYTES_REMAINING: HeaderName = HeaderName::from_static("x-quota-bytes-remaining");
const COST_LIMIT: HeaderName = HeaderName::from_static("x-quota-cost-limit");
const COST_REMAINING: HeaderName = HeaderName::from_static("x-quota-cost-remaining");
const WARNING: HeaderName = HeaderName::from_static("x-quota-warning");

fn limit_header(name: &str) -> HeaderName {
    match name {
        "messages" => MESSAGES_LIMIT,
        "tokens" => TOKENS_LIMIT,
        _ => BYTES_LIMIT,
    }
}

fn remaining_header(name: &str) -> HeaderName {
    match name {
        "messages" => MESSAGES_REMAINING,
        "tokens" => TOKENS_REMAINING,
        _ => BYTES_REMAINING,
    }
}
