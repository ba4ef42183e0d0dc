//! The daemon's configuration: one TOML file, strict and fully checked.
//!
//! This module owns the config's types, their named defaults ([`defaults`]),
//! reading secrets ([`secret`]) and turning every problem into a diagnostic
//! with file, line and column. It must never start anything or touch the
//! store: `check-config` runs it on a live system next to a running daemon.
//!
//! Keys are kebab-case and unknown keys are errors. Relative paths (secret
//! files, directories, certificates) are relative to the config file's
//! directory.
//!
//! Loading happens in three passes so that one `check-config` run reports
//! as much as it can:
//! 1. TOML syntax (every syntax error the parser can recover from);
//! 2. each section deserialised on its own (a section's first type or
//!    unknown-key error; other sections are still checked);
//! 3. semantic rules ([`validate`]) and secret resolution, all reported.

mod diagnostic;
pub mod secret;
mod validate;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, IntoDeserializer};
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

pub use diagnostic::{Diagnostic, Diagnostics, Severity};
pub use secret::{Secret, SecretEnvironment};

use diagnostic::{span_of, SourceFile};
use validate::Validate;

/// Where an installed system keeps its config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/smaregi-relay/config.toml";

/// Every default value of the configuration, by name.
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    /// HTTPS listener for Smaregi's notifications and the order API.
    pub const LISTEN_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443);
    pub const STATE_DIRECTORY: &str = "/var/lib/smaregi-relay";
    /// The drop folder for mapping CSVs, inside the state directory.
    pub const DROP_SUBDIRECTORY: &str = "drop";
    pub const CACHE_CAPACITY_MIB: u64 = 32;
    pub const LOG_LEVEL: &str = "info";
    /// Below systemd's default `TimeoutStopSec=` of 90 s, so we finish first.
    pub const SHUTDOWN_TIMEOUT_SECONDS: u64 = 10;
    pub const MAX_CONNECTIONS: u32 = 256;
    pub const HANDSHAKE_TIMEOUT_SECONDS: u64 = 10;
    /// Slow senders (slowloris) are cut off after this.
    pub const HEADER_TIMEOUT_SECONDS: u64 = 10;
    pub const BODY_TIMEOUT_SECONDS: u64 = 60;
    /// A stocktake can send thousands of rows in one notification.
    pub const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
    /// The same `proc_name` and `params` again within this is a resend.
    pub const DEDUP_WINDOW_SECONDS: u64 = 600;
    /// A week: long enough to look into what a notification said.
    pub const INBOX_RETENTION_HOURS: u64 = 168;
    pub const NOTIFY_PATH: &str = "/smaregi/notify";
    pub const WEBHOOK_PATH: &str = "/smaregi/webhook";
    pub const SECRET_PARAMETER: &str = "relay_secret";
    pub const SMAREGI_ENDPOINT: &str = "https://webapi.smaregi.jp/access/";
    pub const SMAREGI_CONNECT_TIMEOUT_SECONDS: u64 = 10;
    /// Longer than Smaregi takes on a busy day, short enough that a hung
    /// call does not hold a worker for long.
    pub const SMAREGI_REQUEST_TIMEOUT_SECONDS: u64 = 30;
    /// How far around a transaction's own time a look-up searches.
    pub const SMAREGI_LOOKUP_WINDOW_HOURS: u64 = 24;
    /// Stock history is read this often for missed notifications.
    pub const BACKFILL_INTERVAL_MINUTES: u64 = 15;
    /// Products per downstream stock batch.
    pub const DOWNSTREAM_BATCH_SIZE: u32 = 500;
    pub const DOWNSTREAM_REQUEST_TIMEOUT_SECONDS: u64 = 30;
    /// 集計区分 of order transactions.
    pub const ORDERS_SUM_DIVISION: u8 = 2;
    pub const ORDERS_MAX_BODY_BYTES: u64 = 1024 * 1024;
    pub const MAPPING_FALLBACK: super::MappingFallback = super::MappingFallback::Identity;
    /// Inotify events; `poll` is for drop folders on network filesystems.
    pub const MAPPING_WATCH: super::MappingWatch = super::MappingWatch::Events;
    /// How often a polling watcher looks at the drop folder.
    pub const MAPPING_POLL_INTERVAL_SECONDS: u64 = 5;
    /// A full rescan of the drop folder catches anything an event missed.
    pub const MAPPING_RESCAN_INTERVAL_SECONDS: u64 = 300;
    /// A file's size and mtime must stay unchanged this long before it is taken.
    pub const MAPPING_SETTLE_MILLISECONDS: u64 = 1000;
    /// Larger mapping files are rejected unread (a 1,000,000-row file is about 30 MB).
    pub const MAPPING_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
    /// Mapping files with more data rows are rejected.
    pub const MAPPING_MAX_ROWS: u64 = 2_000_000;
    /// External codes are 1 to this many characters …
    pub const MAPPING_EXTERNAL_CODE_MAX_LENGTH: u32 = 30;
    /// … of half-width letters, digits and these symbols.
    pub const MAPPING_EXTERNAL_CODE_SYMBOLS: &str = "-_.";
    pub const OUTBOX_WORKERS: u16 = 4;
    pub const OUTBOX_MAX_AGE_HOURS: u64 = 72;
    /// Immediately, 5 s, 30 s, 2 min, 10 min, 30 min, 1 h …
    pub const RETRY_SCHEDULE_SECONDS: [u64; 7] = [0, 5, 30, 120, 600, 1800, 3600];
    /// … then every 2 h.
    pub const RETRY_REPEAT_SECONDS: u64 = 7200;
    pub const MAX_RETRY_AFTER_SECONDS: u64 = 6 * 3600;
    /// A week of finished jobs.
    pub const OUTBOX_RETENTION_HOURS: u64 = 7 * 24;
    /// Smaregi publishes no limits; integrators keep to a few writes per
    /// second per contract (SMAREGI.md §1), shared by all its stores.
    pub const SMAREGI_RATE_LIMIT: super::RateLimit = super::RateLimit {
        per_second: 3.0,
        burst: 3,
    };
    /// Loopback only: metrics and the staff status page.
    pub const ADMIN_LISTEN_ADDRESS: SocketAddr =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9187);
    pub const CONTROL_SOCKET: &str = "/run/smaregi-relay/control.sock";
    /// At most one alert digest per this many minutes, per notifier.
    pub const ALERTS_DIGEST_INTERVAL_MINUTES: u64 = 15;
    /// The first problem after a quiet spell waits this long, so that a
    /// burst (500 jobs parked at once) becomes one message.
    pub const ALERTS_GRACE_SECONDS: u64 = 60;
    /// A problem still active is mentioned again after this long.
    pub const ALERTS_REMINDER_HOURS: u64 = 24;
    pub const ALERTS_REQUEST_TIMEOUT_SECONDS: u64 = 30;
    /// Implicit TLS (SMTPS), RFC 8314's recommendation.
    pub const ALERTS_SMTP_TLS: super::SmtpTls = super::SmtpTls::Wrapper;
    pub const OPENING_HOURS: &str = "10:00-20:00";
    pub const QUIET_MINUTES: u64 = 120;
    pub const CERTIFICATE_WARNING_DAYS: u32 = 14;
    pub const DISK_FREE_PERCENT: u8 = 10;
    /// Whatever the percentage: less than this is nearly full.
    pub const DISK_FREE_BYTES: u64 = 512 * 1024 * 1024;
    pub const BACKLOG_MINUTES: u64 = 60;
}

