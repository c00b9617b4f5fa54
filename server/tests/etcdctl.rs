//! etcdctl (Debian's etcd-client) against the real binaries: the same script
//! runs against Debian's etcd and tessera and the outputs must be identical
//! once endpoint, ids and timings are masked; key outputs are also asserted
//! literally.

mod common;

use std::time::Duration;

use common::{stderr, stdout, Kind, Server};

/// Masks what legitimately differs between two servers.
fn normalize(s: &str, server: &Server) -> String {
    let mut out = s.replace(&server.endpoint(), "<endpoint>");
    for field in ["cluster_id", "member_id", "raft_term"] {
        let pat = format!("\"{field}\":");
        let mut result = String::new();
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&pat) {
            result.push_str(&rest[..i + pat.len()]);
            rest = rest[i + pat.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
            result.push('0');
        }
        result.push_str(rest);
        out = result;
    }
    if let Some(i) = out.find("took = ") {
        let end = out[i..].find('\n').map_or(out.len(), |e| i + e);
        out.replace_range(i..end, "took = X");
    }
    out
}

struct Step {
    args: Vec<String>,
    stdin: Option<&'static str>,
}

fn step(args: &str) -> Step {
    Step {
        args: args.split_whitespace().map(String::from).collect(),
        stdin: None,
    }
}

fn step_stdin(args: &str, stdin: &'static str) -> Step {
    Step {
        stdin: Some(stdin),
        ..step(args)
    }
}

/// (stdout, stderr-without-log-lines, success) of one step, normalized.
fn run(server: &Server, s: &Step) -> (String, String, bool) {
    let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
    let out = match s.stdin {
        Some(input) => server.etcdctl_stdin(&args, input),
        None => server.etcdctl(&args),
    };
    // etcdctl's JSON log lines carry timestamps; keep only real messages.
    let err: String = stderr(&out)
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    (
        normalize(&stdout(&out), server),
        normalize(&err, server),
        out.status.success(),
    )
}

