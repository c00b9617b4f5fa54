//! Snapshots move both ways between Debian's etcd and tessera: the same
//! history (versions, deletes, a compaction, leases with keys, users and
//! roles, auth on) is built on both; each one's `etcdctl snapshot save` is
//! checked with `etcdctl snapshot status` and restored into the other (etcd
//! with `etcdctl snapshot restore`, tessera with `tessera snapshot-restore`);
//! the four servers then serve the same keys, revisions, leases, users,
//! roles and `endpoint hashkv`. A snapshot with a bad checksum is refused
//! and leaves nothing behind.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{stderr, stdout, Kind, Server, TESSERA};

const ROOT: &str = "--user=root:rootpw";

/// The lease of the history (ids are chosen by the server unless given).
const LEASE_ID: i64 = 0x7e57;

/// The same commands against `server`: the history every server holds.
async fn build_history(server: &Server) {
    let run = |args: &[&str]| {
        let out = server.etcdctl(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    for i in 0..5 {
        run(&["put", "/app/a", &format!("a{i}")]);
        run(&["put", &format!("/app/k{i}"), "v"]);
    }
    run(&["del", "/app/k2"]);
    let rev = server_revision(server, &[]);
    run(&["compact", &(rev - 3).to_string()]);
    let mut client = server.client().await;
    client
        .lease_grant(
            600,
            Some(etcd_client::LeaseGrantOptions::new().with_id(LEASE_ID)),
        )
        .await
        .unwrap();
    run(&["put", "/leased", "x", &format!("--lease={LEASE_ID:x}")]);
    run(&["put", "/app/a", "last"]);
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "root"],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "alice:alicepw"],
        &["role", "add", "app"],
        &[
            "role",
            "grant-permission",
            "app",
            "--prefix=true",
            "readwrite",
            "/app/",
        ],
        &["user", "grant-role", "alice", "app"],
        &["auth", "enable"],
    ] {
        run(args);
    }
}

fn server_revision(server: &Server, auth: &[&str]) -> i64 {
    let mut args = auth.to_vec();
    args.extend(["endpoint", "status", "-w", "json"]);
    let out = stdout(&server.etcdctl(&args));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[0]["Status"]["header"]["revision"].as_i64().unwrap()
}

/// What a server serves, as comparable text.
fn observed(server: &Server) -> Vec<String> {
    let run = |args: &[&str]| {
        let mut all = vec![ROOT];
        all.extend_from_slice(args);
        let out = server.etcdctl(&all);
        if out.status.success() {
            stdout(&out)
        } else {
            format!("error: {}", stderr(&out).lines().last().unwrap_or(""))
        }
    };
    let get: serde_json::Value =
        serde_json::from_str(&run(&["get", "", "--prefix", "-w", "json"])).unwrap();
    let kvs: Vec<String> = get["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            format!(
                "{} {} {} {} {} {}",
                kv["key"],
                kv["create_revision"],
                kv["mod_revision"],
                kv["version"],
                kv["value"],
                kv["lease"].as_i64().unwrap_or(0)
            )
        })
        .collect();
    let hashkv: serde_json::Value =
        serde_json::from_str(&run(&["endpoint", "hashkv", "-w", "json"])).unwrap();
    let lease = run(&["lease", "list"]);
    let lease_id = lease.lines().nth(1).unwrap_or("").trim().to_string();
    let ttl = run(&["lease", "timetolive", &lease_id, "--keys"]);
    let granted = ttl
        .split("granted with TTL(")
        .nth(1)
        .unwrap_or("")
        .split(')')
        .next()
        .unwrap_or("")
        .to_string();
    let attached = ttl.split("attached keys(").nth(1).unwrap_or("").to_string();
    vec![
        format!("revision {}", get["header"]["revision"]),
        format!("keys {}", kvs.join("; ")),
        format!(
            "hashkv {} compacted {}",
            hashkv[0]["HashKV"]["hash"], hashkv[0]["HashKV"]["compact_revision"]
        ),
        format!(
            "old revision: {}",
            run(&["get", "/app/a", "--rev=2"]).trim()
        ),
        format!(
            "leases {} ttl {granted} keys {}",
            lease.trim(),
            attached.trim()
        ),
        format!("users {}", run(&["user", "list"]).trim()),
        format!("roles {}", run(&["role", "list"]).trim()),
        format!("alice {}", run(&["user", "get", "alice"]).trim()),
        format!("app {}", run(&["role", "get", "app"]).trim()),
        format!("alice's write outside her prefix: {}", {
            let out = server.etcdctl(&["--user=alice:alicepw", "put", "/other", "x"]);
            stderr(&out).lines().last().unwrap_or("ok").to_string()
        }),
    ]
}

