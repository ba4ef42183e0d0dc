//! Digests as signed JSON POSTs (Standard Webhooks, like the stock
//! batches), over HTTPS only.
//!
//! The body is `{"type": "alerts.digest", "host", "raised", "resolved",
//! "active"}`, each list holding [`Alert`]s. `webhook-id` is derived from
//! the body and the digest's sequence number: a retry of an unchanged
//! digest carries the same id, so a receiver that saw it already can drop
//! it, while a later digest with the same problems (a reminder) does not.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Alert, AlertsError, Digest, Sink};
use crate::config::AlertsWebhookConfig;
use crate::stock::sign;

/// The `type` of every digest body.
pub const DIGEST_TYPE: &str = "alerts.digest";

/// Posts digests to `[alerts.webhook] url`.
pub struct WebhookNotifier {
    http: reqwest::Client,
    url: String,
    key: Vec<u8>,
    host: String,
}

impl fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The host only: some services put a token in the URL's path.
        let host = self.url.split('/').nth(2).unwrap_or_default();
        f.debug_struct("WebhookNotifier")
            .field("url_host", &host)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// The JSON body of a digest.
#[derive(Debug, Serialize)]
pub struct Payload<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub host: &'a str,
    pub raised: &'a [Alert],
    pub resolved: &'a [Alert],
    pub active: &'a [Alert],
}

impl<'a> Payload<'a> {
    pub fn new(host: &'a str, digest: &'a Digest) -> Self {
        Self {
            kind: DIGEST_TYPE,
            host,
            raised: &digest.raised,
            resolved: &digest.resolved,
            active: &digest.active,
        }
    }
}

impl WebhookNotifier {
    pub fn new(config: &AlertsWebhookConfig, host: &str) -> Result<Self, AlertsError> {
        let tls = crate::tls::client_config(config.ca_file.as_deref())?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(true)
            // Digests are minutes apart: a kept-alive connection would
            // mostly be dead by the next one.
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(config.request_timeout_seconds))
            .user_agent(concat!("smaregi-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(AlertsError::Client)?;
        Ok(Self {
            http,
            url: config.url.clone(),
            key: sign::key_of(config.secret.expose()),
            host: host.to_owned(),
        })
    }

    /// Posts one digest; any answer but 2xx is a failure.
    pub async fn send(&self, digest: &Digest) -> Result<(), AlertsError> {
        let body = serde_json::to_vec(&Payload::new(&self.host, digest)).expect("serialises");
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(&digest.sequence.to_be_bytes());
        context.update(&body);
        let id: String = std::iter::once("alerts_".to_owned())
            .chain(
                context.finish().as_ref()[..16]
                    .iter()
                    .map(|b| format!("{b:02x}")),
            )
            .collect();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign::signature(&self.key, &id, timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // Some services put a token in the URL's path; errors are logged.
                let e = e.without_url();
                if e.is_timeout() {
                    AlertsError::WebhookTimeout(e)
                } else {
                    AlertsError::WebhookUnreachable(e)
                }
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(AlertsError::WebhookRefused {
            status: status.as_u16(),
            body,
        })
    }
}

impl Sink for WebhookNotifier {
    const NAME: &'static str = "webhook";

    async fn send(&self, digest: &Digest) -> Result<(), AlertsError> {
        WebhookNotifier::send(self, digest).await
    }
}
