//! One file from the drop folder, taken and imported or rejected.
//!
//! Folders, all inside the drop folder (so that every move is a rename on
//! one filesystem, and staff find the outcome where they dropped the file):
//! - `.work/`: a file being imported, moved there atomically when taken;
//!   what is there at start-up was interrupted and is processed again;
//! - `processed/`: imported files, renamed `YYYYMMDD-HHMMSS-<name>`, each
//!   with `<that name>.report.txt`;
//! - `rejected/`: rejected files with `<name>.report.txt`.
//!
//! This module owns the file's journey and its report; what the file
//! means is [`super::check`]'s, and the mapping is [`super::store`]'s.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::check::{self, Checked, Format, ProblemKind, Rules};
use super::report::{self, ReportContext};
use super::store::{ImportRequest, MappingStore, VersionSource};
use super::MappingError;

pub const WORK_DIRECTORY: &str = ".work";
pub const PROCESSED_DIRECTORY: &str = "processed";
pub const REJECTED_DIRECTORY: &str = "rejected";
pub const REPORT_SUFFIX: &str = ".report.txt";

/// The drop folder and the folders the import keeps in it.
#[derive(Debug, Clone)]
pub struct Folders {
    pub drop: PathBuf,
    pub work: PathBuf,
    pub processed: PathBuf,
    pub rejected: PathBuf,
}

impl Folders {
    pub fn new(drop: &Path) -> Self {
        Self {
            drop: drop.to_path_buf(),
            work: drop.join(WORK_DIRECTORY),
            processed: drop.join(PROCESSED_DIRECTORY),
            rejected: drop.join(REJECTED_DIRECTORY),
        }
    }

    /// Creates the folders that are missing.
    pub fn create(&self) -> Result<(), MappingError> {
        for dir in [&self.drop, &self.work, &self.processed, &self.rejected] {
            fs::create_dir_all(dir).map_err(|source| MappingError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Whether a name in the drop folder is never taken: our folders, files
/// still being written by their convention (`.part`, `.tmp`,
/// `.crdownload`), Office lock files (`~$…`) and dot-files.
pub fn is_ignored_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        // Not UTF-8: taken, and rejected with a report.
        return false;
    };
    name.starts_with('.')
        || name.starts_with("~$")
        || name.ends_with(".part")
        || name.ends_with(".tmp")
        || name.ends_with(".crdownload")
        || name == PROCESSED_DIRECTORY
        || name == REJECTED_DIRECTORY
}

/// What became of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Imported; it is now this version. The file and its report are in `processed/`.
    Imported { version: u64, path: PathBuf },
    /// Rejected; the file and its report are in `rejected/`.
    Rejected { path: PathBuf, errors: u64 },
    /// Gone before it could be taken.
    Gone,
}

/// The latest file's outcome, for the status page and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastImport {
    /// Unix milliseconds.
    pub at: u64,
    pub outcome: Outcome,
}

impl LastImport {
    /// The report beside a rejected file.
    pub fn report_path(&self) -> Option<PathBuf> {
        match &self.outcome {
            Outcome::Rejected { path, .. } => {
                let mut report = path.clone().into_os_string();
                report.push(REPORT_SUFFIX);
                Some(report.into())
            }
            _ => None,
        }
    }
}

/// Takes files from the drop folder and imports them.
#[derive(Debug, Clone)]
pub struct Importer {
    store: MappingStore,
    rules: Rules,
    folders: Folders,
    last: Arc<watch::Sender<Option<LastImport>>>,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> MappingError + '_ {
    move |source| MappingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Importer {
    pub fn new(store: MappingStore, rules: Rules, folders: Folders) -> Self {
        Self {
            store,
            rules,
            folders,
            last: Arc::new(watch::channel(None).0),
        }
    }

    /// Hears of each file's outcome.
    pub fn last_import(&self) -> watch::Receiver<Option<LastImport>> {
        self.last.subscribe()
    }

    /// Logs a file's outcome and makes it the latest.
    pub fn record(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Imported { version, path } => {
                tracing::info!(version, file = %path.display(), "mapping: new version is current")
            }
            Outcome::Rejected { path, errors } => tracing::warn!(
                event = "mapping.csv_rejected",
                errors,
                file = %path.display(),
                "mapping: file rejected"
            ),
            Outcome::Gone => return,
        }
        self.last.send_replace(Some(LastImport {
            at: crate::outbox::retry::unix_millis(std::time::SystemTime::now()),
            outcome: outcome.clone(),
        }));
    }

