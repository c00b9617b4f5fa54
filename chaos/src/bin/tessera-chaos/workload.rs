//! The control-plane workload: register clients (put, linearizable get,
//! compare-and-set), list-append clients, watchers that resume after every
//! error, and lease clients that grant, keep alive, stop and watch their
//! key disappear. Every client is pinned to one member and records what it
//! asked and what it was told, with call and return times on one clock.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tessera_chaos::blocks::BlockWrite;
use tessera_chaos::lease::{LeaseLife, Renewal};
use tessera_chaos::linearizability::{Event, Op};
use tessera_chaos::list_append::{ListEvent, ListOp};
use tessera_chaos::watch::{Change, Observed};

/// How long one request may take before its outcome counts as unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Register keys (`reg/0`..), watched by the watchers.
pub const REGISTERS: usize = 3;
/// List keys appended to at a time (`list/0`..).
pub const LISTS: usize = 2;
/// Every this long the list clients move on to `LISTS` new keys, so that
/// values stay small: etcd's history keeps every version of a list (no
/// compaction under the watchers), and lists that grew for the whole run
/// would fill the backend quota within minutes.
const LIST_GENERATION: Duration = Duration::from_secs(10);
/// Lease TTL asked for, in seconds.
const LEASE_TTL: i64 = 3;

/// Everything the clients recorded.
#[derive(Default, Serialize)]
pub struct History {
    /// Per register key.
    pub registers: Vec<Vec<Event>>,
    /// Per list key (`list/N` at index N).
    pub lists: Vec<Vec<ListEvent>>,
    /// Writes of watched keys the clients were acknowledged for, with the
    /// revision of the acknowledgement.
    pub acknowledged: Vec<Change>,
    /// Per watcher.
    pub watches: Vec<Vec<Observed>>,
    pub leases: Vec<LeaseLife>,
    /// The volume workload's block writes.
    pub volume_writes: Vec<BlockWrite>,
}

impl History {
    /// The events of list key `list` (made as lists appear).
    fn list(&mut self, list: usize) -> &mut Vec<ListEvent> {
        if self.lists.len() <= list {
            self.lists.resize(list + 1, Vec::new());
        }
        &mut self.lists[list]
    }
}

/// What the clients share: the clock, the stop flag, the record and a
/// count of completed operations (for progress lines).
#[derive(Clone)]
pub struct Shared {
    pub epoch: Instant,
    pub stop: Arc<AtomicBool>,
    pub history: Arc<Mutex<History>>,
    pub completed: Arc<AtomicU64>,
    pub attempted: Arc<AtomicU64>,
    /// Set after the faults, to the revision of the sentinel write: each
    /// watcher goes on until it has received it (or gives up after
    /// `CATCH_UP`), so a watcher that stopped receiving is caught.
    pub watch_until: Arc<AtomicI64>,
}

/// How long watchers may take to reach the sentinel once it is written.
pub const CATCH_UP: Duration = Duration::from_secs(30);

impl Shared {
    pub fn new() -> Shared {
        let history = History {
            registers: vec![Vec::new(); REGISTERS],
            lists: vec![Vec::new(); LISTS],
            ..History::default()
        };
        Shared {
            epoch: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            history: Arc::new(Mutex::new(history)),
            completed: Arc::new(AtomicU64::new(0)),
            attempted: Arc::new(AtomicU64::new(0)),
            watch_until: Arc::new(AtomicI64::new(0)),
        }
    }

    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn record<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut crate::lock(&self.history))
    }

    fn count(&self, ok: bool) {
        self.attempted.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A client bound to one endpoint. Connecting is lazy: a member that is
/// down now is retried by the channel on each request.
pub async fn connect(endpoint: &str) -> anyhow::Result<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(OP_TIMEOUT);
    Ok(Client::connect([endpoint], Some(options)).await?)
}

/// `op` with the per-request time limit; `None` when it failed or timed out.
async fn within<T, E>(op: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
    tokio::time::timeout(OP_TIMEOUT, op).await.ok()?.ok()
}

