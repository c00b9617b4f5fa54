//! The data-plane workload: a 4+2 volume on six storage nodes, attached in
//! the client host as a block device, and a writer that writes versions of
//! blocks with O_DIRECT and flushes (fdatasync) every few writes, recording
//! which versions each successful flush acknowledged. The volume is read
//! back (writer held) after every fault, and once more at the end through
//! a fresh attach, and every acknowledged version must be there.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_chaos::blocks::{check_fenced, check_readback, decode, encode, BlockWrite};
use tessera_chaos::cluster::{Cluster, STORE_PORT};

use crate::lock;
use tessera_chaos::netns::{Host, Network};

pub const VOLUME: &str = "chaosvol";
/// Volume size: a few segments, so faults hit stripes of several.
pub const VOLUME_BYTES: u64 = 256 << 20;
const BLOCK: usize = 4096;
/// Blocks the writer uses, spread evenly over the volume.
const BLOCKS: u64 = 2048;
/// Writes between flushes.
const WRITES_PER_FLUSH: usize = 8;

/// Byte offset of the writer's block `b`.
fn offset(b: u64) -> u64 {
    let stride = VOLUME_BYTES / BLOCKS;
    b * (stride - stride % BLOCK as u64)
}

/// A 4 KiB buffer aligned for O_DIRECT.
struct Aligned(Box<AlignedBlock>);

#[repr(C, align(4096))]
struct AlignedBlock([u8; BLOCK]);

impl Aligned {
    fn new() -> Aligned {
        Aligned(Box::new(AlignedBlock([0; BLOCK])))
    }
}

/// `tessera-store` run in the client host against the control plane.
#[derive(Clone)]
pub struct StoreCli {
    store: PathBuf,
    endpoints: String,
    client: Host,
}

/// How long one `tessera-store` command may take before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

impl StoreCli {
    pub fn new(cluster: &Cluster, store: &Path) -> StoreCli {
        StoreCli {
            store: store.to_path_buf(),
            endpoints: cluster.endpoints().join(","),
            client: cluster.net.hosts[cluster.client_host].clone(),
        }
    }

    /// The same commands, run in `host`.
    pub fn in_host(&self, host: Host) -> StoreCli {
        StoreCli {
            client: host,
            ..self.clone()
        }
    }

    /// Runs `tessera-store ARGS`; killed after `CLI_TIMEOUT`.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        let child = Network::command(&self.client, &self.store.to_string_lossy())?
            .arg(format!("--endpoints={}", self.endpoints))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running tessera-store {args:?}"))?;
        let pid = child.id();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let out = child.wait_with_output();
            let _ = done_tx.send(());
            out
        });
        if done_rx.recv_timeout(CLI_TIMEOUT).is_err() {
            // SAFETY: kill(2) of our child, which the waiter thread has not
            // reaped (it has not finished).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        let out = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiting for tessera-store panicked"))?
            .with_context(|| format!("running tessera-store {args:?}"))?;
        Ok(out)
    }

    /// Runs `tessera-store ARGS`, which must succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "tessera-store {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until `n` storage nodes are registered alive.
    pub fn wait_nodes(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.run(&["node", "list", "-o", "json"])?;
            let alive = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .map(|v| v.iter().filter(|n| n["alive"] == true).count())
                .unwrap_or(0);
            if alive >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {alive} of {n} storage nodes alive");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates the 4+2 volume.
    pub fn create(&self) -> anyhow::Result<()> {
        let size = VOLUME_BYTES.to_string();
        self.ok(&[
            "volume",
            "create",
            VOLUME,
            "--size",
            &size,
            "--data-shards",
            "4",
            "--parity-shards",
            "2",
        ])
        .map(|_| ())
    }

    /// Attaches the volume; its device.
    pub fn attach(&self, run_dir: &Path) -> anyhow::Result<String> {
        let run = run_dir.to_string_lossy().into_owned();
        self.ok(&["volume", "attach", VOLUME, "--run-dir", &run])
    }

    pub fn detach(&self, run_dir: &Path) -> anyhow::Result<()> {
        let run = run_dir.to_string_lossy().into_owned();
        self.ok(&["volume", "detach", VOLUME, "--run-dir", &run])
            .map(|_| ())
    }

    /// Waits until `repair status` says healthy.
    pub fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.ok(&["repair", "status", "-o", "json"])?;
            let state = serde_json::from_str::<serde_json::Value>(&out)
                .ok()
                .and_then(|v| v["state"].as_str().map(str::to_string))
                .unwrap_or_default();
            if state == "healthy" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("repair did not converge: {out}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Removes what attaches left in `run_dir` when `volume detach` could not
/// (the control plane gone, a daemon stuck): the loop device, the attach
/// daemon, its FUSE mount.
fn force_detach(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            continue;
        };
        if let Some(device) = state["device"].as_str() {
            let _ = std::process::Command::new("losetup")
                .args(["-d", device])
                .status();
        }
        if let Some(pid) = state["pid"].as_i64() {
            // SAFETY: kill(2) of the attach daemon this run started.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        if let Some(mountpoint) = state["mountpoint"].as_str() {
            let _ = std::process::Command::new("umount")
                .args(["-l", mountpoint])
                .status();
        }
        eprintln!(
            "tessera-chaos: forced the attach in {} away",
            entry.path().display()
        );
    }
}

