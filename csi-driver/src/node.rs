//! The Node service: attach, format (only what was read as blank), mount,
//! bind into pods, report usage, grow.
//!
//! Staging attaches the volume with the store's attach daemon (its state
//! under `--run-dir`, keyed by volume id) and, for filesystem access,
//! mounts its filesystem at the staging path. Publishing bind mounts the
//! staging path (or, for block access, the device file) at the target
//! path. Which path presents which volume is read from the system each
//! time (device numbers), never remembered, so a restarted plugin carries
//! on where the last one stopped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tessera_proto::csi::node_server::Node;
use tessera_proto::csi::node_service_capability::{rpc, Rpc, Type as CapabilityType};
use tessera_proto::csi::*;
use tessera_store::attach;
use tessera_store::daemon::{self, Launcher, Target};
use tonic::{Request, Response, Status};

use crate::capability::{self, Access};
use crate::controller::{condition, CONTEXT_FS_TYPE};
use crate::filesystem::{self, Content, Presented};
use crate::identity::ControlPlane;
use crate::locks::{run_to_completion, Locks};
use crate::mounts;
use crate::status::{from_store, required};

#[derive(Clone)]
pub struct NodeService {
    pub control_plane: ControlPlane,
    pub locks: Locks,
    pub node_id: String,
    /// Where the attach daemons keep their state.
    pub run_dir: PathBuf,
    /// Staging and target paths must lie under it (kubelet's directory).
    pub managed_dir: PathBuf,
    pub launcher: Launcher,
}

/// Runs blocking work (commands, device I/O) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("worker failed: {e}"))?
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

/// A volume id is a directory name under the run directory: only what a
/// volume may be named.
fn check_volume_id(call: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(required(call, "volume_id"));
    }
    tessera_store::cli::check_name(id)
        .map_err(|e| Status::invalid_argument(format!("{call}: {e:#}")))
}

impl NodeService {
    fn managed(&self, path: &str, what: &str) -> Result<PathBuf, Status> {
        mounts::check_managed(&self.managed_dir, path, what).map_err(Status::invalid_argument)
    }

    /// The device of the volume if its attach daemon runs here (what a
    /// dead one left behind is cleaned up first).
    fn attached_device(&self, volume: &str) -> Option<String> {
        attach::clean_stale(&self.run_dir, volume);
        attach::read_state(&self.run_dir, volume).map(|s| s.device)
    }

    /// The device of the volume if its attach daemon runs here, read
    /// without cleaning up (for calls that do not hold the volume's lock).
    fn live_device(&self, volume: &str) -> Option<String> {
        attach::read_state(&self.run_dir, volume)
            .filter(|s| attach::attach_daemon_alive(s.pid))
            .map(|s| s.device)
    }

    async fn volume_exists(&self, volume: &str) -> Result<(), Status> {
        let meta = self.control_plane.meta().await?;
        match meta.volume(volume).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(Status::not_found(format!("no volume named {volume:?}"))),
            Err(e) => Err(from_store(e.into())),
        }
    }

    async fn detach(&self, volume: &str) -> Result<(), Status> {
        let run_dir = self.run_dir.clone();
        let target = Target::Volume(volume.to_string());
        blocking(move || daemon::detach(&run_dir, &target))
            .await
            .map_err(|e| Status::internal(format!("cannot detach volume {volume:?}: {e:#}")))
    }

    /// Formats the device if it is blank, checks its filesystem if not,
    /// and mounts it at the staging path.
    async fn stage_filesystem(
        &self,
        device: &str,
        staging: &Path,
        fs_type: String,
        flags: Vec<String>,
        read_only: bool,
    ) -> Result<(), Status> {
        let rdev = filesystem::rdev(device).map_err(internal)?;
        if mounts::is_mountpoint(staging).map_err(internal)? {
            return match filesystem::presents(staging, rdev) {
                Some(Presented::Filesystem) => Ok(()),
                _ => Err(Status::already_exists(format!(
                    "something other than this volume is mounted at {}",
                    staging.display()
                ))),
            };
        }
        let dev = device.to_string();
        let content = blocking(move || filesystem::probe(&dev))
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        match content {
            Content::Blank if read_only => {
                return Err(Status::failed_precondition(format!(
                    "the volume is blank and the request is read-only: there is no {fs_type} filesystem to mount"
                )))
            }
            Content::Blank => {
                tracing::info!(device, fs_type, "formatting a blank volume");
                let (dev, fs) = (device.to_string(), fs_type.clone());
                blocking(move || filesystem::format(&dev, &fs))
                    .await
                    .map_err(internal)?;
            }
            Content::Filesystem(found) if found == fs_type => {}
            Content::Filesystem(found) => {
                return Err(Status::failed_precondition(format!(
                    "the volume holds a {found} filesystem, not {fs_type}; it is not reformatted"
                )))
            }
            Content::Unknown(what) => {
                return Err(Status::failed_precondition(format!(
                    "the volume holds {what}; it is neither blank nor a {fs_type} filesystem and is not formatted"
                )))
            }
        }
        let (dev, path) = (device.to_string(), staging.to_path_buf());
        blocking(move || {
            std::fs::create_dir_all(&path)?;
            mounts::mount(&dev, &path, &fs_type, &flags, read_only)
        })
        .await
        .map_err(internal)
    }
}

