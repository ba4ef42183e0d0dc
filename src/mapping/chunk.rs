//! How a version's entries are stored: packed into chunks of at most
//! [`MAX_CHUNK_BYTES`], keyed by version and chunk number. Pure; no I/O.
//!
//! One sled record per entry made a 1,000,000-entry import cost a million
//! tree inserts (and pruning a million removals); chunks make it about
//! 5,600 values of 4 KiB. Not larger: sled rewrites a leaf of about 17
//! values in one piece, and a piece over 128 KiB becomes a blob file of its
//! own, which costs the commit a file sync and a directory sync each (32 KiB
//! chunks made a 1,000,000-entry import write hundreds of them).
//!
//! A chunk is a run of records: code length (u16 BE), code bytes (UTF-8),
//! Smaregi id (u64 BE).

/// The most bytes a chunk holds.
pub const MAX_CHUNK_BYTES: usize = 4 * 1024;

/// A stored chunk does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping chunk is corrupt at byte {offset}")]
pub struct ChunkError {
    pub offset: usize,
}

/// The key of chunk `index` of `version`: ordered by version, then index.
pub fn chunk_key(version: u64, index: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&version.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The version a chunk key belongs to.
pub fn chunk_version(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

/// Packs entries into chunks, calling `emit` with each full one.
pub struct ChunkWriter {
    chunk: Vec<u8>,
}

impl Default for ChunkWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkWriter {
    pub fn new() -> Self {
        Self {
            chunk: Vec::with_capacity(MAX_CHUNK_BYTES),
        }
    }

    /// Adds an entry; returns the chunk it filled, if it did.
    ///
    /// Codes are validated to at most 255 characters long, far under the
    /// u16 length and a chunk.
    pub fn push(&mut self, code: &str, id: u64) -> Option<Vec<u8>> {
        let record = 2 + code.len() + 8;
        assert!(code.len() <= usize::from(u16::MAX) && record <= MAX_CHUNK_BYTES);
        let full = (self.chunk.len() + record > MAX_CHUNK_BYTES)
            .then(|| std::mem::replace(&mut self.chunk, Vec::with_capacity(MAX_CHUNK_BYTES)));
        self.chunk
            .extend_from_slice(&(code.len() as u16).to_be_bytes());
        self.chunk.extend_from_slice(code.as_bytes());
        self.chunk.extend_from_slice(&id.to_be_bytes());
        full
    }

    /// The last chunk, if it holds anything.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.chunk.is_empty()).then_some(self.chunk)
    }
}

/// Calls `entry` with each (code, id) of a chunk.
pub fn decode_chunk(chunk: &[u8], mut entry: impl FnMut(&str, u64)) -> Result<(), ChunkError> {
    let mut offset = 0;
    while offset < chunk.len() {
        let error = ChunkError { offset };
        let length = chunk
            .get(offset..offset + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or(error.clone())?;
        let code = chunk
            .get(offset + 2..offset + 2 + length)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or(error.clone())?;
        let id = chunk
            .get(offset + 2 + length..offset + 10 + length)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .ok_or(error)?;
        entry(code, id);
        offset += 10 + length;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(entries: &[(String, u64)]) -> (Vec<Vec<u8>>, Vec<(String, u64)>) {
        let mut writer = ChunkWriter::new();
        let mut chunks: Vec<Vec<u8>> = entries
            .iter()
            .filter_map(|(code, id)| writer.push(code, *id))
            .collect();
        chunks.extend(writer.finish());
        let mut decoded = Vec::new();
        for chunk in &chunks {
            decode_chunk(chunk, |code, id| decoded.push((code.to_owned(), id))).unwrap();
        }
        (chunks, decoded)
    }

    #[test]
    fn many_entries_fill_many_chunks_each_within_the_limit() {
        let entries: Vec<(String, u64)> =
            (0..10_000).map(|i| (format!("CODE-{i:08}"), i)).collect();
        let (chunks, decoded) = round_trip(&entries);
        assert!(chunks.len() > 1);
        assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK_BYTES));
        assert_eq!(decoded, entries);
        let (chunks, decoded) = round_trip(&[]);
        assert!(chunks.is_empty() && decoded.is_empty());
    }

    proptest! {
        #[test]
        fn entries_round_trip(entries in proptest::collection::vec(("[ -~]{1,255}", any::<u64>()), 0..300)) {
            let (chunks, decoded) = round_trip(&entries);
            prop_assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK_BYTES));
            prop_assert_eq!(decoded, entries);
        }

        #[test]
        fn truncated_chunks_are_errors_not_panics(entries in proptest::collection::vec(("[a-z]{1,20}", any::<u64>()), 1..20), cut in 1usize..30) {
            let (chunks, _) = round_trip(&entries);
            let chunk = &chunks[0];
            // Within the chunk's last record: cut at a record boundary, a chunk is valid.
            let last_record = 10 + entries[entries.len() - 1].0.len();
            prop_assume!(chunks.len() == 1);
            let cut = 1 + cut % (last_record - 1);
            let result = decode_chunk(&chunk[..chunk.len() - cut], |_, _| {});
            prop_assert!(result.is_err());
        }

        #[test]
        fn chunk_keys_sort_by_version_then_index(a: (u64, u32), b: (u64, u32)) {
            prop_assert_eq!(chunk_key(a.0, a.1).cmp(&chunk_key(b.0, b.1)), a.cmp(&b));
            prop_assert_eq!(chunk_version(&chunk_key(a.0, a.1)), Some(a.0));
        }
    }
}
