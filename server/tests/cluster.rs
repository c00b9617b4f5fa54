//! Three-member clusters of the real binary, started with etcd's flags:
//! replication through every member, failover after SIGKILL, catch-up by
//! log and by snapshot, no writes without a majority, and the etcdctl
//! membership workflow.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, Member};
use common::{etcdctl, status_text, stderr, stdout};
use etcd_client::GetOptions;

/// etcd's default --election-timeout, which the clusters here use.
const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);

async fn count(member: &Member, prefix: &str, serializable: bool) -> Option<usize> {
    let mut client = member.client().await;
    let mut opts = GetOptions::new().with_prefix().with_count_only();
    if serializable {
        opts = opts.with_serializable();
    }
    let resp = client.get(prefix, Some(opts)).await.ok()?;
    Some(resp.count() as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_fail_over_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    // A small snapshot count, so the log behind a stopped member is purged.
    let mut c = Cluster::start(3, dir.path(), &["--snapshot-count=100"]).await;

    // Writes through every member; linearizable reads on every member see all.
    for (i, m) in c.members.iter().enumerate() {
        m.client()
            .await
            .put(format!("via/{i}"), "x", None)
            .await
            .unwrap_or_else(|e| panic!("put through {}: {e}", m.name));
    }
    for m in &c.members {
        assert_eq!(count(m, "via/", false).await, Some(3), "on {}", m.name);
    }

    // SIGKILL the leader: another is elected within 3 election timeouts.
    let old = c.wait_leader(Duration::from_secs(10)).await;
    c.members[old].kill();
    let killed = Instant::now();
    let new = c.wait_leader(Duration::from_secs(30)).await;
    let took = killed.elapsed();
    assert_ne!(new, old);
    assert!(
        took <= ELECTION_TIMEOUT * 3,
        "new leader after {took:?}, more than 3 election timeouts"
    );

    // Writes continue on the majority, through the follower too.
    let follower = (0..3).find(|&i| i != old && i != new).unwrap();
    for (n, i) in (0..300).zip([new, follower].into_iter().cycle()) {
        c.members[i]
            .client()
            .await
            .put(format!("bulk/{n:03}"), "v", None)
            .await
            .unwrap_or_else(|e| panic!("put {n} through {}: {e}", c.members[i].name));
    }

    // The killed member restarts and catches up; its log was purged on the
    // leader, so through a snapshot.
    c.restart(old).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&c.members[old], "bulk/", true).await != Some(300) {
        assert!(
            Instant::now() < deadline,
            "restarted member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.members[old]
            .log()
            .contains("installed a snapshot from the leader"),
        "caught up without a snapshot; log:\n{}",
        c.members[old].log()
    );
    // A write through the restarted member works again.
    c.members[old]
        .client()
        .await
        .put("back", "1", None)
        .await
        .unwrap();

    // With the majority down, writes fail with etcd's error and
    // serializable reads still answer.
    let survivor = old;
    for i in 0..3 {
        if i != survivor {
            c.members[i].kill();
        }
    }
    let mut client = c.members[survivor].client().await;
    let err = client.put("during", "outage", None).await.unwrap_err();
    assert_eq!(
        status_text(err),
        "Unavailable: etcdserver: request timed out"
    );
    assert_eq!(count(&c.members[survivor], "bulk/", true).await, Some(300));
}

fn quoted_value<'a>(text: &'a str, var: &str) -> &'a str {
    let start = text
        .find(&format!("{var}=\""))
        .unwrap_or_else(|| panic!("no {var} in:\n{text}"))
        + var.len()
        + 2;
    let len = text[start..].find('"').unwrap();
    &text[start..start + len]
}

/// Whether etcdctl printed `words` (it pads ids with spaces to 16 places).
fn says(output: &str, words: &str) -> bool {
    let flat = output.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.contains(words)
}

