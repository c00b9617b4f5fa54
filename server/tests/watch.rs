//! Watch: one stream with many watchers, history replay, compaction,
//! filters, progress, fragments, cancel — compared with Debian's etcd where
//! both must agree, and slow-consumer behaviour on tessera.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Kind, Server};
use tessera_proto::etcdserverpb::watch_client::WatchClient;
use tessera_proto::etcdserverpb::watch_request::RequestUnion;
use tessera_proto::etcdserverpb::{
    request_op, CompactionRequest, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use tessera_proto::mvccpb::Event;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

struct Session {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

impl Session {
    /// Opens a stream whose first request creates `first`: grpc-go (etcd)
    /// sends response headers only with the first response, so the call
    /// returns only once there is something to answer.
    async fn open(server: &Server, first: WatchCreateRequest) -> Session {
        let (tx, reqs) = mpsc::channel(64);
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(first)),
        })
        .await
        .unwrap();
        let mut client = WatchClient::connect(server.url()).await.unwrap();
        let rx = client
            .watch(ReceiverStream::new(reqs))
            .await
            .unwrap()
            .into_inner();
        Session { tx, rx }
    }

    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(WatchRequest {
                request_union: Some(r),
            })
            .await
            .unwrap();
    }

    async fn create(&self, c: WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(c)).await;
    }

    async fn next(&mut self, wait: Duration) -> Option<WatchResponse> {
        tokio::time::timeout(wait, self.rx.message())
            .await
            .ok()?
            .unwrap()
    }

    /// Reads until the stream has been quiet for `quiet`.
    async fn drain(&mut self, quiet: Duration) -> Vec<WatchResponse> {
        let mut out = Vec::new();
        while let Some(r) = self.next(quiet).await {
            out.push(r);
        }
        out
    }
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

/// Per watch id: control flags in order, and all events flattened (catch-up
/// batching and header revisions may legitimately differ).
#[derive(Debug, Default, PartialEq)]
struct PerWatch {
    control: Vec<String>,
    events: Vec<Event>,
}

fn summarize(resps: &[WatchResponse]) -> BTreeMap<i64, PerWatch> {
    let mut out: BTreeMap<i64, PerWatch> = BTreeMap::new();
    for r in resps {
        let w = out.entry(r.watch_id).or_default();
        if r.created || r.canceled || r.compact_revision != 0 || r.events.is_empty() {
            w.control.push(format!(
                "created={} canceled={} compact={} reason={:?} events={}",
                r.created,
                r.canceled,
                r.compact_revision,
                r.cancel_reason,
                r.events.len()
            ));
        }
        w.events.extend(r.events.iter().cloned());
    }
    out
}