/// The whole configuration. Build it with [`load`] or [`parse`].
#[derive(Debug, Clone)]
pub struct Config {
    pub listener: ListenerConfig,
    pub storage: StorageConfig,
    pub logging: LoggingConfig,
    pub daemon: DaemonConfig,
    pub intake: IntakeConfig,
    /// `None` until the operator enters the contract id and access token:
    /// the daemon then accepts and queues work but delivers nothing.
    pub smaregi: Option<SmaregiConfig>,
    pub outbox: OutboxConfig,
    pub mapping: MappingConfig,
    pub stock: StockConfig,
    pub orders: OrdersConfig,
    pub admin: AdminConfig,
    pub alerts: AlertsConfig,
}

/// `[listener]`: the HTTPS listener Smaregi and the store's EC side call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// PEM certificate chain; with neither this nor the key, a self-signed
    /// certificate is generated in the state directory.
    pub tls_certificate: Option<PathBuf>,
    pub tls_private_key: Option<PathBuf>,
    /// Connections served at once; more are answered 429.
    pub max_connections: u32,
    pub handshake_timeout_seconds: u64,
    /// Time to send the request line and headers.
    pub header_timeout_seconds: u64,
    /// Time to send the body.
    pub body_timeout_seconds: u64,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            address: defaults::LISTEN_ADDRESS,
            tls_certificate: None,
            tls_private_key: None,
            max_connections: defaults::MAX_CONNECTIONS,
            handshake_timeout_seconds: defaults::HANDSHAKE_TIMEOUT_SECONDS,
            header_timeout_seconds: defaults::HEADER_TIMEOUT_SECONDS,
            body_timeout_seconds: defaults::BODY_TIMEOUT_SECONDS,
        }
    }
}

/// `[storage]`: where the database lives and how much memory it may cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StorageConfig {
    pub state_directory: PathBuf,
    pub cache_capacity_mib: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            state_directory: defaults::STATE_DIRECTORY.into(),
            cache_capacity_mib: defaults::CACHE_CAPACITY_MIB,
        }
    }
}

impl StorageConfig {
    /// The sled database directory inside the state directory.
    pub fn database_directory(&self) -> PathBuf {
        self.state_directory.join("db")
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LoggingConfig {
    /// A `tracing` filter: `info`, or `warn,smaregi_relay=debug`.
    /// `RUST_LOG` in the environment overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: defaults::LOG_LEVEL.to_owned(),
        }
    }
}

/// `[daemon]`: process lifecycle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DaemonConfig {
    /// How long tasks get to finish after SIGTERM before the final commit.
    pub shutdown_timeout_seconds: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout_seconds: defaults::SHUTDOWN_TIMEOUT_SECONDS,
        }
    }
}