const TXN_INTERACTIVE: &str = "value(\"foo\") = \"bar-again\"\nversion(\"zoo\") = \"1\"\ncreate(\"foo1\") > \"0\"\nmod(\"foo2\") > \"1\"\n\nput txnkey ok\nget foo\n\nput txnkey failed\n\n";
const TXN_FAILING: &str =
    "value(\"foo\") = \"nope\"\n\nput txnkey ok\n\nget foo --prefix\nput txnkey else\n\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_outputs_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    let snap = |name: &str| dir.path().join(name).display().to_string();

    let script = vec![
        step("put foo bar"),
        step("put foo1 bar1"),
        step("put foo2 bar2"),
        step("put zoo zval"),
        step("put foo bar-again"),
        step("get foo"),
        step("get foo --prefix"),
        step("get foo --from-key"),
        step("get foo --prefix --limit=2"),
        step("get foo --rev=2"),
        step("get foo --prefix --sort-by=MODIFY --order=DESCEND"),
        step("get foo --prefix --sort-by=VALUE --order=ASCEND"),
        step("get foo --prefix --sort-by=CREATE --order=DESCEND --limit=2"),
        step("get foo --prefix --keys-only"),
        step("get foo --prefix --print-value-only"),
        step("get foo --prefix -w json"),
        step("get foo --prefix --count-only -w json"),
        step("put foo again --prev-kv"),
        step_stdin("txn -i", TXN_INTERACTIVE),
        step_stdin("txn", TXN_FAILING),
        step("get txnkey -w json"),
        step("del foo1 --prev-kv"),
        step("del nothing"),
        step("del foo --prefix"),
        step("del z --from-key --prev-kv"),
        step("put a 1"),
        step("put a 2"),
        step("put b 3"),
        step("compaction 3"),
        step("compaction 5 --physical"),
        step("compaction 4"),
        step("get a --rev=2"),
        step("get a --rev=99"),
        step("get a --rev=5 -w json"),
        step("alarm list"),
        step("alarm disarm"),
        step("defrag"),
        step("get a -w json"),
        step("endpoint health"),
    ];
    for (i, s) in script.iter().enumerate() {
        let expected = run(&etcd, s);
        let actual = run(&tessera, s);
        assert_eq!(
            actual, expected,
            "step {i}: etcdctl {:?} differs (left tessera, right etcd)",
            s.args
        );
    }

    // the same history gives the same HashKV as etcd (let etcd commit its
    // compaction first: its HashKV reads only committed data)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (eh, _, eok) = run(&etcd, &step("endpoint hashkv"));
    let (th, _, tok) = run(&tessera, &step("endpoint hashkv"));
    assert!(eok && tok);
    assert_eq!(th, eh, "HashKV differs from etcd's");

    // a few outputs spelled out, so a change on both sides cannot hide
    assert_eq!(run(&tessera, &step("get a --print-value-only")).0, "2\n");
    assert_eq!(run(&tessera, &step("get a")).0, "a\n2\n");
    // the failure branch: an empty `get foo --prefix`, then the put
    assert_eq!(
        run(&tessera, &step_stdin("txn", TXN_FAILING)).0,
        "FAILURE\n\n\nOK\n"
    );
    assert_eq!(
        run(&tessera, &step("get a --rev=2")).1,
        "Error: etcdserver: mvcc: required revision has been compacted\n"
    );
    assert_eq!(
        run(&tessera, &step("defrag")).0,
        "Finished defragmenting etcd member[<endpoint>]\n"
    );

    // snapshots: etcdctl accepts the stream and reports the file
    let (out, err, ok) = run(&tessera, &step(&format!("snapshot save {}", snap("t.db"))));
    assert!(ok, "{err}");
    assert_eq!(out, format!("Snapshot saved at {}\n", snap("t.db")));

    // member list and endpoint status: ids differ, the shape must not
    let (members, _, ok) = run(&tessera, &step("member list"));
    assert!(ok);
    let fields: Vec<&str> = members.trim_end().split(", ").collect();
    assert_eq!(fields.len(), 6, "{members}");
    assert_eq!(
        &fields[1..],
        &[
            "started",
            "node1",
            &format!("http://127.0.0.1:{}", tessera.peer_port),
            "http://<endpoint>",
            "false"
        ]
    );
    let (status, _, ok) = run(&tessera, &step("endpoint status"));
    assert!(ok);
    let fields: Vec<&str> = status.trim_end().split(", ").collect();
    assert_eq!(fields[0], "<endpoint>");
    assert_eq!(fields[1], fields_member_id(&members));
    assert!(fields[2].starts_with("3.5."), "version {status}");
    assert_eq!(
        &fields[4..6],
        &["true", "false"],
        "leader, learner: {status}"
    );
}

/// etcdctl dials each member on its own for `endpoint status` and `endpoint
/// health --cluster`, and then sends the endpoint URL as `:authority`
/// (`http://127.0.0.1:2379`), which is not a valid authority: etcd serves it
/// anyway, and so must tessera.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_commands_with_url_endpoints_work_as_on_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    for server in [&etcd, &tessera] {
        let members = stdout(&server.etcdctl(&["member", "list"]));
        let id = fields_member_id(&members);
        for (endpoint, args) in [
            (server.url(), &["endpoint", "status"][..]),
            (server.endpoint(), &["endpoint", "status", "--cluster"][..]),
            (server.endpoint(), &["endpoint", "health", "--cluster"][..]),
        ] {
            let out = common::etcdctl(&endpoint, args, None);
            // etcdctl 3.4 prints health to stderr.
            let text = stdout(&out) + &stderr(&out);
            let url = server.url();
            assert!(
                text.starts_with(&format!("{url}, {id}, "))
                    || text.starts_with(&format!("{url} is healthy")),
                "{:?} {args:?}: {text}",
                server.kind
            );
            assert!(
                !text.contains("Failed"),
                "{:?} {args:?}: {text}",
                server.kind
            );
        }
    }
}

/// `etcdctl check datascale` measures memory through `/metrics`
/// (`process_resident_memory_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_datascale_reads_memory_from_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let tessera = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let out = tessera.etcdctl(&["check", "datascale", "--load=s"]);
    let text = stdout(&out) + &stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("PASS: Approximate system memory used"),
        "{text}"
    );
}

