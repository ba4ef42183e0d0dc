//! The job record: what is owed, to whom, in which order, and how its
//! attempts went.
//!
//! Stored as JSON in the outbox tree, so `outbox show` and a look with any
//! sled tool stay readable. The payload is the executor's business; it
//! carries its own version field so an executor can refuse (and the engine
//! park) a payload it no longer understands.

use serde::{Deserialize, Serialize};

/// A job record may not grow past this (payloads stay under 64 KiB), well
/// below the 128 KiB at which sled writes even a single value to a blob file
/// (see the store's module docs).
pub const MAX_JOB_BYTES: usize = 60 * 1024;
/// Attempts kept in a job's history; older ones are dropped.
pub const MAX_HISTORY: usize = 10;
/// The longest ordering key, in bytes.
pub const MAX_KEY_BYTES: usize = 200;
/// Error messages are cut to this many characters.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// What the job does, e.g. `smaregi.transaction-register`; selects its executor.
    pub kind: String,
    /// Who it calls, e.g. `smaregi`: pausing an upstream pauses its jobs.
    pub upstream: String,
    /// Jobs of one key run one at a time, oldest first, e.g. `order:1234`.
    pub key: String,
    /// The executor's input.
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for its turn or its next attempt. (A running attempt is
    /// tracked in memory only: after a crash the job is simply pending.)
    Pending,
    Done,
    /// Stopped for an operator; blocks later jobs of its key.
    Parked,
    /// Given up by an operator, with an audit record.
    Discarded,
}

impl JobState {
    pub const ALL: [JobState; 4] = [Self::Pending, Self::Parked, Self::Done, Self::Discarded];

    /// The state's name, as in the JSON record and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Parked => "parked",
            Self::Done => "done",
            Self::Discarded => "discarded",
        }
    }

    /// Finished jobs are kept for a while, then pruned.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Done | Self::Discarded)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| {
                format!("unknown job state {name:?}: expected pending, parked, done or discarded")
            })
    }
}

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Worth trying again (timeouts, 5xx, resets).
    Retryable,
    /// A write whose outcome is unknown (a timeout or reset after it was
    /// sent): the executor must find out before sending it again.
    Ambiguous,
    /// Trying again cannot help (validation errors).
    Permanent,
    /// Credentials or configuration: the upstream is paused, not the job.
    Configuration,
    /// The payload does not decode (e.g. after a version change).
    Undecodable,
    /// The executor panicked.
    Panicked,
    /// Still failing after the maximum age.
    TooOld,
    /// Stopped by an operator.
    Operator,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobError {
    pub class: ErrorClass,
    pub message: String,
    /// Unix milliseconds.
    pub at: u64,
}

impl JobError {
    pub fn new(class: ErrorClass, message: &str, at: u64) -> Self {
        Self {
            class,
            message: message.chars().take(MAX_MESSAGE_CHARS).collect(),
            at,
        }
    }
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Job {
    pub id: u64,
    pub kind: String,
    pub upstream: String,
    pub key: String,
    pub payload: serde_json::Value,
    /// Unix milliseconds, like every time here.
    pub created_at: u64,
    /// Attempts that ran to an outcome (a pause does not count).
    pub attempts: u32,
    pub next_attempt_at: u64,
    pub state: JobState,
    pub last_error: Option<JobError>,
    /// The latest attempts' failures, oldest first, at most [`MAX_HISTORY`].
    pub history: Vec<JobError>,
    /// When it became done or discarded; finished jobs are pruned after a while.
    pub finished_at: Option<u64>,
}

impl Job {
    pub(crate) fn new(id: u64, new: &NewJob, now: u64) -> Self {
        Self {
            id,
            kind: new.kind.clone(),
            upstream: new.upstream.clone(),
            key: new.key.clone(),
            payload: new.payload.clone(),
            created_at: now,
            attempts: 0,
            next_attempt_at: now,
            state: JobState::Pending,
            last_error: None,
            history: Vec::new(),
            finished_at: None,
        }
    }

