//! What the demo sets up before anything runs: the shop's products, the
//! mapping CSV staff would drop, the orders the EC side sends, the
//! relay's config file and its secrets. Pure, except for drawing the
//! secrets.
//!
//! The config is a real one, loaded by `config::load` like any other; it
//! must only ever point at loopback: the demo never talks to the real
//! Smaregi or to anything outside this machine.

use serde_json::{json, Value};

/// The simulated contract (契約ID) and our terminal (端末ID) in it.
pub const CONTRACT_ID: &str = "demo_contract";
pub const TERMINAL_ID: &str = "9";
/// The one store (店舗ID) the demo shop has.
pub const STORE_ID: &str = "1";
/// The file in the demo folder the daemon logs to.
pub const LOG_FILE: &str = "relay.log";
pub const CONFIG_FILE: &str = "config.toml";
pub const CONTROL_SOCKET: &str = "control.sock";
/// The mapping file as it is dropped (written as `….part` first).
pub const MAPPING_FILE: &str = "demo-mapping.csv";

/// A product of the demo shop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// Smaregi's 商品ID.
    pub smaregi_id: &'static str,
    /// The EC side's code (the mapping's external code).
    pub code: &'static str,
    pub name: &'static str,
    /// Yen, tax included.
    pub unit_price: i64,
    /// Stock in the store when the demo starts.
    pub stock: i64,
}

pub const PRODUCTS: [Product; 3] = [
    Product {
        smaregi_id: "8001",
        code: "TSHIRT-WHT-M",
        name: "Tシャツ 白 M",
        unit_price: 2980,
        stock: 20,
    },
    Product {
        smaregi_id: "8002",
        code: "MUG-BLU",
        name: "マグカップ 青",
        unit_price: 1650,
        stock: 12,
    },
    Product {
        smaregi_id: "8003",
        code: "TOTE-NAT",
        name: "トートバッグ 生成り",
        unit_price: 2200,
        stock: 8,
    },
];

/// The product with `code`.
pub fn product(code: &str) -> Option<&'static Product> {
    PRODUCTS.iter().find(|p| p.code == code)
}

/// Shipping charged on every demo order, yen.
pub const SHIPPING_FEE: i64 = 500;

/// One revision of a demo order: (external code, quantity) lines.
#[derive(Debug, Clone, Copy)]
pub struct DemoOrder {
    pub order_id: &'static str,
    pub revision: u64,
    pub lines: &'static [(&'static str, i64)],
}

impl DemoOrder {
    /// What Smaregi records as the total: the lines, tax included, plus shipping.
    pub fn total(&self) -> i64 {
        self.lines
            .iter()
            .map(|(code, quantity)| product(code).map_or(0, |p| p.unit_price) * quantity)
            .sum::<i64>()
            + SHIPPING_FEE
    }

    /// The order API's JSON for this revision, ordered at `ordered_at`
    /// (`YYYY-MM-DD HH:MM:SS`, JST).
    pub fn json(&self, ordered_at: &str) -> Value {
        json!({
            "order_id": self.order_id,
            "revision": self.revision,
            "ordered_at": ordered_at,
            "store_id": STORE_ID,
            "lines": self.lines.iter().map(|(code, quantity)| {
                let product = product(code).expect("demo orders name demo products");
                json!({
                    "external_code": code,
                    "name": product.name,
                    "unit_price": product.unit_price,
                    "quantity": quantity,
                    "tax_rate": 10,
                })
            }).collect::<Vec<_>>(),
            "shipping_fee": SHIPPING_FEE,
            "payment_method": "credit",
            "customer": {"name": "デモ 太郎"},
        })
    }

