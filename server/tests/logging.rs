//! Logs like etcd's: zap JSON lines by default with etcd's milestone
//! messages in etcd's order, never colour codes in a file or pipe,
//! `--log-outputs` to several places, `--log-format console`,
//! `--log-level`, and etcd's error for a logger it does not have.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Kind, Server, TESSERA};
use serde_json::Value;

/// Every line of `log` as JSON; panics on a line that is not.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}")))
        .collect()
}

/// Index of the first line whose `msg` contains `text`.
fn position(lines: &[Value], text: &str, log: &str) -> usize {
    lines
        .iter()
        .position(|l| l["msg"].as_str().is_some_and(|m| m.contains(text)))
        .unwrap_or_else(|| panic!("no {text:?} in the log:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_logs_are_zap_json_with_etcds_milestones_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    // The version milestones follow the member's publication, which may
    // come a moment after the server answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.log().contains("enabled capabilities for version") {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.terminate(Duration::from_secs(20)).is_some());
    let log = server.log();
    assert!(!log.contains('\x1b'), "colour codes in a file:\n{log}");
    let lines = json_lines(&log);
    for line in &lines {
        for key in ["level", "ts", "caller", "msg"] {
            assert!(line[key].is_string(), "no {key}: {line}");
        }
        let ts = line["ts"].as_str().unwrap();
        // zap's ISO 8601: 2026-12-05T12:35:09.871Z
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
        assert!(line["caller"].as_str().unwrap().contains(".rs:"), "{line}");
    }
    let at = |text: &str| position(&lines, text, &log);
    // etcd's order: start, leadership, serving, ready; publication and
    // the cluster version once the member is in; shutdown last.
    assert!(at("starting an etcd server") < at("elected leader"));
    assert!(
        at("starting an etcd server")
            < at("serving client traffic insecurely; this is strongly discouraged!")
    );
    assert!(
        at("serving client traffic insecurely; this is strongly discouraged!")
            < at("ready to serve client requests")
    );
    assert!(
        at("published local member to cluster through raft") < at("set initial cluster version")
    );
    assert!(at("set initial cluster version") < at("enabled capabilities for version"));
    assert!(at("ready to serve client requests") < at("received signal; shutting down"));
    assert!(at("received signal; shutting down") < at("closing etcd server"));
    assert!(at("closing etcd server") < at("closed etcd server"));
    let start = &lines[at("starting an etcd server")];
    assert_eq!(start["level"], "info");
    assert_eq!(start["etcd-version"], tessera_server::config::ETCD_VERSION);
    assert_eq!(start["name"], "node1");
    let serving = &lines[at("serving client traffic insecurely")];
    assert_eq!(serving["address"], format!("127.0.0.1:{}", server.port));
    let published = &lines[at("published local member to cluster through raft")];
    assert!(published["local-member-id"]
        .as_str()
        .unwrap()
        .chars()
        .all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        lines[at("set initial cluster version")]["cluster-version"],
        "3.5"
    );
    let elected = lines[at("elected leader")]["msg"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        elected.starts_with("raft.node: ") && elected.contains(" at term "),
        "{elected}"
    );
    assert_eq!(
        lines[at("received signal; shutting down")]["signal"],
        "terminated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_format_and_level_flags_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tessera-console.log");
    // Console format to a file and to stdout: readable, never coloured.
    let outputs = format!("--log-outputs={},stdout", file.display());
    let server = Server::start(
        Kind::Tessera,
        &dir.path().join("a"),
        &[&outputs, "--log-format=console"],
    )
    .await;
    let in_file = std::fs::read_to_string(&file).unwrap();
    let on_stdout = server.log();
    for log in [&in_file, &on_stdout] {
        assert!(log.contains("ready to serve client requests"), "{log}");
        assert!(log.contains(" INFO "), "{log}");
        assert!(!log.contains('\x1b'), "colour codes:\n{log}");
        assert!(
            !log.trim_start().starts_with('{'),
            "JSON in console format:\n{log}"
        );
    }
    drop(server);

    // --log-level=warn: no info line, the ignored flag's warning stays.
    let server = Server::start(
        Kind::Tessera,
        &dir.path().join("b"),
        &["--log-level=warn", "--enable-pprof"],
    )
    .await;
    let log = server.log();
    let lines = json_lines(&log);
    assert!(!lines.is_empty(), "no warning logged:\n{log}");
    for line in &lines {
        assert_ne!(line["level"], "info", "{log}");
        assert_ne!(line["level"], "debug", "{log}");
    }
    assert!(log.contains("--enable-pprof"), "{log}");
}

#[test]
fn unknown_logger_or_format_or_output_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (flag, expected) in [
        (
            "--logger=capnslog",
            "error verifying flags, unknown logger option \"capnslog\"",
        ),
        ("--log-format=xml", "unknown log format \"xml\""),
        (
            "--log-outputs=journal",
            "log output \"journal\" is not supported",
        ),
        (
            "--log-outputs=/nonexistent-dir/x.log",
            "cannot open log output /nonexistent-dir/x.log",
        ),
    ] {
        let out = Command::new(TESSERA)
            .arg(flag)
            .arg(format!("--data-dir={}", data.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(stderr.contains(expected), "{flag}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flag}: {stderr}");
        assert!(!data.exists(), "{flag} created the data dir");
    }
}
