//! Test harness: a control plane (the real `tessera`, or Debian's `etcd`)
//! and real `tessera-store` node processes on loopback, each with its own
//! data directory; attached volumes are detached, their loop devices and
//! FUSE mounts removed, and every process killed when the harness drops,
//! even when the test failed.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `tessera-store` binary: this package's, or (when the CSI driver's
/// tests use this harness) the one built next to `tessera-csi`.
pub fn store_bin() -> PathBuf {
    match (
        option_env!("CARGO_BIN_EXE_tessera-store"),
        option_env!("CARGO_BIN_EXE_tessera-csi"),
    ) {
        (Some(store), _) => PathBuf::from(store),
        (None, Some(csi)) => {
            let bin = Path::new(csi).with_file_name("tessera-store");
            assert!(
                bin.exists(),
                "{} is missing: build the workspace first (cargo build --workspace --bins)",
                bin.display()
            );
            bin
        }
        (None, None) => panic!("no tessera-store binary known to this test"),
    }
}

/// The `tessera` binary, built next to this one by the workspace build.
pub fn tessera_bin() -> PathBuf {
    let bin = store_bin().with_file_name("tessera");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago, below the ephemeral range.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        if NEXT.load(Ordering::Relaxed) == 0 {
            NEXT.store(
                rand::thread_rng().gen_range(20_000..31_000),
                Ordering::Relaxed,
            );
        }
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        if port >= 32_000 {
            NEXT.store(0, Ordering::Relaxed);
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A process killed with SIGKILL and reaped when dropped.
pub struct Proc(Option<Child>);

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc(Some(child))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ControlPlaneKind {
    Tessera,
    Etcd,
}

pub struct Node {
    pub name: String,
    pub port: u16,
    pub metrics_port: u16,
    pub data_dir: PathBuf,
    pub zone: String,
    log: PathBuf,
    proc: Proc,
}

impl Node {
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn running(&self) -> bool {
        self.proc.0.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Prometheus text of the node's `/metrics`.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return String::new();
        };
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw
    }

    /// The value of counter or gauge `name`.
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A control plane and storage nodes, with a run directory for attaches.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    pub kind: ControlPlaneKind,
    control: Proc,
    pub nodes: Vec<Node>,
    /// Run directories attaches used (cleaned on drop).
    pub run_dirs: Vec<PathBuf>,
    /// Extra flags of every node's `serve`.
    pub node_args: Vec<String>,
}

impl Cluster {
    /// A control plane of `kind` and `n` nodes in zones z0..z2.
    pub fn start(kind: ControlPlaneKind, n: usize) -> Cluster {
        Cluster::start_with(kind, n, &[])
    }

    /// The same, every node started with `node_args` too.
    pub fn start_with(kind: ControlPlaneKind, n: usize, node_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let client_port = free_port();
        let peer_port = free_port();
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = match kind {
            ControlPlaneKind::Tessera => Command::new(tessera_bin()),
            ControlPlaneKind::Etcd => Command::new("etcd"),
        };
        cmd.arg("--name=cp")
            .arg(format!("--data-dir={}", dir.path().join("cp").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=cp={peer}"));
        let control = Proc::spawn(cmd, &dir.path().join("cp.log"));
        let mut cluster = Cluster {
            run_dirs: vec![dir.path().join("run")],
            dir,
            client_port,
            kind,
            control,
            nodes: Vec::new(),
            node_args: node_args.iter().map(|a| a.to_string()).collect(),
        };
        cluster.wait_control_plane();
        for i in 0..n {
            cluster.add_node(&format!("z{}", i % 3));
        }
        cluster.wait_alive(n);
        cluster
    }

    pub fn endpoints(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run_dirs[0].clone()
    }

    fn wait_control_plane(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(store_bin())
                .args(["--endpoints", &self.endpoints(), "node", "list"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "control plane not up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts one more node in `zone`.
    pub fn add_node(&mut self, zone: &str) -> usize {
        let i = self.nodes.len();
        let name = format!("n{i}");
        let node = Node {
            data_dir: self.dir.path().join(&name),
            log: self.dir.path().join(format!("{name}.log")),
            name,
            port: free_port(),
            metrics_port: free_port(),
            zone: zone.into(),
            proc: Proc(None),
        };
        self.nodes.push(node);
        self.start_node(i);
        i
    }

    pub fn node_command(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut cmd = Command::new(store_bin());
        cmd.args(["--endpoints", &self.endpoints(), "serve"])
            .args(["--name", &n.name])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(["--listen", &n.address()])
            .args(["--zone", &n.zone])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", n.metrics_port)])
            .args(&self.node_args);
        cmd
    }

    /// Starts node `i` (again) on its data directory and port.
    pub fn start_node(&mut self, i: usize) {
        let cmd = self.node_command(i);
        let log = self.nodes[i].log.clone();
        self.nodes[i].proc = Proc::spawn(cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].port)).is_err() {
            if let Some(status) = self.nodes[i].proc.exited() {
                panic!(
                    "node {} exited with {status}:\n{}",
                    self.nodes[i].name,
                    self.nodes[i].log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {} not serving:\n{}",
                self.nodes[i].name,
                self.nodes[i].log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL node `i`.
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].proc.kill();
    }

    /// SIGKILL the control plane.
    pub fn kill_control_plane(&mut self) {
        self.control.kill();
    }

    /// Waits until `n` nodes are registered alive.
    pub fn wait_alive(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(&["node", "list", "-o", "json"]);
            let alive = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .map(|v| v.iter().filter(|n| n["alive"] == true).count())
                .unwrap_or(0);
            if alive == n {
                return;
            }
            assert!(Instant::now() < deadline, "{alive} of {n} nodes alive");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `tessera-store ARGS` against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(store_bin())
            .args(["--endpoints", &self.endpoints()])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `tessera-store ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tessera-store {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `tessera-store ARGS`, which must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "tessera-store {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Creates a volume.
    pub fn create(&self, name: &str, size: &str, extra: &[&str]) {
        let mut args = vec!["volume", "create", name, "--size", size];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// Attaches `name` with run directory `run_dir`; its device.
    pub fn attach_in(&mut self, name: &str, run_dir: &Path) -> String {
        if !self.run_dirs.iter().any(|d| d == run_dir) {
            self.run_dirs.push(run_dir.to_path_buf());
        }
        let run = run_dir.to_string_lossy().into_owned();
        self.ok(&["volume", "attach", name, "--run-dir", &run])
            .trim()
            .to_string()
    }

    pub fn attach(&mut self, name: &str) -> String {
        let run = self.run_dir();
        self.attach_in(name, &run)
    }

    pub fn detach(&self, name: &str) {
        let run = self.run_dir().to_string_lossy().into_owned();
        self.ok(&["volume", "detach", name, "--run-dir", &run]);
    }

    /// Attaches snapshot `name` read-only; its device.
    pub fn attach_snapshot(&mut self, name: &str) -> String {
        let run = self.run_dir().to_string_lossy().into_owned();
        self.ok(&["snapshot", "attach", name, "--run-dir", &run])
            .trim()
            .to_string()
    }

    pub fn detach_snapshot(&self, name: &str) {
        let run = self.run_dir().to_string_lossy().into_owned();
        self.ok(&["snapshot", "detach", name, "--run-dir", &run]);
    }

    /// The sum of metric `name` over the running nodes.
    pub fn nodes_metric(&self, name: &str) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.running())
            .map(|n| n.metric(name))
            .sum()
    }

    /// The attach daemon's state (pid, device) for `name`.
    pub fn attach_state(&self, name: &str, run_dir: &Path) -> serde_json::Value {
        let raw = std::fs::read(run_dir.join(name).join("state.json")).unwrap();
        serde_json::from_slice(&raw).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Detach everything attached through this cluster: loop devices,
        // FUSE mounts and daemons must not outlive the test.
        for run in &self.run_dirs {
            let Ok(entries) = std::fs::read_dir(run) else {
                continue;
            };
            for entry in entries.flatten() {
                let state = entry.path().join("state.json");
                let Ok(raw) = std::fs::read(&state) else {
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(entry.path().join("mnt"))
                        .output();
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
                    continue;
                };
                if let Some(dev) = v["device"].as_str() {
                    for _ in 0..3 {
                        let _ = Command::new("umount").arg("-l").arg(dev).output();
                    }
                    let _ = Command::new("losetup").args(["-d", dev]).output();
                }
                if let Some(pid) = v["pid"].as_u64() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .output();
                }
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(entry.path().join("mnt"))
                    .output();
            }
        }
        for n in &mut self.nodes {
            n.proc.kill();
        }
        self.control.kill();
    }
}

/// Mounts directories created under a test's temp dir are unmounted when
/// this drops.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Runs a shell command line, which must succeed; its stdout.
pub fn sh(line: &str) -> String {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(
        out.status.success(),
        "{line} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command line; whether it succeeded, and its stderr.
pub fn try_sh(line: &str) -> (bool, String) {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file of `len` random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}
