//! Safety: requests and faults that must never stop a cluster for good,
//! apply a write twice, expire a kept-alive lease, or let a member start on
//! a damaged log. Faults that cannot be produced on demand from outside are
//! injected through failpoints (`TESSERA_FAILPOINTS`).

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::{Kind, Server};
use prost::Message;
use tessera_proto::etcdserverpb::kv_client::KvClient;
use tessera_proto::etcdserverpb::{
    request_op, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use tessera_proto::tessera::peer_client::PeerClient;
use tessera_proto::tessera::{raft_command, ForwardRequest, ProposeReply, RaftCommand};
use tonic::Code;

/// The nesting limit documented in the README (`validate::MAX_TXN_DEPTH`).
const MAX_TXN_DEPTH: usize = 32;
/// etcd's error for a txn with too many operations.
const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";

/// A txn `depth` levels deep, with a range on every level (the deepest shape
/// a reply can take) and a put of `nested` on the deepest one, so it goes
/// through the Raft log (a read-only txn is answered locally).
fn nested_txn(depth: usize) -> TxnRequest {
    let range = RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })),
    };
    let put = RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: b"nested".to_vec(),
            value: depth.to_string().into_bytes(),
            ..Default::default()
        })),
    };
    let mut t = TxnRequest {
        success: vec![range.clone(), put],
        ..Default::default()
    };
    for _ in 1..depth {
        t = TxnRequest {
            success: vec![
                range.clone(),
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(t)),
                },
            ],
            ..Default::default()
        };
    }
    t
}

fn kv(url: &str) -> KvClient<tonic::transport::Channel> {
    KvClient::new(common::channel(url))
}

async fn put(url: &str, key: &str, value: &str) -> Result<i64, tonic::Status> {
    let resp = kv(url)
        .put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await?;
    Ok(resp.into_inner().header.map_or(0, |h| h.revision))
}

