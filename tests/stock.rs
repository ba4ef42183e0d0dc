//! Stock forwarding end to end: the simulator changes stock and notifies
//! the daemon like Smaregi does; a test downstream checks each batch's
//! signature and records what it gets.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::downstream::{stock_config, Downstream, Log};
use common::smaregi::simulator;
use common::{RunningDaemon, INTAKE_SECRET};
use serde_json::{json, Value};
use smaregi_sim::sender::Sender;
use smaregi_sim::Simulator;

const STOCK_TOKEN: &str = "stock-api-token-0123456789";

/// Sends a `stock_send` of `rows` to the daemon, as Smaregi's API送信 does.
async fn notify(relay: &RunningDaemon, rows: Value) {
    let sender = Sender::new(Some(&relay.certificate())).unwrap();
    let params = json!({"data": [{"table_name": "Stock", "rows": rows}]});
    let (status, body) = sender
        .send(
            &relay.url("/smaregi/notify"),
            "stock_send",
            &params,
            &[("relay_secret".into(), INTAKE_SECRET.into())],
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

/// How many jobs of `kind` the stopped daemon's outbox holds, any state.
async fn jobs_of(state: &Path, kind: &str) -> usize {
    let store =
        smaregi_relay::store::Store::open(&common::store_options(&state.join("db"))).unwrap();
    let queue = smaregi_relay::outbox::queue::Queue::open(&store).unwrap();
    let jobs = queue
        .list(&smaregi_relay::outbox::queue::ListFilter {
            kind: Some(kind.to_owned()),
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    store.close().await.unwrap();
    jobs.len()
}

/// Waits until the downstream's log satisfies `done`.
async fn until(downstream: &Downstream, done: impl Fn(&Log) -> bool) -> Log {
    let mut log = downstream.log.clone();
    let result = tokio::time::timeout(common::EVENT_DEADLINE, log.wait_for(|l| done(l))).await;
    match result {
        Ok(Ok(log)) => log.clone(),
        _ => panic!(
            "the downstream never got there: {:#?}",
            downstream.log.borrow()
        ),
    }
}

fn simulator_stock(sim: &Simulator, store: &str) -> BTreeMap<(String, String), i64> {
    sim.contract().stock[store]
        .iter()
        .map(|(product, stock)| ((store.to_owned(), product.clone()), stock.amount))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stocktake_reaches_the_downstream_with_smaregis_values_in_few_calls() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let relay = RunningDaemon::start(temp.path(), &config);

    // 1,500 products counted; the notification's own amounts are stale
    // (Smaregi changed them again since) and every product appears twice.
    let products = 1_500;
    sim.with_contract(|c| {
        for p in 0..products {
            c.set_stock("1", &format!("{}", 8_000_000 + p), (p as i64 % 40) - 5, 0);
        }
    });
    let rows: Vec<Value> = (0..products)
        .flat_map(|p| {
            let product = format!("{}", 8_000_000 + p);
            [
                json!({"storeId": "1", "productId": product, "stockAmount": "999", "stockDivision": "08"}),
                json!({"storeId": "1", "productId": product, "stockAmount": "998", "stockDivision": "08"}),
            ]
        })
        .collect();
    let calls_before = sim.stats().calls;
    notify(&relay, Value::Array(rows)).await;

    let expected = simulator_stock(&sim, "1");
    let log = until(&downstream, |log| log.latest() == expected).await;
    assert_eq!(log.bad_signatures, 0);
    assert_eq!(log.batches, 15, "1,500 products in batches of 100");
    let calls = sim.stats().calls - calls_before;
    assert!(calls <= 2, "{calls} stock_ref calls for 1,500 products");
    assert!(
        log.values.values().all(|values| values.len() == 1),
        "each product sent once"
    );
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_downstream_outage_each_product_gets_its_newest_value_never_an_older_one() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let relay = RunningDaemon::start(temp.path(), &config);

    downstream.answer(503);
    for round in 0..5i64 {
        sim.with_contract(|c| {
            for p in ["101", "102", "103"] {
                c.set_stock("1", p, 10 - round, round);
            }
        });
        // As Smaregi sends them: each change carries its amounts, so no
        // two are the same notification.
        let rows: Vec<Value> = ["101", "102", "103"]
            .iter()
            .map(|p| json!({"storeId": "1", "productId": p, "amount": "-1", "stockAmount": (10 - round).to_string()}))
            .collect();
        notify(&relay, Value::Array(rows)).await;
    }
    // The downstream refused something, then comes back.
    until(&downstream, |log| log.refused > 0).await;
    downstream.answer(200);
    let expected = simulator_stock(&sim, "1");
    let log = until(&downstream, |log| log.latest() == expected).await;
    for (product, values) in &log.values {
        let times: Vec<_> = values.iter().map(|v| v.updated_at.clone()).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "{product:?} got an older value after a newer one: {values:?}"
        );
    }
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_and_other_stores_are_skipped_and_the_rest_forwarded_with_the_clamp() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    common::write_file(temp.path(), "stock-token", STOCK_TOKEN, 0o600);
    let config = stock_config(
        temp.path(),
        &sim,
        &downstream,
        "stores = [\"1\"]\napi-token = { file = \"stock-token\" }",
        "",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("batch-size = 100\n", "batch-size = 100\nclamp = \"cart\"\n");
    std::fs::write(&config, text).unwrap();
    let relay = RunningDaemon::start(temp.path(), &config);
    sim.with_contract(|c| {
        c.set_stock("1", "201", -4, 0);
        c.set_stock("1", "202", 2_000_000, 0);
        c.set_stock("2", "203", 7, 0);
    });
    notify(
        &relay,
        json!([
            {"storeId": "1", "productId": "1234567890123456"},
            {"storeId": "1", "productId": "201", "stockAmount": "lots"},
            {"storeId": "1", "productId": "201"},
            {"storeId": "1", "productId": "202"},
            {"storeId": "2", "productId": "203"},
        ]),
    )
    .await;
    let log = until(&downstream, |log| log.values.len() == 2).await;
    let latest = log.latest();
    assert_eq!(
        latest[&("1".into(), "201".into())],
        0,
        "negative stock becomes 0"
    );
    assert_eq!(
        latest[&("1".into(), "202".into())],
        999_999,
        "capped for the cart"
    );
    assert!(
        !latest.contains_key(&("2".into(), "203".into())),
        "store 2 is not followed"
    );
    assert_eq!(
        log.values[&("1".into(), "201".into())][0]
            .external_code
            .as_deref(),
        Some("201"),
        "identity mapping until a mapping is imported"
    );

    // The read API answers from the mirror: the true value, not clamped.
    let http = smaregi_sim::sender::http_client(Some(&relay.certificate())).unwrap();
    let get = |query: &str, token: Option<&str>| {
        let mut request = http.get(relay.url(&format!("/api/v1/stock?{query}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (status, serde_json::from_str::<Value>(&text).unwrap())
        }
    };
    let (status, body) = get("smaregi_product_id=201&store_id=1", Some(STOCK_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stores"][0]["stock"], -4);
    let (status, body) = get("external_code=202", Some(STOCK_TOKEN)).await;
    assert_eq!(
        (status, body["stores"][0]["stock"].clone()),
        (200, json!(2_000_000))
    );
    assert_eq!(get("external_code=202", None).await.0, 401);
    assert_eq!(
        get("smaregi_product_id=203", Some(STOCK_TOKEN)).await.0,
        404
    );
    assert_eq!(get("colour=red", Some(STOCK_TOKEN)).await.0, 400);
    assert_eq!(
        get("smaregi_product_id=1234567890123456", Some(STOCK_TOKEN))
            .await
            .0,
        400
    );
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_daemon_was_down_are_back_filled_once() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(
        temp.path(),
        &sim,
        &downstream,
        "backfill-interval-minutes = 60",
        "",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    assert!(relay.stop().success());

    // Sales and corrections while the relay is down: no notification
    // reaches it.
    sim.with_contract(|c| {
        for (i, p) in ["301", "302", "303"].iter().enumerate() {
            c.set_stock("1", p, 10 * (i as i64 + 1), 100);
            c.set_stock("1", p, 10 * (i as i64 + 1) - 3, 200);
        }
    });
    let expected = simulator_stock(&sim, "1");

    let life = temp.path().join("second-life");
    std::fs::create_dir(&life).unwrap();
    let relay = RunningDaemon::ready(common::Daemon::start(&life, &config), &config);
    let log = until(&downstream, |log| log.latest() == expected).await;
    assert!(
        log.values.values().all(|values| values.len() == 1),
        "{log:?}"
    );
    let state = relay.state.clone();
    assert!(relay.stop().success());
    let refreshes_before = jobs_of(&state, "stock.refresh").await;
    assert!(refreshes_before > 0, "the back-fill refreshed");

    // Started again with nothing new: the history is read past the
    // cursor, nothing is refreshed or sent again.
    let calls = sim.stats().calls;
    let life = temp.path().join("third-life");
    std::fs::create_dir(&life).unwrap();
    let relay = RunningDaemon::ready(common::Daemon::start(&life, &config), &config);
    let mut calls_seen = sim.calls();
    tokio::time::timeout(common::EVENT_DEADLINE, calls_seen.wait_for(|&n| n > calls))
        .await
        .unwrap()
        .unwrap();
    // A stop lets the attempt in flight finish and records it.
    assert!(relay.stop().success());
    assert_eq!(jobs_of(&state, "stock.refresh").await, refreshes_before);
    assert_eq!(
        sim.stats().calls - calls,
        1,
        "one StockHistory read, no refresh"
    );
    assert_eq!(
        downstream.log.borrow().batches,
        log.batches,
        "nothing sent again"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summed_stores_reach_the_downstream_as_one_value_and_a_transfer_changes_nothing() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "batch-size = 100\n",
        "batch-size = 100\nsum-stores = [\"1\", \"2\"]\n",
    );
    std::fs::write(&config, text).unwrap();
    let relay = RunningDaemon::start(temp.path(), &config);
    let rows = |products: &[(&str, &str, i64)]| {
        Value::Array(
            products
                .iter()
                .map(|(store, product, amount)| {
                    json!({"storeId": store, "productId": product, "stockAmount": amount.to_string()})
                })
                .collect(),
        )
    };
    let summed = |product: &str| ("1+2".to_owned(), product.to_owned());

    sim.with_contract(|c| {
        c.set_stock("1", "401", 10, 1);
        c.set_stock("2", "401", 5, 1);
        c.set_stock("1", "402", 3, 1);
    });
    notify(
        &relay,
        rows(&[("1", "401", 10), ("2", "401", 5), ("1", "402", 3)]),
    )
    .await;
    until(&downstream, |log| {
        log.latest().get(&summed("401")) == Some(&15)
    })
    .await;

    // 3 of 401 move from the shop to the warehouse, and 402 sells, in one
    // notification: 402's new sum arrives, 401's unchanged one is not sent.
    sim.with_contract(|c| {
        c.set_stock("1", "401", 7, 2);
        c.set_stock("2", "401", 8, 2);
        c.set_stock("1", "402", 2, 2);
    });
    notify(
        &relay,
        rows(&[("1", "401", 7), ("2", "401", 8), ("1", "402", 2)]),
    )
    .await;
    let log = until(&downstream, |log| {
        log.latest().get(&summed("402")) == Some(&2)
    })
    .await;
    let sent: Vec<i64> = log.values[&summed("401")].iter().map(|r| r.stock).collect();
    assert_eq!(sent, [15], "the transfer sent nothing");
    assert!(
        log.values.keys().all(|(store, _)| store == "1+2"),
        "only sums: {:?}",
        log.values.keys()
    );
    assert!(relay.stop().success());
    sim.stop().await;
}