async fn scenario(server: &Server) -> (BTreeMap<i64, PerWatch>, Vec<i64>) {
    let mut kv = server.kv().await;
    for (k, v) in [("a", "1"), ("b", "1"), ("a", "2"), ("c", "1"), ("a", "3")] {
        kv.put(put(k, v)).await.unwrap();
    }
    kv.compact(CompactionRequest {
        revision: 3,
        physical: true,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut creates = vec![
        WatchCreateRequest {
            key: "a".into(),
            start_revision: 4,
            prev_kv: true,
            ..Default::default()
        },
        WatchCreateRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        },
        WatchCreateRequest {
            key: "a".into(),
            range_end: "b".into(),
            filters: vec![0],
            ..Default::default()
        },
        WatchCreateRequest {
            key: "a".into(),
            start_revision: 2,
            ..Default::default()
        },
        WatchCreateRequest {
            key: "c".into(),
            watch_id: 100,
            start_revision: 3,
            ..Default::default()
        },
        WatchCreateRequest {
            key: "c".into(),
            watch_id: 100,
            ..Default::default()
        },
        WatchCreateRequest {
            key: "b".into(),
            range_end: "a".into(),
            ..Default::default()
        },
        WatchCreateRequest {
            key: "b".into(),
            range_end: vec![0],
            filters: vec![1],
            prev_kv: true,
            ..Default::default()
        },
        WatchCreateRequest {
            key: "".into(),
            range_end: vec![0],
            start_revision: 5,
            ..Default::default()
        },
    ];
    let n = creates.len();
    let mut s = Session::open(server, creates.remove(0)).await;
    let mut resps = Vec::new();
    // the first create went with the stream; send the others one at a time
    for c in std::iter::once(None).chain(creates.into_iter().map(Some)) {
        if let Some(c) = c {
            s.create(c).await;
        }
        // wait for this create's answer so ids are assigned in order
        loop {
            let r = s
                .next(Duration::from_secs(5))
                .await
                .expect("no created response");
            let done = r.created;
            resps.push(r);
            if done {
                break;
            }
        }
    }
    assert_eq!(resps.iter().filter(|r| r.created).count(), n);

    kv.put(put("a", "4")).await.unwrap();
    kv.put(put("b", "2")).await.unwrap();
    kv.delete_range(DeleteRangeRequest {
        key: "a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let txn = TxnRequest {
        success: ["a", "b", "ca", "d"]
            .iter()
            .map(|k| RequestOp {
                request: Some(request_op::Request::RequestPut(put(k, "t"))),
            })
            .collect(),
        ..Default::default()
    };
    kv.txn(txn).await.unwrap();
    kv.delete_range(DeleteRangeRequest {
        key: "b".into(),
        range_end: vec![0],
        prev_kv: true,
    })
    .await
    .unwrap();
    resps.extend(s.drain(Duration::from_millis(500)).await);

    s.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
        .await;
    let progress = s.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(progress.watch_id, -1);
    s.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 0,
    }))
    .await;
    s.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 999,
    }))
    .await; // unknown: no answer
    resps.extend(s.drain(Duration::from_millis(500)).await);
    kv.put(put("a", "after-cancel")).await.unwrap();
    resps.extend(s.drain(Duration::from_millis(500)).await);
    // History replayed with prev_kv: the puts and the deletes above (from
    // revision 7 on), each with the version it replaced.
    s.create(WatchCreateRequest {
        key: vec![0],
        range_end: vec![0],
        start_revision: 7,
        prev_kv: true,
        ..Default::default()
    })
    .await;
    resps.extend(s.drain(Duration::from_millis(500)).await);

    let heads = vec![progress.header.unwrap().revision];
    (summarize(&resps), heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_matches_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    let expected = scenario(&etcd).await;
    let actual = scenario(&tessera).await;
    for (id, want) in &expected.0 {
        assert_eq!(
            actual.0.get(id),
            Some(want),
            "watch {id} differs (left tessera, right etcd)"
        );
    }
    assert_eq!(
        actual.0.len(),
        expected.0.len(),
        "watch ids: {:?} vs {:?}",
        actual.0.keys(),
        expected.0.keys()
    );
    assert_eq!(actual.1, expected.1, "RequestProgress revision");
    // sanity: the compacted watcher was told the compaction revision
    assert!(
        actual.0[&3]
            .control
            .iter()
            .any(|c| c.contains("canceled=true compact=3")),
        "{:?}",
        actual.0[&3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for kind in [Kind::Etcd, Kind::Tessera] {
        let server = Server::start(
            kind,
            &dir.path().join(format!("{kind:?}")),
            &["--max-request-bytes=100000"],
        )
        .await;
        let mut kv = server.kv().await;
        for i in 0..20 {
            kv.put(put(&format!("big/{i:02}"), &"v".repeat(40_000)))
                .await
                .unwrap();
        }
        let mut s = Session::open(
            &server,
            WatchCreateRequest {
                key: "big/".into(),
                range_end: "big0".into(),
                prev_kv: true,
                fragment: true,
                ..Default::default()
            },
        )
        .await;
        assert!(s.next(Duration::from_secs(5)).await.unwrap().created);
        // one revision, 20 delete events each carrying a 40 KB previous value:
        // over etcd's fragment limit (--max-request-bytes + 512 KiB)
        kv.delete_range(DeleteRangeRequest {
            key: "big/".into(),
            range_end: "big0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let resps = s.drain(Duration::from_millis(500)).await;
        let flags: Vec<(bool, usize)> =
            resps.iter().map(|r| (r.fragment, r.events.len())).collect();
        let events: usize = resps.iter().map(|r| r.events.len()).sum();
        assert_eq!(events, 20, "{kind:?}");
        results.push(flags);
    }
    assert!(
        results[1].len() > 1,
        "tessera did not fragment: {:?}",
        results[1]
    );
    assert_eq!(
        results[1], results[0],
        "fragmenting differs (tessera vs etcd)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notify_reports_the_current_revision() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Kind::Tessera,
        dir.path(),
        &["--experimental-watch-progress-notify-interval=200ms"],
    )
    .await;
    let mut kv = server.kv().await;
    kv.put(put("x", "1")).await.unwrap();
    kv.put(put("y", "1")).await.unwrap();
    let mut s = Session::open(
        &server,
        WatchCreateRequest {
            key: "x".into(),
            progress_notify: true,
            ..Default::default()
        },
    )
    .await;
    assert!(s.next(Duration::from_secs(5)).await.unwrap().created);
    let r = s
        .next(Duration::from_secs(3))
        .await
        .expect("no progress notification");
    assert!(r.events.is_empty() && r.watch_id == 0 && !r.canceled);
    assert_eq!(r.header.unwrap().revision, 3);
    // a write elsewhere advances the reported revision
    kv.put(put("y", "2")).await.unwrap();
    let r = s
        .next(Duration::from_secs(3))
        .await
        .expect("no progress notification");
    assert_eq!(r.header.unwrap().revision, 4);
}

/// 100 watchers on one stream and a second stream nobody reads while 3000
/// writes go through: writes are not held up, every watcher of the read
/// stream sees every event once and in order, and the stalled stream, once
/// read, catches up from disk without loss or duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_and_a_stalled_one() {
    const WATCHERS: usize = 100;
    const WRITES: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let w = || WatchCreateRequest {
        key: "w/".into(),
        range_end: "w0".into(),
        ..Default::default()
    };
    let mut busy = Session::open(&server, w()).await;
    let mut stalled = Session::open(&server, w()).await;
    for _ in 1..WATCHERS {
        busy.create(w()).await;
    }
    assert!(stalled.next(Duration::from_secs(5)).await.unwrap().created);

    let reader = tokio::spawn(async move {
        let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        let mut total = 0;
        while total < WATCHERS * WRITES {
            let r = busy
                .next(Duration::from_secs(30))
                .await
                .expect("busy stream stalled");
            for e in &r.events {
                seen.entry(r.watch_id)
                    .or_default()
                    .push(e.kv.as_ref().unwrap().mod_revision);
                total += 1;
            }
        }
        seen
    });
    let mut kv = server.kv().await;
    let start = std::time::Instant::now();
    for i in 0..WRITES {
        kv.put(put(&format!("w/{}", i % 10), &i.to_string()))
            .await
            .unwrap();
    }
    let write_time = start.elapsed();
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), WATCHERS);
    let expected: Vec<i64> = (2..2 + WRITES as i64).collect();
    for (id, revs) in &seen {
        assert_eq!(revs, &expected, "watcher {id}");
    }
    // now read the stalled stream: everything, once, in order
    let mut revs = Vec::new();
    while revs.len() < WRITES {
        let r = stalled
            .next(Duration::from_secs(30))
            .await
            .expect("stalled stream did not catch up");
        revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(revs, expected);
    eprintln!(
        "{WRITES} writes with {WATCHERS} live watchers and a stalled stream took {write_time:?}"
    );
}
