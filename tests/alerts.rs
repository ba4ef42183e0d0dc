//! Alert digests delivered for real: the webhook notifier against an HTTPS
//! receiver that checks signatures, the e-mail notifier against an SMTP
//! server speaking implicit TLS, and the digest loop over hours of paused
//! (virtual) time.

mod common;

use std::path::Path;
use std::time::Duration;

use common::alerts::{SmtpServer, WebhookReceiver, SMTP_PASSWORD, SMTP_USERNAME, WEBHOOK_SECRET};
use common::write_file;
use serde_json::{json, Value};
use smaregi_relay::alerts::{
    self, Alert, AlertsError, Digest, DigestPolicy, EmailNotifier, Notifier, Severity,
    WebhookNotifier,
};
use smaregi_relay::config::{self, Config, SmtpTls};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const HOST: &str = "shop-pc";

fn parked(id: u32) -> Alert {
    Alert {
        event: alerts::events::JOB_PARKED.into(),
        severity: Severity::Warning,
        key: format!("outbox.job_parked:{id}"),
        japanese: format!("ジョブ {id} が保留になりました（取引登録）"),
        english: format!("Job {id} is parked (register transaction)"),
        since: 1_795_392_900_000 + u64::from(id),
    }
}

fn paused() -> Alert {
    Alert {
        event: alerts::events::UPSTREAM_PAUSED.into(),
        severity: Severity::Critical,
        key: "upstream.paused:smaregi".into(),
        japanese: "スマレジへの送信を停止しました（認証エラー）".into(),
        english: "Delivery to Smaregi is paused (credential error)".into(),
        since: 1_795_392_900_000,
    }
}

fn csv_rejected() -> Alert {
    Alert {
        event: alerts::events::CSV_REJECTED.into(),
        severity: Severity::Warning,
        key: "mapping.csv_rejected:products.csv".into(),
        japanese: "CSVファイル products.csv を取り込めませんでした".into(),
        english: "The CSV file products.csv was rejected".into(),
        since: 1_795_392_900_000,
    }
}

/// A config with `[alerts]` sending to whichever receivers are given.
/// Request timeouts are the longest allowed, for the paused clock (see
/// [`keep_virtual_time_moving_slowly`]).
fn load_config(
    dir: &Path,
    webhook: Option<&WebhookReceiver>,
    smtp: Option<&SmtpServer>,
    webhook_secret: &str,
) -> Config {
    write_file(dir, "alerts-webhook-secret", webhook_secret, 0o600);
    write_file(dir, "smtp-password", SMTP_PASSWORD, 0o600);
    let mut text =
        "[alerts]\ndigest-interval-minutes = 15\ngrace-seconds = 60\nreminder-hours = 24\n"
            .to_owned();
    if let Some(webhook) = webhook {
        text.push_str(&format!(
            "\n[alerts.webhook]\nurl = \"{}\"\nsecret = {{ file = \"alerts-webhook-secret\" }}\n\
             ca-file = \"webhook.pem\"\nrequest-timeout-seconds = 600\n",
            webhook.url()
        ));
    }
    if let Some(smtp) = smtp {
        text.push_str(&format!(
            "\n[alerts.email]\nsmtp-host = \"127.0.0.1\"\nsmtp-port = {}\ntls = \"wrapper\"\n\
             username = \"{SMTP_USERNAME}\"\npassword = {{ file = \"smtp-password\" }}\n\
             from = \"smaregi-relay <relay@shop.example>\"\n\
             to = [\"owner@shop.example\", \"staff@shop.example\"]\nca-file = \"smtp.pem\"\n\
             request-timeout-seconds = 600\n",
            smtp.address.port()
        ));
    }
    let path = common::write_config(dir, &text);
    config::load(&path).unwrap().config
}

fn digest(raised: Vec<Alert>, resolved: Vec<Alert>, active: Vec<Alert>) -> Digest {
    Digest {
        raised,
        resolved,
        active,
        sequence: 0,
    }
}

