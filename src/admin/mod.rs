//! The operator surface over HTTP: `/metrics`, `/healthz`, `/readyz` and
//! the staff status page, and the monitor that turns the daemon's facts
//! into problems, log lines and the `STATUS=` line.
//!
//! This module owns gathering the [`Snapshot`] from the components
//! ([`Observed`]), the recent-events [`Journal`], the admin listener
//! ([`server`]), the page ([`page`]) and the metrics text ([`metrics`]),
//! and the [`monitor`] task. What is a problem is decided in
//! [`crate::health`]; the components keep their own figures. It never
//! changes anything: the operator's actions go through the control socket.

pub mod metrics;
pub mod monitor;
pub mod page;
pub mod server;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::health::{ImportFacts, ParkedJob, PausedUpstream, Snapshot, Thresholds};
use crate::intake::cert::CertificateResolver;
use crate::intake::server::IntakeStats;
use crate::mapping::import::{LastImport, Outcome};
use crate::mapping::MappingStore;
use crate::outbox::engine::{Engine, EngineError};
use crate::outbox::job::JobState;
use crate::outbox::queue::ListFilter;
use crate::outbox::retry::unix_millis;
use crate::store::Store;

/// Lines of a rejected file's report shown on the page.
const REPORT_EXCERPT_LINES: usize = 12;

/// What the admin surface reads, from every component.
pub struct Observed {
    pub engine: Engine,
    pub store: Store,
    pub mapping: MappingStore,
    pub intake: Arc<IntakeStats>,
    pub certificate: Arc<CertificateResolver>,
    pub last_import: watch::Receiver<Option<LastImport>>,
    pub started: Instant,
    /// Where the listener listens (the `STATUS=` line's first part).
    pub listening: String,
    pub thresholds: Thresholds,
    pub journal: Journal,
}

impl Observed {
    /// The facts, now. A few sled reads; never a scan of the backlog.
    pub fn snapshot(&self) -> Result<Snapshot, EngineError> {
        let now = unix_millis(SystemTime::now());
        let status = self.engine.status()?;
        let parked_jobs = self
            .engine
            .queue()
            .list(&ListFilter {
                state: Some(JobState::Parked),
                limit: crate::health::PARKED_LISTED,
                ..ListFilter::default()
            })?
            .into_iter()
            .map(|job| ParkedJob {
                id: job.id,
                reason: job
                    .last_error
                    .as_ref()
                    .map_or_else(String::new, |e| e.message.clone()),
                at: job.last_error.as_ref().map_or(job.created_at, |e| e.at),
                kind: job.kind,
                key: job.key,
            })
            .collect();
        let mut paused: Vec<PausedUpstream> = status
            .paused
            .iter()
            .map(|(upstream, pause)| PausedUpstream {
                upstream: upstream.clone(),
                reason: pause.reason.clone(),
                // A credential failure pauses until a probe; an operator, until resumed.
                by_operator: pause.until.is_none(),
            })
            .collect();
        paused.sort_by(|a, b| a.upstream.cmp(&b.upstream));
        let mapping = self.mapping.current();
        Ok(Snapshot {
            now,
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            listening: self.listening.clone(),
            certificate_fingerprint: self.certificate.fingerprint(),
            certificate_not_after: self.certificate.not_after(),
            last_notification_at: self.intake.last_stored_at(),
            pending: status.total(JobState::Pending),
            parked: status.total(JobState::Parked),
            outbox_counts: status
                .counts
                .iter()
                .map(|((state, kind), n)| (state.as_str().to_owned(), kind.clone(), *n))
                .collect(),
            oldest_pending: status.oldest_pending.map(|o| {
                let age = now.saturating_sub(o.created_at) / 1000;
                (o.id, o.kind, age)
            }),
            parked_jobs,
            blocked_keys: status.blocked_keys,
            paused,
            mapping_version: mapping.version(),
            mapping_entries: mapping.info().map_or(0, |info| info.entries),
            last_import: self.last_import.borrow().as_ref().and_then(import_facts),
            store_bytes: self.store.size_on_disk().unwrap_or(0),
            disk: disk_space(self.store.directory()),
        })
    }
}

fn import_facts(last: &LastImport) -> Option<ImportFacts> {
    let file = |path: &Path| {
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    };
    match &last.outcome {
        Outcome::Imported { version, path } => Some(ImportFacts::Imported {
            file: file(path),
            version: *version,
            at: last.at,
        }),
        Outcome::Rejected { path, errors } => {
            let report = last.report_path()?;
            let excerpt = std::fs::read_to_string(&report)
                .map(|text| {
                    text.lines()
                        .take(REPORT_EXCERPT_LINES)
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            Some(ImportFacts::Rejected {
                file: file(path),
                errors: *errors,
                at: last.at,
                report,
                excerpt,
            })
        }
        Outcome::Gone => None,
    }
}

/// `(free, total)` bytes of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a valid C string and a buffer of the right type.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    // The fields are 32 bits wide on armhf.
    #[allow(clippy::unnecessary_cast)]
    let block = stat.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    Some((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}

/// One thing that happened, for the page's "recent events".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    /// Unix milliseconds.
    pub at: u64,
    /// `info`, `warning` or `critical`.
    pub level: &'static str,
    pub japanese: String,
    pub english: String,
}

/// The latest events, newest last; bounded.
#[derive(Debug, Default)]
pub struct Journal {
    entries: Mutex<VecDeque<JournalEntry>>,
}

impl Journal {
    pub const CAPACITY: usize = 50;

    pub fn record(&self, level: &'static str, japanese: String, english: String) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == Self::CAPACITY {
            entries.pop_front();
        }
        entries.push_back(JournalEntry {
            at: unix_millis(SystemTime::now()),
            level,
            japanese,
            english,
        });
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<JournalEntry> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_keeps_the_latest_entries_newest_first() {
        let journal = Journal::default();
        for i in 0..Journal::CAPACITY + 5 {
            journal.record("info", format!("{i}"), format!("{i}"));
        }
        let recent = journal.recent();
        assert_eq!(recent.len(), Journal::CAPACITY);
        assert_eq!(recent[0].english, format!("{}", Journal::CAPACITY + 4));
        assert_eq!(recent.last().unwrap().english, "5");
    }

    #[test]
    fn disk_space_reads_the_filesystem() {
        let (free, total) = disk_space(Path::new("/")).unwrap();
        assert!(total > 0 && free <= total);
        assert_eq!(disk_space(Path::new("/no/such/dir")), None);
    }
}
