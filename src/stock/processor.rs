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

/// How often processed entries past their retention are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// Entries pruned per commit, so that pruning never holds the store long.
const PRUNE_BATCH: usize = 1000;

/// Processes the inbox until `shutdown`; `accepted` is notified by the
/// listener after each commit of a new notification. Processed entries
/// older than `retention` are pruned hourly.
pub async fn run(
    store: Store,
    inbox: Inbox,
    book: StockBook,
    engine: Engine,
    accepted: Arc<Notify>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let mut next_prune = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        if tokio::time::Instant::now() >= next_prune {
            next_prune += PRUNE_INTERVAL;
            if let Err(e) = prune(&store, &inbox, retention).await {
                error!(error = %e, "processor: stopped");
                return;
            }
        }
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
                inbox.park(seq, &e.to_string())?;
            }
        }
    }
    if !batch.is_empty() {
        store.commit().await?;
        inbox.processed(&batch);
    }
    Ok(batch.len())
}

/// Prunes processed entries received more than `retention` ago.
async fn prune(store: &Store, inbox: &Inbox, retention: Duration) -> Result<(), StockError> {
    let now = crate::outbox::retry::unix_millis(std::time::SystemTime::now());
    let before = now.saturating_sub(retention.as_millis() as u64);
    let mut total = 0;
    loop {
        let pruned = inbox.prune_processed(before, PRUNE_BATCH)?;
        if pruned == 0 {
            break;
        }
        store.commit().await?;
        total += pruned;
    }
    if total > 0 {
        info!(
            pruned = total,
            "processor: pruned processed notifications past their retention"
        );
    }
    Ok(())
}

/// Stages a back-fill at start-up and every `interval` until `shutdown`.
pub async fn schedule_backfill(
    store: Store,
    book: StockBook,
    engine: Engine,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let staged = async {
            book.stage_backfill()?;
            store.commit().await?;
            Ok::<_, StockError>(())
        };
        match staged.await {
            Ok(()) => engine.wake(),
            Err(StockError::Store(e)) => {
                error!(error = %e, "back-fill: stopped");
                return;
            }
            Err(e) => warn!(error = %e, "back-fill: cannot stage; trying again later"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StockConfig;
    use crate::intake::inbox::{Accepted, EntryState, Offer, Route};

    #[tokio::test]
    async fn an_entry_that_cannot_be_processed_is_parked_and_the_others_go_on() {
        let temp = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(temp.path());
        let inbox = Inbox::open(&store).unwrap();
        let book = StockBook::open(&store, &StockConfig::default()).unwrap();
        let good = form_urlencoded::Serializer::new(String::new())
            .append_pair("proc_name", "stock_send")
            .append_pair(
                "params",
                r#"{"data":[{"table_name":"Stock","rows":[{"storeId":"1","productId":"5"}]}]}"#,
            )
            .finish();
        let mut seqs = Vec::new();
        for (key, body) in [("a", "proc_name=%ZZ".to_owned()), ("b", good)] {
            let offer = Offer {
                route: Route::Notify,
                kind: "stock_send",
                dedup_key: key,
                body: body.as_bytes(),
                now: 1,
                window: 0,
            };
            let Accepted::New(seq) = inbox.accept(offer).unwrap() else {
                panic!("new")
            };
            seqs.push(seq);
        }
        assert_eq!(round(&store, &inbox, &book).await.unwrap(), 2);
        let broken = inbox.entry(seqs[0]).unwrap().unwrap();
        assert_eq!(broken.state, EntryState::Parked);
        assert!(broken.parked_reason.unwrap().contains("form"));
        assert_eq!(
            inbox.entry(seqs[1]).unwrap().unwrap().state,
            EntryState::Processed
        );
        assert!(inbox.unprocessed(10).unwrap().is_empty());
        let queue = crate::outbox::queue::Queue::open(&store).unwrap();
        assert_eq!(
            queue.counts().unwrap().values().sum::<u64>(),
            1,
            "one refresh job"
        );
        store.close().await.unwrap();
    }
}
