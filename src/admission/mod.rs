//! Admission: whether a request may go upstream. In order: the tier's model allow-list, the
//! rate limits, then the monthly quotas. The message is reserved atomically here, so the message
//! quota is exact under any concurrency. Nothing is sent upstream before this passes.

mod budget;
mod cells;
mod refusal;
mod reservation;
mod tiers;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use governor::clock::{Clock as _, DefaultClock};
use http::{HeaderName, HeaderValue};
use rust_decimal::Decimal;

pub use budget::{NoFit, WorstCase, fit};
pub use cells::KeyCells;
pub use refusal::{RateLimit, Refusal, quota_message};
pub use reservation::{Remote, Reservation};
pub use tiers::{KeyLimiter, TierRuntime, Tiers};

use crate::clock::Month;
use crate::config::TierId;
use crate::identity::{KeyEntry, Registry};
use crate::ledger::{Held, Quota, Reserved, Totals};

/// What kind of request is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask<'a> {
    /// A metered model call: reserves a message; tokens and cost must not be used up.
    Generate {
        /// The model id.
        model: &'a str,
        /// The call's worst case; required under a tier's hard token or cost limit.
        worst: Option<WorstCase>,
    },
    /// The start of an upload declaring its size.
    UploadStart {
        /// Declared size in bytes.
        declared: Option<u64>,
    },
    /// Upload bytes (a chunk).
    UploadBytes,
    /// Work billed later by cost only (a cached content's storage, a batch's results): refused
    /// once the cost limit is used up.
    Billed {
        /// The model the work is for.
        model: &'a str,
    },
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
    /// What was reserved for the request (a metered model call's message); released if dropped.
    pub reservation: Option<Reservation>,
    /// The tier, the totals and what calls in flight reserve as of admission, for the
    /// `x-quota-*` headers; `None`: no headers.
    pub quota: Option<(TierId, Totals, Reserved)>,
    /// Under hard enforcement, the output cap the forwarded request must carry (its own if it
    /// fits, else lowered to fit; the model's when it set none).
    pub output_cap: Option<u64>,
    /// The cap the forwarded request was lowered to, for `x-quota-output-capped` (set by the
    /// proxy, which knows what the request asked for).
    pub capped: Option<u64>,
}

impl Admitted {
    /// Admission of a request that is part of one already admitted (an upload's next chunk).
    pub fn continued(at: DateTime<Utc>) -> Self {
        Admitted {
            month: Month::of(at),
            at,
            reservation: None,
            quota: None,
            output_cap: None,
            capped: None,
        }
    }

    /// The `x-quota-*` headers for the response, as of admission. Rendered when the response
    /// goes out rather than at admission: formatting numbers allocates, and a refused or failed
    /// request never needs them. `tiers` are those of the snapshot the request was admitted under.
    pub fn quota_headers(&self, tiers: &Tiers) -> Vec<(HeaderName, HeaderValue)> {
        match &self.quota {
            Some((tier, totals, reserved)) => match tiers.by_id(*tier) {
                Some(tr) => quota_headers(tr, totals, reserved),
                None => Vec::new(),
            },
            None => Vec::new(),
        }
    }
}

