//! Stock forwarding through a downstream outage of hours, on a clock the
//! test moves: the real outbox engine, the real stock executors on a real
//! store, the simulator as Smaregi and a real HTTP downstream on
//! loopback. The test advances the clock through the retry schedule and
//! awaits the engine's settled outcomes and the downstream's log; it
//! never sleeps.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::downstream::{stock_config, Downstream, Log};
use common::smaregi::simulator;
use smaregi_relay::config;
use smaregi_relay::mapping::IdentityCatalog;
use smaregi_relay::outbox::engine::{Clock, Engine, EngineBuilder, Settled};
use smaregi_relay::outbox::job::{Job, JobState};
use smaregi_relay::outbox::retry::{unix_millis, RetryPolicy};
use smaregi_relay::smaregi::client::SmaregiClient;
use smaregi_relay::stock::book::{register_executors, PUSH_KIND, REFRESH_KIND};
use smaregi_relay::stock::notice::StockHint;
use smaregi_relay::stock::StockBook;
use smaregi_relay::store::Store;
use smaregi_sim::Simulator;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const HOUR: u64 = 3_600_000;
const PRODUCTS: [&str; 3] = ["501", "502", "503"];

/// A clock the test sets.
struct TestClock(AtomicU64);

impl Clock for TestClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Harness {
    sim: Simulator,
    downstream: Downstream,
    clock: Arc<TestClock>,
    book: StockBook,
    engine: Engine,
    settled: broadcast::Receiver<Settled>,
    /// Outcomes received while waiting for another kind's.
    backlog: Vec<(Settled, Job)>,
    policy: RetryPolicy,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<()>,
    store: Store,
    _temp: tempfile::TempDir,
}

