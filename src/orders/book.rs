//! The order ledger: what the relay knows of each order, and the jobs
//! each change of an order implies, written in one transaction and made
//! durable by one commit.
//!
//! Records, in the `orders` tree:
//!
//! | key | value | what |
//! |---|---|---|
//! | `O` order id | [`OrderRecord`] (JSON) | the latest revision, what stands in Smaregi for it, its history |
//! | `H` order id | — | the order is held: a line's product is not mapped yet |
//!
//! Every job of an order has the ordering key `order:<id>`, so they run in
//! the order their changes were accepted:
//! - create → register;
//! - edit → cancel the transaction that stands, then register the new one;
//! - cancel → cancel the transaction that stands.
//!
//! A cancel staged while its register is still pending runs after it;
//! one whose register was discarded cancels only what a look-up finds
//! (see `smaregi::executor`). So no sale is left standing and no cancel
//! refers to nothing.
//!
//! A held revision has no job: its transaction cannot be built before its
//! products are mapped, and a job's payload is final once staged (its
//! `terminalTranId`, and the reversal that may later cancel it, depend on
//! it). [`OrderBook::release_held`] stages it once the mapping knows every
//! product.

use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, Transactional,
    TransactionalTree,
};
use std::sync::Arc;
use tracing::warn;

use super::build::{build_sale, BuildError, BuildSettings, UnmappedLine};
use super::model::Order;
use crate::config::UnmappedPolicy;
use crate::mapping::Catalog;
use crate::outbox::engine::Engine;
use crate::outbox::job::Job;
use crate::outbox::queue::{Queue, QueueError};
use crate::outbox::retry::unix_millis;
use crate::smaregi::jobs::{stage_cancel, stage_register, StageError};
use crate::smaregi::jst;
use crate::smaregi::ledger::{Ledger, LedgerError};
use crate::smaregi::sale::Sale;
use crate::store::{widen_abort, Store, StoreError, TreeName};

pub const ORDERS: TreeName = TreeName::new("orders");

const RECORD: u8 = b'O';
const HELD: u8 = b'H';
/// Events kept per order; older ones are dropped.
pub const MAX_EVENTS: usize = 64;

/// Where an order stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum OrderStatus {
    /// Its latest revision is registered or on its way.
    Active,
    /// Its latest revision waits for products to be mapped.
    Held {
        unmapped: Vec<UnmappedLine>,
    },
    Cancelled,
}

/// What happened to an order, with the job it caused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OrderEvent {
    pub at_ms: u64,
    pub revision: u64,
    pub action: OrderAction,
    pub job: Option<u64>,
    /// The transaction registered, or the reversal that cancels one.
    pub terminal_tran_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderAction {
    Register,
    Cancel,
    Hold,
}

/// One order, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OrderRecord {
    /// The latest revision accepted.
    pub order: Order,
    pub digest: String,
    pub status: OrderStatus,
    /// The transaction that stands in Smaregi for the order, as staged
    /// (registered, or on its way): what an edit or cancel must reverse.
    pub standing: Option<Sale>,
    pub events: Vec<OrderEvent>,
}

impl OrderRecord {
    fn push(&mut self, event: OrderEvent) {
        self.events.push(event);
        if self.events.len() > MAX_EVENTS {
            self.events.remove(0);
        }
    }
}

/// What a `PUT` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// A new revision, durable with its jobs.
    Accepted {
        jobs: Vec<u64>,
        held: Option<Vec<UnmappedLine>>,
    },
    /// This very revision was accepted before: nothing new.
    Unchanged,
}

/// What a `DELETE` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    Accepted { jobs: Vec<u64> },
    AlreadyCancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum OrderBookError {
    #[error("revision {offered} is older than revision {current}, which was already accepted")]
    Stale { offered: u64, current: u64 },
    #[error("revision {0} was already accepted with different content; send a new revision")]
    RevisionConflict(u64),
    #[error("the order was cancelled; a cancelled order cannot change")]
    Cancelled,
    #[error("no order with this id")]
    NotFound,
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("order record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Stage(#[from] StageError),
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The order ledger and the jobs it stages. Cheap to clone.
#[derive(Clone)]
pub struct OrderBook {
    store: Store,
    tree: sled::Tree,
    queue: Queue,
    ledger: Ledger,
    engine: Engine,
    settings: Arc<BuildSettings>,
    catalog: Arc<dyn Catalog>,
}

fn record_key(tag: u8, order_id: &str) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(order_id.as_bytes());
    key
}

/// The ordering key of an order's jobs.
pub fn ordering_key(order_id: &str) -> String {
    format!("order:{order_id}")
}

type TxResult<T> = ConflictableTransactionResult<T, OrderBookError>;

fn abort<T>(error: OrderBookError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(error))
}