/// Checks a request of `key`'s user against their tier and reserves what it needs. No
/// allocation unless it refuses.
pub fn admit(
    tiers: &Tiers,
    registry: &Arc<Registry>,
    key: KeyEntry,
    ask: &Ask<'_>,
    now: DateTime<Utc>,
) -> Result<Admitted, Refusal> {
    let (user, tr) = tier_of(tiers, registry, key)?;
    let tier_id = user.tier_id();
    let tier = &tr.tier;
    let month = Month::of(now);

    // 1. Model allow-list.
    check_model(tr, ask)?;

    // 2. Rate limits: per key, then tokens per minute per user.
    if let Some(lim) = &tr.rpm
        && let Err(not_until) = lim.check_key(&key.limiter_key())
    {
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Err(Refusal::RateLimited {
            limit: RateLimit::RequestsPerMinute,
            retry_secs: secs.max(1),
        });
    }
    if let (Ask::Generate { .. }, Some(tpm)) = (ask, tier.tokens_per_minute)
        && let Err(secs) = user.tpm.check(tpm)
    {
        return Err(Refusal::RateLimited {
            limit: RateLimit::TokensPerMinute,
            retry_secs: secs.max(1),
        });
    }

    // 3. Monthly quotas, checked against what is used (`used >= limit` is used up).
    let refuse = |quota: Quota, t: &Totals| quota_refusal(tr, quota, t, month);
    let mut output_cap = None;
    let (totals, reserved, reservation) = match ask {
        Ask::Generate { worst, .. } => {
            let mut why = None;
            let hard = tier.hard_budget();
            let res = user
                .usage
                .try_reserve(month, |t, r| decide(tr, *worst, t, r, &mut why, &mut output_cap));
            match res {
                Ok((t, r, held)) => {
                    let mut tpm_charged = 0;
                    if hard && let Some(tpm) = tier.tokens_per_minute {
                        user.tpm.add(held.tokens, Some(tpm));
                        tpm_charged = held.tokens;
                    }
                    let res = Reservation::new(registry.clone(), key, month, held, tpm_charged);
                    (t, r, Some(res))
                }
                Err(t) => return Err(refuse(why.unwrap_or(Quota::Messages), &t)),
            }
        }
        Ask::UploadStart { declared } => {
            let (t, r) = user.usage.snapshot_reserved(month);
            if let Some(l) = tier.bytes
                && (t.bytes >= l || t.bytes.saturating_add(declared.unwrap_or(0)) > l)
            {
                return Err(refuse(Quota::Bytes, &t));
            }
            if tier.cost.is_some_and(|l| t.cost >= l) {
                return Err(refuse(Quota::Cost, &t));
            }
            (t, r, None)
        }
        Ask::UploadBytes => {
            let (t, r) = user.usage.snapshot_reserved(month);
            if tier.bytes.is_some_and(|l| t.bytes >= l) {
                return Err(refuse(Quota::Bytes, &t));
            }
            (t, r, None)
        }
        Ask::Billed { .. } => {
            let (t, r) = user.usage.snapshot_reserved(month);
            if tier.cost.is_some_and(|l| t.cost.saturating_add(r.cost) >= l) {
                return Err(refuse(Quota::Cost, &t));
            }
            (t, r, None)
        }
        Ask::Other { .. } => {
            let (t, r) = user.usage.snapshot_reserved(month);
            (t, r, None)
        }
    };

    Ok(Admitted {
        month,
        at: now,
        reservation,
        quota: Some((tier_id, totals, reserved)),
        output_cap,
        capped: None,
    })
}

/// The user of `key` and their tier in `tiers`.
pub fn tier_of<'r, 't>(
    tiers: &'t Tiers,
    registry: &'r Registry,
    key: KeyEntry,
) -> Result<(&'r crate::identity::User, &'t TierRuntime), Refusal> {
    let Some(user) = registry.user_of(key) else {
        return Err(Refusal::UnknownTier { tier: Arc::from("") });
    };
    match tiers.by_id(user.tier_id()) {
        Some(tr) => Ok((user, tr)),
        None => Err(Refusal::UnknownTier { tier: user.tier() }),
    }
}

/// Refuses a model the tier's allow-list does not name.
pub fn check_model(tr: &TierRuntime, ask: &Ask<'_>) -> Result<(), Refusal> {
    let model = match ask {
        Ask::Generate { model, .. } | Ask::Billed { model } => Some(*model),
        Ask::Other { model } => *model,
        _ => None,
    };
    match model {
        Some(m) if !tr.tier.allows_model(m) => Err(Refusal::ModelNotAllowed {
            model: m.to_string(),
            tier: tr.name.clone(),
        }),
        _ => Ok(()),
    }
}

/// The refusal of a used-up `quota`, given the totals `t`.
pub fn refusal_of(tr: &TierRuntime, quota: Quota, t: &Totals, month: Month) -> Refusal {
    quota_refusal(tr, quota, t, month)
}

