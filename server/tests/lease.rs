//! Leases: the same script through the `etcd-client` crate against Debian's
//! etcd and tessera must observe the same things; expiry deletes every key
//! of a lease in one revision; leases survive SIGKILL with etcd's restart
//! semantics; etcdctl's lease commands work.

mod common;

use std::time::{Duration, Instant};

use common::{stdout, Kind, Server};
use etcd_client::{
    Client, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
    WatchOptions,
};

/// "Code: message" of a failed call, or "ok".
fn outcome<T>(r: Result<T, etcd_client::Error>) -> String {
    r.map_or_else(common::status_text, |_| "ok".into())
}

async fn keys(c: &mut Client, prefix: &str) -> Vec<String> {
    let r = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| format!("{}@lease{}", kv.key_str().unwrap(), kv.lease()))
        .collect()
}

async fn rev(c: &mut Client) -> i64 {
    c.get("\0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// Runs the lease script, returning what it observed, line by line.
async fn lease_script(c: &mut Client) -> Vec<String> {
    let mut seen = Vec::new();
    let grant = |ttl, id| (ttl, Some(LeaseGrantOptions::new().with_id(id)));

    let (ttl, opts) = grant(30, 100);
    let g = c.lease_grant(ttl, opts).await.unwrap();
    seen.push(format!("grant 100: id {} ttl {}", g.id(), g.ttl()));
    let (ttl, opts) = grant(1, 101);
    let g = c.lease_grant(ttl, opts).await.unwrap();
    seen.push(format!("grant 101 ttl 1: ttl {} (minimum)", g.ttl()));
    let (ttl, opts) = grant(30, 100);
    seen.push(format!(
        "grant 100 again: {}",
        outcome(c.lease_grant(ttl, opts).await)
    ));
    let (ttl, opts) = grant(9_000_000_001, 102);
    seen.push(format!(
        "grant huge ttl: {}",
        outcome(c.lease_grant(ttl, opts).await)
    ));
    let auto = c.lease_grant(45, None).await.unwrap();
    seen.push(format!(
        "grant auto: id>0 {} ttl {}",
        auto.id() > 0,
        auto.ttl()
    ));

    let before = rev(c).await;
    for (k, lease) in [("l/a", 100), ("l/b", 100), ("l/c", auto.id())] {
        c.put(k, "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
    }
    c.put("l/b", "v2", None).await.unwrap(); // detaches l/b
    c.put("l/c", "v2", Some(PutOptions::new().with_lease(100)))
        .await
        .unwrap(); // moves l/c to lease 100
    seen.push(format!("puts made {} revisions", rev(c).await - before));
    seen.push(format!(
        "put with missing lease: {}",
        outcome(
            c.put("l/x", "v", Some(PutOptions::new().with_lease(999)))
                .await
        )
    ));

    let ttl = c
        .lease_time_to_live(100, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    let mut attached: Vec<String> = ttl
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    attached.sort();
    seen.push(format!(
        "ttl 100: granted {} remaining in 28..=30 {} keys {attached:?}",
        ttl.granted_ttl(),
        (28..=30).contains(&ttl.ttl())
    ));
    let missing = c.lease_time_to_live(999, None).await.unwrap();
    seen.push(format!("ttl 999: {}", missing.ttl()));

    let mut listed: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    listed.sort();
    let mut expected = vec![100, 101, auto.id()];
    expected.sort();
    seen.push(format!("leases listed: {}", listed == expected));

    let (mut keeper, mut stream) = c.lease_keep_alive(100).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let resp = stream.message().await.unwrap().unwrap();
    seen.push(format!(
        "keepalive 100: id {} ttl {}",
        resp.id(),
        resp.ttl()
    ));
    // The server answers TTL 0 for a lease it does not have; the crate
    // turns that first answer into an error.
    let missing = c.lease_keep_alive(999).await.map(|_| ());
    seen.push(format!("keepalive 999: {missing:?}"));

    let before = rev(c).await;
    let revoked = c.lease_revoke(100).await.unwrap();
    let after = rev(c).await;
    seen.push(format!(
        "revoke 100: {} revision(s), header at new revision {}",
        after - before,
        revoked.header().unwrap().revision() == after
    ));
    seen.push(format!("keys left: {:?}", keys(c, "l/").await));
    seen.push(format!(
        "revoke 100 again: {}",
        outcome(c.lease_revoke(100).await)
    ));
    seen.push(format!(
        "ttl 100 after revoke: {}",
        c.lease_time_to_live(100, None).await.unwrap().ttl()
    ));
    let before = rev(c).await;
    c.lease_revoke(auto.id()).await.unwrap();
    seen.push(format!(
        "revoking a lease without keys: {} revision(s)",
        rev(c).await - before
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_api_matches_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    let want = lease_script(&mut etcd.client().await).await;
    let got = lease_script(&mut tessera.client().await).await;
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "tessera differs from etcd");
    }
    assert_eq!(got.len(), want.len());
    // Sanity: the script exercised what it claims to.
    assert!(want.iter().any(|l| l.contains("NotFound")), "{want:#?}");
    assert!(want.iter().any(|l| l.contains("already exists")));
}

/// Waits until `prefix` has no keys (at most `limit`).
async fn wait_gone(c: &mut Client, prefix: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while !keys(c, prefix).await.is_empty() {
        assert!(start.elapsed() < limit, "keys under {prefix} never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_deletes_all_keys_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let mut c = server.client().await;
    let lease = c.lease_grant(2, None).await.unwrap().id();
    for k in ["exp/1", "exp/2", "exp/3"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
    }
    c.put("exp/kept", "v", None).await.unwrap();
    let mut watch = c
        .watch("exp/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    wait_gone(&mut c, "exp/1", Duration::from_secs(10)).await;
    let mut deleted = Vec::new();
    while deleted.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("delete events")
            .unwrap()
            .unwrap();
        let revision = resp.header().unwrap().revision();
        for ev in resp.events() {
            assert_eq!(ev.event_type(), EventType::Delete);
            deleted.push((revision, ev.kv().unwrap().key_str().unwrap().to_string()));
        }
    }
    assert!(
        deleted.iter().all(|(r, _)| *r == deleted[0].0),
        "all in one revision: {deleted:?}"
    );
    let names: Vec<_> = deleted.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(names, ["exp/1", "exp/2", "exp/3"], "deleted in key order");
    assert_eq!(keys(&mut c, "exp/").await, vec!["exp/kept@lease0"]);
    assert_eq!(c.lease_time_to_live(lease, None).await.unwrap().ttl(), -1);
    assert!(c.leases().await.unwrap().leases().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_holds_a_lease_past_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let mut c = server.client().await;
    let lease = c.lease_grant(2, None).await.unwrap().id();
    c.put("held", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.unwrap();
    for _ in 0..8 {
        keeper.keep_alive().await.unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 2);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(keys(&mut c, "held").await.len(), 1, "alive after 4 s");
    drop(keeper);
    wait_gone(&mut c, "held", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_sigkill_with_a_fresh_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let mut c = server.client().await;
    let long = c
        .lease_grant(600, Some(LeaseGrantOptions::new().with_id(7)))
        .await
        .unwrap()
        .id();
    let short = c.lease_grant(3, None).await.unwrap().id();
    c.put("r/long", "v", Some(PutOptions::new().with_lease(long)))
        .await
        .unwrap();
    c.put("r/short", "v", Some(PutOptions::new().with_lease(short)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    let mut c = server.client().await;
    // etcd without checkpoints: the restarted leader gives each lease its
    // whole TTL again (plus an election timeout).
    let ttl = c
        .lease_time_to_live(short, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 3);
    assert!(ttl.ttl() >= 2, "fresh TTL after restart, got {}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"r/short".to_vec()]);
    let waited = wait_gone(&mut c, "r/short", Duration::from_secs(15)).await;
    assert!(waited >= Duration::from_secs(1), "expired too early");
    assert_eq!(keys(&mut c, "r/").await, vec!["r/long@lease7"]);
    c.lease_revoke(long).await.unwrap();
    assert!(keys(&mut c, "r/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lease_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let out = stdout(&server.etcdctl(&["lease", "grant", "100"]));
    // "lease 694d7b3c5e6b1a2f granted with TTL(100s)"
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert_eq!(out, format!("lease {id} granted with TTL(100s)\n"));
    let o = server.etcdctl(&["put", "--lease", &id, "k1", "v"]);
    assert_eq!(stdout(&o), "OK\n", "{o:?}");
    server.etcdctl(&["put", "--lease", &id, "k2", "v"]);
    let out = stdout(&server.etcdctl(&["lease", "timetolive", "--keys", &id]));
    assert!(
        out.starts_with(&format!("lease {id} granted with TTL(100s), remaining(")),
        "{out}"
    );
    assert!(out.ends_with("attached keys([k1 k2])\n"), "{out}");
    let out = stdout(&server.etcdctl(&["lease", "list"]));
    assert_eq!(out, format!("found 1 leases\n{id}\n"));
    let out = stdout(&server.etcdctl(&["lease", "keep-alive", "--once", &id]));
    assert_eq!(out, format!("lease {id} keepalived with TTL(100)\n"));
    let out = stdout(&server.etcdctl(&["lease", "revoke", &id]));
    assert_eq!(out, format!("lease {id} revoked\n"));
    let out = stdout(&server.etcdctl(&["get", "--prefix", "k"]));
    assert_eq!(out, "");
    let out = stdout(&server.etcdctl(&["lease", "timetolive", &id]));
    assert_eq!(out, format!("lease {id} already expired\n"));
    let o = server.etcdctl(&["lease", "revoke", &id]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o)
            .ends_with("Error: failed to revoke lease (etcdserver: requested lease not found)\n"),
        "{o:?}"
    );
}
