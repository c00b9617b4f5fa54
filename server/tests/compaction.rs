//! Compaction as etcd runs it: the Compact request is answered once the
//! compacted revision is recorded; old versions are deleted afterwards in
//! bounded batches while writes go on; a compaction cut short by SIGKILL is
//! resumed after the restart; `--physical` answers only once the deletion
//! has finished.

mod common;

use std::time::{Duration, Instant};

use common::{Kind, Server};
use etcd_client::{CompactionOptions, GetOptions};

/// Puts `n` revisions over a few keys; returns the last revision.
async fn history(client: &mut etcd_client::Client, n: usize) -> i64 {
    let mut rev = 0;
    for i in 0..n {
        let resp = client
            .put(format!("key/{}", i % 7), format!("v{i}"), None)
            .await
            .unwrap();
        rev = resp.header().unwrap().revision();
    }
    rev
}

/// How many "finished scheduled compaction" lines the log has for `rev`.
fn finished(server: &Server, rev: i64) -> usize {
    server
        .log()
        .lines()
        .filter(|l| {
            l.contains("finished scheduled compaction")
                && l.contains(&format!("\"compact-revision\":{rev}"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_runs_in_the_background_resumes_and_physical_waits() {
    let dir = tempfile::tempdir().unwrap();
    // Slow on purpose: 1,400 old versions at 20 per batch and 50 ms apart
    // take about 3.5 s to delete.
    let slow = [
        "--experimental-compaction-batch-limit=20",
        "--experimental-compaction-sleep-interval=50ms",
    ];
    let mut server = Server::start(Kind::Tessera, dir.path(), &slow).await;
    let mut client = server.client().await;
    let first = history(&mut client, 1400).await;

    // Answered at once, and reads below it are refused from then on.
    let asked = Instant::now();
    client.compact(first, None).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    let old = client
        .get("key/1", Some(GetOptions::new().with_revision(first - 10)))
        .await
        .unwrap_err();
    assert!(
        old.to_string()
            .contains("mvcc: required revision has been compacted"),
        "{old}"
    );
    // Writes go on while the deletion runs.
    let put = Instant::now();
    client.put("during", "compaction", None).await.unwrap();
    assert!(
        put.elapsed() < Duration::from_secs(1),
        "{:?}",
        put.elapsed()
    );
    assert_eq!(finished(&server, first), 0, "deletion already over");

    // SIGKILL mid-way; the restarted member resumes and finishes it.
    server.kill();
    server.extra.clear();
    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while finished(&server, first) == 0 {
        assert!(
            Instant::now() < deadline,
            "compaction not resumed:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = server.client().await;
    let latest = client
        .get("key/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(latest.kvs().len(), 7);
    assert_eq!(
        client.get("during", None).await.unwrap().kvs()[0].value(),
        b"compaction"
    );

    // --physical answers once the deletion is over.
    server.kill();
    server.extra = slow.iter().map(|s| s.to_string()).collect();
    server.restart().await;
    let mut client = server.client().await;
    let second = history(&mut client, 1400).await;
    let asked = Instant::now();
    client
        .compact(second, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert_eq!(
        finished(&server, second),
        1,
        "answered after {:?} before the deletion ended:\n{}",
        asked.elapsed(),
        server.log()
    );
}
