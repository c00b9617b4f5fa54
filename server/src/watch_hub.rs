//! Fan-out of applied events to watchers.
//!
//! The state machine publishes each committed revision's events once; every
//! watcher holds a broadcast receiver. The channel is bounded: a watcher that
//! falls behind by more than its capacity is told it lagged and catches up
//! from the `rev` index on disk instead, so a slow watcher costs neither
//! memory nor write latency.

use std::sync::Arc;

use tessera_proto::mvccpb::Event;
use tokio::sync::broadcast;

/// Revisions kept in memory for watchers that are slightly behind.
const CAPACITY: usize = 1024;

/// All events of one revision, in order.
#[derive(Debug)]
pub struct RevisionEvents {
    pub revision: i64,
    pub events: Vec<Event>,
}

pub struct WatchHub {
    tx: broadcast::Sender<Arc<RevisionEvents>>,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl WatchHub {
    pub fn publish(&self, revision: i64, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.tx.send(Arc::new(RevisionEvents { revision, events }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RevisionEvents>> {
        self.tx.subscribe()
    }
}
