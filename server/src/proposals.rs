//! Proposal batching: one Raft entry for many concurrent requests.
//!
//! openraft 0.9 appends each client write to the log and waits for its
//! fsync before it takes the next one, so proposing one request per entry
//! caps writes at one fsync each. Requests queue here instead, and a few
//! flusher tasks each take everything queued (up to a size bound) and hand
//! it to [`Node::write_batch`]: proposed as one entry on the leader, or
//! forwarded to the leader in one peer call from a follower. While one batch
//! is being synced and applied, the next one fills up. Under light load a
//! request finds no flusher busy and goes at once, alone, so batching adds
//! no latency.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use prost::Message;
use tessera_proto::tessera::{RaftBatch, RaftCommand, RaftResult};
use tokio::sync::oneshot;
use tonic::Status;

use crate::errors::EtcdError;
use crate::node::Node;

/// Batches proposed at the same time. Two keep the log busy: one is synced
/// while the other is applied, and meanwhile the queue refills.
const MAX_FLUSHERS: usize = 2;
/// Upper bound on a batch's encoded requests (a single request may exceed
/// it up to `--max-request-bytes`), so an entry stays a cheap Raft message.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A proposed request's result.
pub type Proposed = Result<RaftResult, Status>;

struct Pending {
    command: RaftCommand,
    bytes: usize,
    reply: oneshot::Sender<Proposed>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    flushers: usize,
}

/// Groups a member's concurrent requests into shared Raft entries.
pub struct ProposalBatcher {
    /// The member whose `write_batch` proposes batches (weak: it owns us).
    node: Weak<Node>,
    state: Mutex<State>,
}

impl ProposalBatcher {
    pub fn new(node: Weak<Node>) -> Arc<Self> {
        Arc::new(ProposalBatcher {
            node,
            state: Mutex::default(),
        })
    }

    /// Proposes `command` in the next batch and returns its result once this
    /// member has applied it.
    pub async fn propose(self: &Arc<Self>, command: RaftCommand) -> Proposed {
        let (reply, answer) = oneshot::channel();
        let bytes = command.encoded_len();
        let start_flusher = {
            let mut state = self.lock();
            state.queue.push_back(Pending {
                command,
                bytes,
                reply,
            });
            let start = state.flushers < MAX_FLUSHERS;
            state.flushers += usize::from(start);
            start
        };
        if start_flusher {
            tokio::spawn(self.clone().flush());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Status::internal("proposal batch ended early")))
    }

    /// Proposes queued requests, a batch at a time, until none are left.
    async fn flush(self: Arc<Self>) {
        loop {
            let batch = {
                let mut state = self.lock();
                let batch = take_batch(&mut state.queue);
                if batch.is_empty() {
                    state.flushers -= 1;
                    return;
                }
                batch
            };
            let (commands, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let written = match self.node.upgrade() {
                Some(node) => node.write_batch(RaftBatch { commands }).await,
                None => Err(EtcdError::Stopped.into()),
            };
            match written {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for reply in replies {
                        let result = results
                            .next()
                            .ok_or_else(|| Status::internal("apply returned too few results"));
                        let _ = reply.send(result);
                    }
                }
                Err(status) => {
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The oldest queued requests that fit in one batch (at least one, unless
/// the queue is empty). Requests whose callers gave up (timed out) before
/// they were sent are dropped: nothing was proposed for them.
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut bytes = 0;
    let mut batch = Vec::new();
    queue.retain(|p| !p.reply.is_closed());
    while let Some(next) = queue.front() {
        if !batch.is_empty() && bytes + next.bytes > MAX_BATCH_BYTES {
            break;
        }
        bytes += next.bytes;
        batch.extend(queue.pop_front());
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued request of `bytes`, and the receiver its caller waits on.
    fn pending(bytes: usize) -> (Pending, oneshot::Receiver<Proposed>) {
        let (reply, answer) = oneshot::channel();
        let p = Pending {
            command: RaftCommand::default(),
            bytes,
            reply,
        };
        (p, answer)
    }

    fn queue_of(sizes: &[usize]) -> (VecDeque<Pending>, Vec<oneshot::Receiver<Proposed>>) {
        sizes.iter().map(|&b| pending(b)).unzip()
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_never_empty() {
        let (mut queue, _callers) = queue_of(&[100, MAX_BATCH_BYTES - 200, 150, 10]);
        assert_eq!(take_batch(&mut queue).len(), 2);
        assert_eq!(take_batch(&mut queue).len(), 2);
        assert!(take_batch(&mut queue).is_empty());
        // One request above the bound still goes, alone.
        let (mut queue, _callers) = queue_of(&[2 * MAX_BATCH_BYTES, 10]);
        assert_eq!(take_batch(&mut queue).len(), 1);
        assert_eq!(take_batch(&mut queue).len(), 1);
    }

    #[test]
    fn requests_whose_callers_gave_up_are_not_proposed() {
        let (mut queue, mut callers) = queue_of(&[10, 20, 30]);
        drop(callers.remove(1));
        let batch = take_batch(&mut queue);
        assert_eq!(batch.iter().map(|p| p.bytes).collect::<Vec<_>>(), [10, 30]);
    }
}
