//! The stock mirror and the work that keeps it and the downstream
//! current, in the `stock` tree:
//!
//! | key | value | what |
//! |---|---|---|
//! | `D` store `␀` product | [`Dirty`] | a notification said this product changed: refresh it |
//! | `J` store | job id | a refresh job for the store is waiting to start |
//! | `M` store `␀` product | [`Mirrored`] | the stock as last learned, with Smaregi's time |
//! | `O` store `␀` product | stamp | the mirror's value must reach the downstream |
//! | `W` | job id | a push job is waiting to start |
//! | `B` | job id | a back-fill job is waiting to start |
//! | `C` | change id | the last `StockHistory` change back-filled |
//! | `S` product | sum | the sum over the summed stores the downstream last acknowledged |
//! | `A` dstore `␀` product | baseline | delta mode: the mirror value the downstream's count stands for (see [`super::delta`]) |
//! | `U` dstore `␀` product | batch size | a batch with this product was rejected: sent in batches this small until the refused one is found |
//! | `H` dstore `␀` product | job id | the downstream refused this product alone: only that (parked) job sends it |
//! | `P` job id | [`BatchHead`] | delta mode: the batch a push job is sending, until acknowledged or rejected |
//! | `Q` job id index | [`Item`] | that batch's items |
//!
//! "dstore" is the store id the downstream gets: the store's own, or the
//! summed stores' (`1+2`).
//!
//! Coalescing: a notification only marks products dirty; it stages a
//! refresh job for a store only when none is waiting. A refresh takes
//! every dirty product of its store at once (Smaregi's `stock_ref`, 1,000
//! products a call), so a burst of notifications, or a stocktake of
//! thousands of rows, costs a handful of calls. A job forgets its `J` or
//! `W` mark when it starts, so a change that arrives while it runs gets a
//! job of its own; a dirty or outgoing mark is cleared only if no newer
//! one replaced it meanwhile.
//!
//! Latest wins downstream (absolute mode): a push reads the mirror when it
//! sends, never a value captured earlier, and pushes run one at a time
//! (one ordering key), so the downstream never gets an older value after
//! a newer one. Older information never overwrites newer in the mirror
//! either: a value whose Smaregi time is earlier than the mirror's is
//! ignored.
//!
//! Delta mode (exactly once): a push computes each product's change from
//! the mirror and its baseline and stores the batch (`P`, `Q`: contents
//! and webhook-id) before the first send. Every later attempt, also after
//! a crash, sends exactly that batch with the same webhook-id, until the
//! downstream acknowledges it (then the baselines move by what it carried
//! and the batch is cleared, in one transaction) or rejects it (cleared,
//! baselines untouched: nothing was applied). A receiver that drops
//! webhook-ids it has seen therefore applies each change once. Echoes of
//! the relay's own registrations are added to the baselines by the
//! refresh that sees them in Smaregi's stock, in the transaction that
//! records the value (see [`super::delta`]); each echo record is removed
//! in that transaction, so it counts once.
//!
//! Rejections never block other products: when the downstream refuses a
//! batch of several products with a 4xx (other than 408 and 429), its
//! products become suspects (`U`) and go out again in batches of half
//! the size, before anything else, until each is accepted or refused
//! alone: a bad product among n costs about 2·log₂ n requests. A product
//! refused alone becomes a job of its own (kind [`HELD_KIND`], its own
//! ordering key) that parks with the downstream's answer and holds it
//! (`H`), while the regular pushes go on with the others. A refresh does not queue a held
//! product for the regular push. An operator's retry of the parked job
//! sends its products' values as they are then (absolute) or their
//! change then (delta); once accepted, the products are released and a
//! change made meanwhile goes out with the regular pushes. A held job an
//! operator discards releases its products at their next change. A 2xx
//! is success whatever its body says: the status is the downstream's
//! word that it took the batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, Transactional,
    TransactionalTree,
};
use tracing::{info, warn};

use super::delta::{self, DownstreamKey};
use super::notice::{read_notice, StockHint, StockNotice};
use super::sign;
use crate::config::{Clamp, DownstreamConfig, DownstreamMode, StockConfig, StockSource};
use crate::intake::inbox::{Entry, Inbox, InboxError};
use crate::mapping::Catalog;
use crate::outbox::engine::{
    AttemptOutcome, BoxFuture, Clock, EngineBuilder, Executor, SystemClock,
};
use crate::outbox::job::{Job, JobState, NewJob};
use crate::outbox::queue::{Queue, QueueError};
use crate::smaregi::client::{ClientError, SmaregiClient};
use crate::smaregi::ledger::{self, Echo, Ledger, ECHO};
use crate::store::{widen_abort, Store, StoreError, TreeName};

pub const STOCK: TreeName = TreeName::new("stock");
pub const REFRESH_KIND: &str = "stock.refresh";
pub const PUSH_KIND: &str = "stock.push";
/// The upstream of push jobs: the store's EC side.
pub const DOWNSTREAM: &str = "downstream";
pub const PUSH_KEY: &str = "stock-push";

const DIRTY: u8 = b'D';
const REFRESH_WAITING: u8 = b'J';
const MIRROR: u8 = b'M';
const OUTGOING: u8 = b'O';
const PUSH_WAITING: &[u8] = b"W";
const BACKFILL_WAITING: &[u8] = b"B";
const BACKFILL_CURSOR: &[u8] = b"C";
const SUM_SENT: u8 = b'S';
const BASELINE: u8 = b'A';
const HELD: u8 = b'H';
const SUSPECT: u8 = b'U';
const BATCH_HEAD: u8 = b'P';
const BATCH_ITEM: u8 = b'Q';
/// A push whose batch the downstream rejected: parks, holding its products.
pub const HELD_KIND: &str = "stock.push-held";
/// How much of a rejecting downstream's body a parked job keeps.
const REASON_BODY_CHARS: usize = 300;
pub const BACKFILL_KIND: &str = "stock.backfill";
/// How long a refresh waits for a send of ours to be recorded before it
/// takes the product as it is (a send abandoned by an operator, say).
pub const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(600);
/// When a refresh that left products waiting looks again.
const IN_FLIGHT_RECHECK: Duration = Duration::from_secs(1);
pub const BACKFILL_KEY: &str = "stock-backfill";
/// `StockHistory` rows read per back-fill call.
pub const BACKFILL_PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StockError {
    #[error("stock record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Inbox(#[from] InboxError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// A product to refresh, as the latest notification described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Dirty {
    /// Unique and increasing: tells whether a newer notice replaced it.
    pub stamp: u64,
    pub amount: Option<i64>,
    pub updated_at: Option<String>,
}

/// A product's stock as the relay last learned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Mirrored {
    pub amount: i64,
    /// Smaregi's `updDateTime` (JST), when known.
    pub updated_at: Option<String>,
    /// When the relay learned it, Unix milliseconds.
    pub learned_at: u64,
    pub stamp: u64,
}

fn pair_key(tag: u8, store: &str, product: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + store.len() + product.len());
    key.push(tag);
    key.extend_from_slice(store.as_bytes());
    key.push(0);
    key.extend_from_slice(product.as_bytes());
    key
}

fn split_pair(key: &[u8]) -> Option<(String, String)> {
    let rest = &key[1..];
    let at = rest.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8_lossy(&rest[..at]).into_owned(),
        String::from_utf8_lossy(&rest[at + 1..]).into_owned(),
    ))
}

