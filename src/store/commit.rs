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

use std::fs::File;
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

    /// Ends the committer: every waiting and later caller gets `outcome`.
    fn end(&self, outcome: Outcome) {
        let stranded = {
            let mut waiters = self.waiters();
            waiters.end.get_or_insert(outcome.clone());
            std::mem::take(&mut waiters.queue)
        };
        if let Outcome::Failed(failure) = &outcome {
            self.failure.send_replace(Some(Arc::clone(failure)));
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
    /// Starts the committer thread for `db`, whose data file is `data_file`.
    pub fn start(db: sled::Db, data_file: File) -> std::io::Result<Self> {
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
            move || commit_loop(&shared, &db, &data_file)
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

    pub fn sync_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Serves every ticket already handed out, then stops the thread.
    pub fn stop(&self) {
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

fn commit_loop(shared: &Shared, db: &sled::Db, data_file: &File) {
    let _guard = PanicGuard(shared);
    let mut durable = 0;
    loop {
        let target = shared.requested.load(Ordering::SeqCst);
        if target == durable {
            if shared.stop.load(Ordering::SeqCst) {
                shared.end(Outcome::Closed);
                return;
            }
            park_until_ticket(shared, durable);
            continue;
        }
        let result = db
            .flush()
            .map_err(CommitFailure::Flush)
            .and_then(|_| data_file.sync_data().map_err(CommitFailure::Sync));
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                durable = target;
                shared.complete_up_to(durable);
            }
            Err(failure) => {
                tracing::error!(error = %failure, "durable commit failed; the store can no longer be trusted");
                shared.end(Outcome::Failed(Arc::new(failure)));
                return;
            }
        }
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