    /// `external code × quantity, …`, for the terminal.
    pub fn describe(&self) -> String {
        self.lines
            .iter()
            .map(|(code, quantity)| format!("{code} × {quantity}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A plain order: registered once.
pub const PLAIN: DemoOrder = DemoOrder {
    order_id: "DEMO-1001",
    revision: 1,
    lines: &[("TSHIRT-WHT-M", 2)],
};
/// Registered, then edited: the edit cancels the first transaction and
/// registers the second revision.
pub const EDITED: DemoOrder = DemoOrder {
    order_id: "DEMO-1002",
    revision: 1,
    lines: &[("MUG-BLU", 1)],
};
pub const EDITED_REVISION: DemoOrder = DemoOrder {
    order_id: "DEMO-1002",
    revision: 2,
    lines: &[("MUG-BLU", 3)],
};
/// Registered, then cancelled.
pub const CANCELLED: DemoOrder = DemoOrder {
    order_id: "DEMO-1003",
    revision: 1,
    lines: &[("TOTE-NAT", 1)],
};
/// Sent while Smaregi is down: queued, retried, registered once it is back.
pub const DURING_OUTAGE: DemoOrder = DemoOrder {
    order_id: "DEMO-1004",
    revision: 1,
    lines: &[("TSHIRT-WHT-M", 1), ("TOTE-NAT", 2)],
};

/// The orders whose last revision stands in Smaregi at the end.
pub const STANDING: [DemoOrder; 3] = [PLAIN, EDITED_REVISION, DURING_OUTAGE];

/// Each product's stock once the story is over: the start, less what the
/// orders still standing sold.
pub fn stock_after_orders(product: &Product) -> i64 {
    let sold: i64 = STANDING
        .iter()
        .flat_map(|order| order.lines.iter())
        .filter(|(code, _)| *code == product.code)
        .map(|(_, quantity)| quantity)
        .sum();
    product.stock - sold
}

/// The mapping CSV staff would export: full replacement, Japanese header.
pub fn mapping_csv() -> String {
    let mut text = String::from("スマレジ商品ID,外部コード\r\n");
    for product in &PRODUCTS {
        text.push_str(&format!("{},{}\r\n", product.smaregi_id, product.code));
    }
    text
}

/// The secrets of one demo run; fresh each time.
#[derive(Clone)]
pub struct Secrets {
    pub intake: String,
    pub smaregi_token: String,
    pub orders_token: String,
    /// `whsec_…`, as Standard Webhooks libraries write them.
    pub downstream: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets([redacted])")
    }
}

impl Secrets {
    pub fn generate() -> Self {
        use base64::Engine as _;
        let hex = || -> String {
            rand::random::<[u8; 24]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        Self {
            intake: hex(),
            smaregi_token: hex(),
            orders_token: hex(),
            downstream: format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>())
            ),
        }
    }
}

/// The relay's config for the demo: everything on loopback, state in
/// `state/` beside the config, quick retries so that the outage's
/// retries show within seconds.
pub fn config_text(smaregi_endpoint: &str, downstream_url: &str, secrets: &Secrets) -> String {
    format!(
        r#"# Written by `smaregi-relay demo`. Everything here is on this machine;
# the "Smaregi" is the simulator, the "EC site" the demo's receiver.

[listener]
# A free port; the certificate is generated (self-signed) in state/tls/.
address = "127.0.0.1:0"

[storage]
state-directory = "state"
cache-capacity-mib = 8

[daemon]
shutdown-timeout-seconds = 5

[intake]
secret = "{intake}"

[smaregi]
endpoint = "{smaregi_endpoint}"
contract-id = "{CONTRACT_ID}"
access-token = "{smaregi_token}"
terminal-id = "{TERMINAL_ID}"
request-timeout-seconds = 5

[outbox]
# The defaults wait 5 s, 30 s, 2 min, …; the demo's outage lasts seconds.
retry-schedule-seconds = [1, 2]
retry-repeat-seconds = 2

[mapping]
settle-milliseconds = 200

[stock]
stores = ["{STORE_ID}"]
# Stock moves only by the demo's notifications.
backfill-interval-minutes = 0

[stock.downstream]
url = "{downstream_url}"
secret = "{downstream}"

[orders]
api-token = "{orders_token}"
default-store-id = "{STORE_ID}"

[orders.payment-methods]
credit = "credit"

[admin]
listen = "127.0.0.1:0"
control-socket = "{CONTROL_SOCKET}"
"#,
        intake = secrets.intake,
        smaregi_token = secrets.smaregi_token,
        downstream = secrets.downstream,
        orders_token = secrets.orders_token,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, SecretEnvironment};
    use crate::mapping::check;
    use std::path::Path;

    #[test]
    fn the_config_is_valid_and_stays_on_loopback() {
        let text = config_text(
            "http://127.0.0.1:1234/access/",
            "http://127.0.0.1:1235/ec/stock",
            &Secrets::generate(),
        );
        let env = SecretEnvironment {
            config_directory: "/demo".into(),
            credentials_directory: None,
        };
        let loaded = config::parse(Path::new("/demo/config.toml"), &text, &env)
            .unwrap_or_else(|e| panic!("{e}"));
        let config = loaded.config;
        assert!(config.listener.address.ip().is_loopback());
        assert!(config.admin.listen.ip().is_loopback());
        assert_eq!(config.storage.state_directory, Path::new("/demo/state"));
        assert_eq!(config.admin.control_socket, Path::new("/demo/control.sock"));
        assert!(config.orders.api_token.is_some());
        assert_eq!(config.stock.backfill_interval_minutes, 0);
    }

    #[test]
    fn the_mapping_csv_is_imported_whole() {
        let checked = check::check_text(&mapping_csv(), &check::Rules::default());
        assert!(checked.accepted(), "{:?}", checked.errors);
        assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
        assert_eq!(checked.pairs.len(), PRODUCTS.len());
    }

    #[test]
    fn the_story_adds_up() {
        assert_eq!(PLAIN.total(), 2 * 2980 + 500);
        assert_eq!(DURING_OUTAGE.total(), 2980 + 2 * 2200 + 500);
        let after: Vec<i64> = PRODUCTS.iter().map(stock_after_orders).collect();
        assert_eq!(after, [17, 9, 6]);
        for order in [PLAIN, EDITED, EDITED_REVISION, CANCELLED, DURING_OUTAGE] {
            assert!(order.lines.iter().all(|(code, _)| product(code).is_some()));
        }
    }
}
