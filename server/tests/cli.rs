//! The `tessera` binary's command line: etcd's flags, one-line errors,
//! accepted-but-ignored flags, the ready line, and snapshot restore.

mod common;

use std::process::Command;

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
        &[
            "--enable-pprof",
            "--snapshot-count=5000",
            "--wal-dir=/tmp/ignored",
        ],
    )
    .await;
    let log = server.log();
    assert!(log.contains("ready to serve client requests"), "{log}");
    assert!(
        log.contains("--enable-pprof") && log.contains("--wal-dir"),
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
    let mut child = Command::new(TESSERA)
        .env("ETCD_NAME", "envnode")
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
