//! The outbox engine on a real store, with test executors: every outcome
//! class, per-key order under concurrency, Retry-After, parking by age on a
//! controllable clock, and pausing an upstream on a configuration failure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smaregi_relay::config::{OutboxConfig, RateLimit};
use smaregi_relay::outbox::engine::{
    AttemptOutcome, BoxFuture, Clock, Engine, EngineBuilder, Executor, Settled,
    PAUSE_PROBE_INTERVAL,
};
use smaregi_relay::outbox::job::{ErrorClass, Job, JobState, NewJob};
use smaregi_relay::store::Store;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

mod common;

const DEADLINE: Duration = Duration::from_secs(30);
const UPSTREAM: &str = "sink";

/// A clock the test sets.
struct TestClock(AtomicU64);

impl Clock for TestClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// An executor that answers from a function of the job and its attempt count.
struct Scripted<F>(F);

impl<F> Executor for Scripted<F>
where
    F: Fn(&Job) -> AttemptOutcome + Send + Sync + 'static,
{
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move { (self.0)(job) })
    }
}

fn scripted(f: impl Fn(&Job) -> AttemptOutcome + Send + Sync + 'static) -> Arc<dyn Executor> {
    Arc::new(Scripted(f))
}

struct Harness {
    temp: tempfile::TempDir,
    config: OutboxConfig,
    engine: Engine,
    settled: broadcast::Receiver<Settled>,
    /// Events received while waiting for another job's.
    backlog: Vec<Settled>,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(builder: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        let config = OutboxConfig {
            workers: 8,
            ..OutboxConfig::default()
        };
        Self::start_with(config, builder)
    }

