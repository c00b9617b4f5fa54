//! kubernetes-csi's conformance suite, `csi-sanity` (csi-test v5,
//! prebuilt in `../shared/bin`), against `tessera-csi --mode all` backed
//! by a real control plane and six real storage nodes: once with
//! filesystem volumes, once with block volumes. Every spec must pass, and
//! the only skipped ones are those for capabilities the plugin does not
//! advertise.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Cluster, ControlPlaneKind, Plugin};

/// Why csi-sanity may skip a spec: capabilities not advertised (no
/// ControllerPublish, GetSnapshot, ModifyVolume, group snapshots, multi
/// writer, attach limits).
const ALLOWED_SKIPS: &[&str] = &[
    "Controller Publish, UnpublishVolume not supported",
    "ControllerPublishVolume not supported",
    "ControllerPublishVolume.readonly field not supported",
    "ControllerUnpublishVolume not supported",
    "ControllerModifyVolume not supported",
    "Modify Volume not supported",
    "Modify volume not supported",
    "GetSnapshot not supported",
    "GroupControllerService not supported",
    "VolumeGroupSnapshots not supported",
    "Service does not have single node multi writer capability",
    "No MaxVolumesPerNode",
    "testnodevolumeattachlimit not enabled",
];

/// `$CSI_SANITY`, else `../shared/bin/csi-sanity` next to the checkout
/// (where the team keeps the prebuilt suite), else `csi-sanity` on PATH.
fn csi_sanity() -> PathBuf {
    if let Some(bin) = std::env::var_os("CSI_SANITY") {
        return PathBuf::from(bin);
    }
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bin/csi-sanity");
    if shared.exists() {
        return shared;
    }
    let on_path = std::env::var_os("PATH").map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("csi-sanity"))
            .find(|b| b.exists())
    });
    on_path.flatten().unwrap_or_else(|| {
        panic!(
            "csi-sanity not found: not in $CSI_SANITY, {}, or PATH",
            shared.display()
        )
    })
}

fn run_sanity(access_type: &str) {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&mut cluster, dir.path(), "sanity-node", "all");
    let report = dir.path().join("report.json");
    let out = Command::new(csi_sanity())
        .arg(format!("--csi.endpoint=unix://{}", plugin.socket.display()))
        .arg(format!("--csi.mountdir={}", plugin.path("mount")))
        .arg(format!("--csi.stagingdir={}", plugin.path("staging")))
        .arg(format!("--csi.testvolumeaccesstype={access_type}"))
        .arg("--csi.testvolumesize=67108864")
        .arg("--csi.testvolumeexpandsize=134217728")
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=20m")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("Passed") || l.starts_with("Ran "))
        .collect();
    println!("csi-sanity {access_type}: {}", summary.join(" / "));
    assert!(
        out.status.success(),
        "csi-sanity ({access_type}) failed:\n{stdout}\n{}\nplugin log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        plugin.log()
    );
    let raw = std::fs::read(&report).unwrap();
    let suites: Vec<serde_json::Value> = serde_json::from_slice(&raw).unwrap();
    let mut passed = 0;
    for spec in suites
        .iter()
        .flat_map(|s| s["SpecReports"].as_array().cloned().unwrap_or_default())
    {
        let name = spec["LeafNodeText"].as_str().unwrap_or("?").to_string();
        match spec["State"].as_str() {
            Some("passed") => passed += 1,
            // Disabled upstream (XIt): never run by anyone.
            Some("pending") => {}
            Some("skipped") => {
                let why = spec["Failure"]["Message"].as_str().unwrap_or("");
                println!("skipped: {name:?}: {why}");
                assert!(
                    ALLOWED_SKIPS.contains(&why),
                    "spec {name:?} was skipped for {why:?}, which the plugin's capabilities should make applicable"
                );
            }
            other => panic!("spec {name:?}: {other:?}"),
        }
    }
    assert!(passed > 50, "only {passed} specs passed");
}

#[test]
fn csi_sanity_passes_with_filesystem_volumes() {
    run_sanity("mount");
}

#[test]
fn csi_sanity_passes_with_block_volumes() {
    run_sanity("block");
}
