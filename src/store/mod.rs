//! The sled database and its durable commit.
//!
//! This module owns opening the database (lock, schema version, bounded
//! cache), the names of its trees, key encodings ([`keys`]) and the durable
//! commit ([`Store::commit`]). Other modules keep their records in their
//! own named trees and call [`Store::commit`] before they tell anyone that
//! something is saved.
//!
//! It must never continue on a store that failed to flush or sync: after a
//! failure every commit returns [`StoreError::CommitFailed`] and
//! [`Store::failed`] resolves, on which the daemon exits so that systemd
//! restarts it and recovery starts from what is really on disk.
//!
//! sled writes any tree node larger than a quarter of a segment to a blob
//! file of its own and never syncs it; the committer does ([`blobs`]).
//! Values should still stay small (a few KiB): a leaf holds about 17 of
//! them, and blobs cost a file, a sync and a directory sync each.

mod blobs;
mod commit;
pub mod keys;

use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blobs::BlobSyncer;
pub use commit::CommitFailure;
use commit::{GroupCommitter, Outcome};

use crate::config::StorageConfig;
use crate::metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};

/// The on-disk layout this build reads and writes. Bump it with a migration.
pub const SCHEMA_VERSION: u32 = 1;

/// The file in the database directory that one process at a time holds locked.
const LOCK_FILE: &str = "lock";
/// sled 0.34 keeps its log in this file inside the database directory.
const SLED_DATA_FILE: &str = "db";
/// sled 0.34 writes its settings here once, without syncing them.
const SLED_CONFIG_FILE: &str = "conf";
const SCHEMA_VERSION_KEY: &[u8] = b"schema-version";

/// The name of a sled tree. Each module declares the trees it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeName(&'static str);

impl TreeName {
    /// Store-wide facts such as the schema version.
    const META: TreeName = TreeName("meta");

    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The database directory; created if missing.
    pub directory: PathBuf,
    /// sled's page cache limit.
    pub cache_capacity_bytes: u64,
}

impl StoreOptions {
    pub fn from_config(storage: &StorageConfig) -> Self {
        Self {
            directory: storage.database_directory(),
            cache_capacity_bytes: storage.cache_capacity_mib * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store directory {} is not writable: {source}", path.display())]
    NotWritable { path: PathBuf, source: io::Error },
    #[error(
        "store {} is locked by another process; is another smaregi-relay running?",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("cannot open store {}: {source}", path.display())]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "store {} has schema version {found}, but this build of smaregi-relay reads version \
         {expected}; install a matching version, or move the directory away to start empty",
        path.display()
    )]
    SchemaMismatch {
        path: PathBuf,
        /// The stored version, or a description of an unreadable one.
        found: String,
        expected: u32,
    },
    #[error(
        "{} holds data but is not a smaregi-relay store (no schema version); point \
         `state-directory` elsewhere",
        path.display()
    )]
    NotAStore { path: PathBuf },
    #[error("store {} failed: {source}", path.display())]
    Io { path: PathBuf, source: sled::Error },
    #[error("cannot sync store {} to disk: {source}", path.display())]
    Sync { path: PathBuf, source: io::Error },
    #[error(
        "durable commit on store {} failed: {failure}; the store can no longer be trusted and \
         smaregi-relay must restart",
        path.display()
    )]
    CommitFailed {
        path: PathBuf,
        failure: Arc<CommitFailure>,
    },
    #[error("cannot start the commit thread of store {}: {source}", path.display())]
    CommitThread { path: PathBuf, source: io::Error },
    #[error("store {} is closed", path.display())]
    Closed { path: PathBuf },
}

impl StoreError {
    /// The process exit code for a daemon that stops on this error.
    pub fn exit_code(&self) -> u8 {
        use crate::exit;
        match self {
            Self::NotWritable { .. } => exit::CANT_CREATE,
            Self::Locked { .. } => exit::TEMP_FAIL,
            Self::SchemaMismatch { .. } | Self::NotAStore { .. } => exit::DATA_ERR,
            Self::Open { .. } | Self::Io { .. } | Self::Sync { .. } | Self::CommitFailed { .. } => {
                exit::IO_ERROR
            }
            Self::CommitThread { .. } | Self::Closed { .. } => exit::SOFTWARE,
        }
    }
}

