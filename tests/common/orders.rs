//! The order API as the EC side uses it, and what Smaregi ends up holding.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use smaregi_sim::Simulator;

use super::smaregi::{ACCESS_TOKEN, CONTRACT_ID, TERMINAL};

pub const ORDERS_TOKEN: &str = "orders-api-token-0123456789";
/// How long orders may take to settle in the simulator.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

/// A relay config in `dir` with the order API on, calling the simulator
/// at `endpoint`, retrying quickly; `extra` is added at the end.
pub fn order_config(dir: &Path, endpoint: &str, extra: &str) -> PathBuf {
    super::write_file(dir, "smaregi-token", ACCESS_TOKEN, 0o600);
    super::write_file(dir, "orders-token", ORDERS_TOKEN, 0o600);
    super::write_config(
        dir,
        &format!(
            "[smaregi]\nendpoint = \"{endpoint}\"\ncontract-id = \"{CONTRACT_ID}\"\n\
             access-token = {{ file = \"smaregi-token\" }}\nterminal-id = \"{TERMINAL}\"\n\
             request-timeout-seconds = 10\n\n\
             [outbox]\nretry-schedule-seconds = [0, 1]\nretry-repeat-seconds = 1\n\n\
             [orders]\napi-token = {{ file = \"orders-token\" }}\ndefault-store-id = \"1\"\n{extra}\n"
        ),
    )
}

/// An order of `lines` (Smaregi product id, unit price, quantity).
pub fn order(order_id: &str, revision: u64, lines: &[(&str, i64, i64)]) -> Value {
    json!({
        "order_id": order_id,
        "revision": revision,
        "ordered_at": "2026-11-22T10:15:00+09:00",
        "lines": lines.iter().map(|(id, price, quantity)| json!({
            "smaregi_product_id": id,
            "name": format!("商品 {id}"),
            "unit_price": price,
            "quantity": quantity,
            "tax_rate": 10,
        })).collect::<Vec<_>>(),
        "shipping_fee": 500,
        "payment_method": "credit",
    })
}

/// The order API of a running daemon.
pub struct OrderClient {
    http: reqwest::Client,
    base: String,
}

/// An answer: status and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl OrderClient {
    /// `base` is the daemon's `https://localhost:PORT`; `certificate` its own.
    pub fn new(base: &str, certificate: &Path) -> Self {
        Self {
            http: smaregi_sim::sender::http_client(Some(certificate)).unwrap(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("answer {status} is not JSON ({e}): {text}"));
        Answer { status, body }
    }

    pub async fn put(&self, order: &Value) -> Answer {
        let id = order["order_id"].as_str().unwrap();
        self.send(
            reqwest::Method::PUT,
            &format!("/api/v1/orders/{id}"),
            Some(ORDERS_TOKEN),
            Some(serde_json::to_vec(order).unwrap()),
        )
        .await
    }

    pub async fn get(&self, order_id: &str) -> Answer {
        self.send(
            reqwest::Method::GET,
            &format!("/api/v1/orders/{order_id}"),
            Some(ORDERS_TOKEN),
            None,
        )
        .await
    }

    pub async fn delete(&self, order_id: &str) -> Answer {
        self.send(
            reqwest::Method::DELETE,
            &format!("/api/v1/orders/{order_id}"),
            Some(ORDERS_TOKEN),
            None,
        )
        .await
    }

    /// Waits until the order's state satisfies `condition`; its state then.
    pub async fn wait_for(&self, order_id: &str, condition: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        loop {
            let state = self.get(order_id).await.body;
            if condition(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "order {order_id} never reached the expected state: {state:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every job of every order in `order_ids` is done;
    /// polls, since nothing outside the daemon can be told.
    pub async fn settled(&self, order_ids: &[String]) {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        for id in order_ids {
            loop {
                let answer = self.get(id).await;
                assert_eq!(answer.status, 200, "{answer:?}");
                let events = answer.body["events"].as_array().unwrap();
                let done = events
                    .iter()
                    .all(|event| event["job"].is_null() || event["job"]["state"] == "done");
                if done {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "order {id} did not settle within {SETTLE_DEADLINE:?}: {:#}",
                    answer.body
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What stands in Smaregi per order: the revision and total of each
/// registered order transaction no reversal cancels. Checks on the way
/// that no terminal transaction is there twice, every reversal points at
/// a transaction of ours, and none is reversed twice.
pub fn standing_sales(sim: &Simulator) -> Result<BTreeMap<String, Vec<(u64, i64)>>, String> {
    let contract = sim.contract();
    let mut seen = std::collections::HashSet::new();
    let mut reversed = BTreeMap::new();
    for (id, transaction) in &contract.transactions {
        let tran = transaction.field("terminalTranId").unwrap_or("").to_owned();
        if !seen.insert(tran.clone()) {
            return Err(format!("terminalTranId {tran} registered twice"));
        }
        if transaction.field("disposeDivision") == Some("2") {
            let original: u64 = transaction
                .field("disposeServerTransactionHeadId")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("reversal {id} points at nothing"))?;
            if !contract.transactions.contains_key(&original) {
                return Err(format!("reversal {id} points at unknown {original}"));
            }
            if reversed.insert(original, *id).is_some() {
                return Err(format!("transaction {original} reversed twice"));
            }
        }
    }
    let mut standing: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
    for (id, transaction) in &contract.transactions {
        if transaction.field("disposeDivision") == Some("2") || reversed.contains_key(id) {
            continue;
        }
        if transaction.field("cancelDivision") == Some("1") {
            continue;
        }
        let memo = transaction.field("memo").unwrap_or("");
        let rest = memo
            .strip_prefix("EC注文 ")
            .ok_or_else(|| format!("transaction {id} is not an order's: {memo:?}"))?;
        let mut words = rest.split(' ');
        let order_id = words.next().unwrap_or("").to_owned();
        let revision = words
            .nth(1)
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("transaction {id}: no revision in {memo:?}"))?;
        let total = transaction.field("total").unwrap().parse().unwrap();
        standing
            .entry(order_id)
            .or_default()
            .push((revision, total));
    }
    Ok(standing)
}

/// The total Smaregi records for [`order`]'s lines: tax included, plus
/// the 500 yen shipping.
pub fn expected_total(lines: &[(&str, i64, i64)]) -> i64 {
    lines.iter().map(|(_, p, q)| p * q).sum::<i64>() + 500
}
