use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;

use super::*;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "config/x.toml")
}

/// Parses text that must fail validation and returns its lines.
fn error_lines(text: &str) -> Vec<String> {
    let err = parse(text).expect_err("config unexpectedly valid");
    err.lines()
}

/// Asserts the text fails with exactly one problem at `path` whose message contains `needle`.
#[track_caller]
fn assert_problem(text: &str, path: &str, needle: &str) {
    let lines = error_lines(text);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let prefix = format!("config/x.toml: {path}: ");
    assert!(
        lines[0].starts_with(&prefix) && lines[0].contains(needle),
        "got {:?}, want prefix {prefix:?} and {needle:?}",
        lines[0]
    );
}

const FULL: &str = r#"
[server]
listen = "0.0.0.0:9000"
admin_token_env = "ADMIN"
max_request_bytes = 1000
drain_timeout_ms = 0
header_read_timeout_ms = 1500
max_connections = 7
max_header_bytes = 8192
public_url = "https://gw.example.com/gemini/"

[upstream]
base_url = "http://127.0.0.1:9999/prefix/"
api_key_env = "KEY"
connect_timeout_ms = 100
read_timeout_ms = 60000

[storage]
path = "/var/lib/gm"
flush_interval_ms = 10000
retention_months = 1

[pricing]
message_sent = "0.01"
ai_response_per_token = "0"
file_upload_per_byte = "0.000000001"

[pricing.models."models/gemini-2.5-pro"]
input_per_million = "1.25"
output_per_million = "10.00"
max_output_tokens = 65536

[pricing.models."gemini-2.5-flash"]
input_per_million = "0.30"
output_per_million = "2.50"
cached_input_per_million = "0.03"
max_output_tokens = 8192

[tiers.free]
messages = 0
tokens = 10
bytes = 20
cost = "5.00"
requests_per_minute = 1
tokens_per_minute = 30
models = ["models/gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-pro"]

[tiers.unlimited]

[alerts]
thresholds = [100, 50, 1, 50]
webhook_url = "https://billing.example.com/hooks?token=abc"
webhook_secret_env = "SECRET"

[alerts.smtp]
host = "smtp.example.com"
from = "billing@example.com"
username_env = "SMTP_USER"
password_env = "SMTP_PASSWORD"
"#;

