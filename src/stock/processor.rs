//! The inbox processor: drains stored notifications in arrival order into
//! domain work, and marks each processed in the same transaction as the
//! work it caused.
//!
//! Today that work is stock: `stock_send` rows and Platform `pos:stock`
//! ids become refresh work ([`StockBook::process`]); other notifications
//! (`transaction_send`, `product_send`, `customer_send`) are marked
//! processed and stay in the inbox for the record. An entry that cannot be
//! processed is parked with its reason and the others go on.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::book::{StockBook, StockError};
use crate::intake::inbox::Inbox;
use crate::outbox::engine::Engine;
use crate::store::Store;

/// Entries taken per round (each round ends with one commit).
pub const BATCH: usize = 256;
/// How often the inbox is looked at without being told.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Processes the inbox until `shutdown`; `accepted` is notified by the
/// listener after each commit of a new notification.
pub async fn run(
    store: Store,
    book: StockBook,
    engine: Engine,
    accepted: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let inbox = match Inbox::open(&store) {
        Ok(inbox) => inbox,
        Err(e) => {
            error!(error = %e, "processor: cannot open the inbox");
            return;
        }
    };
    loop {
        let processed = match round(&store, &inbox, &book).await {
            Ok(processed) => processed,
            Err(e) => {
                // The store has failed: the daemon is stopping.
                error!(error = %e, "processor: stopped");
                return;
            }
        };
        if processed > 0 {
            engine.wake();
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = accepted.notified() => {}
            _ = tokio::time::sleep(RESCAN_INTERVAL) => {}
        }
    }
    info!("processor: stopped");
}

/// Processes up to [`BATCH`] entries and commits; how many.
async fn round(store: &Store, inbox: &Inbox, book: &StockBook) -> Result<usize, StockError> {
    let batch = inbox.unprocessed(BATCH)?;
    for &seq in &batch {
        let Some(entry) = inbox.entry(seq)? else {
            continue;
        };
        match book.process(inbox, seq, &entry) {
            Ok(notice) if !notice.hints.is_empty() => {
                info!(
                    seq,
                    products = notice.hints.len(),
                    "processor: stock notice queued for refresh"
                );
            }
            Ok(_) => {}
            Err(StockError::Store(e)) => return Err(StockError::Store(e)),
            Err(e) => {
                warn!(seq, error = %e, "processor: entry parked");
                inbox.park(seq, &entry, &e.to_string())?;
            }
        }
    }
    if !batch.is_empty() {
        store.commit().await?;
    }
    Ok(batch.len())
}