fn store_key(tag: u8, store: &str) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(store.as_bytes());
    key
}

/// What a refresh learned of one product in one store.
struct Learned {
    store_id: String,
    product: String,
    dirty: Dirty,
    amount: i64,
    updated_at: Option<String>,
}

/// The refresh group of the stores summed for the downstream: they are
/// refreshed together, so that a transfer between two of them reaches
/// the mirror as one change and the sum never shows half of it.
pub const SUMMED_GROUP: &str = "summed";

/// Ids for staging hints: a stamp each, a refresh job per refresh group.
struct HintIds {
    stamps: Vec<u64>,
    refresh_jobs: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RefreshPayload {
    v: u32,
    store: String,
}

type TxResult<T> = ConflictableTransactionResult<T, StockError>;

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StockError> {
    serde_json::from_slice(bytes).map_err(|e| StockError::Corrupt(format!("{what}: {e}")))
}

fn tx_decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> TxResult<T> {
    decode(bytes, what).map_err(ConflictableTransactionError::Abort)
}

/// The stock side: mirror, notices, refresh and push jobs. Cheap to clone.
#[derive(Clone)]
pub struct StockBook {
    store: Store,
    tree: sled::Tree,
    queue: Queue,
    /// The `smaregi` tree, whose echo records refreshes consume.
    ledger: sled::Tree,
    config: Arc<StockConfig>,
    clock: Arc<dyn Clock>,
}

impl StockBook {
    pub fn open(store: &Store, config: &StockConfig) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree(STOCK)?,
            queue: Queue::open(store)?,
            ledger: Ledger::open(store)?.tree().clone(),
            store: store.clone(),
            config: Arc::new(config.clone()),
            clock: Arc::new(SystemClock),
        })
    }

    /// The clock jobs are staged by: the outbox engine's.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn mode(&self) -> Option<DownstreamMode> {
        self.config.downstream.as_ref().map(|d| d.mode)
    }

    /// The store id the downstream gets for `store`.
    fn downstream_store(&self, store: &str) -> String {
        if self.summed().iter().any(|s| s == store) {
            self.summed().join("+")
        } else {
            store.to_owned()
        }
    }

    /// The stores behind a downstream store id.
    fn stores_behind(&self, dstore: &str) -> Vec<String> {
        if self.summed().len() > 1 && dstore == self.summed().join("+") {
            self.summed().to_vec()
        } else {
            vec![dstore.to_owned()]
        }
    }

    /// Marks products changed, as a notice naming them would, and commits:
    /// for callers that learn of changes other than through the inbox.
    pub async fn note(&self, hints: &[StockHint]) -> Result<(), StockError> {
        let ids = self.ids_for(hints)?;
        let now = self.now();
        let result = (&self.tree, self.queue.tree())
            .transaction(|(stock, outbox)| self.stage_hints(stock, outbox, hints, &ids, now));
        self.finish(result)?;
        self.store.commit().await?;
        Ok(())
    }

    /// The stores summed into one downstream value, if configured.
    fn summed(&self) -> &[String] {
        self.config
            .downstream
            .as_ref()
            .map_or(&[], |d| d.sum_stores.as_slice())
    }

    /// The refresh group of `store`: its own, or the summed stores'.
    fn group_of(&self, store: &str) -> String {
        if self.summed().iter().any(|s| s == store) {
            SUMMED_GROUP.to_owned()
        } else {
            store.to_owned()
        }
    }

    /// The stores of a refresh group.
    fn stores_of(&self, group: &str) -> Vec<String> {
        if group == SUMMED_GROUP {
            self.summed().to_vec()
        } else {
            vec![group.to_owned()]
        }
    }

    fn follows(&self, store: &str) -> bool {
        self.config.stores.is_empty() || self.config.stores.iter().any(|s| s == store)
    }

    /// Turns inbox entry `seq` into refresh work and marks it processed,
    /// in one transaction; durable after the caller's commit. A notice
    /// that no longer reads parks the entry with the reason.
    pub fn process(
        &self,
        inbox: &Inbox,
        seq: u64,
        entry: &Entry,
    ) -> Result<StockNotice, StockError> {
        let body = inbox.body(seq)?;
        let notice = match read_notice(entry.route, &entry.kind, &body, &|s| self.follows(s)) {
            Ok(notice) => notice,
            Err(e) => {
                warn!(seq, error = %e, "stock: a stored notification cannot be processed; parked");
                inbox.park(seq, &e.to_string())?;
                return Ok(StockNotice::default());
            }
        };
        for skipped in &notice.skipped {
            warn!(seq, row = skipped.row, reason = %skipped.reason, "stock: notification row skipped");
        }
        let ids = self.ids_for(&notice.hints)?;
        let now = self.now();
        let result = (inbox.tree(), &self.tree, self.queue.tree()).transaction(
            |(inbox_tx, stock, outbox)| {
                self.stage_hints(stock, outbox, &notice.hints, &ids, now)?;
                widen_abort(Inbox::stage_processed(inbox_tx, seq))?;
                Ok(())
            },
        );
        self.finish(result)?;
        Ok(notice)
    }

    /// The ids staging `hints` needs, taken before its transaction.
    fn ids_for(&self, hints: &[StockHint]) -> Result<HintIds, StockError> {
        let mut groups: Vec<String> = hints.iter().map(|h| self.group_of(&h.store_id)).collect();
        groups.sort_unstable();
        groups.dedup();
        let mut refresh_jobs = Vec::with_capacity(groups.len());
        for group in groups {
            refresh_jobs.push((group, self.store.generate_id()?));
        }
        let mut stamps = Vec::with_capacity(hints.len());
        for _ in hints {
            stamps.push(self.store.generate_id()?);
        }
        Ok(HintIds {
            stamps,
            refresh_jobs,
        })
    }

    /// Marks the hinted products dirty and stages a refresh job for each
    /// of their stores that has none waiting, inside the caller's transaction.
    fn stage_hints(
        &self,
        stock: &TransactionalTree,
        outbox: &TransactionalTree,
        hints: &[StockHint],
        ids: &HintIds,
        now: u64,
    ) -> TxResult<()> {
        for (hint, stamp) in hints.iter().zip(&ids.stamps) {
            let key = pair_key(DIRTY, &hint.store_id, &hint.product_id);
            // Smaregi promises no order: a notice older than the one still
            // waiting must not replace it (the mirror's own check never
            // sees the one it would replace).
            if let (Some(bytes), Some(now)) = (stock.get(&key)?, &hint.updated_at) {
                let waiting: Dirty = tx_decode(&bytes, "dirty")?;
                if waiting
                    .updated_at
                    .as_ref()
                    .is_some_and(|before| now < before)
                {
                    continue;
                }
            }
            let dirty = Dirty {
                stamp: *stamp,
                amount: hint.amount,
                updated_at: hint.updated_at.clone(),
            };
            stock.insert(key, serde_json::to_vec(&dirty).expect("serialises"))?;
        }
        for (group, job_id) in &ids.refresh_jobs {
            if Self::job_waiting(stock, outbox, &store_key(REFRESH_WAITING, group))? {
                continue;
            }
            let job = NewJob {
                kind: REFRESH_KIND.into(),
                upstream: crate::smaregi::jobs::UPSTREAM.into(),
                key: format!("stock-refresh:{group}"),
                payload: json!({"v": 1, "store": group}),
            };
            widen_abort(Queue::stage(outbox, *job_id, &job, now))?;
            stock.insert(store_key(REFRESH_WAITING, group), &job_id.to_be_bytes())?;
        }
        Ok(())
    }

    /// Stages a back-fill unless one is waiting; durable after a commit.
    pub fn stage_backfill(&self) -> Result<(), StockError> {
        let job_id = self.store.generate_id()?;
        let now = self.now();
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            if !Self::job_waiting(stock, outbox, BACKFILL_WAITING)? {
                self.stage_backfill_in(stock, outbox, job_id, now)?;
            }
            Ok(())
        });
        self.finish(result)
    }

    fn stage_backfill_in(
        &self,
        stock: &TransactionalTree,
        outbox: &TransactionalTree,
        job_id: u64,
        now: u64,
    ) -> TxResult<()> {
        let job = NewJob {
            kind: BACKFILL_KIND.into(),
            upstream: crate::smaregi::jobs::UPSTREAM.into(),
            key: BACKFILL_KEY.into(),
            payload: json!({"v": 1}),
        };
        widen_abort(Queue::stage(outbox, job_id, &job, now))?;
        stock.insert(BACKFILL_WAITING, &job_id.to_be_bytes())?;
        Ok(())
    }

    /// The id of the last `StockHistory` change back-filled.
    pub fn backfill_cursor(&self) -> Result<u64, StockError> {
        let bytes = self.store.check(self.tree.get(BACKFILL_CURSOR))?;
        bytes
            .map(|b| {
                b.as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StockError::Corrupt("back-fill cursor".into()))
            })
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Records a page of back-filled changes: their products become dirty
    /// (refresh jobs staged), the cursor moves past them, and another
    /// back-fill is staged if the page was full. One transaction.
    fn record_backfill(
        &self,
        changes: &[(u64, String, String)],
        full_page: bool,
        next_job_id: u64,
    ) -> Result<(), StockError> {
        let Some(last) = changes.last().map(|c| c.0) else {
            return Ok(());
        };
        let hints: Vec<StockHint> = changes
            .iter()
            .filter(|(_, store, _)| self.follows(store))
            .map(|(_, store, product)| StockHint {
                store_id: store.clone(),
                product_id: product.clone(),
                amount: None,
                updated_at: None,
            })
            .collect();
        let ids = self.ids_for(&hints)?;
        let now = self.now();
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            self.stage_hints(stock, outbox, &hints, &ids, now)?;
            stock.insert(BACKFILL_CURSOR, &last.to_be_bytes())?;
            if full_page && !Self::job_waiting(stock, outbox, BACKFILL_WAITING)? {
                self.stage_backfill_in(stock, outbox, next_job_id, now)?;
            }
            Ok(())
        });
        self.finish(result)
    }

    fn finish<T>(&self, result: Result<T, TransactionError<StockError>>) -> Result<T, StockError> {
        match result {
            Ok(value) => Ok(value),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => {
                Err(self.store.check::<()>(Err(e)).unwrap_err().into())
            }
        }
    }

    /// The mirror's value for one product.
    pub fn mirrored(&self, store: &str, product: &str) -> Result<Option<Mirrored>, StockError> {
        let bytes = self
            .store
            .check(self.tree.get(pair_key(MIRROR, store, product)))?;
        bytes.map(|b| decode(&b, "mirror")).transpose()
    }

    /// `product`'s stock in `store`, or in every store the mirror knows it in.
    pub fn product_everywhere(
        &self,
        product: &str,
        store: Option<&str>,
    ) -> Result<Vec<(String, Mirrored)>, StockError> {
        if let Some(store) = store {
            return Ok(self
                .mirrored(store, product)?
                .map(|m| (store.to_owned(), m))
                .into_iter()
                .collect());
        }
        // Keys lead with the store: a product across stores is a scan, of
        // the mirror's keys only (a store's few thousand products).
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([MIRROR]) {
            let (key, value) = self.store.check(item)?;
            let Some((store, found)) = split_pair(&key) else {
                continue;
            };
            if found == product {
                out.push((store, decode(&value, "mirror")?));
            }
        }
        Ok(out)
    }

    /// Every product of `store` in the mirror.
    pub fn mirror_of(&self, store: &str) -> Result<Vec<(String, Mirrored)>, StockError> {
        let mut prefix = store_key(MIRROR, store);
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (key, value) = self.store.check(item)?;
            let (_, product) =
                split_pair(&key).ok_or_else(|| StockError::Corrupt("mirror key".into()))?;
            out.push((product, decode(&value, "mirror")?));
        }
        Ok(out)
    }

    fn dirty_of(&self, store: &str) -> Result<Vec<(String, Dirty)>, StockError> {
        let mut prefix = store_key(DIRTY, store);
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (key, value) = self.store.check(item)?;
            let (_, product) =
                split_pair(&key).ok_or_else(|| StockError::Corrupt("dirty key".into()))?;
            out.push((product, decode(&value, "dirty")?));
        }
        Ok(out)
    }

    /// Records what a refresh learned: clears the dirty marks it answered,
    /// updates the mirror where the news is not older, consumes the
    /// `echoes` (read before Smaregi was) of the products it refreshed,
    /// and queues what changed for the downstream, in one transaction.
    /// Durable after the caller's commit.
    fn record_refresh(
        &self,
        learned: &[Learned],
        echoes: &[(Vec<u8>, Echo)],
        live_holds: &BTreeSet<DownstreamKey>,
        push_job_id: u64,
    ) -> Result<usize, StockError> {
        let now = self.now();
        let downstream = self.config.downstream.is_some();
        let delta_mode = self.mode() == Some(DownstreamMode::Delta);
        let refreshed: BTreeSet<(String, String)> = learned
            .iter()
            .map(|l| (l.store_id.clone(), l.product.clone()))
            .collect();
        let result =
            (&self.tree, self.queue.tree(), &self.ledger).transaction(|(stock, outbox, ledger)| {
                let mut changed = 0;
                let mut queued = 0;
                // Queues a product for the regular push, unless a rejected
                // batch holds it (its parked job sends it).
                let queue_out = |store: &str, product: &str, stamp: u64| -> TxResult<bool> {
                    let dkey = (self.downstream_store(store), product.to_owned());
                    let held_key = pair_key(HELD, &dkey.0, &dkey.1);
                    if stock.get(&held_key)?.is_some() {
                        if live_holds.contains(&dkey) {
                            return Ok(false);
                        }
                        // Its job was discarded: the product is free again.
                        stock.remove(held_key)?;
                    }
                    stock.insert(pair_key(OUTGOING, store, product), &stamp.to_be_bytes())?;
                    Ok(true)
                };
                for Learned {
                    store_id,
                    product,
                    dirty,
                    amount,
                    updated_at,
                } in learned
                {
                    let dirty_key = pair_key(DIRTY, store_id, product);
                    if let Some(current) = stock.get(&dirty_key)? {
                        let current: Dirty = tx_decode(&current, "dirty")?;
                        if current.stamp == dirty.stamp {
                            stock.remove(dirty_key)?;
                        }
                    }
                    let mirror_key = pair_key(MIRROR, store_id, product);
                    let previous: Option<Mirrored> = match stock.get(&mirror_key)? {
                        Some(bytes) => Some(tx_decode(&bytes, "mirror")?),
                        None => None,
                    };
                    if let Some(previous) = &previous {
                        let older = match (&previous.updated_at, updated_at) {
                            (Some(before), Some(now)) => now < before,
                            _ => false,
                        };
                        if older || previous.amount == *amount {
                            continue;
                        }
                    }
                    let mirrored = Mirrored {
                        amount: *amount,
                        updated_at: updated_at.clone(),
                        learned_at: now,
                        stamp: dirty.stamp,
                    };
                    stock.insert(
                        mirror_key,
                        serde_json::to_vec(&mirrored).expect("serialises"),
                    )?;
                    if downstream && queue_out(store_id, product, dirty.stamp)? {
                        queued += 1;
                    }
                    changed += 1;
                }
                // The echoes as they are now: a record consumed meanwhile is gone.
                let mut current_echoes = Vec::with_capacity(echoes.len());
                for (key, _) in echoes {
                    if let Some(bytes) = ledger.get(key)? {
                        current_echoes.push((key.clone(), tx_decode::<Echo>(&bytes, "echo")?));
                    }
                }
                let plan = delta::plan_echoes(&current_echoes, &refreshed, &|store| {
                    (delta_mode && self.follows(store)).then(|| self.downstream_store(store))
                });
                for (key, rest) in &plan.records {
                    match rest {
                        None => {
                            ledger.remove(key.clone())?;
                        }
                        Some(rest) => {
                            ledger.insert(
                                key.clone(),
                                serde_json::to_vec(rest).expect("serialises"),
                            )?;
                        }
                    }
                }
                for ((dstore, product), change) in &plan.baselines {
                    let key = pair_key(BASELINE, dstore, product);
                    // Without a baseline the first value sent is the start,
                    // and it already includes the registration.
                    let Some(bytes) = stock.get(&key)? else {
                        continue;
                    };
                    let baseline = tx_i64(&bytes, "baseline")?;
                    stock.insert(key, &baseline.saturating_add(*change).to_be_bytes())?;
                    // The push decides whether anything is left to send (a
                    // refresh that read the sale before its echo was
                    // recorded sent it; this sends it back).
                    let store = &self.stores_behind(dstore)[0];
                    if *change != 0 && queue_out(store, product, push_job_id)? {
                        queued += 1;
                    }
                }
                if queued > 0 && !Self::job_waiting(stock, outbox, PUSH_WAITING)? {
                    self.stage_push(stock, outbox, push_job_id, now)?;
                }
                Ok(changed)
            });
        self.finish(result)
    }

    fn stage_push(
        &self,
        stock: &TransactionalTree,
        outbox: &TransactionalTree,
        job_id: u64,
        now: u64,
    ) -> TxResult<()> {
        let job = NewJob {
            kind: PUSH_KIND.into(),
            upstream: DOWNSTREAM.into(),
            key: PUSH_KEY.into(),
            payload: json!({"v": 1}),
        };
        widen_abort(Queue::stage(outbox, job_id, &job, now))?;
        stock.insert(PUSH_WAITING, &job_id.to_be_bytes())?;
        Ok(())
    }

    /// Whether the waiting mark `mark` (`J`, `W` or `B`) names a job that
    /// will still start. A job starts by removing its mark, so one an
    /// operator discarded before it started leaves its mark behind; such a
    /// mark must not keep the next job from being staged, or forwarding
    /// would stop for good.
    fn job_waiting(
        stock: &TransactionalTree,
        outbox: &TransactionalTree,
        mark: &[u8],
    ) -> TxResult<bool> {
        let Some(value) = stock.get(mark)? else {
            return Ok(false);
        };
        let id = u64_of(&value, "waiting job").map_err(ConflictableTransactionError::Abort)?;
        widen_abort(Queue::is_unfinished_in(outbox, id))
    }

    /// `(store, product)`s that sends of ours under way may have moved
    /// (see [`ledger::in_flight`]); a send older than
    /// [`IN_FLIGHT_PATIENCE`] is not waited for.
    fn moved_by_sends_in_flight(&self) -> Result<BTreeSet<(String, String)>, StockError> {
        let now = self.now();
        let sends = self.store.check(ledger::in_flight(&self.ledger))?;
        Ok(sends
            .into_iter()
            .filter(|send| send.since + IN_FLIGHT_PATIENCE.as_millis() as u64 > now)
            .flat_map(|send| {
                let store = send.echo.store_id;
                send.echo
                    .moves
                    .into_iter()
                    .map(move |(product, _)| (store.clone(), product))
            })
            .collect())
    }

    /// The pending echo records of the relay's registrations.
    fn pending_echoes(&self) -> Result<Vec<(Vec<u8>, Echo)>, StockError> {
        let mut out = Vec::new();
        for item in self.ledger.scan_prefix([ECHO]) {
            let (key, value) = self.store.check(item)?;
            out.push((key.to_vec(), decode(&value, "echo")?));
        }
        Ok(out)
    }

    /// The products held by a rejected batch whose job is still waiting
    /// for an operator (or for its attempt): a discarded job holds nothing.
    fn live_holds(&self) -> Result<BTreeMap<DownstreamKey, u64>, StockError> {
        let mut jobs = BTreeMap::new();
        let mut out = BTreeMap::new();
        for item in self.tree.scan_prefix([HELD]) {
            let (key, value) = self.store.check(item)?;
            let dkey = split_pair(&key).ok_or_else(|| StockError::Corrupt("held key".into()))?;
            let job = u64_of(&value, "held job")?;
            let live = match jobs.get(&job) {
                Some(live) => *live,
                None => {
                    let live = self
                        .queue
                        .job(job)?
                        .is_some_and(|j| matches!(j.state, JobState::Pending | JobState::Parked));
                    jobs.insert(job, live);
                    live
                }
            };
            if live {
                out.insert(dkey, job);
            }
        }
        Ok(out)
    }

    /// Up to `limit` products waiting for the downstream, with their stamp.
    fn outgoing(&self, limit: usize) -> Result<Vec<(String, String, u64)>, StockError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([OUTGOING]).take(limit) {
            let (key, value) = self.store.check(item)?;
            let (store, product) =
                split_pair(&key).ok_or_else(|| StockError::Corrupt("outgoing key".into()))?;
            out.push((store, product, u64_of(&value, "outgoing stamp")?));
        }
        Ok(out)
    }

    /// The products a held job holds.
    fn held_by(&self, job: u64) -> Result<Vec<DownstreamKey>, StockError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([HELD]) {
            let (key, value) = self.store.check(item)?;
            if u64_of(&value, "held job")? == job {
                out.push(split_pair(&key).ok_or_else(|| StockError::Corrupt("held key".into()))?);
            }
        }
        Ok(out)
    }

    /// The delta batch stored for `job`, if any.
    fn stored_batch(&self, job: u64) -> Result<Option<(BatchHead, Vec<Item>)>, StockError> {
        let Some(head) = self.store.check(self.tree.get(job_key(BATCH_HEAD, job)))? else {
            return Ok(None);
        };
        let head: BatchHead = decode(&head, "batch head")?;
        let mut items = Vec::with_capacity(head.count as usize);
        for index in 0..head.count {
            let bytes = self
                .store
                .check(self.tree.get(item_key(job, index)))?
                .ok_or_else(|| StockError::Corrupt(format!("batch item {index} of job {job}")))?;
            items.push(decode(&bytes, "batch item")?);
        }
        Ok(Some((head, items)))
    }

    /// Reads what the downstream would get for `dkeys` now: per key, the
    /// true value (or sum), the latest Smaregi time and the mirror stamps
    /// behind it. `None` for a key the mirror does not know.
    fn current_of(
        stock: &TransactionalTree,
        stores: &[String],
        product: &str,
    ) -> TxResult<Option<Current>> {
        let mut total = 0i64;
        let mut latest: Option<String> = None;
        let mut marks = Vec::new();
        for store in stores {
            if let Some(bytes) = stock.get(pair_key(MIRROR, store, product))? {
                let mirrored: Mirrored = tx_decode(&bytes, "mirror")?;
                total = total.saturating_add(mirrored.amount);
                latest = latest.max(mirrored.updated_at);
                marks.push((store.clone(), mirrored.stamp));
            }
        }
        Ok((!marks.is_empty()).then_some((total, latest, marks)))
    }

    /// Builds the batch for `dkeys` in one transaction: absolute values,
    /// or (delta mode) the changes, stored under `job` before anything is
    /// sent. Keys with nothing to send have their outgoing marks cleared
    /// (when no newer value replaced them). Returns the items.
    fn build_batch(
        &self,
        job: u64,
        dkeys: &[Queued],
        catalog: &dyn Catalog,
    ) -> Result<Vec<Item>, StockError> {
        let delta_mode = self.mode() == Some(DownstreamMode::Delta);
        let summed = self.summed().join("+");
        let webhook_id = format!("stock_{:032x}", rand::random::<u128>());
        let result = self.tree.transaction(|stock| {
            let mut items = Vec::new();
            for ((dstore, product), marks) in dkeys {
                let stores = self.stores_behind(dstore);
                let Some((value, updated_at, stamps)) = Self::current_of(stock, &stores, product)?
                else {
                    clear_marks(stock, product, marks)?;
                    continue;
                };
                let mut change = None;
                if delta_mode {
                    let key = pair_key(BASELINE, dstore, product);
                    let baseline = match stock.get(&key)? {
                        Some(bytes) => Some(tx_i64(&bytes, "baseline")?),
                        None => None,
                    };
                    match delta::change_to_send(value, baseline) {
                        Some(0) => {
                            clear_marks(stock, product, marks)?;
                            continue;
                        }
                        Some(d) => change = Some(d),
                        None => {
                            stock.insert(key, &value.to_be_bytes())?;
                            clear_marks(stock, product, marks)?;
                            continue;
                        }
                    }
                } else if stores.len() > 1 && *dstore == summed {
                    // A transfer between summed stores leaves the sum as it was.
                    if let Some(bytes) = stock.get(store_key(SUM_SENT, product))? {
                        if tx_i64(&bytes, "sum sent")? == value {
                            clear_marks(stock, product, marks)?;
                            continue;
                        }
                    }
                }
                // What was queued is cleared at acknowledgement if no newer
                // value replaced it; stores not queued keep their stamp.
                let mut stamps_sent = marks.clone();
                for (store, stamp) in stamps {
                    if !stamps_sent.iter().any(|(s, _)| *s == store) {
                        stamps_sent.push((store, stamp));
                    }
                }
                items.push(Item {
                    store_id: dstore.clone(),
                    product: product.clone(),
                    stock: value,
                    delta: change,
                    updated_at,
                    external_code: catalog.external_code_for(product),
                    mapping_version: catalog.version(),
                    marks: stamps_sent,
                });
            }
            if delta_mode && !items.is_empty() {
                let head = BatchHead {
                    webhook_id: webhook_id.clone(),
                    count: items.len() as u32,
                };
                stock.insert(
                    job_key(BATCH_HEAD, job),
                    serde_json::to_vec(&head).expect("serialises"),
                )?;
                for (index, item) in items.iter().enumerate() {
                    stock.insert(
                        item_key(job, index as u32),
                        serde_json::to_vec(item).expect("serialises"),
                    )?;
                }
            }
            Ok(items)
        });
        self.finish(result)
    }

    /// The downstream took `items` (sent by `job`): clears their outgoing
    /// marks (unless a newer value replaced them), moves delta baselines
    /// by what was sent, notes sums sent, releases products `job` held,
    /// clears its stored batch, and stages the next push if any product is
    /// waiting. One transaction, then a commit.
    async fn record_accepted(&self, job: u64, items: &[Item]) -> Result<(), StockError> {
        let now = self.now();
        let delta_mode = self.mode() == Some(DownstreamMode::Delta);
        let held = self.held_by(job)?;
        let next_job_id = self.store.generate_id()?;
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            let mut requeued = false;
            for item in items {
                clear_marks(stock, &item.product, &item.marks)?;
                stock.remove(pair_key(SUSPECT, &item.store_id, &item.product))?;
                if let Some(change) = item.delta {
                    let key = pair_key(BASELINE, &item.store_id, &item.product);
                    let baseline = match stock.get(&key)? {
                        Some(bytes) => tx_i64(&bytes, "baseline")?,
                        None => item.stock - change,
                    };
                    stock.insert(key, &delta::acknowledge(baseline, change).to_be_bytes())?;
                } else if self.stores_behind(&item.store_id).len() > 1 {
                    stock.insert(
                        store_key(SUM_SENT, &item.product),
                        &item.stock.to_be_bytes(),
                    )?;
                }
            }
            for (dstore, product) in &held {
                stock.remove(pair_key(HELD, dstore, product))?;
                // Changes made while it was held go out with the regular
                // pushes: in delta mode the push finds whether anything is
                // left; in absolute mode, when the mirror moved on.
                let sent = items
                    .iter()
                    .find(|i| i.store_id == *dstore && i.product == *product);
                for store in self.stores_behind(dstore) {
                    let Some(bytes) = stock.get(pair_key(MIRROR, &store, product))? else {
                        continue;
                    };
                    let mirrored: Mirrored = tx_decode(&bytes, "mirror")?;
                    let was_sent =
                        sent.is_some_and(|i| i.marks.contains(&(store.clone(), mirrored.stamp)));
                    if delta_mode || !was_sent {
                        stock.insert(
                            pair_key(OUTGOING, &store, product),
                            &mirrored.stamp.to_be_bytes(),
                        )?;
                        requeued = true;
                    }
                }
            }
            remove_batch(stock, job, items.len())?;
            if requeued && !Self::job_waiting(stock, outbox, PUSH_WAITING)? {
                self.stage_push(stock, outbox, next_job_id, now)?;
            }
            Ok(())
        });
        self.finish(result)?;
        self.restage_if_waiting(now).await
    }

    /// Stages a regular push if products wait and none is staged; commits.
    async fn restage_if_waiting(&self, now: u64) -> Result<(), StockError> {
        // A transaction cannot scan: whether more are waiting is read after it.
        if !self.outgoing(1)?.is_empty() {
            let next_job_id = self.store.generate_id()?;
            let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
                if !Self::job_waiting(stock, outbox, PUSH_WAITING)? {
                    self.stage_push(stock, outbox, next_job_id, now)?;
                }
                Ok(())
            });
            self.finish(result)?;
        }
        self.store.commit().await?;
        Ok(())
    }

    /// The downstream rejected the regular push `items`; the stored batch
    /// goes (nothing was applied). Several products become suspects, to
    /// be sent again in batches of half the size; a product refused alone
    /// gets a held job of its own, which parks with `reason` and holds it
    /// (its outgoing marks go: the held job sends it). The regular pushes
    /// go on. Returns the held job, if any.
    async fn record_rejected(
        &self,
        job: u64,
        items: &[Item],
        reason: &str,
    ) -> Result<Option<u64>, StockError> {
        let now = self.now();
        if items.len() > 1 {
            let size = items.len().div_ceil(2) as u32;
            let result = self.tree.transaction(|stock| {
                for item in items {
                    stock.insert(
                        pair_key(SUSPECT, &item.store_id, &item.product),
                        &size.to_be_bytes(),
                    )?;
                }
                remove_batch(stock, job, items.len())?;
                Ok(())
            });
            self.finish(result)?;
            self.restage_if_waiting(now).await?;
            return Ok(None);
        }
        let held_job = self.store.generate_id()?;
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            let new = NewJob {
                kind: HELD_KIND.into(),
                upstream: DOWNSTREAM.into(),
                key: format!("stock-push-held:{held_job}"),
                payload: json!({"v": 1, "reason": reason}),
            };
            widen_abort(Queue::stage(outbox, held_job, &new, now))?;
            for item in items {
                stock.remove(pair_key(SUSPECT, &item.store_id, &item.product))?;
                stock.insert(
                    pair_key(HELD, &item.store_id, &item.product),
                    &held_job.to_be_bytes(),
                )?;
                for store in self.stores_behind(&item.store_id) {
                    stock.remove(pair_key(OUTGOING, &store, &item.product))?;
                }
            }
            remove_batch(stock, job, items.len())?;
            Ok(())
        });
        self.finish(result)?;
        self.restage_if_waiting(now).await?;
        Ok(Some(held_job))
    }

    /// The next suspects to send, with the outgoing marks behind them:
    /// as many as the first one's batch size says.
    fn next_suspects(&self) -> Result<Vec<Queued>, StockError> {
        let mut out = Vec::new();
        let mut size = usize::MAX;
        for item in self.tree.scan_prefix([SUSPECT]) {
            if out.len() >= size {
                break;
            }
            let (key, value) = self.store.check(item)?;
            let dkey = split_pair(&key).ok_or_else(|| StockError::Corrupt("suspect key".into()))?;
            let wanted = value
                .as_ref()
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| StockError::Corrupt("suspect size".into()))?;
            size = size.min((wanted as usize).max(1));
            let mut marks = Vec::new();
            for store in self.stores_behind(&dkey.0) {
                if let Some(stamp) = self
                    .store
                    .check(self.tree.get(pair_key(OUTGOING, &store, &dkey.1)))?
                {
                    marks.push((store, u64_of(&stamp, "outgoing stamp")?));
                }
            }
            out.push((dkey, marks));
        }
        Ok(out)
    }

    /// Forgets suspects that turned out to have nothing to send.
    fn clear_suspects(&self, keys: &[DownstreamKey]) -> Result<(), StockError> {
        let result = self.tree.transaction(|stock| {
            for (dstore, product) in keys {
                stock.remove(pair_key(SUSPECT, dstore, product))?;
            }
            Ok(())
        });
        self.finish(result)
    }

    /// Makes a stored delta batch durable before it is first sent.
    async fn commit_stored_batch(&self) -> Result<(), StockError> {
        if self.mode() == Some(DownstreamMode::Delta) {
            self.store.commit().await?;
        }
        Ok(())
    }

    /// A held job's batch was rejected again: forgets it (nothing was
    /// applied), the products stay held.
    async fn forget_batch(&self, job: u64, items: usize) -> Result<(), StockError> {
        let result = self
            .tree
            .transaction(|stock| remove_batch(stock, job, items));
        self.finish(result)?;
        self.store.commit().await?;
        Ok(())
    }
}

