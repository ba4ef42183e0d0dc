//! Semantic rules over a structurally valid config.
//!
//! Pure: no I/O. Each problem names the key it is about; the loader turns
//! the key into a line and column.

use std::net::IpAddr;

use super::{
    AdminConfig, AlertsConfig, DaemonConfig, IntakeConfig, ListenerConfig, LoggingConfig,
    MappingConfig, OrdersConfig, OutboxConfig, SmaregiConfig, StockConfig, StorageConfig,
    UnmappedPolicy,
};

/// Shorter shared secrets are refused: they can be guessed.
pub const MIN_SECRET_CHARS: usize = 16;
pub const MAX_CACHE_CAPACITY_MIB: u64 = 4096;
/// The unit's `TimeoutStopSec=30s` must leave room for the final commit.
pub const MAX_SHUTDOWN_TIMEOUT_SECONDS: u64 = 20;
pub const MAX_OUTBOX_WORKERS: u16 = 256;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static [&'static str],
    pub message: String,
}

fn problem(key: &'static [&'static str], message: impl Into<String>) -> Problem {
    Problem {
        key,
        message: message.into(),
    }
}

/// The rules of one config section. Run on each section as soon as it
/// has been deserialised, so that one run reports every section's problems.
pub(super) trait Validate {
    fn validate(&self, problems: &mut Vec<Problem>);
}

fn check(problems: &mut Vec<Problem>, ok: bool, key: &'static [&'static str], message: String) {
    if !ok {
        problems.push(problem(key, message));
    }
}

impl Validate for ListenerConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        check(
            problems,
            (1..=65_536).contains(&self.max_connections),
            &["listener", "max-connections"],
            format!("{} is out of range: use 1 to 65536", self.max_connections),
        );
        const HANDSHAKE: &[&str] = &["listener", "handshake-timeout-seconds"];
        const HEADER: &[&str] = &["listener", "header-timeout-seconds"];
        const BODY: &[&str] = &["listener", "body-timeout-seconds"];
        for (key, value) in [
            (HANDSHAKE, self.handshake_timeout_seconds),
            (HEADER, self.header_timeout_seconds),
            (BODY, self.body_timeout_seconds),
        ] {
            check(
                problems,
                (1..=600).contains(&value),
                key,
                format!("{value} is out of range: use 1 to 600 seconds"),
            );
        }
        const CERTIFICATE: &[&str] = &["listener", "tls-certificate"];
        const PRIVATE_KEY: &[&str] = &["listener", "tls-private-key"];
        let (key, present, absent) = match (&self.tls_certificate, &self.tls_private_key) {
            (Some(_), None) => (CERTIFICATE, "tls-certificate", "tls-private-key"),
            (None, Some(_)) => (PRIVATE_KEY, "tls-private-key", "tls-certificate"),
            _ => return,
        };
        problems.push(problem(
            key,
            format!(
                "`{present}` is set but `{absent}` is not: set both, or neither to use a \
                 generated self-signed certificate"
            ),
        ));
    }
}

impl Validate for StorageConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        let cache = self.cache_capacity_mib;
        check(
            problems,
            (1..=MAX_CACHE_CAPACITY_MIB).contains(&cache),
            &["storage", "cache-capacity-mib"],
            format!("must be between 1 and {MAX_CACHE_CAPACITY_MIB}, not {cache}"),
        );
    }
}

impl Validate for LoggingConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        if let Err(reason) = check_log_filter(&self.level) {
            problems.push(problem(
                &["logging", "level"],
                format!(
                    "`{}` is not a log filter ({reason}); use e.g. \"info\" or \"warn,smaregi_relay=debug\"",
                    self.level
                ),
            ));
        }
    }
}

