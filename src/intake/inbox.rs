//! The inbox: every accepted notification, stored raw before it is
//! answered, in the `inbox` tree:
//!
//! | key | value | what |
//! |---|---|---|
//! | `E` seq | entry (JSON) | route, kind, receive time, dedup key, size, state |
//! | `P` seq part | bytes | the raw body, in parts of at most [`MAX_PART_BYTES`] |
//! | `S` dedup key | seq, receive time | the latest entry of each content or event id |
//! | `U` seq | — | entries not yet processed, in arrival order |
//!
//! An accepted notification is one transaction; it is durable after the
//! caller's commit, and only then answered 200. A notification already
//! seen within the dedup window is not stored again.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::store::keys::{decode_u64_pair_key, u64_key, u64_pair_key};
use crate::store::{Store, StoreError, TreeName};

pub const INBOX: TreeName = TreeName::new("inbox");
/// Keeps every value below sled's blob threshold (see the store's docs).
pub const MAX_PART_BYTES: usize = 60 * 1024;

const ENTRY: u8 = b'E';
const PART: u8 = b'P';
const SEEN: u8 = b'S';
const UNPROCESSED: u8 = b'U';

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Which endpoint a notification came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Legacy API送信 (form).
    Notify,
    /// Platform API webhook (JSON).
    Webhook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryState {
    Unprocessed,
    Processed,
    Parked,
}

/// One stored notification, without its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Entry {
    pub route: Route,
    /// `proc_name`, or the webhook's event.
    pub kind: String,
    /// Unix milliseconds.
    pub received_at: u64,
    pub dedup_key: String,
    pub bytes: u64,
    pub parts: u32,
    pub state: EntryState,
    /// Why processing failed, for a parked entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_reason: Option<String>,
}

/// What became of an offered notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored as entry `seq`.
    New(u64),
    /// Already stored as `seq` within the window: not stored again.
    Duplicate(u64),
}

/// A notification to store.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub route: Route,
    pub kind: &'a str,
    pub dedup_key: &'a str,
    pub body: &'a [u8],
    pub now: u64,
    /// A notification with the same dedup key seen less than this many
    /// milliseconds ago is a duplicate.
    pub window: u64,
}

