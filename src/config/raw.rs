//! Phase one: the file as written. Every struct rejects unknown keys, and every field that has a
//! default is an `Option`, so `validate` alone decides defaults and meaning.

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub pricing: RawPricing,
    #[serde(default)]
    pub tiers: BTreeMap<String, RawTier>,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default)]
    pub routes: RawRoutes,
    pub cluster: Option<RawCluster>,
}

/// `[cluster]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawCluster {
    pub redis_url_env: Option<String>,
    pub postgres_url_env: Option<String>,
    pub on_redis_unavailable: Option<String>,
}

/// `[routes]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawRoutes {
    pub allow_unmetered: Option<Vec<String>>,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawServer {
    pub listen: Option<String>,
    pub admin_token_env: Option<String>,
    pub max_request_bytes: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub public_url: Option<String>,
    pub tls: Option<RawTls>,
}

/// `[server.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTls {
    pub cert_path: String,
    pub key_path: String,
    pub client_ca_path: Option<String>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawUpstream {
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
}

/// `[storage]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawStorage {
    pub path: Option<String>,
    pub flush_interval_ms: Option<u64>,
    pub retention_months: Option<u32>,
}

/// `[pricing]` and `[pricing.models.*]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawPricing {
    pub message_sent: Option<Money>,
    pub ai_response_per_token: Option<Money>,
    pub file_upload_per_byte: Option<Money>,
    pub batch_discount: Option<Money>,
    pub grounding_per_request: Option<Money>,
    #[serde(default)]
    pub models: BTreeMap<String, RawModelPrice>,
}

/// `[pricing.models."<model>"]`. The two base rates are optional here only so that `validate`
/// can say which is missing (they may be left out of a per-unit model's entry).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawModelPrice {
    pub input_per_million: Option<Money>,
    pub output_per_million: Option<Money>,
    pub cached_input_per_million: Option<Money>,
    pub max_output_tokens: Option<u64>,
    pub input_per_million_by_modality: Option<BTreeMap<String, Money>>,
    pub cached_input_per_million_by_modality: Option<BTreeMap<String, Money>>,
    pub output_per_million_by_modality: Option<BTreeMap<String, Money>>,
    pub long_context_threshold: Option<u64>,
    pub long_input_per_million: Option<Money>,
    pub long_output_per_million: Option<Money>,
    pub long_cached_input_per_million: Option<Money>,
    pub long_input_per_million_by_modality: Option<BTreeMap<String, Money>>,
    pub long_cached_input_per_million_by_modality: Option<BTreeMap<String, Money>>,
    pub long_output_per_million_by_modality: Option<BTreeMap<String, Money>>,
    pub cache_storage_per_million_per_hour: Option<Money>,
    pub per_image: Option<Money>,
    pub per_second: Option<Money>,
    pub batch_discount: Option<Money>,
    pub grounding_per_request: Option<Money>,
}

/// `[tiers.<name>]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTier {
    pub messages: Option<u64>,
    pub tokens: Option<u64>,
    pub bytes: Option<u64>,
    pub cost: Option<Money>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub models: Option<Vec<String>>,
    pub enforcement: Option<String>,
    pub min_output_tokens: Option<u64>,
}

/// `[alerts]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawAlerts {
    // i64 rather than u8 so an out-of-range value gets our message, with the others collected.
    pub thresholds: Option<Vec<i64>>,
    pub webhook_url: Option<String>,
    pub webhook_secret_env: Option<String>,
    pub smtp: Option<RawSmtp>,
}

/// `[alerts.smtp]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(super) struct RawSmtp {
    pub host: String,
    pub port: Option<u16>,
    pub from: String,
    pub starttls: Option<bool>,
    pub username_env: Option<String>,
    pub password_env: Option<String>,
}

/// An amount of money, accepted only as a TOML string and parsed exactly. The sign is kept so
/// that `validate` can report a negative amount together with every other problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Money(pub Decimal);

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MoneyVisitor)
    }
}

struct MoneyVisitor;

impl Visitor<'_> for MoneyVisitor {
    type Value = Money;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("money as a string such as \"5.00\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
        parse_money(v).map(Money).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
        // Reject even floats that look harmless: 0.1 in the file is already not 0.1 in memory.
        Err(E::custom(format!(
            "money must be a string such as \"5.00\", not a float (floats cannot hold cents exactly); quote it: \"{v}\""
        )))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
        Err(E::custom(format!(
            "money must be a string such as \"5.00\", not an integer; quote it: \"{v}\""
        )))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
        Err(E::custom(format!(
            "money must be a string such as \"5.00\", not an integer; quote it: \"{v}\""
        )))
    }
}

/// Strict decimal syntax: `-?digits(.digits)?`. rust_decimal alone would also take `+5`, `1_0`,
/// `.5` or `5.`; none of those belong in a price list.
fn parse_money(text: &str) -> Result<Decimal, String> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, frac) = match digits.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(format!(
            "invalid money {text:?}: expected a decimal number such as \"5.00\""
        ));
    }
    // from_str_exact refuses to round, so a price with too many digits errors instead of
    // silently changing.
    Decimal::from_str_exact(text).map_err(|e| format!("invalid money {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_money;
    use rust_decimal::Decimal;

    #[test]
    fn money_syntax_is_strict() {
        assert_eq!(parse_money("5.00"), Ok(Decimal::new(500, 2)));
        assert_eq!(parse_money("0.00000001"), Ok(Decimal::new(1, 8)));
        assert_eq!(parse_money("-1"), Ok(Decimal::new(-1, 0)));
        for bad in ["", "+5", ".5", "5.", "1_0", "1e3", " 5", "5 ", "abc", "-", "1.2.3"] {
            assert!(parse_money(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_money("0.00000000000000000000000000001").is_err());
    }
}
