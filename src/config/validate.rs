//! Phase two: turn the raw file into a [`Config`], filling defaults and collecting every problem
//! rather than stopping at the first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use rust_decimal::Decimal;

use super::raw::{
    Money, RawAlerts, RawConfig, RawModelPrice, RawPricing, RawServer, RawSmtp, RawStorage, RawTier, RawTls,
    RawUpstream,
};
use super::{
    AlertsConfig, Config, DEFAULT_MIN_OUTPUT_TOKENS, Enforcement, LongContext, Modality, ModalityRates, ModelPrice,
    Pricing, Problem, ServerConfig, SmtpConfig, StorageConfig, Tier, TlsConfig, UpstreamConfig, model_id, toml_key,
};

/// The `long_*` keys of a model entry, gathered for [`Validator::long_context`].
struct RawLong {
    input: Option<Money>,
    output: Option<Money>,
    cached: Option<Money>,
    input_by_modality: Option<BTreeMap<String, Money>>,
    cached_by_modality: Option<BTreeMap<String, Money>>,
    output_by_modality: Option<BTreeMap<String, Money>>,
}

/// hyper refuses (panics on) a header buffer smaller than this.
const MIN_HEADER_BYTES: usize = 8192;
const MAX_FLUSH_INTERVAL_MS: u64 = 10_000;

/// Validates the raw file; on failure returns every problem found, never an empty list.
pub(super) fn validate(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut v = Validator::default();
    let config = Config {
        server: v.server(raw.server),
        upstream: v.upstream(raw.upstream),
        storage: v.storage(raw.storage),
        pricing: v.pricing(raw.pricing),
        tiers: v.tiers(raw.tiers),
        alerts: v.alerts(raw.alerts),
        routes: v.routes(raw.routes),
        cluster: raw.cluster.map(|c| v.cluster(c)),
    };
    v.output_caps(&config.pricing, &config.tiers);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        Err(v.problems)
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn routes(&mut self, raw: super::raw::RawRoutes) -> super::RoutesConfig {
        let mut allow_unmetered = Vec::new();
        for (i, s) in raw.allow_unmetered.unwrap_or_default().iter().enumerate() {
            match crate::policy::Allowed::parse(s) {
                Ok(a) => allow_unmetered.push(a),
                Err(why) => self.problem(format!("routes.allow_unmetered[{i}]"), why),
            }
        }
        super::RoutesConfig { allow_unmetered }
    }
}

impl Validator {
    fn cluster(&mut self, raw: super::raw::RawCluster) -> super::ClusterConfig {
        let on_redis_unavailable = match raw.on_redis_unavailable.as_deref() {
            None | Some("deny") => super::OnRedisUnavailable::Deny,
            Some(other) => {
                self.problem(
                    "cluster.on_redis_unavailable",
                    format!(
                        "{other:?} is not supported: the only choice is \"deny\" (503 + Retry-After; admitting on per-replica counters would multiply every limit by the number of replicas)"
                    ),
                );
                super::OnRedisUnavailable::Deny
            }
        };
        super::ClusterConfig {
            redis_url_env: self.env_name(
                "cluster.redis_url_env",
                raw.redis_url_env,
                "GEMINI_METER_REDIS_URL".into(),
            ),
            postgres_url_env: self.env_name(
                "cluster.postgres_url_env",
                raw.postgres_url_env,
                "GEMINI_METER_DATABASE_URL".into(),
            ),
            on_redis_unavailable,
        }
    }
}

