//! smaregi-sim: a stand-in for the Smaregi cloud that enforces what
//! Smaregi enforces, for smaregi-relay's tests, benchmarks and `demo`.
//!
//! | module | owns |
//! |---|---|
//! | [`model`] | the contract's transactions and stock; the legacy API's functions and their validation |
//! | [`server`] | the HTTP(S) endpoint `/access/`, authentication, rate limit, faults, the `/_control/` endpoint |
//! | [`faults`] | which faults are injected, drawn per call |
//! | [`sender`] | Smaregi's side of API送信: notification POSTs to a URL |
//! | [`time`] | Smaregi's JST datetimes |
//!
//! It must never be used as a Smaregi replacement in production: it keeps
//! its data in memory (or one JSON file) and has no access control on
//! `/_control/`.

pub mod faults;
pub mod model;
pub mod sender;
pub mod server;
pub mod time;

pub use faults::Faults;
pub use model::{ApiError, Contract, Transaction};
pub use server::{SimConfig, SimError, Simulator, Stats};
