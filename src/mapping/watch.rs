//! The drop-folder watcher: notices files, waits until each is complete,
//! and hands it to the [`Importer`], one at a time.
//!
//! A name becomes a candidate on an inotify close-after-write or
//! rename-into-folder event (with `watch = "poll"`, on any change a
//! polling watcher sees), and on a rescan of the whole folder: at
//! start-up, after the event queue overflowed or the watcher failed, and
//! every `rescan-interval-seconds`. A candidate is taken only when its
//! size and mtime stayed unchanged for `settle-milliseconds`. Folders,
//! symbolic links and other non-files are taken at once, to be rejected
//! with a report.
//!
//! This module never reads a file's contents and never decides an
//! outcome: that is the importer's.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::watchdog::Heartbeat;
use tracing::{error, info, warn};

use crate::config::{MappingConfig, MappingWatch};

use super::import::{is_ignored_name, Importer};
use super::MappingError;

/// How the folder is watched.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub mode: MappingWatch,
    pub poll_interval: Duration,
    pub rescan_interval: Duration,
    pub settle: Duration,
}

impl WatchOptions {
    pub fn from_config(config: &MappingConfig) -> Self {
        Self {
            mode: config.watch,
            poll_interval: Duration::from_secs(config.poll_interval_seconds),
            rescan_interval: Duration::from_secs(config.rescan_interval_seconds),
            settle: Duration::from_millis(config.settle_milliseconds),
        }
    }
}

/// What the watcher thread tells the loop.
#[derive(Debug)]
enum Signal {
    Name(OsString),
    Rescan,
}

/// A candidate's last seen size and mtime, and since when they held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime: (i64, i64),
}

/// Watches the drop folder until `shutdown`; every outcome is logged.
///
/// The folders are created before this returns (so they exist once the
/// daemon reports ready); if that fails (a mount not there yet), the
/// returned task keeps trying.
///
/// `heartbeat` beats while the loop turns (the systemd watchdog is fed
/// only while it does).
pub fn run(
    importer: Importer,
    options: WatchOptions,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let created = importer.folders().create();
    async move {
        if let Err(e) = created {
            if !create_folders(&importer, &options, &shutdown, e).await {
                return;
            }
        }
        watch(importer, options, heartbeat, shutdown).await
    }
}

/// Retries creating the folders; false if told to stop first.
async fn create_folders(
    importer: &Importer,
    options: &WatchOptions,
    shutdown: &CancellationToken,
    mut error: MappingError,
) -> bool {
    loop {
        error!(error = %error, "mapping: cannot create the drop folders; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(options.rescan_interval) => {}
        }
        match importer.folders().create() {
            Ok(()) => return true,
            Err(e) => error = e,
        }
    }
}

async fn watch(
    importer: Importer,
    options: WatchOptions,
    heartbeat: Heartbeat,
    shutdown: CancellationToken,
) {
    let folders = importer.folders().clone();
    importer.restore_last();
    match importer.recover().await {
        Ok(outcomes) => outcomes.iter().for_each(|o| importer.record(o)),
        Err(e) => error!(error = %e, "mapping: processing interrupted files failed"),
    }

    let (signals, mut received) = mpsc::unbounded_channel();
    let _watcher = start_watcher(&folders.drop, &options, signals.clone());
    info!(folder = %folders.drop.display(), mode = ?options.mode, "mapping: watching the drop folder");

    let mut pending: HashMap<OsString, (Seen, Instant)> = HashMap::new();
    rescan(&folders.drop, &mut pending);
    let mut rescan_timer = tokio::time::interval(options.rescan_interval);
    rescan_timer.reset();
    let tick = (options.settle / 4).max(Duration::from_millis(50));
    let mut settle_timer = tokio::time::interval(tick);
    loop {
        heartbeat.beat();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = heartbeat.tick() => {}
            signal = received.recv() => match signal {
                Some(Signal::Name(name)) => add(&folders.drop, name, &mut pending),
                Some(Signal::Rescan) | None => rescan(&folders.drop, &mut pending),
            },
            _ = rescan_timer.tick() => rescan(&folders.drop, &mut pending),
            _ = settle_timer.tick(), if !pending.is_empty() => {
                for (name, settled) in ready(&folders.drop, &mut pending, options.settle) {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    // The files before it may have taken long to import: one
                    // written to meanwhile (a copy over it) settles again.
                    if let Some(changed) = changed_since(&folders.drop.join(&name), settled) {
                        pending.insert(name, (changed, Instant::now()));
                        continue;
                    }
                    match importer.take(&name).await {
                        Ok(outcome) => importer.record(&outcome),
                        Err(e @ MappingError::Store(_)) => {
                            // The daemon stops on a failed store.
                            error!(error = %e, "mapping: import failed on the store");
                            return;
                        }
                        Err(e) => warn!(error = %e, file = %name.to_string_lossy(), "mapping: cannot take the file; the next rescan tries again"),
                    }
                }
            }
        }
    }
}

