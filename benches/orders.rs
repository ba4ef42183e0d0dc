//! Orders through the running daemon into the simulator: 10,000 orders,
//! 20 % of them then edited and 5 % cancelled, sent over HTTPS by 16
//! concurrent clients. Reports the order API's accepted requests per
//! second (each 202 is durable with its jobs) and the time until
//! Smaregi holds every transaction, then checks that what stands in
//! Smaregi is exactly what the orders say.
//!
//! `cargo bench --locked --bench orders`. Smaregi's pace limit is lifted
//! to 1,000 calls/s for the run, so the figure is the relay's own; with
//! Smaregi's default pace the settle time is bounded by that pace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::orders::{expected_total, order, order_config, standing_sales, OrderClient};

const ORDERS: usize = 10_000;
const EDITS: usize = ORDERS / 5;
const CANCELS: usize = ORDERS / 20;
const CLIENTS: usize = 16;

fn lines(n: usize, revision: u64) -> Vec<(String, i64, i64)> {
    vec![
        (format!("{}", 1000 + n % 500), 1100, revision as i64),
        (format!("{}", 2000 + n % 300), 330, 2),
    ]
}

fn borrowed(lines: &[(String, i64, i64)]) -> Vec<(&str, i64, i64)> {
    lines.iter().map(|(p, a, q)| (p.as_str(), *a, *q)).collect()
}

enum Request {
    Put(usize, u64),
    Delete(usize),
}

/// Sends `requests` from `CLIENTS` concurrent clients; latencies.
async fn send_all(client: Arc<OrderClient>, requests: Vec<Request>) -> Vec<Duration> {
    let requests = Arc::new(std::sync::Mutex::new(requests.into_iter()));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let client = Arc::clone(&client);
            let requests = Arc::clone(&requests);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let next = requests.lock().unwrap().next();
                    let Some(request) = next else {
                        return latencies;
                    };
                    let started = Instant::now();
                    let answer = match request {
                        Request::Put(n, revision) => {
                            let id = format!("O-{n}");
                            client
                                .put(&order(&id, revision, &borrowed(&lines(n, revision))))
                                .await
                        }
                        Request::Delete(n) => client.delete(&format!("O-{n}")).await,
                    };
                    assert_eq!(answer.status, 202, "{answer:?}");
                    latencies.push(started.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sim = common::smaregi::simulator().await;
        let temp = tempfile::tempdir().unwrap();
        let config = order_config(
            temp.path(),
            &sim.url(),
            "\n[outbox.rate-limit.smaregi]\nper-second = 1000.0\nburst = 1000\n",
        );
        // The config's [outbox] section comes from order_config; add workers.
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("[outbox]\n", "[outbox]\nworkers = 16\n");
        std::fs::write(&config, text).unwrap();
        let relay = common::RunningDaemon::start(temp.path(), &config);
        let client = Arc::new(OrderClient::new(&relay.url(""), &relay.certificate()));

        let mut requests: Vec<Request> = (0..ORDERS).map(|n| Request::Put(n, 1)).collect();
        // Edits of every fifth order, cancels of every twentieth other one.
        requests.extend((0..EDITS).map(|i| Request::Put(i * 5, 2)));
        requests.extend((0..CANCELS).map(|i| Request::Delete(i * 20 + 1)));
        let total_requests = requests.len();
        let expected_transactions = (ORDERS + 2 * EDITS + CANCELS) as u64;

        let mut writes = sim.writes();
        let started = Instant::now();
        let mut latencies = send_all(Arc::clone(&client), requests).await;
        let accepted_in = started.elapsed();
        writes
            .wait_for(|&n| n >= expected_transactions)
            .await
            .unwrap();
        let settled_in = started.elapsed();

        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        println!("| requests | accepted /s | p50 | p99 | all accepted in | all settled in Smaregi in |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {total_requests} ({ORDERS} orders, {EDITS} edits, {CANCELS} cancels) | {:.0} | {:.1} ms | {:.1} ms | {:.1} s | {:.1} s |",
            total_requests as f64 / accepted_in.as_secs_f64(),
            at(0.50).as_secs_f64() * 1000.0,
            at(0.99).as_secs_f64() * 1000.0,
            accepted_in.as_secs_f64(),
            settled_in.as_secs_f64(),
        );

        let mut expected: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
        for n in 0..ORDERS {
            if n % 20 == 1 && n < CANCELS * 20 {
                continue;
            }
            let revision = if n % 5 == 0 && n < EDITS * 5 { 2 } else { 1 };
            expected.insert(
                format!("O-{n}"),
                vec![(revision, expected_total(&borrowed(&lines(n, revision))))],
            );
        }
        let standing = standing_sales(&sim).unwrap();
        assert_eq!(standing.len(), expected.len());
        assert!(standing == expected, "Smaregi does not hold what the orders say");
        println!(
            "Smaregi holds exactly the {} standing orders; {} transactions in all; {:?}",
            standing.len(),
            sim.contract().transactions.len(),
            sim.stats()
        );
        assert!(relay.stop().success());
        sim.stop().await;
    });
}
