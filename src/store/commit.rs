//! Group commit: many callers' writes made durable by one flush and one
//! `fdatasync`.
//!
//! A caller writes to sled, then takes a ticket (a number from a counter)
//! and waits. One committer thread repeatedly reads the counter, flushes
//! sled, `fdatasync`s sled's data file and publishes the counter value it
//! read: every caller whose ticket is at most that value is durable, because
//! its writes happened before it took its ticket, and so before the flush.
//! Callers that arrive while a sync is running share the next one.
//!
//! sled's own flush ends in `sync_file_range`, which neither flushes the
//! device's write cache nor file metadata; the `fdatasync` is what makes a
//! commit survive power loss.
//!
//! After a failed flush or sync nothing is durable any more (the kernel may
//! have dropped the dirty pages it could not write), so the committer stops
//! for good and every waiting and later caller gets the failure. It never
//! tells a caller "committed" after that.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};

use tokio::sync::watch;

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
pub(crate) enum CommitState {
    /// Every ticket up to this one is durable.
    Durable(u64),
    Failed(Arc<CommitFailure>),
    /// The store was closed; no more commits.
    Closed,
}

pub(crate) enum Outcome {
    Committed,
    Failed(Arc<CommitFailure>),
    Closed,
}

struct Shared {
    /// The last ticket handed out.
    requested: AtomicU64,
    /// The number of flush + fdatasync rounds done, for metrics and tests.
    syncs: AtomicU64,
    stop: AtomicBool,
    state: watch::Sender<CommitState>,
}

pub(crate) struct GroupCommitter {
    shared: Arc<Shared>,
    committer: Thread,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommitter {
    /// Starts the committer thread for `db`, whose data file is `data_file`.
    pub fn start(db: sled::Db, data_file: File) -> std::io::Result<Self> {
        let (state, _) = watch::channel(CommitState::Durable(0));
        let shared = Arc::new(Shared {
            requested: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            state,
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
        let mut state = self.shared.state.subscribe();
        let ticket = self.shared.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.committer.unpark();
        let reached = state
            .wait_for(|state| !matches!(state, CommitState::Durable(done) if *done < ticket))
            .await;
        match reached.as_deref() {
            Ok(CommitState::Durable(_)) => Outcome::Committed,
            Ok(CommitState::Failed(failure)) => Outcome::Failed(Arc::clone(failure)),
            Ok(CommitState::Closed) | Err(_) => Outcome::Closed,
        }
    }

    /// Resolves once the store has failed; never, while it works.
    pub async fn failed(&self) -> Arc<CommitFailure> {
        let mut state = self.shared.state.subscribe();
        let failure = match state
            .wait_for(|state| matches!(state, CommitState::Failed(_)))
            .await
            .as_deref()
        {
            Ok(CommitState::Failed(failure)) => Some(Arc::clone(failure)),
            _ => None,
        };
        match failure {
            Some(failure) => failure,
            // The sender lives as long as `self`; a closed store never fails.
            None => std::future::pending().await,
        }
    }

    /// The current failure, if the store has failed.
    pub fn failure(&self) -> Option<Arc<CommitFailure>> {
        match &*self.shared.state.borrow() {
            CommitState::Failed(failure) => Some(Arc::clone(failure)),
            _ => None,
        }
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

/// Publishes [`CommitFailure::Panicked`] if the loop unwinds, so that no
/// caller waits forever for a thread that is gone.
struct PanicGuard<'a>(&'a Shared);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0
                .state
                .send_replace(CommitState::Failed(Arc::new(CommitFailure::Panicked)));
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
                // A ticket taken after this point sees `Closed`, never a false "committed".
                shared.state.send_replace(CommitState::Closed);
                return;
            }
            thread::park();
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
                shared.state.send_replace(CommitState::Durable(durable));
            }
            Err(failure) => {
                tracing::error!(error = %failure, "durable commit failed; the store can no longer be trusted");
                shared
                    .state
                    .send_replace(CommitState::Failed(Arc::new(failure)));
                return;
            }
        }
    }
}
