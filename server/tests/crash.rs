//! Crash test: SIGKILL tessera while clients are writing, restart it, and
//! check that every acknowledged put survived with the revision it was
//! acknowledged with, and that revisions continue from there.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{current_rev, Kind, Server};
use tessera_proto::etcdserverpb::{PutRequest, RangeRequest};

const WRITERS: usize = 8;
const ROUNDS: usize = 3;

#[derive(Clone, Debug)]
struct Acked {
    key: Vec<u8>,
    value: Vec<u8>,
    revision: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    kill_restart_and_check(&mut server).await;
}

/// The same with a Raft log allowed only 256 KiB of memory: snapshots are
/// taken and the log purged behind them while clients write; then a member
/// killed after a purge restarts from its purged log (openraft builds a new
/// snapshot then) with every write in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill_across_snapshots_and_purges() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-raft-log-memory-bytes=262144"];
    let mut server = Server::start(Kind::Tessera, dir.path(), &flags).await;
    kill_restart_and_check(&mut server).await;

    let mut kv = server.kv().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut written = 0;
    let purges = |log: &str| log.matches("purging the raft log").count();
    let before = purges(&server.log());
    while purges(&server.log()) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no purge after {written} puts; log:\n{}",
            server.log()
        );
        for _ in 0..100 {
            let put = PutRequest {
                key: format!("purge/{written:06}").into_bytes(),
                value: vec![b'v'; 200],
                ..Default::default()
            };
            kv.put(put).await.unwrap();
            written += 1;
        }
    }
    server.restart().await;
    let log = without_colors(&server.log());
    let recovered = log.lines().rfind(|l| l.contains("raft log recovered"));
    assert!(
        recovered.is_some_and(|l| l.contains("\"purged\":\"Some")),
        "the restart did not find a purged log:\n{log}"
    );
    for expected in [
        "taking a snapshot to purge it",
        "built state machine snapshot",
    ] {
        assert!(log.contains(expected), "no {expected:?} in the log:\n{log}");
    }
    let mut kv = server.kv().await;
    let found = kv
        .range(RangeRequest {
            key: b"purge/".to_vec(),
            range_end: b"purge0".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        found.count, written,
        "puts lost across the purge and restart"
    );
}