impl Validator {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let d = ServerConfig::default();
        let listen = match raw.listen {
            None => d.listen,
            Some(text) => text.parse::<SocketAddr>().unwrap_or_else(|_| {
                self.problem(
                    "server.listen",
                    format!("{text:?} is not an IP address and port such as \"127.0.0.1:8080\" or \"[::]:8080\""),
                );
                d.listen
            }),
        };
        let public_url = raw
            .public_url
            .map(|text| match parse_http_url(&text).and_then(|uri| base_url(&uri)) {
                Ok(uri) => {
                    let path = uri.path().trim_end_matches('/');
                    format!("{}://{}{path}", scheme(&uri), authority(&uri))
                }
                Err(why) => {
                    self.problem("server.public_url", why);
                    text
                }
            });
        ServerConfig {
            listen,
            admin_token_env: self.env_name("server.admin_token_env", raw.admin_token_env, d.admin_token_env),
            max_request_bytes: self.at_least(
                "server.max_request_bytes",
                raw.max_request_bytes,
                1,
                d.max_request_bytes,
            ),
            // 0 is allowed: stop at once without waiting for in-flight requests.
            drain_timeout: raw.drain_timeout_ms.map_or(d.drain_timeout, Duration::from_millis),
            header_read_timeout: self.millis(
                "server.header_read_timeout_ms",
                raw.header_read_timeout_ms,
                d.header_read_timeout,
            ),
            max_connections: self.at_least("server.max_connections", raw.max_connections, 1, d.max_connections),
            max_header_bytes: self.at_least(
                "server.max_header_bytes",
                raw.max_header_bytes,
                MIN_HEADER_BYTES,
                d.max_header_bytes,
            ),
            public_url,
            tls: raw.tls.map(|t| self.tls(t)),
        }
    }

    fn tls(&mut self, raw: RawTls) -> TlsConfig {
        let mut path = |key: &str, text: String| {
            if text.trim().is_empty() {
                self.problem(format!("server.tls.{key}"), "must not be empty");
            }
            PathBuf::from(text)
        };
        TlsConfig {
            cert_path: path("cert_path", raw.cert_path),
            key_path: path("key_path", raw.key_path),
            client_ca_path: raw.client_ca_path.map(|p| path("client_ca_path", p)),
        }
    }

    fn upstream(&mut self, raw: RawUpstream) -> UpstreamConfig {
        let d = UpstreamConfig::default();
        let base_url = match raw.base_url {
            None => d.base_url.clone(),
            Some(text) => match parse_http_url(&text).and_then(|uri| base_url(&uri)) {
                Ok(uri) => uri,
                Err(why) => {
                    self.problem("upstream.base_url", why);
                    d.base_url.clone()
                }
            },
        };
        let read_timeout = match raw.read_timeout_ms {
            None => None,
            Some(0) => {
                self.problem(
                    "upstream.read_timeout_ms",
                    "must be at least 1; remove the key for no read timeout",
                );
                None
            }
            Some(ms) => Some(Duration::from_millis(ms)),
        };
        UpstreamConfig {
            base_url,
            api_key_env: self.env_name("upstream.api_key_env", raw.api_key_env, d.api_key_env),
            connect_timeout: self.millis("upstream.connect_timeout_ms", raw.connect_timeout_ms, d.connect_timeout),
            read_timeout,
        }
    }

    fn storage(&mut self, raw: RawStorage) -> StorageConfig {
        let d = StorageConfig::default();
        let path = match raw.path {
            None => d.path,
            Some(p) if p.trim().is_empty() => {
                self.problem("storage.path", "must not be empty");
                d.path
            }
            Some(p) => PathBuf::from(p),
        };
        let flush_interval = match raw.flush_interval_ms {
            None => d.flush_interval,
            Some(ms @ 1..=MAX_FLUSH_INTERVAL_MS) => Duration::from_millis(ms),
            Some(ms) => {
                self.problem(
                    "storage.flush_interval_ms",
                    format!("{ms} is out of range: must be 1..={MAX_FLUSH_INTERVAL_MS}"),
                );
                d.flush_interval
            }
        };
        StorageConfig {
            path,
            flush_interval,
            retention_months: self.at_least("storage.retention_months", raw.retention_months, 1, d.retention_months),
        }
    }

    fn pricing(&mut self, raw: RawPricing) -> Pricing {
        let d = Pricing::default();
        let mut models = BTreeMap::new();
        for (name, price) in raw.models {
            let path = format!("pricing.models.{}", toml_key(&name));
            let Some(id) = self.model_name(&path, &name) else {
                continue;
            };
            let entry = self.model_price(&path, price);
            // "x" and "models/x" name the same model; two prices for it would be ambiguous.
            if models.insert(id.to_owned(), entry).is_some() {
                self.problem(path, format!("duplicate price for model `{id}`"));
            }
        }
        Pricing {
            message_sent: self.opt_money("pricing.message_sent", raw.message_sent, d.message_sent),
            ai_response_per_token: self.opt_money(
                "pricing.ai_response_per_token",
                raw.ai_response_per_token,
                d.ai_response_per_token,
            ),
            file_upload_per_byte: self.opt_money(
                "pricing.file_upload_per_byte",
                raw.file_upload_per_byte,
                d.file_upload_per_byte,
            ),
            batch_discount: raw
                .batch_discount
                .map_or(d.batch_discount, |m| self.fraction("pricing.batch_discount", m)),
            grounding_per_request: self.opt_money(
                "pricing.grounding_per_request",
                raw.grounding_per_request,
                d.grounding_per_request,
            ),
            models,
        }
    }

    /// One `[pricing.models."<model>"]` entry. Rules: the two base rates are required unless the
    /// model is priced per unit (`per_image` / `per_second`); `long_*` keys need
    /// `long_context_threshold` and the threshold needs the long input and output rates (and a
    /// long cached rate when there is a cached rate); every modality with a rate of its own in a
    /// standard map needs one in the matching `long_*` map, so no long-context price is guessed.
    fn model_price(&mut self, path: &str, raw: RawModelPrice) -> ModelPrice {
        let per_unit = raw.per_image.is_some() || raw.per_second.is_some();
        let base = |v: &mut Self, key: &str, m: Option<Money>| match m {
            Some(m) => v.money(&format!("{path}.{key}"), m),
            None => {
                if !per_unit {
                    v.problem(
                        format!("{path}.{key}"),
                        "required (only a model priced per_image or per_second may leave it out)",
                    );
                }
                Decimal::ZERO
            }
        };
        let input_per_million = base(self, "input_per_million", raw.input_per_million);
        let output_per_million = base(self, "output_per_million", raw.output_per_million);
        let opt = |v: &mut Self, key: &str, m: Option<Money>| m.map(|m| v.money(&format!("{path}.{key}"), m));
        let cached_input_per_million = opt(self, "cached_input_per_million", raw.cached_input_per_million);
        let input_by_modality =
            self.modality_rates(path, "input_per_million_by_modality", raw.input_per_million_by_modality);
        let cached_input_by_modality = self.modality_rates(
            path,
            "cached_input_per_million_by_modality",
            raw.cached_input_per_million_by_modality,
        );
        let output_by_modality = self.modality_rates(
            path,
            "output_per_million_by_modality",
            raw.output_per_million_by_modality,
        );
        let long = RawLong {
            input: raw.long_input_per_million,
            output: raw.long_output_per_million,
            cached: raw.long_cached_input_per_million,
            input_by_modality: raw.long_input_per_million_by_modality,
            cached_by_modality: raw.long_cached_input_per_million_by_modality,
            output_by_modality: raw.long_output_per_million_by_modality,
        };
        let standard = [
            ("input_per_million_by_modality", &input_by_modality),
            ("cached_input_per_million_by_modality", &cached_input_by_modality),
            ("output_per_million_by_modality", &output_by_modality),
        ];
        let long_context = self.long_context(
            path,
            raw.long_context_threshold,
            long,
            cached_input_per_million.is_some(),
            standard,
        );
        let max_output_tokens = raw.max_output_tokens.filter(|&n| {
            if n == 0 {
                self.problem(format!("{path}.max_output_tokens"), "must be at least 1");
            }
            n > 0
        });
        ModelPrice {
            input_per_million,
            output_per_million,
            cached_input_per_million,
            max_output_tokens,
            input_by_modality,
            cached_input_by_modality,
            output_by_modality,
            long_context,
            cache_storage_per_million_per_hour: opt(
                self,
                "cache_storage_per_million_per_hour",
                raw.cache_storage_per_million_per_hour,
            ),
            per_image: opt(self, "per_image", raw.per_image),
            per_second: opt(self, "per_second", raw.per_second),
            batch_discount: raw
                .batch_discount
                .map(|m| self.fraction(&format!("{path}.batch_discount"), m)),
            grounding_per_request: opt(self, "grounding_per_request", raw.grounding_per_request),
        }
    }

    /// The long-context tier of a model entry, if it has one (see [`Validator::model_price`]).
    fn long_context(
        &mut self,
        path: &str,
        threshold: Option<u64>,
        raw: RawLong,
        has_cached: bool,
        standard: [(&str, &ModalityRates); 3],
    ) -> Option<LongContext> {
        let Some(threshold) = threshold else {
            let keys = [
                ("long_input_per_million", raw.input.is_some()),
                ("long_output_per_million", raw.output.is_some()),
                ("long_cached_input_per_million", raw.cached.is_some()),
                ("long_input_per_million_by_modality", raw.input_by_modality.is_some()),
                (
                    "long_cached_input_per_million_by_modality",
                    raw.cached_by_modality.is_some(),
                ),
                ("long_output_per_million_by_modality", raw.output_by_modality.is_some()),
            ];
            for (key, set) in keys {
                if set {
                    self.problem(format!("{path}.{key}"), "has no effect without long_context_threshold");
                }
            }
            return None;
        };
        if threshold == 0 {
            self.problem(format!("{path}.long_context_threshold"), "must be at least 1");
        }
        let required = |v: &mut Self, key: &str, m: Option<Money>| match m {
            Some(m) => v.money(&format!("{path}.{key}"), m),
            None => {
                v.problem(format!("{path}.{key}"), "required with long_context_threshold");
                Decimal::ZERO
            }
        };
        let input_per_million = required(self, "long_input_per_million", raw.input);
        let output_per_million = required(self, "long_output_per_million", raw.output);
        let cached_input_per_million = match raw.cached {
            Some(m) => Some(self.money(&format!("{path}.long_cached_input_per_million"), m)),
            None => {
                if has_cached {
                    self.problem(
                        format!("{path}.long_cached_input_per_million"),
                        "required with long_context_threshold when cached_input_per_million is set",
                    );
                }
                None
            }
        };
        let maps = [raw.input_by_modality, raw.cached_by_modality, raw.output_by_modality];
        let mut long_maps = [ModalityRates::default(); 3];
        for ((raw_map, long), (std_key, std_rates)) in maps.into_iter().zip(long_maps.iter_mut()).zip(standard) {
            let key = format!("long_{std_key}");
            *long = self.modality_rates(path, &key, raw_map);
            for (m, _) in std_rates.iter() {
                if long.get(m).is_none() {
                    self.problem(
                        format!("{path}.{key}.{}", m.as_str()),
                        format!(
                            "required with long_context_threshold: {std_key} prices {} (a long-context rate is never guessed)",
                            m.as_str()
                        ),
                    );
                }
            }
        }
        let [input_by_modality, cached_input_by_modality, output_by_modality] = long_maps;
        Some(LongContext {
            threshold,
            input_per_million,
            output_per_million,
            cached_input_per_million,
            input_by_modality,
            cached_input_by_modality,
            output_by_modality,
        })
    }

    /// A `*_by_modality` table: keys are modality names as Gemini writes them.
    fn modality_rates(&mut self, path: &str, key: &str, raw: Option<BTreeMap<String, Money>>) -> ModalityRates {
        let mut rates = ModalityRates::default();
        for (name, money) in raw.into_iter().flatten() {
            let at = format!("{path}.{key}.{}", toml_key(&name));
            match Modality::parse(&name) {
                Some(m) => {
                    if let Some(slot) = rates.0.get_mut(m.index()) {
                        *slot = Some(self.money(&at, money));
                    }
                }
                None => self.problem(
                    at,
                    format!("{name:?} is not a modality: expected TEXT, IMAGE, AUDIO, VIDEO or DOCUMENT"),
                ),
            }
        }
        rates
    }

    fn tiers(&mut self, raw: BTreeMap<String, RawTier>) -> BTreeMap<String, Tier> {
        let mut tiers = BTreeMap::new();
        for (name, tier) in raw {
            let path = format!("tiers.{}", toml_key(&name));
            if name.trim().is_empty() {
                self.problem(&path, "tier name must not be empty");
                continue;
            }
            // Tier names end up in logs, CSV exports and webhook bodies.
            if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.problem(&path, "tier name must not contain whitespace or control characters");
                continue;
            }
            let tier = self.tier(&path, tier);
            tiers.insert(name, tier);
        }
        tiers
    }

    fn tier(&mut self, path: &str, raw: RawTier) -> Tier {
        let requests_per_minute = raw.requests_per_minute.and_then(|n| {
            let nz = NonZeroU32::new(n);
            if nz.is_none() {
                self.problem(
                    format!("{path}.requests_per_minute"),
                    "must be at least 1 (0 would refuse every request); remove the key for no limit",
                );
            }
            nz
        });
        let tokens_per_minute = raw.tokens_per_minute.filter(|&n| {
            if n == 0 {
                self.problem(
                    format!("{path}.tokens_per_minute"),
                    "must be at least 1 (0 would refuse every request); remove the key for no limit",
                );
            }
            n > 0
        });
        let models = raw.models.map(|list| {
            let key = format!("{path}.models");
            if list.is_empty() {
                self.problem(
                    &key,
                    "empty allow-list would refuse every model; remove the key for no restriction",
                );
            }
            let mut ids: Vec<String> = Vec::with_capacity(list.len());
            for (i, name) in list.iter().enumerate() {
                if let Some(id) = self.model_name(&format!("{key}[{i}]"), name)
                    && !ids.iter().any(|m| m == id)
                {
                    ids.push(id.to_owned());
                }
            }
            ids
        });
        let enforcement = match raw.enforcement.as_deref() {
            None | Some("hard") => Enforcement::Hard,
            Some("soft") => Enforcement::Soft,
            Some(other) => {
                self.problem(
                    format!("{path}.enforcement"),
                    format!("must be \"hard\" or \"soft\", not {other:?}"),
                );
                Enforcement::Hard
            }
        };
        let min_output_tokens = match raw.min_output_tokens {
            Some(0) => {
                self.problem(format!("{path}.min_output_tokens"), "must be at least 1");
                DEFAULT_MIN_OUTPUT_TOKENS
            }
            Some(n) => n,
            None => DEFAULT_MIN_OUTPUT_TOKENS,
        };
        Tier {
            messages: raw.messages,
            tokens: raw.tokens,
            bytes: raw.bytes,
            cost: raw.cost.map(|m| self.money(&format!("{path}.cost"), m)),
            requests_per_minute,
            tokens_per_minute,
            models,
            enforcement,
            min_output_tokens,
        }
    }

    /// A priced model a hard-enforced tier may call needs `max_output_tokens` (a model without
    /// a price has none to give: a request for it that sets no cap gets the largest that fits).
    fn output_caps(&mut self, pricing: &Pricing, tiers: &BTreeMap<String, Tier>) {
        let mut reported = std::collections::BTreeSet::new();
        for (name, tier) in tiers {
            if !tier.hard_budget() {
                continue;
            }
            for (id, price) in &pricing.models {
                if price.max_output_tokens.is_none() && tier.allows_model(id) && reported.insert(id) {
                    self.problem(
                        format!("pricing.models.{}.max_output_tokens", toml_key(id)),
                        format!(
                            "required: tier `{name}` enforces its tokens or cost limit as \"hard\" \
                             (set the model's output cap, or `enforcement = \"soft\"` on the tier)"
                        ),
                    );
                }
            }
        }
    }

    fn alerts(&mut self, raw: RawAlerts) -> AlertsConfig {
        let d = AlertsConfig::default();
        let thresholds = match raw.thresholds {
            None => d.thresholds,
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, t) in list.into_iter().enumerate() {
                    match u8::try_from(t) {
                        Ok(p @ 1..=100) => out.push(p),
                        _ => self.problem(
                            format!("alerts.thresholds[{i}]"),
                            format!("{t} is not a percentage in 1..=100"),
                        ),
                    }
                }
                out.sort_unstable();
                out.dedup();
                out
            }
        };
        let webhook_url = raw.webhook_url.inspect(|url| {
            if let Err(why) = parse_http_url(url) {
                self.problem("alerts.webhook_url", why);
            }
        });
        let webhook_secret_env = raw
            .webhook_secret_env
            .map(|name| self.env_name("alerts.webhook_secret_env", Some(name), String::new()));
        if webhook_secret_env.is_some() && webhook_url.is_none() {
            self.problem("alerts.webhook_secret_env", "has no effect without alerts.webhook_url");
        }
        AlertsConfig {
            thresholds,
            webhook_url,
            webhook_secret_env,
            smtp: raw.smtp.map(|s| self.smtp(s)),
        }
    }

    fn smtp(&mut self, raw: RawSmtp) -> SmtpConfig {
        if raw.host.trim().is_empty() {
            self.problem("alerts.smtp.host", "must not be empty");
        }
        if raw.port == Some(0) {
            self.problem("alerts.smtp.port", "must be 1..=65535");
        }
        // Only a sanity check: a full address grammar belongs to the mail library.
        if !raw.from.contains('@') {
            self.problem("alerts.smtp.from", format!("{:?} is not an email address", raw.from));
        }
        let username_env = raw
            .username_env
            .map(|n| self.env_name("alerts.smtp.username_env", Some(n), String::new()));
        let password_env = raw
            .password_env
            .map(|n| self.env_name("alerts.smtp.password_env", Some(n), String::new()));
        if username_env.is_some() != password_env.is_some() {
            self.problem("alerts.smtp", "set both username_env and password_env, or neither");
        }
        SmtpConfig {
            host: raw.host,
            port: raw.port.unwrap_or(587),
            from: raw.from,
            starttls: raw.starttls.unwrap_or(true),
            username_env,
            password_env,
        }
    }

    /// A model id from the file, without `models/`; `None` (and a problem) when unusable.
    fn model_name<'a>(&mut self, path: &str, name: &'a str) -> Option<&'a str> {
        let id = model_id(name);
        if id.is_empty() {
            self.problem(path, "model name must not be empty");
            None
        } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(path, format!("{name:?} is not a model id"));
            None
        } else {
            Some(id)
        }
    }

    fn env_name(&mut self, path: &str, name: Option<String>, default: String) -> String {
        let Some(name) = name else {
            return default;
        };
        let mut chars = name.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed {
            self.problem(
                path,
                format!(
                    "{name:?} is not an environment variable name (letters, digits and `_`, not starting with a digit)"
                ),
            );
        }
        name
    }

    fn at_least<T>(&mut self, path: &str, value: Option<T>, min: T, default: T) -> T
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        match value {
            None => default,
            Some(v) if v < min => {
                self.problem(path, format!("{v} is too small: must be at least {min}"));
                default
            }
            Some(v) => v,
        }
    }

    fn millis(&mut self, path: &str, value: Option<u64>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(0) => {
                self.problem(path, "must be at least 1 millisecond");
                default
            }
            Some(ms) => Duration::from_millis(ms),
        }
    }

    fn money(&mut self, path: &str, money: Money) -> Decimal {
        if money.0.is_sign_negative() && !money.0.is_zero() {
            self.problem(path, format!("money must not be negative (got \"{}\")", money.0));
        }
        money.0
    }

    fn opt_money(&mut self, path: &str, money: Option<Money>, default: Decimal) -> Decimal {
        money.map_or(default, |m| self.money(path, m))
    }

    /// A discount: the fraction of a price taken off, 0..=1.
    fn fraction(&mut self, path: &str, money: Money) -> Decimal {
        if money.0 < Decimal::ZERO || money.0 > Decimal::ONE {
            self.problem(
                path,
                format!(
                    "must be between \"0\" and \"1\" (the fraction taken off: \"0.5\" is half price), got \"{}\"",
                    money.0
                ),
            );
        }
        money.0
    }
}

