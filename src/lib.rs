//! smaregi-relay: a store appliance daemon between the Smaregi cloud POS and
//! the store's other systems.
//!
//! The promise it keeps: nothing Smaregi sends us, and nothing we owe
//! Smaregi, is lost or applied twice — across crashes, power cuts, Smaregi
//! outages and bad files.
//!
//! The crate is a library with a thin binary (`src/main.rs`) on top. The
//! modules follow the architecture's module map:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the TOML configuration: types, named defaults, validation with file/line/column diagnostics, secret resolution |
//! | [`store`] | the sled database: trees, key encodings, schema version, the group-committed durable commit |
//! | [`intake`] | the TLS listener: Smaregi's notifications, stored durably before they are answered |
//! | [`mapping`] | product mapping CSVs: formats, validation, reports, the versioned mapping, the drop-folder watcher |
//! | [`outbox`] | the calls we owe: job model, durable per-key queue, retry policy, the engine that runs jobs, operator operations |
//! | [`orders`] | the order API, order ledger and order → transaction building; edits as cancel then register |
//! | [`smaregi`] | Smaregi's legacy API: client, error classes, exactly-once 取引登録/取引取消 executors |
//! | [`stock`] | stock notices → the stock mirror → signed batches to the store's EC side |
//! | [`health`] | whether all is well: the daemon's facts at one moment and the pure judgement of what needs attention |
//! | [`metrics`] | counters and histograms the components keep, and the Prometheus text format |
//! | [`tls`] | rustls client configuration for outgoing calls |
//! | [`telemetry`] | tracing set-up: journald under systemd, human-readable stderr otherwise |
//! | [`control`] | the control socket: protocol, the daemon's server, the operator commands' client |
//! | [`alerts`] | alert digests: which changes to the set of active problems to tell, when, and their delivery by webhook and e-mail |
//! | [`watchdog`] | the systemd watchdog: a registry of vital loops; fed only while every one of them beats |
//! | [`admin`] | the admin listener (metrics, health, the staff status page) and the monitor that logs and reports problems |
//! | [`daemon`] | wiring, start-up order, sd_notify, the shutdown token and drain deadline |
//! | [`demo`] | `smaregi-relay demo`: the simulator, the daemon and a demo EC site in one process, and the scripted story a new user watches |
//! | [`cli`] | the command-line definition shared by the binary and the generated man pages and completions |
//! | [`exit`] | the process exit codes that scripts and systemd rely on |

pub mod admin;
pub mod alerts;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod exit;
pub mod health;
pub mod intake;
pub mod mapping;
pub mod metrics;
pub mod orders;
pub mod outbox;
pub mod smaregi;
pub mod stock;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod watchdog;