/// A `tracing` filter whose bare words are all levels.
///
/// `EnvFilter` reads a bare word that is not a level as a module name, so
/// a typo such as `"wran"` would silently switch almost all logging off.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err("it is empty".to_owned());
    }
    for directive in filter.split(',').map(str::trim) {
        let names_a_target = directive.contains('=') || directive.contains('[');
        if !names_a_target
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "`{directive}` is not a level: use off, error, warn, info, debug or trace"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Validate for DaemonConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        let timeout = self.shutdown_timeout_seconds;
        check(
            problems,
            (1..=MAX_SHUTDOWN_TIMEOUT_SECONDS).contains(&timeout),
            &["daemon", "shutdown-timeout-seconds"],
            format!("must be between 1 and {MAX_SHUTDOWN_TIMEOUT_SECONDS}, not {timeout}"),
        );
    }
}

impl Validate for IntakeConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        check(
            problems,
            (64 * 1024..=256 * 1024 * 1024).contains(&self.max_body_bytes),
            &["intake", "max-body-bytes"],
            format!(
                "{} is out of range: use 65536 (64 KiB) to 268435456 (256 MiB)",
                self.max_body_bytes
            ),
        );
        check(
            problems,
            self.dedup_window_seconds <= 7 * 24 * 3600,
            &["intake", "dedup-window-seconds"],
            format!(
                "{} is out of range: use 0 to 604800 (a week)",
                self.dedup_window_seconds
            ),
        );
        check(
            problems,
            (1..=24 * 365).contains(&self.retention_hours)
                && self.retention_hours * 3600 >= self.dedup_window_seconds,
            &["intake", "retention-hours"],
            format!(
                "{} is out of range: use 1 to 8760, and no less than the dedup window",
                self.retention_hours
            ),
        );
        for (key, path) in [
            (&["intake", "notify-path"][..], &self.notify_path),
            (&["intake", "webhook-path"][..], &self.webhook_path),
        ] {
            check(
                problems,
                is_url_path(path),
                key,
                format!(
                    "`{path}` is not a URL path: it must start with `/` and hold no spaces, `?` or `#`"
                ),
            );
        }
        check(
            problems,
            self.notify_path != self.webhook_path,
            &["intake", "webhook-path"],
            "must differ from `notify-path`".into(),
        );
        check(
            problems,
            is_parameter_name(&self.secret_parameter),
            &["intake", "secret-parameter"],
            format!(
                "`{}` is not a parameter name: use 1 to 64 of A-Z a-z 0-9 _ -",
                self.secret_parameter
            ),
        );
    }
}

impl Validate for SmaregiConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        if let Err(message) = check_endpoint(&self.endpoint) {
            problems.push(problem(&["smaregi", "endpoint"], message));
        }
        check(
            problems,
            is_contract_id(&self.contract_id),
            &["smaregi", "contract-id"],
            format!(
                "`{}` is not a contract id (契約ID): use 1 to 64 of A-Z a-z 0-9 _",
                self.contract_id
            ),
        );
        check(
            problems,
            is_terminal_id(&self.terminal_id),
            &["smaregi", "terminal-id"],
            format!(
                "`{}` is not a terminal id (端末ID): 1 to 9 digits, not starting with 0",
                self.terminal_id
            ),
        );
        const CONNECT: &[&str] = &["smaregi", "connect-timeout-seconds"];
        const REQUEST: &[&str] = &["smaregi", "request-timeout-seconds"];
        for (key, value) in [
            (CONNECT, self.connect_timeout_seconds),
            (REQUEST, self.request_timeout_seconds),
        ] {
            check(
                problems,
                (1..=600).contains(&value),
                key,
                format!("{value} is out of range: use 1 to 600 seconds"),
            );
        }
        check(
            problems,
            (1..=MAX_LOOKUP_WINDOW_HOURS).contains(&self.lookup_window_hours),
            &["smaregi", "lookup-window-hours"],
            format!(
                "{} is out of range: use 1 to {MAX_LOOKUP_WINDOW_HOURS} (both sides together stay within Smaregi's 31-day search limit)",
                self.lookup_window_hours
            ),
        );
    }
}

