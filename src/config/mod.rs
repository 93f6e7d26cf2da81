//! The configuration: TOML schema, strict parsing and validation into an immutable [`Config`].
//!
//! Owns the file format, its defaults and every rule about what a valid value is. It never reads
//! environment variables (it only checks that their *names* are well formed, so `check-config`
//! works without secrets), never opens sockets or storage, and knows nothing of reloading: the
//! caller builds a new `Config` and swaps it in.
//!
//! Parsing has two phases. [`raw`] deserializes the text through `serde_path_to_error` with
//! `deny_unknown_fields`, so a typo or a wrong type stops there with its key path. `validate` then
//! checks the meaning of every value and reports all problems at once.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use rust_decimal::Decimal;

mod price;
mod raw;
mod tier_id;
mod validate;

pub use price::{ContextTier, LongContext, MODALITIES, Modality, ModalityRates, TierRates};
pub use tier_id::TierId;

#[cfg(test)]
mod tests;

/// The example configuration shipped with the crate; also the source of [`Config::demo_default`].
const EXAMPLE_TOML: &str = include_str!("../../config/gemini-meter.toml");

/// Placeholder upstream for the demo; the caller points it at the mock it starts.
const DEMO_BASE_URL: &str = "http://127.0.0.1:0";

const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The validated, immutable configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// `[server]`: the listening side.
    pub server: ServerConfig,
    /// `[upstream]`: where requests are forwarded.
    pub upstream: UpstreamConfig,
    /// `[storage]`: the usage ledger on disk.
    pub storage: StorageConfig,
    /// `[pricing]`: what each unit of use costs.
    pub pricing: Pricing,
    /// `[tiers.<name>]`: limits by tier name. Empty is valid (nobody can be assigned a tier).
    pub tiers: BTreeMap<String, Tier>,
    /// `[alerts]`: quota threshold notifications.
    pub alerts: AlertsConfig,
    /// `[routes]`: methods the operator lets through unbilled.
    pub routes: RoutesConfig,
    /// `[cluster]`: several replicas on Redis and PostgreSQL; `None`: one gateway, embedded store.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: where the shared counters and the shared ledger are. Cluster mode is on when
/// the variable `redis_url_env` names is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Name of the env var holding the Redis URL (`redis://…`); set: cluster mode.
    pub redis_url_env: String,
    /// Name of the env var holding the PostgreSQL URL; required in cluster mode.
    pub postgres_url_env: String,
    /// What new metered requests get while Redis is unreachable.
    pub on_redis_unavailable: OnRedisUnavailable,
}

/// What happens to new metered requests while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisUnavailable {
    /// 503 UNAVAILABLE with `Retry-After`: nothing goes upstream unreserved (the only choice:
    /// admitting on per-replica counters would multiply every limit by the replica count).
    #[default]
    Deny,
}