    /// Records a failed attempt's error.
    pub(crate) fn record_failure(&mut self, error: JobError) {
        if self.history.len() == MAX_HISTORY {
            self.history.remove(0);
        }
        self.history.push(error.clone());
        self.last_error = Some(error);
    }
}

/// Why a job cannot be enqueued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidJob {
    #[error("ordering key {0:?} must be 1 to 200 printable ASCII characters without spaces")]
    Key(String),
    #[error("upstream {0:?} must be 1 to 32 of a-z 0-9 -")]
    Upstream(String),
    #[error("job kind {0:?} must be 1 to 64 of a-z 0-9 - . _")]
    Kind(String),
    #[error("job is {0} bytes encoded; at most {MAX_JOB_BYTES} are allowed")]
    TooLarge(usize),
}

/// Checks the names of a new job; the size is checked when it is encoded.
pub fn validate(job: &NewJob) -> Result<(), InvalidJob> {
    let key_ok = (1..=MAX_KEY_BYTES).contains(&job.key.len())
        && job.key.bytes().all(|b| b.is_ascii_graphic());
    if !key_ok {
        return Err(InvalidJob::Key(job.key.clone()));
    }
    let upstream_ok = (1..=32).contains(&job.upstream.len())
        && job
            .upstream
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !upstream_ok {
        return Err(InvalidJob::Upstream(job.upstream.clone()));
    }
    let kind_ok = (1..=64).contains(&job.kind.len())
        && job.kind.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if !kind_ok {
        return Err(InvalidJob::Kind(job.kind.clone()));
    }
    Ok(())
}

/// Encodes a job, refusing records sled would not sync with its log.
pub fn encode(job: &Job) -> Result<Vec<u8>, InvalidJob> {
    let bytes = serde_json::to_vec(job).expect("a job always serialises");
    if bytes.len() > MAX_JOB_BYTES {
        return Err(InvalidJob::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn new_job() -> NewJob {
        NewJob {
            kind: "smaregi.transaction-register".into(),
            upstream: "smaregi".into(),
            key: "order:1234".into(),
            payload: serde_json::json!({"v": 1, "order": "1234"}),
        }
    }

    #[test]
    fn jobs_round_trip_through_their_encoding() {
        let mut job = Job::new(7, &new_job(), 1_000);
        job.record_failure(JobError::new(ErrorClass::Retryable, "timeout", 2_000));
        let decoded: Job = serde_json::from_slice(&encode(&job).unwrap()).unwrap();
        assert_eq!(decoded, job);
    }

    #[test]
    fn history_is_bounded_and_keeps_the_latest() {
        let mut job = Job::new(1, &new_job(), 0);
        for at in 0..25 {
            job.record_failure(JobError::new(ErrorClass::Retryable, "x", at));
        }
        assert_eq!(job.history.len(), MAX_HISTORY);
        assert_eq!(job.history.first().unwrap().at, 15);
        assert_eq!(job.last_error.as_ref().unwrap().at, 24);
    }

    #[test]
    fn oversized_jobs_are_refused() {
        let mut new = new_job();
        new.payload = serde_json::json!({"v": 1, "blob": "x".repeat(MAX_JOB_BYTES)});
        assert!(matches!(
            encode(&Job::new(1, &new, 0)),
            Err(InvalidJob::TooLarge(_))
        ));
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(validate(&new_job()), Ok(()));
        for key in ["", "has space", "nul\0byte", "カート"] {
            let job = NewJob {
                key: key.into(),
                ..new_job()
            };
            assert!(matches!(validate(&job), Err(InvalidJob::Key(_))), "{key:?}");
        }
        let job = NewJob {
            upstream: "Smaregi".into(),
            ..new_job()
        };
        assert!(matches!(validate(&job), Err(InvalidJob::Upstream(_))));
        let job = NewJob {
            kind: "".into(),
            ..new_job()
        };
        assert!(matches!(validate(&job), Err(InvalidJob::Kind(_))));
    }

    #[test]
    fn state_names_match_the_json_record() {
        for state in JobState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!("running".parse::<JobState>().is_err());
    }

    proptest! {
        #[test]
        fn messages_are_cut_to_their_bound(message in "\\PC{0,3000}") {
            let error = JobError::new(ErrorClass::Permanent, &message, 0);
            prop_assert!(error.message.chars().count() <= MAX_MESSAGE_CHARS);
            prop_assert!(message.starts_with(&error.message));
        }
    }
}
