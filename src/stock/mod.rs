//! Stock forwarding: Smaregi's stock notifications → a local mirror of
//! the truth → the store's EC side.
//!
//! This module owns reading stock notices ([`notice`], pure), the stock
//! mirror and the refresh and push jobs that keep it and the downstream
//! current ([`book`]), delta mode's arithmetic and the echo guard
//! ([`delta`], pure), signing what is pushed ([`sign`], pure), the
//! inbox [`processor`] and the stock read API ([`api`]). It
//! never trusts a notification's order: a notice only says "this product
//! changed"; the value comes from Smaregi (or, if configured, from the
//! notice) and older never overwrites newer.

pub mod api;
pub mod book;
pub mod delta;
pub mod notice;
pub mod processor;
pub mod sign;

pub use api::StockApi;
pub use book::StockBook;
