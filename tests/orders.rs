//! The order API end to end: the real daemon, real TLS, real sled, and
//! the Smaregi simulator; what Smaregi ends up holding is checked after
//! each story.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::orders::{
    expected_total, order, order_config, standing_sales, OrderClient, ORDERS_TOKEN,
};
use common::smaregi::simulator;
use common::RunningDaemon;
use reqwest::Method;
use serde_json::json;
use smaregi_sim::faults::Faults;
use smaregi_sim::Simulator;

fn client(relay: &RunningDaemon) -> OrderClient {
    OrderClient::new(&relay.url(""), &relay.certificate())
}

/// A daemon in `dir` with the order API on, delivering to `sim`.
fn start(dir: &Path, sim: &Simulator, extra: &str) -> (PathBuf, RunningDaemon, OrderClient) {
    let config = order_config(dir, &sim.url(), extra);
    let relay = RunningDaemon::start(dir, &config);
    let orders = client(&relay);
    (config, relay, orders)
}

fn outage() -> Faults {
    Faults {
        error_rate: 1.0,
        ..Faults::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_edited_twice_and_sent_three_times_stands_once_as_its_last_revision() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(temp.path(), &sim, "");

    let first = order("A-1", 1, &[("101", 1100, 2)]);
    let answers = [
        orders.put(&first).await,
        orders.put(&first).await,
        orders.put(&first).await,
    ];
    assert_eq!(answers[0].status, 202, "{:?}", answers[0]);
    assert_eq!(answers[0].body["jobs"].as_array().unwrap().len(), 1);
    for again in &answers[1..] {
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(again.body["result"], "unchanged");
    }
    // Edited twice in quick succession: each edit cancels, then registers.
    let second = order("A-1", 2, &[("101", 1100, 3)]);
    let third = order("A-1", 3, &[("101", 1100, 1), ("102", 330, 2)]);
    for edit in [&second, &third] {
        let answer = orders.put(edit).await;
        assert_eq!(answer.status, 202, "{answer:?}");
        assert_eq!(answer.body["jobs"].as_array().unwrap().len(), 2);
    }
    orders.settled(&["A-1".into()]).await;

    let standing = standing_sales(&sim).unwrap();
    assert_eq!(
        standing,
        BTreeMap::from([(
            "A-1".to_owned(),
            vec![(3, expected_total(&[("101", 1100, 1), ("102", 330, 2)]))]
        )])
    );
    assert_eq!(
        sim.contract().transactions.len(),
        5,
        "3 registrations, 2 reversals"
    );
    let state = orders.get("A-1").await.body;
    assert_eq!(state["revision"], 3);
    assert_eq!(state["status"], "active");
    assert!(
        state["transaction"]["transaction_head_id"].is_string(),
        "{state:#}"
    );
    assert_eq!(state["events"].as_array().unwrap().len(), 5);
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_before_its_registration_succeeded_leaves_no_sale() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(temp.path(), &sim, "");

    sim.set_faults(outage());
    assert_eq!(
        orders
            .put(&order("B-1", 1, &[("101", 500, 1)]))
            .await
            .status,
        202
    );
    // The registration has failed at least once before the cancel arrives.
    let state = orders
        .wait_for("B-1", |state| {
            state["events"][0]["job"]["attempts"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(state["events"][0]["job"]["state"], "pending", "{state:#}");
    assert_eq!(orders.delete("B-1").await.status, 202);
    assert_eq!(
        orders.delete("B-1").await.status,
        200,
        "a second cancel changes nothing"
    );
    sim.set_faults(Faults::default());
    orders.settled(&["B-1".into()]).await;

    assert_eq!(standing_sales(&sim).unwrap(), BTreeMap::new());
    let state = orders.get("B-1").await.body;
    assert_eq!(state["status"], "cancelled");
    assert!(state["transaction"].is_null());
    // A cancelled order stays cancelled.
    let revived = orders.put(&order("B-1", 2, &[("101", 500, 1)])).await;
    assert_eq!(revived.status, 409, "{revived:?}");
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_during_a_smaregi_outage_is_delivered_in_order_once_it_ends() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(temp.path(), &sim, "");

    assert_eq!(
        orders
            .put(&order("C-1", 1, &[("101", 800, 1)]))
            .await
            .status,
        202
    );
    orders.settled(&["C-1".into()]).await;
    sim.set_faults(outage());
    assert_eq!(
        orders
            .put(&order("C-1", 2, &[("101", 800, 4)]))
            .await
            .status,
        202
    );
    let state = orders
        .wait_for("C-1", |state| {
            state["events"][1]["job"]["attempts"].as_u64() >= Some(1)
        })
        .await;
    let cancel = &state["events"][1];
    assert_eq!(cancel["action"], "cancel");
    assert_eq!(cancel["job"]["state"], "pending", "{state:#}");
    assert!(
        cancel["job"]["last_error"]["message"].is_string(),
        "the failure is visible: {state:#}"
    );
    assert_eq!(
        state["events"][2]["job"]["attempts"], 0,
        "the register waits for the cancel"
    );
    sim.set_faults(Faults::default());
    orders.settled(&["C-1".into()]).await;
    assert_eq!(
        standing_sales(&sim).unwrap(),
        BTreeMap::from([(
            "C-1".to_owned(),
            vec![(2, expected_total(&[("101", 800, 4)]))]
        )])
    );
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_between_an_edits_cancel_and_register_ends_with_the_edit_standing_once() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (config, relay, orders) = start(temp.path(), &sim, "");
    assert_eq!(
        orders
            .put(&order("D-1", 1, &[("101", 1000, 1)]))
            .await
            .status,
        202
    );
    orders.settled(&["D-1".into()]).await;

    // Every call waits three seconds before Smaregi acts on it: once the
    // cancel is stored, the register is at least that far away, and the
    // daemon dies in between, however loaded the machine.
    sim.set_faults(Faults {
        latency_ms: 3_000,
        ..Faults::default()
    });
    let mut writes = sim.writes();
    let before = *writes.borrow();
    assert_eq!(
        orders
            .put(&order("D-1", 2, &[("101", 1000, 2)]))
            .await
            .status,
        202
    );
    tokio::time::timeout(common::EVENT_DEADLINE, writes.wait_for(|&n| n > before))
        .await
        .unwrap()
        .unwrap();
    let mut daemon = relay.daemon;
    daemon.signal(libc::SIGKILL);
    daemon.wait();
    assert_eq!(
        sim.contract().transactions.len(),
        2,
        "registration and its reversal"
    );
    sim.set_faults(Faults::default());

    let life = temp.path().join("second-life");
    std::fs::create_dir(&life).unwrap();
    let relay = RunningDaemon::ready(common::Daemon::start(&life, &config), &config);
    let orders = client(&relay);
    orders.settled(&["D-1".into()]).await;
    assert_eq!(
        standing_sales(&sim).unwrap(),
        BTreeMap::from([(
            "D-1".to_owned(),
            vec![(2, expected_total(&[("101", 1000, 2)]))]
        )])
    );
    assert_eq!(sim.contract().transactions.len(), 3);
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_orders_get_a_clear_4xx_and_nothing_is_recorded() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(temp.path(), &sim, "");
    let path = "/api/v1/orders/E-1";
    let valid = order("E-1", 1, &[("101", 1000, 1)]);
    let send = |token: Option<&'static str>, body: Vec<u8>| {
        orders.send(Method::PUT, path, token, Some(body))
    };

    let no_token = send(None, serde_json::to_vec(&valid).unwrap()).await;
    assert_eq!(no_token.status, 401, "{no_token:?}");
    assert!(no_token.body["error"]
        .as_str()
        .unwrap()
        .contains("bearer token"));
    let wrong_token = send(
        Some("orders-api-token-0123456780"),
        serde_json::to_vec(&valid).unwrap(),
    )
    .await;
    assert_eq!(wrong_token.status, 401);

    let invalid_json = send(Some(ORDERS_TOKEN), b"{\"revision\": 1,".to_vec()).await;
    assert_eq!(invalid_json.status, 400, "{invalid_json:?}");
    assert_eq!(invalid_json.body["line"], 1);

    let cases = [
        ("unknown field", json!({"colour": "red"}), "colour"),
        (
            "negative quantity",
            json!({"lines": [{"smaregi_product_id": "101", "name": "x", "unit_price": 1, "quantity": -1, "tax_rate": 10}]}),
            "lines[0].quantity",
        ),
        (
            "absurd price",
            json!({"lines": [{"smaregi_product_id": "101", "name": "x", "unit_price": 1_000_000_000, "quantity": 1, "tax_rate": 10}]}),
            "lines[0].unit_price",
        ),
        (
            "overflowing total",
            json!({"lines": (0..200).map(|_| json!({"smaregi_product_id": "101", "name": "x", "unit_price": 99_999_999, "quantity": 99_999, "tax_rate": 10})).collect::<Vec<_>>()}),
            "lines",
        ),
        (
            "product code",
            json!({"lines": [{"smaregi_product_id": "101", "product_code": "コード", "name": "x", "unit_price": 1, "quantity": 1, "tax_rate": 10}]}),
            "lines[0].product_code",
        ),
        (
            "product id",
            json!({"lines": [{"smaregi_product_id": "1234567890123456", "name": "x", "unit_price": 1, "quantity": 1, "tax_rate": 10}]}),
            "lines[0].smaregi_product_id",
        ),
    ];
    for (what, change, field) in cases {
        let mut body = valid.clone();
        for (key, value) in change.as_object().unwrap() {
            body[key] = value.clone();
        }
        let answer = send(Some(ORDERS_TOKEN), serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(answer.status, 422, "{what}: {answer:?}");
        let problems = answer.body["problems"].as_array().unwrap();
        assert!(
            problems.iter().any(|p| p["field"] == field),
            "{what}: {field} not named in {problems:?}"
        );
    }
    assert_eq!(orders.get("E-1").await.status, 404, "nothing was recorded");

    let wrong_method = orders
        .send(Method::POST, path, Some(ORDERS_TOKEN), None)
        .await;
    assert_eq!(wrong_method.status, 405);
    let bad_id = orders
        .send(
            Method::GET,
            "/api/v1/orders/a%2Fb",
            Some(ORDERS_TOKEN),
            None,
        )
        .await;
    assert_eq!(bad_id.status, 404);
    assert_eq!(orders.delete("E-404").await.status, 404);

    // Revisions only move forward, and one revision has one content.
    assert_eq!(
        orders
            .put(&order("E-1", 5, &[("101", 1000, 1)]))
            .await
            .status,
        202
    );
    let older = orders.put(&order("E-1", 4, &[("101", 1000, 1)])).await;
    assert_eq!(older.status, 409, "{older:?}");
    assert_eq!(older.body["current_revision"], 5);
    let changed = orders.put(&order("E-1", 5, &[("101", 1000, 2)])).await;
    assert_eq!(changed.status, 409, "{changed:?}");
    orders.settled(&["E-1".into()]).await;
    assert_eq!(
        sim.contract().transactions.len(),
        1,
        "only the accepted revision"
    );
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_with_an_unmapped_product_is_held_or_refused_as_configured() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(temp.path(), &sim, "");
    let mut unmapped = order("F-1", 1, &[("101", 1000, 1)]);
    unmapped["lines"][0] = json!({"external_code": "TEA-500", "name": "緑茶", "unit_price": 150, "quantity": 2, "tax_rate": 8});

    let held = orders.put(&unmapped).await;
    assert_eq!(held.status, 202, "{held:?}");
    assert_eq!(held.body["jobs"].as_array().unwrap().len(), 0);
    assert_eq!(
        held.body["held_for_unmapped"][0]["external_code"], "TEA-500",
        "{held:?}"
    );
    let state = orders.get("F-1").await.body;
    assert_eq!(state["status"], "held");
    // Cancelling a held order needs nothing from Smaregi.
    let cancelled = orders.delete("F-1").await;
    assert_eq!(cancelled.status, 202);
    assert_eq!(cancelled.body["jobs"].as_array().unwrap().len(), 0);
    assert!(relay.stop().success());

    let strict = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(strict.path(), &sim, "unmapped = \"reject\"");
    let refused = orders.put(&unmapped).await;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert_eq!(
        refused.body["problems"][0]["field"],
        "lines[0].external_code"
    );
    assert_eq!(orders.get("F-1").await.status, 404);
    assert!(relay.stop().success());
    assert_eq!(sim.contract().transactions.len(), 0);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_order_is_registered_once_a_mapping_csv_knows_its_products() {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let (_, relay, orders) = start(temp.path(), &sim, "");
    let mut held = order("G-1", 1, &[("101", 1000, 1)]);
    held["lines"][0] = json!({"external_code": "TEA-500", "name": "緑茶", "unit_price": 150, "quantity": 2, "tax_rate": 8});
    assert_eq!(orders.put(&held).await.status, 202);
    assert_eq!(orders.get("G-1").await.body["status"], "held");

    // Staff drop a mapping file: written elsewhere, renamed in whole.
    let drop = relay.state.join("drop");
    let staged = temp.path().join("mapping.csv");
    std::fs::write(&staged, "smaregi-id,external-code\r\n8000500,TEA-500\r\n").unwrap();
    std::fs::rename(&staged, drop.join("mapping.csv")).unwrap();

    let state = orders
        .wait_for("G-1", |state| state["status"] == "active")
        .await;
    assert_eq!(state["events"][1]["action"], "register", "{state:#}");
    orders.settled(&["G-1".into()]).await;
    let contract = sim.contract();
    let registered = contract.transactions.values().next().expect("registered");
    assert_eq!(
        registered.details[0].get("productId").map(String::as_str),
        Some("8000500")
    );
    assert_eq!(
        standing_sales(&sim).unwrap()["G-1"],
        vec![(1, 150 * 2 + 500)]
    );
    assert!(relay.stop().success());
    sim.stop().await;
}