/// `[intake]`: Smaregi's notifications to us (API送信 and webhooks).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IntakeConfig {
    #[serde(default = "default_notify_path")]
    pub notify_path: String,
    #[serde(default = "default_webhook_path")]
    pub webhook_path: String,
    /// The custom parameter (API送信設定) that carries the shared secret.
    #[serde(default = "default_secret_parameter")]
    pub secret_parameter: String,
    /// The shared secret Smaregi sends in `secret-parameter`.
    pub secret: Secret,
    /// Largest request body; larger ones are answered 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default = "default_dedup_window_seconds")]
    pub dedup_window_seconds: u64,
    /// Processed notifications are kept this long, then pruned.
    #[serde(default = "default_inbox_retention_hours")]
    pub retention_hours: u64,
}

fn default_max_body_bytes() -> u64 {
    defaults::MAX_BODY_BYTES
}

fn default_dedup_window_seconds() -> u64 {
    defaults::DEDUP_WINDOW_SECONDS
}

fn default_inbox_retention_hours() -> u64 {
    defaults::INBOX_RETENTION_HOURS
}

fn default_notify_path() -> String {
    defaults::NOTIFY_PATH.to_owned()
}

fn default_webhook_path() -> String {
    defaults::WEBHOOK_PATH.to_owned()
}

fn default_secret_parameter() -> String {
    defaults::SECRET_PARAMETER.to_owned()
}

/// `[smaregi]`: our calls to Smaregi's API (受信設定).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SmaregiConfig {
    #[serde(default = "default_smaregi_endpoint")]
    pub endpoint: String,
    /// 契約ID.
    pub contract_id: String,
    /// アクセストークン.
    pub access_token: Secret,
    /// The 端末ID our transactions are registered under (a terminal set up
    /// in Smaregi for the online shop).
    pub terminal_id: String,
    #[serde(default = "default_smaregi_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// For the whole call, answer included.
    #[serde(default = "default_smaregi_request_timeout")]
    pub request_timeout_seconds: u64,
    /// A PEM certificate to trust besides the system's roots (an inspecting
    /// proxy, or the simulator).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A look-up for a transaction whose registration may have happened
    /// searches this many hours either side of its time (at most 360:
    /// Smaregi searches at most 31 days).
    #[serde(default = "default_smaregi_lookup_window")]
    pub lookup_window_hours: u64,
    /// How an order's cancellation reaches Smaregi.
    #[serde(default)]
    pub cancel_strategy: CancelStrategy,
}

/// How a cancellation (取引取消) is made in Smaregi (SMAREGI.md §1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CancelStrategy {
    /// 打消: a reversing transaction dated today that points at the
    /// original (`disposeDivision` 2). The original's day stays as it was
    /// closed.
    #[default]
    Dispose,
    /// 取消: the original itself gets `cancelDivision` 1, which changes the
    /// figures of the day it was sold on.
    CancelFlag,
}

fn default_smaregi_connect_timeout() -> u64 {
    defaults::SMAREGI_CONNECT_TIMEOUT_SECONDS
}

fn default_smaregi_request_timeout() -> u64 {
    defaults::SMAREGI_REQUEST_TIMEOUT_SECONDS
}

fn default_smaregi_lookup_window() -> u64 {
    defaults::SMAREGI_LOOKUP_WINDOW_HOURS
}

fn default_smaregi_endpoint() -> String {
    defaults::SMAREGI_ENDPOINT.to_owned()
}

/// `[outbox]`: delivery of the calls we owe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct OutboxConfig {
    pub workers: u16,
    /// Jobs still failing after this long are parked for an operator.
    pub max_age_hours: u64,
    /// Upper bounds of the wait after the 1st, 2nd, … failure (full jitter).
    pub retry_schedule_seconds: Vec<u64>,
    /// Upper bound of the wait after every later failure.
    pub retry_repeat_seconds: u64,
    /// The longest `Retry-After` from an upstream that is honoured.
    pub max_retry_after_seconds: u64,
    /// Done and discarded jobs are kept this long (for `outbox show`), then pruned.
    pub retention_hours: u64,
    /// How fast jobs may start, per upstream (`[outbox.rate-limit.NAME]`).
    /// See [`OutboxConfig::rate_limit_for`] for the defaults.
    pub rate_limit: BTreeMap<String, RateLimit>,
}

/// A token bucket: `burst` attempts at once, then `per-second`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl OutboxConfig {
    /// The limit of `upstream`: as configured; for `smaregi`, otherwise
    /// [`defaults::SMAREGI_RATE_LIMIT`]; for others, none.
    pub fn rate_limit_for(&self, upstream: &str) -> Option<RateLimit> {
        self.rate_limit
            .get(upstream)
            .copied()
            .or((upstream == "smaregi").then_some(defaults::SMAREGI_RATE_LIMIT))
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            workers: defaults::OUTBOX_WORKERS,
            max_age_hours: defaults::OUTBOX_MAX_AGE_HOURS,
            retry_schedule_seconds: defaults::RETRY_SCHEDULE_SECONDS.to_vec(),
            retry_repeat_seconds: defaults::RETRY_REPEAT_SECONDS,
            max_retry_after_seconds: defaults::MAX_RETRY_AFTER_SECONDS,
            retention_hours: defaults::OUTBOX_RETENTION_HOURS,
            rate_limit: BTreeMap::new(),
        }
    }
}

