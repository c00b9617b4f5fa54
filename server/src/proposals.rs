//! Proposal batching: one Raft entry for many concurrent requests.
//!
//! openraft 0.9 appends each client write to the log and waits for its
//! fsync before it takes the next one, so proposing one request per entry
//! caps writes at one fsync each. Requests queue here instead, and a few
//! flusher tasks each take everything queued (up to a size bound) and hand
//! it to [`Node::write_batch`]: proposed as one entry on the leader, or
//! forwarded to the leader in one peer call from a follower. On the leader,
//! the batches followers forward join this queue too ([`ProposalBatcher::
//! propose_group`]), so the whole cluster's requests share its entries.
//!
//! While one batch is being synced and applied, the next one fills up.
//! Under light load a request finds no flusher busy and goes at once, alone,
//! so batching adds no latency. Under load, a second flusher starts only
//! once the queue holds half as many requests as are in flight: started at
//! the first request after a flusher emptied the queue, it would propose
//! that request nearly alone, and every such entry costs the leader a
//! whole fsync that the next full batch then waits behind.
//!
//! Each request has a deadline (etcd's request timeout). A batch is given
//! until its oldest request's deadline, and a request still queued at its
//! deadline is not proposed: one timer per batch instead of one per request,
//! whose registration in tokio's timer wheel was 1.4% of a member's CPU
//! under a put load.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tessera_proto::tessera::RaftResult;
use tokio::sync::oneshot;
use tokio::time::Instant;
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

/// Where a group of requests was written: the entry's log index and each
/// request's result, in order.
pub type Written = Result<(u64, Vec<RaftResult>), Status>;

/// Requests proposed together by one caller: a single client request, or a
/// batch a follower forwarded. Each is an encoded `tessera.RaftCommand`, so
/// that a batch is assembled by copying bytes, and a caller that retries at
/// a new leader keeps its request without a deep copy.
struct Pending {
    commands: Vec<Bytes>,
    bytes: usize,
    /// When the caller is answered with etcd's timeout error instead.
    deadline: Instant,
    reply: oneshot::Sender<Written>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Requests in `queue`.
    queued: usize,
    /// Requests in the batches flushers are writing.
    in_flight: usize,
    flushers: usize,
}

