//! Deletes compacted history in the background, as etcd does: applying a
//! Compaction entry only records and publishes the new compacted revision
//! (`Store::schedule_compact`); this task then removes the old versions in
//! batches of `--experimental-compaction-batch-limit` versions, pausing
//! `--experimental-compaction-sleep-interval` between batches so applies go
//! on, and records the end (`Store::finish_compaction`), which `--physical`
//! compactions wait for. A compaction interrupted by a restart is resumed.
//! One scheduled while another runs is taken up when that one has finished
//! (as etcd queues them), so frequent compactions cannot starve each other;
//! a snapshot installed under a running pass starts it over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mvcc::store::CompactCursor;
use crate::mvcc::{Store, StoreError};

/// How the deletion is paced.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Versions removed per batch.
    pub batch_limit: usize,
    /// Pause between batches.
    pub pause: Duration,
}

/// Starts the background compaction of `store`.
pub fn spawn(store: Arc<Store>, pace: Pace) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = run_pending(&store, pace).await {
                tracing::error!(error = %e, "background compaction failed; retrying");
            }
            store.compaction_wanted().await;
        }
    });
}

/// Runs every scheduled compaction to its end.
async fn run_pending(store: &Arc<Store>, pace: Pace) -> Result<(), StoreError> {
    while let Some(rev) = store.compaction_pending()? {
        let started = Instant::now();
        let installs = store.installs();
        let mut from = CompactCursor::default();
        let mut removed = 0;
        loop {
            let (s, start) = (store.clone(), std::mem::take(&mut from));
            let (n, next) =
                tokio::task::spawn_blocking(move || s.compact_step(rev, &start, pace.batch_limit))
                    .await
                    .map_err(|e| StoreError::Corrupt(format!("compaction task: {e}")))??;
            removed += n;
            if store.installs() != installs {
                // The state was replaced: start over on the new one.
                break;
            }
            match next {
                Some(key) => {
                    from = key;
                    tokio::time::sleep(pace.pause).await;
                }
                None => {
                    store.finish_compaction(rev)?;
                    tracing::info!(compact_revision = rev, removed, took = ?started.elapsed(),
                        "finished scheduled compaction");
                    break;
                }
            }
        }
    }
    // A snapshot installed under the store may carry a finished compaction.
    store.publish_finished_compaction()
}