fn keys(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|alert| alert["key"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_digest_is_posted_over_https_signed_the_standard_webhooks_way() {
    let temp = tempfile::tempdir().unwrap();
    let receiver = WebhookReceiver::start(temp.path()).await;
    let config = load_config(temp.path(), Some(&receiver), None, WEBHOOK_SECRET);
    let notifier = WebhookNotifier::new(config.alerts.webhook.as_ref().unwrap(), HOST).unwrap();

    let sent = digest(vec![paused()], vec![csv_rejected()], vec![parked(7)]);
    notifier.send(&sent).await.unwrap();
    let log = receiver.wait_for(|log| log.digests.len() == 1).await;
    assert_eq!(log.bad_signatures, 0);
    assert!(log.ids[0].starts_with("alerts_"), "{}", log.ids[0]);
    assert_eq!(
        log.digests[0],
        json!({
            "type": "alerts.digest",
            "host": HOST,
            "raised": [{
                "event": "upstream.paused",
                "severity": "critical",
                "key": "upstream.paused:smaregi",
                "japanese": "スマレジへの送信を停止しました（認証エラー）",
                "english": "Delivery to Smaregi is paused (credential error)",
                "since": 1_795_392_900_000u64,
            }],
            "resolved": [serde_json::to_value(csv_rejected()).unwrap()],
            "active": [serde_json::to_value(parked(7)).unwrap()],
        })
    );

    // The same digest again (a retry) is the same message to the receiver.
    notifier.send(&sent).await.unwrap();
    let log = receiver.wait_for(|log| log.digests.len() == 2).await;
    assert_eq!(log.ids[0], log.ids[1]);

    // Signed with another secret: the receiver refuses it, and that is an error.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(&receiver.certificate, other.path().join("webhook.pem")).unwrap();
    let config = load_config(
        other.path(),
        Some(&receiver),
        None,
        "another-secret-0123456789abcdef",
    );
    let wrong = WebhookNotifier::new(config.alerts.webhook.as_ref().unwrap(), HOST).unwrap();
    let error = wrong.send(&sent).await.unwrap_err();
    assert!(
        matches!(error, AlertsError::WebhookRefused { status: 401, .. }),
        "{error}"
    );
    assert_eq!(receiver.log.borrow().bad_signatures, 1);
}

#[tokio::test]
async fn a_webhook_with_an_untrusted_certificate_is_not_sent_to() {
    let temp = tempfile::tempdir().unwrap();
    let receiver = WebhookReceiver::start(temp.path()).await;
    let mut config = load_config(temp.path(), Some(&receiver), None, WEBHOOK_SECRET);
    config.alerts.webhook.as_mut().unwrap().ca_file = None;
    let notifier = WebhookNotifier::new(config.alerts.webhook.as_ref().unwrap(), HOST).unwrap();
    let error = notifier
        .send(&digest(vec![paused()], vec![], vec![]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, AlertsError::WebhookUnreachable(_)),
        "{error}"
    );
    assert!(receiver.log.borrow().digests.is_empty());
}

#[tokio::test]
async fn a_digest_is_mailed_over_implicit_tls_after_logging_in() {
    let temp = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(temp.path(), Some((SMTP_USERNAME, SMTP_PASSWORD))).await;
    let config = load_config(temp.path(), None, Some(&smtp), WEBHOOK_SECRET);
    let notifier = EmailNotifier::new(config.alerts.email.as_ref().unwrap(), HOST).unwrap();

    notifier
        .send(&digest(
            vec![paused()],
            vec![csv_rejected()],
            vec![parked(7)],
        ))
        .await
        .unwrap();
    let log = smtp.wait_for(|log| log.mails.len() == 1).await;
    let mail = &log.mails[0];
    assert_eq!(
        mail.login,
        Some((SMTP_USERNAME.to_owned(), SMTP_PASSWORD.to_owned()))
    );
    assert_eq!(mail.from, "relay@shop.example");
    assert_eq!(mail.to, ["owner@shop.example", "staff@shop.example"]);
    assert_eq!(
        mail.subject,
        "[smaregi-relay] 要対応 2件 / 2 problems need attention"
    );
    let body = &mail.body;
    let at = |needle: &str| {
        body.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} is not in:\n{body}"))
    };
    assert!(at("smaregi-relay（shop-pc）") < at("新しい問題（1件）"));
    assert!(at("新しい問題（1件）") < at("［重大］スマレジへの送信を停止しました（認証エラー）"));
    assert!(
        at("解決した問題（1件）") < at("［注意］CSVファイル products.csv を取り込めませんでした")
    );
    assert!(at("継続中の問題（1件）") < at("ジョブ 7 が保留になりました"));
    // Japanese first, then English.
    assert!(at("ジョブ 7 が保留になりました") < at("Alert digest from smaregi-relay on shop-pc."));
    assert!(
        at("New problems (1)") < at("[critical] Delivery to Smaregi is paused (credential error)")
    );
    assert!(at("Resolved (1)") < at("[warning] The CSV file products.csv was rejected"));
    assert!(at("Still active (1)") < at("Job 7 is parked"));
    assert!(
        mail.raw.contains("Content-Transfer-Encoding: base64"),
        "{}",
        mail.raw
    );
    assert!(!mail.raw.contains(SMTP_PASSWORD));
}

#[tokio::test]
async fn with_starttls_the_digest_is_mailed_after_the_upgrade() {
    let temp = tempfile::tempdir().unwrap();
    let smtp =
        SmtpServer::start_with(temp.path(), Some((SMTP_USERNAME, SMTP_PASSWORD)), true).await;
    let mut config = load_config(temp.path(), None, Some(&smtp), WEBHOOK_SECRET);
    config.alerts.email.as_mut().unwrap().tls = SmtpTls::Starttls;
    let notifier = EmailNotifier::new(config.alerts.email.as_ref().unwrap(), HOST).unwrap();
    notifier
        .send(&digest(vec![], vec![csv_rejected()], vec![]))
        .await
        .unwrap();
    let log = smtp.wait_for(|log| log.mails.len() == 1).await;
    assert_eq!(
        log.mails[0].subject,
        "[smaregi-relay] 解決 1件 / 1 problem resolved"
    );
    assert!(log.mails[0].login.is_some());

    // Implicit TLS against a server that expects STARTTLS fails: no
    // falling back to anything else.
    config.alerts.email.as_mut().unwrap().tls = SmtpTls::Wrapper;
    let wrapper = EmailNotifier::new(config.alerts.email.as_ref().unwrap(), HOST).unwrap();
    let error = wrapper
        .send(&digest(vec![paused()], vec![], vec![]))
        .await
        .unwrap_err();
    assert!(matches!(error, AlertsError::Smtp(_)), "{error}");
    assert_eq!(smtp.log.borrow().mails.len(), 1);
}

#[tokio::test]
async fn a_wrong_smtp_password_is_an_error_and_nothing_is_sent() {
    let temp = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(temp.path(), Some((SMTP_USERNAME, "the-real-password"))).await;
    let config = load_config(temp.path(), None, Some(&smtp), WEBHOOK_SECRET);
    let notifier = EmailNotifier::new(config.alerts.email.as_ref().unwrap(), HOST).unwrap();
    let error = notifier
        .send(&digest(vec![paused()], vec![], vec![]))
        .await
        .unwrap_err();
    assert!(matches!(error, AlertsError::Smtp(_)), "{error}");
    assert!(!error.to_string().contains(SMTP_PASSWORD), "{error}");
    assert_eq!(smtp.log.borrow().failed_logins, 1);
    assert!(smtp.log.borrow().mails.is_empty());
}

#[tokio::test]
async fn secrets_never_show_in_debug_output() {
    let temp = tempfile::tempdir().unwrap();
    let receiver = WebhookReceiver::start(temp.path()).await;
    let smtp = SmtpServer::start(temp.path(), Some((SMTP_USERNAME, SMTP_PASSWORD))).await;
    let config = load_config(temp.path(), Some(&receiver), Some(&smtp), WEBHOOK_SECRET);
    let notifier = Notifier::from_config(&config.alerts, HOST).unwrap();
    let text = format!("{notifier:?} {:?}", config.alerts);
    for secret in [
        WEBHOOK_SECRET,
        SMTP_PASSWORD,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(
        text.contains("WebhookNotifier") && text.contains("EmailNotifier"),
        "{text}"
    );
}

/// A paused clock jumps straight to the next timer whenever the runtime
/// parks, even while loopback I/O is under way; with a request's timeout
/// as the next timer, the request would time out at once. A ticker makes
/// every jump at most `step`, so a request with a 600 s timeout has
/// `600 s / step` parks to finish in, while an hour of virtual time still
/// passes in about a second. (Reminders, a day apart, are left to the
/// digest core's unit tests.)
fn keep_virtual_time_moving_slowly(step: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(step);
        loop {
            ticker.tick().await;
        }
    });
}

