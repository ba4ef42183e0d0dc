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
        let built = self.build(&order)?;
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
            let Some(record) = self.record(&order_id)? else {
                continue;
            };
            let Ok(sale) = self.build(&record.order)? else {
                continue;
            };
            let revision = record.order.revision;
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