#[test]
fn valid_full_config() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(c.server.admin_token_env, "ADMIN");
    assert_eq!(c.server.max_request_bytes, 1000);
    assert_eq!(c.server.drain_timeout, Duration::ZERO);
    assert_eq!(c.server.header_read_timeout, Duration::from_millis(1500));
    assert_eq!(c.server.max_connections, 7);
    assert_eq!(c.server.max_header_bytes, 8192);
    assert_eq!(c.server.public_url.as_deref(), Some("https://gw.example.com/gemini"));

    assert_eq!(c.upstream.base_url.to_string(), "http://127.0.0.1:9999/prefix");
    assert_eq!(c.upstream.api_key_env, "KEY");
    assert_eq!(c.upstream.connect_timeout, Duration::from_millis(100));
    assert_eq!(c.upstream.read_timeout, Some(Duration::from_secs(60)));

    assert_eq!(c.storage.path, PathBuf::from("/var/lib/gm"));
    assert_eq!(c.storage.flush_interval, Duration::from_secs(10));
    assert_eq!(c.storage.retention_months, 1);

    assert_eq!(c.pricing.message_sent, dec("0.01"));
    assert_eq!(c.pricing.ai_response_per_token, Decimal::ZERO);
    assert_eq!(c.pricing.file_upload_per_byte, dec("0.000000001"));
    assert_eq!(
        c.pricing.models.keys().collect::<Vec<_>>(),
        ["gemini-2.5-flash", "gemini-2.5-pro"]
    );
    let pro = &c.pricing.models["gemini-2.5-pro"];
    assert_eq!(pro.input_per_million, dec("1.25"));
    assert_eq!(pro.output_per_million, dec("10.00"));
    assert_eq!(pro.cached_input_per_million, None);
    assert_eq!(
        c.pricing.models["gemini-2.5-flash"].cached_input_per_million,
        Some(dec("0.03"))
    );

    let free = &c.tiers["free"];
    assert_eq!(
        free,
        &Tier {
            messages: Some(0),
            tokens: Some(10),
            bytes: Some(20),
            cost: Some(dec("5.00")),
            requests_per_minute: NonZeroU32::new(1),
            tokens_per_minute: Some(30),
            models: Some(vec!["gemini-2.5-flash".into(), "gemini-2.5-pro".into()]),
            enforcement: Enforcement::Hard,
            min_output_tokens: 16,
        }
    );
    assert_eq!(pro.max_output_tokens, Some(65536));
    assert_eq!(c.tiers["unlimited"], Tier::default());

    assert_eq!(c.alerts.thresholds, [1, 50, 100]);
    assert_eq!(
        c.alerts.webhook_url.as_deref(),
        Some("https://billing.example.com/hooks?token=abc")
    );
    assert_eq!(c.alerts.webhook_secret_env.as_deref(), Some("SECRET"));
    assert_eq!(
        c.alerts.smtp,
        Some(SmtpConfig {
            host: "smtp.example.com".into(),
            port: 587,
            from: "billing@example.com".into(),
            starttls: true,
            username_env: Some("SMTP_USER".into()),
            password_env: Some("SMTP_PASSWORD".into()),
        })
    );
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.server.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.server.admin_token_env, "GEMINI_METER_ADMIN_TOKEN");
    assert_eq!(c.server.max_request_bytes, 157_286_400);
    assert_eq!(c.server.drain_timeout, Duration::from_millis(30_000));
    assert_eq!(c.server.header_read_timeout, Duration::from_millis(30_000));
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server.max_header_bytes, 65_536);
    assert_eq!(c.server.public_url, None);
    assert_eq!(
        c.upstream.base_url.to_string(),
        "https://generativelanguage.googleapis.com/"
    );
    assert_eq!(c.upstream.api_key_env, "GEMINI_API_KEY");
    assert_eq!(c.upstream.connect_timeout, Duration::from_millis(5_000));
    assert_eq!(c.upstream.read_timeout, None);
    assert_eq!(c.storage.path, PathBuf::from("data"));
    assert_eq!(c.storage.flush_interval, Duration::from_millis(50));
    assert_eq!(c.storage.retention_months, 24);
    assert_eq!(c.pricing.message_sent, dec("0"));
    assert_eq!(c.pricing.ai_response_per_token, dec("0.0001"));
    assert_eq!(c.pricing.file_upload_per_byte, dec("0.00000001"));
    assert!(c.pricing.models.is_empty());
    assert!(c.tiers.is_empty());
    assert_eq!(c.alerts.thresholds, [80, 95, 100]);
    assert_eq!(c.alerts.webhook_url, None);
    assert_eq!(c.alerts.smtp, None);
}

#[test]
fn empty_sections_give_defaults() {
    let text = "[server]\n[upstream]\n[storage]\n[pricing]\n[tiers]\n[alerts]\n";
    assert_eq!(parse(text).unwrap(), Config::default());
}