/// Half of Smaregi's 31-day search window, rounded down to whole days.
const MAX_LOOKUP_WINDOW_HOURS: u64 = 15 * 24;

/// Smaregi's 端末ID: `^[1-9][0-9]{0,8}$` (SMAREGI.md §4).
pub fn is_terminal_id(text: &str) -> bool {
    (1..=9).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_digit())
        && !text.starts_with('0')
}

impl Validate for OutboxConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        let workers = self.workers;
        check(
            problems,
            (1..=MAX_OUTBOX_WORKERS).contains(&workers),
            &["outbox", "workers"],
            format!("must be between 1 and {MAX_OUTBOX_WORKERS}, not {workers}"),
        );
        check(
            problems,
            self.max_age_hours >= 1,
            &["outbox", "max-age-hours"],
            "must be at least 1".into(),
        );
        check(
            problems,
            self.retry_schedule_seconds.windows(2).all(|w| w[0] <= w[1])
                && self
                    .retry_schedule_seconds
                    .last()
                    .is_none_or(|&last| last <= self.retry_repeat_seconds),
            &["outbox", "retry-schedule-seconds"],
            "the delays must not shrink, and none may exceed `retry-repeat-seconds`".into(),
        );
        check(
            problems,
            self.retry_repeat_seconds >= 1,
            &["outbox", "retry-repeat-seconds"],
            "must be at least 1".into(),
        );
        check(
            problems,
            self.retention_hours >= 1,
            &["outbox", "retention-hours"],
            "must be at least 1".into(),
        );
        for (upstream, limit) in &self.rate_limit {
            check(
                problems,
                (0.01..=1000.0).contains(&limit.per_second) && (1..=1000).contains(&limit.burst),
                &["outbox", "rate-limit"],
                format!(
                    "`{upstream}`: per-second must be 0.01 to 1000 and burst 1 to 1000, not {} and {}",
                    limit.per_second, limit.burst
                ),
            );
        }
    }
}

impl Validate for MappingConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        let ranges: [(&'static [&'static str], u64, std::ops::RangeInclusive<u64>); 6] = [
            (
                &["mapping", "poll-interval-seconds"],
                self.poll_interval_seconds,
                1..=3600,
            ),
            (
                &["mapping", "rescan-interval-seconds"],
                self.rescan_interval_seconds,
                1..=86_400,
            ),
            (
                &["mapping", "settle-milliseconds"],
                self.settle_milliseconds,
                0..=60_000,
            ),
            (
                &["mapping", "max-file-bytes"],
                self.max_file_bytes,
                1024..=1024 * 1024 * 1024,
            ),
            (&["mapping", "max-rows"], self.max_rows, 1..=10_000_000),
            (
                &["mapping", "external-code-max-length"],
                u64::from(self.external_code_max_length),
                1..=255,
            ),
        ];
        for (key, value, range) in ranges {
            check(
                problems,
                range.contains(&value),
                key,
                format!(
                    "must be between {} and {}, not {value}",
                    range.start(),
                    range.end()
                ),
            );
        }
        check(
            problems,
            self.external_code_symbols
                .chars()
                .all(|c| c.is_ascii_punctuation() && !matches!(c, ',' | '"')),
            &["mapping", "external-code-symbols"],
            format!(
                "`{}` may hold only half-width symbols other than `,` and `\"`, e.g. \"-_.\"",
                self.external_code_symbols
            ),
        );
    }
}

