//! Quota alerts as the ledger keeps them: the alert, its deliveries, and their stored (JSON)
//! forms. Where they live in sled (fired marks, the outbox, the delivery log) is the store's
//! business, see [`super::store`].
//!
//! An alert is written by the recorder in the log frame of the usage record that crossed its
//! threshold, and staged into sled in the batch that applies that record's aggregates (again on
//! replay after a crash): the fired mark and one outbox entry per channel exist exactly when the
//! record does.
//!
//! Ids are derived from what the alert is about (user, the user's creation time, month, quota,
//! threshold, channel), never random: should an alert ever be produced twice, both copies carry
//! the same id, and a receiver that deduplicates on it sees one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::record::{format_id, parse_id};
use crate::clock::{Month, rfc3339, rfc3339_ms};

/// How long after an alert its first delivery attempt is made. The alert is durable before the
/// request that crossed the line completes; this grace keeps the first send clear of that moment,
/// so a crash right after the crossing finds the alert unsent (and it goes out once after the
/// restart) rather than sent with its removal from the outbox not yet on disk.
pub const FIRST_ATTEMPT_DELAY: chrono::Duration = chrono::Duration::seconds(1);

/// A limited monthly quota an alert can be about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    /// Messages per month.
    Messages,
    /// Tokens per month.
    Tokens,
    /// Uploaded bytes per month.
    Bytes,
    /// Spend per month (USD).
    Cost,
}

impl Quota {
    /// Every quota, in [`Quota::index`] order.
    pub const ALL: [Quota; 4] = [Quota::Messages, Quota::Tokens, Quota::Bytes, Quota::Cost];

    /// The wire name (`messages`, `tokens`, `bytes`, `cost`), as in the tier config.
    pub fn as_str(self) -> &'static str {
        match self {
            Quota::Messages => "messages",
            Quota::Tokens => "tokens",
            Quota::Bytes => "bytes",
            Quota::Cost => "cost",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Quota::ALL.into_iter().find(|q| q.as_str() == s)
    }

    /// Position in [`Quota::ALL`].
    pub fn index(self) -> usize {
        match self {
            Quota::Messages => 0,
            Quota::Tokens => 1,
            Quota::Bytes => 2,
            Quota::Cost => 3,
        }
    }
}

/// Where an alert is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// A signed JSON `POST` to `alerts.webhook_url`.
    Webhook,
    /// A mail to the user's email through `alerts.smtp`.
    Email,
}

impl Channel {
    /// The wire name (`webhook`, `email`).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Webhook => "webhook",
            Channel::Email => "email",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "webhook" => Some(Channel::Webhook),
            "email" => Some(Channel::Email),
            _ => None,
        }
    }
}

/// One threshold of one quota first reached by one user in one month.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Stable id (`alrt_` and 32 hex digits), see [`Alert::make_id`].
    pub id: String,
    /// The user.
    pub user_id: Arc<str>,
    /// The user's creation time (Unix seconds): tells a deleted user from a new one of the
    /// same id.
    pub user_created: i64,
    /// The user's tier when the threshold was reached.
    pub tier: String,
    /// The quota.
    pub quota: Quota,
    /// The threshold, in percent.
    pub threshold: u8,
    /// This month's use of the quota once the crossing record counted (whole for every quota
    /// but cost).
    pub used: Decimal,
    /// The tier's limit.
    pub limit: Decimal,
    /// The month.
    pub month: Month,
    /// When the record that crossed the line was settled.
    pub at: DateTime<Utc>,
    /// The record that crossed the line.
    pub record_id: u128,
    /// The address mailed, when the email channel is used.
    pub email: Option<String>,
    /// The channels it goes out on (one outbox entry each).
    pub channels: Vec<Channel>,
}

