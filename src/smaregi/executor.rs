//! The executors of the register and cancel jobs: exactly one effect in
//! Smaregi per job, however often a job is attempted.
//!
//! Before the first send of a transaction, the ledger durably notes that
//! a send started. From then on, before sending again, the executor looks
//! the transaction up in Smaregi by its fixed `terminalTranId`: a
//! registration whose answer was lost (a timeout, a reset, a crash) is
//! found and recorded instead of being sent twice.
//!
//! A cancel is a reversal (打消) registered the same way, or, with
//! `cancel-strategy = "cancel-flag"`, the original's 取消 flag, which is
//! harmless to set twice.
//!
//! Each registration (or 取消 flag) is recorded with the stock it moved
//! (an echo, see [`super::ledger`]), exactly once, so that stock
//! forwarding can tell the relay's own sales from the store's.

use super::api::CallError;
use super::client::SmaregiClient;
use std::sync::Arc;
use tracing::info;

use super::jobs::{
    CancelPayload, RegisterPayload, CANCEL_KIND, PAYLOAD_VERSION, REGISTER_KIND, UPSTREAM,
};
use super::ledger::{Echo, Ledger, LedgerError};
use super::sale::Sale;
use crate::config::CancelStrategy;
use crate::outbox::engine::{AttemptOutcome, BoxFuture, EngineBuilder, Executor};
use crate::outbox::job::Job;
use crate::outbox::retry::unix_millis;

/// Runs `smaregi.transaction-register` and `smaregi.transaction-cancel`.
#[derive(Debug, Clone)]
pub struct TransactionExecutor {
    client: SmaregiClient,
    ledger: Ledger,
    cancel_strategy: CancelStrategy,
}

/// The register jobs' executor.
#[derive(Debug, Clone)]
pub struct RegisterExecutor(pub TransactionExecutor);

/// The cancel jobs' executor.
#[derive(Debug, Clone)]
pub struct CancelExecutor(pub TransactionExecutor);

fn store_failed(error: LedgerError) -> AttemptOutcome {
    AttemptOutcome::Retry {
        reason: format!("cannot read or write the local ledger: {error}"),
        retry_after: None,
    }
}

fn decode<T: serde::de::DeserializeOwned>(job: &Job) -> Result<T, AttemptOutcome> {
    let version = job.payload.get("v").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(PAYLOAD_VERSION)) {
        return Err(AttemptOutcome::Undecodable {
            reason: format!(
                "payload version {version:?} is not the version {PAYLOAD_VERSION} this relay understands"
            ),
        });
    }
    serde_json::from_value(job.payload.clone()).map_err(|e| AttemptOutcome::Undecodable {
        reason: format!("the payload does not decode: {e}"),
    })
}

impl TransactionExecutor {
    /// Registers the register and cancel executors with `builder`.
    pub fn register_with(self, builder: EngineBuilder) -> EngineBuilder {
        builder
            .executor(
                REGISTER_KIND,
                UPSTREAM,
                Arc::new(RegisterExecutor(self.clone())),
            )
            .executor(CANCEL_KIND, UPSTREAM, Arc::new(CancelExecutor(self)))
    }

    pub fn new(client: SmaregiClient, ledger: Ledger, cancel_strategy: CancelStrategy) -> Self {
        Self {
            client,
            ledger,
            cancel_strategy,
        }
    }

    /// Registers `sale` unless it already is; see the module docs.
    async fn deliver(&self, sale: &Sale) -> AttemptOutcome {
        let (terminal, tran) = (&sale.terminal_id, &sale.terminal_tran_id);
        match self.ledger.registered(terminal, tran) {
            Ok(Some(_)) => return AttemptOutcome::Success,
            Ok(None) => {}
            Err(e) => return store_failed(e),
        }
        match self.ledger.send_started(terminal, tran) {
            Ok(true) => match self.client.find_registered(sale).await {
                Ok(Some(id)) => return self.registered(sale, id).await,
                Ok(None) => {}
                Err(e) => return lookup_failed(&e),
            },
            Ok(false) => {}
            Err(e) => return store_failed(e),
        }
        // Marked before every send, a second one too: its products are in
        // flight from now, and an in-flight mark older than the stock
        // refresh's patience no longer guards them.
        let now = unix_millis(std::time::SystemTime::now());
        if let Err(e) = self
            .ledger
            .record_send_started(terminal, tran, &echo_of(sale), now)
            .await
        {
            return store_failed(e);
        }
        match self.client.register(sale).await {
            Ok(id) => self.registered(sale, id).await,
            Err(e) => e.outcome(true),
        }
    }

    async fn registered(&self, sale: &Sale, id: u64) -> AttemptOutcome {
        match self
            .ledger
            .record_registered(
                &sale.terminal_id,
                &sale.terminal_tran_id,
                id,
                &echo_of(sale),
            )
            .await
        {
            Ok(()) => AttemptOutcome::Success,
            // Not recorded: the next attempt finds it by looking it up.
            Err(e) => store_failed(e),
        }
    }
}

