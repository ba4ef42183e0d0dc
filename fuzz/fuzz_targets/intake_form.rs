//! Any request body through the intake's parsers: the strict form
//! decoder, the API送信 reader, and the webhook reader. They must refuse
//! or accept, never panic, and never take unbounded time or memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smaregi_relay::intake::form;

fuzz_target!(|body: &[u8]| {
    if let Ok(fields) = form::decode_form(body) {
        let _ = form::secret_value(&fields, &[], "relay_secret");
        let _ = form::read_notification(&fields);
    }
    let _ = form::read_webhook(Some("pos:stock"), Some("event"), Some("contract"), body);
});
