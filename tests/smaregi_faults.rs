//! The fault campaign: register and cancel jobs through the real outbox
//! and executors to the simulator, which fails a third of all calls in
//! every way it knows (500s, resets, hangs past the client's timeout,
//! writes that succeed and then fail, malformed answers). At the end the
//! simulator must hold exactly the expected transactions: none missing,
//! none twice, every cancel applied once to its own original.
//!
//! The default run drives 2,000 jobs in-process, and 600 through the real
//! daemon while it is SIGKILLed at random moments; `-- --ignored` runs
//! 20,000 in-process and 50,000 through a daemon killed some 300 times.

use std::collections::{BTreeMap, HashMap};

use smaregi_relay::config::Config;
use smaregi_relay::outbox::engine::{EngineBuilder, Settled};
use smaregi_relay::outbox::job::JobState;
use smaregi_relay::smaregi::client::SmaregiClient;
use smaregi_relay::smaregi::executor::TransactionExecutor;
use smaregi_relay::smaregi::jobs::SaleJobs;
use smaregi_relay::smaregi::ledger::Ledger;
use smaregi_relay::smaregi::sale::{Sale, SaleLine};
use smaregi_relay::store::{Store, StoreOptions};
use smaregi_sim::{Faults, Simulator};
use tokio_util::sync::CancellationToken;

mod common;
use common::smaregi::{relay_config, simulator, TERMINAL};

/// Every kind of fault: 36 % of all calls together.
pub fn campaign_faults() -> Faults {
    Faults {
        error_rate: 0.07,
        reset_rate: 0.07,
        hang_rate: 0.02,
        hang_ms: 1_500,
        commit_then_fail_rate: 0.12,
        malformed_rate: 0.08,
        ..Faults::default()
    }
}

fn template(order: usize) -> Sale {
    Sale {
        store_id: "1".into(),
        terminal_id: TERMINAL.into(),
        terminal_tran_id: String::new(),
        terminal_tran_date_time: String::new(),
        lines: vec![
            SaleLine {
                product_id: Some("113".into()),
                product_code: None,
                product_name: Some("緑茶 500ml".into()),
                sales_price: 150,
                quantity: 1 + (order % 3) as i64,
                returned: false,
            },
            SaleLine {
                product_id: Some("114".into()),
                product_code: None,
                product_name: None,
                sales_price: 980,
                quantity: 1,
                returned: false,
            },
        ],
        discount: 0,
        tax_exclude: 0,
        carriage: 500,
        commission: 0,
        customer_id: None,
        memo: Some(format!("EC order {order}")),
        dispose_of: None,
        tax_include: 0,
        sum_division: 2,
        payment: None,
    }
}

/// What the simulator must end up holding: per register, its
/// terminalTranId; per cancel, its own and its original's.
#[derive(Default)]
struct Expected {
    registers: Vec<String>,
    /// reversal terminalTranId → original terminalTranId.
    cancels: BTreeMap<String, String>,
}

/// Checks the simulator's transactions against what was enqueued.
fn check_exactly_once(sim: &Simulator, expected: &Expected) -> Result<(), String> {
    let contract = sim.contract();
    let mut by_tran_id: HashMap<String, Vec<u64>> = HashMap::new();
    for (id, transaction) in &contract.transactions {
        if transaction.field("terminalId") != Some(TERMINAL) {
            return Err(format!("transaction {id} is on another terminal"));
        }
        let tran = transaction.field("terminalTranId").unwrap_or("").to_owned();
        by_tran_id.entry(tran).or_default().push(*id);
    }
    let duplicates: Vec<_> = by_tran_id.iter().filter(|(_, ids)| ids.len() > 1).collect();
    if !duplicates.is_empty() {
        return Err(format!(
            "{} registered twice, e.g. {:?}",
            duplicates.len(),
            duplicates[0]
        ));
    }
    let expected_count = expected.registers.len() + expected.cancels.len();
    if contract.transactions.len() != expected_count {
        return Err(format!(
            "{} transactions in Smaregi, {expected_count} expected",
            contract.transactions.len()
        ));
    }
    let id_of = |tran: &str| by_tran_id.get(tran).map(|ids| ids[0]);
    for tran in &expected.registers {
        if id_of(tran).is_none() {
            return Err(format!("registration {tran} is missing"));
        }
    }
    for (reversal, original) in &expected.cancels {
        let Some(id) = id_of(reversal) else {
            return Err(format!("cancel {reversal} is missing"));
        };
        let points_at = contract.transactions[&id].field("disposeServerTransactionHeadId");
        let original_id = id_of(original).map(|id| id.to_string());
        if points_at != original_id.as_deref() {
            return Err(format!(
                "cancel {reversal} points at {points_at:?}, its original is {original_id:?}"
            ));
        }
    }
    Ok(())
}

