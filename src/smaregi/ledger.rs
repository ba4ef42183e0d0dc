//! What the relay knows of its own registrations in Smaregi, in the
//! `smaregi` tree:
//!
//! | key | value | what |
//! |---|---|---|
//! | `T` terminal | next number | the per-terminal counter behind `terminalTranId` |
//! | `S` terminal `␀` terminalTranId | — | a send was started: its outcome may be unknown |
//! | `R` terminal `␀` terminalTranId | transactionHeadId | registered, with Smaregi's id |
//! | `F` terminal `␀` terminalTranId | — | a cancel by 取消 flag (its reversal's id) was done |
//! | `E` terminal `␀` terminalTranId | [`Echo`] | the stock that registration moved, not yet taken into account by stock forwarding |
//! | `I` terminal `␀` terminalTranId | [`InFlight`] | a send started and not yet recorded as done: the stock it may already have moved |
//!
//! A `terminalTranId` is taken from the counter in the same transaction
//! that creates its job, so it is fixed before anything is sent and never
//! reused. The `S` record is committed before the first send: after any
//! crash or unknown outcome, the next attempt looks the transaction up in
//! Smaregi before it sends again. `R` records let a cancel refer to its
//! original.
//!
//! Echoes: a registration moves Smaregi's stock, and stock forwarding
//! hears of it like of any other change. A downstream that is sent
//! changes (delta mode) already counted the sale it ordered, so the
//! stock module must not send it back. The `E` record of what a
//! registration (or a cancel) moved is written in the same transaction
//! as its `R` (or `F`) record, and only when that record is new: one echo
//! per registration, however often a job is attempted or the daemon
//! crashes. The stock module consumes each `E` record in the transaction
//! that takes it into account (`crate::stock::book`); this module never
//! reads them back.
//!
//! Between the send and its `R` record, Smaregi may already count the
//! sale while no echo says so. The `I` record, written with the `S` record
//! before the send and removed in the transaction that writes `R` (or
//! `F`), tells stock forwarding to leave those products alone until then
//! ([`in_flight`]).

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionalTree,
};

use crate::store::keys::{decode_u64_key, u64_key};
use crate::store::{Store, StoreError, TreeName};

pub const SMAREGI: TreeName = TreeName::new("smaregi");

const COUNTER: u8 = b'T';
const SENDING: u8 = b'S';
const REGISTERED: u8 = b'R';
const CANCEL_FLAGGED: u8 = b'F';
/// The prefix of pending echo records.
pub const ECHO: u8 = b'E';
const IN_FLIGHT: u8 = b'I';

/// A send under way: what it moves, from when (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InFlight {
    pub since: u64,
    pub echo: Echo,
}

/// The sends under way (see the module docs), from the `smaregi` tree.
pub fn in_flight(tree: &sled::Tree) -> sled::Result<Vec<InFlight>> {
    let mut sends = Vec::new();
    for item in tree.scan_prefix([IN_FLIGHT]) {
        let (_, value) = item?;
        // A record this version cannot read protects nothing.
        if let Ok(send) = serde_json::from_slice(&value) {
            sends.push(send);
        }
    }
    Ok(sends)
}

/// The stock a registration (or cancel) moved in one store: per product,
/// the change (negative for a sale).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Echo {
    pub store_id: String,
    pub moves: Vec<(String, i64)>,
}

/// `terminalTranId`s are at most 10 characters: decimal numbers below this.
pub const MAX_TERMINAL_TRAN_NUMBER: u64 = 9_999_999_999;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("terminal {0} has used every terminalTranId (10 digits)")]
    CounterExhausted(String),
    #[error("smaregi ledger record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

fn record(tag: u8, terminal: &str, terminal_tran_id: &str) -> Vec<u8> {
    let mut key = vec![tag];
    key.extend_from_slice(terminal.as_bytes());
    key.push(0);
    key.extend_from_slice(terminal_tran_id.as_bytes());
    key
}

fn counter_record(terminal: &str) -> Vec<u8> {
    let mut key = vec![COUNTER];
    key.extend_from_slice(terminal.as_bytes());
    key
}

/// The `smaregi` tree.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
    tree: sled::Tree,
}

