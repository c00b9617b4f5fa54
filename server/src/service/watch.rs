//! The etcd Watch service: one bidirectional stream carries many watchers.
//!
//! Each watcher is a task: it first replays history from its start revision
//! out of the `rev` index (a consistent RocksDB snapshot at a time), then
//! follows the live [`WatchHub`](crate::watch_hub::WatchHub), skipping what
//! it already replayed. If it falls too far behind the hub it goes back to
//! replaying from disk. Responses of all watchers of a stream go through one
//! bounded queue, so a client that does not read stops its watchers rather
//! than growing memory, and never slows writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use prost::Message;
use tessera_proto::etcdserverpb::watch_create_request::FilterType;
use tessera_proto::etcdserverpb::watch_request::RequestUnion;
use tessera_proto::etcdserverpb::watch_server::Watch;
use tessera_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use tessera_proto::mvccpb::{event::EventType, Event, KeyValue};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Credentials, PermType};
use crate::errors::EtcdError;
use crate::mvcc::encoding::KeyRange;
use crate::mvcc::store::ReadView;
use crate::node::Node;

/// Responses queued per stream before watchers wait for the client.
const OUTBOUND_QUEUE: usize = 128;
/// Events per response while replaying history.
const REPLAY_BATCH: usize = 1000;
/// etcd's id for responses that belong to no single watcher.
const INVALID_WATCH_ID: i64 = -1;

pub type Outbound = mpsc::Sender<Result<WatchResponse, Status>>;

pub struct WatchService {
    node: Arc<Node>,
}