/// The open database. Cheap to clone; all clones share one committer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    // Field order is drop order: the committer stops before the lock is released.
    committer: GroupCommitter,
    /// sled blob files the committer has synced (see [`blobs`]).
    blob_files_synced: Arc<AtomicU64>,
    /// How long callers of [`Store::commit`] waited.
    commit_latency: Histogram,
    db: sled::Db,
    directory: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("directory", &self.inner.directory)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store in `directory` with a small cache, for unit tests.
    #[cfg(test)]
    pub(crate) fn open_for_test(directory: &Path) -> Self {
        Self::open(&StoreOptions {
            directory: directory.to_owned(),
            cache_capacity_bytes: 8 << 20,
        })
        .expect("a test store opens")
    }

    /// Opens (or creates) the store. Blocking: call it from
    /// `spawn_blocking` or before the runtime starts.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        let directory = options.directory.clone();
        let not_writable = |source| StoreError::NotWritable {
            path: directory.clone(),
            source,
        };
        let created = create_directories(&directory).map_err(not_writable)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(directory.join(LOCK_FILE))
            .map_err(not_writable)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: directory });
            }
            Err(TryLockError::Error(source)) => return Err(not_writable(source)),
        }

        let db = open_sled(options).map_err(|source| match source {
            SledOpenError::Locked => StoreError::Locked {
                path: directory.clone(),
            },
            SledOpenError::Other(source) => StoreError::Open {
                path: directory.clone(),
                source,
            },
        })?;
        let data_file = match prepare(&db, &directory, &created) {
            Ok(data_file) => data_file,
            Err(error) => {
                if !matches!(
                    error,
                    StoreError::SchemaMismatch { .. } | StoreError::NotAStore { .. }
                ) {
                    // After an I/O error sled's destructor would write and
                    // fsync again and unwrap the result: never run it.
                    std::mem::forget(db);
                }
                return Err(error);
            }
        };

        let blob_files_synced = Arc::new(AtomicU64::new(0));
        let committer = GroupCommitter::start({
            let db = db.clone();
            let mut blobs = BlobSyncer::new(&directory);
            let blob_files_synced = Arc::clone(&blob_files_synced);
            move || {
                let synced = blobs.sync_new().map_err(CommitFailure::SyncBlobs)?;
                blob_files_synced.fetch_add(synced as u64, Ordering::Relaxed);
                db.flush().map_err(CommitFailure::Flush)?;
                data_file.sync_data().map_err(CommitFailure::Sync)
            }
        })
        .map_err(|source| StoreError::CommitThread {
            path: directory.clone(),
            source,
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                committer,
                blob_files_synced,
                commit_latency: Histogram::new(LATENCY_BUCKETS),
                db,
                directory,
                _lock: lock,
            }),
        })
    }

    /// The bytes sled's files take on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.check(self.inner.db.size_on_disk())
    }

    /// The database directory.
    pub fn directory(&self) -> &Path {
        &self.inner.directory
    }

    /// Opens a named tree, for records and for multi-tree transactions.
    pub fn tree(&self, name: TreeName) -> Result<sled::Tree, StoreError> {
        self.check(self.inner.db.open_tree(name.as_str()))
    }

    /// A unique, increasing id; unique across restarts (with gaps).
    pub fn generate_id(&self) -> Result<u64, StoreError> {
        self.check(self.inner.db.generate_id())
    }

    /// Passes a sled result through; an error fails the store for good.
    ///
    /// Every module maps the results of its own sled calls through this:
    /// after any I/O error the store cannot be trusted, so no later commit
    /// succeeds and [`Store::failed`] resolves.
    pub fn check<T>(&self, result: sled::Result<T>) -> Result<T, StoreError> {
        result.map_err(|source| {
            tracing::error!(error = %source, "store operation failed; the store can no longer be trusted");
            self.inner
                .committer
                .poison(CommitFailure::Operation(source.clone()));
            StoreError::Io {
                path: self.inner.directory.clone(),
                source,
            }
        })
    }

    /// Makes every write this caller has made durable.
    ///
    /// Returns once a flush and `fdatasync` that started after this call
    /// have completed; concurrent callers share one. An error means nothing
    /// can be promised about these writes, and the store has failed for good.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let outcome = self.inner.committer.commit().await;
        self.inner.commit_latency.observe(started.elapsed());
        match outcome {
            Outcome::Committed => Ok(()),
            Outcome::Failed(failure) => Err(StoreError::CommitFailed {
                path: self.inner.directory.clone(),
                failure,
            }),
            Outcome::Closed => Err(StoreError::Closed {
                path: self.inner.directory.clone(),
            }),
        }
    }

    /// Resolves when the store has failed (a flush, a sync, or any
    /// operation passed through [`Store::check`]); pending otherwise.
    pub async fn failed(&self) -> StoreError {
        let failure = self.inner.committer.failed().await;
        StoreError::CommitFailed {
            path: self.inner.directory.clone(),
            failure,
        }
    }

    /// Whether the store has failed for good (see [`Store::failed`]).
    pub fn has_failed(&self) -> bool {
        self.inner.committer.failure().is_some()
    }

    /// How long callers of [`Store::commit`] have waited.
    pub fn commit_latency(&self) -> HistogramSnapshot {
        self.inner.commit_latency.snapshot()
    }

    /// How many flush + fdatasync rounds commits have cost so far.
    pub fn sync_count(&self) -> u64 {
        self.inner.committer.sync_count()
    }

    /// How many of sled's blob files commits have synced: sled writes a
    /// tree node larger than a quarter of a segment to a file of its own.
    pub fn blob_files_synced(&self) -> u64 {
        self.inner.blob_files_synced.load(Ordering::Relaxed)
    }

    /// Makes everything durable and stops the committer.
    ///
    /// Commits through other clones after this fail with
    /// [`StoreError::Closed`]; the database itself closes with the last clone.
    pub async fn close(&self) -> Result<(), StoreError> {
        let result = self.commit().await;
        let inner = Arc::clone(&self.inner);
        // Stopping joins the committer thread: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || inner.committer.stop()).await;
        if let Some(failure) = self.inner.committer.failure() {
            return Err(StoreError::CommitFailed {
                path: self.inner.directory.clone(),
                failure,
            });
        }
        result
    }
}

