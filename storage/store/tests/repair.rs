//! Self-healing on real `tessera-store` nodes: repair of a lost node's
//! shards onto others (with a writer writing, and with a reader after two
//! more losses), a returning node that serves nothing stale, scrubbing of
//! rotten blocks, and draining.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{random_file, sh, try_sh, Cluster, ControlPlaneKind};
use tessera_proto::store::store_client::StoreClient;
use tessera_proto::store::StripesRequest;

const MIB: usize = 1 << 20;
/// Nodes rebuild a lost node's shards two seconds after its lease ends.
const FAST_REPAIR: &[&str] = &["--repair-delay", "2s"];

fn write_device(file: &Path, device: &str) -> (bool, String) {
    try_sh(&format!(
        "dd if={} of={device} bs=1M oflag=direct conv=fsync,notrunc status=none",
        file.display()
    ))
}

fn read_device(device: &str, into: &Path, len: usize) {
    sh(&format!(
        "dd if={device} of={} bs=1M count={} iflag=direct status=none",
        into.display(),
        len / MIB
    ));
}

fn repair_status(cluster: &Cluster) -> serde_json::Value {
    serde_json::from_str(&cluster.ok(&["repair", "status", "-o", "json"])).unwrap()
}

/// Waits until `repair status` no longer says healthy (a node's lease
/// ended), then until it says healthy again; returns whether it was seen
/// repairing on the way.
fn wait_healthy(cluster: &Cluster, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while repair_status(cluster)["state"] == "healthy" {
        assert!(Instant::now() < deadline, "the loss never showed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut repairing = false;
    loop {
        let status = repair_status(cluster);
        repairing |= status["state"] == "repairing";
        if status["state"] == "healthy" {
            return repairing;
        }
        assert!(Instant::now() < deadline, "repair not done: {status}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn volume_record(cluster: &Cluster, name: &str) -> serde_json::Value {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ok(&["volume", "list", "-o", "json"])).unwrap();
    list.into_iter().find(|v| v["name"] == name).unwrap()
}

/// The `(segment, shard)`s of `record` placed on `node`.
fn placed_on(record: &serde_json::Value, node: &str) -> HashSet<(u32, u32)> {
    let nodes: Vec<&str> = record["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let mut out = HashSet::new();
    for (s, seg) in record["segments"].as_array().unwrap().iter().enumerate() {
        for (i, n) in seg.as_array().unwrap().iter().enumerate() {
            if nodes[n.as_u64().unwrap() as usize] == node {
                out.insert((s as u32, i as u32));
            }
        }
    }
    out
}

/// The `(segment, shard)`s of volume `id` node `address` holds stripes of.
fn held_by(address: &str, id: u64, segments: u32) -> HashSet<(u32, u32)> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = StoreClient::connect(format!("http://{address}"))
            .await
            .unwrap();
        let mut out = HashSet::new();
        for segment in 0..segments {
            let reply = client
                .stripes(StripesRequest {
                    volume: id,
                    segment,
                })
                .await
                .unwrap()
                .into_inner();
            out.extend(reply.stripes.iter().map(|s| (segment, s.shard)));
        }
        out
    })
}

/// A 4+2 volume with 256 MiB written, on six nodes and a seventh added
/// after: one node SIGKILLed and kept down is rebuilt onto the others
/// (`repair status` reaches healthy); then two more of the original six
/// are killed and every byte still reads back. The first node, restarted,
/// holds none of its old shards of the volume.
#[test]
fn a_lost_node_is_rebuilt_and_survives_two_more_losses() {
    let mut cluster = Cluster::start_with(ControlPlaneKind::Tessera, 6, FAST_REPAIR);
    let size = 256 * MIB;
    cluster.create("big", "256MiB", &["--segment-size", "32MiB"]);
    let dir = cluster.dir.path().to_path_buf();
    let data = dir.join("data");
    random_file(&data, size, 11);
    let device = cluster.attach("big");
    let (ok, err) = write_device(&data, &device);
    assert!(ok, "{err}");
    cluster.detach("big");
    cluster.add_node("z0");
    cluster.wait_alive(7);
    assert_eq!(repair_status(&cluster)["state"], "healthy");

    let record = volume_record(&cluster, "big");
    let id = u64::from_str_radix(
        cluster
            .ok(&["volume", "info", "big", "-o", "json"])
            .split("\"id\": \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap(),
        16,
    )
    .unwrap();
    let segments = record["segments"].as_array().unwrap().len() as u32;
    let lost = placed_on(&record, "n0");
    assert!(!lost.is_empty(), "n0 holds no shard of the volume");
    let n0_address = cluster.nodes[0].address();
    assert_eq!(held_by(&n0_address, id, segments), lost);

    cluster.kill_node(0);
    let seen = wait_healthy(&cluster, Duration::from_secs(180));
    assert!(seen, "repair status never showed the repair");
    let record = volume_record(&cluster, "big");
    assert!(
        placed_on(&record, "n0").is_empty(),
        "n0 still placed: {record}"
    );
    assert!(!placed_on(&record, "n6").is_empty(), "nothing moved to n6");
    let repaired: u64 = cluster.nodes_metric("tessera_store_repair_bytes_total");
    assert!(
        repaired >= (size / 4 / 8) as u64,
        "only {repaired} bytes rebuilt"
    );

    // Two more of the original six: four shards of each segment are left.
    cluster.kill_node(1);
    cluster.kill_node(2);
    let device = cluster.attach("big");
    let back = dir.join("back");
    read_device(&device, &back, size);
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&data).unwrap(),
        "wrong bytes after repair and two more losses"
    );
    cluster.detach("big");

    // The first node comes back: its old shards are gone before it serves.
    cluster.start_node(0);
    let held = held_by(&n0_address, id, segments);
    let stale: Vec<_> = held.intersection(&lost).collect();
    assert!(stale.is_empty(), "n0 serves old shards {stale:?}");
}

/// A node is lost while a writer writes generations with flushes: repair
/// runs under it, the writer never stops, and the volume ends holding the
/// last generation.
#[test]
fn repair_runs_while_a_writer_writes() {
    let mut cluster = Cluster::start_with(ControlPlaneKind::Tessera, 7, FAST_REPAIR);
    let region = 32 * MIB;
    cluster.create("busy", "64MiB", &["--segment-size", "8MiB"]);
    let device = cluster.attach("busy");
    let dir = cluster.dir.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let writer = {
        let (device, dir, stop, last) = (device.clone(), dir.clone(), stop.clone(), last.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut generation = 0u64;
            while !stop.load(Ordering::SeqCst) {
                generation += 1;
                let file = dir.join(format!("g{}", generation % 2));
                random_file(&file, region, generation);
                let (ok, err) = write_device(&file, &device);
                if !ok {
                    return Err(format!("generation {generation}: {err}"));
                }
                last.store(generation, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    while last.load(Ordering::SeqCst) < 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let record = volume_record(&cluster, "busy");
    let victim = (0..7)
        .max_by_key(|i| placed_on(&record, &format!("n{i}")).len())
        .unwrap();
    cluster.kill_node(victim);
    let seen = wait_healthy(&cluster, Duration::from_secs(180));
    assert!(seen, "repair status never showed the repair");
    let at_repair = last.load(Ordering::SeqCst);
    while last.load(Ordering::SeqCst) < at_repair + 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap().expect("the writer stopped");
    let generation = last.load(Ordering::SeqCst);
    let back = dir.join("back");
    read_device(&device, &back, region);
    let expect = dir.join("expect");
    random_file(&expect, region, generation);
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&expect).unwrap(),
        "the volume does not hold generation {generation}"
    );
    cluster.detach("busy");
}

/// Flips a byte in `count` data blocks of `data` found in node `i`'s shard
/// files; returns how many were flipped.
fn rot(cluster: &Cluster, i: usize, data: &[u8], count: usize) -> usize {
    let dir = cluster.nodes[i].data_dir.join("shards");
    let mut flipped = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        let bytes = std::fs::read(&path).unwrap();
        let mut patches = Vec::new();
        // Data shards hold the volume's blocks as they are.
        for block in data.chunks(4096).step_by(97) {
            if patches.len() + flipped >= count {
                break;
            }
            if let Some(at) = bytes.windows(64).position(|w| w == &block[..64]) {
                patches.push(at + 100);
            }
        }
        if patches.is_empty() {
            continue;
        }
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for at in patches {
            use std::os::unix::fs::FileExt;
            let mut byte = [0u8];
            byte[0] = bytes[at] ^ 0x5a;
            file.write_all_at(&byte, at as u64).unwrap();
            flipped += 1;
        }
        file.sync_all().unwrap();
    }
    flipped
}

/// Rotten blocks in shard files on several nodes: reads never return them,
/// one scrub pass finds and rebuilds every one, the metrics count them,
/// and a second pass finds none.
#[test]
fn a_scrub_finds_and_repairs_every_rotten_block() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    let size = 16 * MIB;
    cluster.create("rot", "16MiB", &[]);
    let dir = cluster.dir.path().to_path_buf();
    let data_file = dir.join("data");
    random_file(&data_file, size, 5);
    let data = std::fs::read(&data_file).unwrap();
    let device = cluster.attach("rot");
    let (ok, err) = write_device(&data_file, &device);
    assert!(ok, "{err}");
    cluster.detach("rot");

    // Two blocks on each of three nodes that hold data shards.
    let mut rotten = 0;
    let mut nodes = 0;
    for i in 0..6 {
        let flipped = rot(&cluster, i, &data, 2);
        if flipped > 0 {
            rotten += flipped;
            nodes += 1;
        }
        if nodes == 3 {
            break;
        }
    }
    assert_eq!(nodes, 3, "rotten blocks on only {nodes} nodes");

    // Reads go around them.
    let device = cluster.attach("rot");
    let back = dir.join("back");
    read_device(&device, &back, size);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "a read returned rotten bytes"
    );
    cluster.detach("rot");

    let mut bad = 0;
    let mut repaired = 0;
    for i in 0..6 {
        let name = format!("n{i}");
        let report: serde_json::Value =
            serde_json::from_str(&cluster.ok(&["node", "scrub", &name, "-o", "json"])).unwrap();
        assert!(report["checked_blocks"].as_u64().unwrap() > 0, "{report}");
        bad += report["bad_blocks"].as_u64().unwrap();
        repaired += report["repaired_blocks"].as_u64().unwrap();
        assert_eq!(report["unrepaired_blocks"], 0, "{report}");
    }
    assert_eq!(
        bad, rotten as u64,
        "the scrub found {bad} of {rotten} rotten blocks"
    );
    assert_eq!(repaired, bad);
    assert_eq!(
        cluster.nodes_metric("tessera_store_scrub_blocks_bad_total"),
        bad
    );
    assert_eq!(
        cluster.nodes_metric("tessera_store_scrub_blocks_repaired_total"),
        bad
    );
    for i in 0..6 {
        let report: serde_json::Value =
            serde_json::from_str(&cluster.ok(&["node", "scrub", &format!("n{i}"), "-o", "json"]))
                .unwrap();
        assert_eq!(
            report["bad_blocks"], 0,
            "still rotten after repair: {report}"
        );
    }
    // Without degraded reads now: every node answers its own blocks.
    let device = cluster.attach("rot");
    read_device(&device, &back, size);
    assert!(std::fs::read(&back).unwrap() == data);
    cluster.detach("rot");
    let err = cluster.fails(&["node", "scrub", "missing"]);
    assert!(err.contains("no node named \"missing\""), "{err}");
}

