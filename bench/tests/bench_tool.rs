//! Runs every `tessera-bench` subcommand, briefly, against the real tessera
//! and Debian's etcd, and checks the reports: every request answered, no
//! errors, the counts the flags asked for.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tessera_bench::server::BenchServer;

const BENCH: &str = env!("CARGO_BIN_EXE_tessera-bench");

/// The tessera binary `cargo test --workspace` built next to this one.
fn tessera() -> PathBuf {
    let path = PathBuf::from(BENCH).with_file_name("tessera");
    assert!(path.exists(), "build tessera first: {}", path.display());
    path
}

/// Runs `tessera-bench` with `args` and returns its JSON reports.
fn bench(endpoint: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(BENCH)
        .arg(format!("--endpoints={endpoint}"))
        .args(["--conns=2", "--clients=8", "--output=json"])
        .args(args)
        .env("TESSERA_BENCH_QUIET", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn assert_clean(report: &Value, op: &str, requests: u64) {
    assert_eq!(report["op"], op, "{report}");
    assert_eq!(report["requests"], requests, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(
        report["requests_per_sec"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

async fn every_subcommand_against(name: &str, binary: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let server = BenchServer::start(name, binary, dir.path()).await.unwrap();
    let ep = server.url.trim_start_matches("http://").to_string();
    let ep = ep.as_str();

    let r = bench(
        ep,
        &[
            "put",
            "--total=500",
            "--key-space-size=100",
            "--val-size=256",
        ],
    );
    assert_clean(&r[0], "put", 500);
    let r = bench(ep, &["range", "foo", "--total=300"]);
    assert_clean(&r[0], "range", 300);
    let r = bench(ep, &["range", "a", "z", "--total=50", "--consistency=s"]);
    assert_clean(&r[0], "range", 50);
    let r = bench(
        ep,
        &[
            "txn-put",
            "--total=200",
            "--txn-ops=4",
            "--key-space-size=1000",
        ],
    );
    assert_clean(&r[0], "txn-put", 200);
    // A server's refusal is reported in etcd's words, counted per message
    // (the default --max-txn-ops is 128).
    let r = bench(
        ep,
        &[
            "txn-put",
            "--total=5",
            "--txn-ops=129",
            "--key-space-size=1000",
        ],
    );
    assert_eq!(
        r[0]["errors"],
        serde_json::json!({"rpc error: code = InvalidArgument desc = etcdserver: too many operations in txn request": 5}),
        "{}",
        r[0]
    );
    // 300 requests at 2 reads per write: 200 reads, 100 writes.
    let r = bench(ep, &["txn-mixed", "foo", "--total=300", "--rw-ratio=2"]);
    assert_clean(&r[0], "read", 200);
    assert_clean(&r[1], "write", 100);
    // 4 streams × 5 watchers on 2 keys, 50 puts: every put reaches 10.
    let r = bench(
        ep,
        &[
            "watch",
            "--streams=4",
            "--watch-per-stream=5",
            "--watched-key-total=2",
            "--put-total=50",
        ],
    );
    assert_clean(&r[0], "watch create", 20);
    assert_clean(&r[1], "put", 50);
    assert_clean(&r[2], "watch event", 500);
    let r = bench(
        ep,
        &[
            "watch-latency",
            "--put-total=40",
            "--put-rate=200",
            "--streams=2",
            "--watchers-per-stream=3",
        ],
    );
    assert_clean(&r[0], "put", 40);
    assert_clean(&r[1], "watch event", 240);
    let r = bench(
        ep,
        &[
            "watch-get",
            "--watchers=200",
            "--streams=2",
            "--watch-events=4",
        ],
    );
    assert_clean(&r[0], "watch create", 200);
    assert_eq!(r[1]["op"], "get");
    assert_eq!(r[1]["errors"], serde_json::json!({}), "{}", r[1]);
    let r = bench(ep, &["lease-keepalive", "--total=300"]);
    assert_clean(&r[0], "lease-keepalive", 300);

    // And the text report has etcd's shape.
    let out = Command::new(BENCH)
        .arg(format!("--endpoints={ep}"))
        .args(["put", "--total=20"])
        .env("TESSERA_BENCH_QUIET", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "Summary:",
        "Requests/sec:",
        "Response time histogram:",
        "Latency distribution:",
        "99.9% in",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}

#[tokio::test]
async fn every_subcommand_runs_cleanly_against_tessera() {
    every_subcommand_against("tessera", &tessera()).await;
}

#[tokio::test]
async fn every_subcommand_runs_cleanly_against_etcd() {
    every_subcommand_against("etcd", std::path::Path::new("etcd")).await;
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    let out = Command::new(BENCH)
        .args(["put", "--key-space-size=0", "--endpoints=127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected positive --key-space-size"), "{err}");
    let out = Command::new(BENCH)
        .args(["range", "k", "--consistency=x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown consistency flag"));
}