/// Detaches the volume attached with `run_dir`, by force when `volume
/// detach` cannot (nothing to do when it is not attached).
pub fn detach_or_force(cli: &StoreCli, run_dir: &Path) {
    if let Err(e) = cli.detach(run_dir) {
        if !format!("{e:#}").contains("not attached") {
            eprintln!("tessera-chaos: detaching {VOLUME}: {e:#}");
            force_detach(run_dir);
        }
    }
}

/// The writer's record and controls.
#[derive(Clone)]
pub struct Writer {
    pub writes: Arc<Mutex<Vec<BlockWrite>>>,
    /// Held while the volume is read back: the writer waits.
    pub hold: Arc<Mutex<()>>,
    /// Set by a readback waiting for `hold`: the writer does not take it
    /// again until the readback has (std's mutex is not fair, and the
    /// writer re-locks within nanoseconds of unlocking).
    pub readback_waiting: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
    /// Set when `run` returns.
    pub finished: Arc<AtomicBool>,
    pub flushes_ok: Arc<AtomicU64>,
    pub flushes_failed: Arc<AtomicU64>,
    pub epoch: Instant,
}

impl Writer {
    pub fn new(epoch: Instant) -> Writer {
        Writer {
            writes: Arc::default(),
            hold: Arc::default(),
            readback_waiting: Arc::default(),
            stop: Arc::default(),
            finished: Arc::default(),
            flushes_ok: Arc::default(),
            flushes_failed: Arc::default(),
            epoch,
        }
    }

    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Stops the writer and waits (up to a minute) until it has.
    pub fn stop_and_wait(&self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.finished.load(Ordering::Relaxed) {
            if Instant::now() > deadline {
                bail!("the writer did not stop within 60 s (its I/O stuck?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Writes and flushes until stopped. A failed flush leaves the writes
    /// since the last good flush unacknowledged for good: a later flush
    /// that succeeds does not vouch for them (fsyncgate).
    pub fn run(&self, device: &str, seed: u64) -> anyhow::Result<()> {
        let _finished = crate::StopOnDrop(self.finished.clone());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(device)
            .with_context(|| format!("opening {device}"))?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0xb10c);
        let mut versions = vec![0u64; BLOCKS as usize];
        let mut buf = Aligned::new();
        let mut pending: Vec<usize> = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            while self.readback_waiting.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _held = lock(&self.hold);
            for _ in 0..WRITES_PER_FLUSH {
                let b = rng.gen_range(0..BLOCKS);
                versions[b as usize] += 1;
                let version = versions[b as usize];
                buf.0 .0.copy_from_slice(&encode(b, version, BLOCK));
                // Recorded before it is issued: a readback may see it as
                // soon as it is in flight.
                let index = {
                    let mut writes = lock(&self.writes);
                    writes.push(BlockWrite {
                        block: b,
                        version,
                        called: self.now(),
                        flushed: None,
                    });
                    writes.len() - 1
                };
                if file.write_all_at(&buf.0 .0, offset(b)).is_ok() {
                    pending.push(index);
                }
            }
            let flushed = file.sync_data();
            let now = self.now();
            let mut writes = lock(&self.writes);
            if flushed.is_ok() {
                self.flushes_ok.fetch_add(1, Ordering::Relaxed);
                for i in pending.drain(..) {
                    writes[i].flushed = Some(now);
                }
            } else {
                self.flushes_failed.fetch_add(1, Ordering::Relaxed);
                pending.clear();
                drop(writes);
                drop(_held);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }
}

/// Reads every block of `device` back (O_DIRECT) and checks it against
/// `writes`, with the writer held.
pub fn readback(writer: &Writer, device: &str) -> anyhow::Result<Result<(), String>> {
    writer.readback_waiting.store(true, Ordering::Release);
    let _held = lock(&writer.hold);
    writer.readback_waiting.store(false, Ordering::Release);
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("opening {device}"))?;
    let called = writer.now();
    let mut buf = Aligned::new();
    let mut reads = Vec::with_capacity(BLOCKS as usize);
    for b in 0..BLOCKS {
        match file.read_exact_at(&mut buf.0 .0, offset(b)) {
            Ok(()) => reads.push(decode(b, &buf.0 .0)),
            Err(e) => return Ok(Err(format!("reading block {b} failed: {e}"))),
        }
    }
    let writes = lock(&writer.writes);
    Ok(check_readback(&writes, &reads, called).map_err(|e| e.to_string()))
}

/// The run directory of attaches in the report directory.
pub fn run_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

/// How many versions reads could see: written, acknowledged.
pub fn counts(writer: &Writer) -> (usize, usize) {
    let writes = lock(&writer.writes);
    (
        writes.len(),
        writes.iter().filter(|w| w.flushed.is_some()).count(),
    )
}

/// A checker's verdict from what it returned: `Ok(Ok)` passed, `Ok(Err)`
/// found a violation, `Err` could not check.
fn verdict(checker: &str, result: anyhow::Result<Result<String, String>>) -> crate::Verdict {
    let (ok, detail) = match result {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(e)) => (false, e),
        Err(e) => (false, format!("{e:#}")),
    };
    crate::Verdict {
        checker: checker.into(),
        ok,
        detail,
    }
}

/// After the faults, healed (the writer still writing): the attached
/// volume reads back every acknowledged version; a second writer fences
/// the first (split brain, which stops the writer); repair converges; a
/// fresh attach reads back every acknowledged version (nothing served from
/// an attach's memory), also with pairs of storage nodes down. Stops
/// between steps once `give_up` is set.
pub fn final_checks(
    cluster: &Mutex<Cluster>,
    cli: &StoreCli,
    run_dir: &Path,
    writer: &Writer,
    device: &str,
    give_up: &AtomicBool,
) -> Vec<crate::Verdict> {
    let (written, acked) = counts(writer);
    let summary = format!("{written} block writes, {acked} acknowledged");
    let mut verdicts = vec![verdict(
        "readback after healing",
        readback(writer, device).map(|r| r.map(|()| summary)),
    )];
    verdicts.extend(split_brain(cluster, cli, run_dir, writer));
    if let Err(e) = writer.stop_and_wait() {
        verdicts.push(verdict("writer stops", Err(e)));
    }
    if give_up.load(Ordering::Relaxed) {
        return verdicts;
    }
    verdicts.push(verdict(
        "repair converges",
        cli.wait_healthy(Duration::from_secs(120))
            .map(|()| Ok(String::new())),
    ));
    let fresh = (|| {
        cli.detach(run_dir)?;
        let device = cli.attach(run_dir)?;
        let checked = readback(writer, &device);
        cli.detach(run_dir)?;
        checked.map(|r| r.map(|()| String::new()))
    })();
    verdicts.push(verdict("readback through a fresh attach", fresh));
    if give_up.load(Ordering::Relaxed) {
        return verdicts;
    }
    verdicts.push(verdict(
        "any two storage nodes can be lost",
        redundancy_restored(cluster, cli, run_dir, writer, give_up),
    ));
    verdicts
}

/// Repair (and the writer's own retries) gave every stripe back all its
/// shards: with any two storage nodes down (as many as the 4+2 code
/// tolerates), a fresh attach still reads back every acknowledged version.
/// Shards a node missed while it was faulted and nobody rebuilt show up
/// here, where reads during the run rebuilt around them: a block must be
/// rebuilt (its data shard's node down) while the missing shard's node is
/// up. So each node is down with two different partners (a block on node
/// 0 whose stripe misses its shard on node 1 reads fine with 0 and 1 down,
/// and fails with 5 and 0 down); each pair is killed, checked, and
/// restarted.
fn redundancy_restored(
    cluster: &Mutex<Cluster>,
    cli: &StoreCli,
    run_dir: &Path,
    writer: &Writer,
    give_up: &AtomicBool,
) -> anyhow::Result<Result<String, String>> {
    let nodes = lock(cluster).stores.len();
    let pairs: Vec<[usize; 2]> = [0, 1]
        .iter()
        .flat_map(|shift| {
            (0..nodes / 2).map(move |i| [(shift + 2 * i) % nodes, (shift + 2 * i + 1) % nodes])
        })
        .collect();
    for pair in &pairs {
        if give_up.load(Ordering::Relaxed) {
            bail!("given up");
        }
        let names: Vec<String> = {
            let mut c = lock(cluster);
            for &i in pair {
                c.stores.kill(i);
            }
            pair.iter()
                .map(|&i| c.stores.procs[i].name.clone())
                .collect()
        };
        let checked = (|| {
            let device = cli.attach(run_dir)?;
            let read = readback(writer, &device);
            cli.detach(run_dir)?;
            read
        })();
        let addrs: Vec<std::net::SocketAddr> = {
            if give_up.load(Ordering::Relaxed) {
                // The run is cleaning up: nothing may start behind it.
                bail!("given up");
            }
            let mut c = lock(cluster);
            let c = &mut *c;
            let spawned: Vec<_> = pair.iter().map(|&i| c.stores.spawn(&c.net, i)).collect();
            for result in spawned {
                result?;
            }
            pair.iter()
                .map(|&i| (c.net.hosts[c.stores.procs[i].host].addr, STORE_PORT).into())
                .collect()
        };
        let without = names.join(" and ");
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ok(Err(format!("without {without}: {e}"))),
            Err(e) => return Ok(Err(format!("without {without}: {e:#}"))),
        }
        // Serving again (a node listens once it has registered) before
        // the next pair goes down.
        for addr in addrs {
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
                if Instant::now() > deadline {
                    bail!("storage node at {addr} did not serve again within 60 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(Ok(format!("checked without each of {} pairs", pairs.len())))
}

/// The attach run directory of the split brain's second writer.
pub fn second_run_dir(run_dir: &Path) -> PathBuf {
    run_dir.with_file_name("run-second-writer")
}

/// Split brain: the writer's host is cut off from the control plane while
/// it goes on writing, and the volume is attached again from a storage
/// node's host, which fences the first writer. No write the first writer
/// issues after that attach returned may be acknowledged, and the second
/// writer reads every version the first one had acknowledged.
fn split_brain(
    cluster: &Mutex<Cluster>,
    cli: &StoreCli,
    run_dir: &Path,
    writer: &Writer,
) -> Vec<crate::Verdict> {
    let second_dir = second_run_dir(run_dir);
    let (net_cut, second) = {
        let c = lock(cluster);
        let members: Vec<usize> = c.members.procs.iter().map(|m| m.host).collect();
        let cut = c.net.cut(&[c.client_host], &members);
        let host = c.stores.procs.first().map(|s| c.net.hosts[s.host].clone());
        (cut, host)
    };
    let result = (|| -> anyhow::Result<(Result<String, String>, Result<String, String>)> {
        net_cut?;
        let second = cli.in_host(second.context("no storage node host")?);
        let acked_at_cut = writer.flushes_ok.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
        // Retried as an orchestrator would (an attach can fail while a
        // node just restarted is slow to answer); the fence that counts is
        // the one of the attach that succeeded.
        let mut attempt = 1;
        let device = loop {
            match second.attach(&second_dir) {
                Ok(device) => break device,
                Err(e) if attempt < 3 => {
                    eprintln!("split brain: attach {attempt} failed, retrying: {e:#}");
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        let fenced_at = writer.now();
        let acked_at_fence = writer.flushes_ok.load(Ordering::Relaxed);
        eprintln!("split brain: {VOLUME} attached again as {device} from another host; the first writer is cut off from the control plane");
        // The first writer must try: a few groups of writes issued after
        // the fence (each flush fails, and it tries again).
        let issued_after = || {
            lock(&writer.writes)
                .iter()
                .filter(|w| w.called > fenced_at)
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while issued_after() < 3 * WRITES_PER_FLUSH && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        writer.stop_and_wait()?;
        let fenced = {
            let writes = lock(&writer.writes);
            let tried = writes.iter().filter(|w| w.called > fenced_at).count();
            match check_fenced(&writes, fenced_at) {
                Err(e) => Err(e.to_string()),
                Ok(()) if tried == 0 => Err(
                    "inconclusive: the first writer issued no write after the fence within 30 s"
                        .to_string(),
                ),
                Ok(()) => Ok(format!(
                    "{} flushes acknowledged while cut off before the second attach, none of {tried} writes after it",
                    acked_at_fence - acked_at_cut
                )),
            }
        };
        let read = readback(writer, &device)?.map(|()| String::new());
        second.detach(&second_dir)?;
        Ok((fenced, read))
    })();
    if let Err(e) = lock(cluster).net.heal() {
        eprintln!("tessera-chaos: healing after the split brain: {e}");
    }
    // Not to stay attached through the checks that follow when something
    // failed half way (detaching works from any host).
    detach_or_force(cli, &second_dir);
    match result {
        Ok((fenced, read)) => vec![
            verdict("fenced writer acknowledges nothing", Ok(fenced)),
            verdict("second writer reads every acknowledged write", Ok(read)),
        ],
        Err(e) => vec![verdict("split brain", Err(e))],
    }
}
