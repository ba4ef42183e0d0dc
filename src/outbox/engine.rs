//! The engine: runs the executor of each due job, applies the outcome,
//! and makes it durable.
//!
//! One scheduler task reads the runnable jobs of every upstream that is not
//! paused ([`Queue::due`]) and starts attempts up to the worker count. It
//! sleeps until the next job is due, an enqueue or a finished attempt wakes
//! it, or the shutdown token is cancelled; it never polls.
//!
//! Each upstream may have a token bucket (`[outbox.rate-limit.NAME]`): a
//! backlog then starts at the allowed pace, not all at once.
//!
//! Outcomes: success completes the job; a retryable failure reschedules it
//! by the [`RetryPolicy`] (or parks it when too old); a permanent failure,
//! an undecodable payload or a panic parks it; a configuration failure
//! pauses the job's whole upstream for [`PAUSE_PROBE_INTERVAL`] without
//! charging the job, after which the next attempt probes it again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::job::{ErrorClass, Job, JobError, JobState, NewJob};
use super::queue::{Counts, OldestPending, OperatorPause, Queue, QueueError};
use super::rate::TokenBucket;
use super::retry::{unix_millis, RetryDecision, RetryPolicy};
use crate::config::OutboxConfig;
use crate::metrics::Counters;
use crate::store::{Store, StoreError};
use crate::watchdog::Heartbeat;

/// How long a configuration failure pauses an upstream before a probe.
pub const PAUSE_PROBE_INTERVAL: Duration = Duration::from_secs(60);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The result of one attempt, as an executor classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    Success,
    /// Try again later; `retry_after` is the upstream's own `Retry-After`.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Like `Retry`, for a write that may have taken effect: recorded as
    /// [`ErrorClass::Ambiguous`] so that the next attempt checks first.
    Ambiguous {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help: park with the reason.
    Permanent {
        reason: String,
    },
    /// The payload no longer decodes: park with the reason.
    Undecodable {
        reason: String,
    },
    /// Credentials or configuration: pause the whole upstream.
    Configuration {
        reason: String,
    },
}

impl AttemptOutcome {
    /// The `outcome` label of the attempt counter.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Retry { .. } => "retryable",
            Self::Ambiguous { .. } => "ambiguous",
            Self::Permanent { .. } => "permanent",
            Self::Undecodable { .. } => "undecodable",
            Self::Configuration { .. } => "configuration",
        }
    }
}

/// Carries out the jobs of one kind.
pub trait Executor: Send + Sync + 'static {
    /// Runs one attempt. Must make a second attempt of the same job harmless.
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome>;
}

/// The time, as the engine sees it; tests substitute a controllable one.
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds.
    fn now(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        unix_millis(SystemTime::now())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("job {0} is being attempted right now; try again once the attempt has settled")]
    Running(u64),
}

/// The outbox at a glance.
#[derive(Debug, Clone)]
pub struct OutboxStatus {
    pub counts: Counts,
    pub oldest_pending: Option<OldestPending>,
    /// Keys whose head is parked, with that job.
    pub blocked_keys: Vec<(String, u64)>,
    pub paused: HashMap<String, Pause>,
}

impl OutboxStatus {
    /// Jobs in `state`, over all kinds.
    pub fn total(&self, state: JobState) -> u64 {
        self.counts
            .iter()
            .filter(|((s, _), _)| *s == state)
            .map(|(_, count)| count)
            .sum()
    }
}

/// What an attempt came to, once durable; see [`Engine::settled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Done(u64),
    Rescheduled(u64),
    Parked(u64, ErrorClass),
    /// The job's upstream was paused; the job was not charged an attempt.
    UpstreamPaused(u64),
}

/// How often finished jobs past their retention are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// Jobs pruned per batch.
const PRUNE_CHUNK: usize = 10_000;

impl Settled {
    /// The job the outcome is about.
    pub fn job(&self) -> u64 {
        match *self {
            Self::Done(id)
            | Self::Rescheduled(id)
            | Self::Parked(id, _)
            | Self::UpstreamPaused(id) => id,
        }
    }
}

