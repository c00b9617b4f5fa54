//! Snapshots, clones and online expansion on real `tessera-store` nodes, a
//! real control plane, real loop devices and real filesystems.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{random_file, sh, try_sh, Cluster, ControlPlaneKind, MountGuard};

const MIB: usize = 1 << 20;

/// Block `block` of generation `generation`: its numbers, then noise.
fn pattern(block: u64, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation ^ 1;
    while out.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn generation_file(path: &Path, blocks: u64, generation: u64) {
    let data: Vec<u8> = (0..blocks).flat_map(|b| pattern(b, generation)).collect();
    std::fs::write(path, data).unwrap();
}

/// Which generation `data` holds whole (0: never written), or why not.
fn whole_generation(data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let first = u64::from_le_bytes(data[8..16].try_into().unwrap());
    for (b, block) in data.chunks(4096).enumerate() {
        if block != pattern(b as u64, first).as_slice() {
            let other = u64::from_le_bytes(block[8..16].try_into().unwrap());
            return Err(format!(
                "block {b} holds generation {other}, block 0 generation {first}"
            ));
        }
    }
    Ok(first)
}

fn write_device(file: &Path, device: &str) {
    sh(&format!(
        "dd if={} of={device} bs=1M oflag=direct conv=fsync,notrunc status=none",
        file.display()
    ));
}

fn read_device(device: &str, into: &Path, len: usize) {
    sh(&format!(
        "dd if={device} of={} bs=1M count={} iflag=direct status=none",
        into.display(),
        len / MIB
    ));
}

/// Whether this process may grow a mounted ext4 (CAP_SYS_RESOURCE).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn node_io(cluster: &Cluster) -> (u64, u64) {
    (
        cluster.nodes_metric("tessera_store_appends_total"),
        cluster.nodes_metric("tessera_store_reads_total"),
    )
}

