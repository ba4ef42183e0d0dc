//! A property test of the order ledger with the real outbox, real sled and
//! the simulator: random sequences of order changes, Smaregi faults and
//! restarts → what Smaregi ends up holding equals a simple model's
//! expectation, and every answer is the one the model predicts.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use smaregi_relay::config::{self, Config};
use smaregi_relay::mapping::IdentityCatalog;
use smaregi_relay::orders::book::{Cancel, OrderBookError, Put};
use smaregi_relay::orders::build::BuildSettings;
use smaregi_relay::orders::model::validate_order;
use smaregi_relay::orders::OrderBook;
use smaregi_relay::outbox::engine::{Engine, EngineBuilder};
use smaregi_relay::outbox::job::JobState;
use smaregi_relay::smaregi::client::SmaregiClient;
use smaregi_relay::smaregi::executor::TransactionExecutor;
use smaregi_relay::smaregi::ledger::Ledger;
use smaregi_relay::store::{Store, StoreOptions};
use smaregi_sim::{Faults, Simulator};
use tokio_util::sync::CancellationToken;

use common::orders::{expected_total, order, order_config, standing_sales};
use common::smaregi::{simulator, TERMINAL};

#[derive(Debug, Clone)]
enum Op {
    /// A revision `delta` away from the order's current one (or 1 for a
    /// new order), with content `variant`.
    Put {
        order: u8,
        delta: i8,
        variant: u8,
    },
    Cancel {
        order: u8,
    },
    Faults(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, prop::sample::select(vec![-1i8, 0, 1, 1, 1, 2]), 0u8..3)
            .prop_map(|(order, delta, variant)| Op::Put { order, delta, variant }),
        2 => (0u8..4).prop_map(|order| Op::Cancel { order }),
        2 => (0u8..5).prop_map(Op::Faults),
        1 => Just(Op::Restart),
    ]
}

fn faults(kind: u8) -> Faults {
    let mut faults = Faults::default();
    match kind {
        1 => faults.error_rate = 0.3,
        2 => faults.reset_rate = 0.3,
        3 => faults.commit_then_fail_rate = 0.3,
        4 => faults.malformed_rate = 0.2,
        _ => {}
    }
    faults
}

fn lines(variant: u8) -> Vec<(String, i64, i64)> {
    vec![(
        format!("10{variant}"),
        100 * (i64::from(variant) + 1),
        i64::from(variant) + 1,
    )]
}

/// The model: per order, its revision, content and whether it was cancelled.
#[derive(Debug, Clone, Copy)]
struct Modelled {
    revision: u64,
    variant: u8,
    cancelled: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Accepted,
    Unchanged,
    Refused,
}

/// The relay's side: store, engine and order book, restartable.
struct Relay {
    config: Config,
    store: Store,
    engine: Engine,
    book: OrderBook,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn start(config: &Config) -> Self {
        let store = Store::open(&StoreOptions::from_config(&config.storage)).unwrap();
        let smaregi = config.smaregi.as_ref().unwrap();
        let executor = TransactionExecutor::new(
            SmaregiClient::new(smaregi).unwrap(),
            Ledger::open(&store).unwrap(),
            smaregi.cancel_strategy,
        );
        let engine = executor
            .register_with(EngineBuilder::new(&store, &config.outbox).unwrap())
            .build()
            .unwrap();
        let book = OrderBook::open(
            &engine,
            BuildSettings::from_config(&config.orders, TERMINAL),
            Arc::new(IdentityCatalog),
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let engine = engine.clone();
            let shutdown = shutdown.clone();
            async move { engine.run(shutdown).await.unwrap() }
        });
        Self {
            config: config.clone(),
            store,
            engine,
            book,
            shutdown,
            running,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap();
        self.store.close().await.unwrap();
    }

    async fn restart(self) -> Self {
        let config = self.config.clone();
        self.stop().await;
        Self::start(&config)
    }

