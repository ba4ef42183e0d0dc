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
use smaregi_sim::Simulator;

const STOCK_TOKEN: &str = "stock-api-token-0123456789";

/// Sends a `stock_send` of `rows` to the daemon, as Smaregi's API送信 does.
async fn notify(relay: &RunningDaemon, rows: Value) {
    let (status, body) = common::smaregi::send_stock_rows(relay, rows, INTAKE_SECRET).await;
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

/// `stock_send` rows for `pairs` (store, product) with Smaregi's amounts
/// now, as Smaregi sends them: a notification of new amounts is never
/// taken for a resend of an earlier one.
fn rows_now(sim: &Simulator, pairs: &[(&str, &str)]) -> Value {
    let contract = sim.contract();
    Value::Array(
        pairs
            .iter()
            .map(|(store, product)| {
                let stock = &contract.stock[*store][*product];
                json!({"storeId": store, "productId": product,
                       "stockAmount": stock.amount.to_string(), "updDateTime": stock.updated})
            })
            .collect(),
    )
}

/// Runs an operator command against the daemon of `config`; its JSON answer.
fn operator(config: &Path, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", "--config", config.to_str().unwrap()]);
    let (code, stdout, stderr) = common::run_relay(&all, &[]);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// Polls `attempt` until it gives a value; fails the test with its last
/// word after the deadline. Polls: nothing outside the daemon can be told
/// when a job ends.
async fn poll<T>(mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + common::EVENT_DEADLINE;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(last) => assert!(std::time::Instant::now() < deadline, "{last}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Polls the daemon's outbox until `done` holds of its status.
async fn until_outbox(config: &Path, done: impl Fn(&Value) -> bool) -> Value {
    poll(|| {
        let status = operator(config, &["status"]);
        match done(&status["outbox"]) {
            true => Ok(status),
            false => Err(format!("the outbox never got there: {status:#}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_product_waits_for_an_operator_while_the_others_go_on() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let relay = RunningDaemon::start(temp.path(), &config);
    let key = |product: &str| ("1".to_owned(), product.to_owned());

    // The EC side does not know 601 and refuses any batch holding it:
    // the batch with 600 is split, 600 goes through, 601 is refused alone.
    downstream.reject_product(Some("601"));
    sim.with_contract(|c| {
        c.set_stock("1", "600", 8, 1);
        c.set_stock("1", "601", 5, 1);
    });
    notify(&relay, rows_now(&sim, &[("1", "600"), ("1", "601")])).await;
    until(&downstream, |log| {
        log.rejected == 2 && log.latest().get(&key("600")) == Some(&8)
    })
    .await;

    // Other products go on, and 601's next change is not queued behind.
    for (round, amount) in [(2, 7), (3, 6)] {
        sim.with_contract(|c| {
            c.set_stock("1", "602", amount, round);
            c.set_stock("1", "601", 6 - round, round);
        });
        notify(&relay, rows_now(&sim, &[("1", "602"), ("1", "601")])).await;
        until(&downstream, |log| {
            log.latest().get(&key("602")) == Some(&amount)
        })
        .await;
    }
    let log = downstream.log.borrow().clone();
    assert_eq!(log.rejected, 2, "601 was not sent again: {log:?}");
    assert!(!log.values.contains_key(&key("601")));

    // The rejected batch is a parked job of its own, with the answer.
    let parked = operator(&config, &["outbox", "list", "--state", "parked"]);
    let parked = parked.as_array().unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0]["kind"], "stock.push-held");
    let id = parked[0]["id"].as_u64().unwrap().to_string();
    let shown = operator(&config, &["outbox", "show", &id]);
    let reason = shown["last-error"]["message"].as_str().unwrap();
    assert!(
        reason.contains("422") && reason.contains("unknown product"),
        "{reason}"
    );
    let status = operator(&config, &["status"]);
    assert_eq!(status["outbox"]["parked"], 1, "{status:#}");

    // Fixed on the EC side, retried by the operator: 601 arrives with its
    // value as it is now, never the older one it was rejected with.
    downstream.reject_product(None);
    let (code, _, stderr) = common::run_relay(
        &["outbox", "retry", &id, "--config", config.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let log = until(&downstream, |log| log.latest().get(&key("601")) == Some(&3)).await;
    assert_eq!(log.values[&key("601")].len(), 1, "{log:?}");
    until_outbox(&config, |outbox| outbox["parked"] == 0).await;

    // Released: its next change goes out with the others. A 200 whose
    // body is garbage is still the downstream's word that it took it.
    downstream.answer_garbage();
    sim.with_contract(|c| c.set_stock("1", "601", 2, 4));
    notify(&relay, rows_now(&sim, &[("1", "601")])).await;
    let log = until(&downstream, |log| log.latest().get(&key("601")) == Some(&2)).await;
    let status = until_outbox(&config, |outbox| outbox["pending"] == 0).await;
    assert_eq!(status["outbox"]["parked"], 0, "{status:#}");
    assert_eq!(
        downstream.log.borrow().batches,
        log.batches,
        "not sent again"
    );
    assert_eq!(log.bad_signatures, 0);
    assert!(relay.stop().success());
    sim.stop().await;
}

/// Discards job `id`; an attempt under way (which the daemon refuses to
/// discard during) is waited out by asking again.
async fn discard(config: &Path, id: &str) {
    let args = [
        "outbox", "discard", id, "--reason", "test", "--yes", "--config",
    ];
    poll(|| {
        let (code, _, stderr) =
            common::run_relay(&[&args[..], &[config.to_str().unwrap()]].concat(), &[]);
        assert!(
            code == 0 || stderr.contains("being attempted right now"),
            "discard {id}: {stderr}"
        );
        if code == 0 {
            Ok(())
        } else {
            Err(format!("discard {id}: {stderr}"))
        }
    })
    .await
}

/// Polls the daemon's pending `stock.push` jobs until there are `count`;
/// their ids, oldest first.
async fn until_pending_pushes(config: &Path, count: usize) -> Vec<String> {
    let args = [
        "outbox",
        "list",
        "--state",
        "pending",
        "--kind",
        "stock.push",
    ];
    poll(|| {
        let listed = operator(config, &args);
        let ids: Vec<String> = (listed.as_array().unwrap().iter())
            .map(|job| job["id"].as_u64().unwrap().to_string())
            .collect();
        match ids.len() == count {
            true => Ok(ids),
            false => Err(format!("never {count} pending pushes: {listed:#}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_pushes_stop_no_later_push_and_lose_no_value() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(temp.path(), &sim, &downstream, "", "");
    let relay = RunningDaemon::start(temp.path(), &config);
    let key = |product: &str| ("1".to_owned(), product.to_owned());

    // A first push fails and waits for its next attempt; a second change
    // stages a second push, queued behind the first.
    downstream.answer(503);
    sim.with_contract(|c| c.set_stock("1", "700", 5, 1));
    notify(&relay, rows_now(&sim, &[("1", "700")])).await;
    until(&downstream, |log| log.refused > 0).await;
    sim.with_contract(|c| c.set_stock("1", "701", 6, 2));
    notify(&relay, rows_now(&sim, &[("1", "701")])).await;
    let pushes = until_pending_pushes(&config, 2).await;

    // During the outage the operator pauses the downstream and gives both
    // up, the second one first (so that it never starts); then the EC side
    // comes back.
    operator(&config, &["pause", "downstream", "--reason", "test"]);
    for push in pushes.iter().rev() {
        discard(&config, push).await;
    }
    until_pending_pushes(&config, 0).await;
    downstream.answer(200);
    operator(&config, &["resume", "downstream"]);

    // The next change goes out, and with it the values the discarded
    // pushes did not deliver: a discarded job's mark stops nothing.
    sim.with_contract(|c| c.set_stock("1", "702", 7, 3));
    notify(&relay, rows_now(&sim, &[("1", "702")])).await;
    let log = until(&downstream, |log| log.latest().get(&key("702")) == Some(&7)).await;
    assert_eq!(log.latest().get(&key("700")), Some(&5), "{log:?}");
    assert_eq!(log.latest().get(&key("701")), Some(&6), "{log:?}");
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusting_notices_an_older_one_that_comes_later_does_not_replace_a_newer_one() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    let config = stock_config(
        temp.path(),
        &sim,
        &downstream,
        "source = \"notification\"\n",
        "",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    let key = ("1".to_owned(), "800".to_owned());

    // Refreshes wait, so that both notices are waiting at once; Smaregi
    // sends the newer one first.
    operator(&config, &["pause", "smaregi", "--reason", "test"]);
    for (amount, at) in [("4", "2026-11-22 10:00:05"), ("5", "2026-11-22 10:00:00")] {
        let row =
            json!({"storeId": "1", "productId": "800", "stockAmount": amount, "updDateTime": at});
        notify(&relay, json!([row])).await;
    }
    operator(&config, &["resume", "smaregi"]);
    until(&downstream, |log| log.values.contains_key(&key)).await;
    until_outbox(&config, |outbox| outbox["pending"] == 0).await;
    let log = downstream.log.borrow().clone();
    let amounts: Vec<i64> = log.values[&key].iter().map(|v| v.stock).collect();
    assert_eq!(amounts, [4], "{log:?}");
    assert!(relay.stop().success());
    sim.stop().await;
}

/// Waits until the mirror knows `product` in `store` (read API, whose
/// token is `STOCK_TOKEN`) and the push its refresh staged has run.
/// Polls: nothing outside the daemon can be told.
async fn learned_and_pushed(relay: &RunningDaemon, config: &Path, store: &str, product: &str) {
    let http = smaregi_sim::sender::http_client(Some(&relay.certificate())).unwrap();
    let deadline = std::time::Instant::now() + common::EVENT_DEADLINE;
    loop {
        let response = http
            .get(relay.url(&format!(
                "/api/v1/stock?smaregi_product_id={product}&store_id={store}"
            )))
            .bearer_auth(STOCK_TOKEN)
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{product} never learned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The push is staged with the value: pending until it has run.
    until_outbox(config, |outbox| outbox["pending"] == 0).await;
}

/// A sale registered at a store register (terminal 1), not by the relay.
fn register_sale(sim: &Simulator, tran: &str, product: &str, quantity: i64) {
    use smaregi_relay::smaregi::sale::{Sale, SaleLine};
    let sale = Sale {
        store_id: "1".into(),
        terminal_id: "1".into(),
        terminal_tran_id: tran.into(),
        terminal_tran_date_time: "2026-11-22 10:00:00".into(),
        lines: vec![SaleLine {
            product_id: Some(product.into()),
            product_code: None,
            product_name: Some(format!("商品 {product}")),
            sales_price: 100,
            quantity,
            returned: false,
        }],
        discount: 0,
        tax_exclude: 0,
        carriage: 0,
        commission: 0,
        customer_id: None,
        memo: None,
        dispose_of: None,
        tax_include: 0,
        sum_division: 2,
        payment: None,
    };
    let params = sale.transaction_upd_params().to_string();
    sim.with_contract(|c| c.call("transaction_upd", &params, smaregi_sim::time::now()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_delta_mode_our_own_orders_are_not_sent_back_but_register_sales_are() {
    use common::orders::{order, OrderClient, ORDERS_TOKEN};
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    common::write_file(temp.path(), "orders-token", ORDERS_TOKEN, 0o600);
    common::write_file(temp.path(), "stock-token", STOCK_TOKEN, 0o600);
    let config = stock_config(
        temp.path(),
        &sim,
        &downstream,
        "api-token = { file = \"stock-token\" }",
        "mode = \"delta\"\n\n[orders]\napi-token = { file = \"orders-token\" }\n\
         default-store-id = \"1\"\n",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    let orders = OrderClient::new(&relay.url(""), &relay.certificate());
    let key = |product: &str| ("1".to_owned(), product.to_owned());
    let stock_of = |product: &str| sim.contract().stock["1"][product].amount;

    // The first values the relay learns are where counting starts.
    sim.with_contract(|c| {
        c.set_stock("1", "701", 10, 1);
        c.set_stock("1", "702", 10, 1);
    });
    let both = [("1", "701"), ("1", "702")];
    notify(&relay, rows_now(&sim, &both)).await;
    learned_and_pushed(&relay, &config, "1", "702").await;
    assert_eq!(downstream.log.borrow().batches, 0, "nothing to send yet");

    // A sale at the store's register is a change the EC side must hear of.
    register_sale(&sim, "1", "701", 1);
    notify(&relay, rows_now(&sim, &both)).await;
    until(&downstream, |log| log.applied.get(&key("701")) == Some(&-1)).await;

    // An order from the EC side: registered by the relay, Smaregi's stock
    // goes down by 2 and Smaregi notifies the relay. The EC side counted
    // that sale itself: no delta. A register sale in the same
    // notification still goes out.
    let placed = orders.put(&order("ec-1", 1, &[("701", 100, 2)])).await;
    assert!(placed.status < 300, "{placed:?}");
    orders.settled(&["ec-1".to_owned()]).await;
    assert_eq!(stock_of("701"), 7, "the order moved Smaregi's stock");
    register_sale(&sim, "2", "702", 3);
    notify(&relay, rows_now(&sim, &both)).await;
    let log = until(&downstream, |log| log.applied.get(&key("702")) == Some(&-3)).await;
    assert_eq!(
        log.applied[&key("701")],
        -1,
        "the order was not sent back: {log:?}"
    );

    // Cancelled: Smaregi's stock comes back; that is not sent either.
    let cancelled = orders.delete("ec-1").await;
    assert!(cancelled.status < 300, "{cancelled:?}");
    orders.settled(&["ec-1".to_owned()]).await;
    assert_eq!(stock_of("701"), 9, "the cancel put the stock back");
    register_sale(&sim, "3", "702", 1);
    notify(&relay, rows_now(&sim, &both)).await;
    let log = until(&downstream, |log| log.applied.get(&key("702")) == Some(&-4)).await;
    assert_eq!(
        log.applied[&key("701")],
        -1,
        "the cancel was not sent back: {log:?}"
    );
    assert_eq!(log.values[&key("701")].len(), 1, "{log:?}");
    assert_eq!((log.bad_signatures, log.duplicates), (0, 0));
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_delta_mode_a_transfer_between_summed_stores_sends_nothing() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    common::write_file(temp.path(), "stock-token", STOCK_TOKEN, 0o600);
    let config = stock_config(
        temp.path(),
        &sim,
        &downstream,
        "api-token = { file = \"stock-token\" }",
        "mode = \"delta\"\nsum-stores = [\"1\", \"2\"]\n",
    );
    let relay = RunningDaemon::start(temp.path(), &config);
    let pairs = [("1", "401"), ("2", "401"), ("1", "402")];
    sim.with_contract(|c| {
        c.set_stock("1", "401", 10, 1);
        c.set_stock("2", "401", 5, 1);
        c.set_stock("1", "402", 3, 1);
    });
    notify(&relay, rows_now(&sim, &pairs)).await;
    learned_and_pushed(&relay, &config, "1", "402").await;

    // 3 of 401 move from the shop to the warehouse while 402 sells one,
    // in one notification: only 402's change is sent, and sent once
    // however often the notification comes.
    sim.with_contract(|c| {
        c.set_stock("1", "401", 7, 2);
        c.set_stock("2", "401", 8, 2);
        c.set_stock("1", "402", 2, 2);
    });
    let rows = rows_now(&sim, &pairs);
    notify(&relay, rows.clone()).await;
    // The same notification again: Smaregi resends.
    notify(&relay, rows).await;
    let summed = |product: &str| ("1+2".to_owned(), product.to_owned());
    until(&downstream, |log| {
        log.applied.get(&summed("402")) == Some(&-1)
    })
    .await;
    // Both notifications refreshed and pushed: nothing more arrives.
    until_outbox(&config, |outbox| outbox["pending"] == 0).await;
    let log = downstream.log.borrow().clone();
    assert_eq!(log.applied.get(&summed("402")), Some(&-1), "{log:?}");
    assert!(!log.values.contains_key(&summed("401")), "{log:?}");
    assert!(relay.stop().success());
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_delta_mode_a_batch_outlives_a_crash_with_its_webhook_id_and_is_applied_once() {
    let sim = simulator().await;
    let downstream = Downstream::start().await;
    let temp = tempfile::tempdir().unwrap();
    common::write_file(temp.path(), "stock-token", STOCK_TOKEN, 0o600);
    let config = stock_config(
        temp.path(),
        &sim,
        &downstream,
        "api-token = { file = \"stock-token\" }",
        "mode = \"delta\"\n",
    );
    let mut relay = RunningDaemon::start(temp.path(), &config);
    let key = ("1".to_owned(), "801".to_owned());
    sim.with_contract(|c| c.set_stock("1", "801", 10, 1));
    notify(&relay, rows_now(&sim, &[("1", "801")])).await;
    learned_and_pushed(&relay, &config, "1", "801").await;

    // Three sold while the EC side is down; then the relay is killed.
    downstream.answer(503);
    sim.with_contract(|c| c.set_stock("1", "801", 7, 2));
    notify(&relay, rows_now(&sim, &[("1", "801")])).await;
    let log = until(&downstream, |log| log.refused >= 2).await;
    let batch_id = log.refused_ids[0].clone();
    relay.daemon.signal(libc::SIGKILL);
    relay.daemon.wait();

    // One more sold meanwhile. Back up, the stored batch goes first, as
    // it was, under its webhook-id; the newer change follows on its own.
    sim.with_contract(|c| c.set_stock("1", "801", 6, 3));
    downstream.answer(200);
    let life = temp.path().join("second-life");
    std::fs::create_dir(&life).unwrap();
    let relay = RunningDaemon::ready(common::Daemon::start(&life, &config), &config);
    let log = until(&downstream, |log| log.applied.get(&key) == Some(&-3)).await;
    assert!(log.ids.contains(&batch_id), "{log:?}");
    assert!(log.refused_ids.iter().all(|id| *id == batch_id), "{log:?}");
    notify(&relay, rows_now(&sim, &[("1", "801")])).await;
    let log = until(&downstream, |log| log.applied.get(&key) == Some(&-4)).await;
    let deltas: Vec<_> = log.values[&key].iter().map(|r| r.delta).collect();
    assert_eq!(deltas, [Some(-3), Some(-1)]);
    assert_eq!((log.duplicates, log.bad_signatures), (0, 0));
    assert!(relay.stop().success());
    sim.stop().await;
}