/// What the downstream would get for a key now: the value (or sum), the
/// latest Smaregi time, and the mirror stamps behind it, per store.
type Current = (i64, Option<String>, Vec<(String, u64)>);

/// A downstream key to send, with the outgoing marks (store, stamp) behind it.
type Queued = (DownstreamKey, Vec<(String, u64)>);

/// What a stored delta batch is sent as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BatchHead {
    pub webhook_id: String,
    pub count: u32,
}

/// One product of a batch, as sent (and, in delta mode, stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Item {
    /// The downstream store id.
    pub store_id: String,
    pub product: String,
    /// The true value (a sum for summed stores), before the clamp.
    pub stock: i64,
    /// Delta mode: the change to apply.
    pub delta: Option<i64>,
    pub updated_at: Option<String>,
    pub external_code: Option<String>,
    pub mapping_version: u64,
    /// The mirror stamps behind it, per store.
    pub marks: Vec<(String, u64)>,
}

fn job_key(tag: u8, job: u64) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(&job.to_be_bytes());
    key
}

fn item_key(job: u64, index: u32) -> Vec<u8> {
    let mut key = job_key(BATCH_ITEM, job);
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn u64_of(bytes: &[u8], what: &str) -> Result<u64, StockError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StockError::Corrupt(what.into()))
}

