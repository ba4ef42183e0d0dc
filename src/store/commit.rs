//! Group commit: many callers' writes made durable by one flush and one
//! `fdatasync`.
//!
//! A caller writes to sled, then takes a ticket (the next number of a
//! counter) and waits. One committer thread repeatedly reads the counter,
//! flushes sled, `fdatasync`s sled's data file, and completes every caller
//! whose ticket is at most the value it read: their writes happened before
//! they took their tickets, so before the flush. Callers that arrive while a
//! sync runs share the next one.
//!
//! sled's own flush ends in `sync_file_range`, which neither flushes the
//! device's write cache nor file metadata; the `fdatasync` is what makes a
//! commit survive power loss.
//!
//! After a failed flush or sync nothing is durable any more (the kernel may
//! have dropped the dirty pages it could not write), so the committer stops
//! for good and every waiting and later caller gets the failure. It never
//! tells a caller "committed" after that.
//!
//! Wake-ups are the main cost besides the disk, so each caller is woken
//! once, when its own round is done (not at every round, as a broadcast
//! would), and callers wake the committer only when it is parked. A short
//! spin before parking was measured too and made no difference beyond noise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, Thread};

use tokio::sync::{oneshot, watch};

/// Why the store can no longer make writes durable.
#[derive(Debug, thiserror::Error)]
pub enum CommitFailure {
    #[error("flushing the database failed: {0}")]
    Flush(#[source] sled::Error),
    #[error("fdatasync of the database file failed: {0}")]
    Sync(#[source] std::io::Error),
    #[error("syncing sled's blob files failed: {0}")]
    SyncBlobs(#[source] std::io::Error),
    #[error("a database operation failed: {0}")]
    Operation(#[source] sled::Error),
    #[error("the committer thread panicked")]
    Panicked,
}

#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Committed,
    Failed(Arc<CommitFailure>),
    Closed,
}

/// Callers waiting for their round, in ticket order.
struct Waiters {
    queue: Vec<(u64, oneshot::Sender<Outcome>)>,
    /// Set once: what every later caller is told at once.
    end: Option<Outcome>,
}

struct Shared {
    /// The last ticket handed out. Taken under the `waiters` lock, so the
    /// queue stays in ticket order.
    requested: AtomicU64,
    /// Whether the committer is (about to be) parked and must be woken.
    parked: AtomicBool,
    stop: AtomicBool,
    /// The number of flush + fdatasync rounds done, for metrics and tests.
    syncs: AtomicU64,
    waiters: Mutex<Waiters>,
    failure: watch::Sender<Option<Arc<CommitFailure>>>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // The lock guards no invariant a panic could break halfway.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes every caller whose ticket is at most `durable`.
    fn complete_up_to(&self, durable: u64) {
        let done: Vec<_> = {
            let mut waiters = self.waiters();
            let covered = waiters
                .queue
                .partition_point(|(ticket, _)| *ticket <= durable);
            waiters.queue.drain(..covered).collect()
        };
        for (_, caller) in done {
            let _ = caller.send(Outcome::Committed);
        }
    }

    /// Ends the committer: every waiting and later caller gets `outcome`
    /// (a failure replaces an earlier close; the first failure stays).
    fn end(&self, outcome: Outcome) {
        let stranded = {
            let mut waiters = self.waiters();
            if !matches!(waiters.end, Some(Outcome::Failed(_))) {
                waiters.end = Some(outcome.clone());
            }
            std::mem::take(&mut waiters.queue)
        };
        if let Outcome::Failed(failure) = &outcome {
            self.failure.send_if_modified(|current| {
                current.get_or_insert_with(|| Arc::clone(failure));
                true
            });
        }
        for (_, caller) in stranded {
            let _ = caller.send(outcome.clone());
        }
    }
}

pub(crate) struct GroupCommitter {
    shared: Arc<Shared>,
    committer: Thread,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommitter {
    /// Starts the committer thread; `sync` makes every write made before
    /// the call durable (for the store: sled flush, then `fdatasync`).
    pub fn start<S>(sync: S) -> std::io::Result<Self>
    where
        S: FnMut() -> Result<(), CommitFailure> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            requested: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            waiters: Mutex::new(Waiters {
                queue: Vec::new(),
                end: None,
            }),
            failure: watch::channel(None).0,
        });
        let handle = thread::Builder::new().name("store-commit".into()).spawn({
            let shared = Arc::clone(&shared);
            move || commit_loop(&shared, sync)
        })?;
        Ok(Self {
            shared,
            committer: handle.thread().clone(),
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Waits until every write this caller made before the call is durable.
    pub async fn commit(&self) -> Outcome {
        let (done, outcome) = oneshot::channel();
        {
            let mut waiters = self.shared.waiters();
            if let Some(end) = &waiters.end {
                return end.clone();
            }
            let ticket = self.shared.requested.fetch_add(1, Ordering::SeqCst) + 1;
            waiters.queue.push((ticket, done));
        }
        if self.shared.parked.load(Ordering::SeqCst) {
            self.committer.unpark();
        }
        // The committer completes or ends every queued caller.
        outcome.await.unwrap_or(Outcome::Closed)
    }

    /// Resolves once the store has failed; never, while it works.
    pub async fn failed(&self) -> Arc<CommitFailure> {
        let mut failure = self.shared.failure.subscribe();
        let found = failure
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|failure| failure.clone());
        match found {
            Some(failure) => failure,
            // The sender lives as long as `self`: unreachable while we wait.
            None => std::future::pending().await,
        }
    }

    /// The failure, if the store has failed.
    pub fn failure(&self) -> Option<Arc<CommitFailure>> {
        self.shared.failure.borrow().clone()
    }

    /// Fails the store for good: waiting and later callers get `failure`.
    pub fn poison(&self, failure: CommitFailure) {
        self.shared.end(Outcome::Failed(Arc::new(failure)));
        self.committer.unpark();
    }

    pub fn sync_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Refuses new tickets, serves every ticket already handed out, then
    /// stops the thread. Blocks for at most one round.
    pub fn stop(&self) {
        // Closed under the lock that tickets are taken under: from here the
        // counter no longer grows, so the committer's drain ends.
        self.shared.waiters().end.get_or_insert(Outcome::Closed);
        self.shared.stop.store(true, Ordering::SeqCst);
        self.committer.unpark();
        let handle = self.handle.lock().map(|mut h| h.take()).unwrap_or(None);
        if let Some(handle) = handle {
            // A panic in the loop is already published as a failure.
            let _ = handle.join();
        }
    }
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Ends the committer with [`CommitFailure::Panicked`] if its loop unwinds,
/// so that no caller waits forever for a thread that is gone.
struct PanicGuard<'a>(&'a Shared);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0
                .end(Outcome::Failed(Arc::new(CommitFailure::Panicked)));
        }
    }
}