/// `[routes]`
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutesConfig {
    /// Methods forwarded unbilled although the route policy refuses them (see the README's
    /// route table).
    pub allow_unmetered: Vec<crate::policy::Allowed>,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on (`listen`, default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Name of the env var holding the admin token; the admin API is off when it is unset.
    pub admin_token_env: String,
    /// Largest accepted request body; larger ones get 413 (default 150 MiB).
    pub max_request_bytes: u64,
    /// How long in-flight requests may run after SIGTERM (`drain_timeout_ms`, default 30 s; 0 allowed).
    pub drain_timeout: Duration,
    /// Deadline for a client to send its request headers (`header_read_timeout_ms`, default 30 s).
    pub header_read_timeout: Duration,
    /// Most simultaneous client connections (default 10000).
    pub max_connections: usize,
    /// Largest request head hyper will buffer (default 65536, at least 8192).
    pub max_header_bytes: usize,
    /// Absolute http(s) base URL the gateway is reached at, used to rewrite upload URLs.
    /// Normalized: no query, no trailing slash (`https://gw.example.com` or `https://x.org/gemini`).
    pub public_url: Option<String>,
    /// `[server.tls]`: serve HTTPS instead of plain HTTP (restart to turn on or off).
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: PEM files, read at start and re-read when they change on disk. Only their
/// names are checked here; `crate::tls` reads and checks the files themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert_path: PathBuf,
    /// The private key of the leaf (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_path: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; when set, every `/admin`
    /// route needs a client certificate (mutual TLS).
    pub client_ca_path: Option<PathBuf>,
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Absolute http or https URL with no query; a trailing slash is trimmed (the root path stays `/`).
    pub base_url: Uri,
    /// Name of the env var holding the real Gemini API key.
    pub api_key_env: String,
    /// TCP + TLS connect deadline (`connect_timeout_ms`, default 5 s).
    pub connect_timeout: Duration,
    /// Longest silence allowed while reading a response (`read_timeout_ms`). Default none:
    /// thinking models can stay silent for minutes.
    pub read_timeout: Option<Duration>,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The sled directory, relative to the working directory unless absolute (default `data`).
    pub path: PathBuf,
    /// Upper bound on how long a usage record waits before reaching disk (`flush_interval_ms`,
    /// default 50 ms, 1..=10000).
    pub flush_interval: Duration,
    /// Months of ledger rows kept (default 24, at least 1).
    pub retention_months: u32,
}

/// `[pricing]`: exact decimal prices in USD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    /// Charged per admitted message when the model has no entry in `models` (default 0).
    pub message_sent: Decimal,
    /// Charged per response token when the model has no entry in `models` (default 0.0001).
    pub ai_response_per_token: Decimal,
    /// Charged per uploaded byte (default 0.00000001).
    pub file_upload_per_byte: Decimal,
    /// Fraction of the price taken off Batch API work (`batch_discount`, 0..=1, default 0: batch
    /// work costs what interactive calls cost); a model's own `batch_discount` overrides it.
    pub batch_discount: Decimal,
    /// Charged per response grounded with Google Search when the model has no price of its own
    /// (`grounding_per_request`, default 0).
    pub grounding_per_request: Decimal,
    /// Per-model token prices, keyed by model id without the `models/` prefix.
    pub models: BTreeMap<String, ModelPrice>,
}

/// `[pricing.models."<model>"]`: USD per million tokens, plus the rest of the price model
/// (see `price.rs` and the README's "Prices" section).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelPrice {
    /// Price of a million prompt tokens (0 for a per-unit model that gives none).
    pub input_per_million: Decimal,
    /// Price of a million output tokens (thinking tokens included; 0 for a per-unit model that
    /// gives none).
    pub output_per_million: Decimal,
    /// Price of a million cached prompt tokens; when absent they cost `input_per_million`.
    pub cached_input_per_million: Option<Decimal>,
    /// The output cap (thinking included) assumed for a request that sets none; required for a
    /// model under a hard token or cost limit.
    pub max_output_tokens: Option<u64>,
    /// Rates by modality for fresh prompt tokens (`input_per_million_by_modality`).
    pub input_by_modality: ModalityRates,
    /// Rates by modality for cached prompt tokens (`cached_input_per_million_by_modality`).
    pub cached_input_by_modality: ModalityRates,
    /// Rates by modality for output tokens (`output_per_million_by_modality`).
    pub output_by_modality: ModalityRates,
    /// The long-context tier (`long_context_threshold` and the `long_*` rates).
    pub long_context: Option<LongContext>,
    /// Storage of cached content, per million tokens per hour.
    pub cache_storage_per_million_per_hour: Option<Decimal>,
    /// Price of one generated image (Imagen `predict`).
    pub per_image: Option<Decimal>,
    /// Price of one second of generated video (Veo `predictLongRunning`).
    pub per_second: Option<Decimal>,
    /// Fraction taken off Batch API work for this model (overrides `[pricing] batch_discount`).
    pub batch_discount: Option<Decimal>,
    /// Price of one response grounded with Google Search (overrides `[pricing]
    /// grounding_per_request`).
    pub grounding_per_request: Option<Decimal>,
}

