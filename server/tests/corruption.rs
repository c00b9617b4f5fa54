//! etcd's corruption checks: one member's data is damaged on disk; with
//! `--experimental-initial-corrupt-check` it refuses to start, and without
//! it the leader's periodic check (`--experimental-corrupt-check-time`)
//! raises the CORRUPT alarm for it, after which writes are refused with
//! etcd's `etcdserver: corrupt cluster` while reads go on.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{etcdctl, stderr, stdout};

/// Rewrites, in a stopped member's RocksDB, the stored value of `key` with
/// its last byte flipped: the value a put wrote, changed under the member.
fn damage(data_dir: &Path, key: &[u8]) {
    use tessera_server::mvcc::encoding::split_version_key;
    let db = tessera_server::db::open(&tessera_server::node::db_dir(data_dir)).unwrap();
    let cf = db.cf_handle(tessera_server::db::CF_KV).unwrap();
    let mut found = None;
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if split_version_key(k).is_some_and(|(_, user, _)| user == key) {
            found = Some((k.to_vec(), v.to_vec()));
        }
        it.next();
    }
    drop(it);
    let (k, mut v) = found.expect("key not stored");
    *v.last_mut().unwrap() ^= 0x01;
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(cf, k, v, &sync).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_member_is_refused_at_start_and_raises_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(3, dir.path(), &["--experimental-corrupt-check-time=1s"]).await;
    let endpoints = c.endpoints();
    let ctl = |args: &[&str]| etcdctl(&endpoints, args, None);
    for (k, v) in [("victim", "original"), ("other", "v")] {
        let put = ctl(&["put", k, v]);
        assert_eq!(stdout(&put).trim(), "OK", "{}", stderr(&put));
    }
    for m in &c.members {
        let deadline = Instant::now() + Duration::from_secs(10);
        while stdout(&etcdctl(
            &m.endpoint(),
            &["get", "victim", "--consistency=s"],
            None,
        )) != "victim\noriginal\n"
        {
            assert!(Instant::now() < deadline, "{} never got the key", m.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Healthy members: checks run, nothing is raised.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stdout(&ctl(&["alarm", "list"])), "");

    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let v = (leader + 1) % 3;
    let list = stdout(&ctl(&["member", "list"]));
    let hex_id = list
        .lines()
        .find(|l| l.split(", ").nth(2) == Some(c.members[v].name.as_str()))
        .and_then(|l| l.split(", ").next())
        .unwrap_or_else(|| panic!("no {} in\n{list}", c.members[v].name))
        .to_string();
    let id = u64::from_str_radix(&hex_id, 16).unwrap();

    c.members[v].stop();
    damage(&c.members[v].data_dir, b"victim");

    // With the initial check, the damaged member refuses to start.
    c.members[v]
        .args
        .push("--experimental-initial-corrupt-check".into());
    c.members[v].spawn();
    let status = c.members[v].wait_exit(Duration::from_secs(30));
    let log = c.members[v].log();
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}; log:\n{log}"
    );
    assert!(
        log.contains(&format!("{hex_id} found data inconsistency with peers")),
        "{log}"
    );
    assert!(
        log.contains("found different hash values from remote peer"),
        "{log}"
    );

    // Without it, it starts; the leader's check finds it.
    c.members[v].args.pop();
    c.members[v].spawn();
    c.members[v].wait_serving().await;
    let want = format!("memberID:{id} alarm:CORRUPT");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alarms = stdout(&ctl(&["alarm", "list"]));
        if alarms.contains(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no CORRUPT alarm for {hex_id}: {alarms:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Writes are refused everywhere, with etcd's error; reads are served.
    for m in &c.members {
        let put = etcdctl(&m.endpoint(), &["put", "after", "alarm"], None);
        assert!(!put.status.success(), "{}", stdout(&put));
        assert!(
            stderr(&put).contains("etcdserver: corrupt cluster"),
            "{}",
            stderr(&put)
        );
    }
    let get = ctl(&["get", "other"]);
    assert_eq!(stdout(&get), "other\nv\n", "{}", stderr(&get));
}