fn tx_i64(bytes: &[u8], what: &str) -> TxResult<i64> {
    bytes
        .try_into()
        .map(i64::from_be_bytes)
        .map_err(|_| ConflictableTransactionError::Abort(StockError::Corrupt(what.into())))
}

/// Clears outgoing marks that still carry the stamps seen.
fn clear_marks(stock: &TransactionalTree, product: &str, marks: &[(String, u64)]) -> TxResult<()> {
    for (store, stamp) in marks {
        let key = pair_key(OUTGOING, store, product);
        if stock.get(&key)?.as_deref() == Some(&stamp.to_be_bytes()[..]) {
            stock.remove(key)?;
        }
    }
    Ok(())
}

fn remove_batch(stock: &TransactionalTree, job: u64, items: usize) -> TxResult<()> {
    stock.remove(job_key(BATCH_HEAD, job))?;
    for index in 0..items {
        stock.remove(item_key(job, index as u32))?;
    }
    Ok(())
}

/// Refreshes the dirty products of one store from Smaregi.
pub struct RefreshExecutor {
    book: StockBook,
    client: SmaregiClient,
}

impl Executor for RefreshExecutor {
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            let payload: RefreshPayload = match serde_json::from_value(job.payload.clone()) {
                Ok(payload) => payload,
                Err(e) => {
                    return AttemptOutcome::Undecodable {
                        reason: format!("the payload does not decode: {e}"),
                    }
                }
            };
            match self.refresh(&payload.store).await {
                Ok(outcome) => outcome,
                Err(e) => AttemptOutcome::Retry {
                    reason: format!("cannot read or write the stock mirror: {e}"),
                    retry_after: None,
                },
            }
        })
    }
}

