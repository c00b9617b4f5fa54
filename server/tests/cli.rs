//! The `tessera` binary's command line: etcd's flags, one-line errors,
//! accepted-but-ignored flags, the ready line, and snapshot restore.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{stdout, Kind, Server, TESSERA};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(TESSERA).args(args).output().unwrap()
}

#[test]
fn bad_flags_get_a_one_line_error_and_nonzero_exit() {
    for args in [
        &["--max-txn-ops=abc"][..],
        &["--no-such-flag"],
        &["--auto-compaction-mode=weekly"],
        &["--listen-client-urls=localhost:2379"],
        &["--initial-cluster-state=maybe"],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("tessera: "), "{args:?}: {err}");
    }
}

#[test]
fn version_flag_prints_versions() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("etcd API Version: 3.5."),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_ready_line_and_warns_about_ignored_flags() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Kind::Tessera,
        dir.path(),
        &["--enable-pprof", "--snapshot-count=5000", "--max-wals=3"],
    )
    .await;
    let log = server.log();
    assert!(log.contains("ready to serve client requests"), "{log}");
    assert!(
        log.contains("--enable-pprof") && log.contains("--max-wals"),
        "{log}"
    );
    assert!(
        !log.contains("--snapshot-count"),
        "acted-on flag reported as ignored: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_configure_like_flags() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let peer = format!("http://127.0.0.1:{}", common::free_port());
    let mut child = Command::new(TESSERA)
        .env("ETCD_NAME", "envnode")
        // Not etcd's default peer port: another server may hold it.
        .env("ETCD_LISTEN_PEER_URLS", &peer)
        .env("ETCD_INITIAL_ADVERTISE_PEER_URLS", &peer)
        .env("ETCD_INITIAL_CLUSTER", format!("envnode={peer}"))
        .env("ETCD_DATA_DIR", dir.path().join("d"))
        .env(
            "ETCD_LISTEN_CLIENT_URLS",
            format!("http://127.0.0.1:{port}"),
        )
        .env(
            "ETCD_ADVERTISE_CLIENT_URLS",
            format!("http://127.0.0.1:{port}"),
        )
        .env("ETCD_MAX_TXN_OPS", "2")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let mut ok = false;
    for _ in 0..100 {
        let out = common::etcdctl(&endpoint, &["member", "list"], None);
        if out.status.success() {
            assert!(stdout(&out).contains("envnode"), "{}", stdout(&out));
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "server configured from ETCD_* did not start");
    let txn = "\n\nput a 1\nput b 2\nput c 3\n\n\n";
    let out = common::etcdctl(&endpoint, &["txn"], Some(txn));
    assert!(String::from_utf8_lossy(&out.stderr).contains("too many operations in txn request"));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_then_restore_starts_a_member_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let source = Server::start(Kind::Tessera, &dir.path().join("src"), &[]).await;
    for i in 0..50 {
        assert!(source
            .etcdctl(&["put", &format!("k{i}"), &format!("v{i}")])
            .status
            .success());
    }
    let file = dir.path().join("snap.db");
    let out = source.etcdctl(&["snapshot", "save", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).contains("Snapshot saved at"),
        "{}",
        stdout(&out)
    );

    let restored_dir = dir.path().join("restored");
    std::fs::create_dir_all(&restored_dir).unwrap();
    let out = run(&[
        &format!("--data-dir={}", restored_dir.join("data").display()),
        "snapshot-restore",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a corrupted snapshot is refused
    let mut bad = std::fs::read(&file).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(dir.path().join("bad.db"), &bad).unwrap();
    let out = run(&[
        &format!("--data-dir={}", dir.path().join("x").display()),
        "snapshot-restore",
        dir.path().join("bad.db").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sha256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let restored = Server::start(Kind::Tessera, &restored_dir, &[]).await;
    let got = restored.etcdctl(&["get", "k7", "--print-value-only"]);
    assert_eq!(stdout(&got), "v7\n");
    let put = restored.etcdctl(&["put", "after", "x", "-w", "json"]);
    assert!(
        stdout(&put).contains("\"revision\":52"),
        "revisions continue from the snapshot: {}",
        stdout(&put)
    );
}

/// A plain HTTP/1.0 GET on the client port (so the body is not chunked);
/// returns (status line, body).
fn http_get(endpoint: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(endpoint).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {endpoint}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_version_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    assert!(server.etcdctl(&["put", "k", "v"]).status.success());
    let (status, body) = http_get(&server.endpoint(), "/health");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, r#"{"health":"true","reason":""}"#);
    let (_, body) = http_get(&server.endpoint(), "/version");
    assert!(body.contains(r#""etcdserver":"3.5."#), "{body}");
    let (_, body) = http_get(&server.endpoint(), "/metrics");
    for line in [
        "etcd_server_has_leader 1",
        "etcd_server_is_leader 1",
        "etcd_mvcc_put_total 1",
        "etcd_debugging_mvcc_current_revision 2",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }
    // The process metrics every Prometheus client exports, as etcd does.
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(value.is_some_and(|v| v > 0.0), "{name} in:\n{body}");
    }
}

/// The `le` labels of a histogram's buckets and its `_count`, from a
/// `/metrics` body.
fn histogram(body: &str, name: &str) -> (Vec<String>, u64) {
    let bucket = format!("{name}_bucket{{le=\"");
    let les = body
        .lines()
        .filter_map(|l| Some(l.strip_prefix(&bucket)?.split('"').next()?.to_string()))
        .collect();
    let count = body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (les, count)
}

/// The disk latency histograms dashboards and alerts for etcd read (WAL
/// fsync, backend commit) are there under etcd's names and buckets, and
/// count the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_latency_histograms_match_etcds() {
    let names = [
        "etcd_disk_wal_fsync_duration_seconds",
        "etcd_disk_backend_commit_duration_seconds",
    ];
    let mut buckets = Vec::new();
    for kind in [Kind::Etcd, Kind::Tessera] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(kind, dir.path(), &[]).await;
        assert!(server.etcdctl(&["put", "k", "v"]).status.success());
        for name in names {
            // etcd commits its backend every 100 ms, not per write.
            let deadline = Instant::now() + Duration::from_secs(5);
            let (les, count) = loop {
                let (_, body) = http_get(&server.endpoint(), "/metrics");
                let (les, count) = histogram(&body, name);
                if count > 0 || Instant::now() > deadline {
                    break (les, count);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert!(count > 0, "{kind:?}: {name} counted nothing");
            assert_eq!(
                les.last().map(String::as_str),
                Some("+Inf"),
                "{kind:?}: {name}"
            );
            buckets.push(les);
        }
    }
    assert_eq!(buckets[..2], buckets[2..], "etcd's buckets, then Tessera's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_rpcs_answer_unimplemented() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let mut m = server.maintenance().await;
    let err = m
        .downgrade(tessera_proto::etcdserverpb::DowngradeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    // MoveLeader is served; to a member that does not exist, etcd's error.
    let err = m
        .move_leader(tessera_proto::etcdserverpb::MoveLeaderRequest { target_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "etcdserver: bad leader transferee");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_are_stable_across_restart() {
    use tessera_proto::etcdserverpb::{HashKvRequest, HashRequest};
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    for i in 0..20 {
        assert!(server
            .etcdctl(&["put", &format!("k{}", i % 7), &i.to_string()])
            .status
            .success());
    }
    assert!(server.etcdctl(&["del", "k3"]).status.success());
    assert!(server
        .etcdctl(&["compaction", "10", "--physical"])
        .status
        .success());
    let hashes = |m: &mut tessera_proto::etcdserverpb::maintenance_client::MaintenanceClient<
        tonic::transport::Channel,
    >| {
        let mut m = m.clone();
        async move {
            let kv = m
                .hash_kv(HashKvRequest { revision: 15 })
                .await
                .unwrap()
                .into_inner();
            let all = m.hash(HashRequest {}).await.unwrap().into_inner();
            (kv.hash, kv.compact_revision, all.hash)
        }
    };
    let before = hashes(&mut server.maintenance().await).await;
    server.restart().await;
    let after = hashes(&mut server.maintenance().await).await;
    assert_eq!(before, after);
    assert_eq!(before.1, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_compacts_old_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Kind::Tessera,
        dir.path(),
        &[
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1s",
        ],
    )
    .await;
    for i in 0..5 {
        assert!(server
            .etcdctl(&["put", "k", &i.to_string()])
            .status
            .success());
    }
    let mut compacted = false;
    for _ in 0..60 {
        let out = server.etcdctl(&["get", "k", "--rev=2"]);
        if String::from_utf8_lossy(&out.stderr).contains("required revision has been compacted") {
            compacted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        compacted,
        "no automatic compaction within 6 s:\n{}",
        server.log()
    );
    assert_eq!(
        stdout(&server.etcdctl(&["get", "k", "--print-value-only"])),
        "4\n"
    );
}

/// The member id and cluster id a process logs at start (etcd: "starting
/// local member"; Tessera: "opened backend"), as hex strings; the process
/// is killed once they are seen (the other members never start).
fn logged_ids(program: &str, args: &[String]) -> (String, String) {
    use std::io::BufRead;
    let mut child = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let member = v.get("local-member-id").or_else(|| v.get("member-id"));
            if let (Some(m), Some(c)) = (member, v.get("cluster-id")) {
                let _ = tx.send((
                    m.as_str().unwrap().to_string(),
                    c.as_str().unwrap().to_string(),
                ));
                return;
            }
        }
    });
    let ids = rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    ids.unwrap_or_else(|_| panic!("{program} logged no member and cluster id"))
}

#[test]
fn member_and_cluster_ids_are_etcds_for_the_same_flags() {
    let dir = tempfile::tempdir().unwrap();
    let peers: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let client = common::free_port();
    let initial = peers
        .iter()
        .zip(["a", "b", "c"])
        .map(|(p, n)| format!("{n}=http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let args = |data: &str| {
        vec![
            "--name=b".to_string(),
            format!("--data-dir={}", dir.path().join(data).display()),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-token=ids-like-etcd".to_string(),
            format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                peers[1]
            ),
            format!("--listen-peer-urls=http://127.0.0.1:{}", peers[1]),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
        ]
    };
    let mut etcd_args = args("etcd");
    etcd_args.extend([
        "--logger=zap".to_string(),
        "--log-outputs=stderr".to_string(),
    ]);
    let from_etcd = logged_ids("etcd", &etcd_args);
    let from_tessera = logged_ids(TESSERA, &args("tessera"));
    assert_eq!(from_tessera, from_etcd);
}