enum SledOpenError {
    Locked,
    Other(sled::Error),
}

/// How long to wait for sled's own file lock while we hold ours: long
/// enough for a segment truncation's `sync_all` on a slow SD card.
const SLED_LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// Opens sled in `options.directory`, whose lock file we hold.
fn open_sled(options: &StoreOptions) -> Result<sled::Db, SledOpenError> {
    let config = sled::Config::new()
        .path(&options.directory)
        .cache_capacity(options.cache_capacity_bytes)
        // Durability comes only from `commit`; sled's background flusher
        // would only log its fsync errors.
        .flush_every_ms(None);
    open_sled_when_released(&config).map_err(|error| {
        if is_sled_lock_busy(&error) {
            SledOpenError::Locked
        } else {
            SledOpenError::Other(error)
        }
    })
}

/// Opens sled with `config`, waiting up to 30 s for sled's own file lock.
///
/// Within one process, sled's lock can still be held after the last
/// handle of a database was dropped: sled 0.34's global thread pool runs
/// the closures of an earlier `Db` (log writes, a segment truncation and
/// its sync) with the file open. sled offers nothing to wait on, so a busy
/// lock is retried with a growing pause. Callers that hold a lock of their
/// own (as [`Store::open`] does) know no other process is in the way.
pub fn open_sled_when_released(config: &sled::Config) -> sled::Result<sled::Db> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match config.open() {
            Err(error) if is_sled_lock_busy(&error) && started.elapsed() < SLED_LOCK_PATIENCE => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            opened => return opened,
        }
    }
}

