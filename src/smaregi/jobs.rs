//! The jobs that register and cancel transactions: their payloads, and
//! how a caller adds them inside its own transaction.

use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionResult, TransactionError, Transactional, TransactionalTree,
};

use super::jst;
use super::ledger::{Ledger, LedgerError};
use super::sale::Sale;
use crate::outbox::job::NewJob;
use crate::outbox::queue::{Queue, QueueError};
use crate::outbox::retry::unix_millis;
use crate::store::{widen_abort, Store, StoreError};

pub const UPSTREAM: &str = "smaregi";
pub const REGISTER_KIND: &str = "smaregi.transaction-register";
pub const CANCEL_KIND: &str = "smaregi.transaction-cancel";
/// The payload version these executors understand.
pub const PAYLOAD_VERSION: u32 = 1;

/// 取引登録 of `sale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegisterPayload {
    pub v: u32,
    pub sale: Sale,
}

/// 取引取消 (打消) of the sale registered as `original-terminal-tran-id`
/// on the reversal's terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CancelPayload {
    pub v: u32,
    pub original_terminal_tran_id: String,
    /// Lets the executor look the original up when no registration was
    /// recorded for it (its job was discarded after a send started).
    #[serde(default)]
    pub original_terminal_tran_date_time: Option<String>,
    pub reversal: Sale,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Adds the job that registers `sale`, inside the caller's transaction
/// over the outbox and ledger trees: its `terminalTranId` is the next of
/// its terminal and its time `now_jst`, fixed from here on. Returns the
/// sale as it will be sent.
pub fn stage_register(
    outbox: &TransactionalTree,
    ledger: &TransactionalTree,
    job_id: u64,
    key: &str,
    sale: &Sale,
    now_jst: i64,
    now_ms: u64,
) -> ConflictableTransactionResult<Sale, StageError> {
    let mut sale = sale.clone();
    sale.terminal_tran_id = widen_abort(Ledger::next_terminal_tran_id(ledger, &sale.terminal_id))?;
    sale.terminal_tran_date_time = jst::format(now_jst);
    sale.dispose_of = None;
    let payload = RegisterPayload {
        v: PAYLOAD_VERSION,
        sale: sale.clone(),
    };
    let job = new_job(REGISTER_KIND, key, &payload);
    widen_abort(Queue::stage(outbox, job_id, &job, now_ms))?;
    Ok(sale)
}

/// Adds the job that cancels `original` (as [`stage_register`] returned
/// it) by a reversal (打消), inside the caller's transaction. Returns the
/// reversal.
pub fn stage_cancel(
    outbox: &TransactionalTree,
    ledger: &TransactionalTree,
    job_id: u64,
    key: &str,
    original: &Sale,
    now_jst: i64,
    now_ms: u64,
) -> ConflictableTransactionResult<Sale, StageError> {
    let terminal_tran_id =
        widen_abort(Ledger::next_terminal_tran_id(ledger, &original.terminal_id))?;
    let reversal = original.reversal(&terminal_tran_id, &jst::format(now_jst));
    let payload = CancelPayload {
        v: PAYLOAD_VERSION,
        original_terminal_tran_id: original.terminal_tran_id.clone(),
        original_terminal_tran_date_time: Some(original.terminal_tran_date_time.clone()),
        reversal: reversal.clone(),
    };
    let job = new_job(CANCEL_KIND, key, &payload);
    widen_abort(Queue::stage(outbox, job_id, &job, now_ms))?;
    Ok(reversal)
}

fn new_job(kind: &str, key: &str, payload: &impl Serialize) -> NewJob {
    NewJob {
        kind: kind.to_owned(),
        upstream: UPSTREAM.to_owned(),
        key: key.to_owned(),
        payload: serde_json::to_value(payload).expect("a payload serialises"),
    }
}

/// Registers and cancels in transactions of their own, for callers
/// without records of their own to write alongside (and for tests).
#[derive(Debug, Clone)]
pub struct SaleJobs {
    store: Store,
    queue: Queue,
    ledger: Ledger,
}

impl SaleJobs {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            queue: Queue::open(store)?,
            ledger: Ledger::open(store)?,
            store: store.clone(),
        })
    }

    /// Enqueues the registration of `sale` under ordering `key` and
    /// commits it; the job's id and the sale as it will be sent.
    pub async fn register(&self, key: &str, sale: &Sale) -> Result<(u64, Sale), StageError> {
        self.stage(|outbox, ledger, id, now_jst, now_ms| {
            stage_register(outbox, ledger, id, key, sale, now_jst, now_ms)
        })
        .await
    }

    /// Enqueues the cancellation of `original` under `key` and commits it.
    pub async fn cancel(&self, key: &str, original: &Sale) -> Result<(u64, Sale), StageError> {
        self.stage(|outbox, ledger, id, now_jst, now_ms| {
            stage_cancel(outbox, ledger, id, key, original, now_jst, now_ms)
        })
        .await
    }

    async fn stage(
        &self,
        body: impl Fn(
            &TransactionalTree,
            &TransactionalTree,
            u64,
            i64,
            u64,
        ) -> ConflictableTransactionResult<Sale, StageError>,
    ) -> Result<(u64, Sale), StageError> {
        let id = self.store.generate_id()?;
        let now_ms = unix_millis(std::time::SystemTime::now());
        let now_jst = jst::now();
        let result = (self.queue.tree(), self.ledger.tree())
            .transaction(|(outbox, ledger)| body(outbox, ledger, id, now_jst, now_ms));
        let sale = match result {
            Ok(sale) => sale,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => {
                return Err(self.store.check::<Sale>(Err(e)).unwrap_err().into())
            }
        };
        self.store.commit().await?;
        Ok((id, sale))
    }
}
