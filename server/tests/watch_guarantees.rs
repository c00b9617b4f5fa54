//! Watch guarantees under load, through the `etcd-client` crate: 4 writers
//! make 20,000 writes while 50 watchers follow the key space (two per
//! stream); some are slow, some drop their connection and resume from their
//! last revision + 1. Every watcher must see exactly the history the writers
//! were acknowledged for: ordered, unique, reliable, one revision per
//! response (atomic), and resumable.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Kind, Server};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, PutOptions, Txn, TxnOp, WatchOptions,
};
use rand::{Rng, SeedableRng};

const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 5_000;
const STREAMS: usize = 25;
const KEYS: usize = 64;

/// One event as the test compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    rev: i64,
    key: String,
    put: bool,
    value: String,
}

/// What the writers were acknowledged for: events by revision.
type Truth = Arc<Mutex<BTreeMap<i64, Vec<Seen>>>>;

async fn writer(mut c: Client, id: usize, truth: Truth) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64);
    for n in 0..WRITES_PER_WRITER {
        let key = format!("g/{:02}", rng.gen_range(0..KEYS));
        let value = format!("w{id}-{n}");
        match rng.gen_range(0..10) {
            0 => {
                let r = c
                    .delete(key.as_str(), Some(DeleteOptions::new().with_prev_key()))
                    .await
                    .unwrap();
                if r.deleted() > 0 {
                    let rev = r.header().unwrap().revision();
                    let seen = Seen {
                        rev,
                        key,
                        put: false,
                        value: String::new(),
                    };
                    truth.lock().unwrap().insert(rev, vec![seen]);
                }
            }
            1 => {
                // Two puts in one revision, in op order.
                let other = format!("g/{:02}", (rng.gen_range(0..KEYS) + 1) % KEYS);
                if other == key {
                    continue;
                }
                let txn = Txn::new()
                    .when([Compare::version(key.as_str(), CompareOp::Greater, -1)])
                    .and_then([
                        TxnOp::put(key.as_str(), value.as_str(), None),
                        TxnOp::put(other.as_str(), value.as_str(), None),
                    ]);
                let r = c.txn(txn).await.unwrap();
                let rev = r.header().unwrap().revision();
                let events = [key, other]
                    .into_iter()
                    .map(|k| Seen {
                        rev,
                        key: k,
                        put: true,
                        value: value.clone(),
                    })
                    .collect();
                truth.lock().unwrap().insert(rev, events);
            }
            _ => {
                let r = c
                    .put(key.as_str(), value.as_str(), Some(PutOptions::new()))
                    .await
                    .unwrap();
                let rev = r.header().unwrap().revision();
                let seen = Seen {
                    rev,
                    key,
                    put: true,
                    value,
                };
                truth.lock().unwrap().insert(rev, vec![seen]);
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Style {
    Normal,
    /// Stalls on its first responses, so it falls far behind the writers.
    Slow,
    /// Drops its connection after some events and resumes at last + 1.
    Resuming,
}

/// Follows `g/` from `start` until revision `end`; returns the events seen.
/// Checks that a revision is never split over two responses (catch-up
/// responses may hold several whole revisions, as etcd's do) and that
/// revisions only go up.
async fn watcher(
    server_url: String,
    start: i64,
    end: Arc<Mutex<i64>>,
    style: Style,
    seed: u64,
) -> Vec<Seen> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen: Vec<Seen> = Vec::new();
    let mut next = start;
    let mut responses = 0usize;
    'reconnect: loop {
        let mut c = Client::connect([server_url.clone()], None).await.unwrap();
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let mut stream = c.watch("g/", Some(opts)).await.unwrap();
        let drop_after = rng.gen_range(500..4_000);
        let mut in_this_connection = 0;
        let mut idle = Duration::ZERO;
        loop {
            let done = *end.lock().unwrap();
            if done > 0 && next > done {
                return seen;
            }
            let poll = Duration::from_millis(200);
            let Ok(msg) = tokio::time::timeout(poll, stream.message()).await else {
                idle += poll;
                assert!(
                    idle < Duration::from_secs(30),
                    "{style:?} watcher stalled at {next}"
                );
                continue;
            };
            idle = Duration::ZERO;
            let msg = msg.unwrap().expect("stream ended");
            assert!(!msg.canceled(), "watch canceled: {}", msg.cancel_reason());
            if msg.events().is_empty() {
                continue;
            }
            responses += 1;
            let mut rev = next;
            for ev in msg.events() {
                let kv = ev.kv().unwrap();
                assert!(
                    kv.mod_revision() >= rev,
                    "revision {} after {rev}: repeated, split or out of order",
                    kv.mod_revision()
                );
                rev = kv.mod_revision();
                seen.push(Seen {
                    rev,
                    key: kv.key_str().unwrap().to_string(),
                    put: ev.event_type() == EventType::Put,
                    value: kv.value_str().unwrap().to_string(),
                });
                in_this_connection += 1;
            }
            next = rev + 1;
            match style {
                Style::Slow if responses < 150 => {
                    tokio::time::sleep(Duration::from_millis(25)).await
                }
                Style::Resuming if in_this_connection >= drop_after => continue 'reconnect,
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_watchers_see_exactly_the_acknowledged_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let mut c = server.client().await;
    let start = c
        .get("g/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
        + 1;
    let truth: Truth = Arc::default();
    let end = Arc::new(Mutex::new(0i64));

    let mut watchers = Vec::new();
    for w in 0..STREAMS * 2 {
        let style = match w % 5 {
            0 => Style::Slow,
            1 | 2 => Style::Resuming,
            _ => Style::Normal,
        };
        watchers.push((
            style,
            tokio::spawn(watcher(server.url(), start, end.clone(), style, w as u64)),
        ));
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| tokio::spawn(writer(c.clone(), id, truth.clone())))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let last = c
        .get("g/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    *end.lock().unwrap() = last;

    let truth = truth.lock().unwrap().clone();
    assert_eq!(
        truth.keys().copied().collect::<Vec<_>>(),
        (start..=last).collect::<Vec<_>>(),
        "every revision was acknowledged to exactly one writer"
    );
    assert!(
        truth.len() >= 17_000,
        "enough writes made revisions: {}",
        truth.len()
    );
    let expected: Vec<Seen> = truth.into_values().flatten().collect();
    for (style, w) in watchers {
        let seen = w.await.unwrap();
        if seen != expected {
            let first = seen.iter().zip(&expected).position(|(a, b)| a != b);
            panic!(
                "{style:?} watcher: {} events, expected {}; first difference at {first:?}: {:?} vs {:?}",
                seen.len(),
                expected.len(),
                first.map(|i| &seen[i]),
                first.map(|i| &expected[i]),
            );
        }
    }
}