fn parse(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Puts, linearizable gets and compare-and-sets on the register keys;
/// values are unique (client id in the high bits).
pub async fn register_client(id: u64, endpoint: String, seed: u64, shared: Shared) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id << 16));
    let mut client = loop {
        match connect(&endpoint).await {
            Ok(c) => break c,
            Err(_) if !shared.stopped() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => return,
        }
    };
    let mut counter = 0u64;
    while !shared.stopped() {
        counter += 1;
        let reg = rng.gen_range(0..REGISTERS);
        let key = format!("reg/{reg}");
        let value = (id << 32) | counter;
        let called = shared.now();
        let roll = rng.gen_range(0..11);
        if roll == 10 {
            // One transaction putting two registers: both events carry one
            // revision, which watchers must receive in one response.
            let other = (reg + 1) % REGISTERS;
            let other_key = format!("reg/{other}");
            let txn = Txn::new().and_then([
                TxnOp::put(key.clone(), value.to_string(), None),
                TxnOp::put(other_key.clone(), value.to_string(), None),
            ]);
            let resp = within(client.txn(txn)).await;
            let returned = resp.is_some().then(|| shared.now());
            let revision = resp.as_ref().and_then(|r| r.header()).map(|h| h.revision());
            shared.count(returned.is_some());
            shared.record(|h| {
                for (r, k) in [(reg, &key), (other, &other_key)] {
                    h.registers[r].push(Event {
                        op: Op::Put(value),
                        called,
                        returned,
                    });
                    if let Some(revision) = revision {
                        h.acknowledged.push(Change {
                            revision,
                            key: k.clone(),
                            value: Some(value.to_string()),
                        });
                    }
                }
            });
            if returned.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        let (op, returned) = if roll < 4 {
            let resp = within(client.put(key.clone(), value.to_string(), None)).await;
            if let Some(rev) = resp.as_ref().and_then(|r| r.header()).map(|h| h.revision()) {
                shared.record(|h| {
                    h.acknowledged.push(Change {
                        revision: rev,
                        key: key.clone(),
                        value: Some(value.to_string()),
                    })
                });
            }
            (Op::Put(value), resp.is_some())
        } else if roll < 8 {
            match within(client.get(key.clone(), None)).await {
                Some(r) => (
                    Op::Get(r.kvs().first().and_then(|kv| parse(kv.value()))),
                    true,
                ),
                None => (Op::Get(None), false),
            }
        } else {
            // Compare-and-set against what a serializable read saw (maybe
            // stale: then it must fail, reporting what it found).
            let seen = within(client.get(key.clone(), Some(GetOptions::new().with_serializable())))
                .await
                .and_then(|r| r.kvs().first().and_then(|kv| parse(kv.value())))
                .unwrap_or(0);
            let called = shared.now();
            let txn = Txn::new()
                .when([Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    seen.to_string(),
                )])
                .and_then([TxnOp::put(key.clone(), value.to_string(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = within(client.txn(txn)).await;
            let returned = resp.is_some().then(|| shared.now());
            let found = resp.as_ref().and_then(|r| {
                r.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| parse(kv.value())),
                    _ => None,
                })
            });
            if let Some(r) = resp.as_ref().filter(|r| r.succeeded()) {
                if let Some(header) = r.header() {
                    shared.record(|h| {
                        h.acknowledged.push(Change {
                            revision: header.revision(),
                            key: key.clone(),
                            value: Some(value.to_string()),
                        })
                    });
                }
            }
            let event = Event {
                op: Op::Cas {
                    expect: seen,
                    new: value,
                    succeeded: resp.as_ref().map(|r| r.succeeded()),
                    found,
                },
                called,
                returned,
            };
            shared.count(returned.is_some());
            shared.record(|h| h.registers[reg].push(event));
            if returned.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        };
        let event = Event {
            op,
            called,
            returned: returned.then(|| shared.now()),
        };
        shared.count(returned);
        shared.record(|h| h.registers[reg].push(event));
        if !returned {
            // This client's member is probably down or cut off: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Appends unique values to list keys (read, then a transaction that
/// writes the longer list if the key's mod revision is unchanged) and
/// reads whole lists. Values are comma-separated numbers.
pub async fn list_client(id: u64, endpoint: String, seed: u64, shared: Shared) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id << 24) ^ 0x11);
    let Ok(mut client) = connect(&endpoint).await else {
        return;
    };
    let decode = |bytes: &[u8]| -> Vec<u64> {
        std::str::from_utf8(bytes)
            .unwrap_or("")
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let mut counter = 0u64;
    while !shared.stopped() {
        let generation = (shared.now() / LIST_GENERATION.as_nanos() as u64) as usize;
        let list = generation * LISTS + rng.gen_range(0..LISTS);
        let key = format!("list/{list}");
        let called = shared.now();
        if rng.gen_bool(0.5) {
            let resp = within(client.get(key.clone(), None)).await;
            let returned = resp.is_some().then(|| shared.now());
            let seen = resp.map(|r| r.kvs().first().map_or(Vec::new(), |kv| decode(kv.value())));
            shared.count(returned.is_some());
            shared.record(|h| {
                h.list(list).push(ListEvent {
                    op: ListOp::Read(seen),
                    called,
                    returned,
                })
            });
            if returned.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        counter += 1;
        let value = (id << 32) | counter;
        // Retry the read-modify-write until it applies or fails. An append
        // that surely did not apply (its read failed, or every attempt lost
        // the race) is not recorded: its value must then never be read.
        let mut returned = None;
        let mut maybe_applied = false;
        for _ in 0..5 {
            let Some(current) = within(client.get(key.clone(), None)).await else {
                break;
            };
            let (mut items, mod_rev) = current.kvs().first().map_or((Vec::new(), 0), |kv| {
                (decode(kv.value()), kv.mod_revision())
            });
            items.push(value);
            let text = items
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    mod_rev,
                )])
                .and_then([TxnOp::put(key.clone(), text, None)]);
            match within(client.txn(txn)).await {
                Some(r) if r.succeeded() => {
                    returned = Some(shared.now());
                    break;
                }
                // Lost the race: nothing written, try again.
                Some(_) => continue,
                // Unknown: it may have applied; stop retrying (a retry could
                // append the value twice).
                None => {
                    maybe_applied = true;
                    break;
                }
            }
        }
        shared.count(returned.is_some());
        if returned.is_some() || maybe_applied {
            shared.record(|h| {
                h.list(list).push(ListEvent {
                    op: ListOp::Append(value),
                    called,
                    returned,
                })
            });
        }
        if returned.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Watches `reg/` from revision 1 with progress requests every second;
/// after any error, end of stream or 10 s without a message, watches again
/// from the revision after the last event received. Runs until it has
/// received the sentinel revision (`Shared::watch_until`), or gives up
/// `CATCH_UP` after the sentinel was set.
pub async fn watcher(index: usize, endpoint: String, shared: Shared) {
    let mut log = Vec::new();
    let mut from = 1i64;
    let mut give_up: Option<Instant> = None;
    let finished = |from: i64, give_up: &mut Option<Instant>| {
        let target = shared.watch_until.load(Ordering::Relaxed);
        if target == 0 {
            return false;
        }
        let deadline = *give_up.get_or_insert_with(|| Instant::now() + CATCH_UP);
        from > target || Instant::now() > deadline
    };
    'watch: while !finished(from, &mut give_up) {
        let Ok(mut client) = connect(&endpoint).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let Some(mut stream) = within(client.watch("reg/", Some(options))).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        log.push(Observed::Started { from });
        let mut progress = tokio::time::interval(Duration::from_secs(1));
        // Reset by every message: a stream silent this long is dropped.
        let silence = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(silence);
        loop {
            if finished(from, &mut give_up) {
                break 'watch;
            }
            tokio::select! {
                _ = progress.tick() => {
                    // A paused member may not answer; the request is
                    // only a prompt.
                    let _ = tokio::time::timeout(OP_TIMEOUT, stream.request_progress()).await;
                }
                _ = &mut silence => break,
                message = stream.message() => {
                    let resp = match message {
                        Ok(Some(resp)) => resp,
                        // An error or the end: watch again.
                        _ => break,
                    };
                    silence.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(10));
                    if resp.canceled() {
                        log.push(Observed::Canceled { compact_revision: resp.compact_revision() });
                        break;
                    }
                    if resp.created() && resp.events().is_empty() {
                        continue;
                    }
                    let header = resp.header().map_or(0, |h| h.revision());
                    if resp.events().is_empty() {
                        log.push(Observed::Progress { revision: header });
                        continue;
                    }
                    let events: Vec<Change> = resp
                        .events()
                        .iter()
                        .filter_map(|e| {
                            let kv = e.kv()?;
                            Some(Change {
                                revision: kv.mod_revision(),
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                value: match e.event_type() {
                                    EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
                                    EventType::Delete => None,
                                },
                            })
                        })
                        .collect();
                    if let Some(last) = events.last() {
                        from = last.revision + 1;
                    }
                    log.push(Observed::Events { header, events });
                }
            }
        }
    }
    shared.record(|h| {
        if h.watches.len() <= index {
            h.watches.resize(index + 1, Vec::new());
        }
        h.watches[index] = log;
    });
}

