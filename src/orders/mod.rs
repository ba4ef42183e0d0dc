//! Orders from the store's EC side → 取引登録 / 取引取消 in Smaregi.
//!
//! This module owns the order model and its validation ([`model`]), the
//! pure order → transaction building ([`build`]), the order ledger and
//! the jobs each change implies ([`book`]), and the order API
//! ([`api`]). It never calls Smaregi itself: it stages jobs that the
//! outbox runs with the `smaregi` executors, on the ordering key
//! `order:<id>`, so an edit's cancel always runs before its register.

pub mod api;
pub mod book;
pub mod build;
pub mod model;

pub use api::OrderApi;
pub use book::OrderBook;