#[test]
fn shipped_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gemini-meter.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.tiers.keys().collect::<Vec<_>>(), ["enterprise", "free", "pro"]);
    assert_eq!(
        c.tiers["free"],
        Tier {
            messages: Some(100),
            tokens: Some(10_000),
            bytes: Some(104_857_600),
            cost: None,
            requests_per_minute: NonZeroU32::new(10),
            tokens_per_minute: Some(250_000),
            models: Some(vec!["gemini-2.5-flash".into(), "gemini-2.5-flash-lite".into()]),
            ..Tier::default()
        }
    );
    assert_eq!(
        c.tiers["pro"],
        Tier {
            messages: Some(1000),
            tokens: Some(100_000),
            bytes: Some(10_737_418_240),
            requests_per_minute: NonZeroU32::new(60),
            ..Tier::default()
        }
    );
    assert_eq!(c.tiers["enterprise"], Tier::default());
    let price = |m: &str| {
        let p = c.pricing.model(m).unwrap();
        (p.input_per_million, p.output_per_million, p.cached_input_per_million)
    };
    assert_eq!(price("gemini-2.5-pro"), (dec("1.25"), dec("10"), Some(dec("0.125"))));
    assert_eq!(price("gemini-2.5-flash"), (dec("0.30"), dec("2.50"), Some(dec("0.03"))));
    assert_eq!(
        price("gemini-2.5-flash-lite"),
        (dec("0.10"), dec("0.40"), Some(dec("0.01")))
    );
    assert_eq!(
        price("gemini-2.0-flash"),
        (dec("0.10"), dec("0.40"), Some(dec("0.025")))
    );
    assert_eq!(price("gemini-2.0-flash-lite"), (dec("0.075"), dec("0.30"), None));
    assert_eq!(price("gemini-embedding-001"), (dec("0.15"), dec("0"), None));
    // The file spells out the defaults, so only tiers and model prices differ from them.
    assert_eq!(c.server, ServerConfig::default());
    assert_eq!(c.upstream, UpstreamConfig::default());
    assert_eq!(c.storage, StorageConfig::default());
    assert_eq!(c.alerts, AlertsConfig::default());
}

#[test]
fn demo_default_is_the_embedded_example_with_a_placeholder_upstream() {
    let mut expected = Config::parse(EXAMPLE_TOML, "embedded").unwrap();
    expected.upstream.base_url = "http://127.0.0.1:0".parse().unwrap();
    let demo = Config::demo_default();
    assert_eq!(demo, expected);
    assert_eq!(demo.server.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(demo.upstream.base_url.port_u16(), Some(0));
    assert_eq!(demo.tiers.len(), 3);
}

#[test]
fn load_reports_io_errors_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let err = Config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    let line = err.to_string();
    assert!(
        line.starts_with(&format!("{}: cannot read: ", path.display())),
        "{line}"
    );
}

#[test]
fn load_names_the_file_in_validation_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[tiers.free]\nmessages = \"ten\"\n").unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tiers.free.messages: invalid type: string \"ten\", expected u64",
            path.display()
        )
    );
}

#[test]
fn unknown_key_at_top_level() {
    assert_problem("tierz = 1\n", "tierz", "unknown field `tierz`, expected one of");
}

#[test]
fn unknown_key_in_a_section() {
    assert_problem(
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_request_byte = 5\n",
        "server.max_request_byte",
        "unknown field `max_request_byte`",
    );
}

#[test]
fn unknown_key_in_a_tier() {
    assert_problem(
        "[tiers.free]\nmessagez = 10\n",
        "tiers.free.messagez",
        "unknown field `messagez`, expected one of `messages`",
    );
}

#[test]
fn unknown_key_in_a_model_price_quotes_the_model() {
    assert_problem(
        "[pricing.models.\"gemini-2.5-flash\"]\ninput_per_million = \"1\"\noutput_per_million = \"1\"\ncached = \"1\"\n",
        "pricing.models.\"gemini-2.5-flash\".cached",
        "unknown field `cached`",
    );
}

#[test]
fn section_of_the_wrong_type() {
    assert_problem("server = 5\n", "server", "invalid type: integer `5`, expected a table");
}

#[test]
fn wrong_type_names_the_key() {
    assert_eq!(
        error_lines("[tiers.free]\nmessages = \"ten\"\n"),
        ["config/x.toml: tiers.free.messages: invalid type: string \"ten\", expected u64"]
    );
}

#[test]
fn float_money_is_rejected() {
    assert_problem(
        "[tiers.free]\ncost = 5.0\n",
        "tiers.free.cost",
        "money must be a string such as \"5.00\", not a float (floats cannot hold cents exactly)",
    );
    assert_problem(
        "[pricing]\nai_response_per_token = 0.0001\n",
        "pricing.ai_response_per_token",
        "not a float",
    );
}

