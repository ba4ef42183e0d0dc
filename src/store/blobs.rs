//! Makes sled's blob files durable, which sled itself never does.
//!
//! sled 0.34 writes any log fragment larger than a quarter of a segment
//! (128 KiB with the default 512 KiB segments) to its own file under
//! `blobs/`, with a plain `write` and no sync, and its flush syncs only the
//! main data file. The threshold applies to whole tree nodes, not single
//! values: a leaf holds up to about 17 entries and is rewritten in one piece
//! when sled consolidates it, so a tree of values of a few KiB each already
//! produces blobs. Without this module, a commit that reported success
//! could lose those nodes to a power cut.
//!
//! [`BlobSyncer::sync_new`] runs at the start of every commit round, before
//! sled's flush: it lists `blobs/`, `fdatasync`s every file it has not yet
//! synced at its current length, and then syncs the directory. So a commit
//! reports success only once the blobs of every write made before it, and
//! their names, are on disk.
//!
//! What it cannot close: sled may write the log records that point to a
//! blob before the next commit (every transaction writes the log out). A
//! power cut in that window can leave a record pointing to a blob that never
//! reached the disk, which sled reports as corruption when it reads that
//! node. Only sled syncing its blobs before logging them would close it;
//! keeping values small keeps blobs, and so the window, rare.
//!
//! It must never skip a file whose length changed since it was synced: a
//! blob being written while the directory is listed is seen half-written,
//! and must be synced again once complete. It never writes or removes files
//! (sled removes blobs it no longer needs).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// sled 0.34 keeps its blob files in this directory inside the database.
pub(crate) const BLOB_DIRECTORY: &str = "blobs";

pub(crate) struct BlobSyncer {
    directory: PathBuf,
    /// Each file synced so far, with the length it had then.
    synced: HashMap<OsString, u64>,
}

impl BlobSyncer {
    pub(crate) fn new(database: &Path) -> Self {
        Self {
            directory: database.join(BLOB_DIRECTORY),
            synced: HashMap::new(),
        }
    }

    /// Syncs every blob file that is new or has grown since it was last
    /// synced, then the directory if any was. Returns how many files it
    /// synced.
    pub(crate) fn sync_new(&mut self) -> io::Result<usize> {
        let listing = match std::fs::read_dir(&self.directory) {
            Ok(listing) => listing,
            // sled creates the directory lazily: no directory, no blobs.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                self.synced.clear();
                return Ok(0);
            }
            Err(error) => return Err(error),
        };
        let mut present = HashMap::with_capacity(self.synced.len());
        let mut newly_synced = 0;
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name();
            let length = match entry.metadata() {
                Ok(metadata) => metadata.len(),
                // Removed by sled's garbage collection since the listing.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            if self.synced.get(&name) != Some(&length) {
                match File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
                newly_synced += 1;
            }
            present.insert(name, length);
        }
        // Forgets files sled removed, so the map stays as small as the directory.
        self.synced = present;
        if newly_synced > 0 {
            File::open(&self.directory)?.sync_all()?;
        }
        Ok(newly_synced)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    #[test]
    fn no_directory_means_nothing_to_sync() {
        let temp = tempfile::tempdir().unwrap();
        let mut syncer = BlobSyncer::new(temp.path());
        assert_eq!(syncer.sync_new().unwrap(), 0);
    }

    #[test]
    fn syncs_new_and_grown_files_once_and_forgets_removed_ones() {
        let temp = tempfile::tempdir().unwrap();
        let blobs = temp.path().join(BLOB_DIRECTORY);
        std::fs::create_dir(&blobs).unwrap();
        let mut syncer = BlobSyncer::new(temp.path());

        write(&blobs.join("17"), b"crc");
        write(&blobs.join("42"), b"whole blob");
        assert_eq!(syncer.sync_new().unwrap(), 2);
        assert_eq!(syncer.sync_new().unwrap(), 0, "nothing changed");

        // "17" was listed half-written: once it grows it is synced again.
        write(&blobs.join("17"), b" and the rest");
        write(&blobs.join("99"), b"another");
        assert_eq!(syncer.sync_new().unwrap(), 2);

        std::fs::remove_file(blobs.join("42")).unwrap();
        assert_eq!(syncer.sync_new().unwrap(), 0);
        assert_eq!(syncer.synced.len(), 2, "the removed file is forgotten");
    }
}