impl WatchService {
    pub fn new(node: Arc<Node>) -> Self {
        WatchService { node }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<BoxStream<WatchResponse>>, Status> {
        // clientv3's WithRequireLeader: no stream without a leader, and the
        // stream ends once the leader has been gone for a while.
        let requires_leader = req
            .metadata()
            .get(REQUIRE_LEADER_KEY)
            .is_some_and(|v| v == "true");
        if requires_leader && self.node.leader().is_none() {
            return Err(EtcdError::NoLeader.into());
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let creds = Credentials::of(&req);
        tokio::spawn(serve_stream(
            self.node.clone(),
            creds,
            req.into_inner(),
            tx.clone(),
        ));
        if requires_leader {
            tokio::spawn(end_on_leader_loss(self.node.clone(), tx));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// gRPC metadata key clients set to require a leader (etcd's rpctypes).
const REQUIRE_LEADER_KEY: &str = "hasleader";
/// etcd ends leader-requiring streams after this many election timeouts
/// without a leader.
const NO_LEADER_TIMEOUTS: u32 = 3;

/// Ends a leader-requiring stream with etcd's "no leader" error once this
/// member has seen no leader for [`NO_LEADER_TIMEOUTS`] election timeouts.
/// The error ends the response stream; `serve_stream` then sees the client
/// side closed and stops its watchers.
async fn end_on_leader_loss(node: Arc<Node>, tx: Outbound) {
    let mut metrics = node.raft.metrics();
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
        if node.leader().is_some() {
            continue;
        }
        tokio::time::sleep(node.election_timeout() * NO_LEADER_TIMEOUTS).await;
        if node.leader().is_none() {
            let _ = tx.send(Err(EtcdError::NoLeader.into())).await;
            return;
        }
    }
}

/// A watch the server opens for itself (the lock and election services):
/// one watcher's responses, stopped when dropped.
pub struct InternalWatch {
    pub responses: mpsc::Receiver<Result<WatchResponse, Status>>,
    task: JoinHandle<()>,
}

impl InternalWatch {
    /// Watches `range` from revision `start` (0 = after the current one).
    pub fn start(node: Arc<Node>, range: KeyRange, start: i64) -> Self {
        let (tx, responses) = mpsc::channel(OUTBOUND_QUEUE);
        let start = if start == 0 {
            node.store.current_rev() + 1
        } else {
            start
        };
        let spec = Spec {
            id: 0,
            range,
            start,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            fragment: false,
        };
        let delivered = Arc::new(AtomicI64::new(start - 1));
        let task = tokio::spawn(run_watcher(node, spec, tx, delivered));
        InternalWatch { responses, task }
    }
}

impl Drop for InternalWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one watcher watches and how.
struct Spec {
    id: i64,
    range: KeyRange,
    start: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
}

struct Watcher {
    task: JoinHandle<()>,
    /// Every event at or below this revision has been queued for the client.
    delivered: Arc<AtomicI64>,
}

/// Serves one watch stream: the requests of `inbound`, the responses on `tx`.
/// Shared by the gRPC service and the JSON gateway.
pub async fn serve_stream(
    node: Arc<Node>,
    creds: Credentials,
    mut inbound: impl Stream<Item = Result<WatchRequest, Status>> + Unpin,
    tx: Outbound,
) {
    let mut watchers: HashMap<i64, Watcher> = HashMap::new();
    let mut next_id = 0i64;
    loop {
        let msg = tokio::select! {
            m = inbound.next() => m,
            _ = tx.closed() => break,
        };
        let req = match msg {
            Some(Ok(req)) => req,
            Some(Err(_)) => break,
            // The client closed its side: as in etcd, its watchers keep
            // delivering until it goes away.
            None => {
                tx.closed().await;
                break;
            }
        };
        watchers.retain(|_, w| !w.task.is_finished());
        let sent = match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                create(&node, &creds, c, &mut watchers, &mut next_id, &tx).await
            }
            Some(RequestUnion::CancelRequest(c)) => match watchers.remove(&c.watch_id) {
                Some(w) => {
                    w.task.abort();
                    let _ = w.task.await;
                    let resp = WatchResponse {
                        header: node.header(0),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    tx.send(Ok(resp)).await.is_ok()
                }
                None => true,
            },
            Some(RequestUnion::ProgressRequest(_)) => {
                // Only claim a revision every watcher has fully delivered.
                let synced = watchers
                    .values()
                    .map(|w| w.delivered.load(Ordering::SeqCst))
                    .fold(node.store.current_rev(), i64::min)
                    // header(0) would mean "current"; revision 1 has no events
                    .max(1);
                let resp = WatchResponse {
                    header: node.header(synced),
                    watch_id: INVALID_WATCH_ID,
                    ..Default::default()
                };
                tx.send(Ok(resp)).await.is_ok()
            }
            None => true,
        };
        if !sent {
            break;
        }
    }
    for (_, w) in watchers {
        w.task.abort();
    }
}

/// Handles a create request; returns false when the client is gone.
async fn create(
    node: &Arc<Node>,
    creds: &Credentials,
    c: WatchCreateRequest,
    watchers: &mut HashMap<i64, Watcher>,
    next_id: &mut i64,
    tx: &Outbound,
) -> bool {
    let key = if c.key.is_empty() {
        vec![0]
    } else {
        c.key.clone()
    };
    let range = KeyRange::new(&key, &c.range_end);
    let current = node.store.current_rev();
    // etcd checks read permission on every create (so an expired token
    // refuses new watchers on a live stream); a refusal cancels only it.
    let permitted = node.auth.identify(creds).and_then(|who| {
        node.auth
            .store
            .view()
            .check(who.as_ref(), &key, &c.range_end, PermType::Read)
    });
    if let Err(e) = permitted {
        let status = tonic::Status::from(e);
        let refused = WatchResponse {
            header: node.header(current),
            watch_id: INVALID_WATCH_ID,
            created: true,
            canceled: true,
            // etcd puts the gRPC error's Go string here.
            cancel_reason: format!(
                "rpc error: code = {:?} desc = {}",
                status.code(),
                status.message()
            ),
            ..Default::default()
        };
        return tx.send(Ok(refused)).await.is_ok();
    }
    let id = match &range {
        KeyRange::Between(k, e) if k >= e => Err("mvcc: watcher range is empty"),
        _ if c.watch_id == 0 => {
            while watchers.contains_key(next_id) {
                *next_id += 1;
            }
            *next_id += 1;
            Ok(*next_id - 1)
        }
        _ if watchers.contains_key(&c.watch_id) => {
            Err("mvcc: duplicate watch ID provided on the WatchStream")
        }
        _ => Ok(c.watch_id),
    };
    let created = WatchResponse {
        header: node.header(current),
        watch_id: *id.as_ref().unwrap_or(&INVALID_WATCH_ID),
        created: true,
        canceled: id.is_err(),
        cancel_reason: id.err().unwrap_or_default().to_string(),
        ..Default::default()
    };
    if tx.send(Ok(created)).await.is_err() {
        return false;
    }
    let Ok(id) = id else { return true };
    let start = if c.start_revision == 0 {
        current + 1
    } else {
        c.start_revision
    };
    let spec = Spec {
        id,
        range,
        start,
        prev_kv: c.prev_kv,
        no_put: c.filters.contains(&(FilterType::Noput as i32)),
        no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
        progress_notify: c.progress_notify,
        fragment: c.fragment,
    };
    let delivered = Arc::new(AtomicI64::new(start - 1));
    let task = tokio::spawn(run_watcher(
        node.clone(),
        spec,
        tx.clone(),
        delivered.clone(),
    ));
    watchers.insert(id, Watcher { task, delivered });
    true
}

/// Why a watcher stopped following the hub.
enum Interrupted {
    /// It fell behind the in-memory window: replay from disk again.
    Lagged,
    /// The client or the server went away.
    Done,
}

async fn run_watcher(node: Arc<Node>, spec: Spec, tx: Outbound, delivered: Arc<AtomicI64>) {
    let mut next = spec.start;
    loop {
        // Subscribe before reading history so no revision falls in between.
        let rx = node.hub.subscribe();
        match replay(&node, &spec, &tx, &mut next, &delivered).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(watch_id = spec.id, error = %e, "watch replay failed");
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return;
            }
        }
        match follow(&node, &spec, &tx, rx, &mut next, &delivered).await {
            Interrupted::Lagged => tracing::debug!(
                watch_id = spec.id,
                next,
                "watcher lagged; replaying from disk"
            ),
            Interrupted::Done => return,
        }
    }
}

/// Replays history from `next` up to the current revision. Returns false
/// when the watcher is finished (compacted start, or the client is gone).
async fn replay(
    node: &Node,
    spec: &Spec,
    tx: &Outbound,
    next: &mut i64,
    delivered: &AtomicI64,
) -> Result<bool, crate::mvcc::StoreError> {
    loop {
        let (events, covered, current) = {
            let view = node.store.read_view();
            if *next > view.rev {
                return Ok(true);
            }
            if *next < view.compact_rev {
                let resp = WatchResponse {
                    header: node.header(view.rev),
                    watch_id: spec.id,
                    canceled: true,
                    compact_revision: view.compact_rev,
                    ..Default::default()
                };
                let _ = tx.send(Ok(resp)).await;
                return Ok(false);
            }
            let (events, covered) = view.history(*next, view.rev, REPLAY_BATCH)?;
            (events, covered, view.rev)
        };
        if !send_events(node, spec, tx, covered, &events).await {
            return Ok(false);
        }
        *next = covered + 1;
        delivered.store(covered, Ordering::SeqCst);
        if covered >= current {
            return Ok(true);
        }
    }
}

/// Follows live revisions until the watcher lags or the stream ends.
async fn follow(
    node: &Node,
    spec: &Spec,
    tx: &Outbound,
    mut rx: broadcast::Receiver<Arc<crate::watch_hub::RevisionEvents>>,
    next: &mut i64,
    delivered: &AtomicI64,
) -> Interrupted {
    let every = node.config.experimental_watch_progress_notify_interval;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + every,
        every.max(Duration::from_millis(1)),
    );
    let mut sent_since_tick = false;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(batch) if batch.revision < *next => {}
                Ok(batch) => {
                    let sent = send_events(node, spec, tx, batch.revision, &batch.events).await;
                    if !sent {
                        return Interrupted::Done;
                    }
                    sent_since_tick = true;
                    *next = batch.revision + 1;
                    delivered.store(batch.revision, Ordering::SeqCst);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return Interrupted::Lagged,
                Err(broadcast::error::RecvError::Closed) => return Interrupted::Done,
            },
            _ = ticker.tick(), if spec.progress_notify => {
                if !std::mem::take(&mut sent_since_tick) {
                    let resp = WatchResponse {
                        header: node.header(delivered.load(Ordering::SeqCst).max(1)),
                        watch_id: spec.id,
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return Interrupted::Done;
                    }
                }
            }
        }
    }
}