#[test]
fn integer_money_is_rejected() {
    assert_problem(
        "[tiers.free]\ncost = 5\n",
        "tiers.free.cost",
        "money must be a string such as \"5.00\", not an integer",
    );
    assert_problem(
        "[pricing.models.x]\ninput_per_million = 1\noutput_per_million = \"1\"\n",
        "pricing.models.x.input_per_million",
        "not an integer",
    );
}

#[test]
fn malformed_money_is_rejected() {
    assert_problem(
        "[pricing]\nmessage_sent = \"1e3\"\n",
        "pricing.message_sent",
        "invalid money",
    );
    assert_problem("[tiers.a]\ncost = true\n", "tiers.a.cost", "money as a string");
}

#[test]
fn negative_money_is_rejected() {
    assert_problem(
        "[tiers.free]\ncost = \"-1.00\"\n",
        "tiers.free.cost",
        "must not be negative",
    );
    assert_problem(
        "[pricing.models.m]\ninput_per_million = \"1\"\noutput_per_million = \"-0.5\"\n",
        "pricing.models.m.output_per_million",
        "must not be negative",
    );
    // "-0" is zero, not a negative price.
    assert!(parse("[pricing]\nmessage_sent = \"-0\"\n").is_ok());
}

#[test]
fn missing_model_price_field() {
    assert_problem(
        "[pricing.models.m]\ninput_per_million = \"1\"\n",
        "pricing.models.m.output_per_million",
        "required (only a model priced per_image or per_second may leave it out)",
    );
    // A per-unit model needs no token rates.
    let c = parse("[pricing.models.imagen]\nper_image = \"0.04\"\n").unwrap();
    let m = &c.pricing.models["imagen"];
    assert_eq!((m.per_image, m.input_per_million), (Some(dec("0.04")), Decimal::ZERO));
}

const PRO_LONG: &str = r#"
[pricing]
batch_discount = "0.5"
grounding_per_request = "0.035"

[pricing.models."gemini-2.5-pro"]
input_per_million = "1.25"
output_per_million = "10.00"
cached_input_per_million = "0.125"
long_context_threshold = 200000
long_input_per_million = "2.50"
long_output_per_million = "15.00"
long_cached_input_per_million = "0.25"
cache_storage_per_million_per_hour = "4.50"
input_per_million_by_modality = { AUDIO = "2.00" }
long_input_per_million_by_modality = { AUDIO = "4.00" }
output_per_million_by_modality = { IMAGE = "30.00" }
long_output_per_million_by_modality = { IMAGE = "45.00", AUDIO = "20.00" }
per_second = "0.40"
batch_discount = "0.25"
grounding_per_request = "0.014"
"#;

#[test]
fn the_full_price_model_parses() {
    let c = parse(PRO_LONG).unwrap();
    assert_eq!(c.pricing.batch_discount, dec("0.5"));
    assert_eq!(c.pricing.grounding_per_request, dec("0.035"));
    let m = &c.pricing.models["gemini-2.5-pro"];
    let l = m.long_context.as_ref().unwrap();
    assert_eq!(l.threshold, 200_000);
    assert_eq!(
        (l.input_per_million, l.output_per_million, l.cached_input_per_million),
        (dec("2.50"), dec("15.00"), Some(dec("0.25")))
    );
    assert_eq!(m.input_by_modality.get(Modality::Audio), Some(dec("2.00")));
    assert_eq!(m.input_by_modality.get(Modality::Text), None);
    assert_eq!(l.input_by_modality.get(Modality::Audio), Some(dec("4.00")));
    assert_eq!(l.output_by_modality.get(Modality::Audio), Some(dec("20.00")));
    assert_eq!(m.cache_storage_per_million_per_hour, Some(dec("4.50")));
    assert_eq!((m.per_second, m.per_image), (Some(dec("0.40")), None));
    assert_eq!(m.batch_discount, Some(dec("0.25")));
    assert_eq!(m.grounding_per_request, Some(dec("0.014")));
    // The tier is judged on the prompt: above the threshold only.
    assert_eq!(m.tier_for(200_000).input, dec("1.25"));
    assert_eq!(m.tier_for(200_001).input, dec("2.50"));
    assert_eq!(m.tier_for(200_001).input_rate(Some(Modality::Audio)), dec("4.00"));
    // No cached audio rate: the cached base rate of the tier.
    assert_eq!(m.tier_for(1).cached_rate(Some(Modality::Audio)), dec("0.125"));
    // What a worst-case reservation assumes: the dearest rate anywhere.
    assert_eq!(m.dearest_input_per_million(), dec("4.00"));
    assert_eq!(m.dearest_output_per_million(), dec("45.00"));
}

