//! Batching of linearizable read points.
//!
//! Every linearizable read needs a Raft read index: the commit index at a
//! moment the leader had confirmed its leadership with a quorum. Asking for
//! one per read makes the Raft core (and, on a follower, the leader) handle
//! one request per read. As etcd's `linearizableReadLoop` does, concurrent
//! reads share one: a read index obtained *after* a read arrived is a valid
//! read point for it, so everyone waiting when an attempt starts is served by
//! that attempt, and whoever arrives during it waits for the next one.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::Status;

type Waiter = oneshot::Sender<Result<u64, Status>>;

/// Shares read-index attempts among concurrent readers.
#[derive(Default)]
pub struct ReadIndexBatcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Whether a task is fetching read indexes for waiters.
    running: bool,
    /// Readers that arrived since the current attempt started.
    arrived: Vec<Waiter>,
}

impl ReadIndexBatcher {
    /// A read index obtained after this call began. `fetch` makes one
    /// attempt; a failed attempt is retried after `retry_pause` for as long
    /// as someone still waits (callers bound their own wait). Only the
    /// caller that finds no attempt running has its `fetch` used.
    pub async fn read_index<F, Fut>(
        self: &Arc<Self>,
        retry_pause: Duration,
        fetch: F,
    ) -> Result<u64, Status>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, Status>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.lock();
            state.arrived.push(tx);
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            tokio::spawn(self.clone().run(retry_pause, fetch));
        }
        rx.await
            .unwrap_or_else(|_| Err(Status::internal("read index task ended early")))
    }

    async fn run<F, Fut>(self: Arc<Self>, retry_pause: Duration, fetch: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<u64, Status>>,
    {
        let mut batch: Vec<Waiter> = Vec::new();
        loop {
            {
                let mut state = self.lock();
                batch.append(&mut state.arrived);
                // Readers that gave up (timed out) need no answer.
                batch.retain(|w| !w.is_closed());
                if batch.is_empty() {
                    state.running = false;
                    return;
                }
            }
            match fetch().await {
                Ok(index) => {
                    for waiter in batch.drain(..) {
                        let _ = waiter.send(Ok(index));
                    }
                }
                // No leader or no quorum yet: keep the batch and try again
                // (joined by whoever arrives meanwhile), as etcd's read loop
                // does until the request's deadline.
                Err(e) => {
                    tracing::debug!(error = %e, waiting = batch.len(), "read index failed; retrying");
                    tokio::time::sleep(retry_pause).await;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fetch that counts its calls, takes 20 ms and answers with the
    /// number of fetches started so far (a stand-in for a growing index).
    fn counting_fetch(
        calls: &Arc<AtomicU64>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<u64, Status>> + Send>> + Send + 'static
    {
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(n)
            })
        }
    }

    #[tokio::test]
    async fn concurrent_readers_share_attempts_and_late_ones_wait_for_the_next() {
        let batcher = Arc::new(ReadIndexBatcher::default());
        let calls = Arc::new(AtomicU64::new(0));
        let first = {
            let (b, c) = (batcher.clone(), calls.clone());
            tokio::spawn(async move { b.read_index(Duration::ZERO, counting_fetch(&c)).await })
        };
        // Let the first attempt start, then pile on 100 readers during it.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late: Vec<_> = (0..100)
            .map(|_| {
                let (b, c) = (batcher.clone(), calls.clone());
                tokio::spawn(async move { b.read_index(Duration::ZERO, counting_fetch(&c)).await })
            })
            .collect();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        for r in late {
            // Arrived during attempt 1, so only attempt 2 may serve them.
            assert_eq!(r.await.unwrap().unwrap(), 2);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failures_are_retried_and_an_idle_batcher_stops() {
        let batcher = Arc::new(ReadIndexBatcher::default());
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let fetch = move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n < 3 {
                    Err(Status::unavailable("no leader"))
                } else {
                    Ok(7)
                }
            }
        };
        let index = batcher.read_index(Duration::from_millis(1), fetch).await;
        assert_eq!(index.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // The task has nothing left to do and lets the next reader start one.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!batcher.lock().running);
    }
}
