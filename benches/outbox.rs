//! The outbox's throughput, its cost per job as the backlog grows, and its
//! start-up time with a large backlog.
//!
//! `cargo bench --locked --bench outbox`. Set `OUTBOX_BENCH_BACKLOG` to
//! change the large backlog (default 1,000,000 pending jobs), and
//! `OUTBOX_BENCH_CACHE_MIB` to change sled's cache (default the daemon's,
//! 32 MiB).
//!
//! - `engine/jobs`: jobs through the whole engine (enqueue with its durable
//!   commit, claim, a no-op executor, complete with its durable commit),
//!   with 64 concurrent enqueuers so that commits group.
//! - `cycle/BACKLOG`: one enqueue → claim (the earliest due job) →
//!   complete → status (counts and oldest pending job), on a queue that
//!   holds BACKLOG pending jobs, without the commit (whose `fdatasync`
//!   does not depend on the backlog and would hide what does). After
//!   criterion's report, interleaved rounds give the ratio the queue is held
//!   to: ≤ 1.5× from 10,000 to 1,000,000 pending jobs.
//! - start-up: opening the store and the engine with the large backlog and
//!   reading the first due job, median of five opens (page cache warm).

mod daemon_allocator;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use sled::transaction::TransactionError;
use smaregi_relay::config::{OutboxConfig, StorageConfig};
use smaregi_relay::outbox::engine::{AttemptOutcome, BoxFuture, EngineBuilder, Executor, Settled};
use smaregi_relay::outbox::job::{Job, JobState, NewJob};
use smaregi_relay::outbox::queue::Queue;
use smaregi_relay::store::{Store, StoreOptions};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

const SMALL_BACKLOG: u64 = 10_000;
const DEFAULT_LARGE_BACKLOG: u64 = 1_000_000;
/// Jobs per key in a backlog: a backlog is many keys, a few jobs each.
const JOBS_PER_KEY: u64 = 4;
const ENQUEUERS: u64 = 64;
const UPSTREAM: &str = "bench";
const KIND: &str = "bench.noop";

fn criterion_directory() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target/tmp has a parent")
        .join("criterion")
}

fn options(directory: &Path) -> StoreOptions {
    let mut options = StoreOptions {
        directory: directory.to_owned(),
        ..StoreOptions::from_config(&StorageConfig::default())
    };
    if let Ok(mib) = std::env::var("OUTBOX_BENCH_CACHE_MIB") {
        let mib: u64 = mib.parse().expect("OUTBOX_BENCH_CACHE_MIB is a number");
        options.cache_capacity_bytes = mib << 20;
    }
    options
}

fn new_job(key: String) -> NewJob {
    NewJob {
        kind: KIND.into(),
        upstream: UPSTREAM.into(),
        key,
        payload: serde_json::json!({"v": 1, "order": "A-0001", "amount": 1200}),
    }
}

struct Noop;

impl Executor for Noop {
    fn execute<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async { AttemptOutcome::Success })
    }
}

