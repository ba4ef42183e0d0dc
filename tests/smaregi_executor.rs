//! The register and cancel executors in the real engine, against the
//! simulator: what each kind of failure does to a job.

use smaregi_relay::config::Config;
use smaregi_relay::outbox::engine::{Engine, EngineBuilder, Settled};
use smaregi_relay::outbox::job::{ErrorClass, JobState, NewJob};
use smaregi_relay::outbox::queue::{OperatorPause, Queue};
use smaregi_relay::smaregi::client::SmaregiClient;
use smaregi_relay::smaregi::executor::TransactionExecutor;
use smaregi_relay::smaregi::jobs::{SaleJobs, REGISTER_KIND, UPSTREAM};
use smaregi_relay::smaregi::ledger::{Echo, Ledger};
use smaregi_relay::smaregi::sale::{Sale, SaleLine};
use smaregi_relay::store::Store;
use smaregi_sim::{Faults, Simulator};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

mod common;
use common::smaregi::{relay_config, simulator, TERMINAL};

fn sale() -> Sale {
    Sale {
        store_id: "1".into(),
        terminal_id: TERMINAL.into(),
        terminal_tran_id: String::new(),
        terminal_tran_date_time: String::new(),
        lines: vec![SaleLine {
            product_id: Some("113".into()),
            product_code: None,
            product_name: None,
            sales_price: 1200,
            quantity: 1,
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
    }
}

struct Harness {
    _temp: tempfile::TempDir,
    sim: Simulator,
    store: Store,
    config: Config,
    jobs: SaleJobs,
    engine: Option<(Engine, broadcast::Receiver<Settled>, CancellationToken)>,
}

impl Harness {
    async fn new(sim: Simulator) -> Self {
        Self::with_settings(sim, "").await
    }

    async fn with_settings(sim: Simulator, smaregi_settings: &str) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let settings = format!("request-timeout-seconds = 10\n{smaregi_settings}");
        let mut config = relay_config(temp.path(), &sim.url(), &settings);
        config.outbox.retry_schedule_seconds = vec![0];
        config.outbox.retry_repeat_seconds = 0;
        let store = Store::open(&common::store_options(&temp.path().join("db"))).unwrap();
        Self {
            jobs: SaleJobs::open(&store).unwrap(),
            _temp: temp,
            sim,
            store,
            config,
            engine: None,
        }
    }

    fn start(&mut self) -> Engine {
        let client = SmaregiClient::new(self.config.smaregi.as_ref().unwrap()).unwrap();
        let executor = TransactionExecutor::new(
            client,
            Ledger::open(&self.store).unwrap(),
            self.config.smaregi.as_ref().unwrap().cancel_strategy,
        );
        let engine = executor
            .register_with(EngineBuilder::new(&self.store, &self.config.outbox).unwrap())
            .build()
            .unwrap();
        let settled = engine.settled();
        let shutdown = CancellationToken::new();
        tokio::spawn(engine.clone().run(shutdown.clone()));
        self.engine = Some((engine.clone(), settled, shutdown));
        engine
    }

    /// The next outcome of `job` other than a reschedule.
    async fn outcome(&mut self, job: u64) -> Settled {
        let (_, settled, _) = self.engine.as_mut().unwrap();
        tokio::time::timeout(common::EVENT_DEADLINE, async {
            loop {
                match settled.recv().await.unwrap() {
                    s if s.job() == job && !matches!(s, Settled::Rescheduled(_)) => return s,
                    _ => {}
                }
            }
        })
        .await
        .expect("the job settles")
    }

    async fn stop(self) {
        if let Some((_, _, shutdown)) = &self.engine {
            shutdown.cancel();
        }
        self.store.close().await.unwrap();
        self.sim.stop().await;
    }
}

#[tokio::test]
async fn a_send_whose_answer_was_lost_is_found_not_sent_again() {
    let mut h = Harness::new(simulator().await).await;
    let (job, sale) = h.jobs.register("order:1", &sale()).await.unwrap();
    // A previous run sent it and died before recording the answer.
    let ledger = Ledger::open(&h.store).unwrap();
    ledger
        .record_send_started(TERMINAL, &sale.terminal_tran_id, &no_stock_moved(), 0)
        .await
        .unwrap();
    let client = SmaregiClient::new(h.config.smaregi.as_ref().unwrap()).unwrap();
    let id = client.register(&sale).await.unwrap();

    let engine = h.start();
    assert_eq!(h.outcome(job).await, Settled::Done(job));
    assert_eq!(
        h.sim.stats().writes,
        1,
        "found by its look-up, not sent again"
    );
    assert_eq!(
        ledger.registered(TERMINAL, &sale.terminal_tran_id).unwrap(),
        Some(id)
    );
    assert_eq!(
        engine.queue().job(job).unwrap().unwrap().state,
        JobState::Done
    );
    h.stop().await;
}

#[tokio::test]
async fn a_send_made_again_after_its_look_up_is_in_flight_from_then() {
    let mut h = Harness::new(simulator().await).await;
    let (job, sale) = h.jobs.register("order:1", &sale()).await.unwrap();
    // Sent long ago (at time 0), the answer lost, and Smaregi has nothing.
    let ledger = Ledger::open(&h.store).unwrap();
    let moved = Echo {
        store_id: "1".into(),
        moves: vec![("113".into(), -1)],
    };
    ledger
        .record_send_started(TERMINAL, &sale.terminal_tran_id, &moved, 0)
        .await
        .unwrap();
    // The look-up works; the send again is refused (and pauses Smaregi).
    h.sim.set_faults(Faults {
        disabled: vec!["transaction_upd".into()],
        ..Faults::default()
    });
    let before = smaregi_relay::outbox::retry::unix_millis(std::time::SystemTime::now());
    h.start();
    assert_eq!(h.outcome(job).await, Settled::UpstreamPaused(job));
    let sends = smaregi_relay::smaregi::ledger::in_flight(ledger.tree()).unwrap();
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert!(
        sends[0].since >= before,
        "in flight since the send made again, not since the first: {sends:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn malformed_answers_are_ambiguous_and_kept_on_the_job_as_a_snippet() {
    let mut h = Harness::new(simulator().await).await;
    h.sim.set_faults(Faults {
        malformed_rate: 1.0,
        ..Faults::default()
    });
    let (job, _) = h.jobs.register("order:1", &sale()).await.unwrap();
    let engine = h.start();
    // Wait for a rescheduled attempt, then heal Smaregi.
    let (_, settled, _) = h.engine.as_mut().unwrap();
    tokio::time::timeout(common::EVENT_DEADLINE, async {
        while settled.recv().await.unwrap() != Settled::Rescheduled(job) {}
    })
    .await
    .expect("an attempt fails");
    h.sim.set_faults(Faults::default());
    assert_eq!(h.outcome(job).await, Settled::Done(job));
    let record = engine.queue().job(job).unwrap().unwrap();
    let first = &record.history[0];
    assert_eq!(first.class, ErrorClass::Ambiguous, "{first:?}");
    assert!(
        first.message.contains("unexpected answer from Smaregi"),
        "{}",
        first.message
    );
    assert!(!first.message.contains(common::smaregi::ACCESS_TOKEN));
    assert_eq!(
        h.sim.contract().transactions.len(),
        1,
        "at most one, whatever the answers were"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_validation_error_parks_the_job_with_smaregis_message() {
    let mut h = Harness::new(simulator().await).await;
    let mut bad = sale();
    bad.lines[0].product_code = Some("a code far longer than twenty".into());
    let (job, _) = h.jobs.register("order:1", &bad).await.unwrap();
    let (next, _) = h.jobs.register("order:2", &sale()).await.unwrap();
    let engine = h.start();
    assert_eq!(
        h.outcome(job).await,
        Settled::Parked(job, ErrorClass::Permanent)
    );
    assert_eq!(
        h.outcome(next).await,
        Settled::Done(next),
        "other keys go on"
    );
    let error = engine
        .queue()
        .job(job)
        .unwrap()
        .unwrap()
        .last_error
        .unwrap();
    assert!(
        error.message.contains("Smaregi error 41") && error.message.contains("productCode"),
        "{}",
        error.message
    );
    h.stop().await;
}

#[tokio::test]
async fn a_credentials_error_pauses_smaregi_without_charging_the_job() {
    let sim = Simulator::start(smaregi_sim::SimConfig::local(
        common::smaregi::CONTRACT_ID,
        "rotated-token",
    ))
    .await
    .unwrap();
    let mut h = Harness::new(sim).await;
    let (job, _) = h.jobs.register("order:1", &sale()).await.unwrap();
    let engine = h.start();
    assert_eq!(h.outcome(job).await, Settled::UpstreamPaused(job));
    let paused = engine.paused();
    assert!(
        paused[UPSTREAM].reason.contains("Smaregi error 13"),
        "{paused:?}"
    );
    let record = engine.queue().job(job).unwrap().unwrap();
    assert_eq!((record.state, record.attempts), (JobState::Pending, 0));
    h.stop().await;
}

#[tokio::test]
async fn a_cancel_whose_registration_was_discarded_cancels_only_what_smaregi_has() {
    let mut h = Harness::new(simulator().await).await;
    // Order 1's registration is discarded before it was ever sent.
    let (never_sent, first) = h.jobs.register("order:1", &sale()).await.unwrap();
    let (first_cancel, _) = h.jobs.cancel("order:1", &first).await.unwrap();
    // Order 2's reached Smaregi, but its outcome was never recorded (the
    // answer was lost), and then it was discarded.
    let (lost, second) = h.jobs.register("order:2", &sale()).await.unwrap();
    let (second_cancel, _) = h.jobs.cancel("order:2", &second).await.unwrap();
    let ledger = Ledger::open(&h.store).unwrap();
    ledger
        .record_send_started(TERMINAL, &second.terminal_tran_id, &no_stock_moved(), 0)
        .await
        .unwrap();
    let client = SmaregiClient::new(h.config.smaregi.as_ref().unwrap()).unwrap();
    let registered = client.register(&second).await.unwrap();
    // Paused from the start (an operator's pause is stored), so nothing
    // runs before the discards.
    let pause = OperatorPause {
        reason: "hold while the registrations are discarded".into(),
        at: 0,
    };
    Queue::open(&h.store)
        .unwrap()
        .set_operator_pause(UPSTREAM, Some(&pause))
        .unwrap();
    let engine = h.start();
    for job in [never_sent, lost] {
        engine.discard(job, "test: discarded").await.unwrap();
    }
    engine.resume(UPSTREAM).await.unwrap();
    assert_eq!(h.outcome(first_cancel).await, Settled::Done(first_cancel));
    assert_eq!(h.outcome(second_cancel).await, Settled::Done(second_cancel));

    // Nothing of order 1 in Smaregi; order 2 registered and reversed once.
    let contract = h.sim.contract();
    assert_eq!(
        contract.transactions.len(),
        2,
        "{:?}",
        contract.transactions
    );
    let reversal = contract
        .transactions
        .values()
        .find(|t| t.field("disposeDivision") == Some("2"))
        .expect("a reversal");
    assert_eq!(
        reversal.field("disposeServerTransactionHeadId"),
        Some(registered.to_string().as_str())
    );
    h.stop().await;
}

#[tokio::test]
async fn a_payload_of_an_unknown_version_parks() {
    let mut h = Harness::new(simulator().await).await;
    let engine = h.start();
    let future = NewJob {
        kind: REGISTER_KIND.into(),
        upstream: UPSTREAM.into(),
        key: "order:2".into(),
        payload: serde_json::json!({"v": 2, "sale": {}}),
    };
    let undecodable = engine.enqueue(&future).await.unwrap();
    assert_eq!(
        h.outcome(undecodable).await,
        Settled::Parked(undecodable, ErrorClass::Undecodable)
    );
    assert!(h.sim.contract().transactions.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn both_cancel_strategies_undo_the_sale_once() {
    for strategy in ["dispose", "cancel-flag"] {
        let sim = simulator().await;
        sim.with_contract(|c| c.set_stock("1", "113", 5, 0));
        let mut h = Harness::with_settings(sim, &format!("cancel-strategy = \"{strategy}\"")).await;
        let (register, sale) = h.jobs.register("order:1", &sale()).await.unwrap();
        let (cancel, _) = h.jobs.cancel("order:1", &sale).await.unwrap();
        h.start();
        assert_eq!(h.outcome(register).await, Settled::Done(register));
        assert_eq!(h.outcome(cancel).await, Settled::Done(cancel));
        let contract = h.sim.contract();
        assert_eq!(
            contract.stock["1"]["113"].amount, 5,
            "{strategy}: the stock is back"
        );
        let original = contract.transactions.values().next().unwrap();
        match strategy {
            "dispose" => {
                assert_eq!(contract.transactions.len(), 2);
                assert_eq!(original.field("cancelDivision"), Some("0"));
            }
            _ => {
                assert_eq!(contract.transactions.len(), 1);
                assert_eq!(original.field("cancelDivision"), Some("1"));
            }
        }
        h.stop().await;
    }
}

/// What a send moves, for tests that do not look at stock.
fn no_stock_moved() -> Echo {
    Echo {
        store_id: "1".into(),
        moves: Vec::new(),
    }
}