/// sled 0.34.7 (pinned) reports a busy lock only as this I/O error text.
fn is_sled_lock_busy(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"))
}

/// Checks or writes the schema version and makes the fresh store durable;
/// returns sled's data file, for the committer to `fdatasync`.
fn prepare(db: &sled::Db, directory: &Path, created: &[PathBuf]) -> Result<File, StoreError> {
    let io = |source| StoreError::Io {
        path: directory.to_path_buf(),
        source,
    };
    let sync_failed = |source| StoreError::Sync {
        path: directory.to_path_buf(),
        source,
    };
    let meta = db.open_tree(TreeName::META.as_str()).map_err(io)?;
    match meta.get(SCHEMA_VERSION_KEY).map_err(io)? {
        Some(stored) => {
            let found = <[u8; 4]>::try_from(&*stored).ok().map(u32::from_be_bytes);
            if found != Some(SCHEMA_VERSION) {
                return Err(StoreError::SchemaMismatch {
                    path: directory.to_path_buf(),
                    found: found.map_or_else(
                        || format!("unreadable ({} bytes)", stored.len()),
                        |version| version.to_string(),
                    ),
                    expected: SCHEMA_VERSION,
                });
            }
        }
        None => {
            if holds_data(db).map_err(io)? {
                return Err(StoreError::NotAStore {
                    path: directory.to_path_buf(),
                });
            }
            meta.insert(SCHEMA_VERSION_KEY, &SCHEMA_VERSION.to_be_bytes())
                .map_err(io)?;
        }
    }

    // The first durable commit: the data, sled's `conf` (which sled writes
    // without syncing), and the entries of every directory just created.
    let data_file = File::open(directory.join(SLED_DATA_FILE)).map_err(sync_failed)?;
    db.flush().map_err(io)?;
    data_file.sync_data().map_err(sync_failed)?;
    File::open(directory.join(SLED_CONFIG_FILE))
        .and_then(|conf| conf.sync_all())
        .map_err(sync_failed)?;
    for created in created.iter().map(PathBuf::as_path).chain([directory]) {
        sync_directory(created).map_err(sync_failed)?;
        if let Some(parent) = created.parent() {
            sync_directory(parent).map_err(sync_failed)?;
        }
    }
    Ok(data_file)
}

/// Whether a database without a schema version already holds records.
fn holds_data(db: &sled::Db) -> sled::Result<bool> {
    let meta = TreeName::META.as_str().as_bytes();
    if !db.is_empty() {
        return Ok(true);
    }
    for name in db.tree_names() {
        if &*name == meta || name == b"__sled__default" {
            continue;
        }
        if !db.open_tree(&name)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Creates `directory` and its missing ancestors; returns those it created.
fn create_directories(directory: &Path) -> io::Result<Vec<PathBuf>> {
    let missing: Vec<PathBuf> = directory
        .ancestors()
        .take_while(|ancestor| !ancestor.as_os_str().is_empty() && !ancestor.exists())
        .map(Path::to_path_buf)
        .collect();
    fs::create_dir_all(directory)?;
    Ok(missing)
}

/// Makes a directory's entries (new files, renames) durable.
fn sync_directory(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Widens a sled transaction's abort error, e.g. from a module's own
/// error to its caller's: for transactions that span several modules'
/// trees. Conflicts and storage errors pass through unchanged (sled
/// retries the closure on a conflict).
pub fn widen_abort<T, E: Into<F>, F>(
    result: sled::transaction::ConflictableTransactionResult<T, E>,
) -> sled::transaction::ConflictableTransactionResult<T, F> {
    use sled::transaction::ConflictableTransactionError as Error;
    result.map_err(|error| match error {
        Error::Abort(e) => Error::Abort(e.into()),
        Error::Storage(e) => Error::Storage(e),
        Error::Conflict => Error::Conflict,
    })
}
