//! Multi-member clusters of the real `tessera` binary on loopback, started
//! with etcd's clustering flags, with members killed (SIGKILL) and restarted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tessera_proto::etcdserverpb::{StatusRequest, StatusResponse};

use super::process::Process;
use super::{channel, free_port, TESSERA};

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// `http` or `https` for the peer URL.
    pub peer_scheme: &'static str,
    /// Everything after the binary name.
    pub args: Vec<String>,
    /// Environment variables set for the process (failpoints, say).
    pub env: Vec<(String, String)>,
    child: Option<Process>,
}

impl Member {
    /// A member named `name` in `dir`, not started.
    pub fn new(name: &str, dir: &Path) -> Member {
        Member {
            name: name.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: dir.join(name),
            log_path: dir.join(format!("{name}.log")),
            peer_scheme: "http",
            args: Vec::new(),
            env: Vec::new(),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.peer_scheme, self.peer_port)
    }

    /// Sets the flags: etcd's clustering flags for `initial_cluster` and
    /// `state`, then `extra`.
    pub fn configure(&mut self, initial_cluster: &str, state: &str, extra: &[&str]) {
        self.args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={}", self.url()),
            format!("--advertise-client-urls={}", self.url()),
            format!("--listen-peer-urls={}", self.peer_url()),
            format!("--initial-advertise-peer-urls={}", self.peer_url()),
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-state={state}"),
            "--initial-cluster-token=tessera-test".to_string(),
        ];
        self.args.extend(extra.iter().map(|s| s.to_string()));
    }

    /// Starts the process (it may not be serving yet).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let mut cmd = Command::new(TESSERA);
        cmd.args(&self.args).envs(self.env.iter().cloned());
        self.child = Some(Process::spawn(&self.name, cmd, &self.log_path));
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// SIGTERM, and waits (20 s at most) until the process has exited.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.terminate(Duration::from_secs(20)).is_none() {
                c.kill();
            }
        }
    }

    /// Waits up to `within` for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.child.as_mut().and_then(Process::exited);
            if status.is_some() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the running process (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        self.child.as_ref().expect("not running").signal(signal);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// This member's Status, if it answers within a second.
    pub async fn status(&self) -> Option<StatusResponse> {
        let fut = async {
            let mut m = MaintenanceClient::new(channel(&self.url()));
            m.status(StatusRequest {})
                .await
                .ok()
                .map(|r| r.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .ok()
            .flatten()
    }

    /// Waits until the member answers Status (30 s at most).
    pub async fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(Process::exited) {
                panic!("{} exited with {status}; log:\n{}", self.name, self.log());
            }
            if self.status().await.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not serving; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of the `etcd-client` crate bound to this member only.
    pub async fn client(&self) -> etcd_client::Client {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        etcd_client::Client::connect([self.url()], Some(options))
            .await
            .unwrap()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub members: Vec<Member>,
    pub initial_cluster: String,
}

impl Cluster {
    /// Starts `n` members named m1..mn in `dir`, each with `extra` flags, and
    /// waits until all serve and one leads.
    pub async fn start(n: usize, dir: &Path, extra: &[&str]) -> Cluster {
        Self::start_with_peer_scheme(n, dir, extra, "http", &[]).await
    }

    /// Like `start`, with environment variables `env` set for every member.
    pub async fn start_with_env(
        n: usize,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        Self::start_with_peer_scheme(n, dir, extra, "http", env).await
    }

    /// Like `start`, with `https://` peer URLs (`extra` holds the peer TLS flags).
    pub async fn start_peer_tls(n: usize, dir: &Path, extra: &[&str]) -> Cluster {
        Self::start_with_peer_scheme(n, dir, extra, "https", &[]).await
    }

    async fn start_with_peer_scheme(
        n: usize,
        dir: &Path,
        extra: &[&str],
        peer_scheme: &'static str,
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut members: Vec<Member> = (1..=n)
            .map(|i| {
                let mut m = Member::new(&format!("m{i}"), dir);
                m.peer_scheme = peer_scheme;
                m.env = env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                m
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.configure(&initial_cluster, "new", extra);
            m.spawn();
        }
        for m in &mut members {
            m.wait_serving().await;
        }
        let cluster = Cluster {
            members,
            initial_cluster,
        };
        cluster.wait_leader(Duration::from_secs(30)).await;
        cluster
    }

    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the running member that reports itself leader.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if !m.is_running() {
                continue;
            }
            if let Some(s) = m.status().await {
                if s.leader != 0 && s.header.as_ref().map(|h| h.member_id) == Some(s.leader) {
                    return Some(i);
                }
            }
        }
        None
    }

    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader().await {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts member `i` on its ports and data and waits until it serves.
    pub async fn restart(&mut self, i: usize) {
        self.members[i].kill();
        self.members[i].spawn();
        self.members[i].wait_serving().await;
    }
}
