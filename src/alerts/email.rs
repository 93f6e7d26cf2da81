//! Email deliveries through SMTP (lettre, rustls: no OpenSSL), plain text, to the user's email.
//!
//! TLS: `starttls = true` upgrades the connection and refuses a server that cannot; with
//! `starttls = false`, port 465 speaks TLS from the first byte (SMTPS) and any other port is
//! plain text (a relay on loopback, tests).

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rust_decimal::Decimal;

use super::failure::Failure;
use crate::clock::rfc3339;
use crate::config::{Config, SmtpConfig};
use crate::ledger::alerts::{Alert, Delivery, Quota};
use crate::runtime::EnvLookup;

/// Deadline of each SMTP command, and of the whole exchange.
const SMTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Subject and plain-text body of an alert's mail. The subject names the quota and the
/// percentage; the body says how much of it is used, when it resets and how to get more.
/// `contact` is where to ask for an upgrade (the sender address); `public_url` is the
/// gateway's address, for the usage page.
pub fn render(alert: &Alert, contact: &str, public_url: Option<&str>) -> (String, String) {
    let q = alert.quota.as_str();
    let t = alert.threshold;
    let subject = if t >= 100 {
        format!("You have used 100% of your monthly {q} quota")
    } else {
        format!("You have used {t}% of your monthly {q} quota")
    };
    let actual = percent(alert.used, alert.limit);
    let resets = alert.month.resets_at();
    // Short lines, so the mail goes out as plain 7-bit text.
    let mut b = String::with_capacity(1024);
    b.push_str("Hello,\n\n");
    b.push_str(&format!("your account has reached {t}% of its monthly {q} quota.\n\n"));
    b.push_str(&format!("  Account:  {} (plan {})\n", alert.user_id, alert.tier));
    b.push_str(&format!("  Quota:    {q}\n"));
    b.push_str(&format!(
        "  Used:     {} of {} ({actual}%)\n",
        amount(alert.quota, alert.used),
        amount(alert.quota, alert.limit)
    ));
    b.push_str(&format!("  Month:    {}\n", alert.month));
    b.push_str(&format!("  Resets:   {} (UTC)\n\n", rfc3339(resets)));
    if alert.used >= alert.limit {
        b.push_str(&format!(
            "Requests that need more {q} are refused\nuntil the quota resets.\n\n"
        ));
    } else {
        b.push_str(&format!(
            "Once the quota is used up, requests that need more {q}\nare refused until it resets.\n\n"
        ));
    }
    b.push_str(&format!(
        "To raise your limits, upgrade your plan:\nreply to this email or write to {contact}.\n"
    ));
    if let Some(url) = public_url {
        b.push_str(&format!("Your usage, live: {url}/dashboard\n"));
    }
    b.push_str(&format!(
        "\nAlert {}\n(sent once for this threshold this month)\n\n-- \ngemini-meter\n",
        alert.id
    ));
    (subject, b)
}

/// `used / limit` in percent, one decimal, without trailing zeros.
fn percent(used: Decimal, limit: Decimal) -> String {
    if limit.is_zero() {
        return "100".into();
    }
    (used * Decimal::ONE_HUNDRED / limit)
        .round_dp(1)
        .normalize()
        .to_string()
}

/// An amount of a quota in words.
fn amount(q: Quota, v: Decimal) -> String {
    let v = v.normalize();
    match q {
        Quota::Messages => format!("{v} messages"),
        Quota::Tokens => format!("{v} tokens"),
        Quota::Bytes => format!("{v} bytes"),
        Quota::Cost => format!("USD {v}"),
    }
}

