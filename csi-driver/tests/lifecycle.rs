//! The CSI API driven directly, as kubelet and the sidecars would: a real
//! control plane, six real storage nodes, real `tessera-csi` processes,
//! real loop devices, filesystems and mounts.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{caps, sh, try_sh, Cluster, ControlPlaneKind, Plugin};
use tessera_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use tessera_proto::csi::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

async fn create(p: &Plugin, name: &str, size: i64, cap: VolumeCapability) -> Volume {
    create_from(p, name, size, cap, None).await
}

async fn create_from(
    p: &Plugin,
    name: &str,
    size: i64,
    cap: VolumeCapability,
    source: Option<SourceType>,
) -> Volume {
    p.controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap],
            parameters: HashMap::from([
                ("dataShards".to_string(), "4".to_string()),
                ("parityShards".to_string(), "2".to_string()),
            ]),
            volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .unwrap()
}

fn stage_request(p: &Plugin, id: &str, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: p.path(&format!("staging/{id}")),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// Stages and publishes `id`; the target path.
async fn stage_and_publish(p: &Plugin, id: &str, cap: VolumeCapability) -> String {
    let mut node = p.node().await;
    std::fs::create_dir_all(p.path(&format!("staging/{id}"))).unwrap();
    node.node_stage_volume(stage_request(p, id, cap.clone()))
        .await
        .unwrap_or_else(|e| panic!("NodeStageVolume {id} on {}: {e}", p.node_id));
    let target = p.path(&format!("pods/{id}/mount"));
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: p.path(&format!("staging/{id}")),
        target_path: target.clone(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("NodePublishVolume {id} on {}: {e}", p.node_id));
    target
}

async fn unpublish_and_unstage(p: &Plugin, id: &str) {
    let mut node = p.node().await;
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: p.path(&format!("pods/{id}/mount")),
    })
    .await
    .unwrap_or_else(|e| panic!("NodeUnpublishVolume {id}: {e}"));
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: p.path(&format!("staging/{id}")),
    })
    .await
    .unwrap_or_else(|e| panic!("NodeUnstageVolume {id}: {e}"));
}