/// `node drain` moves every shard off a node (the data reads back), is
/// refused when too few nodes would be left, and a new node takes part in
/// new placements at once.
#[test]
fn a_drained_node_is_emptied_and_draining_too_many_is_refused() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 7);
    let size = 32 * MIB;
    cluster.create("d", "32MiB", &["--segment-size", "4MiB"]);
    let dir = cluster.dir.path().to_path_buf();
    let data = dir.join("data");
    random_file(&data, size, 9);
    let device = cluster.attach("d");
    let (ok, err) = write_device(&data, &device);
    assert!(ok, "{err}");
    cluster.detach("d");
    let record = volume_record(&cluster, "d");
    let on_n0 = placed_on(&record, "n0");
    assert!(!on_n0.is_empty());

    cluster.ok(&["node", "drain", "n0"]);
    let nodes = cluster.ok(&["node", "list", "-o", "json"]);
    assert!(nodes.contains("\"draining\": true"), "{nodes}");
    wait_healthy(&cluster, Duration::from_secs(120));
    let record = volume_record(&cluster, "d");
    assert!(placed_on(&record, "n0").is_empty(), "{record}");
    // The drained node gives the shards up (housekeeping, every 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.nodes[0].metric("tessera_store_volumes") > 0 {
        assert!(Instant::now() < deadline, "n0 still holds shards");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Every byte reads back with two more nodes gone.
    cluster.kill_node(3);
    cluster.kill_node(5);
    let device = cluster.attach("d");
    let back = dir.join("back");
    read_device(&device, &back, size);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&data).unwrap());
    cluster.detach("d");
    cluster.start_node(3);
    cluster.start_node(5);
    cluster.wait_alive(7);

    // Six undrained nodes for six shards: no more may go.
    let before = cluster.ok(&["node", "list", "-o", "json"]);
    let err = cluster.fails(&["node", "drain", "n1"]);
    assert!(err.contains("only 5 other live, undrained nodes"), "{err}");
    assert_eq!(cluster.ok(&["node", "list", "-o", "json"]), before);
    let err = cluster.fails(&["node", "drain", "missing"]);
    assert!(err.contains("no node named \"missing\""), "{err}");

    // A new node is placed on at once; the drained one is not.
    cluster.add_node("z1");
    cluster.create("fresh", "64MiB", &["--segment-size", "4MiB"]);
    let fresh = volume_record(&cluster, "fresh");
    assert!(!placed_on(&fresh, "n7").is_empty(), "{fresh}");
    assert!(placed_on(&fresh, "n0").is_empty(), "{fresh}");
}