impl Validate for StockConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        for (i, store) in self.stores.iter().enumerate() {
            check(
                problems,
                is_store_id(store),
                &["stock", "stores"],
                format!("`{store}` is not a store id (店舗ID): use 1 to 9 digits"),
            );
            check(
                problems,
                !self.stores[..i].contains(store),
                &["stock", "stores"],
                format!("store `{store}` is listed twice"),
            );
        }
        check(
            problems,
            self.backfill_interval_minutes <= 24 * 60,
            &["stock", "backfill-interval-minutes"],
            format!(
                "{} is out of range: use 0 (off) to 1440",
                self.backfill_interval_minutes
            ),
        );
        if let Some(downstream) = &self.downstream {
            if let Err(message) = check_endpoint(&downstream.url) {
                problems.push(problem(&["stock", "downstream", "url"], message));
            }
            for (i, store) in downstream.sum_stores.iter().enumerate() {
                check(
                    problems,
                    is_store_id(store) && !downstream.sum_stores[..i].contains(store),
                    &["stock", "downstream", "sum-stores"],
                    format!("`{store}` is not a store id (店舗ID), or is listed twice"),
                );
                check(
                    problems,
                    self.stores.is_empty() || self.stores.contains(store),
                    &["stock", "downstream", "sum-stores"],
                    format!("store `{store}` is summed but not in [stock] stores"),
                );
            }
            check(
                problems,
                downstream.sum_stores.len() != 1,
                &["stock", "downstream", "sum-stores"],
                "a sum needs at least two stores".to_owned(),
            );
            check(
                problems,
                (1..=10_000).contains(&downstream.batch_size),
                &["stock", "downstream", "batch-size"],
                format!("{} is out of range: use 1 to 10000", downstream.batch_size),
            );
            check(
                problems,
                (1..=600).contains(&downstream.request_timeout_seconds),
                &["stock", "downstream", "request-timeout-seconds"],
                format!(
                    "{} is out of range: use 1 to 600",
                    downstream.request_timeout_seconds
                ),
            );
        }
    }
}

impl Validate for OrdersConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        if let Some(store) = &self.default_store_id {
            check(
                problems,
                is_store_id(store),
                &["orders", "default-store-id"],
                format!("`{store}` is not a store id (店舗ID): use 1 to 9 digits"),
            );
        }
        if let Some(terminal) = &self.terminal_id {
            check(
                problems,
                is_terminal_id(terminal),
                &["orders", "terminal-id"],
                format!("`{terminal}` is not a terminal id (端末ID): use 1 to 9 digits, not starting with 0"),
            );
        }
        match (&self.unmapped, &self.dummy_product_id) {
            (UnmappedPolicy::DummyProduct, None) => problems.push(problem(
                &["orders", "unmapped"],
                "`dummy-product` needs `dummy-product-id`, the 商品ID unmapped lines are registered as",
            )),
            (_, Some(id)) => check(
                problems,
                (1..=15).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit()),
                &["orders", "dummy-product-id"],
                format!("`{id}` is not a product id (商品ID): use 1 to 15 digits"),
            ),
            _ => {}
        }
        check(
            problems,
            matches!(self.sum_division, 1 | 2),
            &["orders", "sum-division"],
            format!("{} is not a sumDivision: use 1 or 2", self.sum_division),
        );
        check(
            problems,
            (1024..=16 * 1024 * 1024).contains(&self.max_body_bytes),
            &["orders", "max-body-bytes"],
            format!(
                "{} is out of range: use 1024 to 16777216",
                self.max_body_bytes
            ),
        );
    }
}

impl Validate for AdminConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        if !self.listen.ip().is_loopback() && self.status_token.is_none() {
            problems.push(problem(
                &["admin", "listen"],
                format!(
                    "{} is reachable from the network: set `status-token` too (the page is then \
                     served over HTTPS and asks for the token), or listen on 127.0.0.1",
                    self.listen
                ),
            ));
        }
        if let Err(reason) = crate::health::parse_opening_hours(&self.opening_hours) {
            problems.push(problem(
                &["admin", "opening-hours"],
                format!("{reason}: use e.g. \"10:00-20:00\" (Japan time)"),
            ));
        }
        check(
            problems,
            (1..=365).contains(&self.certificate_warning_days),
            &["admin", "certificate-warning-days"],
            format!(
                "{} is out of range: use 1 to 365",
                self.certificate_warning_days
            ),
        );
        check(
            problems,
            self.disk_free_percent <= 50,
            &["admin", "disk-free-percent"],
            format!("{} is out of range: use 0 to 50", self.disk_free_percent),
        );
        check(
            problems,
            self.backlog_minutes >= 1,
            &["admin", "backlog-minutes"],
            "must be at least 1".into(),
        );
    }
}