/// What a model call holds, given the totals `t` and the others' reservations `r` (under the
/// user's lock); `None` refuses it, with the quota in `why`. Under hard enforcement the call's
/// output cap goes in `output_cap`.
fn decide(
    tr: &TierRuntime,
    worst: Option<WorstCase>,
    t: &Totals,
    r: &Reserved,
    why: &mut Option<Quota>,
    output_cap: &mut Option<u64>,
) -> Option<Held> {
    let tier = &tr.tier;
    if tier.messages.is_some_and(|l| t.messages >= l) {
        *why = Some(Quota::Messages);
        return None;
    }
    match (tier.hard_budget(), worst) {
        (true, Some(w)) => match fit(tier, &w, t, r) {
            Ok(c) => {
                *output_cap = (c != u64::MAX).then_some(c);
                // No cap and nothing to bound it: the tier limits cost only and output is free,
                // so the prompt's tokens and cost are all there is to hold.
                Some(w.held(if c == u64::MAX { 0 } else { c }))
            }
            Err(NoFit::Tokens) => {
                *why = Some(Quota::Tokens);
                None
            }
            Err(NoFit::Cost) => {
                *why = Some(Quota::Cost);
                None
            }
        },
        // Hard without a worst case (the proxy always sends one): only what others have not
        // reserved may be used.
        (true, None) => {
            *why = used_up(tr, &with_reserved(t, r));
            why.is_none().then_some(MESSAGE)
        }
        (false, _) => {
            *why = used_up(tr, t);
            why.is_none().then_some(MESSAGE)
        }
    }
}

/// What a call holds under soft enforcement: its message.
const MESSAGE: Held = Held {
    message: true,
    tokens: 0,
    cost: Decimal::ZERO,
};

fn with_reserved(t: &Totals, r: &Reserved) -> Totals {
    let mut t = *t;
    t.tokens = t.tokens.saturating_add(r.tokens);
    t.cost += r.cost;
    t
}

/// The token or cost quota `t` has used up, if any.
fn used_up(tr: &TierRuntime, t: &Totals) -> Option<Quota> {
    if tr.tier.tokens.is_some_and(|l| t.tokens >= l) {
        return Some(Quota::Tokens);
    }
    if tr.tier.cost.is_some_and(|l| t.cost >= l) {
        return Some(Quota::Cost);
    }
    None
}

fn quota_refusal(tr: &TierRuntime, quota: Quota, t: &Totals, month: Month) -> Refusal {
    let tier = &tr.tier;
    let (used, limit) = match quota {
        Quota::Messages => (t.messages.to_string(), tier.messages.unwrap_or(0).to_string()),
        Quota::Tokens => (t.tokens.to_string(), tier.tokens.unwrap_or(0).to_string()),
        Quota::Bytes => (t.bytes.to_string(), tier.bytes.unwrap_or(0).to_string()),
        Quota::Cost => (
            t.cost.normalize().to_string(),
            tier.cost.unwrap_or_default().normalize().to_string(),
        ),
    };
    Refusal::Quota {
        quota,
        used,
        limit,
        resets_at: month.resets_at(),
    }
}

/// The `x-quota-*` headers for `tr`'s limits, totals `t` and reservations `r`. `remaining` is
/// the limit less what is used; under hard enforcement what calls in flight hold is shown apart
/// (`x-quota-tokens-reserved`, `x-quota-cost-reserved`).
pub fn quota_headers(tr: &TierRuntime, t: &Totals, r: &Reserved) -> Vec<(HeaderName, HeaderValue)> {
    let tier = &tr.tier;
    let mut h = Vec::with_capacity(10);
    if tier.hard_budget() {
        if tier.tokens.is_some() {
            h.push((TOKENS_RESERVED, HeaderValue::from(r.tokens)));
        }
        if tier.cost.is_some()
            && let Ok(v) = HeaderValue::from_str(&r.cost.normalize().to_string())
        {
            h.push((COST_RESERVED, v));
        }
    }
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
const TOKENS_RESERVED: HeaderName = HeaderName::from_static("x-quota-tokens-reserved");
const COST_RESERVED: HeaderName = HeaderName::from_static("x-quota-cost-reserved");

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