impl RefreshExecutor {
    /// Refreshes every dirty product of a refresh group (one store, or
    /// the summed stores together) and records them in one transaction.
    async fn refresh(&self, group: &str) -> Result<AttemptOutcome, StockError> {
        let book = &self.book;
        // From here on a new notice needs a job of its own.
        book.store
            .check(book.tree.remove(store_key(REFRESH_WAITING, group)))?;
        // Echoes recorded before Smaregi is read are in what it answers.
        let echoes = book.pending_echoes()?;
        let trust_notice = book.config.source == StockSource::Notification;
        let mut learned = Vec::new();
        for store_id in book.stores_of(group) {
            let dirty = book.dirty_of(&store_id)?;
            let to_fetch: Vec<String> = dirty
                .iter()
                .filter(|(_, d)| !(trust_notice && d.amount.is_some()))
                .map(|(product, _)| product.clone())
                .collect();
            let mut fetched = std::collections::HashMap::new();
            if !to_fetch.is_empty() {
                match self.client.stock(&store_id, &to_fetch).await {
                    Ok(rows) => {
                        for row in rows {
                            fetched.insert(row.product_id, (row.amount, Some(row.updated_at)));
                        }
                    }
                    Err(e) => return Ok(e.outcome(false)),
                }
            }
            for (product, dirty) in dirty {
                let (amount, updated_at) = match dirty.amount {
                    Some(amount) if trust_notice => (amount, dirty.updated_at.clone()),
                    // No Stock row means 0 (SMAREGI.md §1).
                    _ => fetched.get(&product).cloned().unwrap_or((0, None)),
                };
                learned.push(Learned {
                    store_id: store_id.clone(),
                    product,
                    dirty,
                    amount,
                    updated_at,
                });
            }
        }
        // In delta mode, a product one of our own sends may already have
        // moved, with no echo recorded yet, waits (stays dirty) until the
        // send is recorded: sending that change would count our sale.
        let deferred = if book.mode() == Some(DownstreamMode::Delta) {
            let moving = book.moved_by_sends_in_flight()?;
            let before = learned.len();
            learned.retain(|l| !moving.contains(&(l.store_id.clone(), l.product.clone())));
            before - learned.len()
        } else {
            0
        };
        if !learned.is_empty() {
            let push_id = book.store.generate_id()?;
            let holds: BTreeSet<DownstreamKey> = book.live_holds()?.into_keys().collect();
            let changed = book.record_refresh(&learned, &echoes, &holds, push_id)?;
            book.store.commit().await?;
            info!(group, products = learned.len(), changed, "stock: refreshed");
        }
        if deferred > 0 {
            return Ok(AttemptOutcome::Retry {
                reason: format!(
                    "{deferred} products wait until the relay's own registration being sent is recorded"
                ),
                retry_after: Some(IN_FLIGHT_RECHECK),
            });
        }
        Ok(AttemptOutcome::Success)
    }
}

