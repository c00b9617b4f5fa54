//! Test harness: starts the real `tessera` binary and Debian's `etcd` on
//! loopback ports with throwaway data directories, and runs `etcdctl`.

#![allow(dead_code)]

pub mod cluster;
pub mod pki;
pub mod process;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_proto::etcdserverpb::kv_client::KvClient;
use tessera_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tessera_proto::etcdserverpb::{RangeRequest, StatusRequest};
use tonic::transport::{Channel, Endpoint};

use process::Process;

pub const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tessera,
    Etcd,
}

/// A running server process; killed (SIGKILL) when dropped.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// `http` or `https` for the client URL.
    pub scheme: &'static str,
    pub extra: Vec<String>,
    /// Environment variables set for the process (failpoints, say).
    pub env: Vec<(String, String)>,
    child: Option<Process>,
}

/// A port that was free a moment ago, chosen below the kernel's ephemeral
/// range (32768 and up) so that outgoing connections of concurrently running
/// tests cannot take it before the server binds it.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let mut rng = rand::thread_rng();
    loop {
        // Spread processes apart, then walk a per-process sequence.
        if NEXT.load(Ordering::Relaxed) == 0 {
            NEXT.store(rng.gen_range(20_000..31_000), Ordering::Relaxed);
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

impl Server {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Starts a server of `kind` in `dir` (data in `dir/data`, log in `dir/<kind>.log`).
    pub async fn start(kind: Kind, dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_scheme(kind, dir, extra, "http", &[]).await
    }

    /// Like `start`, with environment variables `env` set for the process.
    pub async fn start_with_env(
        kind: Kind,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Self::start_with_scheme(kind, dir, extra, "http", env).await
    }

    /// Like `start`, with an `https://` client URL (`extra` holds the TLS
    /// flags). Ready once the server logs that it serves.
    pub async fn start_tls(kind: Kind, dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_scheme(kind, dir, extra, "https", &[]).await
    }

    async fn start_with_scheme(
        kind: Kind,
        dir: &Path,
        extra: &[&str],
        scheme: &'static str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut s = Self::unstarted(kind, dir, extra, scheme, env);
        s.spawn().await;
        s
    }

    /// A server of `kind` in `dir` with its ports chosen, not started (its
    /// data directory can be prepared first; `spawn` starts it).
    pub fn unstarted(
        kind: Kind,
        dir: &Path,
        extra: &[&str],
        scheme: &'static str,
        env: &[(&str, &str)],
    ) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        Server {
            kind,
            port: free_port(),
            peer_port: free_port(),
            data_dir: dir.join("data"),
            log_path: dir.join(format!("{kind:?}.log").to_lowercase()),
            scheme,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        }
    }

    /// The command that starts this server (its flags and environment).
    pub fn command(&self) -> Command {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(match self.kind {
            Kind::Tessera => TESSERA,
            Kind::Etcd => "etcd",
        });
        cmd.arg("--name=node1")
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=node1={peer}"))
            .args(&self.extra)
            .envs(self.env.iter().cloned());
        cmd
    }

    pub async fn spawn(&mut self) {
        let name = format!("{:?}", self.kind);
        self.child = Some(Process::spawn(&name, self.command(), &self.log_path));
        self.wait_ready().await;
    }

    /// Polls Status until the server answers (30 s at most); a TLS server,
    /// which this plaintext client cannot ask, until it logs the ready line.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(Process::exited) {
                panic!("{:?} exited with {status}; log:\n{}", self.kind, self.log());
            }
            if self.scheme == "https" {
                if self.log().contains("ready to serve client requests") {
                    return;
                }
            } else {
                let mut m = self.maintenance().await;
                let status =
                    tokio::time::timeout(Duration::from_secs(2), m.status(StatusRequest {}));
                match status.await {
                    Ok(Ok(_)) => return,
                    // With auth on, Status needs a known user: refused, but
                    // answered, by a server that serves.
                    Ok(Err(e)) if e.message().starts_with("auth:") => return,
                    _ => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "{:?} not ready; log:\n{}",
                self.kind,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, as a service manager stops a server: how long it took to
    /// exit, or None when it had not exited within `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<Duration> {
        self.child.as_mut()?.terminate(within)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts the same member again on the same ports and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn kv(&self) -> KvClient<Channel> {
        KvClient::new(channel(&self.url())).max_decoding_message_size(64 << 20)
    }

    pub async fn maintenance(&self) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(channel(&self.url())).max_decoding_message_size(64 << 20)
    }

    /// A client from the `etcd-client` crate, as applications use.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None)
            .await
            .unwrap()
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoint(), args, None)
    }

    pub fn etcdctl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        etcdctl(&self.endpoint(), args, Some(stdin))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A lazily connecting channel to `url` whose calls fail after 30 s instead
/// of hanging a test on a server that stopped answering.
pub fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_lazy()
}

/// Runs Debian's etcdctl (v3 API) against `endpoint`.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=3s")
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is not installed (apt-get install etcd-client)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// "Code: message" of a failed `etcd-client` call.
pub fn status_text(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        e => format!("not a gRPC status: {e}"),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The store's current revision, from the header of a count-only range.
pub async fn current_rev(kv: &mut KvClient<Channel>) -> i64 {
    let r = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        count_only: true,
        ..Default::default()
    };
    kv.range(r)
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision
}
