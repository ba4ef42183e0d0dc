//! The inbox: every accepted notification, stored raw before it is
//! answered, in the `inbox` tree:
//!
//! | key | value | what |
//! |---|---|---|
//! | `E` seq | entry | route, kind, receive time, dedup key, size, state; and the raw body when it fits |
//! | `P` seq part | bytes | a body too large for its entry, in parts of at most [`MAX_PART_BYTES`] |
//!
//! An accepted notification is durable after the caller's commit, and only
//! then answered 200. A notification already seen within the dedup window
//! is not stored again.
//!
//! Accepting is one insert (a large body's parts first, then its entry),
//! never a sled transaction or batch, and what it costs was measured:
//! - in sled 0.34 every transaction and batch takes one process-wide write
//!   lock that also waits for a running flush's disk I/O, so transactions
//!   from many connections run one at a time between flushes: 64
//!   concurrent committers reach ~3,400 commits/s with a three-record
//!   transaction each, ~25,000/s with the same records as inserts;
//! - each further insert costs as much again (node splits, log copies):
//!   64 committers reach ~55,000 commits/s with one insert each, ~20,000/s
//!   with the four records an entry used to take.
//!
//! So the two indexes an entry needs live in memory, rebuilt from the
//! entries when the inbox is opened:
//! - the **dedup index**: dedup key → the entry last stored under it,
//!   for entries received within the window (bounded by
//!   [`MAX_REMEMBERED`]). Checking it and storing an entry are atomic
//!   against other accepts of the same key through a lock per key stripe
//!   (sled's lock file keeps any other process out of the store);
//! - the **unprocessed set**, in arrival order, for the processor.
//!
//! The listener and the processor must therefore share one `Inbox` (open
//! it once per store and clone it): a second one would not see the first
//! one's new entries until it is opened again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::store::keys::{decode_u64_key, u64_key, u64_pair_key};
use crate::store::{Store, StoreError, TreeName};

pub const INBOX: TreeName = TreeName::new("inbox");
/// Keeps every value well below the 128 KiB at which sled writes even a
/// single value to a blob file (see the store's docs).
pub const MAX_PART_BYTES: usize = 60 * 1024;
/// A body up to this size is kept in its entry: what is left of a part
/// for the entry's own fields, whose text is bounded (a parked reason at
/// 500 characters, kinds and dedup keys short).
pub const MAX_INLINE_BYTES: usize = MAX_PART_BYTES - 4 * 1024;
/// How many dedup keys are remembered at most: past it the oldest are
/// forgotten before their window ends (~100 bytes each).
pub const MAX_REMEMBERED: usize = 1_000_000;

const ENTRY: u8 = b'E';
const PART: u8 = b'P';
/// Dedup and unprocessed records an earlier layout kept beside its entries;
/// removed with their entries.
const LEGACY_SEEN: u8 = b'S';
const LEGACY_UNPROCESSED: u8 = b'U';

/// The first byte of an entry in this layout: the length of its fields,
/// the fields (JSON), the body. An entry of the earlier layout is JSON
/// alone and starts with `{`.
const ENTRY_FORMAT: u8 = 1;

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
    /// How many `P` records hold the body; 0 when it is in the entry.
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

/// An entry's stored form: its fields and, when `parts` is 0, its body.
pub fn encode_entry(entry: &Entry, inline_body: &[u8]) -> Vec<u8> {
    let fields = serde_json::to_vec(entry).expect("an entry serialises");
    let mut value = Vec::with_capacity(5 + fields.len() + inline_body.len());
    value.push(ENTRY_FORMAT);
    value.extend_from_slice(&(fields.len() as u32).to_be_bytes());
    value.extend_from_slice(&fields);
    value.extend_from_slice(inline_body);
    value
}

