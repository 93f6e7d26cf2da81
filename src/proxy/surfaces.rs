//! Billable surfaces that are not model calls: a cached content is billed for its storage when
//! it is created, for its `usageMetadata.totalTokenCount` and the TTL Gemini gave it (its
//! `expireTime` minus its `createTime`), as a `cache_storage` record.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Proxy;
use crate::identity::KeyEntry;
use crate::ledger::{CacheAction, Details, Record, Tags};
use crate::metering::usage::{CacheStored, cache_storage_usage};
use crate::settle::Against;

/// Seconds between two RFC 3339 times of a resource (0 when either is missing or unreadable).
fn seconds_between(from: Option<&str>, to: Option<&str>) -> u64 {
    let parse = |s: Option<&str>| {
        s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    match (parse(from), parse(to)) {
        (Some(a), Some(b)) => u64::try_from((b - a).num_seconds()).unwrap_or(0),
        _ => 0,
    }
}

/// Bills the storage of a cached content the upstream just created (its answer `v`). Waits
/// (without blocking) for an alert the record fired to reach the disk.
pub async fn bill_cache_created(proxy: &Proxy, key: KeyEntry, tags: Option<Arc<Tags>>, v: &Value) {
    let Some(user) = proxy.registry.user_of(key) else {
        return;
    };
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
    let model = model.strip_prefix("models/").unwrap_or(model);
    let stored = CacheStored {
        action: CacheAction::Create,
        cache: v.get("name").and_then(Value::as_str).map(Into::into),
        key_id: proxy.registry.key_id(key).into(),
        model: Arc::from(model),
        tags,
        token_count: v
            .pointer("/usageMetadata/totalTokenCount")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        ttl_seconds: seconds_between(
            v.get("createTime").and_then(Value::as_str),
            v.get("expireTime").and_then(Value::as_str),
        ),
    };
    let rt = proxy.live.load();
    let Some((details, cost)) = cache_storage_usage(&rt.config.pricing, stored) else {
        // Admission refuses a cache for a model without a storage price; a reload in between
        // leaves it unpriced.
        tracing::warn!(model, "cache storage not billed: the model has no storage price");
        return;
    };
    let s = &proxy.settler;
    let now = s.clock.now();
    let rec = Record {
        id: s.ids.next(now),
        user_id: user.id_arc(),
        tokens: 0,
        messages: 0,
        bytes: 0,
        cost,
        details: Details::CacheStorage(details),
        created_at: now,
    };
    if let Some(wait) = s.settle(key, rec, Against::Nothing) {
        wait.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_of_a_cache() {
        assert_eq!(
            seconds_between(Some("2026-12-03T10:00:00.123456Z"), Some("2026-12-03T11:00:00.123456Z")),
            3600
        );
        assert_eq!(seconds_between(None, Some("2026-12-03T11:00:00Z")), 0);
        assert_eq!(
            seconds_between(Some("2026-12-03T11:00:00Z"), Some("2026-12-03T10:00:00Z")),
            0
        );
    }
}
