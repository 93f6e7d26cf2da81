//! cachedContents: create, list, get, patch (ttl / expireTime) and delete. A cache vanishes
//! once its expireTime has passed. A missing cache answers 403 PERMISSION_DENIED as Google does.

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::body::MockBody;
use super::store::{Collection, empty_ok, error_status, invalid, pretty};
use super::{random_id, wire};

/// A cachedContent resource, fields in wire order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Cache {
    name: String,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
    create_time: String,
    update_time: String,
    expire_time: String,
    usage_metadata: CacheUsage,
    #[serde(skip)]
    expires_at: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct CacheUsage {
    total_token_count: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    model: Option<String>,
    display_name: Option<String>,
    ttl: Option<String>,
    expire_time: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PatchBody {
    ttl: Option<String>,
    expire_time: Option<String>,
}

/// Every cachedContent of one mock.
#[derive(Debug, Default)]
pub(crate) struct Caches {
    items: Collection<Cache>,
}

impl Caches {
    /// `POST cachedContents`; usage is the mock's prompt rule over the whole body.
    pub(crate) fn create(&self, body: &[u8]) -> Response<MockBody> {
        let Ok(req) = serde_json::from_slice::<CreateBody>(body) else {
            return invalid("Invalid JSON payload received.");
        };
        let Some(model) = req.model.filter(|m| !m.is_empty()) else {
            return invalid("CachedContent must specify a model.");
        };
        let model = if model.starts_with("models/") || model.starts_with("tunedModels/") {
            model
        } else {
            format!("models/{model}")
        };
        let now = wire::now_micros();
        let expires = match expiry(now, req.ttl.as_deref(), req.expire_time.as_deref()) {
            Ok(e) => e.unwrap_or((now.0 + 3600, now.1)),
            Err(r) => return r,
        };
        let id = random_id(12).to_ascii_lowercase();
        let created = wire::rfc3339(now.0, now.1);
        let cache = Cache {
            name: format!("cachedContents/{id}"),
            model,
            display_name: req.display_name,
            update_time: created.clone(),
            create_time: created,
            expire_time: wire::rfc3339(expires.0, expires.1),
            usage_metadata: CacheUsage {
                total_token_count: (body.len() as u64).div_ceil(4).max(1),
            },
            expires_at: expires.0,
        };
        self.items.insert(&id, cache.clone());
        pretty(StatusCode::OK, &cache)
    }

    fn drop_expired(&self) {
        let now = wire::unix_now();
        self.items.retain(|c| c.expires_at > now);
    }

    /// `GET cachedContents`.
    pub(crate) fn list(&self, query: Option<&str>) -> Response<MockBody> {
        self.drop_expired();
        self.items.list_response("cachedContents", query)
    }

    /// `GET cachedContents/{id}`.
    pub(crate) fn get(&self, id: &str) -> Response<MockBody> {
        self.drop_expired();
        match self.items.get(id) {
            Some(c) => pretty(StatusCode::OK, &c),
            None => missing(),
        }
    }

    /// `PATCH cachedContents/{id}`: a new `ttl` or `expireTime`.
    pub(crate) fn patch(&self, id: &str, body: &[u8]) -> Response<MockBody> {
        self.drop_expired();
        let Ok(req) = serde_json::from_slice::<PatchBody>(body) else {
            return invalid("Invalid JSON payload received.");
        };
        let now = wire::now_micros();
        let expires = match expiry(now, req.ttl.as_deref(), req.expire_time.as_deref()) {
            Ok(Some(e)) => e,
            Ok(None) => return invalid("Either ttl or expireTime must be set."),
            Err(r) => return r,
        };
        let updated = self.items.update(id, |c| {
            c.update_time = wire::rfc3339(now.0, now.1);
            c.expire_time = wire::rfc3339(expires.0, expires.1);
            c.expires_at = expires.0;
            c.clone()
        });
        match updated {
            Some(c) => pretty(StatusCode::OK, &c),
            None => missing(),
        }
    }

    /// `DELETE cachedContents/{id}`.
    pub(crate) fn delete(&self, id: &str) -> Response<MockBody> {
        self.drop_expired();
        match self.items.remove(id) {
            Some(_) => empty_ok(),
            None => missing(),
        }
    }
}

fn missing() -> Response<MockBody> {
    error_status(
        StatusCode::FORBIDDEN,
        "CachedContent not found (or permission denied)",
        "PERMISSION_DENIED",
    )
}

/// The expiry a request asks for (`ttl` wins over `expireTime`), if any.
#[allow(clippy::result_large_err)]
fn expiry(
    now: (u64, u32),
    ttl: Option<&str>,
    expire_time: Option<&str>,
) -> Result<Option<(u64, u32)>, Response<MockBody>> {
    if let Some(t) = ttl {
        let Some((secs, micros)) = parse_duration(t) else {
            return Err(invalid(
                "Invalid value at 'ttl': expected a duration such as \"3600s\".",
            ));
        };
        let total = u64::from(now.1) + u64::from(micros);
        let secs = now.0.saturating_add(secs).saturating_add(total / 1_000_000);
        if secs > MAX_TIME {
            return Err(invalid("Invalid value at 'ttl': too far in the future."));
        }
        return Ok(Some((secs, (total % 1_000_000) as u32)));
    }
    match expire_time {
        None => Ok(None),
        Some(e) => match parse_rfc3339(e) {
            Some(t) => Ok(Some(t)),
            None => Err(invalid(
                "Invalid value at 'expire_time': expected an RFC 3339 timestamp.",
            )),
        },
    }
}

/// 9999-12-31T23:59:59Z, the last instant protobuf timestamps allow.
const MAX_TIME: u64 = 253_402_300_799;

/// A protobuf-JSON duration: `"3600s"` or `"1.5s"`.
pub(crate) fn parse_duration(s: &str) -> Option<(u64, u32)> {
    let n = s.strip_suffix('s')?;
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = whole.parse().ok()?;
    let micros = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    Some((secs, micros))
}

/// A UTC RFC 3339 timestamp (`2026-01-02T03:04:05.123Z`) as Unix seconds and microseconds.
pub(crate) fn parse_rfc3339(s: &str) -> Option<(u64, u32)> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix('z'))?;
    let (date, time) = s.split_once(['T', 't'])?;
    let mut d = date.splitn(3, '-').map(str::parse::<u64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(str::parse::<u64>);
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    let days = wire::days_from_civil(y, m, day);
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss, micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_timestamps() {
        assert_eq!(parse_duration("3600s"), Some((3600, 0)));
        assert_eq!(parse_duration("1.5s"), Some((1, 500_000)));
        assert_eq!(parse_duration("5m"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_rfc3339("2026-11-27T17:20:00Z"), Some((1_795_800_000, 0)));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00.000005Z"), Some((951_782_400, 5)));
        assert_eq!(parse_rfc3339("2026-11-27T17:20:00+01:00"), None);
        assert_eq!(parse_rfc3339("99999999999999-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z"), Some((MAX_TIME, 0)));
        assert!(expiry((1, 0), Some("18446744073709551615s"), None).is_err());
        let (s, us) = (1_795_800_000, 123_456);
        assert_eq!(parse_rfc3339(&wire::rfc3339(s, us)), Some((s, us)));
    }
}