fn record(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

#[derive(Debug, Clone)]
pub struct Inbox {
    store: Store,
    tree: sled::Tree,
}

impl Inbox {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree(INBOX)?,
            store: store.clone(),
        })
    }

    /// Stores `offer` unless it is a duplicate; durable after a commit.
    pub fn accept(&self, offer: Offer<'_>) -> Result<Accepted, InboxError> {
        let seq = self.store.generate_id()?;
        let parts: Vec<&[u8]> = if offer.body.is_empty() {
            Vec::new()
        } else {
            offer.body.chunks(MAX_PART_BYTES).collect()
        };
        let entry = Entry {
            route: offer.route,
            kind: offer.kind.to_owned(),
            received_at: offer.now,
            dedup_key: offer.dedup_key.to_owned(),
            bytes: offer.body.len() as u64,
            parts: parts.len() as u32,
            state: EntryState::Unprocessed,
            parked_reason: None,
        };
        let encoded = serde_json::to_vec(&entry).expect("an entry serialises");
        let seen_key = record(SEEN, offer.dedup_key.as_bytes());
        let result = self.tree.transaction(|inbox| {
            if let Some(seen) = inbox.get(&seen_key)? {
                let (earlier, at) = decode_u64_pair_key(&seen).map_err(|e| {
                    ConflictableTransactionError::Abort(InboxError::Corrupt(format!("dedup: {e}")))
                })?;
                if offer.now.saturating_sub(at) < offer.window {
                    return Ok(Accepted::Duplicate(earlier));
                }
            }
            inbox.insert(record(ENTRY, &u64_key(seq)), encoded.as_slice())?;
            for (i, part) in parts.iter().enumerate() {
                let key = record(PART, &u64_pair_key(seq, i as u64));
                inbox.insert(key, *part)?;
            }
            inbox.insert(seen_key.as_slice(), &u64_pair_key(seq, offer.now))?;
            inbox.insert(record(UNPROCESSED, &u64_key(seq)), &[])?;
            Ok(Accepted::New(seq))
        });
        match result {
            Ok(accepted) => Ok(accepted),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => {
                Err(self.store.check::<()>(Err(e)).unwrap_err().into())
            }
        }
    }

    /// The tree, for transactions that span it and the processor's.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Marks entry `seq` processed inside the caller's transaction.
    pub fn stage_processed(
        inbox: &sled::transaction::TransactionalTree,
        seq: u64,
        entry: &Entry,
    ) -> sled::transaction::ConflictableTransactionResult<(), InboxError> {
        let entry = Entry {
            state: EntryState::Processed,
            ..entry.clone()
        };
        let encoded = serde_json::to_vec(&entry).expect("an entry serialises");
        inbox.insert(record(ENTRY, &u64_key(seq)), encoded)?;
        inbox.remove(record(UNPROCESSED, &u64_key(seq)))?;
        Ok(())
    }

    /// Parks entry `seq` with `reason`: it leaves the unprocessed index
    /// and waits for an operator. Durable after a commit.
    pub fn park(&self, seq: u64, entry: &Entry, reason: &str) -> Result<(), InboxError> {
        let entry = Entry {
            state: EntryState::Parked,
            parked_reason: Some(reason.chars().take(500).collect()),
            ..entry.clone()
        };
        let encoded = serde_json::to_vec(&entry).expect("an entry serialises");
        let mut batch = sled::Batch::default();
        batch.insert(record(ENTRY, &u64_key(seq)), encoded);
        batch.remove(record(UNPROCESSED, &u64_key(seq)));
        self.store.check(self.tree.apply_batch(batch))?;
        Ok(())
    }

    /// Removes processed entries received before `before` (Unix ms), oldest
    /// first, at most `limit`; with each its body, and its dedup record if
    /// that still names it. Unprocessed and parked entries are never
    /// removed. Returns how many were. Durable after a commit.
    pub fn prune_processed(&self, before: u64, limit: usize) -> Result<usize, InboxError> {
        let mut pruned = 0;
        for item in self.tree.scan_prefix([ENTRY]) {
            if pruned == limit {
                break;
            }
            let (key, value) = self.store.check(item)?;
            let entry: Entry = serde_json::from_slice(&value)
                .map_err(|e| InboxError::Corrupt(format!("entry: {e}")))?;
            // Sequence numbers grow with time: the rest are newer.
            if entry.received_at >= before {
                break;
            }
            if entry.state != EntryState::Processed {
                continue;
            }
            let seq = crate::store::keys::decode_u64_key(&key[1..])
                .map_err(|e| InboxError::Corrupt(format!("entry key: {e}")))?;
            let mut batch = sled::Batch::default();
            batch.remove(key);
            for part in 0..entry.parts {
                batch.remove(record(PART, &u64_pair_key(seq, u64::from(part))));
            }
            let seen_key = record(SEEN, entry.dedup_key.as_bytes());
            if let Some(seen) = self.store.check(self.tree.get(&seen_key))? {
                if decode_u64_pair_key(&seen).is_ok_and(|(latest, _)| latest == seq) {
                    batch.remove(seen_key);
                }
            }
            self.store.check(self.tree.apply_batch(batch))?;
            pruned += 1;
        }
        Ok(pruned)
    }

    pub fn entry(&self, seq: u64) -> Result<Option<Entry>, InboxError> {
        let bytes = self
            .store
            .check(self.tree.get(record(ENTRY, &u64_key(seq))))?;
        bytes
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| InboxError::Corrupt(format!("entry: {e}")))
            })
            .transpose()
    }

    /// The raw body of entry `seq`, put back together.
    pub fn body(&self, seq: u64) -> Result<Vec<u8>, InboxError> {
        let mut body = Vec::new();
        for part in self.tree.scan_prefix(record(PART, &u64_key(seq))) {
            let (_, bytes) = self.store.check(part)?;
            body.extend_from_slice(&bytes);
        }
        Ok(body)
    }

    /// Every stored entry, whatever its state, oldest first.
    pub fn entries(&self, limit: usize) -> Result<Vec<u64>, InboxError> {
        self.tree
            .scan_prefix([ENTRY])
            .take(limit)
            .map(|entry| {
                let (key, _) = self.store.check(entry)?;
                crate::store::keys::decode_u64_key(&key[1..])
                    .map_err(|e| InboxError::Corrupt(format!("entry key: {e}")))
            })
            .collect()
    }

    /// Entries not yet processed, oldest first.
    pub fn unprocessed(&self, limit: usize) -> Result<Vec<u64>, InboxError> {
        self.tree
            .scan_prefix([UNPROCESSED])
            .take(limit)
            .map(|entry| {
                let (key, _) = self.store.check(entry)?;
                crate::store::keys::decode_u64_key(&key[1..])
                    .map_err(|e| InboxError::Corrupt(format!("unprocessed index: {e}")))
            })
            .collect()
    }
}