/// An entry's fields and the body kept in it (empty when in parts, and in
/// an entry of the earlier layout, whose body is always in parts).
pub fn decode_entry(value: &[u8]) -> Result<(Entry, &[u8]), InboxError> {
    let corrupt = |what: String| InboxError::Corrupt(format!("entry: {what}"));
    let (fields, body) = match value.split_first() {
        Some((&ENTRY_FORMAT, rest)) => {
            let (length, rest) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| corrupt("shorter than its header".into()))?;
            let length = u32::from_be_bytes(*length) as usize;
            if rest.len() < length {
                return Err(corrupt("shorter than its fields".into()));
            }
            rest.split_at(length)
        }
        Some((b'{', _)) => (value, &[][..]),
        _ => return Err(corrupt("unknown format".into())),
    };
    let entry: Entry = serde_json::from_slice(fields).map_err(|e| corrupt(e.to_string()))?;
    let held = if entry.parts == 0 { entry.bytes } else { 0 };
    if body.len() as u64 != held {
        return Err(corrupt(format!(
            "holds {} body bytes where {held} belong",
            body.len()
        )));
    }
    Ok((entry, body))
}

fn record(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

fn entry_key(seq: u64) -> Vec<u8> {
    record(ENTRY, &u64_key(seq))
}

/// How many locks the dedup keys are spread over: enough that unrelated
/// notifications rarely wait for each other.
const DEDUP_STRIPES: usize = 64;

type DedupDigest = [u8; 32];

fn dedup_digest(dedup_key: &str) -> DedupDigest {
    let digest = ring::digest::digest(&ring::digest::SHA256, dedup_key.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The dedup index: the entry last stored under each key seen within the
/// window, and the keys in the order they were stored, to forget them.
#[derive(Debug)]
struct Remembered {
    latest: HashMap<DedupDigest, (u64, u64)>,
    /// (received at, key), oldest first.
    order: VecDeque<(u64, DedupDigest)>,
    /// At most this many keys: [`MAX_REMEMBERED`] but in tests.
    capacity: usize,
}

impl Remembered {
    fn new(capacity: usize) -> Self {
        Self {
            latest: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// The entry stored under `key` less than `window` ms before `now`.
    fn recent(&mut self, key: &DedupDigest, now: u64, window: u64) -> Option<u64> {
        self.forget_older_than(now.saturating_sub(window));
        self.latest
            .get(key)
            .filter(|(_, at)| now.saturating_sub(*at) < window)
            .map(|(seq, _)| *seq)
    }

    fn remember(&mut self, key: DedupDigest, seq: u64, at: u64) {
        self.latest.insert(key, (seq, at));
        self.order.push_back((at, key));
        while self.order.len() > self.capacity {
            self.forget_oldest();
        }
    }

    fn forget_older_than(&mut self, cutoff: u64) {
        while self.order.front().is_some_and(|(at, _)| *at < cutoff) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((at, key)) = self.order.pop_front() {
            // A key stored again later stays under its newer entry.
            if self
                .latest
                .get(&key)
                .is_some_and(|(_, latest)| *latest == at)
            {
                self.latest.remove(&key);
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    stripes: [Mutex<()>; DEDUP_STRIPES],
    /// `None` until the first offer, which loads it for its window.
    remembered: Mutex<Option<Remembered>>,
    unprocessed: Mutex<BTreeSet<u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step: a panic elsewhere
    // leaves nothing half-done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn stripe(&self, key: &DedupDigest) -> MutexGuard<'_, ()> {
        let index = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
        lock(&self.stripes[(index % DEDUP_STRIPES as u64) as usize])
    }
}

#[derive(Debug, Clone)]
pub struct Inbox {
    store: Store,
    tree: sled::Tree,
    shared: Arc<Shared>,
}

impl Inbox {
    /// Opens the inbox and finds its unprocessed entries. Open it once per
    /// store and share clones (see the module docs).
    pub fn open(store: &Store) -> Result<Self, InboxError> {
        let tree = store.tree(INBOX)?;
        let mut unprocessed = BTreeSet::new();
        for item in tree.scan_prefix([ENTRY]) {
            let (key, value) = store.check(item)?;
            if decode_entry(&value)?.0.state == EntryState::Unprocessed {
                unprocessed.insert(seq_of(&key)?);
            }
        }
        Ok(Self {
            store: store.clone(),
            tree,
            shared: Arc::new(Shared {
                stripes: std::array::from_fn(|_| Mutex::new(())),
                remembered: Mutex::new(None),
                unprocessed: Mutex::new(unprocessed),
            }),
        })
    }

    /// The dedup index, loaded from the entries received within `window`
    /// of `now` on first use.
    fn remembered(
        &self,
        now: u64,
        window: u64,
    ) -> Result<MutexGuard<'_, Option<Remembered>>, InboxError> {
        let mut remembered = lock(&self.shared.remembered);
        if remembered.is_none() {
            let mut recent = Vec::new();
            for item in self.tree.scan_prefix([ENTRY]).rev() {
                let (key, value) = self.store.check(item)?;
                let (entry, _) = decode_entry(&value)?;
                if now.saturating_sub(entry.received_at) >= window {
                    break;
                }
                recent.push((
                    entry.received_at,
                    seq_of(&key)?,
                    dedup_digest(&entry.dedup_key),
                ));
            }
            let mut loaded = Remembered::new(MAX_REMEMBERED);
            // Oldest first, so that each key ends under its newest entry.
            for (at, seq, key) in recent.into_iter().rev() {
                loaded.remember(key, seq, at);
            }
            *remembered = Some(loaded);
        }
        Ok(remembered)
    }

    /// Stores `offer` unless it is a duplicate; durable after a commit.
    pub fn accept(&self, offer: Offer<'_>) -> Result<Accepted, InboxError> {
        let key = dedup_digest(offer.dedup_key);
        // Held until the entry is written, so that a resend arriving
        // meanwhile is answered only once the entry it duplicates exists.
        let _same_key = self.shared.stripe(&key);
        let seq = {
            let mut remembered = self.remembered(offer.now, offer.window)?;
            let remembered = remembered.as_mut().expect("loaded");
            if let Some(earlier) = remembered.recent(&key, offer.now, offer.window) {
                return Ok(Accepted::Duplicate(earlier));
            }
            let seq = self.store.generate_id()?;
            remembered.remember(key, seq, offer.now);
            seq
        };
        let inline = offer.body.len() <= MAX_INLINE_BYTES;
        let parts: Vec<&[u8]> = if inline {
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
        // Parts before their entry: an entry never names missing parts.
        for (i, part) in parts.iter().enumerate() {
            let key = record(PART, &u64_pair_key(seq, i as u64));
            self.store.check(self.tree.insert(key, *part))?;
        }
        let value = encode_entry(&entry, if inline { offer.body } else { &[] });
        self.store.check(self.tree.insert(entry_key(seq), value))?;
        lock(&self.shared.unprocessed).insert(seq);
        Ok(Accepted::New(seq))
    }

    /// The tree, for transactions that span it and the processor's.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Marks entry `seq` processed inside the caller's transaction; its
    /// body stays.
    pub fn stage_processed(
        inbox: &sled::transaction::TransactionalTree,
        seq: u64,
    ) -> sled::transaction::ConflictableTransactionResult<(), InboxError> {
        use sled::transaction::ConflictableTransactionError::Abort;
        let Some(value) = inbox.get(entry_key(seq))? else {
            return Err(Abort(InboxError::Corrupt(format!(
                "entry {seq} is missing"
            ))));
        };
        let (entry, body) = decode_entry(&value).map_err(Abort)?;
        let entry = Entry {
            state: EntryState::Processed,
            ..entry
        };
        inbox.insert(entry_key(seq), encode_entry(&entry, body))?;
        inbox.remove(record(LEGACY_UNPROCESSED, &u64_key(seq)))?;
        Ok(())
    }

    /// Parks entry `seq` with `reason`: it leaves the unprocessed set and
    /// waits for an operator. Durable after a commit.
    pub fn park(&self, seq: u64, reason: &str) -> Result<(), InboxError> {
        let Some(value) = self.store.check(self.tree.get(entry_key(seq)))? else {
            return Err(InboxError::Corrupt(format!("entry {seq} is missing")));
        };
        let (entry, body) = decode_entry(&value)?;
        let entry = Entry {
            state: EntryState::Parked,
            parked_reason: Some(reason.chars().take(500).collect()),
            ..entry
        };
        self.store
            .check(self.tree.insert(entry_key(seq), encode_entry(&entry, body)))?;
        self.store
            .check(self.tree.remove(record(LEGACY_UNPROCESSED, &u64_key(seq))))?;
        lock(&self.shared.unprocessed).remove(&seq);
        Ok(())
    }

    /// Removes processed entries received before `before` (Unix ms), oldest
    /// first, at most `limit`, each with its body. Unprocessed and parked
    /// entries are never removed. Returns how many were. Durable after a
    /// commit.
    pub fn prune_processed(&self, before: u64, limit: usize) -> Result<usize, InboxError> {
        let mut pruned = 0;
        for item in self.tree.scan_prefix([ENTRY]) {
            if pruned == limit {
                break;
            }
            let (key, value) = self.store.check(item)?;
            let (entry, _) = decode_entry(&value)?;
            // Sequence numbers grow with time: the rest are newer.
            if entry.received_at >= before {
                break;
            }
            if entry.state != EntryState::Processed {
                continue;
            }
            let seq = seq_of(&key)?;
            let mut batch = sled::Batch::default();
            batch.remove(key);
            for part in 0..entry.parts {
                batch.remove(record(PART, &u64_pair_key(seq, u64::from(part))));
            }
            batch.remove(record(LEGACY_SEEN, entry.dedup_key.as_bytes()));
            self.store.check(self.tree.apply_batch(batch))?;
            pruned += 1;
        }
        Ok(pruned)
    }

    pub fn entry(&self, seq: u64) -> Result<Option<Entry>, InboxError> {
        let value = self.store.check(self.tree.get(entry_key(seq)))?;
        value
            .map(|value| decode_entry(&value).map(|(entry, _)| entry))
            .transpose()
    }

    /// The raw body of entry `seq`, put back together.
    pub fn body(&self, seq: u64) -> Result<Vec<u8>, InboxError> {
        let Some(value) = self.store.check(self.tree.get(entry_key(seq)))? else {
            return Ok(Vec::new());
        };
        let (entry, inline) = decode_entry(&value)?;
        if entry.parts == 0 {
            return Ok(inline.to_vec());
        }
        let mut body = Vec::with_capacity(entry.bytes as usize);
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
            .map(|item| seq_of(&self.store.check(item)?.0))
            .collect()
    }

    /// Up to `limit` entries not yet processed, oldest first.
    pub fn unprocessed(&self, limit: usize) -> Result<Vec<u64>, InboxError> {
        Ok(lock(&self.shared.unprocessed)
            .iter()
            .take(limit)
            .copied()
            .collect())
    }

    /// Takes entries the caller processed off the unprocessed set, after
    /// the commit that made that durable.
    pub fn processed(&self, seqs: &[u64]) {
        let mut unprocessed = lock(&self.shared.unprocessed);
        for seq in seqs {
            unprocessed.remove(seq);
        }
    }
}

fn seq_of(key: &[u8]) -> Result<u64, InboxError> {
    decode_u64_key(&key[1..]).map_err(|e| InboxError::Corrupt(format!("entry key: {e}")))
}

/// The dedup key of an API送信 notification: its `proc_name` and
/// `params`, hashed.
pub fn content_key(proc_name: &str, params: &str) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(proc_name.as_bytes());
    context.update(&[0]);
    context.update(params.as_bytes());
    let digest = context.finish();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(8 + 64);
    key.push_str("content:");
    for byte in digest.as_ref() {
        key.push(HEX[usize::from(byte >> 4)].into());
        key.push(HEX[usize::from(byte & 0xf)].into());
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
        let store = Store::open_for_test(temp.path());
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
        assert_eq!(
            content_key("stock_send", "{}"),
            "content:11bcf607f383a4c179aeec2226307d46d064847a4fee2f4c684f1ade520880bc"
        );
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_offers_of_one_notification_store_it_once() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(temp.path());
        let inbox = Inbox::open(&store).unwrap();
        for round in 0..20 {
            let key = format!("same-{round}");
            let start = Arc::new(std::sync::Barrier::new(16));
            let offers: Vec<_> = (0..16)
                .map(|_| {
                    let (inbox, key, start) = (inbox.clone(), key.clone(), Arc::clone(&start));
                    std::thread::spawn(move || {
                        start.wait();
                        inbox.accept(offer(&key, b"body", 500)).unwrap()
                    })
                })
                .collect();
            let outcomes: Vec<Accepted> = offers.into_iter().map(|t| t.join().unwrap()).collect();
            let stored: Vec<u64> = outcomes
                .iter()
                .filter_map(|o| match o {
                    Accepted::New(seq) => Some(*seq),
                    Accepted::Duplicate(_) => None,
                })
                .collect();
            assert_eq!(stored.len(), 1, "round {round}: {outcomes:?}");
            assert!(outcomes.iter().all(
                |o| matches!(o, Accepted::New(s) | Accepted::Duplicate(s) if *s == stored[0])
            ));
        }
        assert_eq!(inbox.unprocessed(100).unwrap().len(), 20);
        store.close().await.unwrap();
    }

    #[test]
    fn the_dedup_index_forgets_keys_past_their_window_or_past_its_capacity() {
        let key = |n: u8| [n; 32];
        let mut remembered = Remembered::new(3);
        remembered.remember(key(1), 10, 1_000);
        remembered.remember(key(2), 11, 1_500);
        assert_eq!(remembered.recent(&key(1), 1_999, 1_000), Some(10));
        assert_eq!(
            remembered.recent(&key(1), 2_000, 1_000),
            None,
            "window over"
        );
        assert_eq!(remembered.recent(&key(2), 2_000, 1_000), Some(11));
        // Stored again later: the newer entry stands, the old record
        // leaving the queue does not take it along.
        remembered.remember(key(2), 12, 2_100);
        assert_eq!(remembered.recent(&key(2), 2_600, 1_000), Some(12));
        for n in 3..=5 {
            remembered.remember(key(n), u64::from(n) * 10, 2_700);
        }
        assert_eq!(remembered.latest.len(), 3, "capacity");
        assert_eq!(
            remembered.recent(&key(2), 2_700, 1_000),
            None,
            "oldest forgotten"
        );
        assert_eq!(remembered.recent(&key(5), 2_700, 1_000), Some(50));
    }

    #[tokio::test]
    async fn duplicates_and_unprocessed_entries_are_known_again_after_a_reopen() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(temp.path());
        let inbox = Inbox::open(&store).unwrap();
        let Accepted::New(first) = inbox.accept(offer("k", b"body", 100)).unwrap() else {
            panic!("new");
        };
        let Accepted::New(other) = inbox.accept(offer("other", b"x", 150)).unwrap() else {
            panic!("new");
        };
        let entry = inbox.entry(other).unwrap().unwrap();
        assert_eq!(
            (entry.parts, entry.bytes),
            (0, 1),
            "a small body is kept in its entry"
        );
        inbox
            .tree()
            .transaction(|tx| Inbox::stage_processed(tx, other))
            .unwrap();
        inbox.processed(&[other]);
        drop(inbox);

        let reopened = Inbox::open(&store).unwrap();
        assert_eq!(reopened.unprocessed(10).unwrap(), [first]);
        assert_eq!(
            reopened.accept(offer("k", b"body", 1_099)).unwrap(),
            Accepted::Duplicate(first)
        );
        assert_eq!(
            reopened.body(other).unwrap(),
            b"x",
            "processing keeps the body"
        );
        assert!(matches!(
            reopened.accept(offer("k", b"body", 1_100)).unwrap(),
            Accepted::New(_)
        ));
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn entries_of_the_earlier_layout_are_read_processed_and_pruned() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(temp.path());
        let tree = store.tree(INBOX).unwrap();
        let legacy = Entry {
            route: Route::Notify,
            kind: "stock_send".into(),
            received_at: 100,
            dedup_key: "old".into(),
            bytes: 6,
            parts: 2,
            state: EntryState::Unprocessed,
            parked_reason: None,
        };
        let seq = 7;
        tree.insert(entry_key(seq), serde_json::to_vec(&legacy).unwrap())
            .unwrap();
        tree.insert(record(PART, &u64_pair_key(seq, 0)), b"abc")
            .unwrap();
        tree.insert(record(PART, &u64_pair_key(seq, 1)), b"def")
            .unwrap();
        tree.insert(record(LEGACY_UNPROCESSED, &u64_key(seq)), b"")
            .unwrap();
        tree.insert(record(LEGACY_SEEN, b"old"), &u64_pair_key(seq, 100))
            .unwrap();

        let inbox = Inbox::open(&store).unwrap();
        assert_eq!(inbox.unprocessed(10).unwrap(), [seq]);
        assert_eq!(inbox.body(seq).unwrap(), b"abcdef");
        tree.transaction(|tx| Inbox::stage_processed(tx, seq))
            .unwrap();
        inbox.processed(&[seq]);
        assert_eq!(
            inbox.entry(seq).unwrap().unwrap().state,
            EntryState::Processed
        );
        assert_eq!(inbox.body(seq).unwrap(), b"abcdef");
        assert_eq!(inbox.prune_processed(200, 10).unwrap(), 1);
        assert_eq!(tree.len(), 0, "entry, parts and the old indexes are gone");
        store.close().await.unwrap();
    }

    #[test]
    fn a_damaged_entry_is_reported_not_misread() {
        let entry = Entry {
            route: Route::Webhook,
            kind: "pos:stock".into(),
            received_at: 1,
            dedup_key: "event:1".into(),
            bytes: 4,
            parts: 0,
            state: EntryState::Unprocessed,
            parked_reason: None,
        };
        let value = encode_entry(&entry, b"body");
        for cut in [0, 1, 4, 10, value.len() - 1] {
            assert!(
                matches!(decode_entry(&value[..cut]), Err(InboxError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut unknown = value.clone();
        unknown[0] = 9;
        assert!(matches!(
            decode_entry(&unknown),
            Err(InboxError::Corrupt(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn entries_read_back_as_written(
            kind in ".{0,20}",
            dedup_key in ".{0,80}",
            received_at: u64,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
            reason in proptest::option::of(".{0,500}"),
        ) {
            let entry = Entry {
                route: Route::Notify,
                kind,
                received_at,
                dedup_key,
                bytes: body.len() as u64,
                parts: 0,
                state: if reason.is_some() { EntryState::Parked } else { EntryState::Unprocessed },
                parked_reason: reason,
            };
            let value = encode_entry(&entry, &body);
            let (read, read_body) = decode_entry(&value).unwrap();
            proptest::prop_assert_eq!(read, entry);
            proptest::prop_assert_eq!(read_body, &body[..]);
        }
    }

    #[tokio::test]
    async fn only_processed_entries_past_their_time_are_pruned_with_their_parts() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(temp.path());
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
            inbox
                .tree()
                .transaction(|tx| Inbox::stage_processed(tx, seqs[i]))
                .unwrap();
            inbox.processed(&[seqs[i]]);
        }
        inbox.park(seqs[1], "test").unwrap();

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
        store.close().await.unwrap();
    }
}