/// Filters `events` for the watcher and queues them (fragmented if asked).
/// Returns false when the client is gone.
async fn send_events(
    node: &Node,
    spec: &Spec,
    tx: &Outbound,
    revision: i64,
    events: &[Event],
) -> bool {
    // Filter before cloning: most watchers match few of a revision's events.
    // One read view for all the previous versions this call reads, taken only
    // if one is needed (and dropped before the sends below wait).
    let view = std::cell::OnceCell::new();
    let events: Vec<Event> = events
        .iter()
        .filter(|e| e.kv.as_ref().is_some_and(|kv| spec.range.contains(&kv.key)))
        .filter(|e| {
            let put = e.r#type == EventType::Put as i32;
            !(put && spec.no_put || !put && spec.no_delete)
        })
        .map(|e| Event {
            r#type: e.r#type,
            kv: e.kv.clone(),
            prev_kv: if spec.prev_kv {
                e.prev_kv
                    .clone()
                    .or_else(|| previous_version(view.get_or_init(|| node.store.read_view()), e))
            } else {
                None
            },
        })
        .collect();
    drop(view);
    if events.is_empty() {
        return true;
    }
    let resp = WatchResponse {
        header: node.header(revision),
        watch_id: spec.id,
        events,
        ..Default::default()
    };
    // etcd fragments at the gRPC receive limit, not at --max-request-bytes.
    let limit = node.config.max_request_bytes as usize + crate::server::GRPC_OVERHEAD_BYTES;
    for part in fragments(resp, spec.fragment, limit) {
        if tx.send(Ok(part)).await.is_err() {
            return false;
        }
    }
    true
}

