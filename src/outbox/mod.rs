//! The outbox: the calls the store owes Smaregi and its EC side, delivered
//! eventually, in order per key, never silently dropped.
//!
//! This module owns the job model, scheduling, retries, parking and per-key
//! ordering. It must never decide what a job does: executors, registered per
//! job kind by the modules that own the calls, do that.
//!
//! So far: the retry policy ([`retry`]). The job engine follows.

pub mod retry;
