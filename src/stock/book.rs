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
//! Latest wins downstream: a push reads the mirror when it sends, never a
//! value captured earlier, and pushes run one at a time (one ordering
//! key), so the downstream never gets an older value after a newer one.
//! Older information never overwrites newer in the mirror either: a value
//! whose Smaregi time is earlier than the mirror's is ignored.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, Transactional,
    TransactionalTree,
};
use tracing::{info, warn};

use super::notice::{read_notice, StockHint, StockNotice};
use super::sign;
use crate::config::{Clamp, DownstreamConfig, StockConfig, StockSource};
use crate::intake::inbox::{Entry, Inbox, InboxError};
use crate::mapping::Catalog;
use crate::outbox::engine::{AttemptOutcome, BoxFuture, EngineBuilder, Executor};
use crate::outbox::job::{Job, NewJob};
use crate::outbox::queue::{Queue, QueueError};
use crate::outbox::retry::unix_millis;
use crate::smaregi::client::{ClientError, SmaregiClient};
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
pub const BACKFILL_KIND: &str = "stock.backfill";
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
    config: Arc<StockConfig>,
}

impl StockBook {
    pub fn open(store: &Store, config: &StockConfig) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree(STOCK)?,
            queue: Queue::open(store)?,
            store: store.clone(),
            config: Arc::new(config.clone()),
        })
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
                inbox.park(seq, entry, &e.to_string())?;
                return Ok(StockNotice::default());
            }
        };
        for skipped in &notice.skipped {
            warn!(seq, row = skipped.row, reason = %skipped.reason, "stock: notification row skipped");
        }
        let ids = self.ids_for(&notice.hints)?;
        let now = unix_millis(std::time::SystemTime::now());
        let result = (inbox.tree(), &self.tree, self.queue.tree()).transaction(
            |(inbox_tx, stock, outbox)| {
                self.stage_hints(stock, outbox, &notice.hints, &ids, now)?;
                widen_abort(Inbox::stage_processed(inbox_tx, seq, entry))?;
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
            let dirty = Dirty {
                stamp: *stamp,
                amount: hint.amount,
                updated_at: hint.updated_at.clone(),
            };
            stock.insert(
                pair_key(DIRTY, &hint.store_id, &hint.product_id),
                serde_json::to_vec(&dirty).expect("serialises"),
            )?;
        }
        for (group, job_id) in &ids.refresh_jobs {
            if stock.get(store_key(REFRESH_WAITING, group))?.is_some() {
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
        let now = unix_millis(std::time::SystemTime::now());
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            if stock.get(BACKFILL_WAITING)?.is_none() {
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
        let now = unix_millis(std::time::SystemTime::now());
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            self.stage_hints(stock, outbox, &hints, &ids, now)?;
            stock.insert(BACKFILL_CURSOR, &last.to_be_bytes())?;
            if full_page && stock.get(BACKFILL_WAITING)?.is_none() {
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

    /// A product's stock summed over the summed stores, and the latest
    /// Smaregi time among them.
    fn sum_of(&self, product: &str) -> Result<(i64, Option<String>), StockError> {
        let mut sum = 0;
        let mut latest: Option<String> = None;
        for store in self.summed() {
            if let Some(mirrored) = self.mirrored(store, product)? {
                sum += mirrored.amount;
                latest = latest.max(mirrored.updated_at);
            }
        }
        Ok((sum, latest))
    }

    /// The sum the downstream last acknowledged for a product.
    fn last_sum_sent(&self, product: &str) -> Result<Option<i64>, StockError> {
        let bytes = self
            .store
            .check(self.tree.get(store_key(SUM_SENT, product)))?;
        bytes
            .map(|b| {
                b.as_ref()
                    .try_into()
                    .map(i64::from_be_bytes)
                    .map_err(|_| StockError::Corrupt("sum sent".into()))
            })
            .transpose()
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
    /// updates the mirror where the news is not older, and queues changed
    /// values for the downstream. Durable after the caller's commit.
    fn record_refresh(&self, learned: &[Learned], push_job_id: u64) -> Result<usize, StockError> {
        let now = unix_millis(std::time::SystemTime::now());
        let downstream = self.config.downstream.is_some();
        let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
            let mut changed = 0;
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
                if downstream {
                    stock.insert(
                        pair_key(OUTGOING, store_id, product),
                        &dirty.stamp.to_be_bytes(),
                    )?;
                }
                changed += 1;
            }
            if changed > 0 && downstream && stock.get(PUSH_WAITING)?.is_none() {
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

    /// Up to `limit` products waiting for the downstream, with their stamp.
    fn outgoing(&self, limit: usize) -> Result<Vec<(String, String, u64)>, StockError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([OUTGOING]).take(limit) {
            let (key, value) = self.store.check(item)?;
            let (store, product) =
                split_pair(&key).ok_or_else(|| StockError::Corrupt("outgoing key".into()))?;
            let stamp = value
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StockError::Corrupt("outgoing stamp".into()))?;
            out.push((store, product, stamp));
        }
        Ok(out)
    }

    /// Clears the outgoing marks a push delivered (unless a newer value
    /// replaced them meanwhile); stages the next push if any are left.
    fn record_pushed(
        &self,
        sent: &[(String, String, u64)],
        sums: &std::collections::BTreeMap<String, i64>,
        next_job_id: u64,
    ) -> Result<(), StockError> {
        let now = unix_millis(std::time::SystemTime::now());
        let result = self.tree.transaction(|stock| {
            for (store, product, stamp) in sent {
                let key = pair_key(OUTGOING, store, product);
                if stock.get(&key)?.as_deref() == Some(&stamp.to_be_bytes()[..]) {
                    stock.remove(key)?;
                }
            }
            for (product, sum) in sums {
                stock.insert(store_key(SUM_SENT, product), &sum.to_be_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<StockError>>(())
        });
        self.finish(result)?;
        // A transaction cannot scan: whether more are waiting is read after it.
        if !self.outgoing(1)?.is_empty() {
            let result = (&self.tree, self.queue.tree()).transaction(|(stock, outbox)| {
                if stock.get(PUSH_WAITING)?.is_none() {
                    self.stage_push(stock, outbox, next_job_id, now)?;
                }
                Ok(())
            });
            self.finish(result)?;
        }
        Ok(())
    }
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
        if learned.is_empty() {
            return Ok(AttemptOutcome::Success);
        }
        let push_id = book.store.generate_id()?;
        let changed = book.record_refresh(&learned, push_id)?;
        book.store.commit().await?;
        info!(group, products = learned.len(), changed, "stock: refreshed");
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

/// Sends changed stock to the downstream in signed batches.
pub struct PushExecutor {
    book: StockBook,
    http: reqwest::Client,
    url: String,
    key: Vec<u8>,
    batch_size: usize,
    clamp: Clamp,
    catalog: Arc<dyn Catalog>,
}

impl Executor for PushExecutor {
    fn execute<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            match self.push().await {
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
    async fn push(&self) -> Result<AttemptOutcome, StockError> {
        let book = &self.book;
        book.store.check(book.tree.remove(PUSH_WAITING))?;
        let batch = book.outgoing(self.batch_size)?;
        if batch.is_empty() {
            return Ok(AttemptOutcome::Success);
        }
        let summed = book.summed();
        let mut items = Vec::with_capacity(batch.len());
        let mut sums = std::collections::BTreeMap::new();
        for (store, product, _) in &batch {
            let (store_id, amount, updated_at) = if summed.contains(store) {
                if sums.contains_key(product) {
                    continue;
                }
                let (sum, updated_at) = book.sum_of(product)?;
                sums.insert(product.clone(), sum);
                // A transfer between summed stores leaves the sum as it was.
                if book.last_sum_sent(product)? == Some(sum) {
                    continue;
                }
                (summed.join("+"), sum, updated_at)
            } else {
                let Some(mirrored) = book.mirrored(store, product)? else {
                    continue;
                };
                (store.clone(), mirrored.amount, mirrored.updated_at)
            };
            items.push(json!({
                "external_code": self.catalog.external_code_for(product),
                "smaregi_product_id": product,
                "store_id": store_id,
                "stock": self.clamp.apply(amount),
                "updated_at": updated_at,
                "mapping_version": self.catalog.version(),
            }));
        }
        if items.is_empty() {
            let next = book.store.generate_id()?;
            book.record_pushed(&batch, &sums, next)?;
            book.store.commit().await?;
            return Ok(AttemptOutcome::Success);
        }
        let body = serde_json::to_vec(&json!({ "stock": items })).expect("serialises");
        // Named by its content: a resend of the same batch has the same id
        // (the receiver may drop it), a batch with anything newer has another.
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let id: String = std::iter::once("stock_".to_owned())
            .chain(digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")))
            .collect();
        let timestamp = unix_millis(std::time::SystemTime::now()) / 1000;
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
        let outcome = match response {
            Err(e) if e.is_timeout() => AttemptOutcome::Retry {
                reason: format!("the downstream did not answer in time: {e}"),
                retry_after: None,
            },
            Err(e) => AttemptOutcome::Retry {
                reason: format!("cannot reach the downstream: {e}"),
                retry_after: None,
            },
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text: String = response
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                if status.is_success() {
                    let next = book.store.generate_id()?;
                    book.record_pushed(&batch, &sums, next)?;
                    book.store.commit().await?;
                    return Ok(AttemptOutcome::Success);
                }
                let reason = format!("the downstream answered {status}: {text}");
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    AttemptOutcome::Retry {
                        reason,
                        retry_after,
                    }
                } else {
                    AttemptOutcome::Permanent { reason }
                }
            }
        };
        Ok(outcome)
    }
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
        builder = builder.executor(
            PUSH_KIND,
            DOWNSTREAM,
            Arc::new(PushExecutor {
                book: book.clone(),
                http,
                url: downstream.url.clone(),
                key: sign::key_of(downstream.secret.expose()),
                batch_size: downstream.batch_size as usize,
                clamp: downstream.clamp,
                catalog,
            }),
        );
    }
    Ok(builder)
}