impl TransactionExecutor {
    /// The original of a cancel whose registration was never recorded.
    ///
    /// A cancel shares its register's ordering key, so it runs only once
    /// the register job has finished; a register job that finished without
    /// recording its id was discarded by an operator. If its send never
    /// started, nothing reached Smaregi. If it did, the original is looked
    /// up: a sale found must be cancelled, never left standing.
    async fn unrecorded_original(
        &self,
        payload: &CancelPayload,
    ) -> Result<Option<u64>, AttemptOutcome> {
        let terminal = &payload.reversal.terminal_id;
        let original = &payload.original_terminal_tran_id;
        if !self
            .ledger
            .send_started(terminal, original)
            .map_err(store_failed)?
        {
            return Ok(None);
        }
        let Some(at) = &payload.original_terminal_tran_date_time else {
            return Err(AttemptOutcome::Permanent {
                reason: format!(
                    "transaction {original} of terminal {terminal} may have been registered, but \
                     this job was created without its time, so it cannot be looked up; check \
                     Smaregi's 取引履歴 and cancel it there if it exists, then discard this job"
                ),
            });
        };
        let probe = Sale {
            terminal_tran_id: original.clone(),
            terminal_tran_date_time: at.clone(),
            ..payload.reversal.clone()
        };
        match self.client.find_registered(&probe).await {
            Ok(Some(id)) => {
                // The probe carries the reversal's lines: the original
                // moved stock the other way.
                let mut echo = echo_of(&probe);
                for (_, change) in &mut echo.moves {
                    *change = -*change;
                }
                self.ledger
                    .record_registered(terminal, original, id, &echo)
                    .await
                    .map_err(store_failed)?;
                Ok(Some(id))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(lookup_failed(&e)),
        }
    }

    /// Cancels the registered original: sets its 取消 flag (harmless
    /// twice, so no look-up), or registers the reversal exactly once.
    async fn cancel_found(&self, mut reversal: Sale, original_id: u64) -> AttemptOutcome {
        if self.cancel_strategy == CancelStrategy::CancelFlag {
            // Harmless twice, so never looked up; recorded only to tell
            // stock forwarding that stock may be moving.
            let now = unix_millis(std::time::SystemTime::now());
            if let Err(e) = self
                .ledger
                .record_send_started(
                    &reversal.terminal_id,
                    &reversal.terminal_tran_id,
                    &echo_of(&reversal),
                    now,
                )
                .await
            {
                return store_failed(e);
            }
            return match self.client.cancel_flag(original_id).await {
                // The flag puts back what the original took: what the
                // reversal would have moved.
                Ok(()) => match self
                    .ledger
                    .record_cancel_flagged(
                        &reversal.terminal_id,
                        &reversal.terminal_tran_id,
                        &echo_of(&reversal),
                    )
                    .await
                {
                    Ok(()) => AttemptOutcome::Success,
                    Err(e) => store_failed(e),
                },
                Err(e) => e.outcome(false),
            };
        }
        reversal.dispose_of = Some(original_id);
        self.deliver(&reversal).await
    }
}

fn echo_of(sale: &Sale) -> Echo {
    Echo {
        store_id: sale.store_id.clone(),
        moves: sale.stock_moves(),
    }
}

/// A failed look-up: nothing was written, so it is never ambiguous.
fn lookup_failed(error: &CallError) -> AttemptOutcome {
    match error.outcome(false) {
        AttemptOutcome::Retry {
            reason,
            retry_after,
        } => AttemptOutcome::Retry {
            reason: format!("look-up before sending again failed: {reason}"),
            retry_after,
        },
        other => other,
    }
}

impl Executor for RegisterExecutor {
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            match decode::<RegisterPayload>(job) {
                Ok(payload) => self.0.deliver(&payload.sale).await,
                Err(outcome) => outcome,
            }
        })
    }
}

impl Executor for CancelExecutor {
    fn execute<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            let payload = match decode::<CancelPayload>(job) {
                Ok(payload) => payload,
                Err(outcome) => return outcome,
            };
            let terminal = &payload.reversal.terminal_id;
            let original = &payload.original_terminal_tran_id;
            let original_id = match self.0.ledger.registered(terminal, original) {
                Ok(Some(id)) => id,
                Ok(None) => match self.0.unrecorded_original(&payload).await {
                    Ok(Some(id)) => id,
                    Ok(None) => {
                        info!(
                            %terminal,
                            terminal_tran_id = %original,
                            "outbox: the transaction to cancel never reached Smaregi; nothing to cancel"
                        );
                        return AttemptOutcome::Success;
                    }
                    Err(outcome) => return outcome,
                },
                Err(e) => return store_failed(e),
            };
            self.0.cancel_found(payload.reversal, original_id).await
        })
    }
}