/// The dedup key of an API送信 notification: its `proc_name` and
/// `params`, hashed.
pub fn content_key(proc_name: &str, params: &str) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(proc_name.as_bytes());
    context.update(&[0]);
    context.update(params.as_bytes());
    let digest = context.finish();
    let mut key = String::from("content:");
    for byte in digest.as_ref() {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer<'a>(key: &'a str, body: &'a [u8], now: u64) -> Offer<'a> {
        Offer {
            route: Route::Notify,
            kind: "stock_send",
            dedup_key: key,
            body,
            now,
            window: 1_000,
        }
    }

    #[tokio::test]
    async fn bodies_are_split_and_joined_and_duplicates_kept_out_within_the_window() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open(&crate::store::StoreOptions {
            directory: temp.path().to_owned(),
            cache_capacity_bytes: 8 << 20,
        })
        .unwrap();
        let inbox = Inbox::open(&store).unwrap();
        let big: Vec<u8> = (0..(MAX_PART_BYTES * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let Accepted::New(first) = inbox.accept(offer("k1", &big, 100)).unwrap() else {
            panic!("new");
        };
        let entry = inbox.entry(first).unwrap().unwrap();
        assert_eq!((entry.parts, entry.bytes), (3, big.len() as u64));
        assert_eq!(inbox.body(first).unwrap(), big);
        assert_eq!(
            inbox.accept(offer("k1", &big, 1_099)).unwrap(),
            Accepted::Duplicate(first)
        );
        let Accepted::New(again) = inbox.accept(offer("k1", &big, 1_100)).unwrap() else {
            panic!("past the window it is new");
        };
        assert_eq!(inbox.unprocessed(10).unwrap(), [first, again]);
        assert_ne!(
            content_key("stock_send", "{}"),
            content_key("stock_sen", "d{}")
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn only_processed_entries_past_their_time_are_pruned_with_their_parts() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open(&crate::store::StoreOptions {
            directory: temp.path().to_owned(),
            cache_capacity_bytes: 8 << 20,
        })
        .unwrap();
        let inbox = Inbox::open(&store).unwrap();
        let body = vec![7u8; MAX_PART_BYTES + 1];
        let mut seqs = Vec::new();
        for (i, now) in [100, 200, 300, 400].into_iter().enumerate() {
            let key = format!("k{i}");
            let Accepted::New(seq) = inbox.accept(offer(&key, &body, now)).unwrap() else {
                panic!("new");
            };
            seqs.push(seq);
        }
        // 0 and 2 processed, 1 parked, 3 processed but recent.
        for &i in &[0usize, 2, 3] {
            let entry = inbox.entry(seqs[i]).unwrap().unwrap();
            inbox
                .tree()
                .transaction(|tx| Inbox::stage_processed(tx, seqs[i], &entry))
                .unwrap();
        }
        let parked = inbox.entry(seqs[1]).unwrap().unwrap();
        inbox.park(seqs[1], &parked, "test").unwrap();

        assert_eq!(inbox.prune_processed(350, 100).unwrap(), 2);
        assert!(inbox.entry(seqs[0]).unwrap().is_none());
        assert!(
            inbox.body(seqs[0]).unwrap().is_empty(),
            "its parts went too"
        );
        assert!(inbox.entry(seqs[2]).unwrap().is_none());
        let kept = inbox.entry(seqs[1]).unwrap().unwrap();
        assert_eq!(kept.state, EntryState::Parked);
        assert_eq!(kept.parked_reason.as_deref(), Some("test"));
        assert_eq!(
            inbox.body(seqs[3]).unwrap(),
            body,
            "recent entries stay whole"
        );
        assert!(inbox.unprocessed(10).unwrap().is_empty());
        // Its dedup record went with it: the same content is new again.
        assert!(matches!(
            inbox.accept(offer("k0", &body, 360)).unwrap(),
            Accepted::New(_)
        ));
        store.close().await.unwrap();
    }
}