fn member_line<'a>(list: &'a str, name: &str) -> Option<&'a str> {
    list.lines().find(|l| l.split(", ").nth(2) == Some(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_membership_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(3, dir.path(), &[]).await;
    let endpoints = c.endpoints();
    let ctl = |args: &[&str]| etcdctl(&endpoints, args, None);

    // Members publish their names right after they start.
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = stdout(&ctl(&["member", "list"]));
        if !list.contains("unstarted") || Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(list.lines().count(), 3, "{list}");
    for m in &c.members {
        let line =
            member_line(&list, &m.name).unwrap_or_else(|| panic!("{} missing:\n{list}", m.name));
        assert!(
            line.contains(&m.peer_url()) && line.contains(&m.url()),
            "{line}"
        );
        assert!(
            line.contains("started") && line.ends_with("false"),
            "{line}"
        );
    }

    // Add a learner; start it the way etcdctl says.
    let mut m4 = Member::new("m4", dir.path());
    let peer_flag = format!("--peer-urls={}", m4.peer_url());
    let added = ctl(&["member", "add", "m4", &peer_flag, "--learner"]);
    let out = stdout(&added);
    assert!(added.status.success(), "{}", stderr(&added));
    assert!(out.contains(" added to cluster "), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(quoted_value(&out, "ETCD_NAME"), "m4");
    assert_eq!(quoted_value(&out, "ETCD_INITIAL_CLUSTER_STATE"), "existing");
    let initial_cluster = quoted_value(&out, "ETCD_INITIAL_CLUSTER").to_string();
    assert_eq!(initial_cluster.split(',').count(), 4, "{initial_cluster}");
    m4.configure(&initial_cluster, "existing", &[]);
    m4.spawn();
    m4.wait_serving().await;

    // It shows up started, as a learner, and catches up; then is promoted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        let list = stdout(&ctl(&["member", "list"]));
        let line = member_line(&list, "m4").map(str::to_string);
        if let Some(line) = line {
            assert!(line.starts_with(&id) && line.ends_with("true"), "{line}");
            let p = ctl(&["member", "promote", &id]);
            if p.status.success() {
                break stdout(&p);
            }
            assert!(
                stderr(&p)
                    .contains("can only promote a learner member which is in sync with leader"),
                "{}",
                stderr(&p)
            );
        }
        assert!(
            Instant::now() < deadline,
            "m4 never became promotable:\n{list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        says(&promoted, &format!("Member {id} promoted in cluster")),
        "{promoted}"
    );
    let again = ctl(&["member", "promote", &id]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("etcdserver: can only promote a learner member"),
        "{}",
        stderr(&again)
    );
    let missing = ctl(&["member", "remove", "1234"]);
    assert!(
        stderr(&missing).contains("etcdserver: member not found"),
        "{}",
        stderr(&missing)
    );

    // Move the leadership to the new member.
    let all = format!("{endpoints},{}", m4.endpoint());
    let moved = etcdctl(&all, &["move-leader", &id], None);
    assert!(moved.status.success(), "{}", stderr(&moved));
    assert!(
        stdout(&moved).contains("Leadership transferred from ")
            && stdout(&moved).contains(&format!("to {id}")),
        "{}",
        stdout(&moved)
    );
    let status = m4.status().await.unwrap();
    assert_eq!(status.leader, status.header.unwrap().member_id);

    // Remove an original member; the cluster goes on with the others.
    let list = stdout(&ctl(&["member", "list"]));
    let m1_id = member_line(&list, "m1")
        .unwrap()
        .split(", ")
        .next()
        .unwrap()
        .to_string();
    let removed = ctl(&["member", "remove", &m1_id]);
    assert!(
        says(
            &stdout(&removed),
            &format!("Member {m1_id} removed from cluster")
        ),
        "{}{}",
        stdout(&removed),
        stderr(&removed)
    );
    let updated = etcdctl(
        &m4.endpoint(),
        &[
            "member",
            "update",
            &id,
            &format!("--peer-urls={}", m4.peer_url()),
        ],
        None,
    );
    assert!(
        says(
            &stdout(&updated),
            &format!("Member {id} updated in cluster")
        ),
        "{}{}",
        stdout(&updated),
        stderr(&updated)
    );
    let list = stdout(&etcdctl(&m4.endpoint(), &["member", "list"], None));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(member_line(&list, "m1").is_none(), "{list}");
    let put = etcdctl(
        &c.members[1].endpoint(),
        &["put", "after", "membership"],
        None,
    );
    assert_eq!(stdout(&put).trim(), "OK", "{}", stderr(&put));
}

/// etcd's documented way to grow a cluster: `member add` a voter that has
/// not started yet answers at once, the cluster keeps serving with 3 of 4
/// up, and the new member then joins with `--initial-cluster-state existing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voter_added_before_it_starts_is_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(3, dir.path(), &[]).await;
    let endpoints = c.endpoints();
    let ctl = |args: &[&str]| etcdctl(&endpoints, args, None);
    assert_eq!(stdout(&ctl(&["put", "before", "1"])).trim(), "OK");

    let mut m4 = Member::new("m4", dir.path());
    let peer_flag = format!("--peer-urls={}", m4.peer_url());
    // Until m4 starts, its peer port takes connections and never answers,
    // like a host that is up but not running etcd yet.
    let silent = std::net::TcpListener::bind(("127.0.0.1", m4.peer_port)).unwrap();
    // Asked of a follower, which forwards it to the leader.
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let follower = c.members[(leader + 1) % 3].endpoint();
    let started = Instant::now();
    let added = etcdctl(&follower, &["member", "add", "m4", &peer_flag], None);
    let took = started.elapsed();
    assert!(added.status.success(), "{}", stderr(&added));
    assert!(took < Duration::from_secs(3), "member add took {took:?}");
    let out = stdout(&added);
    assert!(out.contains(" added to cluster "), "{out}");
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    let list = stdout(&ctl(&["member", "list"]));
    let line = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} missing:\n{list}"));
    assert!(
        line.contains("unstarted") && line.ends_with("false"),
        "{line}"
    );

    // Three of four voters are a quorum: writes go on.
    for i in 0..5 {
        let put = ctl(&["put", &format!("while-unstarted/{i}"), "v"]);
        assert_eq!(stdout(&put).trim(), "OK", "{}", stderr(&put));
    }

    // The new member starts the way etcdctl told and catches up.
    let initial_cluster = quoted_value(&out, "ETCD_INITIAL_CLUSTER").to_string();
    drop(silent);
    m4.configure(&initial_cluster, "existing", &[]);
    m4.spawn();
    m4.wait_serving().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = etcdctl(
            &m4.endpoint(),
            &[
                "get",
                "while-unstarted/",
                "--prefix",
                "--keys-only",
                "--consistency=s",
            ],
            None,
        );
        if stdout(&got).lines().filter(|l| !l.is_empty()).count() == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "m4 never caught up: {}",
            stdout(&got)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list = stdout(&ctl(&["member", "list"]));
    let line = member_line(&list, "m4").unwrap_or_else(|| panic!("m4 missing:\n{list}"));
    assert!(line.starts_with(&id) && line.contains("started"), "{line}");
    let put = etcdctl(&m4.endpoint(), &["put", "after", "join"], None);
    assert_eq!(stdout(&put).trim(), "OK", "{}", stderr(&put));
}

