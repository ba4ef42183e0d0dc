//! The Smaregi simulator and a relay config pointing at it.

use std::path::Path;

use serde_json::{json, Value};
use smaregi_relay::config::{self, Config};
use smaregi_sim::sender::Sender;
use smaregi_sim::{SimConfig, Simulator};

pub const CONTRACT_ID: &str = "sim_contract";
pub const ACCESS_TOKEN: &str = "sim-access-token-0123456789";
/// The terminal our transactions are registered under.
pub const TERMINAL: &str = "9";

/// A simulator on a free loopback port, plain HTTP, no rate limit.
pub async fn simulator() -> Simulator {
    Simulator::start(SimConfig::local(CONTRACT_ID, ACCESS_TOKEN))
        .await
        .unwrap()
}

/// A relay config in `dir` whose `[smaregi]` calls `endpoint`, with
/// `extra` lines added to that section (and sections after it).
pub fn relay_config(dir: &Path, endpoint: &str, extra: &str) -> Config {
    super::write_file(dir, "smaregi-token", ACCESS_TOKEN, 0o600);
    let path = super::write_config(
        dir,
        &format!(
            "[smaregi]\nendpoint = \"{endpoint}\"\ncontract-id = \"{CONTRACT_ID}\"\n\
             access-token = {{ file = \"smaregi-token\" }}\nterminal-id = \"{TERMINAL}\"\n{extra}\n"
        ),
    );
    config::load(&path).unwrap_or_else(|e| panic!("{e}")).config
}

/// Sends a `stock_send` of `rows` to the daemon as Smaregi's API送信 does,
/// with `secret` as the custom parameter; (status, body).
pub async fn send_stock_rows(
    relay: &super::RunningDaemon,
    rows: Value,
    secret: &str,
) -> (u16, String) {
    let sender = Sender::new(Some(&relay.certificate())).unwrap();
    let params = json!({"data": [{"table_name": "Stock", "rows": rows}]});
    sender
        .send(
            &relay.url("/smaregi/notify"),
            "stock_send",
            &params,
            &[("relay_secret".into(), secret.into())],
        )
        .await
        .unwrap()
}

/// [`send_stock_rows`] of one product of store 1 with the right secret,
/// which must be answered 200.
pub async fn notify_stock_of(relay: &super::RunningDaemon, product: &str) {
    let rows = json!([{"storeId": "1", "productId": product}]);
    let (status, body) = send_stock_rows(relay, rows, super::INTAKE_SECRET).await;
    assert_eq!(status, 200, "{body}");
}