#[test]
fn old_model_entries_mean_the_same() {
    let c = parse("[pricing.models.m]\ninput_per_million = \"0.30\"\noutput_per_million = \"2.50\"\n").unwrap();
    let m = &c.pricing.models["m"];
    assert_eq!(m.long_context, None);
    assert!(m.input_by_modality.is_empty() && m.output_by_modality.is_empty());
    assert_eq!(
        (m.dearest_input_per_million(), m.dearest_output_per_million()),
        (dec("0.30"), dec("2.50"))
    );
    assert_eq!(c.pricing.batch_discount, Decimal::ZERO);
    assert_eq!(c.pricing.grounding_per_request, Decimal::ZERO);
}

#[test]
fn price_model_problems_name_their_keys() {
    let base = "[pricing.models.m]\ninput_per_million = \"1\"\noutput_per_million = \"1\"\n";
    assert_problem(
        &format!("{base}long_input_per_million = \"2\"\n"),
        "pricing.models.m.long_input_per_million",
        "has no effect without long_context_threshold",
    );
    assert_problem(
        &format!("{base}long_context_threshold = 10\nlong_input_per_million = \"2\"\n"),
        "pricing.models.m.long_output_per_million",
        "required with long_context_threshold",
    );
    assert_problem(
        &format!(
            "{base}cached_input_per_million = \"0.1\"\nlong_context_threshold = 10\nlong_input_per_million = \"2\"\nlong_output_per_million = \"2\"\n"
        ),
        "pricing.models.m.long_cached_input_per_million",
        "required with long_context_threshold when cached_input_per_million is set",
    );
    assert_problem(
        &format!("{base}long_context_threshold = 0\nlong_input_per_million = \"2\"\nlong_output_per_million = \"2\"\n"),
        "pricing.models.m.long_context_threshold",
        "must be at least 1",
    );
    assert_problem(
        &format!(
            "{base}input_per_million_by_modality = {{ AUDIO = \"1\" }}\nlong_context_threshold = 10\nlong_input_per_million = \"2\"\nlong_output_per_million = \"2\"\n"
        ),
        "pricing.models.m.long_input_per_million_by_modality.AUDIO",
        "a long-context rate is never guessed",
    );
    assert_problem(
        &format!("{base}input_per_million_by_modality = {{ audio = \"1\" }}\n"),
        "pricing.models.m.input_per_million_by_modality.audio",
        "\"audio\" is not a modality: expected TEXT, IMAGE, AUDIO, VIDEO or DOCUMENT",
    );
    assert_problem(
        &format!("{base}output_per_million_by_modality = {{ IMAGE = 30.0 }}\n"),
        "pricing.models.m.output_per_million_by_modality.IMAGE",
        "not a float",
    );
    assert_problem(
        &format!("{base}cached_input_per_million_by_modality = {{ AUDIO = \"-1\" }}\n"),
        "pricing.models.m.cached_input_per_million_by_modality.AUDIO",
        "must not be negative",
    );
    assert_problem(
        &format!("{base}batch_discount = \"1.5\"\n"),
        "pricing.models.m.batch_discount",
        "must be between \"0\" and \"1\"",
    );
    assert_problem(
        "[pricing]\nbatch_discount = \"-0.5\"\n",
        "pricing.batch_discount",
        "the fraction taken off",
    );
    assert_problem(
        &format!("{base}per_image = \"0.04x\"\n"),
        "pricing.models.m.per_image",
        "invalid money",
    );
    assert_problem(
        &format!("{base}cache_storage_per_million_per_hour = 4.5\n"),
        "pricing.models.m.cache_storage_per_million_per_hour",
        "not a float",
    );
    assert_problem(
        &format!("{base}per_token = \"1\"\n"),
        "pricing.models.m.per_token",
        "unknown field `per_token`",
    );
}