impl Harness {
    /// The default retry schedule and maximum age, `mode` downstream.
    async fn start(mode: &str) -> Self {
        let sim = simulator().await;
        let downstream = Downstream::start().await;
        let temp = tempfile::tempdir().unwrap();
        let path = stock_config(temp.path(), &sim, &downstream, "", "");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(
                "retry-schedule-seconds = [0, 1]\nretry-repeat-seconds = 1\n",
                "",
            )
            .replace(
                "batch-size = 100\n",
                &format!("batch-size = 100\nmode = \"{mode}\"\n"),
            );
        std::fs::write(&path, text).unwrap();
        let config = config::load(&path).unwrap_or_else(|e| panic!("{e}")).config;
        let store = Store::open(&common::store_options(&temp.path().join("db"))).unwrap();
        let clock = Arc::new(TestClock(AtomicU64::new(unix_millis(
            std::time::SystemTime::now(),
        ))));
        let book = StockBook::open(&store, &config.stock)
            .unwrap()
            .with_clock(clock.clone());
        let client = SmaregiClient::new(config.smaregi.as_ref().unwrap()).unwrap();
        let builder = EngineBuilder::new(&store, &config.outbox)
            .unwrap()
            .clock(clock.clone());
        let engine = register_executors(
            builder,
            &book,
            Some(client),
            config.stock.downstream.as_ref(),
            Arc::new(IdentityCatalog),
        )
        .unwrap()
        .build()
        .unwrap();
        let settled = engine.settled();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let (engine, shutdown) = (engine.clone(), shutdown.clone());
            async move { engine.run(shutdown).await.unwrap() }
        });
        Self {
            sim,
            downstream,
            clock,
            book,
            engine,
            settled,
            backlog: Vec::new(),
            policy: RetryPolicy::from_config(&config.outbox),
            shutdown,
            running,
            store,
            _temp: temp,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn set_clock(&self, at: u64) {
        self.clock.0.store(at, Ordering::SeqCst);
        self.engine.wake();
    }

    /// Smaregi's stock changes (as of `at`, JST seconds) and the relay is told.
    async fn change(&self, amounts: &[(&str, i64)], at: i64) {
        self.sim.with_contract(|c| {
            for (product, amount) in amounts {
                c.set_stock("1", product, *amount, at);
            }
        });
        let hints: Vec<StockHint> = amounts
            .iter()
            .map(|(product, _)| StockHint {
                store_id: "1".into(),
                product_id: (*product).into(),
                amount: None,
                updated_at: None,
            })
            .collect();
        self.book.note(&hints).await.unwrap();
        self.engine.wake();
    }

    /// The next settled outcome of a job of `kind`.
    async fn next_of(&mut self, kind: &str) -> (Settled, Job) {
        if let Some(at) = self.backlog.iter().position(|(_, job)| job.kind == kind) {
            return self.backlog.remove(at);
        }
        tokio::time::timeout(common::EVENT_DEADLINE, async {
            loop {
                let settled = self.settled.recv().await.unwrap();
                // As the outcome left it: read before the next attempt can change it.
                let job = self.engine.queue().job(settled.job()).unwrap().unwrap();
                if job.kind == kind {
                    return (settled, job);
                }
                self.backlog.push((settled, job));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no outcome of a {kind} job"))
    }

    /// Waits until the downstream's log satisfies `done`.
    async fn until(&self, done: impl Fn(&Log) -> bool) -> Log {
        let mut log = self.downstream.log.clone();
        let result = tokio::time::timeout(common::EVENT_DEADLINE, log.wait_for(|l| done(l))).await;
        match result {
            Ok(Ok(log)) => log.clone(),
            _ => panic!(
                "the downstream never got there: {:#?}",
                self.downstream.log.borrow()
            ),
        }
    }

    fn simulator_stock(&self) -> std::collections::BTreeMap<(String, String), i64> {
        self.sim.contract().stock["1"]
            .iter()
            .map(|(product, stock)| (("1".to_owned(), product.clone()), stock.amount))
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap();
        self.store.close().await.unwrap();
        self.sim.stop().await;
    }
}

/// How many attempts fail before the downstream is back at `outage`
/// after the first, if each waits the longest its schedule allows.
fn failures_within(policy: &RetryPolicy, outage: u64) -> u32 {
    let (mut at, mut failures) = (0u64, 0u32);
    loop {
        failures += 1;
        let next = at + policy.base_delay(failures).as_millis() as u64;
        if next >= outage {
            return failures;
        }
        at = next;
    }
}

/// The downstream answers 503 for five hours of the test clock while
/// stock changes every step of the retry schedule. Each retry comes
/// within its step of the schedule; when the downstream is back, it gets
/// every product's newest value (absolute) or every change exactly once
/// (delta), nothing older after newer, and nothing is parked.
async fn outage(mode: &str) {
    let mut h = Harness::start(mode).await;
    let start = h.now();
    let outage = 5 * HOUR;
    // Known to the relay and, in delta mode, the downstream's baseline.
    h.change(&[("501", 10), ("502", 20), ("503", 30)], 1).await;
    assert!(matches!(h.next_of(REFRESH_KIND).await.0, Settled::Done(_)));
    let first = h.next_of(PUSH_KIND).await.0;
    assert!(matches!(first, Settled::Done(_)), "{first:?}");
    let initial = h.simulator_stock();
    if mode == "absolute" {
        h.until(|log| log.latest() == initial).await;
    }

    h.downstream.answer(503);
    h.change(&[("501", 9)], 2).await;
    let mut step = 0i64;
    let mut seen = 0;
    let head = loop {
        let (_, job) = h.next_of(PUSH_KIND).await;
        // An attempt of the failing push not handled yet (a later job's
        // outcome, or one read twice, is not).
        if job.state != JobState::Pending || job.attempts <= seen {
            continue;
        }
        seen = job.attempts;
        let failed_at = job.last_error.as_ref().unwrap().at;
        let bound = failed_at + h.policy.base_delay(job.attempts).as_millis() as u64;
        assert!(
            (failed_at..=bound).contains(&job.next_attempt_at),
            "attempt {} is due at {}, outside the schedule's step [{failed_at}, {bound}]",
            job.attempts,
            job.next_attempt_at,
        );
        if bound >= start + outage {
            break job.id;
        }
        // Stock keeps changing: a sale of each product per step.
        step += 1;
        let amounts: Vec<(&str, i64)> = PRODUCTS
            .iter()
            .zip([9, 20, 30])
            .map(|(p, base)| (*p, base - step))
            .collect();
        h.change(&amounts, 2 + step).await;
        assert!(matches!(h.next_of(REFRESH_KIND).await.0, Settled::Done(_)));
        h.set_clock(bound.max(h.now()));
    };
    let expected_failures = seen;
    assert_eq!(
        expected_failures,
        failures_within(&h.policy, outage),
        "failures until the downstream is back"
    );
    // The default schedule: 0, 5, 30, 120, 600, 1800, 3600 s, then every
    // 7200 s: nine failures in five hours.
    assert_eq!(expected_failures, 9);
    let log = h.downstream.log.borrow().clone();
    assert_eq!(
        log.refused as u32, expected_failures,
        "each attempt reached the downstream"
    );
    if mode == "delta" {
        // The same batch under the same webhook-id every time.
        assert!(
            log.refused_ids.windows(2).all(|w| w[0] == w[1]),
            "{:?}",
            log.refused_ids
        );
    }

    h.downstream.answer(200);
    let back = h.now() + h.policy.base_delay(expected_failures).as_millis() as u64;
    h.set_clock(back);
    assert!(back - start >= outage, "the outage lasted the hours");
    loop {
        let (settled, job) = h.next_of(PUSH_KIND).await;
        if job.id == head {
            assert_eq!(settled, Settled::Done(head));
            break;
        }
    }
    let newest = h.simulator_stock();
    let log = if mode == "delta" {
        let changes: std::collections::BTreeMap<_, _> = newest
            .iter()
            .map(|(key, amount)| (key.clone(), amount - initial[key]))
            .collect();
        let log = h.until(|log| log.applied == changes).await;
        assert_eq!(log.duplicates, 0);
        log
    } else {
        h.until(|log| log.latest() == newest).await
    };
    for (product, values) in &log.values {
        let times: Vec<_> = values.iter().map(|v| v.updated_at.clone()).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "{product:?} got an older value after a newer one: {values:?}"
        );
    }
    assert_eq!(log.bad_signatures, 0);
    let status = h.engine.status().unwrap();
    assert_eq!(status.total(JobState::Parked), 0, "nothing parked by age");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_values_survive_hours_of_downstream_outage_on_the_retry_schedule() {
    outage("absolute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_batches_survive_hours_of_downstream_outage_each_change_applied_once() {
    outage("delta").await;
}

/// In delta mode, a refresh that reads Smaregi while a registration of
/// ours is being sent (Smaregi may already count the sale; the relay has
/// not recorded it, so no echo says so) leaves that product waiting and
/// sends the rest. Once the registration is recorded with its echo, the
/// sale is never sent as a change; a sale at the register afterwards is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_delta_mode_a_refresh_waits_for_our_registration_being_sent() {
    use smaregi_relay::smaregi::ledger::{Echo, Ledger};
    let key = |product: &str| ("1".to_owned(), product.to_owned());
    let mut h = Harness::start("delta").await;
    h.change(&[("501", 10), ("502", 20)], 1).await;
    assert!(matches!(h.next_of(REFRESH_KIND).await.0, Settled::Done(_)));

    // Our registration of two of 501 is under way and Smaregi already
    // counts it; meanwhile one of 502 sells at the register.
    let ledger = Ledger::open(&h.store).unwrap();
    let ours = Echo {
        store_id: "1".into(),
        moves: vec![("501".into(), -2)],
    };
    ledger
        .record_send_started(common::smaregi::TERMINAL, "77", &ours, h.now())
        .await
        .unwrap();
    h.change(&[("501", 8), ("502", 19)], 2).await;
    let (settled, waiting) = h.next_of(REFRESH_KIND).await;
    assert_eq!(settled, Settled::Rescheduled(waiting.id), "{waiting:?}");
    let reason = &waiting.last_error.as_ref().unwrap().message;
    assert!(reason.contains("1 products wait"), "{reason}");
    let log = h
        .until(|log| log.applied.get(&key("502")) == Some(&-1))
        .await;
    assert_eq!(log.applied.get(&key("501")), None, "our sale was not sent");

    // Recorded: the waiting refresh takes 501 with the echo; nothing to send.
    ledger
        .record_registered(common::smaregi::TERMINAL, "77", 1234, &ours)
        .await
        .unwrap();
    h.set_clock(h.now() + 60_000);
    loop {
        let (settled, job) = h.next_of(REFRESH_KIND).await;
        if job.id == waiting.id {
            assert_eq!(settled, Settled::Done(waiting.id));
            break;
        }
    }
    // A sale at the register is sent, alone.
    h.change(&[("501", 7)], 3).await;
    let log = h.until(|log| log.applied.contains_key(&key("501"))).await;
    assert_eq!(log.applied[&key("501")], -1, "{log:#?}");
    assert_eq!(log.applied[&key("502")], -1);
    assert_eq!(log.duplicates, 0);
    h.stop().await;
}