    fn start_with(
        config: OutboxConfig,
        builder: impl FnOnce(EngineBuilder) -> EngineBuilder,
    ) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), config, builder)
    }

    /// Stops the engine, closes its store, and starts both again.
    async fn restart(self, builder: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        let store = self.engine.store().clone();
        let (temp, config) = (self.temp, self.config);
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.running)
            .await
            .unwrap()
            .unwrap();
        store.close().await.unwrap();
        drop((store, self.engine));
        Self::start_in(temp, config, builder)
    }

    fn start_in(
        temp: tempfile::TempDir,
        config: OutboxConfig,
        builder: impl FnOnce(EngineBuilder) -> EngineBuilder,
    ) -> Self {
        let store = Store::open(&common::store_options(temp.path())).unwrap();
        let engine = builder(EngineBuilder::new(&store, &config).unwrap())
            .build()
            .unwrap();
        let settled = engine.settled();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let (engine, shutdown) = (engine.clone(), shutdown.clone());
            async move { engine.run(shutdown).await.unwrap() }
        });
        Self {
            temp,
            config,
            engine,
            settled,
            backlog: Vec::new(),
            shutdown,
            running,
        }
    }

    async fn enqueue(&self, kind: &str, key: &str) -> u64 {
        self.enqueue_to(kind, UPSTREAM, key).await
    }

    async fn enqueue_to(&self, kind: &str, upstream: &str, key: &str) -> u64 {
        let job = NewJob {
            kind: kind.into(),
            upstream: upstream.into(),
            key: key.into(),
            payload: serde_json::json!({"v": 1}),
        };
        self.engine.enqueue(&job).await.unwrap()
    }

    /// The next settled outcome for `job`; other jobs' outcomes are kept.
    async fn settled_for(&mut self, job: u64) -> Settled {
        if let Some(position) = self.backlog.iter().position(|s| s.job() == job) {
            return self.backlog.remove(position);
        }
        tokio::time::timeout(DEADLINE, async {
            loop {
                let settled = self.settled.recv().await.unwrap();
                if settled.job() == job {
                    return settled;
                }
                self.backlog.push(settled);
            }
        })
        .await
        .expect("the job settles")
    }

    /// Waits until every job of `ids` is done.
    async fn all_done(&mut self, ids: &[u64]) {
        let mut waiting: std::collections::HashSet<u64> = ids.iter().copied().collect();
        tokio::time::timeout(DEADLINE, async {
            while !waiting.is_empty() {
                match self.settled.recv().await.unwrap() {
                    Settled::Done(id) => {
                        waiting.remove(&id);
                    }
                    other @ (Settled::Parked(..) | Settled::UpstreamPaused(_)) => {
                        panic!("unexpected {other:?}")
                    }
                    Settled::Rescheduled(_) => {}
                }
            }
        })
        .await
        .expect("every job is done");
    }

    fn job(&self, id: u64) -> Job {
        self.engine.queue().job(id).unwrap().unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.running)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_class_ends_where_it_should() {
    let mut harness = Harness::start(|builder| {
        builder
            .executor("t.success", UPSTREAM, scripted(|_| AttemptOutcome::Success))
            .executor(
                "t.permanent",
                UPSTREAM,
                scripted(|_| AttemptOutcome::Permanent {
                    reason: "subtotal does not match".into(),
                }),
            )
            .executor(
                "t.undecodable",
                UPSTREAM,
                scripted(|_| AttemptOutcome::Undecodable {
                    reason: "payload version 9 is unknown".into(),
                }),
            )
            .executor("t.panics", UPSTREAM, scripted(|_| panic!("executor bug")))
    });
    let success = harness.enqueue("t.success", "k:1").await;
    let permanent = harness.enqueue("t.permanent", "k:2").await;
    let undecodable = harness.enqueue("t.undecodable", "k:3").await;
    let panics = harness.enqueue("t.panics", "k:4").await;
    let unknown = harness.enqueue("t.unregistered", "k:5").await;

    assert_eq!(harness.settled_for(success).await, Settled::Done(success));
    assert_eq!(harness.job(success).state, JobState::Done);
    for (id, class) in [
        (permanent, ErrorClass::Permanent),
        (undecodable, ErrorClass::Undecodable),
        (panics, ErrorClass::Panicked),
    ] {
        assert_eq!(harness.settled_for(id).await, Settled::Parked(id, class));
        let job = harness.job(id);
        assert_eq!(job.state, JobState::Parked);
        assert_eq!(job.last_error.unwrap().class, class);
    }
    assert!(harness
        .job(permanent)
        .last_error
        .unwrap()
        .message
        .contains("subtotal"));
    // A job whose kind has no executor is parked too, with a reason that says so.
    assert_eq!(
        harness.settled_for(unknown).await,
        Settled::Parked(unknown, ErrorClass::Permanent)
    );
    assert!(harness
        .job(unknown)
        .last_error
        .unwrap()
        .message
        .contains("no executor"));

    // The engine outlived the panic: a new job still runs.
    let after = harness.enqueue("t.success", "k:6").await;
    assert_eq!(harness.settled_for(after).await, Settled::Done(after));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_one_key_run_in_order_while_keys_run_concurrently() {
    const KEYS: usize = 12;
    const JOBS_PER_KEY: usize = 8;
    let log: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let concurrent = Arc::new(AtomicUsize::new(0));
    let most_concurrent = Arc::new(AtomicUsize::new(0));
    struct Recording {
        log: Arc<Mutex<HashMap<String, Vec<u64>>>>,
        concurrent: Arc<AtomicUsize>,
        most_concurrent: Arc<AtomicUsize>,
        started: tokio::sync::watch::Sender<usize>,
    }
    impl Executor for Recording {
        fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
            Box::pin(async move {
                let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_concurrent.fetch_max(now, Ordering::SeqCst);
                self.started.send_modify(|n| *n += 1);
                // Until two attempts have overlapped once, an attempt waits
                // for another to start: an engine that ran keys one at a
                // time never gets there, and the assertion below fails.
                if self.most_concurrent.load(Ordering::SeqCst) < 2 {
                    let mut started = self.started.subscribe();
                    let seen = *started.borrow();
                    let _ = tokio::time::timeout(
                        common::EVENT_DEADLINE,
                        started.wait_for(|&n| n > seen),
                    )
                    .await;
                }
                self.log
                    .lock()
                    .unwrap()
                    .entry(job.key.clone())
                    .or_default()
                    .push(job.id);
                self.concurrent.fetch_sub(1, Ordering::SeqCst);
                AttemptOutcome::Success
            })
        }
    }
    let executor = Arc::new(Recording {
        log: Arc::clone(&log),
        concurrent: Arc::clone(&concurrent),
        most_concurrent: Arc::clone(&most_concurrent),
        started: tokio::sync::watch::channel(0).0,
    });
    let mut harness = Harness::start(|builder| builder.executor("t.record", UPSTREAM, executor));
    let mut enqueued: HashMap<String, Vec<u64>> = HashMap::new();
    for _ in 0..JOBS_PER_KEY {
        for key in 0..KEYS {
            let key = format!("order:{key}");
            let id = harness.enqueue("t.record", &key).await;
            enqueued.entry(key).or_default().push(id);
        }
    }
    let all: Vec<u64> = enqueued.values().flatten().copied().collect();
    harness.all_done(&all).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log, enqueued,
        "every key ran its jobs once each, in enqueue order"
    );
    assert!(
        most_concurrent.load(Ordering::SeqCst) > 1,
        "different keys ran concurrently"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let clock = Arc::new(TestClock(AtomicU64::new(1_000_000)));
    let mut harness = Harness::start(|builder| {
        builder.clock(clock.clone()).executor(
            "t.busy",
            UPSTREAM,
            scripted(|_| AttemptOutcome::Retry {
                reason: "429 Too Many Requests".into(),
                retry_after: Some(Duration::from_secs(3600)),
            }),
        )
    });
    let id = harness.enqueue("t.busy", "k:1").await;
    assert_eq!(harness.settled_for(id).await, Settled::Rescheduled(id));
    let job = harness.job(id);
    assert!(
        job.next_attempt_at >= 1_000_000 + 3_600_000,
        "{}",
        job.next_attempt_at
    );
    assert_eq!(job.attempts, 1);
    assert_eq!(job.last_error.unwrap().class, ErrorClass::Retryable);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_past_the_maximum_age_is_parked_not_dropped() {
    const HOUR: u64 = 3_600_000;
    let clock = Arc::new(TestClock(AtomicU64::new(HOUR)));
    let mut harness = Harness::start(|builder| {
        builder.clock(clock.clone()).executor(
            "t.down",
            UPSTREAM,
            scripted(|_| AttemptOutcome::Retry {
                reason: "connection refused".into(),
                retry_after: None,
            }),
        )
    });
    let id = harness.enqueue("t.down", "k:1").await;
    // The first retry is immediate; the second waits up to 5 s of the test clock.
    assert_eq!(harness.settled_for(id).await, Settled::Rescheduled(id));
    assert_eq!(harness.settled_for(id).await, Settled::Rescheduled(id));
    clock.0.store(HOUR + 73 * HOUR, Ordering::SeqCst);
    harness.engine.wake();
    assert_eq!(
        harness.settled_for(id).await,
        Settled::Parked(id, ErrorClass::TooOld)
    );
    let job = harness.job(id);
    assert_eq!(job.state, JobState::Parked);
    assert!(job
        .last_error
        .unwrap()
        .message
        .contains("connection refused"));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_failure_pauses_the_upstream_without_charging_the_job() {
    let clock = Arc::new(TestClock(AtomicU64::new(5_000_000)));
    let credentials_fixed = Arc::new(AtomicUsize::new(0));
    let mut harness = Harness::start(|builder| {
        let fixed = Arc::clone(&credentials_fixed);
        builder.clock(clock.clone()).executor(
            "t.auth",
            UPSTREAM,
            scripted(move |_| {
                if fixed.load(Ordering::SeqCst) == 0 {
                    AttemptOutcome::Configuration {
                        reason: "error 21: authentication failed".into(),
                    }
                } else {
                    AttemptOutcome::Success
                }
            }),
        )
    });
    let id = harness.enqueue("t.auth", "k:1").await;
    assert_eq!(harness.settled_for(id).await, Settled::UpstreamPaused(id));
    let paused = harness.engine.paused();
    assert!(
        paused[UPSTREAM].reason.contains("authentication"),
        "{paused:?}"
    );
    let job = harness.job(id);
    assert_eq!(
        (job.state, job.attempts),
        (JobState::Pending, 0),
        "not charged an attempt"
    );

    credentials_fixed.store(1, Ordering::SeqCst);
    clock
        .0
        .fetch_add(PAUSE_PROBE_INTERVAL.as_millis() as u64, Ordering::SeqCst);
    harness.engine.wake();
    assert_eq!(harness.settled_for(id).await, Settled::Done(id));
    assert!(harness.engine.paused().is_empty());
    harness.stop().await;
}

fn with_two_upstreams(builder: EngineBuilder) -> EngineBuilder {
    builder
        .executor("t.success", UPSTREAM, scripted(|_| AttemptOutcome::Success))
        .executor("t.other", "other", scripted(|_| AttemptOutcome::Success))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pause_holds_jobs_until_resumed_also_across_restarts() {
    let mut harness = Harness::start(with_two_upstreams);
    let reason = "稼働停止: stocktake in progress";
    harness.engine.pause(UPSTREAM, reason).await.unwrap();
    let held = harness.enqueue("t.success", "k:1").await;
    // The scheduler pass that delivers this job saw the held one too.
    let other = harness.enqueue_to("t.other", "other", "k:2").await;
    assert_eq!(harness.settled_for(other).await, Settled::Done(other));
    let job = harness.job(held);
    assert_eq!((job.state, job.attempts), (JobState::Pending, 0));

    let mut harness = harness.restart(with_two_upstreams).await;
    let paused = harness.engine.paused();
    assert_eq!(paused[UPSTREAM].reason, reason);
    assert_eq!(paused[UPSTREAM].until, None, "until resumed");
    assert!(!paused.contains_key("other"));
    let status = harness.engine.status().unwrap();
    assert_eq!(status.total(JobState::Pending), 1);

    harness.engine.resume(UPSTREAM).await.unwrap();
    assert_eq!(harness.settled_for(held).await, Settled::Done(held));
    let harness = harness.restart(with_two_upstreams).await;
    assert!(harness.engine.paused().is_empty(), "the resume is durable");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_retry_parked_jobs_one_or_all_and_discard_with_an_audit() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let executor = {
        let failing = Arc::clone(&failing);
        scripted(move |_| {
            if failing.load(Ordering::SeqCst) {
                AttemptOutcome::Permanent {
                    reason: "商品が存在しません (product not found)".into(),
                }
            } else {
                AttemptOutcome::Success
            }
        })
    };
    let mut harness = Harness::start(|builder| builder.executor("t.flaky", UPSTREAM, executor));
    let mut parked = Vec::new();
    for key in ["order:1", "order:2", "order:3", "order:4"] {
        let id = harness.enqueue("t.flaky", key).await;
        assert!(matches!(harness.settled_for(id).await, Settled::Parked(..)));
        parked.push(id);
    }
    let behind = harness.enqueue("t.flaky", "order:1").await;
    let status = harness.engine.status().unwrap();
    assert_eq!(status.total(JobState::Parked), 4);
    assert_eq!(status.total(JobState::Pending), 1);
    assert_eq!(status.blocked_keys.len(), 4);
    assert_eq!(status.oldest_pending.as_ref().map(|o| o.id), Some(behind));

    assert!(
        harness.engine.retry(behind).await.is_err(),
        "a job cannot jump ahead of its key's parked head"
    );
    failing.store(false, Ordering::SeqCst);
    harness.engine.retry(parked[0]).await.unwrap();
    assert_eq!(
        harness.settled_for(parked[0]).await,
        Settled::Done(parked[0])
    );
    assert_eq!(harness.settled_for(behind).await, Settled::Done(behind));

    harness
        .engine
        .discard(parked[1], "二重注文 (duplicate order)")
        .await
        .unwrap();
    assert_eq!(harness.job(parked[1]).state, JobState::Discarded);
    let audit = harness.engine.queue().discards().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].job, audit[0].reason.as_str()),
        (parked[1], "二重注文 (duplicate order)")
    );

    assert_eq!(harness.engine.retry_all_parked().await.unwrap(), 2);
    harness.all_done(&parked[2..]).await;
    let status = harness.engine.status().unwrap();
    assert_eq!(status.total(JobState::Done), 4);
    assert_eq!(status.total(JobState::Discarded), 1);
    assert_eq!(status.total(JobState::Parked), 0);
    assert!(status.blocked_keys.is_empty());
    assert!(status.oldest_pending.is_none());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_upstream_starts_jobs_at_its_pace() {
    let clock = Arc::new(TestClock(AtomicU64::new(0)));
    let mut config = OutboxConfig {
        workers: 8,
        ..OutboxConfig::default()
    };
    let limit = RateLimit {
        per_second: 10.0,
        burst: 1,
    };
    config.rate_limit.insert("limited".into(), limit);
    let mut harness = Harness::start_with(config, |builder| {
        builder
            .clock(clock.clone())
            .executor(
                "t.limited",
                "limited",
                scripted(|_| AttemptOutcome::Success),
            )
            .executor("t.free", UPSTREAM, scripted(|_| AttemptOutcome::Success))
    });
    let first = harness.enqueue_to("t.limited", "limited", "k:1").await;
    let second = harness.enqueue_to("t.limited", "limited", "k:2").await;
    assert_eq!(harness.settled_for(first).await, Settled::Done(first));

    // A later job of an unlimited upstream runs while `second` waits for a token.
    let other = harness.enqueue("t.free", "k:3").await;
    assert_eq!(harness.settled_for(other).await, Settled::Done(other));
    let waiting = harness.job(second);
    assert_eq!((waiting.state, waiting.attempts), (JobState::Pending, 0));

    // 100 ms later (10 per second) the next token is there.
    clock.0.store(100, Ordering::SeqCst);
    harness.engine.wake();
    assert_eq!(harness.settled_for(second).await, Settled::Done(second));
    harness.stop().await;
}

#[test]
fn smaregi_is_rate_limited_by_default_and_a_partial_table_keeps_that() {
    let mut config = OutboxConfig::default();
    assert_eq!(
        config.rate_limit_for("smaregi"),
        Some(smaregi_relay::config::defaults::SMAREGI_RATE_LIMIT)
    );
    assert_eq!(config.rate_limit_for("downstream"), None);
    let limit = RateLimit {
        per_second: 1.0,
        burst: 2,
    };
    config.rate_limit.insert("downstream".into(), limit);
    assert_eq!(config.rate_limit_for("downstream"), Some(limit));
    assert_eq!(
        config.rate_limit_for("smaregi"),
        Some(smaregi_relay::config::defaults::SMAREGI_RATE_LIMIT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_jobs_are_pruned_once_past_the_retention() {
    const HOUR: u64 = 3_600_000;
    let clock = Arc::new(TestClock(AtomicU64::new(HOUR)));
    let mut harness = Harness::start(|builder| {
        builder.clock(clock.clone()).executor(
            "t.success",
            UPSTREAM,
            scripted(|_| AttemptOutcome::Success),
        )
    });
    let id = harness.enqueue("t.success", "k:1").await;
    assert_eq!(harness.settled_for(id).await, Settled::Done(id));
    let retention = OutboxConfig::default().retention_hours * HOUR;

    clock.0.store(HOUR + retention - 1, Ordering::SeqCst);
    assert_eq!(harness.engine.prune_finished().await.unwrap(), 0);
    assert!(harness.engine.queue().job(id).unwrap().is_some());

    clock.0.store(HOUR + retention + 1, Ordering::SeqCst);
    assert_eq!(harness.engine.prune_finished().await.unwrap(), 1);
    assert!(harness.engine.queue().job(id).unwrap().is_none());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_entries_of_jobs_that_cannot_run_never_hold_the_workers() {
    let config = OutboxConfig {
        workers: 2,
        ..OutboxConfig::default()
    };
    let mut harness = Harness::start_with(config, |builder| {
        builder.executor("t.success", UPSTREAM, scripted(|_| AttemptOutcome::Success))
    });
    // Due entries for jobs that do not exist, ahead of everything else.
    for ghost in 0..20u64 {
        let mut key = vec![b'D'];
        key.extend_from_slice(UPSTREAM.as_bytes());
        key.push(0);
        key.extend_from_slice(&smaregi_relay::store::keys::u64_pair_key(
            0,
            1_000_000 + ghost,
        ));
        harness.engine.queue().tree().insert(key, &[]).unwrap();
    }
    let id = harness.enqueue("t.success", "k:1").await;
    assert_eq!(harness.settled_for(id).await, Settled::Done(id));
    let left = harness
        .engine
        .queue()
        .due(UPSTREAM, u64::MAX, usize::MAX, |_| false)
        .unwrap();
    assert!(left.is_empty(), "the stale entries were removed: {left:?}");
    harness.stop().await;
}
