//! Starting tessera or etcd (one member or a cluster on loopback, with the
//! same flags for both) for a benchmark, and reading its memory and disk use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running member, killed when dropped.
pub struct Member {
    pub name: String,
    pub url: String,
    pub data_dir: PathBuf,
    child: Child,
}

/// One or more members started together as a new cluster.
pub struct BenchServer {
    pub name: String,
    pub url: String,
    pub members: Vec<Member>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl BenchServer {
    /// Starts `binary` (tessera or etcd: same flags) as one member in `dir`.
    pub async fn start(name: &str, binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        Self::start_cluster(name, binary, dir, 1).await
    }

    /// Starts `members` members of `binary` in `dir` as a new cluster and
    /// waits until every one answers.
    pub async fn start_cluster(
        name: &str,
        binary: &Path,
        dir: &Path,
        members: usize,
    ) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..members)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("{name}{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut started = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let member = format!("{name}{i}");
            let client = format!("http://127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            let data_dir = dir.join(&member);
            let log = std::fs::File::create(dir.join(format!("{member}.log")))?;
            let child = Command::new(binary)
                .arg(format!("--name={member}"))
                .arg(format!("--data-dir={}", data_dir.display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster={initial_cluster}"))
                .arg("--initial-cluster-state=new")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            started.push(Member {
                name: member,
                url: client,
                data_dir,
                child,
            });
        }
        for m in &started {
            m.wait_ready().await?;
        }
        Ok(BenchServer {
            name: name.to_string(),
            url: started[0].url.clone(),
            members: started,
        })
    }

    /// The client URLs of all members, comma-separated.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// Resident set size of the first member in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.members[0].proc_status_kib("VmRSS:")
    }

    /// The largest peak resident set size (`VmHWM`) of any member, in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let mut peak = 0;
        for m in &self.members {
            peak = peak.max(m.proc_status_kib("VmHWM:")?);
        }
        Ok(peak)
    }

    /// CPU time (user + system) all members have used so far. On a machine
    /// the load generator shares, CPU per request is what compares servers
    /// fairly: throughput there is bounded by both together.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let mut total = Duration::ZERO;
        for m in &self.members {
            total += m.cpu_time()?;
        }
        Ok(total)
    }

    /// Bytes on disk under the first member's data directory.
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.members[0].data_dir)
    }
}

impl Member {
    async fn wait_ready(&self) -> anyhow::Result<()> {
        use tessera_proto::etcdserverpb::maintenance_client::MaintenanceClient;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut m) = MaintenanceClient::connect(self.url.clone()).await {
                let status = m.status(tessera_proto::etcdserverpb::StatusRequest {});
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), status).await {
                    if s.into_inner().leader != 0 {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} did not become ready with a leader in 30 s", self.name)
    }

    fn cpu_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the line, in clock ticks.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            Ok(fields.get(i).context("short /proc stat line")?.parse()?)
        };
        // fields[0] is the 3rd field (state), so utime (14th) is fields[11].
        let total = ticks(11)? + ticks(12)?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_millis(total * 1000 / hz))
    }

    fn proc_status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} line"))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Total size of the regular files under `path` (allocated blocks, as `du`
/// counts them, so preallocated files count fully).
pub fn dir_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
