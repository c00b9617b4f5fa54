//! A 4+2 volume on six real `tessera-store` nodes and a real control
//! plane, attached as a real loop device: what it survives, and how it
//! fails when it cannot.

mod common;

use std::time::{Duration, Instant};

use common::{random_file, sh, try_sh, Cluster, ControlPlaneKind, MountGuard};

/// Writes `file` to `device` with direct I/O and an fsync at the end.
fn write_device(file: &std::path::Path, device: &str) -> (bool, String) {
    try_sh(&format!(
        "dd if={} of={device} bs=1M oflag=direct conv=fsync,notrunc status=none",
        file.display()
    ))
}

/// Reads `len` bytes of `device` into `into` with direct I/O.
fn read_device(device: &str, into: &std::path::Path, len: usize) -> (bool, String) {
    try_sh(&format!(
        "dd if={device} of={} bs=1M count={} iflag=direct status=none",
        into.display(),
        len >> 20
    ))
}

fn same(a: &std::path::Path, b: &std::path::Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// 256 MiB of random data written through the device with flushes; any
/// two nodes SIGKILLed (three different pairs in turn): everything reads
/// back byte for byte. A third node down: a write fails with a clear error
/// in bounded time, and a read gives the right bytes or an error, never
/// wrong ones.
#[test]
fn any_two_lost_nodes_lose_nothing_and_a_third_fails_cleanly() {
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("data", "256MiB", &[]);
    let device = c.attach("data");
    let input = c.dir.path().join("input");
    random_file(&input, 256 << 20, 1);
    let (ok, err) = write_device(&input, &device);
    assert!(ok, "writing the volume failed: {err}");
    let back = c.dir.path().join("back");
    for (a, b) in [(0, 1), (2, 5), (3, 4)] {
        c.kill_node(a);
        c.kill_node(b);
        let (ok, err) = read_device(&device, &back, 256 << 20);
        assert!(ok, "reading with n{a} and n{b} down failed: {err}");
        assert!(
            same(&input, &back),
            "wrong bytes read with n{a} and n{b} down"
        );
        c.start_node(a);
        c.start_node(b);
    }
    // Writes go on with all nodes back.
    random_file(&input, 16 << 20, 2);
    let (ok, err) = write_device(&input, &device);
    assert!(ok, "{err}");

    for i in [0, 2, 4] {
        c.kill_node(i);
    }
    let started = Instant::now();
    let (ok, err) = write_device(&input, &device);
    assert!(!ok, "a write succeeded with three of six nodes down");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failed write took {:?}",
        started.elapsed()
    );
    assert!(!err.is_empty(), "the write failed without a message");
    let log = std::fs::read_to_string(c.run_dir().join("data").join("attach.log")).unwrap();
    assert!(
        log.contains("shards durable"),
        "no clear reason in the attach log:\n{log}"
    );
    let started = Instant::now();
    let (ok, _) = read_device(&device, &back, 16 << 20);
    assert!(started.elapsed() < Duration::from_secs(60));
    if ok {
        let expected = std::fs::read(&input).unwrap();
        let got = std::fs::read(&back).unwrap();
        // What was acknowledged before is what reads; never other bytes.
        assert!(
            got == expected || got.len() < expected.len(),
            "wrong bytes with three nodes down"
        );
    }
}

/// With one node down, writes and flushes go on and read back.
#[test]
fn writes_and_flushes_go_on_with_one_node_down() {
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("one", "64MiB", &[]);
    let device = c.attach("one");
    c.kill_node(3);
    let input = c.dir.path().join("input");
    random_file(&input, 32 << 20, 3);
    let (ok, err) = write_device(&input, &device);
    assert!(ok, "{err}");
    let back = c.dir.path().join("back");
    let (ok, err) = read_device(&device, &back, 32 << 20);
    assert!(ok, "{err}");
    assert!(same(&input, &back));
    // The node comes back, and the volume's other shards fill in what it
    // missed: then any two others may go.
    c.start_node(3);
    c.detach("one");
    let device = c.attach("one");
    std::thread::sleep(Duration::from_secs(3));
    c.kill_node(0);
    c.kill_node(1);
    let (ok, err) = read_device(&device, &back, 32 << 20);
    assert!(ok, "{err}");
    assert!(
        same(&input, &back),
        "shards the returning node missed were not completed"
    );
}