impl Alert {
    /// The id of an alert: a digest of what it is about, so the same crossing always has the
    /// same id.
    pub fn make_id(user: &str, user_created: i64, month: Month, quota: Quota, threshold: u8) -> String {
        let mut h = Sha256::new();
        for part in [
            user,
            &user_created.to_string(),
            &month.to_string(),
            quota.as_str(),
            &threshold.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        format!("alrt_{}", hex::encode(&h.finalize()[..16]))
    }

    /// The id of the alert's delivery on `channel` (`dlv_` and 32 hex digits): what receivers
    /// deduplicate on (`x-gemini-meter-delivery`, the mail's `Message-ID`).
    pub fn delivery_id(&self, channel: Channel) -> String {
        let mut h = Sha256::new();
        h.update(self.id.as_bytes());
        h.update([0]);
        h.update(channel.as_str().as_bytes());
        format!("dlv_{}", hex::encode(&h.finalize()[..16]))
    }

    /// The webhook body of the contract: `event`, `id`, `user_id`, `tier`, `quota`,
    /// `threshold`, `used`, `limit`, `month`, `at`. `used` and `limit` are JSON numbers for
    /// messages, tokens and bytes, and exact decimal strings for cost (money is never a float).
    pub fn body(&self) -> Value {
        json!({
            "event": "quota.threshold",
            "id": self.id,
            "user_id": &*self.user_id,
            "tier": self.tier,
            "quota": self.quota.as_str(),
            "threshold": self.threshold,
            "used": self.amount(self.used),
            "limit": self.amount(self.limit),
            "month": self.month.to_string(),
            "at": rfc3339_ms(self.at),
        })
    }

    /// An amount of this alert's quota as JSON (see [`Alert::body`]).
    pub fn amount(&self, v: Decimal) -> Value {
        match (self.quota, v.to_u64()) {
            (Quota::Cost, _) | (_, None) => Value::String(v.normalize().to_string()),
            (_, Some(n)) => Value::from(n),
        }
    }

    pub(crate) fn to_stored(&self) -> Value {
        json!({
            "id": self.id,
            "user_id": &*self.user_id,
            "user_created": self.user_created,
            "tier": self.tier,
            "quota": self.quota.as_str(),
            "threshold": self.threshold,
            "used": self.used.normalize().to_string(),
            "limit": self.limit.normalize().to_string(),
            "month": self.month.to_string(),
            "at": rfc3339_ms(self.at),
            "record_id": format_id(self.record_id),
            "email": self.email,
            "channels": self.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        })
    }

    pub(crate) fn from_stored(v: &Value) -> Option<Alert> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        Some(Alert {
            id: s("id")?.to_string(),
            user_id: Arc::from(s("user_id")?),
            user_created: v.get("user_created")?.as_i64()?,
            tier: s("tier")?.to_string(),
            quota: Quota::parse(s("quota")?)?,
            threshold: u8::try_from(v.get("threshold")?.as_u64()?).ok()?,
            used: s("used")?.parse().ok()?,
            limit: s("limit")?.parse().ok()?,
            month: Month::parse(s("month")?)?,
            at: parse_time(s("at")?)?,
            record_id: parse_id(s("record_id")?)?,
            email: s("email").map(str::to_string),
            channels: v
                .get("channels")?
                .as_array()?
                .iter()
                .map(|c| c.as_str().and_then(Channel::parse))
                .collect::<Option<Vec<_>>>()?,
        })
    }

    /// The alert as the admin API lists it: the webhook body plus the record that crossed the
    /// line and when the quota resets.
    pub fn to_json(&self) -> Value {
        let mut v = self.body();
        if let Some(m) = v.as_object_mut() {
            m.remove("event");
            m.insert("record_id".into(), format_id(self.record_id).into());
            m.insert("resets_at".into(), rfc3339(self.month.resets_at()).into());
        }
        v
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// In the outbox, to be (re)tried at `next_attempt_at`.
    Pending,
    /// Accepted by the receiver.
    Sent,
    /// Given up (a day passed, or it can never succeed).
    Failed,
}

impl DeliveryStatus {
    /// The wire name (`pending`, `sent`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "sent" => Some(DeliveryStatus::Sent),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// One alert on one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Stable id ([`Alert::delivery_id`]).
    pub id: String,
    /// The channel.
    pub channel: Channel,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (pending deliveries).
    pub next_attempt_at: DateTime<Utc>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was sent or given up.
    pub finished_at: Option<DateTime<Utc>>,
    /// The alert.
    pub alert: Alert,
}

impl Delivery {
    /// A fresh outbox entry, due [`FIRST_ATTEMPT_DELAY`] after the alert.
    pub fn new(alert: &Alert, channel: Channel) -> Self {
        Delivery {
            id: alert.delivery_id(channel),
            channel,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: alert.at + FIRST_ATTEMPT_DELAY,
            last_error: None,
            finished_at: None,
            alert: alert.clone(),
        }
    }

    /// The delivery as the admin API lists it (without the alert it belongs to).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("channel".into(), self.channel.as_str().into());
        m.insert("status".into(), self.status.as_str().into());
        m.insert("attempts".into(), self.attempts.into());
        if self.status == DeliveryStatus::Pending {
            m.insert("next_attempt_at".into(), rfc3339_ms(self.next_attempt_at).into());
        }
        m.insert("last_error".into(), self.last_error.clone().into());
        m.insert("finished_at".into(), self.finished_at.map(rfc3339_ms).into());
        if self.channel == Channel::Email {
            m.insert("to".into(), self.alert.email.clone().into());
        }
        Value::Object(m)
    }

    pub(crate) fn to_stored(&self) -> Value {
        let mut v = self.to_json();
        if let Some(m) = v.as_object_mut() {
            m.insert("next_attempt_at".into(), rfc3339_ms(self.next_attempt_at).into());
            m.insert("alert".into(), self.alert.to_stored());
        }
        v
    }