/// Starts the event or polling watcher; on failure, logs and relies on rescans
/// (and, for events, falls back to polling).
fn start_watcher(
    drop: &Path,
    options: &WatchOptions,
    signals: mpsc::UnboundedSender<Signal>,
) -> Option<Box<dyn Watcher + Send>> {
    let from_events = {
        let signals = signals.clone();
        let drop = drop.to_path_buf();
        move |result: notify::Result<notify::Event>| {
            let event = match result {
                Ok(event) => event,
                Err(_) => {
                    let _ = signals.send(Signal::Rescan);
                    return;
                }
            };
            if event.need_rescan() {
                let _ = signals.send(Signal::Rescan);
                return;
            }
            let wanted = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => true,
                // Folders and links are never closed after writing.
                EventKind::Create(CreateKind::Folder) => true,
                EventKind::Create(_) => event
                    .paths
                    .iter()
                    .any(|p| p.symlink_metadata().is_ok_and(|m| !m.is_file())),
                _ => false,
            };
            if !wanted {
                return;
            }
            for path in &event.paths {
                if path.parent() == Some(drop.as_path()) {
                    if let Some(name) = path.file_name() {
                        let _ = signals.send(Signal::Name(name.to_owned()));
                    }
                }
            }
        }
    };
    let from_polls = {
        let signals = signals.clone();
        let drop = drop.to_path_buf();
        move |result: notify::Result<notify::Event>| match result {
            Ok(event) if !event.need_rescan() => {
                for path in &event.paths {
                    if path.parent() == Some(drop.as_path()) {
                        if let Some(name) = path.file_name() {
                            let _ = signals.send(Signal::Name(name.to_owned()));
                        }
                    }
                }
            }
            _ => {
                let _ = signals.send(Signal::Rescan);
            }
        }
    };
    let poll = |handler| -> notify::Result<Box<dyn Watcher + Send>> {
        let config = notify::Config::default().with_poll_interval(options.poll_interval);
        let mut watcher = notify::PollWatcher::new(handler, config)?;
        watcher.watch(drop, notify::RecursiveMode::NonRecursive)?;
        Ok(Box::new(watcher))
    };
    let watcher = match options.mode {
        MappingWatch::Poll => poll(from_polls),
        MappingWatch::Events => {
            let events = notify::recommended_watcher(from_events).and_then(|mut watcher| {
                watcher.watch(drop, notify::RecursiveMode::NonRecursive)?;
                Ok(Box::new(watcher) as Box<dyn Watcher + Send>)
            });
            match events {
                Ok(watcher) => Ok(watcher),
                Err(e) => {
                    warn!(error = %e, "mapping: cannot watch the drop folder for events; polling it instead");
                    poll(from_polls)
                }
            }
        }
    };
    match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            error!(error = %e, "mapping: cannot watch the drop folder; only periodic rescans will find files");
            None
        }
    }
}

fn seen(metadata: &fs::Metadata) -> Seen {
    Seen {
        size: metadata.len(),
        mtime: (metadata.mtime(), metadata.mtime_nsec()),
    }
}

/// Adds a name as a candidate (again: its settle time starts over).
fn add(drop: &Path, name: OsString, pending: &mut HashMap<OsString, (Seen, Instant)>) {
    if is_ignored_name(&name) {
        return;
    }
    if let Ok(metadata) = drop.join(&name).symlink_metadata() {
        pending.insert(name, (seen(&metadata), Instant::now()));
    }
}

/// Every name in the folder becomes a candidate, unless it already is.
fn rescan(drop: &Path, pending: &mut HashMap<OsString, (Seen, Instant)>) {
    let entries = match fs::read_dir(drop) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(error = %e, folder = %drop.display(), "mapping: cannot list the drop folder");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !pending.contains_key(&name) {
            add(drop, name, pending);
        }
    }
}

/// The candidates to take now, in name order: non-files at once, files
/// once unchanged for `settle`. Candidates that are gone are dropped.
fn ready(
    drop: &Path,
    pending: &mut HashMap<OsString, (Seen, Instant)>,
    settle: Duration,
) -> Vec<(OsString, Option<Seen>)> {
    let mut ready = Vec::new();
    pending.retain(|name, (last, since)| {
        let Ok(metadata) = drop.join(name).symlink_metadata() else {
            return false;
        };
        if !metadata.is_file() {
            ready.push((name.clone(), None));
            return false;
        }
        let now = seen(&metadata);
        if now != *last {
            *last = now;
            *since = Instant::now();
            return true;
        }
        if since.elapsed() >= settle {
            ready.push((name.clone(), Some(now)));
            return false;
        }
        true
    });
    ready.sort_by(|a, b| a.0.cmp(&b.0));
    ready
}

/// What a file that settled as `settled` looks like now, if it changed
/// since; `None` if it did not (or is no file, or is gone: taking it
/// reports that).
fn changed_since(path: &Path, settled: Option<Seen>) -> Option<Seen> {
    let metadata = path.symlink_metadata().ok().filter(fs::Metadata::is_file)?;
    let now = seen(&metadata);
    (Some(now) != settled).then_some(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_file_written_to_since_is_not_taken_yet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.csv");
        fs::write(&path, "smaregi-id,external-code\n101,A-1\n").unwrap();
        let settled = Some(seen(&path.symlink_metadata().unwrap()));
        assert_eq!(changed_since(&path, settled), None, "unchanged: taken");
        // Copied over again: truncated, then written anew.
        fs::write(&path, "smaregi-id,external-code\n").unwrap();
        let now = changed_since(&path, settled).expect("changed: settles again");
        assert_eq!(now.size, 25);
        let gone = dir.path().join("gone.csv");
        assert_eq!(changed_since(&gone, settled), None, "taking it reports it");
    }
}