    pub fn folders(&self) -> &Folders {
        &self.folders
    }

    /// At start-up: the latest outcome is the newest report in
    /// `processed/` or `rejected/`, so that a rejected file still shows
    /// after a restart. Unreadable folders or reports are skipped.
    pub fn restore_last(&self) {
        let newest = [
            (&self.folders.processed, false),
            (&self.folders.rejected, true),
        ]
        .into_iter()
        .filter_map(|(folder, rejected)| Some((fs::read_dir(folder).ok()?, rejected)))
        .flat_map(|(entries, rejected)| {
            entries.filter_map(move |entry| {
                let entry = entry.ok()?;
                let name = entry.file_name();
                name.to_str()?.strip_suffix(REPORT_SUFFIX)?;
                let modified = entry.metadata().ok()?.modified().ok()?;
                Some((modified, entry.path(), rejected))
            })
        })
        .max_by_key(|(modified, _, _)| *modified);
        let Some((modified, report, rejected)) = newest else {
            return;
        };
        let Ok(text) = fs::read_to_string(&report) else {
            return;
        };
        let file = report
            .to_str()
            .and_then(|r| r.strip_suffix(REPORT_SUFFIX))
            .map(PathBuf::from)
            .unwrap_or_else(|| report.clone());
        if let Some(outcome) = outcome_of_report(&text, file, rejected) {
            self.last.send_replace(Some(LastImport {
                at: crate::outbox::retry::unix_millis(modified),
                outcome,
            }));
        }
    }

