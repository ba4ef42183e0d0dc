//! Mapping versions in sled, and the current one in memory.
//!
//! Layout:
//! - tree `mapping`: `V` + version (u64 BE) → the version's metadata
//!   (JSON); `C` → the current version (u64 BE).
//! - tree `mapping-entries`: version (u64 BE) + chunk number (u32 BE) →
//!   a chunk of entries ([`super::chunk`]). Every version holds all its
//!   entries.
//!
//! A new version's entries are written under its own number, where nothing
//! reads them, and made durable; then its metadata and the `C` pointer are
//! written in one batch and made durable. A version exists only once its
//! metadata does, so a crash at any point leaves the old version current
//! or the new one, never a mix; entries without metadata are left-overs
//! of an interrupted import and are removed when the store opens.
//!
//! This module never decides what a file means ([`super::check`]) and
//! never touches files.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::MappingFallback;
use crate::store::keys::{decode_u64_key, u64_key};
use crate::store::{Store, StoreError, TreeName};

use super::check::{Entries, Format};
use super::chunk::{chunk_key, chunk_version, decode_chunk, ChunkWriter};
use super::pairs::PairTable;
use super::MappingError;

pub const MAPPING: TreeName = TreeName::new("mapping");
pub const MAPPING_ENTRIES: TreeName = TreeName::new("mapping-entries");

const VERSION_TAG: u8 = b'V';
const CURRENT_KEY: &[u8] = b"C";
/// Versions kept for rollback besides the current one; older ones are pruned.
pub const VERSIONS_KEPT: usize = 10;
/// Chunk records removed per sled batch.
const BATCH_REMOVALS: usize = 1_000;

fn version_key(version: u64) -> [u8; 9] {
    let mut key = [VERSION_TAG; 9];
    key[1..].copy_from_slice(&version.to_be_bytes());
    key
}

/// Where a version came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VersionSource {
    /// A file from the drop folder.
    File {
        file_name: String,
        /// Hex SHA-256 of the file's bytes.
        sha256: String,
        /// The file owner's uid and, when known, user name.
        owner_uid: Option<u32>,
        owner_name: Option<String>,
        format: String,
        data_rows: u64,
        /// Entries the file set (after duplicates).
        applied_rows: u64,
        skipped_rows: u64,
        warnings: u64,
    },
}

/// A version's metadata, as kept in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionInfo {
    pub version: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The version that was current when this one was made.
    pub based_on: u64,
    /// Entries in this version.
    pub entries: u64,
    pub source: VersionSource,
}

/// What is being imported: a checked file's pairs, and where they come from.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub format: Format,
    pub pairs: PairTable,
    pub source: VersionSource,
}

/// One version of the mapping, loaded for O(1) look-ups both ways.
#[derive(Debug)]
pub struct MappingVersion {
    version: u64,
    fallback: MappingFallback,
    pairs: PairTable,
    info: Option<VersionInfo>,
}

impl MappingVersion {
    fn empty(fallback: MappingFallback) -> Self {
        Self {
            version: 0,
            fallback,
            pairs: PairTable::default(),
            info: None,
        }
    }

    /// 0 while no mapping was ever imported.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The metadata; `None` for version 0.
    pub fn info(&self) -> Option<&VersionInfo> {
        self.info.as_ref()
    }

    /// Entries listed (not counting the fallback).
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The Smaregi 商品ID of an external code.
    ///
    /// With [`MappingFallback::Identity`], a code not listed that is itself
    /// a valid Smaregi id (1–15 digits) maps to itself, unless that id is
    /// mapped to another code.
    pub fn smaregi_id_for(&self, external_code: &str) -> Option<String> {
        if let Some(id) = self.pairs.id_for(external_code) {
            return Some(id.to_string());
        }
        match self.fallback {
            MappingFallback::None => None,
            MappingFallback::Identity => {
                let id = parse_smaregi_id(external_code)?;
                (!self.pairs.contains_id(id)).then(|| external_code.to_owned())
            }
        }
    }

