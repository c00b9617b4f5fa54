//! Watch through the `etcd-client` crate, as Rust applications use it: many
//! watches on one stream, a compacted start revision, RequestProgress,
//! filters, fragmenting of a large batch, and cancel.

mod common;

use std::time::Duration;

use common::{Kind, Server};
use etcd_client::{CompactionOptions, EventType, WatchFilterType, WatchOptions, WatchResponse};

async fn next(stream: &mut etcd_client::WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no watch response within 10 s")
        .unwrap()
        .expect("stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_features_through_the_client_crate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &["--max-request-bytes=1048576"]).await;
    let mut c = server.client().await;
    for i in 0..3 {
        c.put(format!("old/{i}"), "v", None).await.unwrap();
    }
    let compacted_at = c
        .put("old/3", "v", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(compacted_at, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    // One stream: a first watch, then 20 more added on it.
    let mut stream = c
        .watch("k/0", Some(WatchOptions::new().with_watch_id(100)))
        .await
        .unwrap();
    let created = next(&mut stream).await;
    assert!(created.created());
    assert_eq!(created.watch_id(), 100);
    for i in 1..20 {
        stream
            .watch(
                format!("k/{i}"),
                Some(WatchOptions::new().with_watch_id(100 + i)),
            )
            .await
            .unwrap();
        assert_eq!(next(&mut stream).await.watch_id(), 100 + i);
    }
    for i in 0..20 {
        c.put(format!("k/{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in 0..20 {
        let r = next(&mut stream).await;
        assert_eq!(r.watch_id(), 100 + i, "each watch gets its own key's event");
        assert_eq!(
            r.events()[0].kv().unwrap().value_str().unwrap(),
            format!("v{i}")
        );
    }

    // A start revision below the compaction: canceled with compact_revision.
    stream
        .watch(
            "old/",
            Some(WatchOptions::new().with_prefix().with_start_revision(2)),
        )
        .await
        .unwrap();
    let mut r = next(&mut stream).await;
    if r.created() {
        r = next(&mut stream).await;
    }
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), compacted_at);

    // RequestProgress: a header at the current revision, no events.
    stream.request_progress().await.unwrap();
    let r = next(&mut stream).await;
    assert!(r.events().is_empty());
    let current = c
        .get("k/0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(r.header().unwrap().revision(), current);

    // Filters: a NOPUT watch sees only the delete.
    stream
        .watch(
            "f",
            Some(
                WatchOptions::new()
                    .with_watch_id(500)
                    .with_filters([WatchFilterType::NoPut]),
            ),
        )
        .await
        .unwrap();
    assert!(next(&mut stream).await.created());
    c.put("f", "1", None).await.unwrap();
    c.delete("f", None).await.unwrap();
    let r = next(&mut stream).await;
    assert_eq!(r.watch_id(), 500);
    assert_eq!(r.events().len(), 1);
    assert_eq!(r.events()[0].event_type(), EventType::Delete);

    // Cancel: the watch reports canceled and gets nothing more.
    stream.cancel(500).await.unwrap();
    let r = next(&mut stream).await;
    assert!(r.canceled() && r.watch_id() == 500);

    // Fragments: one revision whose events (with previous values) exceed
    // the gRPC limit (--max-request-bytes + 512 KiB) arrives in parts that
    // together hold every event.
    let big_txn = |value: &str| {
        let ops: Vec<_> = (0..20)
            .map(|i| etcd_client::TxnOp::put(format!("big/{i:02}"), value, None))
            .collect();
        etcd_client::Txn::new().and_then(ops)
    };
    c.txn(big_txn(&"a".repeat(45_000))).await.unwrap();
    let mut big = c
        .watch(
            "big/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_fragment(),
            ),
        )
        .await
        .unwrap();
    assert!(next(&mut big).await.created());
    let rev = c
        .txn(big_txn(&"b".repeat(45_000)))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (mut parts, mut events) = (0, 0);
    while events < 20 {
        let r = next(&mut big).await;
        parts += 1;
        events += r.events().len();
        assert!(r
            .events()
            .iter()
            .all(|e| e.kv().unwrap().mod_revision() == rev));
    }
    assert_eq!(events, 20);
    assert!(parts > 1, "a 1.8 MB revision must arrive in fragments");
}
