//! One 10,000-row stocktake notification through the running daemon:
//! time until the downstream holds every product's final value, and how
//! many Smaregi calls and downstream requests that took.
//!
//! `cargo bench --locked --bench stock`. The simulator plays Smaregi (its
//! pace limit lifted, so the figure is the relay's), a local receiver
//! plays the EC side and checks every signature. Target: at most 10
//! `stock_ref` calls; downstream batches of the configured size (500).

use std::collections::BTreeMap;
use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

use common::downstream::{stock_config, Downstream};
use serde_json::{json, Value};
use smaregi_sim::sender::Sender;

const PRODUCTS: usize = 10_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sim = common::smaregi::simulator().await;
        let downstream = Downstream::start().await;
        let temp = tempfile::tempdir().unwrap();
        // Batches of the default size (500), Smaregi's pace lifted.
        let config = stock_config(
            temp.path(),
            &sim,
            &downstream,
            "",
            "\n[outbox.rate-limit.smaregi]\nper-second = 1000.0\nburst = 1000\n",
        );
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("batch-size = 100\n", "");
        std::fs::write(&config, text).unwrap();
        let relay = common::RunningDaemon::start(temp.path(), &config);
        sim.with_contract(|c| {
            for p in 0..PRODUCTS {
                c.set_stock("1", &(8_000_000 + p).to_string(), (p % 97) as i64, 0);
            }
        });
        let expected: BTreeMap<(String, String), i64> = sim.contract().stock["1"]
            .iter()
            .map(|(product, stock)| (("1".to_owned(), product.clone()), stock.amount))
            .collect();
        let rows: Vec<Value> = (0..PRODUCTS)
            .map(|p| json!({"storeId": "1", "productId": (8_000_000 + p).to_string(),
                            "amount": "0", "stockAmount": ((p % 97) as i64).to_string(), "stockDivision": "08"}))
            .collect();
        let params = json!({"data": [{"table_name": "Stock", "rows": rows}]});
        let sender = Sender::new(Some(&relay.certificate())).unwrap();
        let calls_before = sim.stats().calls;

        let started = Instant::now();
        let (status, body) = sender
            .send(
                &relay.url("/smaregi/notify"),
                "stock_send",
                &params,
                &[("relay_secret".into(), common::INTAKE_SECRET.into())],
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let accepted = started.elapsed();
        let mut log = downstream.log.clone();
        let log = log
            .wait_for(|log| log.latest() == expected)
            .await
            .unwrap()
            .clone();
        let done = started.elapsed();
        let calls = sim.stats().calls - calls_before;
        assert_eq!(log.bad_signatures, 0);
        println!("| rows | answered 200 in | downstream complete in | stock_ref calls | downstream requests |");
        println!("|---|---|---|---|---|");
        println!(
            "| {PRODUCTS} | {:.0} ms | {:.2} s | {calls} | {} |",
            accepted.as_secs_f64() * 1000.0,
            done.as_secs_f64(),
            log.batches
        );
        assert!(calls <= 10, "target: at most 10 stock_ref calls, used {calls}");
        if std::env::var_os("STOCK_BENCH_LOG").is_some() { eprintln!("{}", relay.daemon.stderr()); }
        assert!(relay.stop().success());
        sim.stop().await;
    });
}