/// `[mapping]`: product mapping CSVs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MappingConfig {
    /// Defaults to `drop/` in the state directory.
    pub drop_directory: Option<PathBuf>,
    pub fallback: MappingFallback,
    /// How changes in the drop folder are noticed.
    pub watch: MappingWatch,
    /// With `watch = "poll"`: how often the folder is looked at.
    pub poll_interval_seconds: u64,
    /// How often the whole folder is rescanned, whatever the events said.
    pub rescan_interval_seconds: u64,
    /// How long a file's size and mtime must stay unchanged before it is taken.
    pub settle_milliseconds: u64,
    /// Larger files are rejected.
    pub max_file_bytes: u64,
    /// Files with more data rows are rejected.
    pub max_rows: u64,
    /// Longest external code, in characters.
    pub external_code_max_length: u32,
    /// Symbols allowed in external codes besides half-width letters and digits.
    pub external_code_symbols: String,
}

impl Default for MappingConfig {
    fn default() -> Self {
        Self {
            drop_directory: None,
            fallback: defaults::MAPPING_FALLBACK,
            watch: defaults::MAPPING_WATCH,
            poll_interval_seconds: defaults::MAPPING_POLL_INTERVAL_SECONDS,
            rescan_interval_seconds: defaults::MAPPING_RESCAN_INTERVAL_SECONDS,
            settle_milliseconds: defaults::MAPPING_SETTLE_MILLISECONDS,
            max_file_bytes: defaults::MAPPING_MAX_FILE_BYTES,
            max_rows: defaults::MAPPING_MAX_ROWS,
            external_code_max_length: defaults::MAPPING_EXTERNAL_CODE_MAX_LENGTH,
            external_code_symbols: defaults::MAPPING_EXTERNAL_CODE_SYMBOLS.to_owned(),
        }
    }
}

/// How the drop folder is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingWatch {
    /// inotify: close-after-write and rename-into-folder events.
    Events,
    /// Looking at the folder every `poll-interval-seconds`: for network
    /// filesystems (Samba, NFS), whose changes inotify does not see.
    Poll,
}

/// What a product id that the mapping does not list maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingFallback {
    /// To itself: the external code is the Smaregi product id.
    Identity,
    /// To nothing: the line is unmapped.
    None,
}

/// `[stock]`: forwarding stock changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StockConfig {
    /// Smaregi store ids (店舗ID) to follow; empty means all.
    pub stores: Vec<String>,
    /// Where a product's stock is read after a notification.
    pub source: StockSource,
    /// The store's EC side, which receives stock; nothing is forwarded without it.
    pub downstream: Option<DownstreamConfig>,
    /// Bearer token of the stock read API; the API is off without it.
    pub api_token: Option<Secret>,
    /// How often Smaregi's stock history is read for changes whose
    /// notifications never arrived (also at start-up); 0 turns it off.
    pub backfill_interval_minutes: u64,
}

impl Default for StockConfig {
    fn default() -> Self {
        Self {
            stores: Vec::new(),
            source: StockSource::default(),
            downstream: None,
            api_token: None,
            backfill_interval_minutes: defaults::BACKFILL_INTERVAL_MINUTES,
        }
    }
}

/// Where the stock amount comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StockSource {
    /// Read from Smaregi (`stock_ref`) after each notification: the truth,
    /// whatever order notifications arrive in.
    #[default]
    Smaregi,
    /// The notification's own `stockAmount`: no extra calls, but a late
    /// notification can carry an older value.
    Notification,
}

/// `[stock.downstream]`: a webhook receiving stock in signed JSON batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DownstreamConfig {
    pub url: String,
    /// Signs every batch (Standard Webhooks, HMAC-SHA256).
    pub secret: Secret,
    #[serde(default = "default_downstream_batch_size")]
    pub batch_size: u32,
    #[serde(default)]
    pub clamp: Clamp,
    /// Whether the downstream gets absolute values or changes.
    #[serde(default = "default_downstream_mode")]
    pub mode: DownstreamMode,
    /// Stores whose stock the downstream gets as one sum per product
    /// (e.g. shop and warehouse behind one online shop); empty: per store.
    #[serde(default)]
    pub sum_stores: Vec<String>,
    #[serde(default = "default_downstream_timeout")]
    pub request_timeout_seconds: u64,
    /// A PEM certificate to trust besides the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// What a downstream is sent for each product.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownstreamMode {
    /// The stock itself: latest wins, a resend is harmless.
    #[default]
    Absolute,
    /// The change since what the downstream acknowledged, for downstreams
    /// that only accept changes; each change is applied exactly once.
    Delta,
}

fn default_downstream_mode() -> DownstreamMode {
    DownstreamMode::Absolute
}

/// What range of stock the downstream can hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clamp {
    /// Forward Smaregi's value as it is.
    #[default]
    None,
    /// 0 to 999,999, as common carts hold: negative stock becomes 0.
    Cart,
}

impl Clamp {
    pub fn apply(self, amount: i64) -> i64 {
        match self {
            Self::None => amount,
            Self::Cart => amount.clamp(0, 999_999),
        }
    }
}

fn default_downstream_batch_size() -> u32 {
    defaults::DOWNSTREAM_BATCH_SIZE
}

fn default_downstream_timeout() -> u64 {
    defaults::DOWNSTREAM_REQUEST_TIMEOUT_SECONDS
}