/// The longest the scheduler sleeps without a reason to wake.
const IDLE_SLEEP: Duration = Duration::from_secs(3600);

/// Why an upstream is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub reason: String,
    /// When the pause lapses and a probe runs; `None`: until resumed.
    pub until: Option<u64>,
}

struct Registered {
    upstream: String,
    executor: Arc<dyn Executor>,
}

struct Inner {
    store: Store,
    queue: Queue,
    policy: RetryPolicy,
    clock: Arc<dyn Clock>,
    executors: HashMap<String, Registered>,
    upstreams: Vec<String>,
    running: Mutex<HashSet<u64>>,
    paused: Mutex<HashMap<String, Pause>>,
    workers: Arc<Semaphore>,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    retention: Duration,
    wake: Notify,
    settled: broadcast::Sender<Settled>,
    /// Attempts by `(kind, outcome)`.
    attempts: Counters<(String, &'static str)>,
}

/// The outbox engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Builds an [`Engine`]: register every executor, then [`EngineBuilder::build`].
pub struct EngineBuilder {
    store: Store,
    queue: Queue,
    config: OutboxConfig,
    clock: Arc<dyn Clock>,
    executors: HashMap<String, Registered>,
}

impl EngineBuilder {
    pub fn new(store: &Store, config: &OutboxConfig) -> Result<Self, StoreError> {
        Ok(Self {
            queue: Queue::open(store)?,
            store: store.clone(),
            config: config.clone(),
            clock: Arc::new(SystemClock),
            executors: HashMap::new(),
        })
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Registers the executor of jobs of `kind`, which call `upstream`.
    pub fn executor(mut self, kind: &str, upstream: &str, executor: Arc<dyn Executor>) -> Self {
        self.executors.insert(
            kind.to_owned(),
            Registered {
                upstream: upstream.to_owned(),
                executor,
            },
        );
        self
    }

    /// Builds the engine, with the pauses operators left in place.
    pub fn build(self) -> Result<Engine, EngineError> {
        let mut upstreams: Vec<String> = self
            .executors
            .values()
            .map(|r| r.upstream.clone())
            .collect();
        upstreams.sort();
        upstreams.dedup();
        let now = self.clock.now();
        let buckets = upstreams
            .iter()
            .filter_map(|upstream| {
                let limit = self.config.rate_limit_for(upstream)?;
                Some((
                    upstream.clone(),
                    TokenBucket::new(limit.per_second, limit.burst, now),
                ))
            })
            .collect();
        let paused = self
            .queue
            .operator_pauses()?
            .into_iter()
            .map(|(upstream, pause)| {
                let pause = Pause {
                    reason: pause.reason,
                    until: None,
                };
                (upstream, pause)
            })
            .collect();
        Ok(Engine {
            inner: Arc::new(Inner {
                store: self.store,
                queue: self.queue,
                policy: RetryPolicy::from_config(&self.config),
                clock: self.clock,
                executors: self.executors,
                upstreams,
                running: Mutex::new(HashSet::new()),
                paused: Mutex::new(paused),
                workers: Arc::new(Semaphore::new(usize::from(self.config.workers).max(1))),
                buckets: Mutex::new(buckets),
                retention: Duration::from_secs(self.config.retention_hours * 3600),
                wake: Notify::new(),
                settled: broadcast::channel(1024).0,
                attempts: Counters::default(),
            }),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    pub fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The upstreams of the registered executors, sorted.
    pub fn upstreams(&self) -> &[String] {
        &self.inner.upstreams
    }

    /// Enqueues a job and commits it; returns its id once durable.
    pub async fn enqueue(&self, new: &NewJob) -> Result<u64, EngineError> {
        let id = self.inner.queue.enqueue(new, self.inner.clock.now())?;
        self.inner.store.commit().await?;
        self.wake();
        Ok(id)
    }

    /// Tells the scheduler that jobs may have become runnable, e.g. after a
    /// caller committed jobs it staged in its own transaction.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Every attempt's outcome, once it is durable.
    pub fn settled(&self) -> broadcast::Receiver<Settled> {
        self.inner.settled.subscribe()
    }

    /// Stops delivering to `upstream` until [`Engine::resume`], also
    /// across restarts; jobs keep queueing.
    pub async fn pause(&self, upstream: &str, reason: &str) -> Result<(), EngineError> {
        let record = OperatorPause {
            reason: reason.to_owned(),
            at: self.inner.clock.now(),
        };
        self.inner
            .queue
            .set_operator_pause(upstream, Some(&record))?;
        self.inner.store.commit().await?;
        let pause = Pause {
            reason: reason.to_owned(),
            until: None,
        };
        lock(&self.inner.paused).insert(upstream.to_owned(), pause);
        info!(upstream, reason, "outbox: upstream paused by operator");
        Ok(())
    }

    /// Delivers to `upstream` again, whether an operator or a
    /// configuration failure paused it.
    pub async fn resume(&self, upstream: &str) -> Result<(), EngineError> {
        self.inner.queue.set_operator_pause(upstream, None)?;
        self.inner.store.commit().await?;
        if lock(&self.inner.paused).remove(upstream).is_some() {
            info!(upstream, "outbox: upstream resumed");
        }
        self.wake();
        Ok(())
    }

    /// The upstreams paused now, with why.
    pub fn paused(&self) -> HashMap<String, Pause> {
        lock(&self.inner.paused).clone()
    }

    /// An operator's "retry now" of a parked job or one waiting for its
    /// next attempt (see [`Queue::retry`]).
    pub async fn retry(&self, id: u64) -> Result<(), EngineError> {
        self.inner.queue.retry(id, self.inner.clock.now())?;
        self.inner.store.commit().await?;
        info!(job = id, "outbox: job retried by operator");
        self.wake();
        Ok(())
    }

    /// Retries every parked job; returns how many.
    pub async fn retry_all_parked(&self) -> Result<usize, EngineError> {
        let retried = self.inner.queue.retry_all_parked(self.inner.clock.now())?;
        self.inner.store.commit().await?;
        info!(retried, "outbox: all parked jobs retried by operator");
        self.wake();
        Ok(retried)
    }

    /// An operator gives up on an unfinished job; the reason is audited.
    pub async fn discard(&self, id: u64, reason: &str) -> Result<(), EngineError> {
        {
            // Held so that the scheduler cannot start the job meanwhile.
            let running = lock(&self.inner.running);
            if running.contains(&id) {
                return Err(EngineError::Running(id));
            }
            self.inner
                .queue
                .discard(id, reason, self.inner.clock.now())?;
        }
        self.inner.store.commit().await?;
        warn!(
            event = "outbox.job_discarded",
            job = id,
            reason,
            "outbox: job discarded by operator"
        );
        self.wake();
        Ok(())
    }

    /// Attempts so far (since start) by `(kind, outcome)`.
    pub fn attempts(&self) -> std::collections::BTreeMap<(String, &'static str), u64> {
        self.inner.attempts.snapshot()
    }

    /// What `status` shows: counts, the oldest pending job, blocked keys,
    /// paused upstreams. Costs a read per state and kind and per blocked
    /// key, never a scan of the backlog.
    pub fn status(&self) -> Result<OutboxStatus, EngineError> {
        let queue = &self.inner.queue;
        Ok(OutboxStatus {
            counts: queue.counts()?,
            oldest_pending: queue.oldest_pending()?,
            blocked_keys: queue.blocked_keys()?,
            paused: self.paused(),
        })
    }

    /// Runs jobs, and prunes finished ones every [`PRUNE_INTERVAL`], until
    /// `shutdown` is cancelled; then waits for running attempts.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EngineError> {
        self.run_watched(shutdown, Heartbeat::detached()).await
    }

    /// [`Engine::run`], beating `heartbeat` while the scheduler runs.
    pub async fn run_watched(
        self,
        shutdown: CancellationToken,
        heartbeat: Heartbeat,
    ) -> Result<(), EngineError> {
        let attempts = TaskTracker::new();
        let result = tokio::select! {
            result = self.schedule(&shutdown, &attempts, &heartbeat) => result,
            result = self.prune_periodically(&shutdown) => result,
        };
        attempts.close();
        attempts.wait().await;
        result
    }

    /// Removes done and discarded jobs older than `retention-hours`; returns how many.
    pub async fn prune_finished(&self) -> Result<usize, EngineError> {
        let retention = self.inner.retention.as_millis() as u64;
        let before = self.inner.clock.now().saturating_sub(retention);
        let mut total = 0;
        loop {
            let pruned = self.inner.queue.prune_finished(before, PRUNE_CHUNK)?;
            self.inner.store.commit().await?;
            total += pruned;
            if pruned < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    }

    async fn prune_periodically(&self, shutdown: &CancellationToken) -> Result<(), EngineError> {
        let mut every = tokio::time::interval(PRUNE_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = every.tick() => {}
            }
            let pruned = self.prune_finished().await?;
            if pruned > 0 {
                info!(pruned, "outbox: pruned finished jobs past their retention");
            }
        }
    }

    async fn schedule(
        &self,
        shutdown: &CancellationToken,
        attempts: &TaskTracker,
        heartbeat: &Heartbeat,
    ) -> Result<(), EngineError> {
        let inner = &self.inner;
        loop {
            let now = inner.clock.now();
            let mut next_wake: Option<u64> = None;
            for upstream in &inner.upstreams {
                if let Some(until) = self.pause_of(upstream, now) {
                    next_wake = min_some(next_wake, until);
                    continue;
                }
                let mut free = inner.workers.available_permits();
                if let Some(bucket) = lock(&inner.buckets).get_mut(upstream) {
                    free = free.min(bucket.available(now) as usize);
                }
                let due = {
                    let running = lock(&inner.running);
                    inner
                        .queue
                        .due_entries(upstream, now, free, |id| running.contains(&id))?
                };
                for (due_at, id) in due {
                    let Ok(permit) = Arc::clone(&inner.workers).try_acquire_owned() else {
                        break;
                    };
                    if let Some(bucket) = lock(&inner.buckets).get_mut(upstream) {
                        bucket.try_take(now);
                    }
                    lock(&inner.running).insert(id);
                    let engine = self.clone();
                    let upstream = upstream.clone();
                    attempts.spawn(async move {
                        if let Err(e) = engine.attempt(&upstream, due_at, id).await {
                            error!(job = id, error = %e, "outbox: could not record an attempt");
                        }
                        lock(&engine.inner.running).remove(&id);
                        drop(permit);
                        engine.wake();
                    });
                }
                // Out of tokens, the next token is when this upstream may
                // start again. With every worker busy, a finishing attempt
                // wakes us. In both cases the next due time may already be
                // past, and sleeping until it would poll.
                let token_at = lock(&inner.buckets)
                    .get_mut(upstream)
                    .and_then(|bucket| (bucket.available(now) == 0).then(|| bucket.ready_at(now)));
                if let Some(token_at) = token_at {
                    next_wake = min_some(next_wake, token_at);
                } else if inner.workers.available_permits() > 0 {
                    let running = lock(&inner.running);
                    if let Some(due) = inner.queue.next_due(upstream, |id| running.contains(&id))? {
                        next_wake = min_some(next_wake, due);
                    }
                }
            }
            let sleep = next_wake.map_or(IDLE_SLEEP, |at| {
                Duration::from_millis(at.saturating_sub(inner.clock.now()).max(1)).min(IDLE_SLEEP)
            });
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = inner.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                () = heartbeat.tick() => {}
            }
        }
    }

    /// When a paused upstream's pause lapses, or `None` if it is not paused.
    fn pause_of(&self, upstream: &str, now: u64) -> Option<u64> {
        let mut paused = lock(&self.inner.paused);
        match paused.get(upstream) {
            None => None,
            Some(Pause {
                until: Some(until), ..
            }) if *until <= now => {
                paused.remove(upstream);
                info!(upstream, "outbox: pause lapsed; probing the upstream");
                None
            }
            Some(pause) => Some(pause.until.unwrap_or(u64::MAX)),
        }
    }

    async fn attempt(&self, upstream: &str, due: u64, id: u64) -> Result<(), EngineError> {
        let inner = &self.inner;
        let runnable = |job: &Job| job.state == JobState::Pending && job.next_attempt_at == due;
        let Some(job) = inner.queue.job(id)?.filter(runnable) else {
            // Discarded or retried by an operator since the scheduler read
            // the index (their transactions moved the entry already), or an
            // entry that should not exist: it must not come round again.
            if inner.queue.drop_stale_due(upstream, due, id)? {
                warn!(
                    job = id,
                    due, "outbox: removed an index entry of a job that cannot run"
                );
                inner.store.commit().await?;
            }
            return Ok(());
        };
        let Some(registered) = inner.executors.get(&job.kind) else {
            let reason = format!("no executor is registered for job kind `{}`", job.kind);
            return self.park(&job, ErrorClass::Permanent, &reason).await;
        };
        // Its own task, so that a panic is caught as a join error.
        let executor = Arc::clone(&registered.executor);
        let attempted = job.clone();
        let outcome = tokio::spawn(async move { executor.execute(&attempted).await }).await;
        let label = outcome.as_ref().map_or("panicked", AttemptOutcome::label);
        inner.attempts.add((job.kind.clone(), label));
        let now = inner.clock.now();
        let settled = match outcome {
            Ok(AttemptOutcome::Success) => {
                inner.queue.complete(id, now)?;
                Settled::Done(id)
            }
            Ok(outcome @ (AttemptOutcome::Retry { .. } | AttemptOutcome::Ambiguous { .. })) => {
                let (class, reason, retry_after) = match outcome {
                    AttemptOutcome::Ambiguous {
                        reason,
                        retry_after,
                    } => (ErrorClass::Ambiguous, reason, retry_after),
                    AttemptOutcome::Retry {
                        reason,
                        retry_after,
                    } => (ErrorClass::Retryable, reason, retry_after),
                    _ => unreachable!("matched above"),
                };
                let failures = job.attempts + 1;
                match inner.policy.decide(
                    failures,
                    job.created_at,
                    now,
                    retry_after,
                    rand::random(),
                ) {
                    RetryDecision::RetryAt(at) => {
                        let error = JobError::new(class, &reason, now);
                        inner.queue.reschedule(id, at, error)?;
                        Settled::Rescheduled(id)
                    }
                    RetryDecision::Park => {
                        let reason = format!("still failing after the maximum age: {reason}");
                        return self.park(&job, ErrorClass::TooOld, &reason).await;
                    }
                }
            }
            Ok(AttemptOutcome::Permanent { reason }) => {
                return self.park(&job, ErrorClass::Permanent, &reason).await;
            }
            Ok(AttemptOutcome::Undecodable { reason }) => {
                return self.park(&job, ErrorClass::Undecodable, &reason).await;
            }
            Ok(AttemptOutcome::Configuration { reason }) => {
                let until = now + PAUSE_PROBE_INTERVAL.as_millis() as u64;
                let upstream = &registered.upstream;
                warn!(
                    event = "upstream.paused",
                    upstream,
                    reason,
                    "outbox: configuration or credential failure; delivery paused"
                );
                // An operator's pause stays as it is.
                lock(&inner.paused)
                    .entry(upstream.clone())
                    .or_insert(Pause {
                        reason,
                        until: Some(until),
                    });
                let _ = inner.settled.send(Settled::UpstreamPaused(id));
                return Ok(());
            }
            Err(join_error) => {
                let reason = format!("the executor panicked: {join_error}");
                return self.park(&job, ErrorClass::Panicked, &reason).await;
            }
        };
        inner.store.commit().await?;
        let _ = inner.settled.send(settled);
        Ok(())
    }

    async fn park(&self, job: &Job, class: ErrorClass, reason: &str) -> Result<(), EngineError> {
        warn!(event = "outbox.job_parked", job = job.id, kind = %job.kind, key = %job.key, reason, "outbox: job parked");
        let error = JobError::new(class, reason, self.inner.clock.now());
        self.inner.queue.park(job.id, error)?;
        self.inner.store.commit().await?;
        let _ = self.inner.settled.send(Settled::Parked(job.id, class));
        Ok(())
    }
}

fn min_some(current: Option<u64>, candidate: u64) -> Option<u64> {
    Some(current.map_or(candidate, |current| current.min(candidate)))
}