async fn stats(p: &Plugin, id: &str, path: &str) -> NodeGetVolumeStatsResponse {
    p.node()
        .await
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("NodeGetVolumeStats {id}: {e}"))
        .into_inner()
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn checksum(path: &str) -> String {
    sh(&format!("sha256sum '{path}' | cut -d' ' -f1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_moves_to_another_node_and_survives_a_plugin_restart() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = tempfile::tempdir().unwrap();
    let mut a = Plugin::start(&mut cluster, dir.path(), "node-a", "all");
    let mut b = Plugin::start(&mut cluster, dir.path(), "node-b", "node");

    let info = a
        .identity()
        .await
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.tessera.dev");
    let ready = a
        .identity()
        .await
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready.ready, Some(true));

    let vol = create(&a, "pvc-move", 128 * MIB, caps::mount("ext4")).await;
    assert_eq!(vol.capacity_bytes, 128 * MIB);
    let target = stage_and_publish(&a, "pvc-move", caps::mount("ext4")).await;
    sh(&format!(
        "head -c 3000000 /dev/urandom > '{target}/data' && mkdir '{target}/dir' && echo hello > '{target}/dir/note' && sync"
    ));
    let sum = checksum(&format!("{target}/data"));
    let s = stats(&a, "pvc-move", &target).await;
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert!(bytes.used >= 3_000_000 && bytes.total > 100 * MIB, "{s:?}");
    assert!(s
        .usage
        .iter()
        .any(|u| u.unit == volume_usage::Unit::Inodes as i32));
    assert!(!s.volume_condition.unwrap().abnormal);
    let got = a
        .controller()
        .await
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-move".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec!["node-a".to_string()]
    );
    // While node-a writes it, node-b may not take it over.
    std::fs::create_dir_all(b.path("staging/pvc-move")).unwrap();
    let err = b
        .node()
        .await
        .node_stage_volume(stage_request(&b, "pvc-move", caps::mount("ext4")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("node-a"), "{err:?}");
    // Unstaging under a published mount is refused and changes nothing.
    let err = a
        .node()
        .await
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "pvc-move".into(),
            staging_target_path: a.path("staging/pvc-move"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(checksum(&format!("{target}/data")), sum);
    unpublish_and_unstage(&a, "pvc-move").await;
    assert!(!Path::new(&target).exists(), "the target path is removed");
    assert!(
        common::mounts_under(&a.dir).is_empty(),
        "nothing stays mounted on node-a"
    );

    // On "another node": the same files.
    let target_b = stage_and_publish(&b, "pvc-move", caps::mount("ext4")).await;
    assert_eq!(checksum(&format!("{target_b}/data")), sum);
    assert_eq!(sh(&format!("cat '{target_b}/dir/note'")), "hello\n");

    // The node plugin dies and comes back while the volume is published:
    // the mount keeps working, and unpublish and unstage still work.
    b.kill();
    sh(&format!("echo after > '{target_b}/after' && sync"));
    b.restart();
    assert_eq!(sh(&format!("cat '{target_b}/after'")), "after\n");
    assert!(b.log().contains("found attached"), "{}", b.log());
    unpublish_and_unstage(&b, "pvc-move").await;
    assert!(common::mounts_under(&b.dir).is_empty());

    a.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-move".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    a.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_their_point_in_time_and_clones_their_source() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(&mut cluster, dir.path(), "node-a", "all");
    create(&p, "pvc-src", 96 * MIB, caps::mount("ext4")).await;
    let target = stage_and_publish(&p, "pvc-src", caps::mount("ext4")).await;
    sh(&format!("echo one > '{target}/version' && sync"));
    let snap = p
        .controller()
        .await
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: "pvc-src".into(),
            name: "snap-one".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, "pvc-src");
    assert_eq!(snap.size_bytes, 96 * MIB);
    sh(&format!("echo two > '{target}/version' && sync"));

    // Restore: the snapshot's point in time, in a new volume.
    let restored = create_from(
        &p,
        "pvc-restored",
        96 * MIB,
        caps::mount("ext4"),
        Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: "snap-one".into(),
        })),
    )
    .await;
    assert!(restored.content_source.is_some());
    let t = stage_and_publish(&p, "pvc-restored", caps::mount("ext4")).await;
    assert_eq!(sh(&format!("cat '{t}/version'")), "one\n");
    sh(&format!("echo restored > '{t}/version' && sync"));

    // Clone of the (attached) source: as it last flushed.
    create_from(
        &p,
        "pvc-clone",
        128 * MIB,
        caps::mount("ext4"),
        Some(SourceType::Volume(VolumeSource {
            volume_id: "pvc-src".into(),
        })),
    )
    .await;
    let c = stage_and_publish(&p, "pvc-clone", caps::mount("ext4")).await;
    assert_eq!(sh(&format!("cat '{c}/version'")), "two\n");
    // Writes on either side never show on the other.
    assert_eq!(sh(&format!("cat '{target}/version'")), "two\n");

    let listed = p
        .controller()
        .await
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: "pvc-src".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    for id in ["pvc-src", "pvc-restored", "pvc-clone"] {
        unpublish_and_unstage(&p, id).await;
    }
    let mut ctl = p.controller().await;
    ctl.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: "snap-one".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for id in ["pvc-src", "pvc-restored", "pvc-clone"] {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let left = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(left.entries.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_filesystem_and_a_block_volume_grow_online() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(&mut cluster, dir.path(), "node-a", "all");
    // xfs grows online here; ext4's online resize needs CAP_SYS_RESOURCE,
    // which this sandbox does not grant.
    // (xfs needs 300 MB at least.)
    create(&p, "pvc-grow", 320 * MIB, caps::mount("xfs")).await;
    let target = stage_and_publish(&p, "pvc-grow", caps::mount("xfs")).await;
    sh(&format!("echo kept > '{target}/file' && sync"));
    let total = |s: &NodeGetVolumeStatsResponse| {
        s.usage
            .iter()
            .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
            .unwrap()
            .total
    };
    let before = total(&stats(&p, "pvc-grow", &target).await);
    let expanded = p
        .controller()
        .await
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-grow".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(caps::mount("xfs")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 640 * MIB);
    assert!(expanded.node_expansion_required);
    let grown = p
        .node()
        .await
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-grow".into(),
            volume_path: target.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 640 * MIB);
    let after = total(&stats(&p, "pvc-grow", &target).await);
    assert!(after > before + 200 * MIB, "{before} -> {after}");
    assert_eq!(sh(&format!("cat '{target}/file'")), "kept\n");
    unpublish_and_unstage(&p, "pvc-grow").await;

    // A block volume's device grows by itself.
    create(&p, "pvc-block", 64 * MIB, caps::block()).await;
    let dev = stage_and_publish(&p, "pvc-block", caps::block()).await;
    let size = |s: &NodeGetVolumeStatsResponse| total(s);
    assert_eq!(size(&stats(&p, "pvc-block", &dev).await), 64 * MIB);
    let r = p
        .controller()
        .await
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-block".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 96 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(caps::block()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.node_expansion_required);
    let deadline = Instant::now() + Duration::from_secs(30);
    while size(&stats(&p, "pvc-block", &dev).await) != 96 * MIB {
        assert!(Instant::now() < deadline, "the block device did not grow");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unpublish_and_unstage(&p, "pvc-block").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_never_formats_what_it_cannot_read_or_does_not_know() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(&mut cluster, dir.path(), "node-a", "all");
    create(&p, "pvc-safe", 64 * MIB, caps::mount("ext4")).await;
    let target = stage_and_publish(&p, "pvc-safe", caps::mount("ext4")).await;
    sh(&format!("echo precious > '{target}/file' && sync"));
    unpublish_and_unstage(&p, "pvc-safe").await;

    // Three of six nodes down: the volume cannot be read, so it is not
    // staged, and not formatted.
    for i in 0..3 {
        cluster.kill_node(i);
    }
    let err = p
        .node()
        .await
        .node_stage_volume(stage_request(&p, "pvc-safe", caps::mount("ext4")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::FailedPrecondition | Code::Internal
        ),
        "{err:?}"
    );
    assert!(common::mounts_under(&p.dir).is_empty());
    assert!(
        std::fs::read_dir(&p.run_dir).unwrap().all(|e| {
            tessera_store::attach::read_state(&p.run_dir, &e.unwrap().file_name().to_string_lossy())
                .is_none()
        }),
        "no attach process is left behind"
    );
    for i in 0..3 {
        cluster.start_node(i);
    }
    cluster.wait_alive(6);
    let target = stage_and_publish(&p, "pvc-safe", caps::mount("ext4")).await;
    assert_eq!(sh(&format!("cat '{target}/file'")), "precious\n");
    unpublish_and_unstage(&p, "pvc-safe").await;

    // Raw data written through block access is not "blank": a filesystem
    // request fails and the data stays.
    create(&p, "pvc-raw", 64 * MIB, caps::block()).await;
    let dev = stage_and_publish(&p, "pvc-raw", caps::block()).await;
    sh(&format!("head -c 1048576 /dev/urandom > {0}/raw && dd if={0}/raw of='{dev}' oflag=direct bs=1M status=none", dir.path().display()));
    unpublish_and_unstage(&p, "pvc-raw").await;
    let err = p
        .node()
        .await
        .node_stage_volume(stage_request(&p, "pvc-raw", caps::mount("ext4")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not formatted"), "{err:?}");
    let staging = p.path("staging/pvc-raw");
    assert!(!common::mounts_under(&p.dir)
        .iter()
        .any(|m| m.to_string_lossy() == staging));
    let dev = stage_and_publish(&p, "pvc-raw", caps::block()).await;
    let (same, _) = try_sh(&format!(
        "cmp -n 1048576 {}/raw '{dev}'",
        dir.path().display()
    ));
    assert!(same, "the raw data was changed");
    unpublish_and_unstage(&p, "pvc-raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_specs_codes_and_changes_nothing() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(&mut cluster, dir.path(), "node-a", "all");
    let mut ctl = p.controller().await;
    let mut node = p.node().await;
    create(&p, "pvc-x", 64 * MIB, caps::mount("ext4")).await;

    // An existing name with another size.
    let again = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-x".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![caps::mount("ext4")],
            ..Default::default()
        })
        .await;
    assert_eq!(code(again), Code::AlreadyExists);
    // No capabilities, a multi-node mode, an unknown filesystem, bad names
    // and parameters.
    let mut bad_cap = caps::mount("ext4");
    bad_cap.access_mode.as_mut().unwrap().mode =
        volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32;
    for (name, capabilities, params) in [
        ("pvc-y", vec![], vec![]),
        ("pvc-y", vec![bad_cap.clone()], vec![]),
        ("pvc-y", vec![caps::mount("ntfs")], vec![]),
        ("bad/name", vec![caps::mount("ext4")], vec![]),
        ("pvc-y", vec![caps::mount("ext4")], vec![("replicas", "3")]),
        (
            "pvc-y",
            vec![caps::mount("ext4")],
            vec![("dataShards", "0")],
        ),
    ] {
        let r = ctl
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                volume_capabilities: capabilities,
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{name}");
    }
    // More than the nodes hold (6 x 100 GiB raw), more than any volume.
    for (size, want) in [
        (1i64 << 40, Code::ResourceExhausted),
        (1 << 60, Code::OutOfRange),
    ] {
        let huge = ctl
            .create_volume(CreateVolumeRequest {
                name: "pvc-huge".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: size,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![caps::mount("ext4")],
                ..Default::default()
            })
            .await;
        assert_eq!(code(huge), want, "{size}");
    }
    // Unknown ids.
    let r = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-y".into(),
            volume_capabilities: vec![caps::mount("ext4")],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(SourceType::Snapshot(SnapshotSource {
                    snapshot_id: "nope".into(),
                })),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = ctl
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: "nope".into(),
            name: "s".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "nope".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = ctl
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "nope".into(),
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = node
        .node_stage_volume(stage_request(&p, "nope", caps::mount("ext4")))
        .await;
    assert_eq!(code(r), Code::NotFound);
    // Staging and target paths outside the managed directory.
    let outside = dir.path().join("outside");
    let r = node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "pvc-x".into(),
            staging_target_path: outside.to_string_lossy().into_owned(),
            volume_capability: Some(caps::mount("ext4")),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let target = stage_and_publish(&p, "pvc-x", caps::mount("ext4")).await;
    // The same publish again succeeds; read-only over a read-write one,
    // or block over a staged filesystem, does not.
    let again = |readonly: bool| NodePublishVolumeRequest {
        volume_id: "pvc-x".into(),
        staging_target_path: p.path("staging/pvc-x"),
        target_path: target.clone(),
        volume_capability: Some(caps::mount("ext4")),
        readonly,
        ..Default::default()
    };
    assert_eq!(code(node.node_publish_volume(again(false)).await), Code::Ok);
    assert_eq!(
        code(node.node_publish_volume(again(true)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage_request(&p, "pvc-x", caps::block()))
                .await
        ),
        Code::AlreadyExists
    );
    for bad in [
        outside.to_string_lossy().into_owned(),
        "/etc".into(),
        p.path("pods/../../../outside"),
    ] {
        let r = node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: "pvc-x".into(),
                staging_target_path: p.path("staging/pvc-x"),
                target_path: bad.clone(),
                volume_capability: Some(caps::mount("ext4")),
                ..Default::default()
            })
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{bad}");
        let r = node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: "pvc-x".into(),
                target_path: bad.clone(),
            })
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{bad}");
    }
    assert!(!outside.exists());
    // The volume is attached: deleting it is refused, and nothing changed.
    let r = ctl
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-x".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    sh(&format!("echo still > '{target}/f' && sync"));
    // Missing fields.
    let r = node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-x".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-x".into(),
            volume_path: p.path("pods/none"),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = ctl
        .list_volumes(ListVolumesRequest {
            starting_token: "bogus".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::Aborted);
    unpublish_and_unstage(&p, "pvc-x").await;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-x".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let left = ctl
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(left.entries.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_is_not_ready_while_the_control_plane_is_unreachable() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 0);
    let dir = tempfile::tempdir().unwrap();
    let p = Plugin::start(&mut cluster, dir.path(), "node-a", "all");
    let mut identity = p.identity().await;
    let ready = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(ready.ready, Some(true));
    cluster.kill_control_plane();
    let ready = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(ready.ready, Some(false));
    // The plugin itself still answers.
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.tessera.dev");
}
