//! Test harness for the CSI plugin: the storage harness (a real control
//! plane and real `tessera-store` nodes, see `storage/store/tests/common`)
//! plus real `tessera-csi` processes on unix sockets, each with its own
//! node id, run directory and managed directory. Everything a plugin
//! mounted under its managed directory is unmounted, and its process
//! killed, when it drops, even when the test failed; the cluster then
//! detaches what its attach daemons hold.

#![allow(dead_code)]

#[path = "../../../storage/store/tests/common/mod.rs"]
pub mod store;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tessera_proto::csi::controller_client::ControllerClient;
use tessera_proto::csi::identity_client::IdentityClient;
use tessera_proto::csi::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint, Uri};

#[allow(unused_imports)]
pub use store::{sh, try_sh, Cluster, ControlPlaneKind};

pub const CSI: &str = env!("CARGO_BIN_EXE_tessera-csi");

/// One `tessera-csi` process.
pub struct Plugin {
    pub node_id: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub run_dir: PathBuf,
    pub managed: PathBuf,
    endpoints: String,
    mode: String,
    proc: Option<std::process::Child>,
}

impl Plugin {
    /// Starts a plugin in `mode` under `dir` (its socket, run directory
    /// and managed directory `kubelet/` live there). Registers its run
    /// directory with the cluster, which detaches what is left at drop.
    pub fn start(cluster: &mut Cluster, dir: &Path, node_id: &str, mode: &str) -> Plugin {
        let dir = dir.join(node_id);
        std::fs::create_dir_all(dir.join("kubelet")).unwrap();
        let run_dir = dir.join("run");
        cluster.run_dirs.push(run_dir.clone());
        let mut p = Plugin {
            node_id: node_id.into(),
            socket: dir.join("csi.sock"),
            run_dir,
            managed: dir.join("kubelet").canonicalize().unwrap(),
            dir,
            endpoints: cluster.endpoints(),
            mode: mode.into(),
            proc: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("plugin.log"))
            .unwrap();
        let child = Command::new(CSI)
            .arg(format!("--endpoint=unix://{}", self.socket.display()))
            .arg(format!("--node-id={}", self.node_id))
            .arg(format!("--mode={}", self.mode))
            .arg(format!("--endpoints={}", self.endpoints))
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--managed-dir")
            .arg(&self.managed)
            .arg("--store-binary")
            .arg(store::store_bin())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "plugin {} not serving:\n{}",
                self.node_id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("plugin.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crashing or upgraded node plugin.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the plugin again on the same socket and directories.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        Endpoint::try_from("http://localhost")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// A path under the managed directory.
    pub fn path(&self, rel: &str) -> String {
        self.managed.join(rel).to_string_lossy().into_owned()
    }
}

/// Mount points at or under `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
        for _ in 0..3 {
            for m in mounts_under(&self.dir) {
                let _ = Command::new("umount").arg("-l").arg(&m).output();
            }
        }
    }
}

/// Capabilities as the tests ask for them.
pub mod caps {
    use tessera_proto::csi::volume_capability::access_mode::Mode;
    use tessera_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    use tessera_proto::csi::VolumeCapability;

    pub fn mount(fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
        }
    }

    pub fn block() -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }
    }
}