fn commit_loop<S>(shared: &Shared, mut sync: S)
where
    S: FnMut() -> Result<(), CommitFailure>,
{
    let _guard = PanicGuard(shared);
    let mut durable = 0;
    loop {
        if shared.failure.borrow().is_some() {
            // Poisoned from outside: no round may report success any more.
            return;
        }
        let target = shared.requested.load(Ordering::SeqCst);
        if target == durable {
            if shared.stop.load(Ordering::SeqCst) {
                shared.end(Outcome::Closed);
                return;
            }
            park_until_ticket(shared, durable);
            continue;
        }
        let result = sync();
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(failure) = result {
            tracing::error!(error = %failure, "durable commit failed; the store can no longer be trusted");
            shared.end(Outcome::Failed(Arc::new(failure)));
            return;
        }
        if shared.failure.borrow().is_some() {
            // Poisoned during the round: its callers already have the failure.
            return;
        }
        durable = target;
        shared.complete_up_to(durable);
    }
}

/// Parks until a caller or `stop` wakes the committer.
fn park_until_ticket(shared: &Shared, durable: u64) {
    // Announce the park before the last look at the counter: a caller
    // takes its ticket before it reads `parked`, so either it sees `parked`
    // and unparks us, or we see its ticket here.
    shared.parked.store(true, Ordering::SeqCst);
    if shared.requested.load(Ordering::SeqCst) == durable && !shared.stop.load(Ordering::SeqCst) {
        thread::park();
    }
    shared.parked.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Bounds every wait in these tests; none should come near it.
    const DEADLINE: Duration = Duration::from_secs(10);

    async fn commit(committer: &GroupCommitter) -> Outcome {
        tokio::time::timeout(DEADLINE, committer.commit())
            .await
            .expect("a commit never hangs")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_completes_only_after_a_sync_that_saw_its_write() {
        // `writes` stands for the store's contents; a round "makes durable"
        // what it saw when it began.
        let writes = Arc::new(AtomicU64::new(0));
        let synced = Arc::new(AtomicU64::new(0));
        let committer = Arc::new(
            GroupCommitter::start({
                let (writes, synced) = (Arc::clone(&writes), Arc::clone(&synced));
                move || {
                    let seen = writes.load(Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(200)); // the disk
                    synced.fetch_max(seen, Ordering::SeqCst);
                    Ok(())
                }
            })
            .unwrap(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (committer, writes, synced) = (
                Arc::clone(&committer),
                Arc::clone(&writes),
                Arc::clone(&synced),
            );
            tasks.spawn(async move {
                for _ in 0..20 {
                    let mine = writes.fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(matches!(commit(&committer).await, Outcome::Committed));
                    assert!(
                        synced.load(Ordering::SeqCst) >= mine,
                        "completed before its write was synced"
                    );
                }
            });
        }
        while let Some(task) = tasks.join_next().await {
            task.unwrap();
        }
        assert!(committer.sync_count() < 32 * 20, "rounds were shared");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_fails_every_waiting_and_later_caller() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let committer = Arc::new(
            GroupCommitter::start({
                let rounds = Arc::clone(&rounds);
                move || match rounds.fetch_add(1, Ordering::SeqCst) {
                    0 => Ok(()),
                    _ => Err(CommitFailure::Sync(std::io::Error::other("EIO"))),
                }
            })
            .unwrap(),
        );
        assert!(matches!(commit(&committer).await, Outcome::Committed));
        let mut waiting = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let committer = Arc::clone(&committer);
            waiting.spawn(async move { commit(&committer).await });
        }
        while let Some(outcome) = waiting.join_next().await {
            assert!(matches!(outcome.unwrap(), Outcome::Failed(_)));
        }
        let failure = tokio::time::timeout(DEADLINE, committer.failed())
            .await
            .unwrap();
        assert!(failure.to_string().contains("EIO"), "{failure}");
        assert!(matches!(commit(&committer).await, Outcome::Failed(_)));
        assert_eq!(
            rounds.load(Ordering::SeqCst),
            2,
            "no round after the failure"
        );
    }

    #[tokio::test]
    async fn a_panicking_sync_fails_callers_instead_of_hanging() {
        let committer = GroupCommitter::start(|| panic!("simulated bug")).unwrap();
        match commit(&committer).await {
            Outcome::Failed(failure) => assert!(matches!(*failure, CommitFailure::Panicked)),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_during_a_burst_ends_and_refuses_later_callers() {
        let committer = Arc::new(
            GroupCommitter::start(|| {
                thread::sleep(Duration::from_micros(100));
                Ok(())
            })
            .unwrap(),
        );
        let mut busy = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let committer = Arc::clone(&committer);
            busy.spawn(async move {
                let mut committed = 0u64;
                loop {
                    match commit(&committer).await {
                        Outcome::Committed => committed += 1,
                        Outcome::Closed => return committed,
                        Outcome::Failed(f) => panic!("{f}"),
                    }
                }
            });
        }
        // Let the burst get going, then stop it while it runs.
        while committer.sync_count() < 20 {
            tokio::task::yield_now().await;
        }
        let stopping = Arc::clone(&committer);
        tokio::time::timeout(
            DEADLINE,
            tokio::task::spawn_blocking(move || stopping.stop()),
        )
        .await
        .expect("stop does not livelock under a burst")
        .unwrap();
        let mut total = 0;
        while let Some(committed) = busy.join_next().await {
            total += committed.unwrap();
        }
        assert!(total > 0);
        assert!(matches!(commit(&committer).await, Outcome::Closed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn poison_fails_a_caller_whose_round_is_still_running() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (entered, round_started) = std::sync::mpsc::channel::<()>();
        let committer = Arc::new(
            GroupCommitter::start(move || {
                entered.send(()).unwrap();
                released.recv().unwrap();
                Ok(())
            })
            .unwrap(),
        );
        let waiting = tokio::spawn({
            let committer = Arc::clone(&committer);
            async move { commit(&committer).await }
        });
        tokio::task::spawn_blocking(move || round_started.recv_timeout(DEADLINE).unwrap())
            .await
            .unwrap();
        committer.poison(CommitFailure::Operation(sled::Error::Unsupported(
            "test".into(),
        )));
        release.send(()).unwrap();
        assert!(matches!(waiting.await.unwrap(), Outcome::Failed(_)));
        assert!(matches!(commit(&committer).await, Outcome::Failed(_)));
    }
}
