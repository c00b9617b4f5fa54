//! Proposal batching: one Raft entry for many concurrent requests.
//!
//! openraft 0.9 appends each client write to the log and waits for its
//! fsync before it takes the next one, so proposing one request per entry
//! caps writes at one fsync each. Requests queue here instead, and a few
//! flusher tasks each take everything queued (up to a size bound) and propose
//! it as one entry: while one batch is being synced and applied, the next one
//! fills up. Under light load a request finds no flusher busy and is proposed
//! at once, alone, so batching adds no latency.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use prost::Message;
use tessera_proto::tessera::{RaftBatch, RaftCommand, RaftResult};
use tokio::sync::oneshot;
use tonic::Status;

use crate::raft::{Command, Raft};

/// Batches proposed at the same time. Two keep the log busy: one is synced
/// while the other is applied, and meanwhile the queue refills.
const MAX_FLUSHERS: usize = 2;
/// Upper bound on a batch's encoded requests (a single request may exceed
/// it up to `--max-request-bytes`), so an entry stays a cheap Raft message.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// A proposed request's log index and result.
pub type Proposed = Result<(u64, RaftResult), Status>;

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

/// Groups requests proposed on the leader into shared Raft entries.
pub struct ProposalBatcher {
    raft: Raft,
    state: Mutex<State>,
}

impl ProposalBatcher {
    pub fn new(raft: Raft) -> Arc<Self> {
        Arc::new(ProposalBatcher {
            raft,
            state: Mutex::default(),
        })
    }

    /// Proposes `command` (this member must lead) in the next batch and
    /// returns its entry's log index with its result once applied here.
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
            let written = self
                .raft
                .client_write(Command(RaftBatch { commands }))
                .await;
            match written {
                Ok(w) => {
                    let index = w.log_id.index;
                    let mut results = w.data.0.results.into_iter();
                    for reply in replies {
                        let result = results
                            .next()
                            .map(|r| (index, r))
                            .ok_or_else(|| Status::internal("apply returned too few results"));
                        let _ = reply.send(result);
                    }
                }
                Err(e) => {
                    let status = crate::node::raft_write_error(e);
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

/// The oldest queued requests that fit in one batch (at least one).
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut bytes = 0;
    let mut batch = Vec::new();
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

    fn pending(bytes: usize) -> Pending {
        Pending {
            command: RaftCommand::default(),
            bytes,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_never_empty() {
        let mut queue: VecDeque<Pending> =
            [100, MAX_BATCH_BYTES - 200, 150, 10].map(pending).into();
        assert_eq!(take_batch(&mut queue).len(), 2);
        assert_eq!(take_batch(&mut queue).len(), 2);
        assert!(take_batch(&mut queue).is_empty());
        // One request above the bound still goes, alone.
        let mut queue: VecDeque<Pending> = [2 * MAX_BATCH_BYTES, 10].map(pending).into();
        assert_eq!(take_batch(&mut queue).len(), 1);
        assert_eq!(take_batch(&mut queue).len(), 1);
    }
}