/// Reads Smaregi's `StockHistory` past the cursor, so that changes whose
/// notifications never arrived (the relay down, the line cut) are
/// refreshed too. Each change moves the cursor once.
pub struct BackfillExecutor {
    book: StockBook,
    client: SmaregiClient,
}

impl Executor for BackfillExecutor {
    fn execute<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            match self.backfill().await {
                Ok(outcome) => outcome,
                Err(e) => AttemptOutcome::Retry {
                    reason: format!("cannot read or write the stock mirror: {e}"),
                    retry_after: None,
                },
            }
        })
    }
}

impl BackfillExecutor {
    async fn backfill(&self) -> Result<AttemptOutcome, StockError> {
        let book = &self.book;
        book.store.check(book.tree.remove(BACKFILL_WAITING))?;
        let cursor = book.backfill_cursor()?;
        let changes = match self.client.stock_history(cursor, BACKFILL_PAGE).await {
            Ok(changes) => changes,
            Err(e) => return Ok(e.outcome(false)),
        };
        let next = book.store.generate_id()?;
        book.record_backfill(&changes, changes.len() == BACKFILL_PAGE, next)?;
        book.store.commit().await?;
        if !changes.is_empty() {
            info!(
                after = cursor,
                changes = changes.len(),
                "stock: back-filled changes from StockHistory"
            );
        }
        Ok(AttemptOutcome::Success)
    }
}