/// `[tiers.<name>]`: every limit is optional; an absent limit is unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Messages per calendar month (UTC).
    pub messages: Option<u64>,
    /// Tokens per calendar month.
    pub tokens: Option<u64>,
    /// Uploaded bytes per calendar month.
    pub bytes: Option<u64>,
    /// Spend per calendar month, USD.
    pub cost: Option<Decimal>,
    /// Requests per minute, per API key.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute, per user (never 0).
    pub tokens_per_minute: Option<u64>,
    /// Model allow-list (ids without `models/`, deduplicated, never empty); `None` allows all.
    pub models: Option<Vec<String>>,
    /// How the `tokens` and `cost` limits hold (default [`Enforcement::Hard`]).
    pub enforcement: Enforcement,
    /// Under hard enforcement, the smallest output cap a request is lowered to before it is
    /// refused (default 16, at least 1).
    pub min_output_tokens: u64,
}

/// How a tier's `tokens` and `cost` limits are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    /// Each model call reserves its worst case (prompt estimated from the body, plus its output
    /// cap) at admission: the limits are never exceeded for text prompts.
    #[default]
    Hard,
    /// Checked against what is used before the call, charged at its end: calls in flight may
    /// together go past the limit.
    Soft,
}

/// The default of `min_output_tokens`.
pub const DEFAULT_MIN_OUTPUT_TOKENS: u64 = 16;

impl Default for Tier {
    fn default() -> Self {
        Tier {
            messages: None,
            tokens: None,
            bytes: None,
            cost: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            models: None,
            enforcement: Enforcement::Hard,
            min_output_tokens: DEFAULT_MIN_OUTPUT_TOKENS,
        }
    }
}

impl Tier {
    /// Whether the tier reserves tokens and cost at admission (hard enforcement of a tokens or
    /// cost limit).
    pub fn hard_budget(&self) -> bool {
        self.enforcement == Enforcement::Hard && (self.tokens.is_some() || self.cost.is_some())
    }
}

/// `[alerts]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertsConfig {
    /// Percentages of a monthly quota that trigger an alert: each 1..=100, sorted, deduplicated
    /// (default `[80, 95, 100]`; empty turns alerts off).
    pub thresholds: Vec<u8>,
    /// Absolute http(s) URL that receives a JSON `POST` per alert.
    pub webhook_url: Option<String>,
    /// Name of the env var holding the HMAC secret that signs webhook deliveries.
    pub webhook_secret_env: Option<String>,
    /// Mail alerts to the user's email address.
    pub smtp: Option<SmtpConfig>,
}

/// `[alerts.smtp]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// SMTP server host name.
    pub host: String,
    /// SMTP server port (default 587).
    pub port: u16,
    /// Sender address.
    pub from: String,
    /// Upgrade the connection with STARTTLS (default true).
    pub starttls: bool,
    /// Name of the env var holding the SMTP user name.
    pub username_env: Option<String>,
    /// Name of the env var holding the SMTP password.
    pub password_env: Option<String>,
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path in TOML notation, e.g. `tiers.free.messages` or `pricing.models."gemini-2.5-flash"`.
    pub path: String,
    /// What is wrong, in one line.
    pub message: String,
}