impl Ledger {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree(SMAREGI)?,
            store: store.clone(),
        })
    }

    /// The tree, for transactions that span it and the outbox.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Takes the next `terminalTranId` of `terminal` inside the caller's
    /// transaction.
    pub fn next_terminal_tran_id(
        ledger: &TransactionalTree,
        terminal: &str,
    ) -> ConflictableTransactionResult<String, LedgerError> {
        let key = counter_record(terminal);
        let next = match ledger.get(&key)? {
            None => 1,
            Some(bytes) => decode_u64_key(&bytes).map_err(|e| {
                ConflictableTransactionError::Abort(LedgerError::Corrupt(format!("counter: {e}")))
            })?,
        };
        if next > MAX_TERMINAL_TRAN_NUMBER {
            return Err(ConflictableTransactionError::Abort(
                LedgerError::CounterExhausted(terminal.to_owned()),
            ));
        }
        ledger.insert(key, &u64_key(next + 1))?;
        Ok(next.to_string())
    }

    /// Smaregi's id of a registered transaction, if we know it.
    pub fn registered(
        &self,
        terminal: &str,
        terminal_tran_id: &str,
    ) -> Result<Option<u64>, LedgerError> {
        let value = self.store.check(self.tree.get(record(
            REGISTERED,
            terminal,
            terminal_tran_id,
        )))?;
        value
            .map(|bytes| {
                decode_u64_key(&bytes)
                    .map_err(|e| LedgerError::Corrupt(format!("registration: {e}")))
            })
            .transpose()
    }

    /// Records a registration, and the stock it moved (`echo`) if it is
    /// new, in one transaction, and commits it.
    pub async fn record_registered(
        &self,
        terminal: &str,
        terminal_tran_id: &str,
        transaction_head_id: u64,
        echo: &Echo,
    ) -> Result<(), LedgerError> {
        let key = record(REGISTERED, terminal, terminal_tran_id);
        self.record_once(
            key,
            &u64_key(transaction_head_id),
            terminal,
            terminal_tran_id,
            echo,
        )
        .await
    }

    /// Records that the cancel whose reversal would have been
    /// `terminal_tran_id` was done by the 取消 flag, with the stock it put
    /// back, once; commits it.
    pub async fn record_cancel_flagged(
        &self,
        terminal: &str,
        terminal_tran_id: &str,
        echo: &Echo,
    ) -> Result<(), LedgerError> {
        let key = record(CANCEL_FLAGGED, terminal, terminal_tran_id);
        self.record_once(key, &[], terminal, terminal_tran_id, echo)
            .await
    }

    async fn record_once(
        &self,
        key: Vec<u8>,
        value: &[u8],
        terminal: &str,
        terminal_tran_id: &str,
        echo: &Echo,
    ) -> Result<(), LedgerError> {
        let echo_value = serde_json::to_vec(echo).expect("an echo serialises");
        let result = self.tree.transaction(|tx| {
            tx.remove(record(IN_FLIGHT, terminal, terminal_tran_id))?;
            if tx.get(&key)?.is_none() {
                tx.insert(key.clone(), value)?;
                if !echo.moves.is_empty() {
                    tx.insert(record(ECHO, terminal, terminal_tran_id), echo_value.clone())?;
                }
            }
            Ok::<_, ConflictableTransactionError<LedgerError>>(())
        });
        match result {
            Ok(()) => {}
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => {
                return Err(self.store.check::<()>(Err(e)).unwrap_err().into())
            }
        }
        self.store.commit().await?;
        Ok(())
    }

    /// Whether a send of this transaction was ever started.
    pub fn send_started(
        &self,
        terminal: &str,
        terminal_tran_id: &str,
    ) -> Result<bool, LedgerError> {
        let key = record(SENDING, terminal, terminal_tran_id);
        Ok(self.store.check(self.tree.contains_key(key))?)
    }

    /// Records, durably, that a send that moves `echo` is about to start.
    pub async fn record_send_started(
        &self,
        terminal: &str,
        terminal_tran_id: &str,
        echo: &Echo,
        now: u64,
    ) -> Result<(), LedgerError> {
        // Two plain writes, not a transaction: nothing is sent before the
        // commit below makes both durable, and sled recovers a prefix of
        // its log, so a crash can leave `I` without `S` (harmless: the
        // next attempt writes both again) but never `S` without `I`. A
        // sled 0.34 transaction would take sled's process-wide lock
        // exclusively (waiting for any flush) and seal its log buffer twice.
        if !echo.moves.is_empty() {
            let in_flight = serde_json::to_vec(&InFlight {
                since: now,
                echo: echo.clone(),
            })
            .expect("a send serialises");
            let in_flight_key = record(IN_FLIGHT, terminal, terminal_tran_id);
            self.store
                .check(self.tree.insert(in_flight_key, in_flight))?;
        }
        let key = record(SENDING, terminal, terminal_tran_id);
        self.store.check(self.tree.insert(key, &[]))?;
        self.store.commit().await?;
        Ok(())
    }
}
