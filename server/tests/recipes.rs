//! Lock and Election: `etcdctl lock` and `etcdctl elect` with two
//! contenders, and the same through the `etcd-client` crate. Every scenario
//! runs against Debian's etcd too, so the test checks the scenario itself.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{status_text, Kind, Server};
use etcd_client::{GetOptions, LockOptions, ProclaimOptions, ResignOptions};

/// A long-running etcdctl whose stdout lines arrive on a channel.
struct Background {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Background {
    fn start(server: &Server, args: &[&str]) -> Background {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", server.endpoint()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Background { child, lines }
    }

    fn line(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }

    /// SIGTERM, the way a user stops etcdctl; it revokes its session lease.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SHORT: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(10);

fn etcdctl_lock_scenario(server: &Server) {
    let mut first = Background::start(server, &["lock", "mutex1"]);
    let key1 = first.line(LONG).expect("first contender gets the lock");
    assert!(key1.starts_with("mutex1/"), "{key1}");
    let second = Background::start(server, &["lock", "mutex1"]);
    assert_eq!(second.line(SHORT), None, "second contender must wait");
    first.stop();
    let key2 = second
        .line(LONG)
        .expect("second gets the lock once released");
    assert!(key2.starts_with("mutex1/") && key2 != key1, "{key2}");
    // With a command, etcdctl runs it while holding the lock.
    let waiting = std::thread::spawn({
        let endpoint = server.endpoint();
        move || common::etcdctl(&endpoint, &["lock", "mutex1", "echo", "ran"], None)
    });
    std::thread::sleep(SHORT);
    assert!(!waiting.is_finished(), "lock with a command must wait too");
    drop(second);
    let out = waiting.join().unwrap();
    assert_eq!(common::stdout(&out), "ran\n", "{out:?}");
}

fn etcdctl_elect_scenario(server: &Server) {
    let observer = Background::start(server, &["elect", "-l", "election1"]);
    let mut alice = Background::start(server, &["elect", "election1", "alice"]);
    assert_eq!(
        alice
            .line(LONG)
            .as_deref()
            .map(|k| k.starts_with("election1/")),
        Some(true)
    );
    assert_eq!(alice.line(LONG).as_deref(), Some("alice"));
    let bob = Background::start(server, &["elect", "election1", "bob"]);
    assert_eq!(bob.line(SHORT), None, "bob waits while alice leads");
    assert!(observer.line(LONG).unwrap().starts_with("election1/"));
    assert_eq!(observer.line(LONG).as_deref(), Some("alice"));
    alice.stop();
    assert!(bob.line(LONG).unwrap().starts_with("election1/"));
    assert_eq!(bob.line(LONG).as_deref(), Some("bob"));
    assert!(observer.line(LONG).unwrap().starts_with("election1/"));
    assert_eq!(observer.line(LONG).as_deref(), Some("bob"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_elect_with_two_contenders() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Etcd, Kind::Tessera] {
        let server = Server::start(kind, &dir.path().join(format!("{kind:?}")), &[]).await;
        tokio::task::block_in_place(|| {
            etcdctl_lock_scenario(&server);
            etcdctl_elect_scenario(&server);
        });
    }
}

/// Lock, election and their errors through the crate; returns observations.
async fn client_scenario(server: &Server) -> Vec<String> {
    let mut seen = Vec::new();
    let mut c = server.client().await;
    let l1 = c.lease_grant(30, None).await.unwrap().id();
    let l2 = c.lease_grant(30, None).await.unwrap().id();
    let held = c
        .lock("m", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    let key = String::from_utf8(held.key().to_vec()).unwrap();
    seen.push(format!(
        "lock key is name/lease-hex: {}",
        key == format!("m/{l1:x}")
    ));
    let mut c2 = c.clone();
    let waiter = tokio::spawn(async move {
        c2.lock("m", Some(LockOptions::new().with_lease(l2)))
            .await
            .map(|r| r.key().to_vec())
    });
    tokio::time::sleep(SHORT).await;
    seen.push(format!("second waits: {}", !waiter.is_finished()));
    c.lease_revoke(l1).await.unwrap(); // the holder's lease ends: lock passes on
    let key2 = waiter.await.unwrap().unwrap();
    seen.push(format!(
        "second acquires: {}",
        key2 == format!("m/{l2:x}").into_bytes()
    ));
    c.unlock(key2).await.unwrap();
    let left = c
        .get("m/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    seen.push(format!("unlock removes the key: {}", left.kvs().is_empty()));

    seen.push(format!(
        "leader of empty election: {:?}",
        c.leader("e").await.map(|_| ()).map_err(status_text)
    ));
    let won = c.campaign("e", "v1", l2).await.unwrap();
    let leader = won.leader().unwrap().clone();
    seen.push(format!(
        "campaign: key e/lease-hex {} lease {}",
        leader.key() == format!("e/{l2:x}").as_bytes(),
        leader.lease() == l2
    ));
    let mut observe = c.observe("e").await.unwrap();
    let first = observe.message().await.unwrap().unwrap();
    seen.push(format!(
        "observe first: {:?}",
        first.kv().map(|kv| kv.value_str().unwrap().to_string())
    ));
    c.proclaim(
        "v2",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .unwrap();
    let update = observe.message().await.unwrap().unwrap();
    seen.push(format!(
        "observe proclaim: {:?}",
        update.kv().map(|kv| kv.value_str().unwrap().to_string())
    ));
    let current = c.leader("e").await.unwrap();
    seen.push(format!(
        "leader value: {:?}",
        current.kv().map(|kv| kv.value_str().unwrap().to_string())
    ));
    c.resign(Some(ResignOptions::new().with_leader(leader.clone())))
        .await
        .unwrap();
    let stale = c
        .proclaim("v3", Some(ProclaimOptions::new().with_leader(leader)))
        .await;
    seen.push(format!(
        "proclaim after resign: {:?}",
        stale.map(|_| ()).map_err(status_text)
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_through_the_client_crate_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    let want = client_scenario(&etcd).await;
    let got = client_scenario(&tessera).await;
    assert_eq!(got, want);
    assert!(!want.iter().any(|l| l.ends_with("false")), "{want:#?}");
}