/// The relay's settings for a campaign: a short timeout, immediate
/// retries, 16 workers, and Smaregi's pace lifted to the config's ceiling.
/// No stock back-fill: the campaign counts the outbox's jobs, all of them
/// registrations and cancels.
const CAMPAIGN_SETTINGS: &str = "request-timeout-seconds = 1\n\
    [outbox]\nworkers = 16\nretry-schedule-seconds = [0, 0, 0, 0, 0]\nretry-repeat-seconds = 1\n\
    [outbox.rate-limit.smaregi]\nper-second = 1000.0\nburst = 1000\n\
    [stock]\nbackfill-interval-minutes = 0\n";

/// Enqueues `orders` registrations, every third with its cancel; what
/// Smaregi must end up holding, and the number of jobs.
async fn enqueue_orders(store: &Store, orders: usize) -> (Expected, usize) {
    let jobs = SaleJobs::open(store).unwrap();
    let mut expected = Expected::default();
    let mut job_count = 0;
    for order in 0..orders {
        let key = format!("order:{order}");
        let (_, sale) = jobs.register(&key, &template(order)).await.unwrap();
        expected.registers.push(sale.terminal_tran_id.clone());
        job_count += 1;
        if order % 3 == 0 {
            let (_, reversal) = jobs.cancel(&key, &sale).await.unwrap();
            expected
                .cancels
                .insert(reversal.terminal_tran_id, sale.terminal_tran_id);
            job_count += 1;
        }
    }
    (expected, job_count)
}