impl Validate for AlertsConfig {
    fn validate(&self, problems: &mut Vec<Problem>) {
        let interval = self.digest_interval_minutes;
        let interval_ok = (1..=24 * 60).contains(&interval);
        check(
            problems,
            interval_ok,
            &["alerts", "digest-interval-minutes"],
            format!("{interval} is out of range: use 1 to 1440 (a day)"),
        );
        // Compared with the interval only when that is valid: one mistake,
        // one error.
        check(
            problems,
            self.grace_seconds <= 3600
                && (!interval_ok || self.grace_seconds <= interval.saturating_mul(60)),
            &["alerts", "grace-seconds"],
            format!(
                "{} is out of range: use 0 to 3600, and no more than the digest interval",
                self.grace_seconds
            ),
        );
        let reminder = self.reminder_hours;
        check(
            problems,
            (1..=30 * 24).contains(&reminder) && reminder.saturating_mul(60) >= interval,
            &["alerts", "reminder-hours"],
            format!(
                "{reminder} is out of range: use 1 to 720 (30 days), and no less than the digest \
                 interval"
            ),
        );
        if let Some(webhook) = &self.webhook {
            if let Err(message) = check_https_url(&webhook.url) {
                problems.push(problem(&["alerts", "webhook", "url"], message));
            }
            check(
                problems,
                (1..=600).contains(&webhook.request_timeout_seconds),
                &["alerts", "webhook", "request-timeout-seconds"],
                format!(
                    "{} is out of range: use 1 to 600",
                    webhook.request_timeout_seconds
                ),
            );
        }
        if let Some(email) = &self.email {
            check(
                problems,
                is_host_name(&email.smtp_host),
                &["alerts", "email", "smtp-host"],
                format!(
                    "`{}` is not a host name or IP address (write the bare name, e.g. \
                     \"smtp.example.com\", without a scheme or port)",
                    email.smtp_host
                ),
            );
            check(
                problems,
                email.smtp_port != Some(0),
                &["alerts", "email", "smtp-port"],
                "0 is not a port: use 1 to 65535, usually 465 or 587".into(),
            );
            match (&email.username, &email.password) {
                (Some(_), None) => problems.push(problem(
                    &["alerts", "email", "username"],
                    "`username` is set but `password` is not: set both, or neither to send \
                     without logging in",
                )),
                (None, Some(_)) => problems.push(problem(
                    &["alerts", "email", "password"],
                    "`password` is set but `username` is not: set both, or neither to send \
                     without logging in",
                )),
                (Some(user), Some(_)) if user.is_empty() => {
                    problems.push(problem(&["alerts", "email", "username"], "is empty"))
                }
                _ => {}
            }
            if let Err(e) = email.from.parse::<lettre::message::Mailbox>() {
                problems.push(problem(
                    &["alerts", "email", "from"],
                    format!(
                        "`{}` is not an e-mail address ({e}); write e.g. \
                         \"smaregi-relay <relay@shop.example>\"",
                        email.from
                    ),
                ));
            }
            check(
                problems,
                !email.to.is_empty(),
                &["alerts", "email", "to"],
                "names no recipient: list at least one address".into(),
            );
            for (i, to) in email.to.iter().enumerate() {
                if let Err(e) = to.parse::<lettre::message::Mailbox>() {
                    problems.push(problem(
                        &["alerts", "email", "to"],
                        format!("`{to}` is not an e-mail address ({e})"),
                    ));
                }
                check(
                    problems,
                    !email.to[..i].contains(to),
                    &["alerts", "email", "to"],
                    format!("`{to}` is listed twice"),
                );
            }
            check(
                problems,
                (1..=600).contains(&email.request_timeout_seconds),
                &["alerts", "email", "request-timeout-seconds"],
                format!(
                    "{} is out of range: use 1 to 600",
                    email.request_timeout_seconds
                ),
            );
        }
    }
}

