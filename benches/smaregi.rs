//! Registrations per second drained through the outbox to the simulator,
//! next to the simulator's own capacity measured by a plain client in the
//! same run (target: the relay reaches ≥ 70 % of it).
//!
//! `cargo bench --locked --bench smaregi`. No rate limit and no faults.
//! Both sides keep 16 calls in flight. The plain client only calls
//! `transaction_upd`; the relay also stages each job, marks its send
//! started, records the registration and completes the job, each
//! durably. Five interleaved rounds of 2,000 registrations each; the
//! median round of each side is reported, with the process's CPU time per
//! registration (the simulator's own included on both sides).

mod daemon_allocator;

use std::time::Instant;

use smaregi_relay::config::{self, CancelStrategy, Config, RateLimit};
use smaregi_relay::outbox::engine::{EngineBuilder, Settled};
use smaregi_relay::smaregi::client::SmaregiClient;
use smaregi_relay::smaregi::executor::TransactionExecutor;
use smaregi_relay::smaregi::jobs::{SaleJobs, UPSTREAM};
use smaregi_relay::smaregi::jst;
use smaregi_relay::smaregi::ledger::Ledger;
use smaregi_relay::smaregi::sale::{Sale, SaleLine};
use smaregi_relay::store::{Store, StoreOptions};
use smaregi_sim::{SimConfig, Simulator};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

const CONTRACT_ID: &str = "bench_contract";
const ACCESS_TOKEN: &str = "bench-access-token-0123456789";
const IN_FLIGHT: usize = 16;
const PER_ROUND: usize = 2_000;
const ROUNDS: usize = 5;

fn sale(terminal_tran_id: String) -> Sale {
    Sale {
        store_id: "1".into(),
        terminal_id: "9".into(),
        terminal_tran_id,
        terminal_tran_date_time: jst::format(jst::now()),
        lines: vec![SaleLine {
            product_id: Some("113".into()),
            product_code: None,
            product_name: Some("緑茶 500ml".into()),
            sales_price: 150,
            quantity: 2,
            returned: false,
        }],
        discount: 0,
        tax_exclude: 0,
        carriage: 500,
        commission: 0,
        customer_id: None,
        memo: None,
        dispose_of: None,
        tax_include: 0,
        sum_division: 2,
        payment: None,
    }
}

fn relay_config(directory: &std::path::Path, endpoint: &str) -> Config {
    std::fs::write(
        directory.join("intake-secret"),
        "bench-intake-secret-0123456789",
    )
    .unwrap();
    std::fs::write(directory.join("token"), ACCESS_TOKEN).unwrap();
    for name in ["intake-secret", "token"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(directory.join(name), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    let text = format!(
        "[storage]\nstate-directory = \"state\"\n[intake]\nsecret = {{ file = \"intake-secret\" }}\n\
         [smaregi]\nendpoint = \"{endpoint}\"\ncontract-id = \"{CONTRACT_ID}\"\n\
         access-token = {{ file = \"token\" }}\nterminal-id = \"9\"\n\
         [outbox]\nworkers = {IN_FLIGHT}\n"
    );
    let path = directory.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let mut config = config::load(&path).unwrap().config;
    // No rate limit: the config's ceiling (1,000/s) is itself a limit.
    let unlimited = RateLimit {
        per_second: 1e9,
        burst: u32::MAX,
    };
    config.outbox.rate_limit.insert(UPSTREAM.into(), unlimited);
    config
}

/// The CPU time this process has used (user and system), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux");
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks = |field: usize| fields[field].parse::<f64>().expect("clock ticks");
    // utime and stime, fields 14 and 15 of proc_pid_stat(5), in USER_HZ (100).
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs one round; its registrations per second and CPU µs per registration.
async fn measured(round: impl std::future::Future<Output = f64>) -> (f64, f64) {
    let before = cpu_seconds();
    let rate = round.await;
    (rate, (cpu_seconds() - before) * 1e6 / PER_ROUND as f64)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Registrations per second by a plain client, `IN_FLIGHT` at a time.
async fn plain_round(client: &SmaregiClient, round: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                for n in (task..PER_ROUND).step_by(IN_FLIGHT) {
                    client
                        .register(&sale(format!("p{round}-{n}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    PER_ROUND as f64 / started.elapsed().as_secs_f64()
}

/// Registrations per second through the outbox: from the first staged
/// job to the last one done.
async fn relay_round(store: &Store, config: &Config, client: &SmaregiClient) -> f64 {
    let executor = TransactionExecutor::new(
        client.clone(),
        Ledger::open(store).unwrap(),
        CancelStrategy::default(),
    );
    let engine = executor
        .register_with(EngineBuilder::new(store, &config.outbox).unwrap())
        .build()
        .unwrap();
    let jobs = SaleJobs::open(store).unwrap();
    let mut settled = engine.settled();
    let syncs_before = store.sync_count();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));
    let started = Instant::now();
    let stagers: Vec<_> = (0..IN_FLIGHT)
        .map(|task| {
            let (jobs, engine) = (jobs.clone(), engine.clone());
            tokio::spawn(async move {
                for n in (task..PER_ROUND).step_by(IN_FLIGHT) {
                    jobs.register(&format!("order:{n}"), &sale(String::new()))
                        .await
                        .unwrap();
                    engine.wake();
                }
            })
        })
        .collect();
    let mut done = 0;
    while done < PER_ROUND {
        match settled.recv().await {
            Ok(Settled::Done(_)) => done += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(RecvError::Lagged(missed)) => done += missed as usize,
            Err(RecvError::Closed) => panic!("the engine stopped"),
        }
    }
    let rate = PER_ROUND as f64 / started.elapsed().as_secs_f64();
    let rounds = store.sync_count() - syncs_before;
    println!(
        "  relay: {rounds} commit rounds, {:.2} per registration",
        rounds as f64 / PER_ROUND as f64
    );
    for stager in stagers {
        stager.await.unwrap();
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    rate
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let sim = Simulator::start(SimConfig::local(CONTRACT_ID, ACCESS_TOKEN)).await.unwrap();
        let workspace = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let config = relay_config(workspace.path(), &sim.url());
        let store = Store::open(&StoreOptions::from_config(&config.storage)).unwrap();
        let client = SmaregiClient::new(config.smaregi.as_ref().unwrap()).unwrap();
        // Warm the connections and the simulator.
        plain_round(&client, 9).await;

        let (mut plain, mut relay) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            plain.push(measured(plain_round(&client, round)).await);
            relay.push(measured(relay_round(&store, &config, &client)).await);
            println!(
                "round {round}: plain client {:.0}/s ({:.0} µs CPU each), relay {:.0}/s ({:.0} µs CPU each)",
                plain[round].0, plain[round].1, relay[round].0, relay[round].1
            );
        }
        let cpu = |side: &[(f64, f64)]| median(side.iter().map(|r| r.1).collect());
        let (plain_cpu, relay_cpu) = (cpu(&plain), cpu(&relay));
        let (plain, relay) = (
            median(plain.iter().map(|r| r.0).collect()),
            median(relay.iter().map(|r| r.0).collect()),
        );
        println!(
            "smaregi: registrations through the relay {relay:.0}/s, plain client {plain:.0}/s: {:.0} % \
             of the simulator's capacity (target ≥ 70 %); CPU per registration {relay_cpu:.0} µs \
             through the relay, {plain_cpu:.0} µs by the plain client (medians)",
            100.0 * relay / plain
        );
        store.close().await.unwrap();
        sim.stop().await;
    });
}