/// Sends changed stock to the downstream in signed batches: the regular
/// pushes ([`PUSH_KIND`]) and the pushes of rejected products
/// ([`HELD_KIND`]).
pub struct PushExecutor {
    book: StockBook,
    http: reqwest::Client,
    url: String,
    key: Vec<u8>,
    batch_size: usize,
    clamp: Clamp,
    catalog: Arc<dyn Catalog>,
    held: bool,
}

/// What the downstream made of a batch.
enum Answer {
    Accepted,
    Rejected(String),
    Failed(AttemptOutcome),
}

impl Executor for PushExecutor {
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            let result = if self.held {
                self.push_held(job).await
            } else {
                self.push(job).await
            };
            match result {
                Ok(outcome) => outcome,
                Err(e) => AttemptOutcome::Retry {
                    reason: format!("cannot read or write the stock mirror: {e}"),
                    retry_after: None,
                },
            }
        })
    }
}

impl PushExecutor {
    /// The regular push: the next batch of queued products.
    async fn push(&self, job: &Job) -> Result<AttemptOutcome, StockError> {
        let book = &self.book;
        book.store.check(book.tree.remove(PUSH_WAITING))?;
        let items = match book.stored_batch(job.id)? {
            // Delta mode, after a failed attempt or a crash: the same batch.
            Some((_, items)) => items,
            None => {
                let holds = book.live_holds()?;
                // Products of a rejected batch first, in smaller batches.
                let suspects = book.next_suspects()?;
                let dkeys: BTreeMap<DownstreamKey, Vec<(String, u64)>> = if suspects.is_empty() {
                    let mut dkeys: BTreeMap<DownstreamKey, Vec<(String, u64)>> = BTreeMap::new();
                    for (store, product, stamp) in book.outgoing(self.batch_size)? {
                        let dkey = (book.downstream_store(&store), product);
                        dkeys.entry(dkey).or_default().push((store, stamp));
                    }
                    dkeys
                } else {
                    suspects.into_iter().collect()
                };
                let (held, free): (Vec<_>, Vec<_>) = dkeys
                    .into_iter()
                    .partition(|(dkey, _)| holds.contains_key(dkey));
                let held_keys: Vec<DownstreamKey> =
                    held.iter().map(|(dkey, _)| dkey.clone()).collect();
                if !held.is_empty() {
                    // Queued before their hold; the held job sends them.
                    let result = book.tree.transaction(|stock| {
                        for ((_, product), marks) in &held {
                            clear_marks(stock, product, marks)?;
                        }
                        Ok(())
                    });
                    book.finish(result)?;
                }
                if free.is_empty() {
                    book.clear_suspects(&held_keys)?;
                    book.restage_if_waiting(book.now()).await?;
                    return Ok(AttemptOutcome::Success);
                }
                let items = book.build_batch(job.id, &free, self.catalog.as_ref())?;
                let idle: Vec<DownstreamKey> = free
                    .iter()
                    .map(|(dkey, _)| dkey.clone())
                    .chain(held_keys)
                    .filter(|(dstore, product)| {
                        !items
                            .iter()
                            .any(|i| i.store_id == *dstore && i.product == *product)
                    })
                    .collect();
                book.clear_suspects(&idle)?;
                book.commit_stored_batch().await?;
                items
            }
        };
        if items.is_empty() {
            book.restage_if_waiting(book.now()).await?;
            return Ok(AttemptOutcome::Success);
        }
        match self.send(job.id, &items).await? {
            Answer::Accepted => {
                book.record_accepted(job.id, &items).await?;
                Ok(AttemptOutcome::Success)
            }
            Answer::Rejected(reason) => {
                match book.record_rejected(job.id, &items, &reason).await? {
                    Some(held) => warn!(
                        job = job.id,
                        held_job = held,
                        product = %items[0].product,
                        reason,
                        "stock: the downstream refused a product; it waits for an operator, the others go on"
                    ),
                    None => info!(
                        job = job.id,
                        products = items.len(),
                        reason,
                        "stock: the downstream rejected a batch; sending its products in smaller batches to find the one it refuses"
                    ),
                }
                Ok(AttemptOutcome::Success)
            }
            Answer::Failed(outcome) => Ok(outcome),
        }
    }