/// An SMTP host: a DNS name or an IP address, nothing around it.
fn is_host_name(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `https://` with a host: alerts leave the shop's network, so never in
/// plain text, not even to loopback.
fn check_https_url(url: &str) -> Result<(), String> {
    match url.strip_prefix("https://") {
        Some(rest) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if authority.is_empty() || authority.starts_with(':') {
                Err(format!("`{url}` has no host"))
            } else if authority.contains('@') {
                Err(format!("`{url}` holds a user name (`@`); remove it"))
            } else if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(format!("`{url}` contains spaces or control characters"))
            } else {
                Ok(())
            }
        }
        None => Err(format!(
            "`{url}` is not an https:// URL: alerts are sent over TLS only"
        )),
    }
}

/// The SMTP password is the mail provider's, not one we ask the operator
/// to generate, so the strength rule for shared secrets does not apply.
const SMTP_PASSWORD: &[&str] = &["alerts", "email", "password"];

/// A problem with a resolved secret's value, if any.
pub fn secret_strength(key: &[&str], value: &str) -> Option<String> {
    if key == SMTP_PASSWORD {
        return None;
    }
    let chars = value.chars().count();
    if chars < MIN_SECRET_CHARS {
        return Some(format!(
            "`{}` is {chars} characters long; use at least {MIN_SECRET_CHARS} (e.g. the output \
             of `openssl rand -hex 24`)",
            key.last().unwrap_or(&"secret")
        ));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some(format!(
            "`{}` contains spaces or control characters, which do not survive forms and headers",
            key.last().unwrap_or(&"secret")
        ));
    }
    None
}

fn is_url_path(path: &str) -> bool {
    path.starts_with('/')
        && !path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
}

fn is_parameter_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_contract_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// 店舗ID: 1 to 9 digits (SMAREGI.md §4).
pub fn is_store_id(id: &str) -> bool {
    (1..=9).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
}

