//! The outbox: the calls the store owes Smaregi and its EC side, delivered
//! eventually, in order per key, never silently dropped.
//!
//! This module owns the job model, scheduling, retries, parking and per-key
//! ordering. It must never decide what a job does: executors, registered per
//! job kind by the modules that own the calls, do that.
//!
//! - [`job`]: the job record, its states and error classes, its size limit.
//! - [`queue`]: the durable queue: per-key order, the index of runnable
//!   jobs, parking, operator retry and discard, enqueue inside a caller's
//!   transaction.
//! - [`retry`]: when a failed job runs again, and when it is parked.
//! - [`engine`]: runs the registered executor of each due job on a bounded
//!   number of workers, applies the outcome, pauses an upstream on a
//!   configuration failure, prunes finished jobs past their retention.
//!
//! - [`rate`]: token buckets that pace the attempts per upstream.
//!
//! Still to come (issue 3): counts for status and the operator's list/show
//! views, the soak test and the `outbox` benchmark.

pub mod engine;
pub mod job;
pub mod queue;
pub mod rate;
pub mod retry;
