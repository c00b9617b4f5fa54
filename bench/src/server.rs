//! Starting a tessera or etcd process for a benchmark and reading its memory.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A server process on loopback ports, killed when dropped.
pub struct BenchServer {
    pub name: String,
    pub url: String,
    child: Child,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl BenchServer {
    /// Starts `binary` (tessera or etcd: same flags) with data in `dir`.
    pub async fn start(name: &str, binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        let client = format!("http://127.0.0.1:{}", free_port()?);
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(binary)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", dir.join(name).display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=bench={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let server = BenchServer {
            name: name.to_string(),
            url: client,
            child,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        use tessera_proto::etcdserverpb::maintenance_client::MaintenanceClient;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut m) = MaintenanceClient::connect(self.url.clone()).await {
                if m.status(tessera_proto::etcdserverpb::StatusRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} did not become ready in 30 s", self.name)
    }

    /// Resident set size in KiB (`VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS line")
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