#[test]
fn negative_limit_is_rejected() {
    assert_problem(
        "[tiers.free]\ntokens = -5\n",
        "tiers.free.tokens",
        "invalid value: integer `-5`, expected u64",
    );
}

#[test]
fn bad_listen() {
    assert_problem(
        "[server]\nlisten = \"localhost:8080\"\n",
        "server.listen",
        "is not an IP address and port",
    );
}

#[test]
fn bad_base_url() {
    for (url, why) in [
        ("ftp://example.com", "http:// or https://"),
        ("example.com", "http:// or https://"),
        ("/v1beta", "http:// or https://"),
        ("https://example.com/?key=x", "query"),
        ("https://user:pw@example.com", "user info"),
        ("not a url", "not a valid URL"),
        ("https://example.com/v1#x", "fragment"),
    ] {
        assert_problem(&format!("[upstream]\nbase_url = {url:?}\n"), "upstream.base_url", why);
    }
}

#[test]
fn base_url_trailing_slash_is_trimmed() {
    let c = parse("[upstream]\nbase_url = \"http://127.0.0.1:1/a/b//\"\n").unwrap();
    assert_eq!(c.upstream.base_url.path(), "/a/b");
    let c = parse("[upstream]\nbase_url = \"https://example.com/\"\n").unwrap();
    let d = parse("[upstream]\nbase_url = \"https://example.com\"\n").unwrap();
    assert_eq!(c.upstream.base_url, d.upstream.base_url);
    assert_eq!(c.upstream.base_url.path(), "/");
}

#[test]
fn requests_per_minute_zero_is_rejected() {
    assert_problem(
        "[tiers.free]\nrequests_per_minute = 0\n",
        "tiers.free.requests_per_minute",
        "must be at least 1",
    );
}

#[test]
fn tokens_per_minute_zero_is_rejected() {
    assert_problem(
        "[tiers.free]\ntokens_per_minute = 0\n",
        "tiers.free.tokens_per_minute",
        "must be at least 1",
    );
}

#[test]
fn empty_models_list_is_rejected() {
    assert_problem(
        "[tiers.free]\nmodels = []\n",
        "tiers.free.models",
        "empty allow-list would refuse every model; remove the key for no restriction",
    );
}

#[test]
fn empty_names_are_rejected() {
    assert_problem("[tiers.\"\"]\n", "tiers.\"\"", "tier name must not be empty");
    assert_problem(
        "[tiers.free]\nmodels = [\"gemini-2.5-flash\", \"\"]\n",
        "tiers.free.models[1]",
        "model name must not be empty",
    );
    assert_problem(
        "[pricing.models.\"models/\"]\ninput_per_million = \"1\"\noutput_per_million = \"1\"\n",
        "pricing.models.\"models/\"",
        "model name must not be empty",
    );
}

#[test]
fn duplicate_model_price_is_rejected() {
    let text = "[pricing.models.m]\ninput_per_million = \"1\"\noutput_per_million = \"1\"\n\
                [pricing.models.\"models/m\"]\ninput_per_million = \"2\"\noutput_per_million = \"2\"\n";
    assert_problem(text, "pricing.models.\"models/m\"", "duplicate price for model `m`");
}

#[test]
fn env_var_names_are_checked_not_read() {
    assert_problem(
        "[upstream]\napi_key_env = \"AIza-secret-key\"\n",
        "upstream.api_key_env",
        "is not an environment variable name",
    );
    assert_problem(
        "[server]\nadmin_token_env = \"\"\n",
        "server.admin_token_env",
        "is not an environment variable name",
    );
    // A well-formed name that is surely unset still validates.
    let c = parse("[upstream]\napi_key_env = \"GEMINI_METER_TEST_SURELY_UNSET_9\"\n").unwrap();
    assert_eq!(c.upstream.api_key_env, "GEMINI_METER_TEST_SURELY_UNSET_9");
}