/// The key's value and version, read by `url`'s member alone.
async fn get_local(url: &str, key: &str) -> Option<(Vec<u8>, i64)> {
    let resp = kv(url)
        .range(RangeRequest {
            key: key.into(),
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    resp.kvs.first().map(|kv| (kv.value.clone(), kv.version))
}

/// Waits until `url`'s member has applied `key` = `value`.
async fn wait_for(url: &str, key: &str, value: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get_local(url, key).await.map(|(v, _)| v) != Some(value.into()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{url} never applied {key}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills every member, starts them again on their data, waits for a leader.
async fn restart_all(cluster: &mut Cluster) {
    for m in &mut cluster.members {
        m.kill();
    }
    for m in &mut cluster.members {
        m.spawn();
    }
    for m in &mut cluster.members {
        m.wait_serving().await;
    }
    cluster.wait_leader(Duration::from_secs(30)).await;
}

/// A txn nested at the limit is served; one level deeper, and the depth
/// that used to stop every member for good (50), are refused with etcd's
/// error before anything is proposed, on the leader and on followers; the
/// cluster serves throughout and after a restart of every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_txns_past_the_limit_are_refused_and_the_cluster_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(3, dir.path(), &[]).await;
    put(&cluster.members[0].url(), "k", "v").await.unwrap();
    for m in &cluster.members {
        let resp = kv(&m.url())
            .txn(nested_txn(MAX_TXN_DEPTH))
            .await
            .unwrap_or_else(|e| panic!("depth {MAX_TXN_DEPTH} refused by {}: {e}", m.name));
        assert!(resp.into_inner().succeeded);
        for depth in [MAX_TXN_DEPTH + 1, 49, 50] {
            let err = kv(&m.url()).txn(nested_txn(depth)).await.unwrap_err();
            assert_eq!(
                (err.code(), err.message()),
                (Code::InvalidArgument, TOO_MANY_OPS),
                "depth {depth} on {}",
                m.name
            );
        }
    }
    for m in &cluster.members {
        put(&m.url(), "after", &m.name).await.unwrap();
    }
    restart_all(&mut cluster).await;
    let url = cluster.members[2].url();
    put(&url, "after-restart", "ok").await.unwrap();
    for m in &cluster.members {
        wait_for(&m.url(), "after-restart", "ok").await;
        assert_eq!(get_local(&m.url(), "k").await.unwrap().0, b"v");
    }
}

/// One line of a member's `/metrics`.
fn metric(endpoint: &str, name: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(endpoint).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .map(str::to_string)
}

/// With validation turned off by a failpoint, a txn that cannot be decoded
/// inside its Raft batch reaches the log. It used to stop every member's
/// state machine, and every restart replayed it. Now every member skips it
/// (the proposer gets an error), the cluster serves on, and restarts too.
/// A forwarded batch with such a request in it fails only that request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_command_is_skipped_on_every_member_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TESSERA_FAILPOINTS", "txn-depth-unchecked")];
    let mut cluster = Cluster::start_with_env(3, dir.path(), &[], &env).await;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let leader_url = cluster.members[leader].url();
    let err = kv(&leader_url).txn(nested_txn(50)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("could not be decoded"), "{err:?}");
    let follower = (leader + 1) % 3;
    put(&cluster.members[follower].url(), "after", "ok")
        .await
        .unwrap();
    for m in &cluster.members {
        wait_for(&m.url(), "after", "ok").await;
        assert_eq!(
            metric(&m.endpoint(), "tessera_server_undecodable_commands_total").as_deref(),
            Some("tessera_server_undecodable_commands_total 1"),
            "{}",
            m.name
        );
    }

    // A forwarded batch, as a follower sends it: a put, the poison command,
    // another put. Only the poison command fails.
    let encode = |c: RaftCommand| c.encode_to_vec();
    let put_cmd = |key: &str| RaftCommand {
        request: Some(raft_command::Request::Put(PutRequest {
            key: key.into(),
            value: b"fwd".to_vec(),
            ..Default::default()
        })),
        auth: None,
    };
    let poison = RaftCommand {
        request: Some(raft_command::Request::Txn(nested_txn(50))),
        auth: None,
    };
    let mut batch = Vec::new();
    for c in [
        encode(put_cmd("fwd-1")),
        encode(poison),
        encode(put_cmd("fwd-2")),
    ] {
        batch.push(0x0a);
        prost::encoding::encode_varint(c.len() as u64, &mut batch);
        batch.extend_from_slice(&c);
    }
    let peer_url = cluster.members[leader].peer_url();
    let mut peer = PeerClient::new(common::channel(&peer_url));
    let reply = peer
        .forward(ForwardRequest {
            method: "propose".into(),
            body: batch,
        })
        .await
        .unwrap()
        .into_inner();
    let reply = ProposeReply::decode(reply.data.as_slice()).unwrap();
    let errors: Vec<u32> = reply
        .results
        .unwrap()
        .results
        .iter()
        .map(|r| r.error)
        .collect();
    assert_eq!(errors.len(), 3);
    assert_eq!((errors[0], errors[2]), (0, 0), "{errors:?}");
    assert_ne!(errors[1], 0, "{errors:?}");
    wait_for(&leader_url, "fwd-2", "fwd").await;

    restart_all(&mut cluster).await;
    for m in &cluster.members {
        put(&m.url(), "after-restart", &m.name).await.unwrap();
    }
    for m in &cluster.members {
        assert_eq!(get_local(&m.url(), "fwd-1").await.unwrap().0, b"fwd");
        wait_for(&m.url(), "after-restart", "m3").await;
    }
}

/// openraft answers "not leader" both when it refuses a write it never
/// appended (safe to retry at the leader) and when a newer leader truncated
/// the entry it had appended, which a member holding it may still commit.
/// The failpoint gives that second answer for an entry that did commit: the
/// write is not retried (it used to be, and was applied again), and the
/// client gets etcd's error for a proposal lost in a leader change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_entry_may_commit_elsewhere_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TESSERA_FAILPOINTS", "proposal-lost-after-append")];
    let server = Server::start_with_env(Kind::Tessera, dir.path(), &[], &env).await;
    let err = put(&server.url(), "once", "v").await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::Unavailable,
            "etcdserver: request timed out, possibly due to previous leader failure"
        )
    );
    let (value, version) = get_local(&server.url(), "once").await.unwrap();
    assert_eq!(value, b"v");
    assert_eq!(version, 1, "the write was applied {version} times");
}