/// `[orders]`: the order API for the store's EC side, and how an order
/// becomes a Smaregi transaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct OrdersConfig {
    /// Bearer token the EC side presents; the order API is off without it.
    pub api_token: Option<Secret>,
    /// 店舗ID used for orders that name none.
    pub default_store_id: Option<String>,
    /// The 端末ID orders are registered under; `[smaregi] terminal-id` if unset.
    pub terminal_id: Option<String>,
    pub tax_mode: TaxMode,
    pub tax_rounding: TaxRounding,
    /// What happens to an order with a line the mapping does not know.
    pub unmapped: UnmappedPolicy,
    /// The 商品ID unmapped lines are registered as with `unmapped = "dummy-product"`.
    pub dummy_product_id: Option<String>,
    pub discount: DiscountMode,
    /// The order's `payment_method` name → how Smaregi records the payment.
    pub payment_methods: BTreeMap<String, PaymentKind>,
    /// Smaregi's `sumDivision` (集計区分) for order transactions.
    pub sum_division: u8,
    /// The largest order body accepted.
    pub max_body_bytes: u64,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            api_token: None,
            default_store_id: None,
            terminal_id: None,
            tax_mode: TaxMode::default(),
            tax_rounding: TaxRounding::default(),
            unmapped: UnmappedPolicy::default(),
            dummy_product_id: None,
            discount: DiscountMode::default(),
            payment_methods: BTreeMap::new(),
            sum_division: defaults::ORDERS_SUM_DIVISION,
            max_body_bytes: defaults::ORDERS_MAX_BODY_BYTES,
        }
    }
}

/// Whether order prices include consumption tax.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaxMode {
    /// 内税: prices include tax; the tax is recorded as `taxInclude`.
    #[default]
    Inclusive,
    /// 外税: tax is added on top, as `taxExclude`.
    Exclusive,
}

/// How tax yen fractions are rounded (Smaregi's 税丸め).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaxRounding {
    /// 切り捨て, Smaregi's default.
    #[default]
    Down,
    /// 四捨五入.
    Nearest,
    /// 切り上げ.
    Up,
}

/// What an order line whose product the mapping does not know becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnmappedPolicy {
    /// The order is accepted and waits; a new mapping version releases it.
    #[default]
    Hold,
    /// The line is registered as `dummy-product-id`.
    DummyProduct,
    /// The order is refused (422).
    Reject,
}

/// How an order's discount is recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscountMode {
    /// As the transaction's 小計値引き (`subtotalDiscountPrice`).
    #[default]
    Subtotal,
    /// As a line of its own with a negative price.
    AdjustmentLine,
}

/// How Smaregi records a payment method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaymentKind {
    /// `depositCash` (現金, also 代引き and 振込 in most shops' books).
    Cash,
    /// `depositCredit` (クレジット).
    Credit,
}

/// `[admin]`: the operator surface.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AdminConfig {
    /// Metrics, health and the staff status page: plain HTTP on loopback;
    /// on any other address, HTTPS with the listener's certificate and
    /// `status-token`.
    pub listen: SocketAddr,
    pub control_socket: PathBuf,
    /// Required when `listen` is not a loopback address.
    pub status_token: Option<Secret>,
    /// The store's opening hours, Japan time, `HH:MM-HH:MM`.
    pub opening_hours: String,
    /// During opening hours, this long without a notification is worth a
    /// warning; 0 turns the check off.
    pub quiet_minutes: u64,
    /// Warn this many days before the TLS certificate expires.
    pub certificate_warning_days: u32,
    /// Warn when less than this percentage of the disk is free.
    pub disk_free_percent: u8,
    /// Warn when a job has waited this long.
    pub backlog_minutes: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: defaults::ADMIN_LISTEN_ADDRESS,
            control_socket: defaults::CONTROL_SOCKET.into(),
            status_token: None,
            opening_hours: defaults::OPENING_HOURS.into(),
            quiet_minutes: defaults::QUIET_MINUTES,
            certificate_warning_days: defaults::CERTIFICATE_WARNING_DAYS,
            disk_free_percent: defaults::DISK_FREE_PERCENT,
            backlog_minutes: defaults::BACKLOG_MINUTES,
        }
    }
}

impl AdminConfig {
    /// When the facts become problems.
    pub fn thresholds(&self) -> crate::health::Thresholds {
        crate::health::Thresholds {
            certificate_days: i64::from(self.certificate_warning_days),
            opening_hours: (self.quiet_minutes > 0)
                .then(|| crate::health::parse_opening_hours(&self.opening_hours).ok())
                .flatten(),
            quiet_minutes: self.quiet_minutes,
            disk_free_fraction: f64::from(self.disk_free_percent) / 100.0,
            disk_free_bytes: defaults::DISK_FREE_BYTES,
            backlog_minutes: self.backlog_minutes,
        }
    }
}