    /// Processes again what an interrupted run left in `.work/`.
    pub async fn recover(&self) -> Result<Vec<Outcome>, MappingError> {
        let mut outcomes = Vec::new();
        let mut names: Vec<_> = fs::read_dir(&self.folders.work)
            .map_err(io_error(&self.folders.work))?
            .filter_map(|entry| entry.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for taken in names {
            let original = original_name(&taken);
            tracing::info!(file = %original, "mapping: processing a file an interrupted run had taken");
            let path = self.folders.work.join(&taken);
            outcomes.push(self.process_taken(&path, &original).await?);
        }
        Ok(outcomes)
    }

    /// Takes `name` from the drop folder (an atomic rename into `.work/`)
    /// and imports or rejects it.
    pub async fn take(&self, name: &OsStr) -> Result<Outcome, MappingError> {
        // Staff may have deleted our folders (on a share, while tidying
        // up): without them a file would stay in `.work/` unreported, or
        // never leave the drop folder.
        self.folders.create()?;
        let source = self.folders.drop.join(name);
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let mut taken_name = std::ffi::OsString::from(format!(
            "{:020}-{:04}-",
            super::store::unix_now(),
            sequence % 10_000
        ));
        taken_name.push(name);
        let taken = self.folders.work.join(&taken_name);
        match fs::rename(&source, &taken) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Gone),
            Err(e) => return Err(io_error(&source)(e)),
        }
        let original = name.to_string_lossy().into_owned();
        self.process_taken(&taken, &original).await
    }

    /// Imports or rejects a file already in `.work/`.
    async fn process_taken(&self, taken: &Path, original: &str) -> Result<Outcome, MappingError> {
        let rules = self.rules.clone();
        let path = taken.to_path_buf();
        let (read, mut checked) =
            tokio::task::spawn_blocking(move || match read_limited(&path, &rules) {
                Ok(file) => {
                    let (checked, sha256) = check::check_beside(file.bytes, &rules, sha256_hex);
                    (Some((sha256, file.owner_uid)), checked)
                }
                Err(kind) => (None, Checked::file_problem(kind)),
            })
            .await
            .map_err(|e| MappingError::Internal(e.to_string()))?;

        let Some((sha256, owner_uid)) = read.filter(|_| checked.accepted()) else {
            return self.reject(taken, original, &checked);
        };
        let format = checked.format.expect("an accepted file has a format");
        let current = self.store.current();
        let already = current.info().is_some_and(|info| {
            matches!(&info.source, VersionSource::File { sha256: s, file_name, .. } if *s == sha256 && file_name == original)
        }) && format == Format::FullReplacement;
        let version = if already {
            // Imported before an interruption; moving the file was left undone.
            current.version()
        } else {
            let source = VersionSource::File {
                file_name: original.to_owned(),
                sha256,
                owner_uid: Some(owner_uid),
                owner_name: user_name(owner_uid),
                format: format.name().to_owned(),
                data_rows: checked.data_rows,
                applied_rows: 0,
                skipped_rows: checked.skipped_rows,
                warnings: checked.warning_count(),
            };
            let request = ImportRequest {
                format,
                // The report needs no pairs: no copy of a million of them.
                pairs: std::mem::take(&mut checked.pairs),
                source,
            };
            self.store.import(request).await?.version
        };
        drop(current);
        let name = free_name(&self.folders.processed, &format!("{}-{original}", stamp()));
        let destination = self.folders.processed.join(&name);
        fs::rename(taken, &destination).map_err(io_error(&destination))?;
        let text = report::render(
            &checked,
            &ReportContext {
                file_name: original,
                imported_version: Some(version),
            },
            &self.rules,
        );
        write_report(
            &self
                .folders
                .processed
                .join(format!("{name}{REPORT_SUFFIX}")),
            &text,
        )?;
        tracing::info!(file = %original, version, rows = checked.data_rows, warnings = checked.warning_count(), "mapping: imported");
        Ok(Outcome::Imported {
            version,
            path: destination,
        })
    }

    fn reject(
        &self,
        taken: &Path,
        original: &str,
        checked: &Checked,
    ) -> Result<Outcome, MappingError> {
        let name = if self
            .folders
            .rejected
            .join(original)
            .symlink_metadata()
            .is_ok()
        {
            free_name(&self.folders.rejected, &format!("{}-{original}", stamp()))
        } else {
            original.to_owned()
        };
        let destination = self.folders.rejected.join(&name);
        fs::rename(taken, &destination).map_err(io_error(&destination))?;
        let text = report::render(
            checked,
            &ReportContext {
                file_name: original,
                imported_version: None,
            },
            &self.rules,
        );
        write_report(
            &self.folders.rejected.join(format!("{name}{REPORT_SUFFIX}")),
            &text,
        )?;
        tracing::warn!(file = %original, errors = checked.error_count(), "mapping: file rejected; report in rejected/");
        Ok(Outcome::Rejected {
            path: destination,
            errors: checked.error_count(),
        })
    }
}

/// The name a file had in the drop folder, from its name in `.work/`.
fn original_name(taken: &OsStr) -> String {
    let taken = taken.to_string_lossy();
    // `<20 digits>-<4 digits>-<name>`
    match taken.get(26..) {
        Some(name) if taken.as_bytes().get(25) == Some(&b'-') => name.to_owned(),
        _ => taken.into_owned(),
    }
}

/// A name not yet used in `dir`: `name`, else `name` with a counter.
fn free_name(dir: &Path, name: &str) -> String {
    if dir.join(name).symlink_metadata().is_err() {
        return name.to_owned();
    }
    (2..)
        .map(|n| format!("{n}-{name}"))
        .find(|candidate| dir.join(candidate).symlink_metadata().is_err())
        .expect("some counter is free")
}

/// `YYYYMMDD-HHMMSS` in Japan time.
fn stamp() -> String {
    let text = crate::smaregi::jst::format(crate::smaregi::jst::now());
    text.replace(['-', ':'], "").replace(' ', "-")
}