/// Snapshots taken while a writer writes generations and flushes each
/// one: every snapshot holds exactly one whole generation, readable
/// through a read-only device, and taking one reads and writes nothing on
/// the nodes.
#[test]
fn snapshots_hold_a_flush_point_and_cost_no_io() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    cluster.create("gen", "64MiB", &["--segment-size", "4MiB"]);
    let device = cluster.attach("gen");
    let region = 8 * MIB;
    let blocks = (region / 4096) as u64;
    let dir = cluster.dir.path().to_path_buf();
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (device, dir, done, written) =
            (device.clone(), dir.clone(), done.clone(), written.clone());
        std::thread::spawn(move || {
            for generation in 1..=12u64 {
                let file = dir.join(format!("gen{generation}"));
                generation_file(&file, blocks, generation);
                write_device(&file, &device);
                written.store(generation, Ordering::SeqCst);
                let _ = std::fs::remove_file(&file);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut taken = Vec::new();
    while !done.load(Ordering::SeqCst) && taken.len() < 4 {
        std::thread::sleep(Duration::from_millis(600));
        let name = format!("gen-snap{}", taken.len());
        let before = written.load(Ordering::SeqCst);
        cluster.ok(&["snapshot", "create", "gen", &name]);
        taken.push((name, before));
    }
    writer.join().unwrap();
    assert!(taken.len() >= 2, "the writer finished before two snapshots");

    // Idle now: a snapshot of the attached volume touches no node.
    std::thread::sleep(Duration::from_secs(1));
    let before = node_io(&cluster);
    cluster.ok(&["snapshot", "create", "gen", "gen-final"]);
    assert_eq!(node_io(&cluster), before, "taking a snapshot did node I/O");
    taken.push(("gen-final".into(), 12));

    let listed = cluster.ok(&["snapshot", "list", "gen"]);
    for (name, _) in &taken {
        assert!(
            listed.contains(name.as_str()),
            "{name} not listed:\n{listed}"
        );
    }
    let info = cluster.ok(&["snapshot", "info", "gen-snap0"]);
    assert!(info.contains("gen") && info.contains("64 MiB"), "{info}");

    for (name, at_least) in &taken {
        let snap_device = cluster.attach_snapshot(name);
        let out = dir.join(format!("{name}.read"));
        read_device(&snap_device, &out, region);
        let data = std::fs::read(&out).unwrap();
        let generation =
            whole_generation(&data).unwrap_or_else(|why| panic!("snapshot {name}: {why}"));
        assert!(
            generation >= *at_least,
            "snapshot {name} holds generation {generation}, older than the {at_least} flushed before it was asked for"
        );
        // Read-only: writes are refused.
        let (wrote, _) = try_sh(&format!(
            "dd if=/dev/zero of={snap_device} bs=4096 count=1 oflag=direct conv=notrunc status=none"
        ));
        assert!(!wrote, "a snapshot's device took a write");
        cluster.detach_snapshot(name);
    }
    cluster.detach("gen");
}

/// A writer whose attach lease expired records itself again under a new
/// one. A writer whose record vanished while it still writes (as when it
/// is cut off from the control plane past its lease; here the record is
/// deleted) is fenced by a snapshot taken without it: the snapshot holds
/// what the writer had flushed, and nothing the writer does later lands
/// in it or takes from it. A volume detached cleanly is not fenced.
#[test]
fn a_snapshot_without_a_recorded_writer_fences_it() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    cluster.create("orphan", "16MiB", &[]);
    let device = cluster.attach("orphan");
    let region = 4 * MIB;
    let blocks = (region / 4096) as u64;
    let dir = cluster.dir.path().to_path_buf();
    let first = dir.join("gen1");
    generation_file(&first, blocks, 1);
    write_device(&first, &device);
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &cluster.endpoints()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let record_lease = || {
        let got = etcdctl(&["get", "/tessera/store/attach/orphan", "-w", "json"]);
        let got: serde_json::Value = serde_json::from_str(&got).ok()?;
        got["kvs"][0]["lease"].as_i64()
    };

    // Its lease ends (as when it expires): the writer records itself again
    // under a new one.
    let lease = record_lease().expect("no attach record");
    etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match record_lease() {
            Some(renewed) if renewed != lease => break,
            _ => assert!(
                Instant::now() < deadline,
                "the attach record was not renewed"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The record vanishes without the writer knowing.
    assert_eq!(etcdctl(&["del", "/tessera/store/attach/orphan"]), "1");
    let attach_log = || {
        std::fs::read_to_string(cluster.run_dir().join("orphan").join("attach.log"))
            .unwrap_or_default()
    };
    assert!(!attach_log().contains("fenced"), "{}", attach_log());

    cluster.ok(&["snapshot", "create", "orphan", "orphan-snap"]);
    let second = dir.join("gen2");
    generation_file(&second, blocks, 2);
    let (wrote, _) = try_sh(&format!(
        "dd if={} of={device} bs=1M oflag=direct conv=fsync,notrunc status=none",
        second.display()
    ));
    assert!(!wrote, "the writer wrote on after the snapshot");
    let log = attach_log();
    assert!(log.contains("fenced"), "the writer was not fenced:\n{log}");

    let snap_device = cluster.attach_snapshot("orphan-snap");
    let out = dir.join("snap.read");
    read_device(&snap_device, &out, region);
    let data = std::fs::read(&out).unwrap();
    assert_eq!(whole_generation(&data), Ok(1));
    cluster.detach_snapshot("orphan-snap");

    // A volume detached cleanly is snapshotted without opening it.
    cluster.create("clean", "16MiB", &[]);
    let clean = cluster.attach("clean");
    write_device(&first, &clean);
    cluster.detach("clean");
    cluster.ok(&["snapshot", "create", "clean", "clean-snap"]);
    let epoch = |name: &str| {
        let info = cluster.ok(&["volume", "info", name, "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&info).unwrap()["epoch"].as_u64()
    };
    assert_eq!(
        epoch("clean"),
        Some(1),
        "a cleanly closed volume was fenced"
    );
    assert_eq!(
        epoch("orphan"),
        Some(2),
        "the orphaned writer's epoch was not fenced"
    );
}

/// Clones from a snapshot and from a live volume are independent of their
/// sources and of each other, outlive them, and every byte's space comes
/// back once all are deleted.
#[test]
fn clones_are_independent_and_outlive_their_sources() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let size = 24 * MIB;
    cluster.create("src", "24MiB", &["--segment-size", "4MiB"]);
    let dir = cluster.dir.path().to_path_buf();
    let a = dir.join("a");
    random_file(&a, size, 1);
    let device = cluster.attach("src");
    write_device(&a, &device);
    cluster.detach("src");

    // A snapshot without a writer, then clones: nothing is copied.
    let before = node_io(&cluster);
    cluster.ok(&["snapshot", "create", "src", "snap1"]);
    cluster.ok(&["volume", "create", "clone1", "--from-snapshot", "snap1"]);
    cluster.ok(&["volume", "create", "clone2", "--from-volume", "src"]);
    assert_eq!(
        node_io(&cluster),
        before,
        "snapshot or clone creation did node I/O"
    );
    let list = cluster.ok(&["volume", "list"]);
    assert!(list.contains("clone1") && list.contains("clone2"), "{list}");
    let snaps = cluster.ok(&["snapshot", "list"]);
    assert!(
        !snaps.contains("source"),
        "the hidden snapshot of --from-volume is listed:\n{snaps}"
    );

    // Different writes to each; each reads its own.
    let devices: Vec<(String, String)> = ["src", "clone1", "clone2"]
        .iter()
        .map(|v| (v.to_string(), cluster.attach(v)))
        .collect();
    let device_of = |name: &str| -> String {
        devices
            .iter()
            .find(|(v, _)| v == name)
            .map(|(_, d)| d.clone())
            .unwrap()
    };
    let patch = |name: &str, seed: u64, at: usize| -> Vec<u8> {
        let file = dir.join(format!("{name}.patch"));
        random_file(&file, 8 * MIB, seed);
        sh(&format!(
            "dd if={} of={} bs=1M seek={} oflag=direct conv=fsync,notrunc status=none",
            file.display(),
            device_of(name),
            at / MIB
        ));
        std::fs::read(&file).unwrap()
    };
    let original = std::fs::read(&a).unwrap();
    let mut expect_src = original.clone();
    let mut expect_c1 = original.clone();
    let mut expect_c2 = original.clone();
    let b = patch("src", 2, 0);
    expect_src[..8 * MIB].copy_from_slice(&b);
    let c = patch("clone1", 3, 8 * MIB);
    expect_c1[8 * MIB..16 * MIB].copy_from_slice(&c);
    let d = patch("clone2", 4, 16 * MIB);
    expect_c2[16 * MIB..].copy_from_slice(&d);
    let check = |name: &str, device: &str, expect: &[u8]| {
        let out = dir.join(format!("{name}.check"));
        read_device(device, &out, size);
        assert!(
            std::fs::read(&out).unwrap() == expect,
            "{name} reads wrong bytes"
        );
    };
    for (name, device) in &devices {
        let expect = match name.as_str() {
            "src" => &expect_src,
            "clone1" => &expect_c1,
            _ => &expect_c2,
        };
        check(name, device, expect);
    }
    let snap_device = cluster.attach_snapshot("snap1");
    check("snap1", &snap_device, &original);
    cluster.detach_snapshot("snap1");
    for (name, _) in &devices {
        cluster.detach(name);
    }

    // The source and the snapshot go; the clones still read right.
    let used_full = cluster.nodes_metric("tessera_store_used_bytes");
    cluster.ok(&["volume", "delete", "src"]);
    let deleted = cluster.ok(&["snapshot", "delete", "snap1"]);
    assert!(deleted.contains("clones read"), "{deleted}");
    assert!(!cluster.ok(&["snapshot", "list"]).contains("snap1"));
    cluster.fails(&["snapshot", "info", "snap1"]);
    for (name, expect) in [("clone1", &expect_c1), ("clone2", &expect_c2)] {
        let device = cluster.attach(name);
        check(name, &device, expect);
        cluster.detach(name);
    }

    // All gone: the nodes give every byte back.
    cluster.ok(&["volume", "delete", "clone1"]);
    cluster.ok(&["volume", "delete", "clone2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = cluster.nodes_metric("tessera_store_used_bytes");
        let volumes = cluster.nodes_metric("tessera_store_volumes");
        if volumes == 0 && used < used_full / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes still hold {volumes} volumes, {used} bytes (of {used_full} when full)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An attached, mounted ext4 and xfs grow online: the device grows without
/// a detach, the filesystem grows into it, files stay intact and the
/// filesystem checks clean.
#[test]
fn online_expansion_grows_mounted_ext4_and_xfs() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let dir = cluster.dir.path().to_path_buf();
    for fs in ["ext4", "xfs"] {
        let name = format!("grow-{fs}");
        // xfs needs 300 MiB at least.
        cluster.create(&name, "320MiB", &[]);
        let device = cluster.attach(&name);
        sh(&format!("mkfs.{fs} -q {device}"));
        let mnt = dir.join(format!("mnt-{fs}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let guard = MountGuard(mnt.clone());
        sh(&format!("mount {device} {}", mnt.display()));
        let file = dir.join(format!("{fs}.data"));
        random_file(&file, 16 * MIB, 7);
        sh(&format!(
            "cp {} {}/data && sync",
            file.display(),
            mnt.display()
        ));
        let df = |m: &Path| -> u64 {
            sh(&format!("df -B1 --output=size {} | tail -1", m.display()))
                .trim()
                .parse()
                .unwrap()
        };
        let fs_before = df(&mnt);

        let out = cluster.ok(&["volume", "expand", &name, "--size", "640MiB"]);
        assert!(
            out.contains(&device),
            "expand did not report the device: {out}"
        );
        let bytes: u64 = sh(&format!("blockdev --getsize64 {device}"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(bytes, 640 << 20, "the device did not grow");
        match fs {
            "ext4" if !has_cap_sys_resource() => {
                // Online ext4 growth needs CAP_SYS_RESOURCE, which some
                // containers drop: the device still grew while attached
                // and mounted; the filesystem grows while unmounted.
                sh(&format!("umount {}", mnt.display()));
                sh(&format!("e2fsck -fy {device} 2>&1"));
                sh(&format!("resize2fs {device} 2>&1"));
                sh(&format!("mount {device} {}", mnt.display()));
            }
            "ext4" => {
                sh(&format!("resize2fs {device} 2>&1"));
            }
            _ => {
                sh(&format!("xfs_growfs {} 2>&1", mnt.display()));
            }
        }
        let fs_after = df(&mnt);
        assert!(
            fs_after > fs_before + (250 << 20),
            "{fs} did not grow: {fs_before} -> {fs_after}"
        );
        // New space is usable, old files intact.
        sh(&format!(
            "dd if=/dev/urandom of={}/more bs=1M count=300 status=none && sync",
            mnt.display()
        ));
        sh(&format!("cmp {} {}/data", file.display(), mnt.display()));
        sh(&format!("umount {}", mnt.display()));
        drop(guard);
        match fs {
            "ext4" => sh(&format!("e2fsck -fn {device} 2>&1")),
            _ => sh(&format!("xfs_repair -n {device} 2>&1")),
        };
        let info = cluster.ok(&["volume", "info", &name]);
        assert!(info.contains("640 MiB"), "{info}");
        cluster.detach(&name);
    }
}

/// Bad snapshot, clone and expansion requests get clear errors and change
/// nothing.
#[test]
fn bad_snapshot_clone_and_expand_input_is_refused() {
    let cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    cluster.create("v", "16MiB", &[]);
    cluster.ok(&["snapshot", "create", "v", "s"]);
    let volumes = cluster.ok(&["volume", "list", "-o", "json"]);
    let snapshots = cluster.ok(&["snapshot", "list", "-o", "json"]);

    let err = cluster.fails(&["snapshot", "create", "missing", "s2"]);
    assert!(err.contains("no volume named \"missing\""), "{err}");
    let err = cluster.fails(&["snapshot", "create", "v", "s"]);
    assert!(err.contains("snapshot \"s\" already exists"), "{err}");
    let err = cluster.fails(&["snapshot", "create", "v", "bad/name"]);
    assert!(err.contains("invalid"), "{err}");
    let err = cluster.fails(&["volume", "create", "c", "--from-snapshot", "missing"]);
    assert!(err.contains("no snapshot named \"missing\""), "{err}");
    let err = cluster.fails(&["volume", "create", "c", "--from-volume", "missing"]);
    assert!(err.contains("no volume named \"missing\""), "{err}");
    let err = cluster.fails(&["volume", "create", "v", "--from-snapshot", "s"]);
    assert!(err.contains("already exists"), "{err}");
    let err = cluster.fails(&[
        "volume",
        "create",
        "c",
        "--from-snapshot",
        "s",
        "--size",
        "1MiB",
    ]);
    assert!(err.contains("smaller than snapshot"), "{err}");
    let err = cluster.fails(&[
        "volume",
        "create",
        "c",
        "--from-snapshot",
        "s",
        "--data-shards",
        "3",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = cluster.fails(&["volume", "expand", "v", "--size", "8MiB"]);
    assert!(err.contains("cannot shrink"), "{err}");
    let err = cluster.fails(&["volume", "expand", "v", "--size", "1TiB"]);
    assert!(err.contains("free"), "{err}");
    let err = cluster.fails(&["volume", "expand", "v", "--size", "100TiB"]);
    assert!(err.contains("too many segments"), "{err}");
    let err = cluster.fails(&["volume", "expand", "missing", "--size", "1GiB"]);
    assert!(err.contains("no volume named \"missing\""), "{err}");
    let err = cluster.fails(&["snapshot", "delete", "missing"]);
    assert!(err.contains("no snapshot named \"missing\""), "{err}");
    let err = cluster.fails(&["snapshot", "attach", "missing"]);
    assert!(err.contains("no snapshot named \"missing\""), "{err}");

    assert_eq!(cluster.ok(&["volume", "list", "-o", "json"]), volumes);
    assert_eq!(cluster.ok(&["snapshot", "list", "-o", "json"]), snapshots);
}