/// Runs the engine with the Smaregi executors until all `job_count` jobs
/// are done; panics if one parks or the upstream pauses.
async fn drain(store: &Store, config: &Config, job_count: usize) {
    let smaregi = config.smaregi.as_ref().unwrap();
    let executor = TransactionExecutor::new(
        SmaregiClient::new(smaregi).unwrap(),
        Ledger::open(store).unwrap(),
        smaregi.cancel_strategy,
    );
    let engine = executor
        .register_with(EngineBuilder::new(store, &config.outbox).unwrap())
        .build()
        .unwrap();
    let mut settled = engine.settled();
    // Jobs a killed daemon already finished; read before the engine runs,
    // so that no job is counted here and again by its event.
    let mut done = engine.status().unwrap().total(JobState::Done) as usize;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));
    let deadline = std::time::Duration::from_secs(600 + job_count as u64 / 20);
    tokio::time::timeout(deadline, async {
        while done < job_count {
            match settled.recv().await {
                Ok(Settled::Done(_)) => done += 1,
                Ok(Settled::Rescheduled(_)) => {}
                Ok(other) => {
                    let job = engine.queue().job(other.job()).unwrap().unwrap();
                    panic!("{other:?}: {:?}", job.last_error);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Fall back to the counts, which are exact.
                    done = engine.status().unwrap().total(JobState::Done) as usize;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("every job is done in time");
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let status = engine.status().unwrap();
    assert_eq!(status.total(JobState::Done) as usize, job_count);
}

async fn campaign(orders: usize) {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let config = relay_config(temp.path(), &sim.url(), CAMPAIGN_SETTINGS);
    let store = Store::open(&StoreOptions::from_config(&config.storage)).unwrap();
    let (expected, job_count) = enqueue_orders(&store, orders).await;
    sim.set_faults(campaign_faults());
    drain(&store, &config, job_count).await;

    let stats = sim.stats();
    let faults = stats.injected_errors
        + stats.injected_resets
        + stats.injected_hangs
        + stats.commit_then_fail
        + stats.malformed;
    println!(
        "{job_count} jobs, {} calls, {faults} faults injected: {stats:?}",
        stats.calls
    );
    assert!(
        faults * 100 >= stats.calls * 30,
        "only {faults} of {} calls failed",
        stats.calls
    );
    assert!(stats.commit_then_fail > 0 && stats.injected_hangs > 0 && stats.injected_resets > 0);
    if let Err(problem) = check_exactly_once(&sim, &expected) {
        panic!("{problem}");
    }
    store.close().await.unwrap();
    sim.stop().await;
}

/// The campaign through the real daemon: it drains the jobs while the
/// test SIGKILLs it after a random number of Smaregi calls, up to
/// `kills` times; then an engine in the test finishes what is left.
async fn kill_campaign(orders: usize, kills: usize) {
    let sim = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let config = relay_config(temp.path(), &sim.url(), CAMPAIGN_SETTINGS);
    let config_path = temp.path().join("config.toml");
    let options = StoreOptions::from_config(&config.storage);
    let (expected, job_count) = {
        let store = Store::open(&options).unwrap();
        let enqueued = enqueue_orders(&store, orders).await;
        store.close().await.unwrap();
        enqueued
    };
    sim.set_faults(campaign_faults());
    let (mut calls, mut writes) = (sim.calls(), sim.writes());
    // About two calls per job: the lives together should do the whole
    // campaign, so that the kills land all through it.
    let calls_per_life = (job_count * 4 / kills).max(2);
    let mut killed = 0;
    while killed < kills && sim.contract().transactions.len() < job_count {
        let life = temp.path().join(format!("life-{killed}"));
        std::fs::create_dir(&life).unwrap();
        let mut daemon = common::Daemon::start(&life, &config_path);
        let target = *calls.borrow() + rand::random_range(1..=calls_per_life) as u64;
        // Killed after `target` calls, unless the work is all done first.
        let progress = async {
            tokio::select! {
                _ = calls.wait_for(|&n| n >= target) => {}
                _ = writes.wait_for(|&n| n >= job_count as u64) => {}
            }
        };
        let progressed = tokio::time::timeout(common::EVENT_DEADLINE, progress).await;
        daemon.signal(libc::SIGKILL);
        let status = tokio::task::block_in_place(|| daemon.wait());
        if progressed.is_err() {
            let store = Store::open(&options).unwrap();
            let queue = smaregi_relay::outbox::queue::Queue::open(&store).unwrap();
            let parked = queue
                .list(&smaregi_relay::outbox::queue::ListFilter {
                    state: Some(JobState::Parked),
                    ..Default::default()
                })
                .unwrap();
            let pending = queue
                .list(&smaregi_relay::outbox::queue::ListFilter {
                    state: Some(JobState::Pending),
                    limit: 5,
                    ..Default::default()
                })
                .unwrap();
            let open_files = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
            let stale = queue.stale_due_entries().unwrap();
            panic!(
                "life {killed}: no progress in {:?}; daemon: {status:?}\nopen files in the test: {open_files}\n\
                 stale due entries {stale:?}\ncounts {:?}\nparked {:?}\npending {:?}\nwrites {}\n{}",
                common::EVENT_DEADLINE,
                queue.counts().unwrap(),
                parked.iter().map(|j| (j.id, j.kind.clone(), j.last_error.clone())).collect::<Vec<_>>(),
                pending.iter().map(|j| (j.id, j.kind.clone(), j.next_attempt_at, j.attempts, j.last_error.clone())).collect::<Vec<_>>(),
                *writes.borrow(),
                daemon.stderr()
            );
        }
        killed += 1;
    }
    // Whatever is left: registered but not recorded, or not yet sent.
    let store = Store::open(&options).unwrap();
    drain(&store, &config, job_count).await;
    store.close().await.unwrap();
    println!(
        "{job_count} jobs through {killed} SIGKILLs: {:?}",
        sim.stats()
    );
    if let Err(problem) = check_exactly_once(&sim, &expected) {
        panic!("after {killed} SIGKILLs: {problem}");
    }
    assert!(killed >= kills.min(5), "only {killed} kills happened");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_jobs_through_a_third_of_calls_failing_take_effect_exactly_once() {
    campaign(1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "campaign: 20,000 jobs; run with --ignored"]
async fn twenty_thousand_jobs_take_effect_exactly_once() {
    campaign(15_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_take_effect_exactly_once_through_a_daemon_killed_at_random() {
    kill_campaign(450, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "campaign: 50,000 jobs, ~300 SIGKILLs; run with --ignored"]
async fn fifty_thousand_jobs_take_effect_exactly_once_through_300_sigkills() {
    kill_campaign(37_500, 300).await;
}