/// Flips a byte of the block whose content is `block` in node `i`'s shard
/// files; whether it was found there.
fn flip_block(cluster: &Cluster, i: usize, block: &[u8]) -> bool {
    let dir = cluster.nodes[i].data_dir.join("shards");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        let bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(64).position(|w| w == &block[..64]) {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all_at(&[bytes[at + 100] ^ 0x5a], (at + 100) as u64)
                .unwrap();
            file.sync_all().unwrap();
            return true;
        }
    }
    false
}

/// Rotten blocks in three shards of one stripe, each in another row: no
/// shard can be rebuilt from whole shards (only three of the other five
/// read cleanly, four are needed), every one can be row by row.
#[test]
fn shards_are_rebuilt_row_by_row_around_rot_in_other_shards() {
    let mut cluster = Cluster::start(ControlPlaneKind::Tessera, 6);
    cluster.create("rows", "16MiB", &[]);
    let dir = cluster.dir.path().to_path_buf();
    let data_file = dir.join("data");
    // One full stripe: 256 blocks, 64 rows of 4 data shards; block i is
    // row i % 64 of data shard i / 64.
    random_file(&data_file, MIB, 9);
    let data = std::fs::read(&data_file).unwrap();
    let device = cluster.attach("rows");
    let (ok, err) = write_device(&data_file, &device);
    assert!(ok, "{err}");
    cluster.detach("rows");
    for block in [0usize, 65, 130] {
        let content = &data[block * 4096..(block + 1) * 4096];
        assert!(
            (0..6).any(|i| flip_block(&cluster, i, content)),
            "block {block} is on no node"
        );
    }
    let (mut bad, mut repaired) = (0, 0);
    for i in 0..6 {
        let report: serde_json::Value =
            serde_json::from_str(&cluster.ok(&["node", "scrub", &format!("n{i}"), "-o", "json"]))
                .unwrap();
        assert_eq!(report["unrepaired_blocks"], 0, "{report}");
        bad += report["bad_blocks"].as_u64().unwrap();
        repaired += report["repaired_blocks"].as_u64().unwrap();
    }
    assert_eq!((bad, repaired), (3, 3));
    // Every shard is whole again: a second pass finds nothing, and the
    // stripe reads back without degraded reads.
    for i in 0..6 {
        let report: serde_json::Value =
            serde_json::from_str(&cluster.ok(&["node", "scrub", &format!("n{i}"), "-o", "json"]))
                .unwrap();
        assert_eq!(report["bad_blocks"], 0, "{report}");
    }
    let device = cluster.attach("rows");
    let back = dir.join("back");
    read_device(&device, &back, MIB);
    assert!(std::fs::read(&back).unwrap() == data);
    cluster.detach("rows");
}