/// A simple token names the log index of the Authenticate entry that made
/// it; a member that has not applied that entry yet waits for it instead of
/// answering `invalid auth token` (etcd's `isValidSimpleToken`). A client
/// that re-authenticates through one member and writes through another that
/// was paused, or has just restarted, is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_waits_for_the_authenticate_entry_of_a_token() {
    use tessera_proto::etcdserverpb::auth_client::AuthClient;
    use tessera_proto::etcdserverpb::kv_client::KvClient;
    use tessera_proto::etcdserverpb::{AuthenticateRequest, PutRequest};

    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(3, dir.path(), &[]).await;
    let endpoints = c.endpoints();
    // Status needs a user once auth is on: find the leader first.
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let out = etcdctl(&endpoints, args, None);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let behind = &c.members[(leader + 1) % 3];
    let serving = &c.members[(leader + 2) % 3];

    // The token is made while `behind` is paused: it has not applied it.
    behind.signal("STOP");
    let token = AuthClient::new(common::channel(&serving.url()))
        .authenticate(AuthenticateRequest {
            name: "root".into(),
            password: "rootpw".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    // The put reaches `behind` first thing after it resumes, before the
    // leader's next append: it must wait for the entry, not refuse.
    let mut put = tonic::Request::new(PutRequest {
        key: b"with-token".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    });
    put.metadata_mut().insert("token", token.parse().unwrap());
    let mut kv = KvClient::new(common::channel(&behind.url()));
    let pending = tokio::spawn(async move { kv.put(put).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    behind.signal("CONT");
    let answer = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("put never answered")
        .unwrap();
    assert!(answer.is_ok(), "{answer:?}");

    // A token that no Authenticate entry made is still refused.
    let mut kv = KvClient::new(common::channel(&behind.url()));
    let mut stale = tonic::Request::new(PutRequest {
        key: b"k".to_vec(),
        ..Default::default()
    });
    stale
        .metadata_mut()
        .insert("token", "AbCdEfGhIjKlMnOp.1".parse().unwrap());
    let err = kv.put(stale).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(err.message(), "etcdserver: invalid auth token");
}
