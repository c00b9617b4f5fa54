//! The JSON gateway, compared with Debian's etcd: the same HTTP requests
//! (through curl, as users send them) must get the same status and the same
//! JSON once cluster id, member id and term are masked.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::{Kind, Server};
use serde_json::Value;

/// POSTs `body` to `path`; returns the HTTP status and the body.
fn post(server: &Server, path: &str, body: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("{}{path}", server.url()))
        .args(["-d", body])
        .output()
        .expect("curl is not installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Replaces the values that differ between any two clusters.
fn masked(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    match k.as_str() {
                        "cluster_id" | "member_id" | "raft_term" | "leader" | "ID"
                            if !val.is_object() =>
                        {
                            *val = Value::String("masked".into())
                        }
                        _ => walk(val),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Requests whose answers must be identical. Lease and lock keys use
/// client-chosen lease ids so the keys match too.
const SCRIPT: &[(&str, &str)] = &[
    ("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#),
    (
        "/v3/kv/put",
        r#"{"key":"Zm9vMg==","value":"YmF6","prev_kv":true}"#,
    ),
    (
        "/v3/kv/put",
        r#"{"key":"Zm9vMg==","value":"cXV4","prev_kv":true}"#,
    ),
    ("/v3/kv/range", r#"{"key":"Zm9v"}"#),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","range_end":"Zm9w","keys_only":true}"#,
    ),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","range_end":"Zm9w","count_only":true}"#,
    ),
    (
        "/v3/kv/range",
        r#"{"key":"Zm9v","rangeEnd":"Zm9w","limit":"1","sortOrder":"DESCEND","sortTarget":"MOD"}"#,
    ),
    ("/v3/kv/range", r#"{"key":"bm9uZQ=="}"#),
    ("/v3/kv/range", ""),
    ("/v3/kv/put", r#"{"value":"YmFy"}"#),
    ("/v3/kv/range", r#"{"key":"Zm9v","revision":"100"}"#),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestRange":{"key":"Zm9v"}},{"request_put":{"key":"Zm9v","value":"dHhu"}}],"failure":[{"requestDeleteRange":{"key":"Zm9v"}}]}"#,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"target":"VALUE","key":"Zm9v","value":"bm9wZQ==","result":"EQUAL"}],"success":[],"failure":[{"request_delete_range":{"key":"Zm9vMg==","prev_kv":true}}]}"#,
    ),
    (
        "/v3/kv/deleterange",
        r#"{"key":"Zm9v","range_end":"Zm9w","prev_kv":true}"#,
    ),
    ("/v3/kv/compaction", r#"{"revision":"100"}"#),
    ("/v3/kv/compaction", r#"{"revision":"3","physical":true}"#),
    ("/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#),
    ("/v3/lease/grant", r#"{"TTL":"60","ID":"4096"}"#),
    ("/v3/lease/grant", r#"{"TTL":"60","ID":"4096"}"#),
    ("/v3/lease/grant", r#"{"TTL":"1","ID":"4097"}"#),
    (
        "/v3/kv/put",
        r#"{"key":"bGVhc2Vk","value":"eA==","lease":"4096"}"#,
    ),
    (
        "/v3/kv/put",
        r#"{"key":"bGVhc2Vk","value":"eA==","lease":"99"}"#,
    ),
    ("/v3/kv/lease/timetolive", r#"{"ID":"99"}"#),
    ("/v3/lock/lock", r#"{"name":"bXlsb2Nr","lease":"4096"}"#),
    ("/v3/lock/unlock", r#"{"key":"bXlsb2NrLzEwMDA="}"#),
    ("/v3/election/leader", r#"{"name":"ZWxlY3Rpb24="}"#),
    (
        "/v3/election/campaign",
        r#"{"name":"ZWxlY3Rpb24=","lease":"4096","value":"YQ=="}"#,
    ),
    ("/v3/election/leader", r#"{"name":"ZWxlY3Rpb24="}"#),
    ("/v3/election/proclaim", r#"{"value":"Yg=="}"#),
    ("/v3/lease/revoke", r#"{"ID":"4096"}"#),
    ("/v3/kv/lease/revoke", r#"{"ID":"4096"}"#),
    ("/v3/kv/range", r#"{"key":"AA==","range_end":"AA=="}"#),
    ("/v3/maintenance/alarm", r#"{"action":"GET"}"#),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    tokio::task::block_in_place(|| {
        for (path, body) in SCRIPT {
            let (want_code, want) = post(&etcd, path, body);
            let (got_code, got) = post(&tessera, path, body);
            assert_eq!(got_code, want_code, "{path} {body}: {got} vs etcd {want}");
            assert_eq!(
                masked(parse(&got)),
                masked(parse(&want)),
                "{path} {body}\ntessera: {got}\netcd:    {want}"
            );
        }
        // Malformed JSON: same status and gRPC code (the parser's message differs).
        let (want_code, want) = post(&etcd, "/v3/kv/range", "{bad json");
        let (got_code, got) = post(&tessera, "/v3/kv/range", "{bad json");
        assert_eq!(
            (got_code, parse(&got)["code"].clone()),
            (want_code, parse(&want)["code"].clone())
        );
        let (got_code, _) = post(&tessera, "/v3/no/such/path", "{}");
        assert_eq!(got_code, 404);
    });
}

/// Starts streaming `body` to `path` for `secs` seconds.
fn stream_lines(server: &Server, path: &str, body: &str, secs: u32) -> std::process::Child {
    Command::new("curl")
        .args(["-s", "-N", "-X", "POST", "--max-time", &secs.to_string()])
        .arg(format!("{}{path}", server.url()))
        .args(["-d", body])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl is not installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_streams_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &[]).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &[]).await;
    // Answer lines per stream and watch id: the order within one watcher is
    // guaranteed, the interleaving of different watchers is not.
    let run = |server: &Server| -> BTreeMap<String, Vec<Value>> {
        post(server, "/v3/kv/put", r#"{"key":"dw==","value":"MQ=="}"#);
        post(server, "/v3/lease/grant", r#"{"TTL":"60","ID":"77"}"#);
        let watch = stream_lines(
            server,
            "/v3/watch",
            r#"{"create_request":{"key":"dw==","start_revision":"1","prev_kv":true}}
{"create_request":{"key":"dw==","filters":["NOPUT"]}}"#,
            3,
        );
        let keepalive = stream_lines(server, "/v3/lease/keepalive", r#"{"ID":"77"}"#, 2);
        std::thread::sleep(Duration::from_millis(800));
        post(server, "/v3/kv/put", r#"{"key":"dw==","value":"Mg=="}"#);
        post(server, "/v3/kv/deleterange", r#"{"key":"dw=="}"#);
        let mut lines: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (stream, child) in [("watch", watch), ("keepalive", keepalive)] {
            let out = child.wait_with_output().unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let v = masked(parse(line));
                let id = v["result"]["watch_id"].as_str().unwrap_or("0").to_string();
                lines.entry(format!("{stream} {id}")).or_default().push(v);
            }
        }
        lines
    };
    tokio::task::block_in_place(|| {
        let want = run(&etcd);
        let got = run(&tessera);
        // Watcher 0: created, the put from history, the new put, the delete;
        // watcher 1 (NOPUT): created, the delete; one keep-alive answer.
        let sizes: Vec<usize> = want.values().map(Vec::len).collect();
        assert_eq!(sizes, [1, 4, 2], "{want:#?}");
        assert_eq!(got, want);
    });
}