/// The member leading next must not expire leases on the deadlines it held
/// as a follower (never renewed there) before its lessor is promoted. The
/// failpoint holds every promotion back 2 s, the window in which an expiry
/// check used to revoke every lease older than its TTL; keep-alives go on
/// throughout and leadership moves three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_leases_survive_leader_changes() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TESSERA_FAILPOINTS", "lessor-promote-delay-ms=2000")];
    let cluster = Cluster::start_with_env(3, dir.path(), &[], &env).await;
    let endpoints: Vec<String> = cluster.members.iter().map(|m| m.url()).collect();
    let mut client = etcd_client::Client::connect(&endpoints, None)
        .await
        .unwrap();
    // Wait for the first promotion, so the grant's keep-alives are answered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lease = client.lease_grant(3, None).await.unwrap().id();
    client
        .put(
            "leased",
            "v",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.unwrap();
    let keep_alive = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), responses.message()).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    for round in 0..3 {
        // Longer than the TTL: every follower's deadline for the lease has
        // passed by now.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        let target = (leader + 1) % 3;
        let target_id = cluster.members[target]
            .status()
            .await
            .unwrap()
            .header
            .unwrap()
            .member_id;
        let mut to_leader = etcd_client::Client::connect([cluster.members[leader].url()], None)
            .await
            .unwrap();
        to_leader.move_leader(target_id).await.unwrap();
        // Through the promotion delay and past it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for m in &cluster.members {
            assert_eq!(
                get_local(&m.url(), "leased").await.map(|(v, _)| v),
                Some(b"v".to_vec()),
                "round {round}: the kept-alive lease's key is gone on {}",
                m.name
            );
        }
    }
    let ttl = client.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert!(ttl > 0, "the lease expired (ttl {ttl})");
    keep_alive.abort();
}

/// Waits for a server process started by hand to exit; its stderr.
fn expect_start_failure(mut cmd: std::process::Command) -> String {
    let out = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut out = out;
    loop {
        if let Some(status) = out.try_wait().unwrap() {
            assert!(!status.success(), "the member started");
            let mut err = String::new();
            std::io::Read::read_to_string(out.stderr.as_mut().unwrap(), &mut err).unwrap();
            return err;
        }
        if std::time::Instant::now() > deadline {
            let _ = out.kill();
            panic!("the member neither failed nor exited within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A flipped bit in the middle of the log (not a torn tail) stops the start
/// with a clear error instead of cutting the log there; so does a WAL
/// directory that vanished next to the data. Once the log is whole again,
/// the member starts with everything in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_refuses_to_start_on_a_corrupt_or_missing_wal() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    for i in 0..200 {
        put(&server.url(), &format!("k{i:03}"), &"v".repeat(100))
            .await
            .unwrap();
    }
    server.kill();
    let wal = server.data_dir.join("member/wal");
    let segment = wal.join("0000000000000000.wal");
    let original = std::fs::read(&segment).unwrap();
    let written = original.iter().rposition(|&b| b != 0).unwrap();
    assert!(written > 20_000, "only {written} bytes of log");
    let mut damaged = original.clone();
    damaged[written / 2] ^= 0x04;
    std::fs::write(&segment, &damaged).unwrap();
    let err = expect_start_failure(server.command());
    assert!(
        err.contains("is corrupt") && err.contains("0000000000000000.wal"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        damaged,
        "the log was changed"
    );

    let moved = dir.path().join("wal-elsewhere");
    std::fs::rename(&wal, &moved).unwrap();
    let err = expect_start_failure(server.command());
    assert!(
        err.contains("WAL directory") && err.contains("missing"),
        "{err}"
    );

    std::fs::rename(&moved, &wal).unwrap();
    std::fs::write(&segment, &original).unwrap();
    server.restart().await;
    assert_eq!(get_local(&server.url(), "k199").await.unwrap().0.len(), 100);
    let status = server
        .maintenance()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.header.unwrap().revision >= 201);
}
