//! The durable queue: jobs, their per-key order, and the index of jobs
//! that may run.
//!
//! One sled tree, four kinds of record:
//!
//! | key | value | what |
//! |---|---|---|
//! | `J` id | job (JSON) | every job, whatever its state |
//! | `K` key | next sequence, unfinished count | per ordering key, while it has unfinished jobs |
//! | `Q` key `␀` sequence | job id | the unfinished jobs of a key, in enqueue order |
//! | `D` upstream `␀` due id | — | the **head** of each key that may run, by due time |
//! | `B` key | job id | keys blocked by a parked head |
//! | `A` time id | audit (JSON) | discards by an operator |
//! | `F` time id | — | finished (done or discarded) jobs by finish time, for pruning |
//! | `S` state `␀` id | — | pending and parked jobs, oldest first |
//! | `C` state `␀` kind | count | how many jobs are in each state, per kind |
//! | `P` upstream | pause (JSON) | upstreams an operator paused |
//!
//! Only the head (oldest unfinished job) of a key is ever in `D`, so one
//! job per key runs at a time, and the scheduler reads the runnable jobs in
//! due order without scanning anything else. A parked head leaves `D` and
//! blocks its key until it is retried or discarded. Which jobs are running
//! is kept in memory by the engine, not here: after a crash they are simply
//! pending again, and start-up reads nothing.
//!
//! The counts and the state index make `status` cost a read per state and
//! kind, whatever the backlog: nothing here scans all jobs except an
//! operator's unfiltered listing.
//!
//! Every transition is one sled transaction, so the records never disagree;
//! [`Queue::stage`] lets other modules add jobs inside their own
//! transaction, so that a record is never stored without its jobs. None of
//! this is durable before the caller's [`crate::store::Store::commit`].

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use std::collections::BTreeMap;

use super::job::{self, ErrorClass, InvalidJob, Job, JobError, JobState, NewJob};
use crate::store::keys::{decode_u64_key, decode_u64_pair_key, u64_key, u64_pair_key};
use crate::store::{Store, StoreError, TreeName};

/// The outbox's tree.
pub const OUTBOX: TreeName = TreeName::new("outbox");

const JOB: u8 = b'J';
const KEY: u8 = b'K';
const QUEUE: u8 = b'Q';
const DUE: u8 = b'D';
const BLOCKED: u8 = b'B';
const AUDIT: u8 = b'A';
const FINISHED: u8 = b'F';
const STATE: u8 = b'S';
const COUNT: u8 = b'C';
const PAUSED: u8 = b'P';

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{0}")]
    Invalid(#[from] InvalidJob),
    #[error("no job {0}")]
    NotFound(u64),
    #[error("job {id} is {state}, which does not allow this")]
    WrongState { id: u64, state: JobState },
    #[error(
        "job {id} waits for the earlier jobs of its key {key:?}; retry or discard job {head} first"
    )]
    NotHead { id: u64, key: String, head: u64 },
    #[error("outbox record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// An operator's discard, kept for audit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiscardRecord {
    pub job: u64,
    pub key: String,
    pub kind: String,
    pub reason: String,
    pub at: u64,
}

/// Why an operator paused an upstream; survives restarts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OperatorPause {
    pub reason: String,
    pub at: u64,
}

/// The oldest job still waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldestPending {
    pub id: u64,
    pub kind: String,
    pub created_at: u64,
}

/// Which jobs [`Queue::list`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub state: Option<JobState>,
    pub kind: Option<String>,
    pub key: Option<String>,
    /// Only jobs with a larger id: the cursor of the previous page.
    pub after: Option<u64>,
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self {
            state: None,
            kind: None,
            key: None,
            after: None,
            limit: 100,
        }
    }
}

impl ListFilter {
    fn matches(&self, job: &Job) -> bool {
        self.state.is_none_or(|state| job.state == state)
            && self.kind.as_ref().is_none_or(|kind| &job.kind == kind)
            && self.key.as_ref().is_none_or(|key| &job.key == key)
    }
}