impl NodeService {
    async fn node_stage_volume_call(
        &self,
        req: NodeStageVolumeRequest,
    ) -> Result<NodeStageVolumeResponse, Status> {
        check_volume_id("NodeStageVolume", &req.volume_id)?;
        if req.staging_target_path.is_empty() {
            return Err(required("NodeStageVolume", "staging_target_path"));
        }
        let Some(cap) = req.volume_capability.as_ref() else {
            return Err(required("NodeStageVolume", "volume_capability"));
        };
        let access = capability::check(cap).map_err(Status::invalid_argument)?;
        if access == Access::Block && capability::read_only(cap) {
            return Err(Status::invalid_argument(
                "read-only block access is not supported (a bind mount cannot stop writes through a device file)",
            ));
        }
        let staging = self.managed(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        self.volume_exists(&req.volume_id).await?;
        let (device, attached_now) = match self.attached_device(&req.volume_id) {
            Some(device) => (device, false),
            None => {
                let meta = self.control_plane.meta().await?;
                // Attaching would fence a writer that still holds its
                // lease on another node: its pod would get I/O errors. A
                // lost node's lease lapses within seconds; then this works.
                if let Some(other) = meta
                    .attached(&req.volume_id)
                    .await
                    .map_err(|e| from_store(e.into()))?
                    .filter(|a| a.host != self.node_id)
                {
                    return Err(Status::failed_precondition(format!(
                        "volume {:?} is in use on node {} (its attach process {} holds a live lease); unstage it there first",
                        req.volume_id, other.host, other.pid
                    )));
                }
                let device = daemon::attach(
                    &meta,
                    &self.control_plane.endpoints,
                    &Target::Volume(req.volume_id.clone()),
                    &self.run_dir,
                    &self.launcher,
                )
                .await
                .map_err(|e| {
                    Status::unavailable(format!("cannot attach volume {:?}: {e:#}", req.volume_id))
                })?;
                tracing::info!(volume = %req.volume_id, %device, "attached");
                (device, true)
            }
        };
        let staged = match access {
            Access::Block => match mounts::is_mountpoint(&staging) {
                Ok(true) => Err(Status::already_exists(format!(
                    "volume {:?} is staged with a filesystem at {}; block access is incompatible",
                    req.volume_id,
                    staging.display()
                ))),
                Ok(false) => Ok(()),
                Err(e) => Err(internal(e)),
            },
            Access::Mount { fs_type, flags } => {
                let fs_type = if !fs_type.is_empty() {
                    fs_type
                } else {
                    let from_class = req
                        .volume_context
                        .get(CONTEXT_FS_TYPE)
                        .map(String::as_str)
                        .unwrap_or(capability::DEFAULT_FILESYSTEM);
                    if !capability::FILESYSTEMS.contains(&from_class) {
                        return Err(Status::invalid_argument(format!(
                            "volume context {CONTEXT_FS_TYPE}={from_class:?}: not a supported filesystem"
                        )));
                    }
                    from_class.to_string()
                };
                self.stage_filesystem(
                    &device,
                    &staging,
                    fs_type,
                    flags,
                    capability::read_only(cap),
                )
                .await
            }
        };
        if let Err(e) = staged {
            // Nothing half-done stays behind: a daemon this call started
            // goes again (a retry starts over).
            if attached_now {
                let _ = self.detach(&req.volume_id).await;
            }
            return Err(e);
        }
        tracing::info!(volume = %req.volume_id, staging = %staging.display(), "staged");
        Ok(NodeStageVolumeResponse {})
    }

    async fn node_unstage_volume_call(
        &self,
        req: NodeUnstageVolumeRequest,
    ) -> Result<NodeUnstageVolumeResponse, Status> {
        check_volume_id("NodeUnstageVolume", &req.volume_id)?;
        if req.staging_target_path.is_empty() {
            return Err(required("NodeUnstageVolume", "staging_target_path"));
        }
        let staging = self.managed(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let device = self.attached_device(&req.volume_id);
        let rdev = device
            .as_deref()
            .map(filesystem::rdev)
            .transpose()
            .map_err(internal)?;
        let path = staging.clone();
        let volume = req.volume_id.clone();
        let dev = device.clone();
        blocking(move || {
            while mounts::is_mountpoint(&path)? {
                // This volume's filesystem goes; so does a leftover when
                // the volume is not attached here any more (its attach
                // process died). Anything else is not ours to unmount.
                let ours = rdev.is_none_or(|r| filesystem::presents(&path, r).is_some());
                if !ours {
                    anyhow::bail!(
                        "{} holds something other than volume {volume:?}; not unmounting it",
                        path.display()
                    );
                }
                mounts::unmount(&path)?;
            }
            // Detaching under a mount would pull the device from under a
            // filesystem in use: refuse while anything still mounts it.
            if let (Some(r), Some(d)) = (rdev, dev.as_deref()) {
                let users = mounts::users_of(r, d)?;
                if !users.is_empty() {
                    anyhow::bail!(
                        "volume {volume:?} is still mounted at {} (unpublish it first)",
                        users
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        if device.is_some() {
            self.detach(&req.volume_id).await?;
            tracing::info!(volume = %req.volume_id, "unstaged and detached");
        }
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn node_publish_volume_call(
        &self,
        req: NodePublishVolumeRequest,
    ) -> Result<NodePublishVolumeResponse, Status> {
        check_volume_id("NodePublishVolume", &req.volume_id)?;
        if req.target_path.is_empty() {
            return Err(required("NodePublishVolume", "target_path"));
        }
        let Some(cap) = req.volume_capability.as_ref() else {
            return Err(required("NodePublishVolume", "volume_capability"));
        };
        if req.staging_target_path.is_empty() {
            return Err(required("NodePublishVolume", "staging_target_path"));
        }
        let access = capability::check(cap).map_err(Status::invalid_argument)?;
        let target = self.managed(&req.target_path, "target_path")?;
        let staging = self.managed(&req.staging_target_path, "staging_target_path")?;
        let read_only = req.readonly || capability::read_only(cap);
        if access == Access::Block && read_only {
            return Err(Status::invalid_argument(
                "read-only block access is not supported (a bind mount cannot stop writes through a device file)",
            ));
        }
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let device = self.attached_device(&req.volume_id).ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {:?} is not staged on this node",
                req.volume_id
            ))
        })?;
        let rdev = filesystem::rdev(&device).map_err(internal)?;
        let (want, source) = match access {
            Access::Mount { .. } => {
                if filesystem::presents(&staging, rdev) != Some(Presented::Filesystem)
                    || !mounts::is_mountpoint(&staging).map_err(internal)?
                {
                    return Err(Status::failed_precondition(format!(
                        "volume {:?} is not staged at {}",
                        req.volume_id,
                        staging.display()
                    )));
                }
                (Presented::Filesystem, staging.clone())
            }
            Access::Block => (Presented::Block, PathBuf::from(&device)),
        };
        if mounts::is_mountpoint(&target).map_err(internal)? {
            return if filesystem::presents(&target, rdev) != Some(want) {
                Err(Status::already_exists(format!(
                    "something other than volume {:?} is mounted at {}",
                    req.volume_id,
                    target.display()
                )))
            } else if mounts::is_read_only(&target).map_err(internal)? != read_only {
                Err(Status::already_exists(format!(
                    "volume {:?} is published at {} {}; this request asks for the other",
                    req.volume_id,
                    target.display(),
                    if read_only { "read-write" } else { "read-only" }
                )))
            } else {
                Ok(NodePublishVolumeResponse {})
            };
        }
        let path = target.clone();
        blocking(move || {
            match want {
                Presented::Filesystem => std::fs::create_dir_all(&path)?,
                Presented::Block => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)?;
                }
            }
            mounts::bind(&source, &path, read_only)
        })
        .await
        .map_err(internal)?;
        tracing::info!(volume = %req.volume_id, target = %target.display(), read_only, "published");
        Ok(NodePublishVolumeResponse {})
    }

    async fn node_unpublish_volume_call(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse, Status> {
        check_volume_id("NodeUnpublishVolume", &req.volume_id)?;
        if req.target_path.is_empty() {
            return Err(required("NodeUnpublishVolume", "target_path"));
        }
        let target = self.managed(&req.target_path, "target_path")?;
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let path = target.clone();
        blocking(move || {
            while mounts::is_mountpoint(&path)? {
                mounts::unmount(&path)?;
            }
            // The spec has the plugin remove what it created there.
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&path)?,
                Ok(_) => std::fs::remove_file(&path)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            Ok(())
        })
        .await
        .map_err(internal)?;
        tracing::info!(volume = %req.volume_id, target = %target.display(), "unpublished");
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn node_get_volume_stats_call(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        check_volume_id("NodeGetVolumeStats", &req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(required("NodeGetVolumeStats", "volume_path"));
        }
        self.volume_exists(&req.volume_id).await?;
        let not_here = || {
            Status::not_found(format!(
                "volume {:?} is not at {}",
                req.volume_id, req.volume_path
            ))
        };
        let device = self.live_device(&req.volume_id).ok_or_else(not_here)?;
        let rdev = filesystem::rdev(&device).map_err(internal)?;
        let path = PathBuf::from(&req.volume_path);
        let usage = match filesystem::presents(&path, rdev).ok_or_else(not_here)? {
            Presented::Filesystem => {
                let [bytes, inodes] = filesystem::usage(&path).map_err(internal)?;
                let entry = |(total, available, used): (u64, u64, u64),
                             unit: volume_usage::Unit| {
                    VolumeUsage {
                        total: total as i64,
                        available: available as i64,
                        used: used as i64,
                        unit: unit as i32,
                    }
                };
                vec![
                    entry(bytes, volume_usage::Unit::Bytes),
                    entry(inodes, volume_usage::Unit::Inodes),
                ]
            }
            Presented::Block => vec![VolumeUsage {
                total: filesystem::device_size(&device).map_err(internal)? as i64,
                unit: volume_usage::Unit::Bytes as i32,
                ..Default::default()
            }],
        };
        let meta = self.control_plane.meta().await?;
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition(&meta, &req.volume_id).await?),
        })
    }