fn fields_member_id(members: &str) -> &str {
    members.split(", ").next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_blocks_writes_until_disarmed() {
    let dir = tempfile::tempdir().unwrap();
    let tessera = Server::start(
        Kind::Tessera,
        dir.path(),
        &["--quota-backend-bytes=2000000"],
    )
    .await;
    let big = "x".repeat(100_000); // argv strings are limited to 128 KiB
    let mut hit = None;
    for i in 0..100 {
        let out = tessera.etcdctl(&["put", "big", &big]);
        if !out.status.success() {
            hit = Some((i, stderr(&out)));
            break;
        }
    }
    let (_, err) = hit.expect("quota never reached");
    assert!(
        err.contains("Error: etcdserver: mvcc: database space exceeded"),
        "{err}"
    );

    let alarms = stdout(&tessera.etcdctl(&["alarm", "list"]));
    assert!(
        alarms.starts_with("memberID:") && alarms.contains("alarm:NOSPACE"),
        "{alarms}"
    );
    let status = stdout(&tessera.etcdctl(&["endpoint", "status"]));
    assert!(status.contains("alarm:NOSPACE"), "{status}");
    // writes stay refused, reads and deletes still work
    assert!(!tessera.etcdctl(&["put", "small", "1"]).status.success());
    assert!(tessera
        .etcdctl(&["get", "big", "--keys-only"])
        .status
        .success());

    // free space the etcd way: compact, defragment, disarm
    let rev = stdout(&tessera.etcdctl(&["get", "big", "-w", "json"]));
    let rev: i64 = rev
        .split("\"revision\":")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(tessera
        .etcdctl(&["compaction", &rev.to_string(), "--physical"])
        .status
        .success());
    assert!(tessera.etcdctl(&["defrag"]).status.success());
    let disarmed = stdout(&tessera.etcdctl(&["alarm", "disarm"]));
    assert!(disarmed.contains("alarm:NOSPACE"), "{disarmed}");
    assert_eq!(stdout(&tessera.etcdctl(&["alarm", "list"])), "");
    let out = tessera.etcdctl(&["put", "small", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Runs `etcdctl watch ARGS` for `secs` seconds (it never exits by itself)
/// while `writes` run, and returns its normalized stdout.
async fn watch_output(
    server: &Server,
    args: &[&str],
    stdin: Option<&'static str>,
    writes: &[&[&str]],
) -> String {
    let endpoint = server.endpoint();
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("3")
        .arg("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
        // keep stdin open: interactive watch stops reading at EOF
        std::mem::forget(pipe);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    for w in writes {
        assert!(server.etcdctl(w).status.success());
    }
    let out = child.wait_with_output().unwrap();
    normalize(&stdout(&out), server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_matches_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    for server in [&etcd, &tessera] {
        for (k, v) in [("w/a", "1"), ("w/b", "2"), ("w/a", "3")] {
            assert!(server.etcdctl(&["put", k, v]).status.success());
        }
    }
    let writes: &[&[&str]] = &[
        &["put", "w/c", "4"],
        &["del", "w/a"],
        &["put", "other", "x"],
    ];
    let cases: Vec<(Vec<&str>, Option<&'static str>)> = vec![
        (vec!["watch", "w/a"], None),
        (vec!["watch", "w/", "--prefix"], None),
        (
            vec!["watch", "w/", "--prefix", "--rev=2", "--prev-kv"],
            None,
        ),
        (vec!["watch", "w/a", "-w", "json", "--rev=3"], None),
        (
            vec!["watch", "-i"],
            Some("watch w/ --prefix\nwatch other\n"),
        ),
    ];
    for (i, (args, stdin)) in cases.iter().enumerate() {
        // replay the same writes on both; revisions stay aligned
        let expected = watch_output(&etcd, args, *stdin, writes).await;
        let actual = watch_output(&tessera, args, *stdin, writes).await;
        assert_eq!(
            actual, expected,
            "case {i}: etcdctl {args:?} (left tessera, right etcd)"
        );
        assert!(!actual.is_empty(), "case {i}: no output");
    }
}