/// `[alerts]`: digests of the problems that need someone's attention.
/// With neither `webhook` nor `email`, problems are only logged and shown
/// in systemd's STATUS=.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AlertsConfig {
    /// At most one digest per this many minutes, per notifier.
    pub digest_interval_minutes: u64,
    /// How long the first problem after a quiet spell waits for others.
    pub grace_seconds: u64,
    /// A problem still active is mentioned again after this many hours.
    pub reminder_hours: u64,
    pub webhook: Option<AlertsWebhookConfig>,
    pub email: Option<AlertsEmailConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            digest_interval_minutes: defaults::ALERTS_DIGEST_INTERVAL_MINUTES,
            grace_seconds: defaults::ALERTS_GRACE_SECONDS,
            reminder_hours: defaults::ALERTS_REMINDER_HOURS,
            webhook: None,
            email: None,
        }
    }
}

/// `[alerts.webhook]`: digests POSTed as signed JSON (Standard Webhooks).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertsWebhookConfig {
    /// `https://` only.
    pub url: String,
    /// Signs every digest (HMAC-SHA256).
    pub secret: Secret,
    /// A PEM certificate to trust besides the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_alerts_request_timeout")]
    pub request_timeout_seconds: u64,
}

fn default_alerts_request_timeout() -> u64 {
    defaults::ALERTS_REQUEST_TIMEOUT_SECONDS
}

/// `[alerts.email]`: digests by e-mail, over SMTP with TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertsEmailConfig {
    pub smtp_host: String,
    /// 465 with `tls = "wrapper"`, 587 with `"starttls"`, unless set.
    #[serde(default)]
    pub smtp_port: Option<u16>,
    #[serde(default = "default_smtp_tls")]
    pub tls: SmtpTls,
    /// Log in with these when set (both or neither).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// `Name <address>` or a bare address.
    pub from: String,
    pub to: Vec<String>,
    /// A PEM certificate to trust besides the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_alerts_request_timeout")]
    pub request_timeout_seconds: u64,
}

fn default_smtp_tls() -> SmtpTls {
    defaults::ALERTS_SMTP_TLS
}

impl AlertsEmailConfig {
    /// The configured port, or the one its TLS mode is served on.
    pub fn port(&self) -> u16 {
        self.smtp_port.unwrap_or(match self.tls {
            SmtpTls::Wrapper => 465,
            SmtpTls::Starttls => 587,
        })
    }
}

/// How an SMTP connection is secured. There is deliberately no plaintext
/// mode: the password and the shop's problems would cross the network
/// readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmtpTls {
    /// TLS from the first byte (SMTPS, usually port 465).
    Wrapper,
    /// Plain connection upgraded with STARTTLS before anything is sent,
    /// refused if the server does not offer it (usually port 587).
    Starttls,
}

impl Config {
    /// The drop folder for mapping CSVs.
    pub fn drop_directory(&self) -> PathBuf {
        self.mapping.drop_directory.clone().unwrap_or_else(|| {
            self.storage
                .state_directory
                .join(defaults::DROP_SUBDIRECTORY)
        })
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        let absolute = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        absolute(&mut self.storage.state_directory);
        absolute(&mut self.admin.control_socket);
        for path in [
            self.listener.tls_certificate.as_mut(),
            self.listener.tls_private_key.as_mut(),
            self.mapping.drop_directory.as_mut(),
            self.smaregi.as_mut().and_then(|s| s.ca_file.as_mut()),
            self.stock
                .downstream
                .as_mut()
                .and_then(|d| d.ca_file.as_mut()),
            self.alerts
                .webhook
                .as_mut()
                .and_then(|w| w.ca_file.as_mut()),
            self.alerts.email.as_mut().and_then(|e| e.ca_file.as_mut()),
        ]
        .into_iter()
        .flatten()
        {
            absolute(path);
        }
    }
}

/// A configuration as loaded from a file, with its warnings.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: Config,
    /// Problems that do not stop the daemon, e.g. a secret readable by all.
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(Diagnostics),
}

impl ConfigError {
    /// 66 when the file cannot be read, 78 when it is invalid.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreadable { .. } => crate::exit::NO_INPUT,
            Self::Invalid(_) => crate::exit::CONFIG,
        }
    }
}

/// Loads the config at `path`, reading secrets with this process's environment.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let directory = config_directory(path);
    load_with(path, &SecretEnvironment::from_process(&directory))
}

/// Loads the config at `path`, reading secrets with the given environment.
pub fn load_with(path: &Path, env: &SecretEnvironment) -> Result<LoadedConfig, ConfigError> {
    let unreadable = |source| ConfigError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let text = fs::read_to_string(path).map_err(unreadable)?;
    let Parsed {
        mut loaded,
        has_inline_secret,
    } = parse_checked(path, &text, env)?;
    let metadata = fs::metadata(path).map_err(unreadable)?;
    if has_inline_secret && secret::readable_by_others(&metadata) {
        let warning = SourceFile { path, text: &text }.diagnostic(
            Severity::Warning,
            None,
            format!(
                "this file holds secrets and is readable by every user; restrict it with \
                 `chmod o-rwx {}`, or move the secrets to files or systemd credentials",
                path.display()
            ),
        );
        loaded.warnings.insert(0, warning);
    }
    Ok(loaded)
}

fn config_directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Parses and checks config text; `path` names it in diagnostics.
pub fn parse(
    path: &Path,
    text: &str,
    env: &SecretEnvironment,
) -> Result<LoadedConfig, ConfigError> {
    parse_checked(path, text, env).map(|parsed| parsed.loaded)
}