/// Fills a new store with `backlog` pending jobs, 1,000 per transaction.
fn fill(directory: &Path, backlog: u64, runtime: &tokio::runtime::Runtime) -> (Store, Queue) {
    let store = Store::open(&options(directory)).unwrap();
    let queue = Queue::open(&store).unwrap();
    let started = Instant::now();
    let mut next = 0;
    while next < backlog {
        let end = (next + 1000).min(backlog);
        let ids: Vec<u64> = (next..end).map(|_| store.generate_id().unwrap()).collect();
        let result: Result<(), TransactionError<_>> = queue.tree().transaction(|outbox| {
            for (offset, &id) in ids.iter().enumerate() {
                let n = next + offset as u64;
                let job = new_job(format!("backlog:{}", n / JOBS_PER_KEY));
                Queue::stage(outbox, id, &job, 0)?;
            }
            Ok(())
        });
        result.unwrap();
        next = end;
    }
    runtime.block_on(store.commit()).unwrap();
    eprintln!(
        "outbox bench: {backlog} pending jobs enqueued in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    (store, queue)
}

/// One enqueue → claim → complete → status cycle; keeps the backlog's size.
fn cycle(queue: &Queue, n: u64) {
    queue.enqueue(&new_job(format!("new:{n}")), 1).unwrap();
    let due = queue.due(UPSTREAM, 1, 1, |_| false).unwrap();
    queue.complete(due[0], 2).unwrap();
    let counts = queue.counts().unwrap();
    assert!(counts[&(JobState::Pending, KIND.to_owned())] > 0);
    queue.oldest_pending().unwrap().unwrap();
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let large_backlog = std::env::var("OUTBOX_BENCH_BACKLOG")
        .map(|n| n.parse().expect("OUTBOX_BENCH_BACKLOG is a number"))
        .unwrap_or(DEFAULT_LARGE_BACKLOG);
    let workspace = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut criterion = Criterion::default()
        .output_directory(&criterion_directory())
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = criterion.benchmark_group("outbox");

    // The whole engine, durable commits included.
    {
        let store = Store::open(&options(&workspace.path().join("engine"))).unwrap();
        let config = OutboxConfig {
            workers: 16,
            ..OutboxConfig::default()
        };
        let engine = EngineBuilder::new(&store, &config)
            .unwrap()
            .executor(KIND, UPSTREAM, Arc::new(Noop))
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = runtime.spawn(engine.clone().run(shutdown.clone()));
        group.throughput(Throughput::Elements(1));
        group.bench_function("engine/jobs", |b| {
            b.iter_custom(|jobs| {
                runtime.block_on(async {
                    let mut settled = engine.settled();
                    let started = Instant::now();
                    let enqueuers: Vec<_> = (0..ENQUEUERS)
                        .map(|task| {
                            let engine = engine.clone();
                            tokio::spawn(async move {
                                for n in (task..jobs).step_by(ENQUEUERS as usize) {
                                    engine
                                        .enqueue(&new_job(format!("k:{}", n % 256)))
                                        .await
                                        .unwrap();
                                }
                            })
                        })
                        .collect();
                    // Every outcome here is a success; a lagging receiver
                    // still counts the ones it missed.
                    let mut done = 0;
                    while done < jobs {
                        match settled.recv().await {
                            Ok(Settled::Done(_)) => done += 1,
                            Ok(other) => panic!("unexpected {other:?}"),
                            Err(RecvError::Lagged(missed)) => done += missed,
                            Err(RecvError::Closed) => panic!("the engine stopped"),
                        }
                    }
                    for enqueuer in enqueuers {
                        enqueuer.await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
        shutdown.cancel();
        runtime.block_on(running).unwrap().unwrap();
        runtime.block_on(store.close()).unwrap();
    }

    // Cost per job against the size of the backlog.
    let (small_store, small) = fill(&workspace.path().join("small"), SMALL_BACKLOG, &runtime);
    let large_directory = workspace.path().join("large");
    let (large_store, large) = fill(&large_directory, large_backlog, &runtime);
    let mut n = 0;
    for (backlog, queue) in [(SMALL_BACKLOG, &small), (large_backlog, &large)] {
        group.bench_with_input(BenchmarkId::new("cycle", backlog), queue, |b, queue| {
            b.iter(|| {
                n += 1;
                cycle(queue, n);
            })
        });
    }
    group.finish();

    // Interleaved rounds, so that drift in the machine hits both alike.
    const ROUNDS: usize = 15;
    const CYCLES: u32 = 2_000;
    let (mut at_small, mut at_large) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (queue, times) in [(&small, &mut at_small), (&large, &mut at_large)] {
            let started = Instant::now();
            for _ in 0..CYCLES {
                n += 1;
                cycle(queue, n);
            }
            times.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(CYCLES));
        }
    }
    let (at_small, at_large) = (median(at_small), median(at_large));
    println!(
        "outbox: cycle at {SMALL_BACKLOG} pending {at_small:.1} µs, at {large_backlog} pending \
         {at_large:.1} µs: {:.2}× (target ≤ 1.5×)",
        at_large / at_small
    );
    drop((small, large));
    runtime.block_on(small_store.close()).unwrap();
    runtime.block_on(large_store.close()).unwrap();
    drop((small_store, large_store));

    // Start-up with the large backlog: until the first job could run.
    let (mut opens, mut size) = (Vec::new(), 0);
    for _ in 0..5 {
        let started = Instant::now();
        let store = Store::open(&options(&large_directory)).unwrap();
        let engine = EngineBuilder::new(&store, &OutboxConfig::default())
            .unwrap()
            .executor(KIND, UPSTREAM, Arc::new(Noop))
            .build()
            .unwrap();
        let first = engine
            .queue()
            .due(UPSTREAM, u64::MAX, 1, |_| false)
            .unwrap();
        let status = engine.status().unwrap();
        opens.push(started.elapsed().as_secs_f64());
        size = store.size_on_disk().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(status.total(JobState::Pending), large_backlog);
        drop(engine);
        runtime.block_on(store.close()).unwrap();
    }
    println!(
        "outbox: start-up with {large_backlog} pending jobs ({} MiB on disk) {:.2} s, median of {} (target ≤ 3 s)",
        size / (1024 * 1024),
        median(opens.clone()),
        opens.len()
    );
    criterion.final_summary();
}