struct Running {
    active: watch::Sender<Vec<Alert>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_run(config: &Config) -> Running {
    let notifier = Notifier::from_config(&config.alerts, HOST).unwrap();
    let policy = DigestPolicy::from_config(&config.alerts);
    let (active, receiver) = watch::channel(Vec::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(alerts::run(receiver, notifier, policy, shutdown.clone()));
    Running {
        active,
        shutdown,
        task,
    }
}

/// 500 jobs parked over five seconds.
async fn burst(active: &watch::Sender<Vec<Alert>>) {
    for id in 0..500 {
        active.send_modify(|list| list.push(parked(id)));
        if id % 100 == 99 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    }
}

/// The digest loop over virtual time: the clock is paused and advances
/// only when every task waits, so hours pass in milliseconds and no test
/// step waits on a real timer.
#[tokio::test(start_paused = true)]
async fn a_burst_is_one_digest_a_resolution_one_more_and_a_failed_digest_arrives_later() {
    keep_virtual_time_moving_slowly(Duration::from_millis(20));
    let temp = tempfile::tempdir().unwrap();
    let webhook = WebhookReceiver::start(temp.path()).await;
    let config = load_config(temp.path(), Some(&webhook), None, WEBHOOK_SECRET);
    let Running {
        active,
        shutdown,
        task,
    } = start_run(&config);
    let start = Instant::now();

    burst(&active).await;
    let log = webhook.wait_for(|log| !log.digests.is_empty()).await;
    let waited = start.elapsed();
    // After the grace, and well before the 15-minute interval: virtual
    // time runs on while the runtime waits for loopback I/O, so a loaded
    // machine may deliver it some virtual seconds late.
    assert!(
        (Duration::from_secs(60)..Duration::from_secs(5 * 60)).contains(&waited),
        "the first digest went after {waited:?}, not after the one-minute grace"
    );
    let first = &log.digests[0];
    assert_eq!(first["raised"].as_array().unwrap().len(), 500);
    assert_eq!(
        (keys(&first["resolved"]).len(), keys(&first["active"]).len()),
        (0, 0)
    );

    // An hour passes with the jobs still parked: nothing more is sent (a
    // reminder would come after 24 h).
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(webhook.log.borrow().digests.len(), 1);

    // Every job is replayed and succeeds: one digest of resolutions.
    active.send_replace(Vec::new());
    let log = webhook.wait_for(|log| log.digests.len() == 2).await;
    let second = &log.digests[1];
    assert_eq!(second["resolved"].as_array().unwrap().len(), 500);
    assert_eq!(
        (keys(&second["raised"]).len(), keys(&second["active"]).len()),
        (0, 0)
    );

    // The receiver goes down. Smaregi refuses our credentials and a CSV is
    // rejected; the digest that says so cannot be delivered.
    webhook.set_up(false);
    active.send_replace(vec![paused(), csv_rejected()]);
    webhook.wait_for(|log| log.refused >= 1).await;
    // The CSV is fixed while it is down; the retry fails too.
    active.send_replace(vec![paused()]);
    webhook.wait_for(|log| log.refused >= 2).await;
    webhook.set_up(true);

    // What could not be delivered arrives later, merged with what changed.
    let log = webhook.wait_for(|log| log.digests.len() == 3).await;
    let third = &log.digests[2];
    assert_eq!(keys(&third["raised"]), ["upstream.paused:smaregi"]);
    assert_eq!(
        keys(&third["resolved"]),
        ["mapping.csv_rejected:products.csv"]
    );
    assert_eq!(keys(&third["active"]), Vec::<&str>::new());

    // Nothing else is owed.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(webhook.log.borrow().digests.len(), 3);

    shutdown.cancel();
    task.await.unwrap();
}

/// The same by e-mail. lettre's SMTP conversation takes many more parks
/// of the runtime than an HTTPS POST, hence the finer ticker.
#[tokio::test(start_paused = true)]
async fn by_e_mail_a_burst_is_one_message_and_a_failed_one_arrives_later() {
    keep_virtual_time_moving_slowly(Duration::from_millis(20));
    let temp = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start(temp.path(), Some((SMTP_USERNAME, SMTP_PASSWORD))).await;
    let config = load_config(temp.path(), None, Some(&smtp), WEBHOOK_SECRET);
    let Running {
        active,
        shutdown,
        task,
    } = start_run(&config);

    burst(&active).await;
    let mails = smtp.wait_for(|log| !log.mails.is_empty()).await.mails;
    assert_eq!(
        mails[0].subject,
        "[smaregi-relay] 要対応 500件 / 500 problems need attention"
    );
    assert!(mails[0].body.contains("ほか450件") && mails[0].body.contains("and 450 more"));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(smtp.log.borrow().mails.len(), 1);

    active.send_replace(Vec::new());
    let mails = smtp.wait_for(|log| log.mails.len() == 2).await.mails;
    assert_eq!(
        mails[1].subject,
        "[smaregi-relay] 解決 500件 / 500 problems resolved"
    );

    smtp.set_up(false);
    active.send_replace(vec![paused(), csv_rejected()]);
    smtp.wait_for(|log| log.refused >= 1).await;
    active.send_replace(vec![paused()]);
    smtp.set_up(true);
    let mails = smtp.wait_for(|log| log.mails.len() == 3).await.mails;
    assert_eq!(
        mails[2].subject,
        "[smaregi-relay] 要対応 1件 / 1 problem needs attention"
    );
    let body = &mails[2].body;
    assert!(
        body.contains("新しい問題（1件）:\n- ［重大］スマレジへの送信を停止しました"),
        "{body}"
    );
    assert!(
        body.contains("解決した問題（1件）:\n- ［注意］CSVファイル products.csv"),
        "{body}"
    );
    assert_eq!(smtp.log.borrow().mails.len(), 3);

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_a_notifier_run_consumes_the_channel_until_shutdown() {
    let (active, receiver) = watch::channel(Vec::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(alerts::run(
        receiver,
        Notifier::default(),
        DigestPolicy::default(),
        shutdown.clone(),
    ));
    active.send_replace(vec![paused()]);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(
        !active.is_closed(),
        "the assessment's sends must keep working"
    );
    shutdown.cancel();
    task.await.unwrap();
}
