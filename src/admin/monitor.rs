//! The monitor: re-assesses the daemon's health when something happens
//! (an attempt settles, a mapping file is taken) and at least every
//! [`INTERVAL`], and reports each change once: a WARN or ERROR log line
//! with the problem's stable event name when it is raised, an INFO line
//! when it is resolved, an entry in the journal, the `STATUS=` line, and
//! the current problems on a watch channel (the alerts' notifier reads
//! it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Observed;
use crate::alerts::Alert;
use crate::health::{self, Light, Problem, Severity};
use crate::outbox::engine::Settled;
use crate::smaregi::jobs::{CANCEL_KIND, REGISTER_KIND};

/// The longest between two assessments.
pub const INTERVAL: Duration = Duration::from_secs(15);
/// The shortest: a burst of events costs one assessment.
const MIN_GAP: Duration = Duration::from_millis(500);

/// Assesses until `shutdown`; `status` hears each new light and problem
/// list (for `STATUS=`), `alerts` holds the current problems.
pub async fn run(
    observed: Arc<Observed>,
    alerts: watch::Sender<Vec<Alert>>,
    status: impl Fn(Light, &[Problem]) + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut settled = observed.engine.settled();
    let mut imports = observed.last_import.clone();
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut light = None;
    loop {
        match observed.snapshot() {
            Ok(snapshot) => {
                let current = health::assess(&snapshot, &observed.thresholds);
                report_changes(&observed, &mut known, &current, snapshot.now);
                let now = Light::of(&current);
                if light != Some(now) || alerts.borrow().len() != current.len() {
                    status(now, &current);
                    light = Some(now);
                }
                alerts.send_replace(
                    current
                        .iter()
                        .map(|p| Alert::from_problem(p, known[&p.key].since))
                        .collect(),
                );
            }
            Err(e) => warn!(error = %e, "monitor: cannot read the outbox"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
            event = settled.recv() => {
                if let Ok(event) = event {
                    journal_settled(&observed, event);
                }
            }
            changed = imports.changed() => {
                if changed.is_ok() {
                    journal_import(&observed, &imports);
                }
            }
        }
        // Whatever else arrived meanwhile rides on this assessment.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MIN_GAP) => {}
        }
        loop {
            match settled.try_recv() {
                Ok(event) => journal_settled(&observed, event),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    }
}

/// A problem being reported, and since when.
struct Known {
    problem: Problem,
    /// Unix milliseconds.
    since: u64,
}

/// Logs and journals what was raised and resolved since the last round.
fn report_changes(
    observed: &Observed,
    known: &mut HashMap<String, Known>,
    current: &[Problem],
    now: u64,
) {
    for problem in current {
        if known.contains_key(&problem.key) {
            continue;
        }
        match problem.severity {
            Severity::Critical => {
                error!(event = problem.event, alert = "raised", key = %problem.key, "{}", problem.english)
            }
            Severity::Warning => {
                warn!(event = problem.event, alert = "raised", key = %problem.key, "{}", problem.english)
            }
        }
        let level = match problem.severity {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        };
        observed
            .journal
            .record(level, problem.japanese.clone(), problem.english.clone());
        known.insert(
            problem.key.clone(),
            Known {
                problem: problem.clone(),
                since: now,
            },
        );
    }
    let resolved: Vec<String> = known
        .keys()
        .filter(|key| !current.iter().any(|p| &p.key == *key))
        .cloned()
        .collect();
    for key in resolved {
        let problem = known.remove(&key).expect("listed above").problem;
        info!(event = problem.event, alert = "resolved", key = %problem.key, "{}", problem.english);
        observed.journal.record(
            "info",
            format!("解決しました: {}", problem.japanese),
            format!("Resolved: {}", problem.english),
        );
    }
}

/// Registered and cancelled sales are what staff look for; stock pushes
/// are too many to list one by one.
fn journal_settled(observed: &Observed, event: Settled) {
    let Settled::Done(id) = event else {
        return;
    };
    let Ok(Some(job)) = observed.engine.queue().job(id) else {
        return;
    };
    let (japanese, english) = match job.kind.as_str() {
        REGISTER_KIND => (
            format!("スマレジに取引を登録しました（{}）", job.key),
            format!("Registered the sale in Smaregi ({})", job.key),
        ),
        CANCEL_KIND => (
            format!("スマレジの取引を取り消しました（{}）", job.key),
            format!("Cancelled the sale in Smaregi ({})", job.key),
        ),
        _ => return,
    };
    observed.journal.record("info", japanese, english);
}

fn journal_import(
    observed: &Observed,
    imports: &watch::Receiver<Option<crate::mapping::import::LastImport>>,
) {
    use crate::mapping::import::Outcome;
    let Some(last) = imports.borrow().clone() else {
        return;
    };
    if let Outcome::Imported { version, path } = &last.outcome {
        let file = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        observed.journal.record(
            "info",
            format!("商品マッピングCSV「{file}」を取り込みました（バージョン {version}）"),
            format!("Imported the product mapping CSV \"{file}\" (version {version})"),
        );
    }
}