impl State {
    /// Whether queued requests should go now, in a batch of their own,
    /// when `busy` other flushers are writing.
    fn worth_a_batch(&self, busy: usize) -> bool {
        self.queued > 0 && (busy == 0 || (busy < MAX_FLUSHERS && self.queued * 2 >= self.in_flight))
    }
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
    /// member has applied it, or etcd's timeout error at `deadline`.
    pub async fn propose(self: &Arc<Self>, command: Bytes, deadline: Instant) -> Proposed {
        let (_, results) = self.propose_group(vec![command], deadline).await?;
        results
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("apply returned too few results"))
    }

    /// Proposes `commands` together in the next batch; returns the entry's
    /// index and their results once this member has applied it, or etcd's
    /// timeout error at `deadline`.
    pub async fn propose_group(
        self: &Arc<Self>,
        commands: Vec<Bytes>,
        deadline: Instant,
    ) -> Written {
        let (reply, answer) = oneshot::channel();
        let bytes = commands.iter().map(Bytes::len).sum();
        let start_flusher = {
            let mut state = self.lock();
            state.queued += commands.len();
            state.queue.push_back(Pending {
                commands,
                bytes,
                deadline,
                reply,
            });
            let start = state.worth_a_batch(state.flushers);
            state.flushers += usize::from(start);
            start
        };
        if start_flusher {
            tokio::spawn(self.clone().flush());
        }
        answer.await.unwrap_or_else(|_| {
            // Dropped unanswered: at its deadline, before it was proposed, or
            // because the member is going away.
            Err(if Instant::now() >= deadline {
                EtcdError::Timeout.into()
            } else {
                Status::internal("proposal batch ended early")
            })
        })
    }

    /// Proposes queued requests, a batch at a time, while they are worth a
    /// batch of their own (see the module comment).
    async fn flush(self: Arc<Self>) {
        loop {
            let batch = {
                let mut state = self.lock();
                let batch = if state.worth_a_batch(state.flushers - 1) {
                    take_batch(&mut state)
                } else {
                    Vec::new()
                };
                if batch.is_empty() {
                    state.flushers -= 1;
                    return;
                }
                batch
            };
            let count: usize = batch.iter().map(|p| p.commands.len()).sum();
            let deadline = batch.iter().map(|p| p.deadline).min();
            let mut commands = Vec::with_capacity(count);
            let mut callers = Vec::with_capacity(batch.len());
            for p in batch {
                callers.push((p.commands.len(), p.reply));
                commands.extend(p.commands);
            }
            let written = match (self.node.upgrade(), deadline) {
                (Some(node), Some(deadline)) => {
                    tokio::time::timeout_at(deadline, node.write_batch(&commands))
                        .await
                        .unwrap_or_else(|_| Err(EtcdError::Timeout.into()))
                }
                _ => Err(EtcdError::Stopped.into()),
            };
            self.lock().in_flight -= count;
            reply_each(written, callers);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands each caller its share of a batch's results (`callers` holds how
/// many requests each proposed, in batch order).
fn reply_each(written: Written, callers: Vec<(usize, oneshot::Sender<Written>)>) {
    match written {
        Ok((index, results)) => {
            let mut results = results.into_iter();
            for (count, reply) in callers {
                let mine: Vec<RaftResult> = results.by_ref().take(count).collect();
                let answer = if mine.len() == count {
                    Ok((index, mine))
                } else {
                    Err(Status::internal("apply returned too few results"))
                };
                let _ = reply.send(answer);
            }
        }
        Err(status) => {
            for (_, reply) in callers {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

/// The oldest queued requests that fit in one batch (at least one group,
/// unless the queue is empty), counted as in flight. Requests whose callers
/// gave up before they were sent, or whose deadline has passed, are dropped:
/// nothing was proposed for them.
fn take_batch(state: &mut State) -> Vec<Pending> {
    let mut bytes = 0;
    let mut batch = Vec::new();
    let before = state.queue.len();
    let now = Instant::now();
    state
        .queue
        .retain(|p| !p.reply.is_closed() && p.deadline > now);
    if state.queue.len() != before {
        state.queued = state.queue.iter().map(|p| p.commands.len()).sum();
    }
    while let Some(next) = state.queue.front() {
        if !batch.is_empty() && bytes + next.bytes > MAX_BATCH_BYTES {
            break;
        }
        bytes += next.bytes;
        batch.extend(state.queue.pop_front());
    }
    let taken: usize = batch.iter().map(|p| p.commands.len()).sum();
    state.queued -= taken;
    state.in_flight += taken;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued group of `count` requests of `bytes` in all, and the
    /// receiver its caller waits on.
    fn pending(count: usize, bytes: usize) -> (Pending, oneshot::Receiver<Written>) {
        let (reply, answer) = oneshot::channel();
        let p = Pending {
            commands: vec![Bytes::new(); count],
            bytes,
            deadline: Instant::now() + std::time::Duration::from_secs(60),
            reply,
        };
        (p, answer)
    }

    /// A state whose queue holds one request of each of `sizes` bytes.
    fn queue_of(sizes: &[usize]) -> (State, Vec<oneshot::Receiver<Written>>) {
        let (queue, callers): (VecDeque<_>, Vec<_>) = sizes.iter().map(|&b| pending(1, b)).unzip();
        let state = State {
            queued: queue.len(),
            queue,
            ..State::default()
        };
        (state, callers)
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_never_empty() {
        let (mut state, _callers) = queue_of(&[100, MAX_BATCH_BYTES - 200, 150, 10]);
        assert_eq!(take_batch(&mut state).len(), 2);
        assert_eq!(take_batch(&mut state).len(), 2);
        assert!(take_batch(&mut state).is_empty());
        assert_eq!((state.queued, state.in_flight), (0, 4));
        // One request above the bound still goes, alone.
        let (mut state, _callers) = queue_of(&[2 * MAX_BATCH_BYTES, 10]);
        assert_eq!(take_batch(&mut state).len(), 1);
        assert_eq!(take_batch(&mut state).len(), 1);
    }

    #[test]
    fn requests_whose_callers_gave_up_are_not_proposed() {
        let (mut state, mut callers) = queue_of(&[10, 20, 30]);
        drop(callers.remove(1));
        let batch = take_batch(&mut state);
        assert_eq!(batch.iter().map(|p| p.bytes).collect::<Vec<_>>(), [10, 30]);
        assert_eq!((state.queued, state.in_flight), (0, 2));
    }

    #[test]
    fn requests_past_their_deadline_are_not_proposed() {
        let (mut state, _callers) = queue_of(&[10, 20, 30]);
        state.queue[0].deadline = Instant::now();
        let batch = take_batch(&mut state);
        assert_eq!(batch.iter().map(|p| p.bytes).collect::<Vec<_>>(), [20, 30]);
        assert_eq!((state.queued, state.in_flight), (0, 2));
    }

    #[tokio::test]
    async fn callers_get_etcds_timeout_at_their_deadline() {
        let timeout = Status::from(EtcdError::Timeout);
        let batcher = ProposalBatcher::new(Weak::new());
        let expired = batcher
            .propose(Bytes::from_static(b"x"), Instant::now())
            .await;
        assert_eq!(expired.unwrap_err().message(), timeout.message());
        // Before its deadline, a request is proposed (and here fails at once:
        // the member is gone).
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let stopped = batcher.propose(Bytes::from_static(b"x"), later).await;
        assert_eq!(
            stopped.unwrap_err().message(),
            Status::from(EtcdError::Stopped).message()
        );
    }

    #[test]
    fn a_second_batch_waits_for_half_as_many_requests_as_are_in_flight() {
        let (mut state, _callers) = queue_of(&[10]);
        // Nothing in flight: the first request goes at once, alone.
        assert!(state.worth_a_batch(0));
        take_batch(&mut state);
        assert!(!state.worth_a_batch(0), "nothing queued");
        // A flusher writes 1 request: the next one may go beside it.
        let (late, _caller) = pending(1, 10);
        state.queue.push_back(late);
        state.queued += 1;
        assert!(state.worth_a_batch(1));
        // A flusher writes 300: one more request waits for it...
        state.in_flight = 300;
        assert!(!state.worth_a_batch(1));
        // ...unless no flusher is busy any more, or 150 have queued up.
        assert!(state.worth_a_batch(0));
        let (group, _caller) = pending(149, 1000);
        state.queue.push_back(group);
        state.queued += 149;
        assert!(state.worth_a_batch(1));
        // Never more than MAX_FLUSHERS batches at once.
        assert!(!state.worth_a_batch(MAX_FLUSHERS));
    }

    #[test]
    fn each_caller_gets_its_share_of_the_results() {
        let result = |error| RaftResult {
            response: None,
            error,
        };
        let (first, mut first_answer) = oneshot::channel();
        let (group, mut group_answer) = oneshot::channel();
        reply_each(
            Ok((7, vec![result(1), result(2), result(3)])),
            vec![(1, first), (2, group)],
        );
        let (index, results) = first_answer.try_recv().unwrap().unwrap();
        assert_eq!((index, results), (7, vec![result(1)]));
        let (index, results) = group_answer.try_recv().unwrap().unwrap();
        assert_eq!((index, results), (7, vec![result(2), result(3)]));
        // Too few results is an error for the callers left short.
        let (short, mut short_answer) = oneshot::channel();
        reply_each(Ok((8, vec![])), vec![(1, short)]);
        assert!(short_answer.try_recv().unwrap().is_err());
    }
}