    /// A rejected batch's products: parks on its first attempt with the
    /// downstream's answer; once an operator retries it, sends them.
    async fn push_held(&self, job: &Job) -> Result<AttemptOutcome, StockError> {
        if job.attempts == 0 {
            if let Some(reason) = job.payload.get("reason").and_then(|r| r.as_str()) {
                return Ok(AttemptOutcome::Permanent {
                    reason: reason.to_owned(),
                });
            }
        }
        let book = &self.book;
        let items = match book.stored_batch(job.id)? {
            Some((_, items)) => items,
            None => {
                let dkeys: Vec<(DownstreamKey, Vec<(String, u64)>)> = book
                    .held_by(job.id)?
                    .into_iter()
                    .map(|dkey| (dkey, Vec::new()))
                    .collect();
                let items = book.build_batch(job.id, &dkeys, self.catalog.as_ref())?;
                book.commit_stored_batch().await?;
                items
            }
        };
        // Nothing left to send (delta mode: no change) still releases them.
        let answer = if items.is_empty() {
            Answer::Accepted
        } else {
            self.send(job.id, &items).await?
        };
        match answer {
            Answer::Accepted => {
                book.record_accepted(job.id, &items).await?;
                info!(
                    job = job.id,
                    products = items.len(),
                    "stock: rejected products delivered"
                );
                Ok(AttemptOutcome::Success)
            }
            Answer::Rejected(reason) => {
                book.forget_batch(job.id, items.len()).await?;
                Ok(AttemptOutcome::Permanent { reason })
            }
            Answer::Failed(outcome) => Ok(outcome),
        }
    }

    /// Sends `items` once, signed; a stored delta batch under its stored
    /// webhook-id.
    async fn send(&self, job: u64, items: &[Item]) -> Result<Answer, StockError> {
        let stored = self
            .book
            .stored_batch(job)?
            .map(|(head, _)| head.webhook_id);
        let body = batch_body(items, self.clamp);
        // A delta batch has an id of its own, kept until it is
        // acknowledged: two equal changes are two changes.
        let id = stored.unwrap_or_else(|| absolute_batch_id(&body, items));
        let timestamp = crate::outbox::retry::unix_millis(std::time::SystemTime::now()) / 1000;
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign::signature(&self.key, &id, timestamp, &body),
            )
            .body(body)
            .send()
            .await;
        let response = match response {
            Err(e) if e.is_timeout() => {
                return Ok(Answer::Failed(AttemptOutcome::Retry {
                    reason: format!("the downstream did not answer in time: {e}"),
                    retry_after: None,
                }))
            }
            Err(e) => {
                return Ok(Answer::Failed(AttemptOutcome::Retry {
                    reason: format!("cannot reach the downstream: {e}"),
                    retry_after: None,
                }))
            }
            Ok(response) => response,
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::outbox::retry::parse_retry_after(v, std::time::SystemTime::now()));
        // The status decides; the body is only the reason a person reads.
        let text: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(REASON_BODY_CHARS)
            .collect();
        if status.is_success() {
            return Ok(Answer::Accepted);
        }
        let reason = format!("the downstream answered {status}: {text}");
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            return Ok(Answer::Failed(AttemptOutcome::Retry {
                reason,
                retry_after,
            }));
        }
        Ok(Answer::Rejected(reason))
    }
}

/// An absolute batch's webhook-id, named by its content and by the mirror
/// values behind it: a resend of the same values has the same id (the
/// receiver may drop it), while a batch with anything learned since has
/// another, even a value equal to an earlier one (5, then 4, then 5
/// again, without Smaregi's times, is the same body twice).
fn absolute_batch_id(body: &[u8], items: &[Item]) -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(body);
    for (store, stamp) in items.iter().flat_map(|item| &item.marks) {
        digest.update(store.as_bytes());
        digest.update(&[0]);
        digest.update(&stamp.to_be_bytes());
    }
    std::iter::once("stock_".to_owned())
        .chain(
            digest.finish().as_ref()[..16]
                .iter()
                .map(|b| format!("{b:02x}")),
        )
        .collect()
}

/// The JSON body of a batch; see the README for the format.
pub fn batch_body(items: &[Item], clamp: Clamp) -> Vec<u8> {
    let stock: Vec<serde_json::Value> = items
        .iter()
        .map(|item| {
            let mut value = json!({
                "external_code": item.external_code,
                "smaregi_product_id": item.product,
                "store_id": item.store_id,
                "stock": clamp.apply(item.stock),
                "updated_at": item.updated_at,
                "mapping_version": item.mapping_version,
            });
            if let Some(delta) = item.delta {
                value["delta"] = json!(delta);
            }
            value
        })
        .collect();
    serde_json::to_vec(&json!({ "stock": stock })).expect("serialises")
}

/// Registers the stock executors: refresh when Smaregi is configured,
/// push when a downstream is.
pub fn register_executors(
    builder: EngineBuilder,
    book: &StockBook,
    client: Option<SmaregiClient>,
    downstream: Option<&DownstreamConfig>,
    catalog: Arc<dyn Catalog>,
) -> Result<EngineBuilder, ClientError> {
    let mut builder = builder;
    if let Some(client) = client {
        builder = builder
            .executor(
                REFRESH_KIND,
                crate::smaregi::jobs::UPSTREAM,
                Arc::new(RefreshExecutor {
                    book: book.clone(),
                    client: client.clone(),
                }),
            )
            .executor(
                BACKFILL_KIND,
                crate::smaregi::jobs::UPSTREAM,
                Arc::new(BackfillExecutor {
                    book: book.clone(),
                    client,
                }),
            );
    }
    if let Some(downstream) = downstream {
        let tls = crate::tls::client_config(downstream.ca_file.as_deref())?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(downstream.request_timeout_seconds))
            .user_agent(concat!("smaregi-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let executor = |held: bool| PushExecutor {
            book: book.clone(),
            http: http.clone(),
            url: downstream.url.clone(),
            key: sign::key_of(downstream.secret.expose()),
            batch_size: downstream.batch_size as usize,
            clamp: downstream.clamp,
            catalog: Arc::clone(&catalog),
            held,
        };
        builder = builder
            .executor(PUSH_KIND, DOWNSTREAM, Arc::new(executor(false)))
            .executor(HELD_KIND, DOWNSTREAM, Arc::new(executor(true)));
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(stock: i64, stamp: u64) -> Item {
        Item {
            store_id: "1".into(),
            product: "800".into(),
            stock,
            delta: None,
            updated_at: None,
            external_code: Some("TEA-500".into()),
            mapping_version: 1,
            marks: vec![("1".into(), stamp)],
        }
    }

    #[test]
    fn an_absolute_batch_id_names_the_values_and_when_they_were_learned() {
        let id = |items: &[Item]| absolute_batch_id(&batch_body(items, Clamp::default()), items);
        // A resend of the same values: the same id.
        assert_eq!(id(&[item(5, 10)]), id(&[item(5, 10)]));
        assert!(id(&[item(5, 10)]).starts_with("stock_"));
        // Anything newer: another id, also 5 learned again after a 4.
        assert_ne!(id(&[item(5, 10)]), id(&[item(4, 11)]));
        assert_ne!(id(&[item(5, 10)]), id(&[item(5, 12)]));
    }
}