fn save(server: &Server, file: &Path) {
    let out = server.etcdctl(&[ROOT, "snapshot", "save", &file.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = Command::new("etcdctl")
        .args(["snapshot", "status", "-w", "json"])
        .arg(file)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "snapshot status: {}",
        stderr(&status)
    );
    let s: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(
        s["revision"].as_i64(),
        Some(server_revision(server, &[ROOT])),
        "{s}"
    );
    assert!(s["totalKey"].as_i64().unwrap() > 10, "{s}");
}

/// `tessera --data-dir DATA snapshot-restore FILE`.
fn tessera_restore(data: &Path, file: &Path) -> Output {
    Command::new(TESSERA)
        .arg(format!("--data-dir={}", data.display()))
        .arg("snapshot-restore")
        .arg(file)
        .output()
        .unwrap()
}

/// A server of `kind` whose data directory is restored from `file`.
async fn restored(kind: Kind, dir: &Path, file: &Path) -> Server {
    let mut server = Server::unstarted(kind, dir, &[], "http", &[]);
    let data = server.data_dir.display().to_string();
    let out = match kind {
        Kind::Etcd => Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(file)
            .args([
                &format!("--data-dir={data}"),
                "--name=node1",
                &format!(
                    "--initial-cluster=node1=http://127.0.0.1:{}",
                    server.peer_port
                ),
                &format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                    server.peer_port
                ),
            ])
            .output()
            .unwrap(),
        Kind::Tessera => tessera_restore(&server.data_dir, file),
    };
    assert!(
        out.status.success(),
        "{kind:?} restore: {}{}",
        stdout(&out),
        stderr(&out)
    );
    server.spawn().await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_move_both_ways_between_etcd_and_tessera() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    build_history(&etcd).await;
    build_history(&tessera).await;
    let (from_etcd, from_tessera) = (dir.path().join("etcd.db"), dir.path().join("tessera.db"));
    save(&etcd, &from_etcd);
    save(&tessera, &from_tessera);

    let want = observed(&etcd);
    assert_eq!(observed(&tessera), want, "the two histories differ");
    let etcd_from_tessera =
        restored(Kind::Etcd, &dir.path().join("etcd-restored"), &from_tessera).await;
    assert_eq!(
        observed(&etcd_from_tessera),
        want,
        "etcd restored from tessera's snapshot"
    );
    let tessera_from_etcd = restored(
        Kind::Tessera,
        &dir.path().join("tessera-restored"),
        &from_etcd,
    )
    .await;
    assert_eq!(
        observed(&tessera_from_etcd),
        want,
        "tessera restored from etcd's snapshot"
    );
    // The restored tessera takes writes, continuing the revisions.
    let put = tessera_from_etcd.etcdctl(&[ROOT, "put", "/after", "restore", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&put)).unwrap();
    assert_eq!(
        v["header"]["revision"].as_i64(),
        Some(server_revision(&etcd, &[ROOT]) + 1)
    );
}

#[test]
fn a_snapshot_with_a_bad_checksum_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]));
    let put = etcd.etcdctl(&["put", "k", "v"]);
    assert!(put.status.success(), "{}", stderr(&put));
    let file = dir.path().join("etcd.db");
    let out = etcd.etcdctl(&["snapshot", "save", &file.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xFF;
    std::fs::write(&file, &bytes).unwrap();
    let data = dir.path().join("restored");
    let out = tessera_restore(&data, &file);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "data dir created");
    // Not a snapshot at all: refused as well.
    std::fs::write(&file, b"garbage").unwrap();
    let out = tessera_restore(&data, &file);
    assert!(!out.status.success());
    assert!(!data.exists());
}
