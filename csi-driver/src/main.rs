//! `tessera-csi`: the CSI plugin binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tessera_csi::server::{serve, Config, Mode};
use tessera_store::daemon::Launcher;

#[derive(Parser)]
#[command(
    name = "tessera-csi",
    version,
    about = "CSI plugin for Tessera volumes (driver csi.tessera.dev)"
)]
struct Args {
    /// The CSI socket.
    #[arg(long, default_value = "unix:///run/csi/csi.sock", env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's id (default: the host name).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Services to serve.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    mode: Mode,
    /// The control plane (comma-separated URLs, as etcdctl names them).
    #[arg(
        long,
        env = "TESSERA_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Where the attach processes of this node keep their state.
    #[arg(long, default_value = "/run/tessera-csi")]
    run_dir: PathBuf,
    /// Staging and target paths must lie under this directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    managed_dir: PathBuf,
    /// The tessera-store binary that runs attach processes (default: next
    /// to this one, else from PATH).
    #[arg(long)]
    store_binary: Option<PathBuf>,
}

fn default_store_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("tessera-store")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tessera-store"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let node_id = args.node_id.unwrap_or_else(host_name);
    if node_id.is_empty() {
        anyhow::bail!("--node-id must not be empty");
    }
    // Paths are compared with links resolved: the managed directory too.
    let managed_dir = if args.mode == Mode::Controller {
        args.managed_dir
    } else {
        args.managed_dir
            .canonicalize()
            .with_context(|| format!("--managed-dir {}", args.managed_dir.display()))?
    };
    let config = Config {
        endpoint: args.endpoint,
        mode: args.mode,
        node_id: node_id.clone(),
        endpoints: args.endpoints,
        run_dir: args.run_dir,
        managed_dir,
        launcher: Launcher {
            program: args.store_binary.unwrap_or_else(default_store_binary),
            host: Some(node_id),
        },
    };
    serve(config, async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
    .await
}