/// The version an update replaced, for a watcher with `prev_kv`. A put does
/// not read it (only a put's own `prev_kv` request does), nor does history
/// replay, so it is read here, as etcd's watch stream does; like etcd, the
/// event goes without it when it cannot be read (compacted away since).
fn previous_version(view: &ReadView<'_>, event: &Event) -> Option<KeyValue> {
    let kv = event.kv.as_ref()?;
    // A created key replaced nothing; a delete always replaced something.
    if event.r#type == EventType::Put as i32 && kv.version <= 1 {
        return None;
    }
    if kv.mod_revision - 1 < view.compact_rev {
        return None;
    }
    match view.get(&kv.key, kv.mod_revision - 1) {
        Ok(prev) => prev,
        Err(e) => {
            tracing::debug!(error = %e, "previous version for a watch event not readable");
            None
        }
    }
}

/// etcd's fragmenting: responses at least `limit` bytes with two or more
/// events are split; every part but the last has `fragment` set.
fn fragments(resp: WatchResponse, enabled: bool, limit: usize) -> Vec<WatchResponse> {
    if !enabled || resp.encoded_len() < limit || resp.events.len() < 2 {
        return vec![resp];
    }
    let template = WatchResponse {
        events: Vec::new(),
        fragment: true,
        ..resp.clone()
    };
    let mut parts = Vec::new();
    let mut current = template.clone();
    for ev in resp.events {
        current.events.push(ev);
        if current.events.len() > 1 && current.encoded_len() >= limit {
            let ev = current.events.pop().unwrap_or_default();
            parts.push(std::mem::replace(&mut current, template.clone()));
            current.events.push(ev);
        }
    }
    current.fragment = false;
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::mvccpb::KeyValue;

    fn event(n: usize) -> Event {
        Event {
            kv: Some(KeyValue {
                key: format!("k{n}").into_bytes(),
                value: vec![b'x'; 100],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fragments_split_large_responses_and_keep_every_event() {
        let resp = WatchResponse {
            watch_id: 3,
            events: (0..50).map(event).collect(),
            ..Default::default()
        };
        let parts = fragments(resp.clone(), true, 1000);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1]
            .iter()
            .all(|p| p.fragment && p.encoded_len() < 1000));
        assert!(!parts.last().unwrap().fragment);
        let all: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(all, resp.events);
        assert_eq!(fragments(resp.clone(), false, 1000).len(), 1);
    }
}