#[test]
fn thresholds_must_be_percentages() {
    assert_problem(
        "[alerts]\nthresholds = [80, 0]\n",
        "alerts.thresholds[1]",
        "0 is not a percentage in 1..=100",
    );
    assert_problem(
        "[alerts]\nthresholds = [101]\n",
        "alerts.thresholds[0]",
        "101 is not a percentage",
    );
    assert_problem(
        "[alerts]\nthresholds = [50, \"x\"]\n",
        "alerts.thresholds[1]",
        "invalid type: string \"x\"",
    );
}

#[test]
fn alert_channel_checks() {
    assert_problem(
        "[alerts]\nwebhook_secret_env = \"S\"\n",
        "alerts.webhook_secret_env",
        "has no effect without alerts.webhook_url",
    );
    assert_problem(
        "[alerts]\nwebhook_url = \"billing.example.com\"\n",
        "alerts.webhook_url",
        "http:// or https://",
    );
    assert_problem(
        "[alerts.smtp]\nhost = \"h\"\nfrom = \"a@b\"\nusername_env = \"U\"\n",
        "alerts.smtp",
        "set both username_env and password_env, or neither",
    );
    assert_problem("[alerts.smtp]\nhost = \"h\"\n", "alerts.smtp", "missing field `from`");
}

#[test]
fn ranges_are_checked() {
    assert_problem(
        "[storage]\nflush_interval_ms = 0\n",
        "storage.flush_interval_ms",
        "must be 1..=10000",
    );
    assert_problem(
        "[storage]\nflush_interval_ms = 10001\n",
        "storage.flush_interval_ms",
        "must be 1..=10000",
    );
    assert_problem(
        "[storage]\nretention_months = 0\n",
        "storage.retention_months",
        "at least 1",
    );
    assert_problem("[storage]\npath = \"\"\n", "storage.path", "must not be empty");
    assert_problem(
        "[server]\nmax_header_bytes = 100\n",
        "server.max_header_bytes",
        "at least 8192",
    );
    assert_problem(
        "[upstream]\nconnect_timeout_ms = 0\n",
        "upstream.connect_timeout_ms",
        "at least 1",
    );
    assert_problem(
        "[upstream]\nread_timeout_ms = 0\n",
        "upstream.read_timeout_ms",
        "remove the key for no read timeout",
    );
}

#[test]
fn all_problems_are_reported_with_a_one_line_display() {
    let text = "[server]\nlisten = \"nope\"\n\
                [upstream]\nbase_url = \"ftp://x\"\n\
                [tiers.free]\nrequests_per_minute = 0\nmodels = []\ncost = \"-1\"\n";
    let err = parse(text).unwrap_err();
    let lines = err.lines();
    let paths: Vec<&str> = lines.iter().map(|l| l.split(": ").nth(1).unwrap()).collect();
    assert_eq!(
        paths,
        [
            "server.listen",
            "upstream.base_url",
            "tiers.free.requests_per_minute",
            "tiers.free.models",
            "tiers.free.cost",
        ]
    );
    assert!(lines.iter().all(|l| l.starts_with("config/x.toml: ")));
    let display = err.to_string();
    assert!(!display.contains('\n'));
    assert_eq!(display, format!("{} (and 4 more)", lines[0]));
}

#[test]
fn syntax_error_has_line_and_column() {
    let err = parse("[server]\nlisten = \"127.0.0.1:80\"\nmax_connections = = 3\n").unwrap_err();
    match &err {
        ConfigError::Syntax { line, column, .. } => assert_eq!((*line, *column), (3, 19)),
        other => panic!("not a syntax error: {other:?}"),
    }
    let line = err.to_string();
    assert!(line.starts_with("config/x.toml: line 3 column 19: "), "{line}");
    assert!(!line.contains('\n'), "{line}");
    assert_eq!(err.lines(), [line]);
}

