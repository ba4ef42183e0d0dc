//! Digests by e-mail, over SMTP with TLS only (implicit TLS or required
//! STARTTLS), with `lettre`.
//!
//! The message is plain text, Japanese first then English, sent base64
//! encoded so that it survives any relay whatever its line lengths. Long
//! lists are cut at [`MAX_LISTED`] per section in the e-mail; the webhook
//! carries them whole.

use std::fmt;
use std::fmt::Write as _;
use std::time::Duration;

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Mailbox, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Alert, AlertsError, Digest, Severity, Sink};
use crate::config::{AlertsEmailConfig, SmtpTls};
use crate::smaregi::jst;

/// Problems listed per section of an e-mail; the rest are counted.
pub const MAX_LISTED: usize = 50;

/// Sends digests to `[alerts.email] to`.
pub struct EmailNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    host: String,
    server: String,
}

impl fmt::Debug for EmailNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the transport: it holds the credentials.
        f.debug_struct("EmailNotifier")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .field("to", &self.to.len())
            .finish_non_exhaustive()
    }
}

fn mailbox(address: &str) -> Result<Mailbox, AlertsError> {
    address.parse().map_err(|source| AlertsError::Address {
        address: address.to_owned(),
        source,
    })
}

impl EmailNotifier {
    pub fn new(config: &AlertsEmailConfig, host: &str) -> Result<Self, AlertsError> {
        let mut tls = TlsParameters::builder(config.smtp_host.clone());
        if let Some(path) = &config.ca_file {
            let ca_error = |message: String| AlertsError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certificate = Certificate::from_pem(&pem).map_err(|e| ca_error(e.to_string()))?;
            tls = tls.add_root_certificate(certificate);
        }
        let tls = tls.build_rustls().map_err(AlertsError::SmtpTls)?;
        let tls = match config.tls {
            SmtpTls::Wrapper => Tls::Wrapper(tls),
            SmtpTls::Starttls => Tls::Required(tls),
        };
        let mut transport =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.smtp_host.clone())
                .port(config.port())
                .tls(tls)
                .timeout(Some(Duration::from_secs(config.request_timeout_seconds)));
        if let (Some(username), Some(password)) = (&config.username, &config.password) {
            transport = transport.credentials(Credentials::new(
                username.clone(),
                password.expose().to_owned(),
            ));
        }
        Ok(Self {
            transport: transport.build(),
            from: mailbox(&config.from)?,
            to: config
                .to
                .iter()
                .map(|to| mailbox(to))
                .collect::<Result<_, _>>()?,
            host: host.to_owned(),
            server: format!("{}:{}", config.smtp_host, config.port()),
        })
    }

    /// Sends one digest to every recipient, as one message.
    pub async fn send(&self, digest: &Digest) -> Result<(), AlertsError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject(digest));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let message = builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .header(ContentTransferEncoding::Base64)
                .body(body(&self.host, digest)),
        )?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(AlertsError::Smtp)
    }
}

impl Sink for EmailNotifier {
    const NAME: &'static str = "email";

    async fn send(&self, digest: &Digest) -> Result<(), AlertsError> {
        EmailNotifier::send(self, digest).await
    }
}

fn problems(n: usize) -> String {
    if n == 1 {
        "1 problem".to_owned()
    } else {
        format!("{n} problems")
    }
}

/// `[smaregi-relay] 要対応 2件 / 2 problems need attention`, or, when
/// everything is resolved, `[smaregi-relay] 解決 1件 / 1 problem resolved`.
pub fn subject(digest: &Digest) -> String {
    let open = digest.open_count();
    if open > 0 {
        let verb = if open == 1 { "needs" } else { "need" };
        format!(
            "[smaregi-relay] 要対応 {open}件 / {} {verb} attention",
            problems(open)
        )
    } else {
        let resolved = digest.resolved.len();
        format!(
            "[smaregi-relay] 解決 {resolved}件 / {} resolved",
            problems(resolved)
        )
    }
}

