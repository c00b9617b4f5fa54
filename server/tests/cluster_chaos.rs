//! Random SIGKILL/restart rounds against a three-member cluster while
//! clients on every member run puts, linearizable gets and compare-and-set
//! on a few keys. Afterwards: every key's history must be linearizable
//! (`tessera_chaos::linearizability`), and every acknowledged write must be
//! on every member.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use rand::{Rng, SeedableRng};
use tessera_chaos::linearizability::{check, Event, Op};

const ROUNDS: usize = 20;
const KEYS: u64 = 3;
const CLIENTS: u64 = 6;

struct Recorded {
    /// Per register key: its history.
    histories: Vec<Vec<Event>>,
    /// Unique keys whose put was acknowledged.
    acked: Vec<String>,
}

fn value_bytes(v: u64) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn parse_value(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes).unwrap().parse().unwrap()
}

async fn run_client(
    id: u64,
    mut client: etcd_client::Client,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    recorded: Arc<Mutex<Recorded>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(id);
    let mut counter = 0u64;
    let now = || epoch.elapsed().as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        counter += 1;
        let reg = rng.gen_range(0..KEYS);
        let key = format!("reg/{reg}");
        let value = (id << 32) | counter;
        let called = now();
        let roll = rng.gen_range(0..10);
        let (op, ok) = if roll < 4 {
            let ok = client
                .put(key.clone(), value_bytes(value), None)
                .await
                .is_ok();
            (Op::Put(value), ok)
        } else if roll < 8 {
            match client.get(key.clone(), None).await {
                Ok(r) => (
                    Op::Get(r.kvs().first().map(|kv| parse_value(kv.value()))),
                    true,
                ),
                Err(_) => (Op::Get(None), false),
            }
        } else {
            // Compare-and-set against what a serializable read saw (which
            // may be stale: then the CAS must fail).
            let seen = client
                .get(key.clone(), Some(GetOptions::new().with_serializable()))
                .await
                .ok()
                .and_then(|r| r.kvs().first().map(|kv| parse_value(kv.value())))
                .unwrap_or(0);
            let called = now();
            let txn = Txn::new()
                .when([Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    value_bytes(seen),
                )])
                .and_then([TxnOp::put(key.clone(), value_bytes(value), None)])
                // On failure, read what was there instead in the same txn.
                .or_else([TxnOp::get(key.clone(), None)]);
            let result = client.txn(txn).await;
            let found = result.as_ref().ok().and_then(|r| {
                r.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Get(g) => g.kvs().first().map(|kv| parse_value(kv.value())),
                    _ => None,
                })
            });
            let op = Op::Cas {
                expect: seen,
                new: value,
                succeeded: result.as_ref().ok().map(|r| r.succeeded()),
                found,
            };
            let event = Event {
                op,
                called,
                returned: result.is_ok().then(now),
            };
            recorded.lock().unwrap().histories[reg as usize].push(event);
            continue;
        };
        // A failed call may still have taken effect: its outcome is unknown.
        let event = Event {
            op,
            called,
            returned: ok.then(now),
        };
        recorded.lock().unwrap().histories[reg as usize].push(event);
        if !ok {
            // This client's member is probably down: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let ack_key = format!("ack/{id}/{counter}");
        if client.put(ack_key.clone(), "1", None).await.is_ok() {
            recorded.lock().unwrap().acked.push(ack_key);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_restart_rounds_keep_histories_linearizable() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(3, dir.path(), &["--snapshot-count=500"]).await;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let recorded = Arc::new(Mutex::new(Recorded {
        histories: vec![Vec::new(); KEYS as usize],
        acked: Vec::new(),
    }));
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        let member = &c.members[(id % 3) as usize];
        let client = member.client().await;
        clients.push(tokio::spawn(run_client(
            id + 1,
            client,
            epoch,
            stop.clone(),
            recorded.clone(),
        )));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for round in 0..ROUNDS {
        // Half the rounds kill the leader, the others a random member.
        let victim = match c.leader().await {
            Some(l) if round % 2 == 0 => l,
            _ => rng.gen_range(0..3),
        };
        c.members[victim].kill();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        c.restart(victim).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1200))).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }

    let recorded = std::mem::replace(
        &mut *recorded.lock().unwrap(),
        Recorded {
            histories: Vec::new(),
            acked: Vec::new(),
        },
    );
    let mut total = 0;
    for (key, history) in recorded.histories.iter().enumerate() {
        let known = history.iter().filter(|e| e.returned.is_some()).count();
        assert!(known > 20, "reg/{key}: only {known} operations completed");
        total += history.len();
        if let Err(v) = check(history) {
            // The operations around the failure, in call order, to tell a
            // lost or phantom write from a stale read.
            let at = v.stuck_at.first().map_or(0, |e| e.called);
            let mut near: Vec<&Event> = history
                .iter()
                .filter(|e| e.called + 4_000_000_000 >= at && e.called <= at + 2_000_000_000)
                .collect();
            near.sort_by_key(|e| e.called);
            let near: String = near.iter().map(|e| format!("  {e:?}\n")).collect();
            panic!("reg/{key}: {v}operations called from 4 s before to 2 s after:\n{near}");
        }
    }
    println!(
        "{total} register operations linearizable; {} acknowledged writes",
        recorded.acked.len()
    );

    // Every acknowledged write is on every member once they have caught up.
    c.wait_leader(Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for m in &c.members {
        let mut client = m.client().await;
        loop {
            let resp = client
                .get(
                    "ack/",
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_serializable(),
                    ),
                )
                .await
                .unwrap();
            let present: std::collections::HashSet<&[u8]> =
                resp.kvs().iter().map(|kv| kv.key()).collect();
            let missing: Vec<&String> = recorded
                .acked
                .iter()
                .filter(|k| !present.contains(k.as_bytes()))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} acknowledged writes missing, e.g. {:?}",
                m.name,
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