/// Grants leases, attaches a key, keeps the lease alive for a few seconds,
/// stops, and polls the key (linearizable reads) until it is gone.
pub async fn lease_client(id: u64, endpoint: String, seed: u64, shared: Shared) {
    let mut rng = StdRng::seed_from_u64(seed ^ (id << 40) ^ 0x1ea5e);
    let Ok(mut client) = connect(&endpoint).await else {
        return;
    };
    while !shared.stopped() {
        let called = shared.now();
        let Some(grant) = within(client.lease_grant(LEASE_TTL, None)).await else {
            shared.count(false);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        shared.count(true);
        let mut life = LeaseLife {
            id: grant.id(),
            renewals: vec![Renewal {
                called,
                ttl_secs: grant.ttl(),
            }],
            seen_gone: None,
            revoked_at: None,
        };
        let key = format!("lease/{id}/{:x}", grant.id());
        let put = within(client.put(
            key.clone(),
            "x",
            Some(PutOptions::new().with_lease(grant.id())),
        ))
        .await;
        if put.is_none() {
            // Whether the key exists is unknown: its disappearance would
            // prove nothing. Record the lease without observation.
            shared.record(|h| h.leases.push(life));
            continue;
        }
        // The crate's keep-alive call sends one keep-alive itself and
        // waits for its answer (TTL > 0, or "lease not found").
        let called = shared.now();
        let keep_alive = tokio::time::timeout(OP_TIMEOUT, client.lease_keep_alive(grant.id()))
            .await
            .ok();
        let keeper = match keep_alive {
            Some(Ok(pair)) => {
                life.renewals.push(Renewal {
                    called,
                    ttl_secs: grant.ttl(),
                });
                Some(pair)
            }
            Some(Err(etcd_client::Error::LeaseKeepAliveError(why)))
                if why.contains("not found") =>
            {
                life.seen_gone = Some(shared.now());
                None
            }
            _ => None,
        };
        if let Some((mut keeper, mut stream)) = keeper {
            for _ in 0..rng.gen_range(2..6) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let called = shared.now();
                let answer = tokio::time::timeout(OP_TIMEOUT, async {
                    keeper.keep_alive().await.ok()?;
                    stream.message().await.ok().flatten()
                })
                .await
                .ok()
                .flatten();
                match answer {
                    Some(r) if r.ttl() > 0 => life.renewals.push(Renewal {
                        called,
                        ttl_secs: r.ttl(),
                    }),
                    Some(_) => {
                        // TTL 0: the server says the lease is gone.
                        life.seen_gone = Some(shared.now());
                        break;
                    }
                    // No answer in time: a late answer could belong to this
                    // request or to none, so stop renewing rather than
                    // credit a renewal to the wrong time.
                    None => break,
                }
            }
        }
        let give_up = Instant::now() + Duration::from_secs(LEASE_TTL as u64 + 15);
        while life.seen_gone.is_none() && Instant::now() < give_up && !shared.stopped() {
            if let Some(r) = within(client.get(key.clone(), None)).await {
                if r.kvs().is_empty() {
                    life.seen_gone = Some(shared.now());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shared.record(|h| h.leases.push(life));
    }
}