struct Parsed {
    loaded: LoadedConfig,
    /// Some secret is written in the file itself, so who may read the file matters.
    has_inline_secret: bool,
}

fn parse_checked(path: &Path, text: &str, env: &SecretEnvironment) -> Result<Parsed, ConfigError> {
    let source = SourceFile { path, text };
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        let mut errors: Vec<_> = syntax_errors
            .into_iter()
            .map(|e| source.diagnostic(Severity::Error, e.span(), e.message().trim()))
            .collect();
        errors.sort_by_key(|d| (d.line, d.column));
        return Err(ConfigError::Invalid(Diagnostics(errors)));
    }
    let root = root.into_inner();

    let mut checker = SectionChecker {
        source: &source,
        root: &root,
        env,
        errors: Vec::new(),
        warnings: Vec::new(),
        has_inline_secret: false,
    };
    let mut sections = Sections::default();
    for (key, value) in root.clone() {
        match &**key.get_ref() {
            "listener" => checker.load(value, &mut sections.listener),
            "storage" => checker.load(value, &mut sections.storage),
            "logging" => checker.load(value, &mut sections.logging),
            "daemon" => checker.load(value, &mut sections.daemon),
            "intake" => checker.load(value, &mut sections.intake),
            "smaregi" => checker.load(value, &mut sections.smaregi),
            "outbox" => checker.load(value, &mut sections.outbox),
            "mapping" => checker.load(value, &mut sections.mapping),
            "stock" => checker.load(value, &mut sections.stock),
            "orders" => checker.load(value, &mut sections.orders),
            "admin" => checker.load(value, &mut sections.admin),
            "alerts" => checker.load(value, &mut sections.alerts),
            unknown => checker.errors.push(source.diagnostic(
                Severity::Error,
                Some(key.span()),
                format!("unknown section `{unknown}`, expected one of {SECTION_NAMES}"),
            )),
        }
    }
    if !root.contains_key("intake") {
        checker.errors.push(source.diagnostic(
            Severity::Error,
            None,
            "missing section `[intake]`: it must set `secret`, the shared secret Smaregi sends \
             with every notification",
        ));
    }
    let orders_api_on = sections
        .orders
        .as_ref()
        .is_some_and(|orders| orders.api_token.is_some());
    if orders_api_on && !root.contains_key("smaregi") {
        let span = root
            .get("orders")
            .and_then(|orders| orders.get_ref().as_table())
            .and_then(|table| table.get_key_value("api-token"))
            .map(|(key, _)| key.span());
        checker.errors.push(source.diagnostic(
            Severity::Error,
            span,
            "the order API (`[orders] api-token`) needs a `[smaregi]` section: orders are \
             registered in Smaregi",
        ));
    }
    let SectionChecker {
        mut errors,
        warnings,
        has_inline_secret,
        ..
    } = checker;
    let mut config = match sections.into_config() {
        Some(config) if errors.is_empty() => config,
        _ => {
            errors.sort_by_key(|d| (d.line, d.column));
            return Err(ConfigError::Invalid(Diagnostics(errors)));
        }
    };
    config.resolve_relative_paths(&env.config_directory);
    Ok(Parsed {
        loaded: LoadedConfig {
            path: path.to_path_buf(),
            config,
            warnings,
        },
        has_inline_secret,
    })
}

/// A config section: deserialised, validated and its secrets resolved on its own.
trait Section: DeserializeOwned + Validate {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        Vec::new()
    }

    /// Files the section names that must exist now, with whether they hold a secret.
    fn files(&self) -> Vec<(&'static [&'static str], &Path, bool)> {
        Vec::new()
    }
}

impl Section for ListenerConfig {
    fn files(&self) -> Vec<(&'static [&'static str], &Path, bool)> {
        let certificate = (self.tls_certificate.as_deref())
            .map(|path| (&["listener", "tls-certificate"][..], path, false));
        let private_key = (self.tls_private_key.as_deref())
            .map(|path| (&["listener", "tls-private-key"][..], path, true));
        certificate.into_iter().chain(private_key).collect()
    }
}
impl Section for StorageConfig {}
impl Section for LoggingConfig {}
impl Section for DaemonConfig {}
impl Section for OutboxConfig {}
impl Section for MappingConfig {}
impl Section for StockConfig {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        let downstream = (self.downstream.as_mut())
            .map(|d| (&["stock", "downstream", "secret"][..], &mut d.secret));
        let token = (self.api_token.as_mut()).map(|t| (&["stock", "api-token"][..], t));
        downstream.into_iter().chain(token).collect()
    }

    fn files(&self) -> Vec<(&'static [&'static str], &Path, bool)> {
        (self.downstream.as_ref())
            .and_then(|d| d.ca_file.as_deref())
            .map(|path| (&["stock", "downstream", "ca-file"][..], path, false))
            .into_iter()
            .collect()
    }
}
impl Section for AdminConfig {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        self.status_token
            .iter_mut()
            .map(|token| (&["admin", "status-token"][..], token))
            .collect()
    }
}

