//! Alert digests: the changing set of active problems, turned into
//! deduplicated digests and delivered by webhook and e-mail.
//!
//! This module owns the digest policy ([`digest`], pure), the notifiers
//! ([`webhook`], [`email`]) and the loop that drives them ([`run`]). The
//! health assessment elsewhere decides what is a problem, logs it and puts
//! it in systemd's `STATUS=`; it hands this module the set of problems
//! active now through a `watch` channel.
//!
//! This module must never block or slow the relay's work: a notifier that
//! is down only delays its own digests. It must never log, print or
//! `Debug`-format the webhook secret or the SMTP password. It keeps
//! nothing on disk: after a restart the assessment recomputes the active
//! problems and they are reported again as raised; a digest not yet
//! delivered when the daemon stops is not sent.
//!
//! Each notifier keeps its own digest state, so a webhook that is down does
//! not cause repeated e-mails, nor the other way round.
//!
//! The daemon builds the [`Notifier`] before anything starts (a bad CA
//! file is a config error, exit 78) and runs [`run`] on the channel that
//! the admin monitor (`admin::monitor`) fills after each assessment, with
//! the time each problem was first seen.

pub mod digest;
pub mod email;
pub mod webhook;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use digest::{Digest, DigestPolicy, Digester};
pub use email::EmailNotifier;
pub use webhook::WebhookNotifier;

use crate::config::AlertsConfig;

/// One active problem, as the health assessment sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// Stable event name, e.g. "outbox.job_parked", "upstream.paused",
    /// "mapping.csv_rejected", "tls.certificate_expiring",
    /// "storage.disk_nearly_full".
    pub event: String,
    pub severity: Severity,
    /// Identifies this problem across assessments, e.g. "outbox.job_parked:1234".
    pub key: String,
    /// Staff-facing text, Japanese.
    pub japanese: String,
    /// The same in English.
    pub english: String,
    /// Unix millis when first seen.
    pub since: u64,
}

/// How urgent a problem is, as the health assessment weighs it.
pub use crate::health::Severity;

impl Alert {
    /// An alert for a problem of the health assessment, first seen at
    /// `since` (unix millis): the assessment does not keep that time.
    pub fn from_problem(problem: &crate::health::Problem, since: u64) -> Self {
        Self {
            event: problem.event.to_owned(),
            severity: problem.severity,
            key: problem.key.clone(),
            japanese: problem.japanese.clone(),
            english: problem.english.clone(),
            since,
        }
    }
}

/// The stable event names, as the health assessment names them.
pub use crate::health::events;

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot set up the alert webhook client: {0}")]
    Client(reqwest::Error),
    #[error("the alert webhook did not answer in time: {0}")]
    WebhookTimeout(reqwest::Error),
    #[error("cannot reach the alert webhook: {0}")]
    WebhookUnreachable(reqwest::Error),
    #[error("the alert webhook answered {status}: {body}")]
    WebhookRefused { status: u16, body: String },
    #[error("`{address}` is not an e-mail address: {source}")]
    Address {
        address: String,
        source: lettre::address::AddressError,
    },
    #[error("CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot set up TLS for SMTP: {0}")]
    SmtpTls(lettre::transport::smtp::Error),
    #[error("cannot build the alert e-mail: {0}")]
    Message(#[from] lettre::error::Error),
    #[error("the SMTP server did not take the alert e-mail: {0}")]
    Smtp(lettre::transport::smtp::Error),
}

/// Where digests go: a webhook, e-mail, both or neither.
#[derive(Debug, Default)]
pub struct Notifier {
    pub webhook: Option<WebhookNotifier>,
    pub email: Option<EmailNotifier>,
}

impl Notifier {
    /// The notifiers `[alerts]` configures; `host` names this machine in
    /// every digest.
    pub fn from_config(config: &AlertsConfig, host: &str) -> Result<Self, AlertsError> {
        Ok(Self {
            webhook: (config.webhook.as_ref())
                .map(|webhook| WebhookNotifier::new(webhook, host))
                .transpose()?,
            email: (config.email.as_ref())
                .map(|email| EmailNotifier::new(email, host))
                .transpose()?,
        })
    }