/// Jobs per state and kind.
pub type Counts = BTreeMap<(JobState, String), u64>;

fn prefixed(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![tag];
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

fn job_record(id: u64) -> Vec<u8> {
    prefixed(JOB, &[&u64_key(id)])
}

fn key_record(key: &str) -> Vec<u8> {
    prefixed(KEY, &[key.as_bytes()])
}

fn queue_prefix(key: &str) -> Vec<u8> {
    prefixed(QUEUE, &[key.as_bytes(), &[0]])
}

fn queue_record(key: &str, sequence: u64) -> Vec<u8> {
    prefixed(QUEUE, &[key.as_bytes(), &[0], &u64_key(sequence)])
}

fn due_prefix(upstream: &str) -> Vec<u8> {
    prefixed(DUE, &[upstream.as_bytes(), &[0]])
}

fn due_record(upstream: &str, due: u64, id: u64) -> Vec<u8> {
    prefixed(DUE, &[upstream.as_bytes(), &[0], &u64_pair_key(due, id)])
}

fn blocked_record(key: &str) -> Vec<u8> {
    prefixed(BLOCKED, &[key.as_bytes()])
}

fn state_prefix(state: JobState) -> Vec<u8> {
    prefixed(STATE, &[state.as_str().as_bytes(), &[0]])
}

fn state_record(state: JobState, id: u64) -> Vec<u8> {
    prefixed(STATE, &[state.as_str().as_bytes(), &[0], &u64_key(id)])
}

fn count_record(state: JobState, kind: &str) -> Vec<u8> {
    prefixed(COUNT, &[state.as_str().as_bytes(), &[0], kind.as_bytes()])
}

fn finished_record(finished_at: u64, id: u64) -> Vec<u8> {
    prefixed(FINISHED, &[&u64_pair_key(finished_at, id)])
}

fn paused_record(upstream: &str) -> Vec<u8> {
    prefixed(PAUSED, &[upstream.as_bytes()])
}

/// Per-key bookkeeping: the next sequence number and the unfinished count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KeyState {
    next_sequence: u64,
    unfinished: u64,
}

impl KeyState {
    fn decode(bytes: Option<sled::IVec>) -> Result<Self, QueueError> {
        match bytes {
            None => Ok(Self::default()),
            Some(bytes) => decode_u64_pair_key(&bytes)
                .map(|(next_sequence, unfinished)| Self {
                    next_sequence,
                    unfinished,
                })
                .map_err(|e| QueueError::Corrupt(format!("key state: {e}"))),
        }
    }

    fn encode(self) -> [u8; 16] {
        u64_pair_key(self.next_sequence, self.unfinished)
    }
}

fn decode_job(bytes: &[u8]) -> Result<Job, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt(format!("job: {e}")))
}

/// Aborts a transaction with a queue error.
fn abort<T, E: From<QueueError>>(
    error: impl Into<QueueError>,
) -> ConflictableTransactionResult<T, E> {
    Err(ConflictableTransactionError::Abort(E::from(error.into())))
}

/// Why a transition's transaction gave up.
enum Attempt {
    Failed(QueueError),
    /// The key's queue changed since it was read: read it again.
    Reread,
}

impl From<QueueError> for Attempt {
    fn from(error: QueueError) -> Self {
        Self::Failed(error)
    }
}

/// The durable queue over the outbox tree.
#[derive(Debug, Clone)]
pub struct Queue {
    store: Store,
    tree: sled::Tree,
}