    /// The external code of a Smaregi 商品ID; with
    /// [`MappingFallback::Identity`], an id not listed maps to itself.
    pub fn external_code_for(&self, smaregi_product_id: &str) -> Option<String> {
        let id = parse_smaregi_id(smaregi_product_id)?;
        match self.pairs.code_for(id) {
            Some(code) => Some(code.to_owned()),
            None => match self.fallback {
                MappingFallback::None => None,
                MappingFallback::Identity => Some(smaregi_product_id.to_owned()),
            },
        }
    }

    /// Every listed pair (external code, Smaregi id).
    pub fn pairs(&self) -> impl Iterator<Item = (&str, u64)> {
        self.pairs
            .entries()
            .iter()
            .map(|entry| (entry.external_code, entry.smaregi_id))
    }
}

/// 1–15 ASCII digits.
fn parse_smaregi_id(text: &str) -> Option<u64> {
    if (1..=15).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

/// The mapping store. Cheap to clone.
#[derive(Clone)]
pub struct MappingStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    meta: sled::Tree,
    entries: sled::Tree,
    fallback: MappingFallback,
    current: RwLock<Arc<MappingVersion>>,
    changed: watch::Sender<u64>,
    /// One import or rollback at a time.
    writer: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for MappingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingStore")
            .field("current", &self.current().version())
            .finish_non_exhaustive()
    }
}