#[test]
fn duplicate_key_is_a_syntax_error() {
    let err = parse("[tiers.free]\nmessages = 1\nmessages = 2\n").unwrap_err();
    assert!(err.to_string().starts_with("config/x.toml: line 3 column 1: "), "{err}");
}

#[test]
fn pricing_model_accepts_both_spellings() {
    let c = parse(FULL).unwrap();
    let flash = c.pricing.model("gemini-2.5-flash").unwrap();
    assert_eq!(flash.input_per_million, dec("0.30"));
    assert_eq!(c.pricing.model("models/gemini-2.5-flash"), Some(flash));
    // Stored without the prefix even when the file wrote it.
    assert!(c.pricing.model("gemini-2.5-pro").is_some());
    assert!(c.pricing.model("models/gemini-2.5-pro").is_some());
    assert!(c.pricing.model("gemini-2.0-flash").is_none());
    assert!(c.pricing.model("models/models/gemini-2.5-pro").is_none());
}

#[test]
fn tier_allows_model() {
    let c = parse(FULL).unwrap();
    let free = &c.tiers["free"];
    assert!(free.allows_model("gemini-2.5-flash"));
    assert!(free.allows_model("models/gemini-2.5-flash"));
    assert!(free.allows_model("models/gemini-2.5-pro"));
    assert!(!free.allows_model("gemini-2.5-flash-lite"));
    assert!(!free.allows_model("gemini-2.5-flash-"));
    assert!(!free.allows_model(""));
    let open = &c.tiers["unlimited"];
    assert!(open.allows_model("anything"));
    assert!(open.allows_model("models/gemini-2.5-pro"));
}

#[test]
fn hard_limits_need_an_output_cap_per_priced_model() {
    let base = "[pricing.models.\"m\"]\ninput_per_million = \"1\"\noutput_per_million = \"2\"\n";
    let lines = error_lines(&format!("{base}[tiers.t]\ntokens = 10\n"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("pricing.models.m.max_output_tokens"), "{lines:?}");
    assert!(lines[0].contains("tier `t`"), "{lines:?}");
    // Soft, or a tier whose allow-list leaves the model out, needs none.
    assert!(parse(&format!("{base}[tiers.t]\ntokens = 10\nenforcement = \"soft\"\n")).is_ok());
    assert!(parse(&format!("{base}[tiers.t]\ncost = \"1\"\nmodels = [\"other\"]\n")).is_ok());
    let c = parse(&format!(
        "{base}max_output_tokens = 100\n[tiers.t]\ncost = \"1\"\nmin_output_tokens = 4\n"
    ))
    .unwrap();
    assert_eq!(c.tiers["t"].min_output_tokens, 4);
    assert!(c.tiers["t"].hard_budget());
}

#[test]
fn enforcement_and_minimum_are_checked() {
    let lines = error_lines("[tiers.t]\nenforcement = \"strict\"\nmin_output_tokens = 0\n");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("tiers.t.enforcement")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("tiers.t.min_output_tokens")),
        "{lines:?}"
    );
}

#[test]
fn cluster_section_defaults_and_problems() {
    assert_eq!(parse("").unwrap().cluster, None);
    let c = parse("[cluster]\n").unwrap().cluster.unwrap();
    assert_eq!(c.redis_url_env, "GEMINI_METER_REDIS_URL");
    assert_eq!(c.postgres_url_env, "GEMINI_METER_DATABASE_URL");
    assert_eq!(c.on_redis_unavailable, super::OnRedisUnavailable::Deny);
    assert_problem(
        "[cluster]\non_redis_unavailable = \"allow\"\n",
        "cluster.on_redis_unavailable",
        "the only choice is \"deny\"",
    );
    assert_problem(
        "[cluster]\nredis_url_env = \"1X\"\n",
        "cluster.redis_url_env",
        "environment variable name",
    );
    assert_problem("[cluster]\nredis = \"x\"\n", "cluster.redis", "unknown field");
}