/// Sends one email delivery.
pub(super) async fn send(cfg: &Config, env: &EnvLookup, d: &Delivery) -> Result<(), Failure> {
    let Some(smtp) = &cfg.alerts.smtp else {
        return Err(Failure::Retry("alerts.smtp is not configured".into()));
    };
    let Some(to) = d.alert.email.as_deref() else {
        return Err(Failure::Permanent("the user has no email address".into()));
    };
    let from: Mailbox = smtp
        .from
        .parse()
        .map_err(|e| Failure::Retry(format!("alerts.smtp.from {:?}: {e}", smtp.from)))?;
    let to: Mailbox = to
        .parse()
        .map_err(|e| Failure::Permanent(format!("recipient {to:?}: {e}")))?;
    let (subject, text) = render(&d.alert, &smtp.from, cfg.server.public_url.as_deref());
    let message = Message::builder()
        .from(from)
        .to(to)
        .subject(subject)
        .message_id(Some(format!("<{}@gemini-meter>", d.id)))
        .header(ContentType::TEXT_PLAIN)
        .body(text)
        .map_err(|e| Failure::Permanent(format!("cannot build the mail: {e}")))?;
    let transport = transport(smtp, env)?;
    match tokio::time::timeout(SMTP_TIMEOUT, transport.send(message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Failure::Retry(format!("smtp {}:{}: {e}", smtp.host, smtp.port))),
        Err(_) => Err(Failure::Retry(format!(
            "smtp {}:{}: no answer within {} s",
            smtp.host,
            smtp.port,
            SMTP_TIMEOUT.as_secs()
        ))),
    }
}

fn transport(smtp: &SmtpConfig, env: &EnvLookup) -> Result<AsyncSmtpTransport<Tokio1Executor>, Failure> {
    let tls_params = || TlsParameters::new(smtp.host.clone()).map_err(|e| Failure::Retry(format!("smtp tls: {e}")));
    let tls = if smtp.starttls {
        Tls::Required(tls_params()?)
    } else if smtp.port == 465 {
        Tls::Wrapper(tls_params()?)
    } else {
        Tls::None
    };
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.as_str())
        .port(smtp.port)
        .tls(tls)
        .timeout(Some(SMTP_TIMEOUT));
    if let (Some(u), Some(p)) = (&smtp.username_env, &smtp.password_env) {
        match (env(u), env(p)) {
            (Some(user), Some(pass)) => b = b.credentials(Credentials::new(user, pass)),
            _ => return Err(Failure::Retry(format!("SMTP credentials: {u} or {p} is not set"))),
        }
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Month;
    use crate::ledger::alerts::Channel;
    use chrono::{TimeZone, Utc};
    use std::sync::Arc;

    #[test]
    fn tls_transports_build_without_openssl() {
        let env: EnvLookup = Arc::new(|n: &str| (n == "U" || n == "P").then(|| "x".to_string()));
        let mut smtp = SmtpConfig {
            host: "smtp.example.com".into(),
            port: 587,
            from: "billing@example.com".into(),
            starttls: true,
            username_env: Some("U".into()),
            password_env: Some("P".into()),
        };
        assert!(transport(&smtp, &env).is_ok(), "STARTTLS");
        smtp.starttls = false;
        smtp.port = 465;
        assert!(transport(&smtp, &env).is_ok(), "SMTPS");
        smtp.username_env = Some("MISSING".into());
        assert!(
            matches!(transport(&smtp, &env), Err(Failure::Retry(_))),
            "unset credentials are retried"
        );
    }

    #[test]
    fn the_mail_says_which_quota_how_much_when_it_resets_and_how_to_upgrade() {
        let a = Alert {
            id: "alrt_x".into(),
            user_id: Arc::from("ann"),
            user_created: 0,
            tier: "free".into(),
            quota: Quota::Messages,
            threshold: 80,
            used: Decimal::from(8),
            limit: Decimal::from(10),
            month: Month(202611),
            at: Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap(),
            record_id: 1,
            email: Some("ann@example.com".into()),
            channels: vec![Channel::Email],
        };
        let (subject, body) = render(&a, "billing@example.com", Some("https://gw.example.com"));
        assert_eq!(subject, "You have used 80% of your monthly messages quota");
        assert!(body.contains("Used:     8 messages of 10 messages (80%)"), "{body}");
        assert!(body.contains("2026-12-01T00:00:00Z"), "{body}");
        assert!(
            body.contains("upgrade your plan") && body.contains("billing@example.com"),
            "{body}"
        );
        assert!(body.contains("https://gw.example.com/dashboard"), "{body}");
        let c = Alert {
            quota: Quota::Cost,
            threshold: 100,
            used: "5.2".parse().unwrap(),
            limit: "5.00".parse().unwrap(),
            ..a
        };
        let (subject, body) = render(&c, "billing@example.com", None);
        assert_eq!(subject, "You have used 100% of your monthly cost quota");
        assert!(body.contains("USD 5.2 of USD 5 (104%)"), "{body}");
        assert!(body.contains("are refused\nuntil the quota resets"), "{body}");
    }
}