/// TLS only; plain `http://` is accepted for a loopback host, where the
/// Smaregi simulator runs in tests and demos.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if let Some(rest) = endpoint.strip_prefix("https://") {
        return if rest.is_empty() || rest.starts_with('/') {
            Err(format!("`{endpoint}` has no host"))
        } else {
            Ok(())
        };
    }
    if let Some(rest) = endpoint.strip_prefix("http://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            // `http://127.0.0.1:1@evil.example/` is a request to evil.example.
            return Err(format!("`{endpoint}` holds a user name (`@`); remove it"));
        }
        let host = match authority.strip_prefix('[') {
            Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
            None => authority
                .rsplit_once(':')
                .map_or(authority, |(host, _)| host),
        };
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        return if loopback {
            Ok(())
        } else {
            Err(format!(
                "`{endpoint}` is plain HTTP: use https:// (http:// is allowed only to a loopback \
                 address, for the simulator)"
            ))
        };
    }
    Err(format!("`{endpoint}` is not an https:// URL"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mapping_limits_and_code_symbols_are_checked() {
        let mut problems = Vec::new();
        MappingConfig::default().validate(&mut problems);
        assert_eq!(problems, []);
        let bad = MappingConfig {
            max_rows: 0,
            external_code_max_length: 300,
            external_code_symbols: "-,".into(),
            ..MappingConfig::default()
        };
        bad.validate(&mut problems);
        let keys: Vec<_> = problems.iter().map(|p| p.key[1]).collect();
        assert_eq!(
            keys,
            [
                "max-rows",
                "external-code-max-length",
                "external-code-symbols"
            ]
        );
    }

    #[test]
    fn endpoints_must_be_tls_except_to_loopback() {
        assert!(check_endpoint("https://webapi.smaregi.jp/access/").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080/access/").is_ok());
        assert!(check_endpoint("http://[::1]:8080/access/").is_ok());
        assert!(check_endpoint("http://localhost/access/").is_ok());
        assert!(check_endpoint("http://webapi.smaregi.jp/access/").is_err());
        assert!(check_endpoint("http://127.0.0.1.evil.example/").is_err());
        assert!(check_endpoint("http://127.0.0.1:1@evil.example/").is_err());
        assert!(check_endpoint("http://localhost:80@evil.example/access/").is_err());
        assert!(check_endpoint("https:///access").is_err());
        assert!(check_endpoint("ftp://x").is_err());
    }

    #[test]
    fn alert_urls_must_be_https_even_to_loopback() {
        assert!(check_https_url("https://hooks.example.com/alerts").is_ok());
        assert!(check_https_url("https://127.0.0.1:8443/alerts").is_ok());
        assert!(check_https_url("http://127.0.0.1:8443/alerts").is_err());
        assert!(check_https_url("https:///alerts").is_err());
        assert!(check_https_url("https://user:pw@hooks.example.com/").is_err());
        assert!(check_https_url("hooks.example.com").is_err());
    }

    #[test]
    fn smtp_hosts_are_bare_names_or_addresses() {
        for good in [
            "smtp.example.com",
            "localhost",
            "127.0.0.1",
            "::1",
            "mail-1.example.jp",
        ] {
            assert!(is_host_name(good), "{good}");
        }
        for bad in [
            "",
            "smtps://smtp.example.com",
            "smtp.example.com:465",
            "a..b",
            "-a.b",
            "a b",
        ] {
            assert!(!is_host_name(bad), "{bad}");
        }
    }

    #[test]
    fn alert_settings_are_checked_at_their_keys() {
        let mut problems = Vec::new();
        AlertsConfig::default().validate(&mut problems);
        assert_eq!(problems, []);
        let bad = AlertsConfig {
            digest_interval_minutes: 0,
            reminder_hours: 0,
            ..AlertsConfig::default()
        };
        bad.validate(&mut problems);
        let keys: Vec<_> = problems.iter().map(|p| p.key.join(".")).collect();
        assert_eq!(
            keys,
            ["alerts.digest-interval-minutes", "alerts.reminder-hours"]
        );
        problems.clear();
        let grace_too_long = AlertsConfig {
            digest_interval_minutes: 1,
            grace_seconds: 61,
            ..AlertsConfig::default()
        };
        grace_too_long.validate(&mut problems);
        let keys: Vec<_> = problems.iter().map(|p| p.key.join(".")).collect();
        assert_eq!(keys, ["alerts.grace-seconds"]);
    }

    #[test]
    fn the_smtp_password_is_not_held_to_the_shared_secret_rules() {
        assert!(secret_strength(SMTP_PASSWORD, "short pw").is_none());
        assert!(secret_strength(&["alerts", "webhook", "secret"], "short").is_some());
    }

    #[test]
    fn log_filters_with_typos_are_refused() {
        for good in [
            "info",
            "warn,smaregi_relay=debug",
            "TRACE",
            "off",
            "smaregi_relay[commit]=debug",
        ] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
        }
        for bad in ["", " ", "wran", "inf", "info,debugg", "a=b=c"] {
            assert!(check_log_filter(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(secret_strength(&["intake", "secret"], "short").is_some());
        assert!(secret_strength(&["intake", "secret"], "sixteen chars ok").is_some());
        assert!(secret_strength(&["intake", "secret"], "0123456789abcdef").is_none());
    }

    proptest! {
        #[test]
        fn store_ids_are_exactly_one_to_nine_digits(s in "\\PC{0,12}") {
            let expected = (1..=9).contains(&s.len()) && s.chars().all(|c| c.is_ascii_digit());
            prop_assert_eq!(is_store_id(&s), expected);
        }

        #[test]
        fn every_u32_below_a_billion_is_a_store_id(n in 0u32..1_000_000_000) {
            prop_assert!(is_store_id(&n.to_string()));
        }
    }
}
