//! Serving the CSI services on a unix socket.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tessera_proto::csi::controller_server::ControllerServer;
use tessera_proto::csi::identity_server::IdentityServer;
use tessera_proto::csi::node_server::NodeServer;
use tessera_store::daemon::Launcher;
use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::ControllerService;
use crate::identity::{ControlPlane, IdentityService};
use crate::locks::Locks;
use crate::node::{self, NodeService};

/// Which services this process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
}

pub struct Config {
    /// `unix:///path/csi.sock` (or a plain path).
    pub endpoint: String,
    pub mode: Mode,
    pub node_id: String,
    pub endpoints: Vec<String>,
    pub run_dir: PathBuf,
    pub managed_dir: PathBuf,
    pub launcher: Launcher,
}

/// The socket path an endpoint names.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.is_empty() || !path.starts_with('/') {
        bail!("--endpoint {endpoint:?}: expected unix:///absolute/path/csi.sock");
    }
    Ok(PathBuf::from(path))
}

/// Serves until `shutdown` completes.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let socket = socket_path(&config.endpoint)?;
    prepare_socket(&socket)?;
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let control_plane = ControlPlane::new(config.endpoints.clone());
    let locks = Locks::default();
    let controller = matches!(config.mode, Mode::Controller | Mode::All);
    let node = matches!(config.mode, Mode::Node | Mode::All);
    let mut router =
        tonic::transport::Server::builder().add_service(IdentityServer::new(IdentityService {
            control_plane: control_plane.clone(),
            controller,
        }));
    if controller {
        router = router.add_service(ControllerServer::new(ControllerService {
            control_plane: control_plane.clone(),
            locks: locks.clone(),
        }));
    }
    if node {
        std::fs::create_dir_all(&config.run_dir)
            .with_context(|| format!("cannot create {}", config.run_dir.display()))?;
        let found = node::recover(&config.run_dir);
        tracing::info!(attached = found.len(), run_dir = %config.run_dir.display(), "node state recovered");
        router = router.add_service(NodeServer::new(NodeService {
            control_plane,
            locks,
            node_id: config.node_id.clone(),
            run_dir: config.run_dir.clone(),
            managed_dir: config.managed_dir.clone(),
            launcher: config.launcher.clone(),
        }));
    }
    tracing::info!(socket = %socket.display(), mode = ?config.mode, node_id = %config.node_id, "serving CSI");
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("the gRPC server failed")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// A socket left by an earlier process is replaced; anything else at that
/// path is not.
fn prepare_socket(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; not replacing it",
                    socket.display()
                );
            }
            std::fs::remove_file(socket)
                .with_context(|| format!("cannot remove the old socket {}", socket.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", socket.display())),
    }
}