/// What a report says became of its file. Pure.
fn outcome_of_report(text: &str, file: PathBuf, rejected: bool) -> Option<Outcome> {
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &text[text.find(marker)? + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    if rejected {
        Some(Outcome::Rejected {
            path: file,
            errors: number_after("Errors: ").unwrap_or(0),
        })
    } else {
        Some(Outcome::Imported {
            version: number_after("imported as version ")?,
            path: file,
        })
    }
}

/// Writes a report under a hidden name, then renames it into place: staff
/// opening the folder never see half a report.
fn write_report(path: &Path, text: &str) -> Result<(), MappingError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let partial = path.with_file_name(format!(".{name}.partial"));
    fs::write(&partial, text).map_err(io_error(&partial))?;
    fs::rename(&partial, path).map_err(io_error(path))
}

/// A file's bytes, read only if it is a regular file within the limit.
pub struct ReadFile {
    pub bytes: Vec<u8>,
    pub owner_uid: u32,
}

/// Reads a taken file: a problem for anything that is not a regular,
/// readable file of at most `max-file-bytes` that stayed unchanged while read.
pub fn read_limited(path: &Path, rules: &Rules) -> Result<ReadFile, ProblemKind> {
    let unreadable = |e: io::Error| ProblemKind::Unreadable {
        reason: e.to_string(),
    };
    let link = path.symlink_metadata().map_err(unreadable)?;
    let file_type = link.file_type();
    if file_type.is_symlink() {
        return Err(ProblemKind::NotRegularFile {
            what: "symbolic link",
        });
    }
    if file_type.is_dir() {
        return Err(ProblemKind::NotRegularFile { what: "folder" });
    }
    if !file_type.is_file() {
        return Err(ProblemKind::NotRegularFile {
            what: "special file",
        });
    }
    let mut file = File::open(path).map_err(unreadable)?;
    let before = file.metadata().map_err(unreadable)?;
    if before.len() > rules.max_file_bytes {
        return Err(ProblemKind::TooLarge {
            size: before.len(),
            max: rules.max_file_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(before.len() as usize);
    // One byte past the limit is enough to know the file grew past it.
    (&mut file)
        .take(rules.max_file_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    let after = file.metadata().map_err(unreadable)?;
    if after.len() != before.len()
        || bytes.len() as u64 != before.len()
        || after.mtime() != before.mtime()
        || after.mtime_nsec() != before.mtime_nsec()
    {
        return Err(ProblemKind::ChangedWhileReading);
    }
    Ok(ReadFile {
        bytes,
        owner_uid: before.uid(),
    })
}

/// Checks a file for `mapping check`: the same rules and report, nothing
/// imported. An error when the file cannot be read at all.
pub fn check_path(path: &Path, rules: &Rules) -> io::Result<Checked> {
    let metadata = fs::metadata(path)?;
    if metadata.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory",
        ));
    }
    match read_limited(path, rules) {
        Ok(file) => Ok(check::check(file.bytes, rules)),
        Err(ProblemKind::Unreadable { reason }) => Err(io::Error::other(reason)),
        Err(kind) => Ok(Checked::file_problem(kind)),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The user name of `uid` from `/etc/passwd`, if listed there.
fn user_name(uid: u32) -> Option<String> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        (fields.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_tells_what_became_of_its_file() {
        let imported = "マッピングファイル確認結果 / Mapping file report\n\
            結果 / Result: 取り込みました（バージョン 12）/ imported as version 12\n\
            エラー / Errors: 0   警告 / Warnings: 1\n";
        assert_eq!(
            outcome_of_report(imported, "processed/a.csv".into(), false),
            Some(Outcome::Imported {
                version: 12,
                path: "processed/a.csv".into()
            })
        );
        let rejected =
            "結果 / Result: 取り込みませんでした。/ rejected; the mapping is unchanged\n\
            エラー / Errors: 3   警告 / Warnings: 0\n";
        assert_eq!(
            outcome_of_report(rejected, "rejected/b.csv".into(), true),
            Some(Outcome::Rejected {
                path: "rejected/b.csv".into(),
                errors: 3
            })
        );
        // A processed report that names no version is not guessed at.
        assert_eq!(outcome_of_report("garbage", "x".into(), false), None);
    }
}