    pub(crate) fn from_stored(v: &Value) -> Option<Delivery> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        Some(Delivery {
            id: s("id")?.to_string(),
            channel: Channel::parse(s("channel")?)?,
            status: DeliveryStatus::parse(s("status")?)?,
            attempts: u32::try_from(v.get("attempts")?.as_u64()?).ok()?,
            next_attempt_at: parse_time(s("next_attempt_at")?)?,
            last_error: s("last_error").map(str::to_string),
            finished_at: match s("finished_at") {
                Some(t) => Some(parse_time(t)?),
                None => None,
            },
            alert: Alert::from_stored(v.get("alert")?)?,
        })
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// The alerts fired by one record, as written in its log frame (empty when none).
pub(super) fn encode_alerts(alerts: &[Alert]) -> Vec<u8> {
    if alerts.is_empty() {
        return Vec::new();
    }
    let list: Vec<Value> = alerts.iter().map(Alert::to_stored).collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

/// Reads [`encode_alerts`] back; an entry that cannot be decoded is logged and skipped.
pub(super) fn decode_alerts(bytes: &[u8]) -> Vec<Alert> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let list: Vec<Value> = serde_json::from_slice(bytes).unwrap_or_default();
    list.iter()
        .filter_map(|v| {
            let a = Alert::from_stored(v);
            if a.is_none() {
                tracing::error!("undecodable alert in the record log; skipped");
            }
            a
        })
        .collect()
}

/// An alert for tests of the alert store and its keys.
#[cfg(test)]
pub(crate) fn test_alert(quota: Quota, threshold: u8, used: Decimal, limit: Decimal) -> Alert {
    let month = Month(202611);
    Alert {
        id: Alert::make_id("ann", 1_700_000_000, month, quota, threshold),
        user_id: Arc::from("ann"),
        user_created: 1_700_000_000,
        tier: "free".into(),
        quota,
        threshold,
        used,
        limit,
        month,
        at: chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 28, 10, 0, 0).unwrap(),
        record_id: 42,
        email: Some("ann@example.com".into()),
        channels: vec![Channel::Webhook, Channel::Email],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_alert as alert;

    #[test]
    fn ids_are_stable_and_distinct() {
        let m = Month(202611);
        let a = Alert::make_id("ann", 1, m, Quota::Messages, 80);
        assert_eq!(a, Alert::make_id("ann", 1, m, Quota::Messages, 80));
        assert!(a.starts_with("alrt_") && a.len() == 37, "{a}");
        assert_ne!(a, Alert::make_id("ann", 1, m, Quota::Messages, 95));
        assert_ne!(a, Alert::make_id("ann", 1, m, Quota::Tokens, 80));
        assert_ne!(
            a,
            Alert::make_id("ann", 2, m, Quota::Messages, 80),
            "a re-created user is a new user"
        );
        assert_ne!(a, Alert::make_id("ann", 1, m.next(), Quota::Messages, 80));
        let al = alert(Quota::Messages, 80, Decimal::from(8), Decimal::from(10));
        assert_ne!(al.delivery_id(Channel::Webhook), al.delivery_id(Channel::Email));
    }

    #[test]
    fn body_has_exactly_the_contract_fields() {
        let a = alert(Quota::Messages, 80, Decimal::from(8), Decimal::from(10));
        let b = a.body();
        let mut keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "at",
                "event",
                "id",
                "limit",
                "month",
                "quota",
                "threshold",
                "tier",
                "used",
                "user_id"
            ]
        );
        assert_eq!(b["event"], "quota.threshold");
        assert_eq!(b["used"], 8);
        assert_eq!(b["limit"], 10);
        assert_eq!(b["threshold"], 80);
        assert_eq!(b["month"], "2026-11");
        assert_eq!(b["at"], "2026-11-28T10:00:00.000Z");
        let c = alert(Quota::Cost, 95, "4.75".parse().unwrap(), "5.00".parse().unwrap());
        assert_eq!(c.body()["used"], "4.75");
        assert_eq!(c.body()["limit"], "5");
    }

    #[test]
    fn stored_forms_round_trip() {
        let a = alert(Quota::Cost, 95, "4.75".parse().unwrap(), "5".parse().unwrap());
        assert_eq!(Alert::from_stored(&a.to_stored()), Some(a.clone()));
        let mut d = Delivery::new(&a, Channel::Email);
        d.attempts = 3;
        d.last_error = Some("HTTP 503".into());
        assert_eq!(Delivery::from_stored(&d.to_stored()), Some(d.clone()));
        d.status = DeliveryStatus::Sent;
        d.finished_at = Some(a.at);
        assert_eq!(Delivery::from_stored(&d.to_stored()), Some(d));
    }
}