    async fn node_expand_volume_call(
        &self,
        req: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, Status> {
        check_volume_id("NodeExpandVolume", &req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(required("NodeExpandVolume", "volume_path"));
        }
        self.volume_exists(&req.volume_id).await?;
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let not_here = || {
            Status::not_found(format!(
                "volume {:?} is not at {} on this node",
                req.volume_id, req.volume_path
            ))
        };
        let device = self.attached_device(&req.volume_id).ok_or_else(not_here)?;
        let rdev = filesystem::rdev(&device).map_err(internal)?;
        let path = PathBuf::from(&req.volume_path);
        let presented = filesystem::presents(&path, rdev).ok_or_else(not_here)?;
        // The attach daemon grows the device once it sees the new size in
        // the control plane (within a second).
        let meta = self.control_plane.meta().await?;
        let (record, _) = meta
            .volume(&req.volume_id)
            .await
            .map_err(|e| from_store(e.into()))?
            .ok_or_else(|| Status::not_found(format!("no volume named {:?}", req.volume_id)))?;
        let wanted = record.size.max(
            req.capacity_range
                .as_ref()
                .map_or(0, |r| r.required_bytes.max(0) as u64),
        );
        if wanted > record.size {
            return Err(Status::out_of_range(format!(
                "volume {:?} is {} bytes; expand it (ControllerExpandVolume) to {wanted} first",
                req.volume_id, record.size
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let size = filesystem::device_size(&device).map_err(internal)?;
            if size >= wanted {
                break;
            }
            if Instant::now() > deadline {
                return Err(Status::unavailable(format!(
                    "{device} is still {size} bytes, not {wanted}: the volume's attach process has not grown it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if presented == Presented::Filesystem {
            let (dev, mount_point) = (device.clone(), path.clone());
            blocking(move || match filesystem::probe(&dev)? {
                Content::Filesystem(fs) => filesystem::grow(&dev, &mount_point, &fs),
                other => anyhow::bail!("{dev} holds no filesystem to grow ({other:?})"),
            })
            .await
            .map_err(internal)?;
            tracing::info!(volume = %req.volume_id, size = wanted, "filesystem grown");
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: filesystem::device_size(&device).map_err(internal)? as i64,
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.node_stage_volume_call(request.into_inner()).await })
            .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.node_unstage_volume_call(request.into_inner()).await })
            .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.node_publish_volume_call(request.into_inner()).await })
            .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(
            async move { this.node_unpublish_volume_call(request.into_inner()).await },
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let this = self.clone();
        run_to_completion(
            async move { this.node_get_volume_stats_call(request.into_inner()).await },
        )
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.node_expand_volume_call(request.into_inner()).await })
            .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        let capabilities = [
            StageUnstageVolume,
            GetVolumeStats,
            ExpandVolume,
            VolumeCondition,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapabilityType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// On start: what a previous plugin left attached, as it is now (dead
/// attach daemons' leftovers are cleaned up; live ones carry on).
pub fn recover(run_dir: &Path) -> Vec<attach::AttachState> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut live = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        attach::clean_stale(run_dir, &name);
        if let Some(state) = attach::read_state(run_dir, &name) {
            tracing::info!(volume = %state.volume, device = %state.device, pid = state.pid, "found attached");
            live.push(state);
        }
    }
    live
}
