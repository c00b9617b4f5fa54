//! What kube-apiserver sends, replayed by many concurrent "controllers"
//! through the `etcd-client` crate:
//! - create/update/delete as a Txn on the key's mod revision (0 = create),
//!   reading the current object when the comparison fails;
//! - paginated lists (limit + continue at the first page's revision),
//!   keys-only and count-only ranges;
//! - an informer: list, then watch from revision + 1 with prev_kv and
//!   progress notifications, keeping a cache;
//! - the compactor: a Txn on `compact_rev_key`, then Compact;
//! - events written under leases, as for event TTLs.
//!
//! No update may be lost, every list must be consistent with its revision,
//! and the informer's cache must end equal to the store.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Kind, Server};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};

const CONTROLLERS: usize = 8;
const ROUNDS: usize = 150;
const COUNTERS: usize = 4;
const PREFIX: &str = "/registry/";

/// kube-apiserver's optimistic update: compare mod revision, put; on
/// failure get the current object. Returns the new mod revision, or the
/// current object (value, mod revision) when the comparison failed.
async fn guarded_put(
    c: &mut Client,
    key: &str,
    expected_mod: i64,
    value: &str,
    lease: i64,
) -> Result<i64, Option<(String, i64)>> {
    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, expected_mod)])
        .and_then([TxnOp::put(key, value, opts)])
        .or_else([TxnOp::get(key, None)]);
    let r = c.txn(txn).await.unwrap();
    if r.succeeded() {
        return Ok(r.header().unwrap().revision());
    }
    match r.op_responses().into_iter().next() {
        Some(TxnOpResponse::Get(g)) => Err(g
            .kvs()
            .first()
            .map(|kv| (kv.value_str().unwrap().to_string(), kv.mod_revision()))),
        other => panic!("unexpected failure response {other:?}"),
    }
}

/// One controller: owns some pods (create, update, delete), increments the
/// shared counters with compare-and-swap retries, records events.
async fn controller(mut c: Client, id: usize, increments: Arc<Vec<AtomicU64>>) {
    let lease = c.lease_grant(3600, None).await.unwrap().id();
    let mut known: BTreeMap<String, i64> = BTreeMap::new();
    for round in 0..ROUNDS {
        let pod = format!("{PREFIX}pods/ns{id}/pod-{}", round % 20);
        match known.get(&pod).copied() {
            None => match guarded_put(&mut c, &pod, 0, &format!("v{round}"), 0).await {
                Ok(rev) => {
                    known.insert(pod, rev);
                }
                Err(current) => panic!("create of {pod} failed; it holds {current:?}"),
            },
            Some(rev) if round % 7 == 0 => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(pod.as_str(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(pod.as_str(), None)])
                    .or_else([TxnOp::get(pod.as_str(), None)]);
                assert!(c.txn(txn).await.unwrap().succeeded(), "delete of own {pod}");
                known.remove(&pod);
            }
            Some(rev) => {
                let new = guarded_put(&mut c, &pod, rev, &format!("v{round}"), 0)
                    .await
                    .expect("only this controller writes its pods");
                known.insert(pod, new);
            }
        }

        // A shared object every controller updates: retry on conflict.
        let counter = round % COUNTERS;
        let key = format!("{PREFIX}counters/{counter}");
        let mut current: Option<(String, i64)> = c
            .get(key.as_str(), None)
            .await
            .unwrap()
            .kvs()
            .first()
            .map(|kv| (kv.value_str().unwrap().to_string(), kv.mod_revision()));
        loop {
            let (n, rev) = current
                .clone()
                .map_or((0, 0), |(v, r)| (v.parse::<u64>().unwrap(), r));
            match guarded_put(&mut c, &key, rev, &(n + 1).to_string(), 0).await {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        increments[counter].fetch_add(1, Ordering::SeqCst);

        if round % 10 == 0 {
            let event = format!("{PREFIX}events/ns{id}/e{round}");
            guarded_put(&mut c, &event, 0, "event", lease)
                .await
                .expect("new event");
        }
    }
}

/// A paginated list as kube-apiserver does it; restarts when the revision
/// it pinned gets compacted. Returns (revision, items).
async fn paginated_list(c: &mut Client, prefix: &str) -> (i64, Vec<(String, i64)>) {
    'restart: loop {
        let end = format!("{}0", prefix.trim_end_matches('/'));
        let mut items = Vec::new();
        let mut key = prefix.to_string();
        let mut rev = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.as_str()).with_limit(7);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let page = match c.get(key.as_str(), Some(opts)).await {
                Ok(p) => p,
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
                    continue 'restart
                }
                Err(e) => panic!("{e}"),
            };
            if rev == 0 {
                rev = page.header().unwrap().revision();
            }
            for kv in page.kvs() {
                items.push((kv.key_str().unwrap().to_string(), kv.mod_revision()));
            }
            if !page.more() {
                return (rev, items);
            }
            key = format!("{}\0", items.last().unwrap().0);
        }
    }
}