/// Why a config file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file, as given.
        file: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The text is not valid TOML.
    #[error("{file}: line {line} column {column}: {message}")]
    Syntax {
        /// The file, as given.
        file: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// Valid TOML, but wrong keys, types or values. Display shows the first problem and how many
    /// more there are; [`ConfigError::lines`] lists every one.
    #[error("{file}: {}", Summary(problems))]
    Invalid {
        /// The file, as given.
        file: String,
        /// Every problem found, in file order by section; never empty.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem as its own line `"<file>: <key.path>: <what is wrong>"` (one line for read and
    /// syntax errors); what `check-config` prints.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { file, problems } if !problems.is_empty() => {
                problems.iter().map(|p| format!("{file}: {p}")).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The first problem plus a count, so the error stays one line for `serve`'s stderr.
struct Summary<'a>(&'a [Problem]);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [] => f.write_str("invalid configuration"),
            [one] => write!(f, "{one}"),
            [first, rest @ ..] => write!(f, "{first} (and {} more)", rest.len()),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates TOML text; `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| phase_one_error(&e, text, source))?;
        validate::validate(raw).map_err(|problems| ConfigError::Invalid {
            file: source.to_owned(),
            problems,
        })
    }

    /// The built-in default used by `demo`: the shipped `config/gemini-meter.toml` (listen
    /// 127.0.0.1:8080, tiers free/pro/enterprise, model prices) with the upstream set to the
    /// placeholder `http://127.0.0.1:0`, which the caller overrides with its mock's address.
    pub fn demo_default() -> Config {
        // A unit test proves the embedded file is valid, so the default-config fallback is
        // unreachable in a tested build; it exists only to avoid a panic path.
        let mut config = Config::parse(EXAMPLE_TOML, "config/gemini-meter.toml (built in)").unwrap_or_default();
        config.upstream.base_url = Uri::from_static(DEMO_BASE_URL);
        config
    }
}

impl Pricing {
    /// Price entry for a model id ("gemini-2.5-flash" or "models/gemini-2.5-flash").
    pub fn model(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model_id(model))
    }
}

impl Tier {
    /// True when the model id (with or without "models/" prefix) may be used in this tier.
    pub fn allows_model(&self, model: &str) -> bool {
        match &self.models {
            None => true,
            Some(allowed) => {
                let id = model_id(model);
                allowed.iter().any(|m| m == id)
            }
        }
    }
}

// The defaults live here, once; `validate` fills every absent key from these impls.

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            admin_token_env: "GEMINI_METER_ADMIN_TOKEN".to_owned(),
            // 150 MiB: Gemini takes inline bodies up to 100 MB, and base64 adds a third.
            max_request_bytes: 157_286_400,
            drain_timeout: Duration::from_millis(30_000),
            header_read_timeout: Duration::from_millis(30_000),
            max_connections: 10_000,
            max_header_bytes: 65_536,
            public_url: None,
            tls: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: Uri::from_static(DEFAULT_BASE_URL),
            api_key_env: "GEMINI_API_KEY".to_owned(),
            connect_timeout: Duration::from_millis(5_000),
            read_timeout: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("data"),
            flush_interval: Duration::from_millis(50),
            retention_months: 24,
        }
    }
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            message_sent: Decimal::ZERO,
            ai_response_per_token: Decimal::new(1, 4),
            file_upload_per_byte: Decimal::new(1, 8),
            batch_discount: Decimal::ZERO,
            grounding_per_request: Decimal::ZERO,
            models: BTreeMap::new(),
        }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            thresholds: vec![80, 95, 100],
            webhook_url: None,
            webhook_secret_env: None,
            smtp: None,
        }
    }
}

/// A model id without the optional `models/` resource prefix.
fn model_id(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// A TOML key as it would be written in a dotted path: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare { key.to_owned() } else { format!("{key:?}") }
}

/// Turns a phase-one error into a syntax error (no key path, only a position) or a problem at
/// its key path.
fn phase_one_error(err: &serde_path_to_error::Error<toml::de::Error>, text: &str, file: &str) -> ConfigError {
    let inner = err.inner();
    let mut path = String::new();
    for segment in err.path() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&toml_key(key));
            }
            serde_path_to_error::Segment::Enum { variant } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(variant);
            }
            serde_path_to_error::Segment::Unknown => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push('?');
            }
        }
    }
    // toml's messages may span lines ("invalid string\nexpected ..."); errors here are one line.
    let message = inner
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if path.is_empty()
        && let Some(span) = inner.span()
    {
        let (line, column) = line_column(text, span.start);
        return ConfigError::Syntax {
            file: file.to_owned(),
            line,
            column,
            message,
        };
    }
    ConfigError::Invalid {
        file: file.to_owned(),
        problems: vec![Problem {
            path: if path.is_empty() {
                "(top level)".to_owned()
            } else {
                path
            },
            message,
        }],
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = text.get(..end).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, column)
}