impl MappingStore {
    /// Opens the mapping trees, removes what an interrupted import left and
    /// loads the current version. Blocking (it reads every current entry).
    pub fn open(store: &Store, fallback: MappingFallback) -> Result<Self, MappingError> {
        let meta = store.tree(MAPPING)?;
        let entries = store.tree(MAPPING_ENTRIES)?;
        let current_version = match store.check(meta.get(CURRENT_KEY))? {
            Some(bytes) => decode_u64_key(&bytes)
                .map_err(|e| MappingError::Corrupt(format!("current version: {e}")))?,
            None => 0,
        };
        let mapping = Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                meta,
                entries,
                fallback,
                current: RwLock::new(Arc::new(MappingVersion::empty(fallback))),
                changed: watch::Sender::new(current_version),
                writer: tokio::sync::Mutex::new(()),
            }),
        };
        mapping.remove_unfinished()?;
        let loaded = mapping.load(current_version)?;
        *mapping
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        Ok(mapping)
    }

    /// The current version: a snapshot, unaffected by later imports.
    pub fn current(&self) -> Arc<MappingVersion> {
        Arc::clone(&self.inner.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The current version number; changes on every import and rollback.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Every kept version, oldest first.
    pub fn history(&self) -> Result<Vec<VersionInfo>, MappingError> {
        let store = &self.inner.store;
        let mut history = Vec::new();
        for item in self.inner.meta.scan_prefix([VERSION_TAG]) {
            let (_, value) = store.check(item)?;
            history.push(decode_info(&value)?);
        }
        Ok(history)
    }

    /// Makes `request` the new current version, durably; returns its metadata.
    ///
    /// A full replacement's entries become the mapping; an upsert's entries
    /// replace the entries of their code and of their id in a copy of the
    /// current version.
    pub async fn import(&self, request: ImportRequest) -> Result<VersionInfo, MappingError> {
        let _writer = self.inner.writer.lock().await;
        let this = self.clone();
        let (version, info) = tokio::task::spawn_blocking(move || this.write_version(request))
            .await
            .map_err(|e| MappingError::Internal(e.to_string()))??;
        // The entries first, then the pointer: each durable before the next.
        self.inner.store.commit().await?;
        self.flip(&info)?;
        self.inner.store.commit().await?;
        self.publish(version);
        self.prune_after_import().await;
        Ok(info)
    }

    /// Makes an earlier kept version current again, durably.
    pub async fn rollback(&self, version: u64) -> Result<VersionInfo, MappingError> {
        let _writer = self.inner.writer.lock().await;
        let store = &self.inner.store;
        let info = match store.check(self.inner.meta.get(version_key(version)))? {
            Some(value) => decode_info(&value)?,
            None => return Err(MappingError::NoSuchVersion(version)),
        };
        let this = self.clone();
        let loaded = tokio::task::spawn_blocking(move || this.load(version))
            .await
            .map_err(|e| MappingError::Internal(e.to_string()))??;
        store.check(self.inner.meta.insert(CURRENT_KEY, &u64_key(version)))?;
        store.commit().await?;
        self.publish(loaded);
        Ok(info)
    }

    /// Builds the new version in memory and writes its entries; nothing
    /// reads them until [`Self::flip`].
    fn write_version(
        &self,
        request: ImportRequest,
    ) -> Result<(MappingVersion, VersionInfo), MappingError> {
        let store = &self.inner.store;
        let current = self.current();
        let number = self.next_version_number()?;
        let applied_rows = request.pairs.len() as u64;
        // The file's pairs first, as the check indexed them: an upsert's win
        // over the current pairs of their code and of their id, which are
        // then not kept.
        let mut pairs = request.pairs;
        if request.format == Format::Upsert {
            let kept = &current.pairs;
            pairs.reserve(kept.len());
            for entry in kept.entries().iter() {
                let _replaced_by_the_file = pairs.insert_new(entry.external_code, entry.smaregi_id);
            }
        }
        drop(current);
        let mut version = MappingVersion {
            version: number,
            fallback: self.inner.fallback,
            pairs,
            info: None,
        };
        let mut writer = ChunkWriter::new();
        let mut index = 0u32;
        let mut write = |chunk: Vec<u8>| {
            let key = chunk_key(number, index);
            index += 1;
            store.check(self.inner.entries.insert(key, chunk))
        };
        for entry in version.pairs.entries().iter() {
            if let Some(chunk) = writer.push(entry.external_code, entry.smaregi_id) {
                write(chunk)?;
            }
        }
        if let Some(chunk) = writer.finish() {
            write(chunk)?;
        }
        let mut source = request.source;
        let VersionSource::File {
            applied_rows: applied,
            ..
        } = &mut source;
        *applied = applied_rows;
        let info = VersionInfo {
            version: number,
            created_at: unix_now(),
            based_on: self.current().version(),
            entries: version.pairs.len() as u64,
            source,
        };
        version.info = Some(info.clone());
        Ok((version, info))
    }

    /// Writes a written version's metadata and makes it current, in one batch.
    fn flip(&self, info: &VersionInfo) -> Result<(), MappingError> {
        let value = serde_json::to_vec(info).map_err(|e| MappingError::Internal(e.to_string()))?;
        let mut batch = sled::Batch::default();
        batch.insert(&version_key(info.version), value);
        batch.insert(CURRENT_KEY, &u64_key(info.version));
        self.inner.store.check(self.inner.meta.apply_batch(batch))?;
        Ok(())
    }

    fn publish(&self, version: MappingVersion) {
        let number = version.version;
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(version);
        self.inner.changed.send_replace(number);
    }

    /// One more than any version with metadata or entries.
    fn next_version_number(&self) -> Result<u64, MappingError> {
        let store = &self.inner.store;
        let by_meta = match store.check(
            self.inner
                .meta
                .scan_prefix([VERSION_TAG])
                .next_back()
                .transpose(),
        )? {
            Some((key, _)) => decode_u64_key(&key[1..])
                .map_err(|e| MappingError::Corrupt(format!("version key: {e}")))?,
            None => 0,
        };
        let by_entries = match store.check(self.inner.entries.last())? {
            Some((key, _)) => chunk_version(&key)
                .ok_or_else(|| MappingError::Corrupt("a chunk key is too short".into()))?,
            None => 0,
        };
        Ok(by_meta.max(by_entries) + 1)
    }

    /// The entries of `version`, loaded; the empty version for 0.
    fn load(&self, version: u64) -> Result<MappingVersion, MappingError> {
        let mut loaded = MappingVersion::empty(self.inner.fallback);
        if version == 0 {
            return Ok(loaded);
        }
        let store = &self.inner.store;
        let info = match store.check(self.inner.meta.get(version_key(version)))? {
            Some(value) => decode_info(&value)?,
            None => {
                return Err(MappingError::Corrupt(format!(
                    "current version {version} has no metadata"
                )))
            }
        };
        loaded.version = version;
        let mut entries = Entries::with_capacity(info.entries as usize, 0);
        for item in self.inner.entries.scan_prefix(u64_key(version)) {
            let (_, chunk) = store.check(item)?;
            decode_chunk(&chunk, |code, id| entries.push(id, code))
                .map_err(|e| MappingError::Corrupt(format!("version {version}: {e}")))?;
        }
        // Loading grew the codes by doubling; they stay for the daemon's life.
        entries.shrink_to_fit();
        let pairs = PairTable::index(entries, 0).map_err(|(index, clash)| {
            MappingError::Corrupt(format!(
                "version {version}: pair {index} repeats an earlier pair's {clash}"
            ))
        })?;
        if pairs.len() as u64 != info.entries {
            return Err(MappingError::Corrupt(format!(
                "version {version} should hold {} entries, but holds {}",
                info.entries,
                pairs.len(),
            )));
        }
        loaded.pairs = pairs;
        loaded.info = Some(info);
        Ok(loaded)
    }

    /// The versions that have entries, each once.
    fn versions_with_entries(&self) -> Result<Vec<u64>, MappingError> {
        let store = &self.inner.store;
        let mut versions = Vec::new();
        let mut from = 0u64;
        loop {
            let Some((key, _)) =
                store.check(self.inner.entries.range(u64_key(from)..).next().transpose())?
            else {
                break;
            };
            let version = chunk_version(&key)
                .ok_or_else(|| MappingError::Corrupt("a chunk key is too short".into()))?;
            versions.push(version);
            match version.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(versions)
    }

    /// Removes entries of versions without metadata: an import that did
    /// not finish.
    fn remove_unfinished(&self) -> Result<(), MappingError> {
        let store = &self.inner.store;
        for version in self.versions_with_entries()? {
            if store
                .check(self.inner.meta.get(version_key(version)))?
                .is_none()
            {
                tracing::info!(
                    version,
                    "mapping: removing the entries of an import that did not finish"
                );
                self.remove_entries(version)?;
            }
        }
        Ok(())
    }

    fn remove_entries(&self, version: u64) -> Result<(), MappingError> {
        let store = &self.inner.store;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in self.inner.entries.scan_prefix(u64_key(version)) {
            let (key, _) = store.check(item)?;
            batch.remove(key);
            in_batch += 1;
            if in_batch == BATCH_REMOVALS {
                store.check(self.inner.entries.apply_batch(std::mem::take(&mut batch)))?;
                in_batch = 0;
            }
        }
        store.check(self.inner.entries.apply_batch(batch))?;
        Ok(())
    }

    /// Removes all but the newest [`VERSIONS_KEPT`] versions (never the
    /// current one): metadata first, so a crash leaves entries without
    /// metadata, which the next open removes.
    pub fn prune(&self) -> Result<Vec<u64>, MappingError> {
        let current = self.current().version();
        let history = self.history()?;
        let excess = history.len().saturating_sub(VERSIONS_KEPT);
        let mut pruned = Vec::new();
        for info in history.into_iter().take(excess) {
            if info.version == current {
                continue;
            }
            self.inner
                .store
                .check(self.inner.meta.remove(version_key(info.version)))?;
            self.remove_entries(info.version)?;
            pruned.push(info.version);
        }
        Ok(pruned)
    }

    /// Prunes after an import, still holding the writer lock; the removals
    /// become durable with a commit (sled recovers a prefix of its writes,
    /// so a crash leaves at most entries without metadata, removed on open).
    async fn prune_after_import(&self) {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.prune()).await {
            Ok(Ok(pruned)) if !pruned.is_empty() => {
                if let Err(error) = self.inner.store.commit().await {
                    tracing::warn!(%error, "mapping: committing the pruning failed");
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "mapping: pruning old versions failed"),
            Err(error) => tracing::warn!(%error, "mapping: pruning old versions panicked"),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn decode_info(value: &[u8]) -> Result<VersionInfo, MappingError> {
    serde_json::from_slice(value)
        .map_err(|e| MappingError::Corrupt(format!("version metadata: {e}")))
}

impl From<StoreError> for MappingError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}