/// A power loss after the Raft log was purged behind a snapshot. The
/// failpoint keeps the state machine's unsynced writes inside the process,
/// so SIGKILL loses them as a power loss loses what the OS had not written
/// back. Before a purge the state machine must be synced: otherwise it comes
/// back behind the purged log, unable to catch up, with acknowledged writes
/// gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_a_power_loss_after_snapshots_and_purges() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-raft-log-memory-bytes=262144"];
    let env = [("TESSERA_FAILPOINTS", "state-machine-writes-unsynced-lost")];
    let mut server = Server::start_with_env(Kind::Tessera, dir.path(), &flags, &env).await;
    let mut kv = server.kv().await;
    let mut acked = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let purges = |log: &str| log.matches("purging the raft log").count();
    // Until two purges happened, and a little more after them.
    let mut extra = 300;
    while extra > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no purge after {} puts; log:\n{}",
            acked.len(),
            server.log()
        );
        for _ in 0..100 {
            let i = acked.len();
            let put = PutRequest {
                key: format!("power/{i:06}").into_bytes(),
                value: vec![b'p'; 200],
                ..Default::default()
            };
            let revision = kv
                .put(put)
                .await
                .unwrap()
                .into_inner()
                .header
                .unwrap()
                .revision;
            acked.push(revision);
        }
        if purges(&server.log()) >= 2 {
            extra -= 100;
        }
    }
    server.kill();
    server.restart().await;
    let mut kv = server.kv().await;
    for (i, revision) in acked.iter().enumerate() {
        let got = kv
            .range(RangeRequest {
                key: format!("power/{i:06}").into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let found = got.kvs.first().map(|kv| kv.mod_revision);
        assert_eq!(
            found,
            Some(*revision),
            "acknowledged put {i} of {}",
            acked.len()
        );
    }
}

/// `text` without the terminal color codes of the server's log.
fn without_colors(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Rounds of: clients write, SIGKILL, restart, every acknowledged put is
/// there with its revision, and revisions continue.
async fn kill_restart_and_check(server: &mut Server) {
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();

    for round in 0..ROUNDS {
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut kv = server.kv().await;
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("crash/{round}/{w}/{i}").into_bytes();
                    let value = format!("value-{round}-{w}-{i}").into_bytes();
                    let put = PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    };
                    match kv.put(put).await {
                        Ok(resp) => {
                            let revision = resp.into_inner().header.unwrap().revision;
                            acked.lock().unwrap().push(Acked {
                                key,
                                value,
                                revision,
                            });
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.kill();
        for w in writers {
            w.await.unwrap();
        }
        server.restart().await;

        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > WRITERS * (round + 1),
            "round {round}: too few writes acknowledged"
        );
        let mut kv = server.kv().await;
        for a in &acked {
            let got = kv
                .range(RangeRequest {
                    key: a.key.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let kv0 = got.kvs.first().unwrap_or_else(|| {
                panic!(
                    "round {round}: acknowledged put of {:?} lost",
                    String::from_utf8_lossy(&a.key)
                )
            });
            assert_eq!(kv0.value, a.value);
            assert_eq!(
                kv0.mod_revision,
                a.revision,
                "revision of {:?}",
                String::from_utf8_lossy(&a.key)
            );
        }
        let max_acked = acked.iter().map(|a| a.revision).max().unwrap_or(0);
        let cur = current_rev(&mut kv).await;
        assert!(
            cur >= max_acked,
            "round {round}: store revision {cur} below acknowledged {max_acked}"
        );
        let next = kv
            .put(PutRequest {
                key: b"after-restart".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            next.header.unwrap().revision,
            cur + 1,
            "round {round}: revisions must continue"
        );
    }
}

/// fsyncgate: one failed `fdatasync` of the Raft log (failpoint
/// `wal-sync-fails-once-after`: that write is lost, the syncs after it
/// succeed again) stops writes for good: the put that hit it and every
/// later put get `etcdserver: server stopped` (not hung, not acknowledged),
/// the log says why, and after a restart exactly the acknowledged puts are
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_sync_stops_writes_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TESSERA_FAILPOINTS", "wal-sync-fails-once-after=60")];
    let mut server = Server::start_with_env(Kind::Tessera, dir.path(), &[], &env).await;
    let mut kv = server.kv().await;
    let put = |i: usize| PutRequest {
        key: format!("gate/{i:04}").into_bytes(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let mut acked = Vec::new();
    let mut failed_at = None;
    for i in 0..500 {
        match tokio::time::timeout(Duration::from_secs(5), kv.put(put(i))).await {
            Ok(Ok(_)) => acked.push(i),
            Ok(Err(status)) => {
                failed_at = Some((i, status));
                break;
            }
            Err(_) => panic!("put {i} hung after the failed sync; log:\n{}", server.log()),
        }
    }
    let (first_failed, status) = failed_at.expect("no put failed: the failpoint never fired");
    assert!(!acked.is_empty(), "the failpoint fired before any put");
    assert_eq!(
        status.message(),
        "etcdserver: server stopped",
        "put {first_failed}: {status:?}"
    );
    // Later syncs would succeed, yet nothing more is acknowledged.
    for i in first_failed + 1..first_failed + 6 {
        let answer = tokio::time::timeout(Duration::from_secs(5), kv.put(put(i)))
            .await
            .unwrap_or_else(|_| panic!("put {i} hung; log:\n{}", server.log()));
        let refused = answer.expect_err("a put acknowledged after a failed sync");
        assert_eq!(refused.message(), "etcdserver: server stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = server.log();
    assert!(
        log.contains("WAL write failed; the log is stopped"),
        "the log does not say why writes stopped:\n{log}"
    );
    // Restarted without the failpoint: every acknowledged put is there.
    server.kill();
    server.env.clear();
    server.restart().await;
    let mut kv = server.kv().await;
    let found = kv
        .range(RangeRequest {
            key: b"gate/".to_vec(),
            range_end: b"gate0".to_vec(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let present: std::collections::HashSet<Vec<u8>> =
        found.kvs.iter().map(|kv| kv.key.clone()).collect();
    for i in &acked {
        assert!(
            present.contains(&put(*i).key),
            "acknowledged put {i} lost after the restart"
        );
    }
    // The failpoint wrote nothing of the failed put's log entry, so exactly
    // the acknowledged puts are there: had the failed one been answered
    // as written, it would be missing here (lost), and anything later
    // would be extra.
    assert_eq!(
        present.len(),
        acked.len(),
        "{} keys present, {} acknowledged",
        present.len(),
        acked.len()
    );
}