/// An absolute http(s) URL with a host and no user info.
fn parse_http_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("{text:?} is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!("{text:?} must be an absolute http:// or https:// URL"));
        }
    }
    let Some(auth) = uri.authority() else {
        return Err(format!("{text:?} has no host"));
    };
    if auth.host().is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    // http::Uri silently drops a fragment; say so instead.
    if text.contains('#') {
        return Err(format!("{text:?} must not have a fragment (`#...`)"));
    }
    // Credentials in a URL end up in logs; they belong in env vars.
    if auth.as_str().contains('@') {
        return Err(format!("{text:?} must not contain user info"));
    }
    Ok(uri)
}

/// A base URL: no query, trailing slashes trimmed (the root stays `/`).
fn base_url(uri: &Uri) -> Result<Uri, String> {
    if uri.query().is_some() {
        return Err(format!("{uri} must not have a query string"));
    }
    let path = uri.path().trim_end_matches('/');
    Uri::builder()
        .scheme(scheme(uri))
        .authority(authority(uri))
        .path_and_query(if path.is_empty() { "/" } else { path })
        .build()
        .map_err(|e| format!("{uri} is not a valid base URL: {e}"))
}

fn scheme(uri: &Uri) -> &str {
    uri.scheme_str().unwrap_or_default()
}

fn authority(uri: &Uri) -> &str {
    uri.authority().map(|a| a.as_str()).unwrap_or_default()
}
