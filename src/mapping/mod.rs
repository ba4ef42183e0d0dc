//! Product mapping: external codes (the EC side's, e.g. NextEngine's) ↔
//! Smaregi 商品IDs, imported from CSV files staff drop into a folder.
//!
//! This module owns the mapping CSV formats and their rules
//! ([`decode`], [`check`], [`report`] — pure, no I/O), the versioned
//! mapping in sled ([`store`], its entries packed by [`chunk`]), the
//! import of one file with its outcome ([`import`]), the drop-folder
//! watcher ([`watch`]), and the look-ups the rest of the relay makes
//! ([`catalog`]).
//!
//! It must never make a file's contents live in part: a file is checked
//! whole, and either becomes the new current version atomically and
//! durably, or changes nothing and is rejected with a report. It must
//! never silently repair a value (trim a code, widen a number): staff are
//! told what to fix instead.

pub mod catalog;
pub mod check;
pub mod chunk;
pub mod decode;
pub mod import;
pub mod pairs;
pub mod report;
pub mod store;
pub mod watch;

pub use catalog::{Catalog, IdentityCatalog};
pub use store::{MappingStore, MappingVersion, VersionInfo};

use std::path::PathBuf;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{0}")]
    Store(StoreError),
    #[error("mapping store is corrupt: {0}")]
    Corrupt(String),
    #[error("mapping version {0} does not exist (or was pruned)")]
    NoSuchVersion(u64),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mapping: internal error: {0}")]
    Internal(String),
}

impl MappingError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Store(e) => e.exit_code(),
            Self::Corrupt(_) => crate::exit::DATA_ERR,
            Self::NoSuchVersion(_) => crate::exit::NO_INPUT,
            Self::Io { .. } => crate::exit::IO_ERROR,
            Self::Internal(_) => crate::exit::SOFTWARE,
        }
    }
}

/// `smaregi-relay mapping check FILE`: prints the report; returns the exit
/// code (0 would import, 1 would reject, 66 unreadable, 78 bad config).
/// Never opens the store.
pub fn check_command(file: &std::path::Path, config: Option<&std::path::Path>) -> u8 {
    let rules = match config {
        None => check::Rules::default(),
        Some(path) => match crate::config::load(path) {
            Ok(loaded) => check::Rules::from_config(&loaded.config.mapping),
            Err(error) => {
                eprintln!("{error}");
                return error.exit_code();
            }
        },
    };
    let checked = match import::check_path(file, &rules) {
        Ok(checked) => checked,
        Err(error) => {
            eprintln!("cannot read {}: {error}", file.display());
            return crate::exit::NO_INPUT;
        }
    };
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let context = report::ReportContext {
        file_name: &name,
        imported_version: None,
    };
    print!("{}", report::render(&checked, &context, &rules));
    if checked.accepted() {
        crate::exit::OK
    } else {
        REJECTED
    }
}

/// `mapping check`'s exit code for a file that would be rejected.
pub const REJECTED: u8 = 1;