    /// Waits until no job is pending; fails on a parked one.
    async fn settle(&self) {
        let mut settled = self.engine.settled();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.engine.status().unwrap();
            assert_eq!(
                status.total(JobState::Parked),
                0,
                "a job parked: {status:?}"
            );
            if status.total(JobState::Pending) == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not settled: {status:?}"
            );
            // Re-checked after each outcome, and now and then regardless:
            // an outcome may land between the check and the wait.
            let _ = tokio::time::timeout(Duration::from_millis(200), settled.recv()).await;
        }
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let sim: Simulator = simulator().await;
    let temp = tempfile::tempdir().unwrap();
    let path = order_config(temp.path(), &sim.url(), "");
    let mut config = config::load(&path).unwrap().config;
    config.outbox.retry_schedule_seconds = vec![0];
    config.outbox.retry_repeat_seconds = 0;
    let mut relay = Relay::start(&config);
    let mut model: BTreeMap<u8, Modelled> = BTreeMap::new();

    for op in ops {
        match op {
            Op::Put {
                order: n,
                delta,
                variant,
            } => {
                let current = model.get(&n).copied();
                let revision = match current {
                    None => 1,
                    Some(m) => (m.revision as i64 + i64::from(delta)).max(1) as u64,
                };
                let expect = match current {
                    None => Expect::Accepted,
                    Some(m) if m.cancelled => Expect::Refused,
                    Some(m) if revision < m.revision => Expect::Refused,
                    Some(m) if revision == m.revision && variant == m.variant => Expect::Unchanged,
                    Some(m) if revision == m.revision => Expect::Refused,
                    Some(_) => Expect::Accepted,
                };
                let id = format!("P-{n}");
                let owned = lines(variant);
                let borrowed: Vec<(&str, i64, i64)> =
                    owned.iter().map(|(p, a, q)| (p.as_str(), *a, *q)).collect();
                let json = order(&id, revision, &borrowed);
                let parsed = validate_order(&id, &json).unwrap();
                let got = match relay.book.put(parsed).await {
                    Ok(Put::Accepted { .. }) => Expect::Accepted,
                    Ok(Put::Unchanged) => Expect::Unchanged,
                    Err(
                        OrderBookError::Cancelled
                        | OrderBookError::Stale { .. }
                        | OrderBookError::RevisionConflict(_),
                    ) => Expect::Refused,
                    Err(other) => panic!("put {id} r{revision}: {other}"),
                };
                prop_assert_eq!(&got, &expect, "put {} r{}", id, revision);
                if got == Expect::Accepted {
                    model.insert(
                        n,
                        Modelled {
                            revision,
                            variant,
                            cancelled: false,
                        },
                    );
                }
            }
            Op::Cancel { order: n } => {
                let id = format!("P-{n}");
                let got = relay.book.cancel(&id).await;
                match (model.get_mut(&n), got) {
                    (None, Err(OrderBookError::NotFound)) => {}
                    (Some(m), Ok(Cancel::AlreadyCancelled)) if m.cancelled => {}
                    (Some(m), Ok(Cancel::Accepted { .. })) if !m.cancelled => m.cancelled = true,
                    (m, got) => panic!("cancel {id} of {m:?}: {got:?}"),
                }
            }
            Op::Faults(kind) => sim.set_faults(faults(kind)),
            Op::Restart => relay = relay.restart().await,
        }
    }
    sim.set_faults(Faults::default());
    relay.settle().await;

    let expected: BTreeMap<String, Vec<(u64, i64)>> = model
        .iter()
        .filter(|(_, m)| !m.cancelled)
        .map(|(n, m)| {
            let owned = lines(m.variant);
            let borrowed: Vec<(&str, i64, i64)> =
                owned.iter().map(|(p, a, q)| (p.as_str(), *a, *q)).collect();
            (
                format!("P-{n}"),
                vec![(m.revision, expected_total(&borrowed))],
            )
        })
        .collect();
    let standing = standing_sales(&sim).map_err(TestCaseError::fail)?;
    relay.stop().await;
    sim.stop().await;
    prop_assert_eq!(standing, expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        max_shrink_iters: 20,
        ..ProptestConfig::default()
    })]

    #[test]
    fn smaregi_ends_up_holding_what_the_model_expects(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(ops))?;
    }
}