/// Flipped bits in a node's shard files: reads still give the right bytes
/// (from the other shards), and the node counts the checksum failures.
#[test]
fn flipped_bits_are_read_around_and_counted() {
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("rot", "64MiB", &[]);
    let device = c.attach("rot");
    let input = c.dir.path().join("input");
    random_file(&input, 64 << 20, 4);
    let (ok, err) = write_device(&input, &device);
    assert!(ok, "{err}");
    // Damage every shard file of two nodes at many places.
    for i in [1, 4] {
        let shards = c.nodes[i].data_dir.join("shards");
        for entry in std::fs::read_dir(&shards).unwrap() {
            let path = entry.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            let len = bytes.len();
            for k in 1..200 {
                let at = len / 200 * k + 37;
                if at < len {
                    bytes[at] ^= 0x40;
                }
            }
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let back = c.dir.path().join("back");
    let (ok, err) = read_device(&device, &back, 64 << 20);
    assert!(ok, "{err}");
    assert!(same(&input, &back), "a corrupt block was returned as data");
    let failures: u64 = [1, 4]
        .iter()
        .map(|&i| c.nodes[i].metric("tessera_store_checksum_failures_total"))
        .sum();
    assert!(failures > 0, "no checksum failure counted");
}

/// A second writer attaches (another process): the first one's next write
/// is refused as fenced, and what it wrote after the second attached never
/// lands.
#[test]
fn a_second_writer_fences_the_first() {
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("shared", "16MiB", &[]);
    let first = c.attach("shared");
    let before = c.dir.path().join("before");
    random_file(&before, 4 << 20, 5);
    assert!(write_device(&before, &first).0);
    let second_run = c.dir.path().join("run2");
    let second = c.attach_in("shared", &second_run);
    let after = c.dir.path().join("after");
    random_file(&after, 4 << 20, 6);
    let (ok, err) = write_device(&after, &first);
    assert!(!ok, "the fenced writer's write was acknowledged");
    assert!(!err.is_empty());
    let log = std::fs::read_to_string(c.run_dir().join("shared").join("attach.log")).unwrap();
    assert!(
        log.contains("fenced"),
        "no fencing error in the first writer's log:\n{log}"
    );
    let back = c.dir.path().join("back");
    assert!(read_device(&second, &back, 4 << 20).0);
    assert!(same(&before, &back), "the fenced writer's data landed");
}

/// One 4 KiB block as the writer below writes it: its number and
/// generation, then bytes derived from both.
fn pattern(block: u64, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation;
    while out.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned(*mut u8);

impl Aligned {
    fn new() -> Aligned {
        let mut p = std::ptr::null_mut();
        // SAFETY: posix_memalign into a valid pointer.
        assert_eq!(unsafe { libc::posix_memalign(&mut p, 4096, 4096) }, 0);
        Aligned(p as *mut u8)
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: 4096 bytes allocated above, owned here.
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated by posix_memalign.
        unsafe { libc::free(self.0 as *mut libc::c_void) };
    }
}

/// The attach process is SIGKILLed while a writer writes and flushes: after
/// attaching again, every block holds what its last acknowledged flush
/// covered (or a later write), and none is torn.
#[test]
fn a_killed_attach_process_keeps_every_flushed_block_and_tears_none() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BLOCKS: u64 = 2048;
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("crash", "8MiB", &[]);
    let device = c.attach("crash");
    let state = c.attach_state("crash", &c.run_dir());
    let daemon = state["pid"].as_u64().unwrap();
    let writer = std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&device)
            .unwrap();
        let mut acked = vec![0u64; BLOCKS as usize];
        let mut pending = Vec::new();
        let mut buf = Aligned::new();
        let mut x: u64 = 12345;
        for generation in 1.. {
            for _ in 0..32 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let block = (x >> 33) % BLOCKS;
                buf.slice().copy_from_slice(&pattern(block, generation));
                if file.write_all_at(buf.slice(), block * 4096).is_err() {
                    return acked;
                }
                pending.push((block, generation));
            }
            if file.sync_data().is_err() {
                return acked;
            }
            for (block, g) in pending.drain(..) {
                acked[block as usize] = acked[block as usize].max(g);
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_secs(3));
    sh(&format!("kill -KILL {daemon}"));
    let acked = writer.join().unwrap();
    let flushed = acked.iter().filter(|&&g| g > 0).count();
    assert!(
        flushed > 100,
        "only {flushed} blocks acknowledged before the kill"
    );
    let device = c.attach("crash");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&device)
        .unwrap();
    let mut buf = Aligned::new();
    for block in 0..BLOCKS {
        file.read_exact_at(buf.slice(), block * 4096).unwrap();
        let got = buf.slice().to_vec();
        let index = u64::from_le_bytes(got[..8].try_into().unwrap());
        let generation = u64::from_le_bytes(got[8..16].try_into().unwrap());
        if got.iter().all(|&b| b == 0) {
            assert_eq!(
                acked[block as usize], 0,
                "block {block}: acknowledged content lost"
            );
            continue;
        }
        assert_eq!(index, block, "block {block} holds another block's content");
        assert!(
            generation >= acked[block as usize],
            "block {block}: generation {generation} older than the acknowledged {}",
            acked[block as usize]
        );
        assert_eq!(got, pattern(block, generation), "block {block} is torn");
    }
}

