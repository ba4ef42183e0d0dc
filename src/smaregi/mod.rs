//! Smaregi's legacy API: the client, and the exactly-once registration
//! and cancellation of transactions through the outbox.
//!
//! | module | owns |
//! |---|---|
//! | [`api`] | reading answers; classifying every failure (SMAREGI.md §1's code table) |
//! | [`client`] | the HTTP client: TLS, timeouts, credentials; `transaction_upd`, `transaction_ref`, `stock_ref` |
//! | [`sale`] | a transaction and its reversal (打消), typed, turned into rows of strings |
//! | [`ledger`] | `terminalTranId` counters, started sends and registered ids (the `smaregi` tree) |
//! | [`jobs`] | the register and cancel jobs' payloads, staged inside a caller's transaction |
//! | [`executor`] | the executors that make each job take effect once |
//! | [`jst`] | Smaregi's JST datetimes |
//!
//! It must never log the contract id or the access token, nor send a
//! transaction again without first looking for it once a send may have
//! reached Smaregi.

pub mod api;
pub mod client;
pub mod executor;
pub mod jobs;
pub mod jst;
pub mod ledger;
pub mod sale;