/// The plain-text body: Japanese first, then English.
pub fn body(host: &str, digest: &Digest) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "smaregi-relay（{host}）からのお知らせです。");
    let japanese = [
        ("新しい問題", &digest.raised),
        ("解決した問題", &digest.resolved),
        ("継続中の問題", &digest.active),
    ];
    for (title, alerts) in japanese {
        section(
            &mut text,
            alerts,
            |n| format!("{title}（{n}件）"),
            |alert| {
                let label = match alert.severity {
                    Severity::Critical => "重大",
                    Severity::Warning => "注意",
                };
                format!("［{label}］{}（{}から）", alert.japanese, since(alert))
            },
            |rest| format!("ほか{rest}件"),
        );
    }
    text.push_str("\n詳しくは、この機械で `smaregi-relay status` を実行して確認してください。\n");
    text.push_str("\n----------------------------------------\n\n");
    let _ = writeln!(text, "Alert digest from smaregi-relay on {host}.");
    let english = [
        ("New problems", &digest.raised),
        ("Resolved", &digest.resolved),
        ("Still active", &digest.active),
    ];
    for (title, alerts) in english {
        section(
            &mut text,
            alerts,
            |n| format!("{title} ({n})"),
            |alert| {
                let label = match alert.severity {
                    Severity::Critical => "critical",
                    Severity::Warning => "warning",
                };
                format!("[{label}] {} (since {})", alert.english, since(alert))
            },
            |rest| format!("and {rest} more"),
        );
    }
    text.push_str("\nRun `smaregi-relay status` on the machine for details.\n");
    text
}

fn section(
    text: &mut String,
    alerts: &[Alert],
    title: impl Fn(usize) -> String,
    line: impl Fn(&Alert) -> String,
    more: impl Fn(usize) -> String,
) {
    if alerts.is_empty() {
        return;
    }
    let _ = writeln!(text, "\n{}:", title(alerts.len()));
    for alert in alerts.iter().take(MAX_LISTED) {
        let _ = writeln!(text, "- {}", line(alert));
    }
    if alerts.len() > MAX_LISTED {
        let _ = writeln!(text, "- {}", more(alerts.len() - MAX_LISTED));
    }
}

/// When a problem was first seen, in JST, to the minute.
fn since(alert: &Alert) -> String {
    let seconds = i64::try_from(alert.since / 1000).unwrap_or(i64::MAX - 9 * 3600);
    let mut text = jst::format(seconds + 9 * 3600);
    text.truncate("YYYY-MM-DD HH:MM".len());
    text + " JST"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(key: &str, severity: Severity) -> Alert {
        Alert {
            event: "upstream.paused".into(),
            severity,
            key: key.into(),
            japanese: "スマレジへの送信を停止中（認証エラー）".into(),
            english: "Delivery to Smaregi is paused (credential error)".into(),
            // 2026-11-23 00:15:00 UTC
            since: 1_795_392_900_000,
        }
    }

    fn digest(raised: usize, resolved: usize, active: usize) -> Digest {
        let make = |prefix: &str, n: usize| -> Vec<Alert> {
            (0..n)
                .map(|i| alert(&format!("{prefix}{i}"), Severity::Warning))
                .collect()
        };
        Digest {
            raised: make("r", raised),
            resolved: make("x", resolved),
            active: make("a", active),
            sequence: 0,
        }
    }

    #[test]
    fn subjects_count_what_needs_attention() {
        assert_eq!(
            subject(&digest(1, 3, 1)),
            "[smaregi-relay] 要対応 2件 / 2 problems need attention"
        );
        assert_eq!(
            subject(&digest(0, 0, 1)),
            "[smaregi-relay] 要対応 1件 / 1 problem needs attention"
        );
        assert_eq!(
            subject(&digest(0, 1, 0)),
            "[smaregi-relay] 解決 1件 / 1 problem resolved"
        );
    }

    #[test]
    fn the_body_is_japanese_first_then_english() {
        let mut d = digest(0, 1, 0);
        d.raised
            .push(alert("upstream.paused:smaregi", Severity::Critical));
        let text = body("shop-pc", &d);
        let japanese = text.find("新しい問題（1件）").unwrap();
        let english = text.find("New problems (1)").unwrap();
        assert!(japanese < english, "{text}");
        assert!(
            text.contains(
                "- ［重大］スマレジへの送信を停止中（認証エラー）（2026-11-23 09:15 JSTから）"
            ),
            "{text}"
        );
        assert!(text.contains(
            "- [critical] Delivery to Smaregi is paused (credential error) (since 2026-11-23 09:15 JST)"
        ), "{text}");
        assert!(text.contains("解決した問題（1件）") && text.contains("Resolved (1)"));
        assert!(!text.contains("継続中") && !text.contains("Still active"));
    }

    #[test]
    fn long_lists_are_cut_and_counted() {
        let text = body("shop-pc", &digest(500, 0, 0));
        assert_eq!(text.matches("［注意］").count(), MAX_LISTED);
        assert!(
            text.contains("ほか450件") && text.contains("and 450 more"),
            "{text}"
        );
    }
}