    /// Neither webhook nor e-mail.
    pub fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.email.is_none()
    }
}

/// This machine's name, for digests: the kernel's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Turns the changing set of active problems into digests and delivers
/// them, until `shutdown`. With no notifier it only consumes the channel.
pub async fn run(
    active: watch::Receiver<Vec<Alert>>,
    notifier: Notifier,
    policy: DigestPolicy,
    shutdown: CancellationToken,
) {
    let clock = Clock::start();
    let Notifier { webhook, email } = notifier;
    let webhook_loop = async {
        if let Some(webhook) = &webhook {
            drive(active.clone(), webhook, policy, clock, &shutdown).await;
        }
    };
    let email_loop = async {
        if let Some(email) = &email {
            drive(active.clone(), email, policy, clock, &shutdown).await;
        }
    };
    let consume = async {
        // Keeps the channel read, so the sender never sees it closed,
        // whichever notifiers there are.
        let mut active = active.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = active.changed() => if changed.is_err() {
                    shutdown.cancelled().await;
                    return;
                },
            }
        }
    };
    tokio::join!(webhook_loop, email_loop, consume);
}

/// A notifier that [`run`] drives.
pub(crate) trait Sink {
    /// Names the notifier in logs.
    const NAME: &'static str;
    async fn send(&self, digest: &Digest) -> Result<(), AlertsError>;
}

/// Unix millis that follow tokio's clock, so a paused test clock drives
/// the digests as it does the timers.
#[derive(Debug, Clone, Copy)]
struct Clock {
    unix: u64,
    instant: Instant,
}

impl Clock {
    fn start() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            unix,
            instant: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.instant.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.unix.saturating_add(elapsed)
    }

    fn instant_at(&self, unix: u64) -> Instant {
        self.instant + Duration::from_millis(unix.saturating_sub(self.unix))
    }
}

async fn drive<S: Sink>(
    mut active: watch::Receiver<Vec<Alert>>,
    sink: &S,
    policy: DigestPolicy,
    clock: Clock,
    shutdown: &CancellationToken,
) {
    let mut digester = Digester::new(policy);
    let mut open = true;
    digester.update(&active.borrow_and_update(), clock.now());
    loop {
        if let Some(digest) = digester.take(clock.now()) {
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = sink.send(&digest) => result,
            };
            match result {
                Ok(()) => {
                    digester.delivered(clock.now());
                    info!(
                        event = "alerts.digest_sent",
                        notifier = S::NAME,
                        raised = digest.raised.len(),
                        resolved = digest.resolved.len(),
                        active = digest.active.len(),
                        "alerts: digest sent"
                    );
                }
                Err(e) => {
                    let wait = digester.failed(clock.now());
                    warn!(
                        event = "alerts.delivery_failed",
                        notifier = S::NAME,
                        error = %e,
                        failures = digester.failures(),
                        retry_in_seconds = wait.as_secs(),
                        raised = digest.raised.len(),
                        resolved = digest.resolved.len(),
                        "alerts: digest not delivered; its contents are kept for the next attempt"
                    );
                }
            }
            continue;
        }
        let due = digester.next_due().map(|due| clock.instant_at(due));
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = active.changed(), if open => {
                if changed.is_err() {
                    // The assessment stopped: what it last said stays true.
                    open = false;
                }
            }
            () = sleep_until(due) => {}
        }
        if open {
            digester.update(&active.borrow_and_update(), clock.now());
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_health_problem_becomes_an_alert_with_its_first_sighting() {
        let problem = crate::health::Problem {
            event: events::JOB_PARKED,
            severity: crate::health::Severity::Critical,
            key: "outbox.job_parked:17".into(),
            japanese: "ジョブ 17 が保留になりました".into(),
            english: "Job 17 is parked".into(),
        };
        let alert = Alert::from_problem(&problem, 42);
        assert_eq!(alert.event, "outbox.job_parked");
        assert_eq!(alert.severity, Severity::Critical);
        assert_eq!(
            (alert.key.as_str(), alert.since),
            ("outbox.job_parked:17", 42)
        );
        assert_eq!(
            serde_json::to_value(&alert).unwrap()["severity"],
            "critical"
        );
    }
}