impl Section for AlertsConfig {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        let webhook =
            (self.webhook.as_mut()).map(|w| (&["alerts", "webhook", "secret"][..], &mut w.secret));
        let password = (self.email.as_mut())
            .and_then(|e| e.password.as_mut())
            .map(|p| (&["alerts", "email", "password"][..], p));
        webhook.into_iter().chain(password).collect()
    }

    fn files(&self) -> Vec<(&'static [&'static str], &Path, bool)> {
        let webhook = (self.webhook.as_ref())
            .and_then(|w| w.ca_file.as_deref())
            .map(|path| (&["alerts", "webhook", "ca-file"][..], path, false));
        let email = (self.email.as_ref())
            .and_then(|e| e.ca_file.as_deref())
            .map(|path| (&["alerts", "email", "ca-file"][..], path, false));
        webhook.into_iter().chain(email).collect()
    }
}

impl Section for IntakeConfig {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        vec![(&["intake", "secret"], &mut self.secret)]
    }
}

impl Section for SmaregiConfig {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        vec![(&["smaregi", "access-token"], &mut self.access_token)]
    }

    fn files(&self) -> Vec<(&'static [&'static str], &Path, bool)> {
        (self.ca_file.as_deref())
            .map(|path| (&["smaregi", "ca-file"][..], path, false))
            .into_iter()
            .collect()
    }
}

impl Section for OrdersConfig {
    fn secrets_mut(&mut self) -> Vec<(&'static [&'static str], &mut Secret)> {
        self.api_token
            .iter_mut()
            .map(|token| (&["orders", "api-token"][..], token))
            .collect()
    }
}

/// Collects the diagnostics of every section of one file.
struct SectionChecker<'a> {
    source: &'a SourceFile<'a>,
    root: &'a DeTable<'a>,
    env: &'a SecretEnvironment,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    has_inline_secret: bool,
}

impl SectionChecker<'_> {
    fn load<T: Section>(&mut self, value: toml::Spanned<DeValue<'_>>, slot: &mut Option<T>) {
        let mut section = match T::deserialize(value.into_deserializer()) {
            Ok(section) => section,
            Err(e) => {
                self.error(e.span(), e.message().trim());
                return;
            }
        };
        let mut problems = Vec::new();
        section.validate(&mut problems);
        for problem in problems {
            self.error(span_of(self.root, problem.key), problem.message);
        }
        for (key, path, holds_secret) in section.files() {
            let span = span_of(self.root, key);
            let path = self.env.config_directory.join(path);
            match fs::metadata(&path) {
                Ok(metadata) if metadata.is_file() => {
                    if holds_secret && secret::readable_by_others(&metadata) {
                        self.warnings.push(self.source.diagnostic(
                            Severity::Warning,
                            span,
                            format!(
                                "{} holds a private key and is readable by every user; restrict \
                                 it with `chmod o-rwx {}`",
                                path.display(),
                                path.display()
                            ),
                        ));
                    }
                }
                Ok(_) => self.error(span, format!("{} is not a regular file", path.display())),
                Err(e) => self.error(span, format!("cannot read {}: {e}", path.display())),
            }
        }
        for (key, secret) in section.secrets_mut() {
            match secret.resolve(self.env) {
                Ok(resolved) => {
                    self.has_inline_secret |= resolved.inline;
                    if let Some(warning) = resolved.warning {
                        self.warnings.push(self.source.diagnostic(
                            Severity::Warning,
                            Some(secret.span()),
                            warning,
                        ));
                    }
                    if let Some(message) = validate::secret_strength(key, secret.expose()) {
                        self.error(Some(secret.span()), message);
                    }
                }
                Err(message) => self.error(Some(secret.span()), message),
            }
        }
        *slot = Some(section);
    }

    fn error(&mut self, span: Option<std::ops::Range<usize>>, message: impl Into<String>) {
        self.errors
            .push(self.source.diagnostic(Severity::Error, span, message));
    }
}

const SECTION_NAMES: &str = "`listener`, `storage`, `logging`, `daemon`, `intake`, `smaregi`, \
                             `outbox`, `mapping`, `stock`, `orders`, `admin`, `alerts`";

/// The sections seen so far; a missing one takes its defaults.
#[derive(Default)]
struct Sections {
    listener: Option<ListenerConfig>,
    storage: Option<StorageConfig>,
    logging: Option<LoggingConfig>,
    daemon: Option<DaemonConfig>,
    intake: Option<IntakeConfig>,
    smaregi: Option<SmaregiConfig>,
    outbox: Option<OutboxConfig>,
    mapping: Option<MappingConfig>,
    stock: Option<StockConfig>,
    orders: Option<OrdersConfig>,
    admin: Option<AdminConfig>,
    alerts: Option<AlertsConfig>,
}

impl Sections {
    /// The config, if the one required section is present.
    fn into_config(self) -> Option<Config> {
        Some(Config {
            listener: self.listener.unwrap_or_default(),
            storage: self.storage.unwrap_or_default(),
            logging: self.logging.unwrap_or_default(),
            daemon: self.daemon.unwrap_or_default(),
            intake: self.intake?,
            smaregi: self.smaregi,
            outbox: self.outbox.unwrap_or_default(),
            mapping: self.mapping.unwrap_or_default(),
            stock: self.stock.unwrap_or_default(),
            orders: self.orders.unwrap_or_default(),
            admin: self.admin.unwrap_or_default(),
            alerts: self.alerts.unwrap_or_default(),
        })
    }
}