impl Queue {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree(OUTBOX)?,
            store: store.clone(),
        })
    }

    /// The outbox tree, for transactions that span it and a caller's trees.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Adds a job inside the caller's transaction over the outbox tree.
    ///
    /// `id` comes from [`Store::generate_id`], taken before the
    /// transaction. The job's place in its key's order is fixed by the
    /// transaction's commit, so jobs of one key run in the order their
    /// transactions commit.
    pub fn stage(
        outbox: &TransactionalTree,
        id: u64,
        new: &NewJob,
        now: u64,
    ) -> ConflictableTransactionResult<(), QueueError> {
        if let Err(invalid) = job::validate(new) {
            return abort(invalid);
        }
        let job = Job::new(id, new, now);
        let mut state = match KeyState::decode(outbox.get(key_record(&new.key))?) {
            Ok(state) => state,
            Err(corrupt) => return abort(corrupt),
        };
        Self::put(outbox, &job)?;
        Self::account(outbox, &job, None, Some(JobState::Pending))?;
        outbox.insert(queue_record(&new.key, state.next_sequence), &u64_key(id))?;
        if state.unfinished == 0 {
            outbox.insert(due_record(&new.upstream, now, id), &[])?;
        }
        state.next_sequence += 1;
        state.unfinished += 1;
        outbox.insert(key_record(&new.key), &state.encode())?;
        Ok(())
    }

    /// Adds one job in a transaction of its own; returns its id. Durable
    /// after the next commit.
    pub fn enqueue(&self, new: &NewJob, now: u64) -> Result<u64, QueueError> {
        let id = self.store.generate_id()?;
        self.transaction(|outbox| Self::stage(outbox, id, new, now))?;
        Ok(id)
    }

    pub fn job(&self, id: u64) -> Result<Option<Job>, QueueError> {
        let bytes = self.store.check(self.tree.get(job_record(id)))?;
        bytes.map(|bytes| decode_job(&bytes)).transpose()
    }

    /// Up to `limit` jobs of `upstream` that may run at `now`, earliest
    /// first, leaving out those `running` says are running.
    pub fn due(
        &self,
        upstream: &str,
        now: u64,
        limit: usize,
        running: impl Fn(u64) -> bool,
    ) -> Result<Vec<u64>, QueueError> {
        let entries = self.due_entries(upstream, now, limit, running)?;
        Ok(entries.into_iter().map(|(_, id)| id).collect())
    }

    /// Like [`Queue::due`], with each job's due time as the index has it.
    pub fn due_entries(
        &self,
        upstream: &str,
        now: u64,
        limit: usize,
        running: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, u64)>, QueueError> {
        let mut entries = Vec::new();
        for entry in self.tree.scan_prefix(due_prefix(upstream)) {
            let (key, _) = self.store.check(entry)?;
            let (due, id) = Self::due_entry(upstream, &key)?;
            if due > now || entries.len() == limit {
                break;
            }
            if !running(id) {
                entries.push((due, id));
            }
        }
        Ok(entries)
    }

    /// Entries of the due index that do not point at a pending job due at
    /// that time: (upstream, due, id). Reads the whole index: for checks
    /// after crash campaigns, not for the daemon.
    pub fn stale_due_entries(&self) -> Result<Vec<(String, u64, u64)>, QueueError> {
        let mut stale = Vec::new();
        for entry in self.tree.scan_prefix([DUE]) {
            let (key, _) = self.store.check(entry)?;
            let corrupt = || QueueError::Corrupt("due index key".into());
            let separator = key.iter().position(|&b| b == 0).ok_or_else(corrupt)?;
            let upstream = String::from_utf8_lossy(&key[1..separator]).into_owned();
            let (due, id) = decode_u64_pair_key(&key[separator + 1..]).map_err(|_| corrupt())?;
            let live = self
                .job(id)?
                .is_some_and(|job| job.state == JobState::Pending && job.next_attempt_at == due);
            if !live {
                stale.push((upstream, due, id));
            }
        }
        Ok(stale)
    }

    /// Removes the index entry (`upstream`, `due`, `id`) unless it is the
    /// entry of a pending job due then; returns whether it removed one.
    /// The scheduler calls this for an entry whose job it cannot run, so
    /// that such an entry can never hold a worker again.
    pub fn drop_stale_due(&self, upstream: &str, due: u64, id: u64) -> Result<bool, QueueError> {
        let removed = std::cell::Cell::new(false);
        self.transaction(|outbox| {
            removed.set(false);
            let live = match outbox.get(job_record(id))? {
                Some(bytes) => decode_job(&bytes)
                    .map(|job| job.state == JobState::Pending && job.next_attempt_at == due)
                    .unwrap_or(false),
                None => false,
            };
            if !live {
                removed.set(outbox.remove(due_record(upstream, due, id))?.is_some());
            }
            Ok(())
        })?;
        Ok(removed.get())
    }

    /// When the next job of `upstream` that is not running becomes due.
    pub fn next_due(
        &self,
        upstream: &str,
        running: impl Fn(u64) -> bool,
    ) -> Result<Option<u64>, QueueError> {
        for entry in self.tree.scan_prefix(due_prefix(upstream)) {
            let (key, _) = self.store.check(entry)?;
            let (due, id) = Self::due_entry(upstream, &key)?;
            if !running(id) {
                return Ok(Some(due));
            }
        }
        Ok(None)
    }

    fn due_entry(upstream: &str, key: &[u8]) -> Result<(u64, u64), QueueError> {
        decode_u64_pair_key(&key[due_prefix(upstream).len()..])
            .map_err(|e| QueueError::Corrupt(format!("due index: {e}")))
    }

    /// A successful attempt: the job is done and the next of its key may run.
    pub fn complete(&self, id: u64, now: u64) -> Result<(), QueueError> {
        self.finish(
            id,
            |job| {
                job.attempts += 1;
                job.state = JobState::Done;
                job.finished_at = Some(now);
            },
            |_| None,
        )
    }

    /// A failed attempt to be tried again at `at`.
    pub fn reschedule(&self, id: u64, at: u64, error: JobError) -> Result<(), QueueError> {
        self.transaction(|outbox| {
            let mut job = Self::running_head(outbox, id)?;
            outbox.remove(due_record(&job.upstream, job.next_attempt_at, id))?;
            job.attempts += 1;
            job.record_failure(error.clone());
            job.next_attempt_at = at;
            Self::put(outbox, &job)?;
            outbox.insert(due_record(&job.upstream, at, id), &[])?;
            Ok(())
        })
    }

    /// A failed attempt that will not be retried: the job waits for an
    /// operator and blocks the later jobs of its key.
    pub fn park(&self, id: u64, error: JobError) -> Result<(), QueueError> {
        self.transaction(|outbox| {
            let mut job = Self::running_head(outbox, id)?;
            outbox.remove(due_record(&job.upstream, job.next_attempt_at, id))?;
            job.attempts += 1;
            job.record_failure(error.clone());
            job.state = JobState::Parked;
            Self::put(outbox, &job)?;
            Self::account(
                outbox,
                &job,
                Some(JobState::Pending),
                Some(JobState::Parked),
            )?;
            outbox.insert(blocked_record(&job.key), &u64_key(id))?;
            Ok(())
        })
    }

    /// An operator's "retry now": a parked job, or a pending job waiting
    /// for its next attempt, runs again at `now`. A job behind others of
    /// its key cannot jump ahead of them.
    pub fn retry(&self, id: u64, now: u64) -> Result<(), QueueError> {
        let job = self.job(id)?.ok_or(QueueError::NotFound(id))?;
        if job.state == JobState::Pending {
            let head = self.key_queue(&job.key)?.first().map(|&(_, head)| head);
            if let Some(head) = head.filter(|&head| head != id) {
                return Err(QueueError::NotHead {
                    id,
                    key: job.key,
                    head,
                });
            }
        }
        self.transaction(|outbox| {
            let mut job = Self::load(outbox, id)?;
            match job.state {
                JobState::Parked => {
                    outbox.remove(blocked_record(&job.key))?;
                }
                JobState::Pending
                    if outbox
                        .remove(due_record(&job.upstream, job.next_attempt_at, id))?
                        .is_some() => {}
                state => return abort(QueueError::WrongState { id, state }),
            }
            let was = job.state;
            job.state = JobState::Pending;
            job.next_attempt_at = now;
            Self::put(outbox, &job)?;
            Self::account(outbox, &job, Some(was), Some(job.state))?;
            outbox.insert(due_record(&job.upstream, now, id), &[])?;
            Ok(())
        })
    }

    /// Retries every parked job at `now`; returns how many.
    pub fn retry_all_parked(&self, now: u64) -> Result<usize, QueueError> {
        let parked = self.ids_in(JobState::Parked)?;
        for &id in &parked {
            self.retry(id, now)?;
        }
        Ok(parked.len())
    }

    /// An operator gives up on an unfinished job, with a reason kept for
    /// audit in the same transaction.
    pub fn discard(&self, id: u64, reason: &str, now: u64) -> Result<(), QueueError> {
        self.finish(
            id,
            |job| {
                job.state = JobState::Discarded;
                job.last_error = Some(JobError::new(ErrorClass::Operator, reason, now));
                job.finished_at = Some(now);
            },
            |job| {
                let audit = DiscardRecord {
                    job: id,
                    key: job.key.clone(),
                    kind: job.kind.clone(),
                    reason: reason.to_owned(),
                    at: now,
                };
                let record = serde_json::to_vec(&audit).expect("an audit record serialises");
                Some((prefixed(AUDIT, &[&u64_pair_key(now, id)]), record))
            },
        )
    }

    /// Every discard, oldest first.
    pub fn discards(&self) -> Result<Vec<DiscardRecord>, QueueError> {
        self.tree
            .scan_prefix([AUDIT])
            .map(|entry| {
                let (_, value) = self.store.check(entry)?;
                serde_json::from_slice(&value)
                    .map_err(|e| QueueError::Corrupt(format!("audit: {e}")))
            })
            .collect()
    }

    /// Removes up to `limit` jobs that finished before `before`; returns
    /// how many. Reads only the jobs it removes. Durable after a commit.
    pub fn prune_finished(&self, before: u64, limit: usize) -> Result<usize, QueueError> {
        let mut expired = Vec::new();
        for entry in self.tree.scan_prefix([FINISHED]).take(limit) {
            let (key, _) = self.store.check(entry)?;
            let (finished_at, id) = decode_u64_pair_key(&key[1..])
                .map_err(|e| QueueError::Corrupt(format!("finished index: {e}")))?;
            if finished_at >= before {
                break;
            }
            expired.push((finished_at, id));
        }
        self.transaction(|outbox| {
            for &(finished_at, id) in &expired {
                // Gone already if a concurrent prune took it.
                if outbox.remove(finished_record(finished_at, id))?.is_some() {
                    let job = Self::load(outbox, id)?;
                    outbox.remove(job_record(id))?;
                    Self::account(outbox, &job, Some(job.state), None)?;
                }
            }
            Ok(())
        })?;
        Ok(expired.len())
    }

    /// How many jobs are in each state, per kind. Done and discarded jobs
    /// count until they are pruned.
    pub fn counts(&self) -> Result<Counts, QueueError> {
        let mut counts = Counts::new();
        for entry in self.tree.scan_prefix([COUNT]) {
            let (record, value) = self.store.check(entry)?;
            let corrupt = || QueueError::Corrupt("count record".into());
            let (state, kind) = std::str::from_utf8(&record[1..])
                .ok()
                .and_then(|name| name.split_once('\0'))
                .ok_or_else(corrupt)?;
            let state = state.parse().map_err(|_| corrupt())?;
            let count = decode_u64_key(&value).map_err(|_| corrupt())?;
            counts.insert((state, kind.to_owned()), count);
        }
        Ok(counts)
    }

    /// The pending job enqueued first (the smallest id), if any.
    pub fn oldest_pending(&self) -> Result<Option<OldestPending>, QueueError> {
        let Some(id) = self
            .ids_in_from(JobState::Pending, None)
            .next()
            .transpose()?
        else {
            return Ok(None);
        };
        let job = self.job(id)?.ok_or(QueueError::NotFound(id))?;
        Ok(Some(OldestPending {
            id,
            kind: job.kind,
            created_at: job.created_at,
        }))
    }

    /// Up to `filter.limit` jobs in id order. With a pending or parked
    /// state, reads only the jobs in that state; otherwise walks all jobs
    /// from `filter.after` on until the page is full.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, QueueError> {
        let ids: Box<dyn Iterator<Item = Result<u64, QueueError>>> = match filter.state {
            Some(state) if !state.is_finished() => Box::new(self.ids_in_from(state, filter.after)),
            _ => {
                let start = filter.after.map_or(0, |after| after.saturating_add(1));
                Box::new(self.ids_from(job_record(start), vec![JOB]))
            }
        };
        let mut jobs = Vec::new();
        for id in ids {
            if jobs.len() == filter.limit {
                break;
            }
            if let Some(job) = self.job(id?)? {
                if filter.matches(&job) {
                    jobs.push(job);
                }
            }
        }
        Ok(jobs)
    }

    fn ids_in(&self, state: JobState) -> Result<Vec<u64>, QueueError> {
        self.ids_in_from(state, None).collect()
    }

    /// Ids of the jobs in a pending or parked `state`, after `after`.
    fn ids_in_from(
        &self,
        state: JobState,
        after: Option<u64>,
    ) -> impl Iterator<Item = Result<u64, QueueError>> + '_ {
        let start = match after {
            Some(after) => state_record(state, after.saturating_add(1)),
            None => state_prefix(state),
        };
        self.ids_from(start, state_prefix(state))
    }

    /// The ids that end the records from `start` on that begin with `prefix`.
    fn ids_from(
        &self,
        start: Vec<u8>,
        prefix: Vec<u8>,
    ) -> impl Iterator<Item = Result<u64, QueueError>> + '_ {
        self.tree
            .range(start..)
            .take_while(move |entry| {
                entry
                    .as_ref()
                    .map_or(true, |(record, _)| record.starts_with(&prefix))
            })
            .map(move |entry| {
                let (record, _) = self.store.check(entry)?;
                decode_u64_key(&record[record.len().saturating_sub(8)..])
                    .map_err(|e| QueueError::Corrupt(format!("job index: {e}")))
            })
    }

    /// Records an operator's pause of `upstream` (`None`: resumed).
    /// Durable after a commit.
    pub fn set_operator_pause(
        &self,
        upstream: &str,
        pause: Option<&OperatorPause>,
    ) -> Result<(), QueueError> {
        let record = paused_record(upstream);
        let result = match pause {
            Some(pause) => self.tree.insert(
                record,
                serde_json::to_vec(pause).expect("a pause record serialises"),
            ),
            None => self.tree.remove(record),
        };
        self.store.check(result)?;
        Ok(())
    }

    /// The upstreams an operator paused, with why.
    pub fn operator_pauses(&self) -> Result<Vec<(String, OperatorPause)>, QueueError> {
        self.tree
            .scan_prefix([PAUSED])
            .map(|entry| {
                let (record, value) = self.store.check(entry)?;
                let pause = serde_json::from_slice(&value)
                    .map_err(|e| QueueError::Corrupt(format!("pause: {e}")))?;
                Ok((String::from_utf8_lossy(&record[1..]).into_owned(), pause))
            })
            .collect()
    }

    /// Keys whose head is parked, with that job's id.
    pub fn blocked_keys(&self) -> Result<Vec<(String, u64)>, QueueError> {
        self.tree
            .scan_prefix([BLOCKED])
            .map(|entry| {
                let (key, value) = self.store.check(entry)?;
                let id = decode_u64_key(&value).map_err(|e| QueueError::Corrupt(e.to_string()))?;
                Ok((String::from_utf8_lossy(&key[1..]).into_owned(), id))
            })
            .collect()
    }

    /// Ends an unfinished job (done or discarded), writes the record
    /// `also` returns for it, and, if it was its key's head, makes the next
    /// job of the key runnable; all in one transaction.
    fn finish(
        &self,
        id: u64,
        end: impl Fn(&mut Job),
        also: impl Fn(&Job) -> Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), QueueError> {
        loop {
            let job = self.job(id)?.ok_or(QueueError::NotFound(id))?;
            if !matches!(job.state, JobState::Pending | JobState::Parked) {
                return Err(QueueError::WrongState {
                    id,
                    state: job.state,
                });
            }
            // Read the key's queue outside the transaction (sled
            // transactions cannot scan); the transaction checks it is unchanged.
            let queue = self.key_queue(&job.key)?;
            let Some(position) = queue.iter().position(|&(_, queued)| queued == id) else {
                return Err(QueueError::Corrupt(format!(
                    "job {id} is missing from its key's queue"
                )));
            };
            let (sequence, _) = queue[position];
            let next = (position == 0).then(|| queue.get(1).copied()).flatten();
            let result = self.tree.transaction(|outbox| {
                let mut job: Job = Self::load(outbox, id)?;
                let reread = || Err(ConflictableTransactionError::Abort(Attempt::Reread));
                if !matches!(job.state, JobState::Pending | JobState::Parked)
                    || outbox.remove(queue_record(&job.key, sequence))?.is_none()
                {
                    return reread();
                }
                let mut state = match KeyState::decode(outbox.get(key_record(&job.key))?) {
                    Ok(state) => state,
                    Err(corrupt) => return abort(corrupt),
                };
                let was_head = position == 0;
                if was_head {
                    match job.state {
                        JobState::Pending => {
                            outbox.remove(due_record(&job.upstream, job.next_attempt_at, id))?;
                        }
                        _ => {
                            outbox.remove(blocked_record(&job.key))?;
                        }
                    }
                }
                let was = job.state;
                end(&mut job);
                Self::put(outbox, &job)?;
                Self::account(outbox, &job, Some(was), Some(job.state))?;
                if let Some((key, value)) = also(&job) {
                    outbox.insert(key, value)?;
                }
                if let Some(finished_at) = job.finished_at {
                    outbox.insert(finished_record(finished_at, id), &[])?;
                }
                state.unfinished = state.unfinished.saturating_sub(1);
                if state.unfinished == 0 {
                    if next.is_some() {
                        return reread();
                    }
                    outbox.remove(key_record(&job.key))?;
                    return Ok(());
                }
                outbox.insert(key_record(&job.key), &state.encode())?;
                if was_head {
                    let Some((next_sequence, next_id)) = next else {
                        // A job was added to the key after we read its queue.
                        return reread();
                    };
                    if outbox.get(queue_record(&job.key, next_sequence))?.is_none() {
                        return reread();
                    }
                    let next_job: Job = Self::load(outbox, next_id)?;
                    outbox.insert(
                        due_record(&next_job.upstream, next_job.next_attempt_at, next_id),
                        &[],
                    )?;
                }
                Ok(())
            });
            match result {
                Ok(()) => return Ok(()),
                Err(TransactionError::Abort(Attempt::Reread)) => continue,
                Err(TransactionError::Abort(Attempt::Failed(e))) => return Err(e),
                Err(TransactionError::Storage(e)) => return Err(self.storage_failed(e)),
            }
        }
    }

    /// The unfinished jobs of `key` in order: (sequence, job id).
    fn key_queue(&self, key: &str) -> Result<Vec<(u64, u64)>, QueueError> {
        let prefix = queue_prefix(key);
        self.tree
            .scan_prefix(&prefix)
            .map(|entry| {
                let (record, value) = self.store.check(entry)?;
                let corrupt =
                    |e: crate::store::keys::KeyError| QueueError::Corrupt(format!("queue: {e}"));
                let sequence = decode_u64_key(&record[prefix.len()..]).map_err(corrupt)?;
                let id = decode_u64_key(&value).map_err(corrupt)?;
                Ok((sequence, id))
            })
            .collect()
    }

    fn transaction(
        &self,
        body: impl Fn(&TransactionalTree) -> ConflictableTransactionResult<(), QueueError>,
    ) -> Result<(), QueueError> {
        match self.tree.transaction(body) {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(self.storage_failed(e)),
        }
    }

    /// A sled error fails the whole store (see [`Store::check`]).
    fn storage_failed(&self, error: sled::Error) -> QueueError {
        match self.store.check::<()>(Err(error)) {
            Err(failed) => failed.into(),
            Ok(()) => unreachable!("check passes errors through"),
        }
    }

    fn load<E: From<QueueError>>(
        outbox: &TransactionalTree,
        id: u64,
    ) -> ConflictableTransactionResult<Job, E> {
        match outbox.get(job_record(id))? {
            Some(bytes) => decode_job(&bytes).or_else(abort),
            None => abort(QueueError::NotFound(id)),
        }
    }

    /// Whether job `id` is still to run (pending, or parked for an
    /// operator), read inside the caller's transaction. A done, discarded
    /// or pruned job is not.
    pub fn is_unfinished_in(
        outbox: &TransactionalTree,
        id: u64,
    ) -> ConflictableTransactionResult<bool, QueueError> {
        match outbox.get(job_record(id))? {
            None => Ok(false),
            Some(bytes) => decode_job(&bytes)
                .map(|job| !job.state.is_finished())
                .or_else(abort),
        }
    }

    /// A pending job that is its key's head, i.e. one that may be running.
    fn running_head(
        outbox: &TransactionalTree,
        id: u64,
    ) -> ConflictableTransactionResult<Job, QueueError> {
        let job = Self::load(outbox, id)?;
        let indexed = outbox
            .get(due_record(&job.upstream, job.next_attempt_at, id))?
            .is_some();
        if job.state != JobState::Pending || !indexed {
            return abort(QueueError::WrongState {
                id,
                state: job.state,
            });
        }
        Ok(job)
    }

    /// Keeps the counts and the state index in step with `job` moving
    /// `from` one state `to` another (`None`: not stored).
    fn account<E: From<QueueError>>(
        outbox: &TransactionalTree,
        job: &Job,
        from: Option<JobState>,
        to: Option<JobState>,
    ) -> ConflictableTransactionResult<(), E> {
        if from == to {
            return Ok(());
        }
        if let Some(from) = from {
            Self::add_to_count(outbox, from, &job.kind, -1)?;
            if !from.is_finished() {
                outbox.remove(state_record(from, job.id))?;
            }
        }
        if let Some(to) = to {
            Self::add_to_count(outbox, to, &job.kind, 1)?;
            if !to.is_finished() {
                outbox.insert(state_record(to, job.id), &[])?;
            }
        }
        Ok(())
    }

    fn add_to_count<E: From<QueueError>>(
        outbox: &TransactionalTree,
        state: JobState,
        kind: &str,
        delta: i64,
    ) -> ConflictableTransactionResult<(), E> {
        let record = count_record(state, kind);
        let count = match outbox.get(&record)? {
            None => 0,
            Some(bytes) => match decode_u64_key(&bytes) {
                Ok(count) => count,
                Err(e) => return abort(QueueError::Corrupt(format!("count: {e}"))),
            },
        };
        match count.saturating_add_signed(delta) {
            0 => outbox.remove(record)?,
            count => outbox.insert(record, &u64_key(count))?,
        };
        Ok(())
    }

    fn put<E: From<QueueError>>(
        outbox: &TransactionalTree,
        job: &Job,
    ) -> ConflictableTransactionResult<(), E> {
        match job::encode(job) {
            Ok(record) => {
                outbox.insert(job_record(job.id), record)?;
                Ok(())
            }
            Err(invalid) => abort(invalid),
        }
    }
}
