//! The `current` body (this month's totals against the plan): answered by
//! `GET /api/usage/current`, sent by the usage stream after every change, shown by the admin API.

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};

use crate::app::App;
use crate::clock::{Month, rfc3339};
use crate::identity::User;

fn pct(used: Decimal, limit: Decimal) -> Value {
    if limit.is_zero() {
        return json!(100.0);
    }
    let p = (used * Decimal::from(100) / limit).round_dp(2);
    json!(p.to_f64().unwrap_or(0.0))
}

/// [`current`], in cluster mode with the totals read from Redis first (every replica's usage);
/// with Redis unreachable, the last totals this replica saw.
pub async fn current_shared(app: &App, user: &User) -> Value {
    if let Some(c) = &app.cluster {
        c.quotas.refresh(&c.redis, user, Month::of(app.clock.now())).await;
    }
    current(app, user)
}

/// The `current` body: this month's totals against the plan.
pub fn current(app: &App, user: &User) -> Value {
    let now = app.clock.now();
    let month = Month::of(now);
    let (t, reserved) = user.usage.snapshot_reserved(month);
    let rt = app.live.load();
    let tier_name = user.tier();
    let tier = rt.tier_by_id(user.tier_id()).map(|t| &t.tier);
    let lim_u = |f: fn(&crate::config::Tier) -> Option<u64>| tier.and_then(f);
    let limits = json!({
        "messages": lim_u(|t| t.messages),
        "tokens": lim_u(|t| t.tokens),
        "bytes": lim_u(|t| t.bytes),
        "cost": tier.and_then(|t| t.cost).map(|c| c.normalize().to_string()),
        "requests_per_minute": tier.and_then(|t| t.requests_per_minute).map(|n| n.get()),
        "tokens_per_minute": lim_u(|t| t.tokens_per_minute),
        "models": tier.and_then(|t| t.models.clone()),
    });
    let p = |used: u64, l: Option<u64>| {
        l.map(|l| pct(Decimal::from(used), Decimal::from(l)))
            .unwrap_or(Value::Null)
    };
    let percentage = json!({
        "messages": p(t.messages, lim_u(|t| t.messages)),
        "tokens": p(t.tokens, lim_u(|t| t.tokens)),
        "bytes": p(t.bytes, lim_u(|t| t.bytes)),
        "cost": tier.and_then(|tr| tr.cost).map(|l| pct(t.cost, l)).unwrap_or(Value::Null),
    });
    json!({
        "user_id": user.id(),
        "tier": &*tier_name,
        "month": month.to_string(),
        "resets_at": rfc3339(month.resets_at()),
        "current_month": t.to_json(),
        // Held by calls in flight under hard enforcement, replaced by their usage when they end.
        "reserved": {
            "tokens": reserved.tokens,
            "cost": reserved.cost.normalize().to_string(),
        },
        "limits": limits,
        "percentage": percentage,
    })
}