/// ext4 on the volume: files written and synced; with two nodes SIGKILLed,
/// `e2fsck -fn` is clean and the files read back with their checksums.
#[test]
fn ext4_survives_two_lost_nodes() {
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("fs", "128MiB", &[]);
    let device = c.attach("fs");
    sh(&format!("mkfs.ext4 -q {device}"));
    let mnt = c.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let guard = MountGuard(mnt.clone());
    sh(&format!("mount {device} {}", mnt.display()));
    for i in 0..20 {
        random_file(
            &mnt.join(format!("f{i}")),
            (i + 1) * 200_000,
            100 + i as u64,
        );
    }
    sh("sync");
    let sums = sh(&format!("cd {} && md5sum f*", mnt.display()));
    sh(&format!("umount {}", mnt.display()));
    c.kill_node(1);
    c.kill_node(4);
    let fsck = try_sh(&format!("e2fsck -fn {device}"));
    assert!(fsck.0, "e2fsck found problems: {}", fsck.1);
    sh(&format!("mount -o ro,noload {device} {}", mnt.display()));
    let again = sh(&format!("cd {} && md5sum f*", mnt.display()));
    assert_eq!(again, sums);
    drop(guard);
}

/// Bad input gets a clear message and changes nothing.
#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let mut c = Cluster::start(ControlPlaneKind::Tessera, 6);
    c.create("kept", "8MiB", &[]);
    let _device = c.attach("kept");
    let before = c.ok(&["volume", "list", "-o", "json"]);
    let cases: [(&[&str], &str); 8] = [
        (&["volume", "create", "v", "--size", "0"], "invalid size 0"),
        (
            &["volume", "create", "v", "--size", "garbage"],
            "invalid size",
        ),
        (
            &[
                "volume",
                "create",
                "v",
                "--size",
                "1MiB",
                "--data-shards",
                "6",
                "--parity-shards",
                "2",
            ],
            "needs 8 live storage nodes",
        ),
        (
            &["volume", "create", "kept", "--size", "1MiB"],
            "already exists",
        ),
        (
            &["volume", "create", "bad/name", "--size", "1MiB"],
            "invalid volume name",
        ),
        (
            &[
                "volume",
                "create",
                "v",
                "--size",
                "1MiB",
                "--write-quorum",
                "9",
            ],
            "invalid --write-quorum",
        ),
        (
            &[
                "volume",
                "attach",
                "missing",
                "--run-dir",
                "/tmp/tessera-store-test-none",
            ],
            "no volume named \"missing\"",
        ),
        (&["volume", "info", "missing"], "no volume named"),
    ];
    for (args, expected) in cases {
        let err = c.fails(args);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            err.lines().count() <= 2,
            "{args:?}: not a clear one-line message: {err}"
        );
    }
    let err = c.fails(&["volume", "delete", "kept"]);
    assert!(err.contains("is attached"), "{err}");
    assert_eq!(c.ok(&["volume", "list", "-o", "json"]), before);
    // A node started on another node's data directory is refused.
    let mut cmd = c.node_command(0);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let name_at = args.iter().position(|a| a == "--name").unwrap() + 1;
    let mut args = args;
    args[name_at] = "intruder".into();
    let port = common::free_port();
    let listen_at = args.iter().position(|a| a == "--listen").unwrap() + 1;
    args[listen_at] = format!("127.0.0.1:{port}");
    cmd = std::process::Command::new(common::store_bin());
    cmd.args(&args);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another") || err.contains("belongs to node"),
        "{err}"
    );
    c.detach("kept");
    c.ok(&["volume", "delete", "kept"]);
    assert!(!c.ok(&["volume", "list"]).contains("kept"));
}

/// The same lifecycle with Debian's etcd as the control plane: the
/// metadata layer speaks plain etcd v3. Deleting gives the space back.
#[test]
fn the_data_plane_runs_on_etcd_too() {
    let mut c = Cluster::start(ControlPlaneKind::Etcd, 6);
    c.create("on-etcd", "32MiB", &[]);
    let info = c.ok(&["volume", "info", "on-etcd", "-o", "json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["health"], "healthy");
    let device = c.attach("on-etcd");
    let input = c.dir.path().join("input");
    random_file(&input, 16 << 20, 7);
    assert!(write_device(&input, &device).0);
    // Every group commit's latency is on /metrics as a histogram.
    let synced: u64 = (0..6)
        .map(|i| c.nodes[i].metric("tessera_store_sync_duration_seconds_count"))
        .sum();
    assert!(synced > 0, "no shard log sync latency recorded");
    let back = c.dir.path().join("back");
    c.kill_node(5);
    assert!(read_device(&device, &back, 16 << 20).0);
    assert!(same(&input, &back));
    c.start_node(5);
    c.detach("on-etcd");
    let used = |c: &Cluster| -> u64 {
        (0..6)
            .map(|i| c.nodes[i].metric("tessera_store_used_bytes"))
            .sum()
    };
    let before = used(&c);
    assert!(before > 16 << 20, "used {before}");
    c.ok(&["volume", "delete", "on-etcd"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while used(&c) > before / 4 {
        assert!(
            Instant::now() < deadline,
            "space not given back: {} bytes used",
            used(&c)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