fn read(orders: &TransactionalTree, order_id: &str) -> TxResult<Option<OrderRecord>> {
    match orders.get(record_key(RECORD, order_id))? {
        None => Ok(None),
        Some(bytes) => match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some(record)),
            Err(e) => abort(OrderBookError::Corrupt(format!("order {order_id}: {e}"))),
        },
    }
}

fn write(orders: &TransactionalTree, record: &OrderRecord) -> TxResult<()> {
    let id = &record.order.order_id;
    let bytes = serde_json::to_vec(record).expect("a record serialises");
    orders.insert(record_key(RECORD, id), bytes)?;
    if matches!(record.status, OrderStatus::Held { .. }) {
        orders.insert(record_key(HELD, id), &[])?;
    } else {
        orders.remove(record_key(HELD, id))?;
    }
    Ok(())
}

/// The ids and clocks a change uses, taken before its transaction.
struct Stamp {
    job_ids: [u64; 2],
    now_ms: u64,
    now_jst: i64,
}

/// Everything one transaction needs.
struct Trees<'a> {
    outbox: &'a TransactionalTree,
    ledger: &'a TransactionalTree,
    orders: &'a TransactionalTree,
}

impl Trees<'_> {
    /// Stages the cancel of what stands, if anything.
    fn cancel_standing(
        &self,
        record: &mut OrderRecord,
        revision: u64,
        job_id: u64,
        stamp: &Stamp,
    ) -> TxResult<Option<u64>> {
        let Some(standing) = record.standing.take() else {
            return Ok(None);
        };
        let key = ordering_key(&record.order.order_id);
        let reversal = widen_abort(stage_cancel(
            self.outbox,
            self.ledger,
            job_id,
            &key,
            &standing,
            stamp.now_jst,
            stamp.now_ms,
        ))?;
        record.push(OrderEvent {
            at_ms: stamp.now_ms,
            revision,
            action: OrderAction::Cancel,
            job: Some(job_id),
            terminal_tran_id: Some(reversal.terminal_tran_id),
        });
        Ok(Some(job_id))
    }

    /// Stages the registration of `sale` for the record's revision.
    fn register(
        &self,
        record: &mut OrderRecord,
        sale: &Sale,
        job_id: u64,
        stamp: &Stamp,
    ) -> TxResult<u64> {
        let key = ordering_key(&record.order.order_id);
        let staged = widen_abort(stage_register(
            self.outbox,
            self.ledger,
            job_id,
            &key,
            sale,
            stamp.now_jst,
            stamp.now_ms,
        ))?;
        record.push(OrderEvent {
            at_ms: stamp.now_ms,
            revision: record.order.revision,
            action: OrderAction::Register,
            job: Some(job_id),
            terminal_tran_id: Some(staged.terminal_tran_id.clone()),
        });
        record.standing = Some(staged);
        record.status = OrderStatus::Active;
        Ok(job_id)
    }
}

impl OrderBook {
    pub fn open(
        engine: &Engine,
        settings: BuildSettings,
        catalog: Arc<dyn Catalog>,
    ) -> Result<Self, StoreError> {
        let store = engine.store().clone();
        Ok(Self {
            tree: store.tree(ORDERS)?,
            queue: engine.queue().clone(),
            ledger: Ledger::open(&store)?,
            engine: engine.clone(),
            settings: Arc::new(settings),
            catalog,
            store,
        })
    }

    pub fn settings(&self) -> &BuildSettings {
        &self.settings
    }