/// Checks a paginated list against one whole range at its revision.
async fn check_list(c: &mut Client) -> usize {
    let (rev, items) = paginated_list(c, PREFIX).await;
    let end = format!("{}0", PREFIX.trim_end_matches('/'));
    let whole = match c
        .get(
            PREFIX,
            Some(
                GetOptions::new()
                    .with_range(end.as_str())
                    .with_revision(rev),
            ),
        )
        .await
    {
        Ok(w) => w,
        Err(_) => return 0, // compacted meanwhile: nothing to compare with
    };
    let expected: Vec<(String, i64)> = whole
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision()))
        .collect();
    assert_eq!(
        items, expected,
        "paginated list at {rev} differs from the range"
    );
    let opts = GetOptions::new()
        .with_range(end.as_str())
        .with_revision(rev);
    if let Ok(count) = c.get(PREFIX, Some(opts.clone().with_count_only())).await {
        assert_eq!(count.count() as usize, items.len(), "count-only at {rev}");
    }
    if let Ok(keys) = c.get(PREFIX, Some(opts.with_keys_only())).await {
        assert!(
            keys.kvs().iter().all(|kv| kv.value().is_empty()),
            "keys-only has values"
        );
        assert_eq!(keys.kvs().len(), items.len());
    }
    1
}

/// kube-apiserver's compactor step: claim the compaction with a Txn on
/// `compact_rev_key`'s version, then compact.
async fn compact_once(c: &mut Client, last_version: &mut i64, to_rev: i64) {
    let key = "compact_rev_key";
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, *last_version)])
        .and_then([TxnOp::put(key, to_rev.to_string(), None)])
        .or_else([TxnOp::get(key, None)]);
    let r = c.txn(txn).await.unwrap();
    if r.succeeded() {
        *last_version += 1;
        c.compact(to_rev, None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kube_apiserver_traffic_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Kind::Tessera,
        dir.path(),
        &["--experimental-watch-progress-notify-interval=1s"],
    )
    .await;
    let mut c = server.client().await;

    // Informer: list, then watch from the list's revision + 1.
    let (list_rev, _) = paginated_list(&mut c, PREFIX).await;
    let mut cache: BTreeMap<String, String> = BTreeMap::new();
    let mut informer = c
        .watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(list_rev + 1)
                    .with_prev_key()
                    .with_progress_notify(),
            ),
        )
        .await
        .unwrap();

    let increments: Arc<Vec<AtomicU64>> =
        Arc::new((0..COUNTERS).map(|_| AtomicU64::new(0)).collect());
    let controllers: Vec<_> = (0..CONTROLLERS)
        .map(|id| tokio::spawn(controller(c.clone(), id, increments.clone())))
        .collect();

    // Lists and compactions while the controllers run.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let mut c = c.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut lists, mut version, mut previous) = (0, 0i64, 0i64);
            while !stop.load(Ordering::SeqCst) {
                lists += check_list(&mut c).await;
                let now = c.get("x", None).await.unwrap().header().unwrap().revision();
                if previous > 0 {
                    compact_once(&mut c, &mut version, previous).await;
                }
                previous = now;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (lists, version)
        })
    };

    for ctl in controllers {
        ctl.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let (lists, compactions) = background.await.unwrap();
    assert!(lists >= 3, "lists checked: {lists}");
    assert!(compactions >= 1, "compactions: {compactions}");

    // No lost update: every increment is in its counter.
    for (i, n) in increments.iter().enumerate() {
        let kv = c.get(format!("{PREFIX}counters/{i}"), None).await.unwrap();
        let stored: u64 = kv.kvs()[0].value_str().unwrap().parse().unwrap();
        assert_eq!(stored, n.load(Ordering::SeqCst), "counter {i} lost updates");
    }

    // The informer's cache converges to the store.
    let end = format!("{}0", PREFIX.trim_end_matches('/'));
    let final_state = c
        .get(PREFIX, Some(GetOptions::new().with_range(end.as_str())))
        .await
        .unwrap();
    let final_rev = final_state.header().unwrap().revision();
    let mut seen_rev = list_rev;
    while seen_rev < final_rev {
        let msg = tokio::time::timeout(Duration::from_secs(10), informer.message())
            .await
            .expect("informer stalled")
            .unwrap()
            .unwrap();
        assert!(
            !msg.canceled(),
            "informer canceled: {}",
            msg.cancel_reason()
        );
        for ev in msg.events() {
            let kv = ev.kv().unwrap();
            let key = kv.key_str().unwrap().to_string();
            if ev.event_type() == EventType::Put {
                if kv.version() > 1 {
                    assert!(ev.prev_kv().is_some(), "update of {key} without prev_kv");
                }
                cache.insert(key, kv.value_str().unwrap().to_string());
            } else {
                assert!(ev.prev_kv().is_some(), "delete of {key} without prev_kv");
                cache.remove(&key);
            }
            seen_rev = seen_rev.max(kv.mod_revision());
        }
        if let Some(h) = msg.header() {
            if msg.events().is_empty() && !msg.created() {
                seen_rev = seen_rev.max(h.revision());
            }
        }
    }
    let store: BTreeMap<String, String> = final_state
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(cache, store, "informer cache differs from the store");
    // Idle now: the informer gets a progress notification at the latest revision.
    let notify = tokio::time::timeout(Duration::from_secs(5), informer.message())
        .await
        .expect("no progress notification within 5 s")
        .unwrap()
        .unwrap();
    assert!(notify.events().is_empty(), "{notify:?}");
    assert_eq!(notify.header().unwrap().revision(), final_rev);

    // Events carry their lease.
    let events = c
        .get(
            format!("{PREFIX}events/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(events.kvs().len(), CONTROLLERS * ROUNDS / 10);
    assert!(events.kvs().iter().all(|kv| kv.lease() != 0));
}
