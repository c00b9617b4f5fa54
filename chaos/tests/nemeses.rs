//! A short `tessera-chaos run` for each nemesis, against a 3-member control
//! plane (its members faulted) and against a 4+2 volume on six storage
//! nodes (the nodes, and the control plane under them, faulted; every
//! volume run ends with a split brain), all in network namespaces (needs
//! root, as CI runs): each run must end valid, with faults injected and
//! work done under them. The runs take turns: each is a whole cluster, enough for two
//! cores.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run_schedule(workload: &str, nemesis: &str, subnet: u8, seed: u64) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let chaos = env!("CARGO_BIN_EXE_tessera-chaos");
    let tessera = Path::new(chaos).with_file_name("tessera");
    assert!(
        tessera.exists(),
        "{} is missing: build it first (cargo build -p tessera-server)",
        tessera.display()
    );
    let store = Path::new(chaos).with_file_name("tessera-store");
    assert!(
        workload == "control" || store.exists(),
        "{} is missing: build it first (cargo build -p tessera-store)",
        store.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(chaos)
        .args([
            "run",
            "--workload",
            workload,
            "--nemesis",
            nemesis,
            "--seconds",
            "30",
            "--min-faults",
            "3",
        ])
        .args(["--seed", &seed.to_string()])
        .arg("--report")
        .arg(dir.path())
        .arg("--tessera")
        .arg(&tessera)
        .arg("--store")
        .arg(&store)
        .args(["--netns-prefix", &format!("tc{}{nemesis}-", &workload[..1])])
        .args(["--subnet", &subnet.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = || {
        let mut all = String::new();
        for m in ["m1", "m2", "m3", "s1", "s2", "s3", "s4", "s5", "s6"] {
            let Ok(log) = std::fs::read_to_string(dir.path().join("data").join(format!("{m}.log")))
            else {
                continue;
            };
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            all.push_str(&format!("--- {m} (last lines)\n"));
            for line in tail.iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    };
    assert!(
        out.status.success(),
        "{nemesis}: exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        out.status.code(),
        logs()
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["valid"], true, "{stdout}");
    let faults = report["faults"].as_array().unwrap();
    assert!(
        faults.len() >= 3,
        "{nemesis}: only {} faults\n{stderr}",
        faults.len()
    );
    let completed = report["operations_completed"].as_u64().unwrap();
    // Operations: client requests, or acknowledged flushes of the volume.
    let least = if workload == "control" { 200 } else { 20 };
    assert!(
        completed >= least,
        "{nemesis}: only {completed} operations completed\n{stderr}"
    );
    for verdict in report["verdicts"].as_array().unwrap() {
        assert_eq!(verdict["ok"], true, "{verdict}");
    }
    // The run removed its namespaces, processes, mounts and loop devices.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !left.contains(&format!("tc{}{nemesis}-", &workload[..1])),
        "namespaces left behind:\n{left}"
    );
    let path = dir.path().to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&path), "mounts left behind:\n{mounts}");
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&path), "loop devices left behind:\n{loops}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&path),
            "process {:?} left behind: {cmdline}",
            entry.file_name()
        );
    }
    println!("{stdout}");
}

#[test]
fn partitions_of_members_keep_histories_valid() {
    run_schedule("control", "partition", 201, 1);
}

#[test]
fn pauses_of_members_keep_histories_valid() {
    run_schedule("control", "pause", 202, 2);
}

#[test]
fn kills_of_members_keep_histories_valid() {
    run_schedule("control", "kill", 203, 3);
}

#[test]
fn failing_disks_of_members_keep_histories_valid() {
    run_schedule("control", "disk", 207, 7);
}

#[test]
fn failing_disks_of_storage_nodes_keep_acknowledged_flushes() {
    run_schedule("volume", "disk", 208, 8);
}

#[test]
fn partitions_of_storage_nodes_keep_acknowledged_flushes() {
    run_schedule("volume", "partition", 204, 4);
}

#[test]
fn pauses_of_storage_nodes_keep_acknowledged_flushes() {
    run_schedule("volume", "pause", 205, 5);
}

#[test]
fn kills_of_storage_nodes_keep_acknowledged_flushes() {
    run_schedule("volume", "kill", 206, 6);
}