    /// The transaction for `order` from the current mapping; `Err` lists
    /// unmapped lines only when the order is to be held.
    fn build(&self, order: &Order) -> Result<Result<Sale, Vec<UnmappedLine>>, BuildError> {
        let catalog = Arc::clone(&self.catalog);
        match build_sale(order, &self.settings, &move |code| {
            catalog.smaregi_id_for(code)
        }) {
            Ok(sale) => Ok(Ok(sale)),
            Err(BuildError::Unmapped(lines)) if self.settings.unmapped == UnmappedPolicy::Hold => {
                Ok(Err(lines))
            }
            Err(other) => Err(other),
        }
    }

    fn stamp(&self) -> Result<Stamp, StoreError> {
        Ok(Stamp {
            job_ids: [self.store.generate_id()?, self.store.generate_id()?],
            now_ms: unix_millis(std::time::SystemTime::now()),
            now_jst: jst::now(),
        })
    }

    /// Runs `body` in one transaction over the outbox, Smaregi ledger and
    /// order trees, then commits it and wakes the outbox.
    async fn change<T>(
        &self,
        body: impl Fn(&Trees<'_>) -> TxResult<T>,
    ) -> Result<T, OrderBookError> {
        let result = (self.queue.tree(), self.ledger.tree(), &self.tree).transaction(
            |(outbox, ledger, orders)| {
                body(&Trees {
                    outbox,
                    ledger,
                    orders,
                })
            },
        );
        let value = match result {
            Ok(value) => value,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => {
                return Err(self.store.check::<()>(Err(e)).unwrap_err().into())
            }
        };
        self.store.commit().await?;
        self.engine.wake();
        Ok(value)
    }

    /// Accepts a revision of an order: durable with its jobs on return.
    pub async fn put(&self, order: Order) -> Result<Put, OrderBookError> {
        let version = self.catalog.version();
        let put = self.put_built(&order).await?;
        // Held against a mapping that a new version replaced meanwhile: the
        // release the new version woke may have looked before this order
        // was held, so look again now that it is.
        if matches!(put, Put::Accepted { held: Some(_), .. }) && self.catalog.version() != version {
            if let Err(e) = self.release_held().await {
                warn!(order = %order.order_id, error = %e, "orders: cannot release held orders after a mapping change");
            }
        }
        Ok(put)
    }

    async fn put_built(&self, order: &Order) -> Result<Put, OrderBookError> {
        let built = self.build(order)?;
        let digest = order.digest();
        let stamp = self.stamp()?;
        self.change(|trees| {
            let existing = read(trees.orders, &order.order_id)?;
            let mut record = match existing {
                Some(record) => {
                    let current = record.order.revision;
                    if record.status == OrderStatus::Cancelled {
                        return abort(OrderBookError::Cancelled);
                    }
                    if order.revision < current {
                        return abort(OrderBookError::Stale {
                            offered: order.revision,
                            current,
                        });
                    }
                    if order.revision == current {
                        return if record.digest == digest {
                            Ok(Put::Unchanged)
                        } else {
                            abort(OrderBookError::RevisionConflict(current))
                        };
                    }
                    OrderRecord {
                        order: order.clone(),
                        digest: digest.clone(),
                        ..record
                    }
                }
                None => OrderRecord {
                    order: order.clone(),
                    digest: digest.clone(),
                    status: OrderStatus::Active,
                    standing: None,
                    events: Vec::new(),
                },
            };
            let mut jobs = Vec::new();
            jobs.extend(trees.cancel_standing(
                &mut record,
                order.revision,
                stamp.job_ids[0],
                &stamp,
            )?);
            let held = match &built {
                Ok(sale) => {
                    jobs.push(trees.register(&mut record, sale, stamp.job_ids[1], &stamp)?);
                    None
                }
                Err(unmapped) => {
                    record.status = OrderStatus::Held {
                        unmapped: unmapped.clone(),
                    };
                    record.push(OrderEvent {
                        at_ms: stamp.now_ms,
                        revision: order.revision,
                        action: OrderAction::Hold,
                        job: None,
                        terminal_tran_id: None,
                    });
                    Some(unmapped.clone())
                }
            };
            write(trees.orders, &record)?;
            Ok(Put::Accepted { jobs, held })
        })
        .await
    }

    /// Cancels an order: durable with its job on return.
    pub async fn cancel(&self, order_id: &str) -> Result<Cancel, OrderBookError> {
        let stamp = self.stamp()?;
        self.change(|trees| {
            let Some(mut record) = read(trees.orders, order_id)? else {
                return abort(OrderBookError::NotFound);
            };
            if record.status == OrderStatus::Cancelled {
                return Ok(Cancel::AlreadyCancelled);
            }
            let revision = record.order.revision;
            let jobs = trees
                .cancel_standing(&mut record, revision, stamp.job_ids[0], &stamp)?
                .into_iter()
                .collect();
            record.status = OrderStatus::Cancelled;
            write(trees.orders, &record)?;
            Ok(Cancel::Accepted { jobs })
        })
        .await
    }

    /// An order as the ledger keeps it.
    pub fn record(&self, order_id: &str) -> Result<Option<OrderRecord>, OrderBookError> {
        let bytes = self
            .store
            .check(self.tree.get(record_key(RECORD, order_id)))?;
        bytes
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| OrderBookError::Corrupt(format!("order {order_id}: {e}")))
            })
            .transpose()
    }

    /// The orders held for unmapped products.
    pub fn held(&self) -> Result<Vec<String>, OrderBookError> {
        let mut ids = Vec::new();
        for entry in self.tree.scan_prefix([HELD]) {
            let (key, _) = self.store.check(entry)?;
            ids.push(String::from_utf8_lossy(&key[1..]).into_owned());
        }
        Ok(ids)
    }

    /// Stages the registration of every held order whose products the
    /// catalog now knows; returns how many were released. Call it when
    /// the mapping changes.
    pub async fn release_held(&self) -> Result<usize, OrderBookError> {
        let mut released = 0;
        for order_id in self.held()? {
            // One order that cannot be built (its record is corrupt, or the
            // config changed under it) stays held; it must not keep the
            // others from being released.
            let (sale, revision) = match self.releasable(&order_id) {
                Ok(Some(releasable)) => releasable,
                Ok(None) => continue,
                Err(e) => {
                    warn!(order = %order_id, error = %e, "orders: a held order cannot be built; it stays held");
                    continue;
                }
            };
            let stamp = self.stamp()?;
            let done = self
                .change(|trees| {
                    let Some(mut record) = read(trees.orders, &order_id)? else {
                        return Ok(false);
                    };
                    // Changed since it was read: the change decided.
                    if record.order.revision != revision
                        || !matches!(record.status, OrderStatus::Held { .. })
                    {
                        return Ok(false);
                    }
                    trees.register(&mut record, &sale, stamp.job_ids[1], &stamp)?;
                    write(trees.orders, &record)?;
                    Ok(true)
                })
                .await?;
            released += usize::from(done);
        }
        Ok(released)
    }

    /// The registration of held order `order_id` and its revision, if the
    /// catalog now knows all its products.
    fn releasable(&self, order_id: &str) -> Result<Option<(Sale, u64)>, OrderBookError> {
        let Some(record) = self.record(order_id)? else {
            return Ok(None);
        };
        Ok(self
            .build(&record.order)?
            .ok()
            .map(|sale| (sale, record.order.revision)))
    }

    /// The job `id`, if the outbox still has it.
    pub fn job(&self, id: u64) -> Result<Option<Job>, OrderBookError> {
        Ok(self.queue.job(id)?)
    }

    /// Smaregi's id of a transaction we registered, once known.
    pub fn transaction_head_id(
        &self,
        terminal_tran_id: &str,
    ) -> Result<Option<u64>, OrderBookError> {
        Ok(self
            .ledger
            .registered(&self.settings.terminal_id, terminal_tran_id)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::config::{OrdersConfig, OutboxConfig, PaymentKind};
    use crate::outbox::engine::EngineBuilder;
    use crate::store::StoreOptions;

    /// A mapping the test changes by hand. With `publish_during_lookup`,
    /// the first look-up of an unknown code answers "unknown" and then
    /// maps it in a new version: an import landing between an order's
    /// build and its commit, which no real import can be timed to do.
    #[derive(Default)]
    struct HandMapping {
        codes: Mutex<BTreeMap<String, String>>,
        version: AtomicU64,
        publish_during_lookup: AtomicBool,
    }

    impl HandMapping {
        fn publish(&self, code: &str, id: &str) {
            self.codes.lock().unwrap().insert(code.into(), id.into());
            self.version.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Catalog for HandMapping {
        fn smaregi_id_for(&self, code: &str) -> Option<String> {
            let found = self.codes.lock().unwrap().get(code).cloned();
            if found.is_none() && self.publish_during_lookup.swap(false, Ordering::SeqCst) {
                self.publish(code, "8000114");
            }
            found
        }
        fn external_code_for(&self, id: &str) -> Option<String> {
            let codes = self.codes.lock().unwrap();
            codes.iter().find(|(_, i)| *i == id).map(|(c, _)| c.clone())
        }
        fn version(&self) -> u64 {
            self.version.load(Ordering::SeqCst)
        }
    }

    fn settings(payment_methods: &[(&str, PaymentKind)]) -> BuildSettings {
        let mut settings = BuildSettings::from_config(&OrdersConfig::default(), "9");
        settings.default_store_id = Some("1".into());
        settings.payment_methods = (payment_methods.iter())
            .map(|(name, kind)| (name.to_string(), *kind))
            .collect();
        settings
    }

    fn order(order_id: &str, code: &str, payment_method: &str) -> Order {
        super::super::model::validate_order(
            order_id,
            &json!({
                "order_id": order_id,
                "revision": 1,
                "ordered_at": "2026-11-22T10:15:00+09:00",
                "lines": [{"external_code": code, "name": "緑茶", "unit_price": 150, "quantity": 2, "tax_rate": 8}],
                "payment_method": payment_method,
            }),
        )
        .unwrap()
    }

    fn is_held(book: &OrderBook, order_id: &str) -> bool {
        let record = book.record(order_id).unwrap().unwrap();
        matches!(record.status, OrderStatus::Held { .. })
    }

    fn temp_store() -> (tempfile::TempDir, Store) {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreOptions {
            directory: temp.path().join("db"),
            cache_capacity_bytes: 8 << 20,
        })
        .unwrap();
        (temp, store)
    }

    fn open(store: &Store, settings: BuildSettings, mapping: &Arc<HandMapping>) -> OrderBook {
        let engine = EngineBuilder::new(store, &OutboxConfig::default())
            .unwrap()
            .build()
            .unwrap();
        OrderBook::open(&engine, settings, Arc::clone(mapping) as Arc<dyn Catalog>).unwrap()
    }

    #[tokio::test]
    async fn an_order_held_while_a_mapping_that_knows_it_landed_is_released_at_once() {
        let (_temp, store) = temp_store();
        let mapping = Arc::new(HandMapping::default());
        mapping.publish_during_lookup.store(true, Ordering::SeqCst);
        let book = open(&store, settings(&[]), &mapping);

        let put = book.put(order("A-1", "TEA-500", "cash")).await.unwrap();
        assert!(
            matches!(put, Put::Accepted { held: Some(_), .. }),
            "{put:?}"
        );
        assert_eq!(mapping.version(), 1, "the import landed during the put");
        assert!(!is_held(&book, "A-1"), "released by the put itself");
        assert!(book.held().unwrap().is_empty());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_held_order_that_cannot_be_built_keeps_no_other_from_release() {
        let (_temp, store) = temp_store();
        let mapping = Arc::new(HandMapping::default());
        let book = open(&store, settings(&[]), &mapping);
        for (id, method) in [("A-1", "cash"), ("B-1", "credit")] {
            book.put(order(id, "TEA-500", method)).await.unwrap();
        }
        assert_eq!(book.held().unwrap(), ["A-1", "B-1"]);

        // Restarted with a config that no longer knows A-1's payment.
        drop(book);
        let book = open(
            &store,
            settings(&[("credit", PaymentKind::Credit)]),
            &mapping,
        );
        mapping.publish("TEA-500", "8000114");
        assert_eq!(book.release_held().await.unwrap(), 1);
        assert!(is_held(&book, "A-1"), "it stays held");
        assert!(!is_held(&book, "B-1"), "released");
        store.close().await.unwrap();
    }
}
