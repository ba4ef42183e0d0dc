//! Intake: Smaregi's notifications to us, over our own TLS listener.
//!
//! | module | owns |
//! |---|---|
//! | [`cert`] | the certificate: configured or generated, fingerprint, reload |
//! | [`form`] | reading API送信 requests: strict form decoding, the secret, `params` |
//! | [`inbox`] | the `inbox` tree: raw notifications, split in parts, de-duplicated |
//! | [`server`] | the HTTPS listener: limits, routes, refusals, the durable accept |
//!
//! It must never answer 200 before the notification is committed, and
//! nothing from a refused request may enter the inbox.

pub mod api;
pub mod cert;
pub mod form;
pub mod inbox;
pub mod server;
