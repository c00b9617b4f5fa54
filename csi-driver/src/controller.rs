//! The Controller service: volumes and snapshots in the control plane.
//!
//! A CSI volume id is the Tessera volume's name (the CO's name for it), a
//! snapshot id the snapshot's name. Sizes are rounded up to whole 4 KiB
//! blocks; a request without a size gets [`DEFAULT_VOLUME_SIZE`] (or its
//! limit, if smaller). ControllerPublish is not used: a node attaching a
//! volume becomes its writer by bumping the volume's epoch, which fences
//! any earlier writer on any node.

use std::collections::HashMap;

use tessera_proto::csi::controller_server::Controller;
use tessera_proto::csi::controller_service_capability::{rpc, Rpc, Type as CapabilityType};
use tessera_proto::csi::volume_capability::AccessType;
use tessera_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use tessera_proto::csi::*;
use tessera_store::cli::{self, CreateRequest, DEFAULT_SEGMENT_SIZE};
use tessera_store::codec::BLOCK;
use tessera_store::meta::{Meta, SnapshotRecord, VolumeRecord};
use tessera_store::snapshots::{self, CloneSource, SNAPSHOT_TIMEOUT};
use tonic::{Request, Response, Status};

use crate::capability;
use crate::identity::ControlPlane;
use crate::locks::{run_to_completion, Locks};
use crate::paging::page;
use crate::status::{from_store, required};
use crate::DEFAULT_VOLUME_SIZE;

/// StorageClass parameters the driver reads.
pub const PARAM_DATA_SHARDS: &str = "dataShards";
pub const PARAM_PARITY_SHARDS: &str = "parityShards";
/// The filesystem, as external-provisioner names it; kept in the volume
/// context for the node when the capability names none.
pub const PARAM_FS_TYPE: &str = "csi.storage.k8s.io/fstype";
/// The largest volume: placement keeps at most 65536 segments.
pub const MAX_VOLUME_SIZE: u64 = 65_536 * DEFAULT_SEGMENT_SIZE;
/// The volume context key the node reads the filesystem from.
pub const CONTEXT_FS_TYPE: &str = "fsType";

#[derive(Clone)]
pub struct ControllerService {
    pub control_plane: ControlPlane,
    pub locks: Locks,
}

/// The code a StorageClass asks for.
struct Params {
    data_shards: u32,
    parity_shards: u32,
    fs_type: Option<String>,
}

fn parse_params(parameters: &HashMap<String, String>) -> Result<Params, Status> {
    let mut p = Params {
        data_shards: 4,
        parity_shards: 2,
        fs_type: None,
    };
    for (key, value) in parameters {
        let number = || {
            value.parse::<u32>().map_err(|_| {
                Status::invalid_argument(format!(
                    "parameter {key}: {value:?} is not a whole number"
                ))
            })
        };
        match key.as_str() {
            PARAM_DATA_SHARDS => p.data_shards = number()?,
            PARAM_PARITY_SHARDS => p.parity_shards = number()?,
            PARAM_FS_TYPE => {
                if !capability::FILESYSTEMS.contains(&value.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "parameter {key}: filesystem {value:?} is not supported (use one of {})",
                        capability::FILESYSTEMS.join(", ")
                    )));
                }
                p.fs_type = Some(value.clone());
            }
            // external-provisioner's own keys (PVC name and namespace…).
            k if k.starts_with("csi.storage.k8s.io/") => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "unknown parameter {key:?} (known: {PARAM_DATA_SHARDS}, {PARAM_PARITY_SHARDS}, {PARAM_FS_TYPE})"
                )))
            }
        }
    }
    Ok(p)
}

/// The size a capacity range asks for, rounded up to whole blocks.
fn size_for(range: Option<&CapacityRange>, default: u64) -> Result<u64, Status> {
    let block = BLOCK as u64;
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::out_of_range(format!(
            "capacity range {required}..{limit}: sizes must not be negative"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    let size = if required > 0 {
        required.div_ceil(block) * block
    } else if limit > 0 {
        default.min(limit / block * block)
    } else {
        default
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "capacity range {required}..{limit} holds no whole number of 4 KiB blocks"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Status::out_of_range(format!(
            "{size} bytes is more than a volume can hold ({MAX_VOLUME_SIZE} bytes: 65536 segments of {DEFAULT_SEGMENT_SIZE})"
        )));
    }
    Ok(size)
}

fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
    range.is_none_or(|r| {
        size >= r.required_bytes.max(0) as u64
            && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
    })
}

fn volume_message(
    record: &VolumeRecord,
    source: Option<VolumeContentSource>,
    fs_type: Option<&str>,
) -> Volume {
    let mut context = HashMap::from([
        (
            PARAM_DATA_SHARDS.to_string(),
            record.data_shards.to_string(),
        ),
        (
            PARAM_PARITY_SHARDS.to_string(),
            record.parity_shards.to_string(),
        ),
    ]);
    if let Some(fs) = fs_type {
        context.insert(CONTEXT_FS_TYPE.into(), fs.into());
    }
    Volume {
        capacity_bytes: record.size as i64,
        volume_id: record.name.clone(),
        volume_context: context,
        content_source: source,
        accessible_topology: Vec::new(),
    }
}

fn snapshot_message(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.name.clone(),
        source_volume_id: s.volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created as i64,
            nanos: 0,
        }),
        // Copy-on-write: usable the moment it exists.
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

fn invalid_name(kind: &str, e: anyhow::Error) -> Status {
    Status::invalid_argument(format!("invalid {kind} name: {e:#}"))
}

/// The volume's condition: abnormal while any segment is short of nodes
/// or being rebuilt.
pub async fn condition(meta: &Meta, name: &str) -> Result<VolumeCondition, Status> {
    let info = cli::volume_info(meta, name).await.map_err(from_store)?;
    let (record, _) = meta
        .volume(name)
        .await
        .map_err(|e| from_store(e.into()))?
        .ok_or_else(|| Status::not_found(format!("no volume named {name:?}")))?;
    let mut problems = Vec::new();
    if info.health != "healthy" {
        let short = info
            .segments
            .iter()
            .filter(|s| s.health != "healthy")
            .count();
        problems.push(format!(
            "{} ({short} of {} segments have storage nodes down)",
            info.health,
            info.segments.len()
        ));
    }
    if !record.rebuilding.is_empty() {
        problems.push(format!("{} shards being rebuilt", record.rebuilding.len()));
    }
    Ok(VolumeCondition {
        abnormal: !problems.is_empty(),
        message: if problems.is_empty() {
            "healthy".into()
        } else {
            problems.join("; ")
        },
    })
}

impl ControllerService {
    async fn meta(&self) -> Result<Meta, Status> {
        self.control_plane.meta().await
    }

    async fn volume(&self, meta: &Meta, name: &str) -> Result<Option<VolumeRecord>, Status> {
        Ok(meta
            .volume(name)
            .await
            .map_err(|e| from_store(e.into()))?
            .map(|(r, _)| r))
    }

    /// Whether `volume` was made from `source`: a clone reads through the
    /// snapshot it was made from (a hidden one of the source volume, for a
    /// clone of a volume); a new volume reads through nothing.
    async fn made_from(
        &self,
        meta: &Meta,
        volume: &VolumeRecord,
        source: Option<&VolumeContentSource>,
    ) -> Result<bool, Status> {
        let base = volume.bases.first();
        Ok(match source.and_then(|s| s.r#type.as_ref()) {
            None => base.is_none(),
            Some(SourceType::Snapshot(s)) => base.is_some_and(|b| b.snapshot == s.snapshot_id),
            Some(SourceType::Volume(v)) => match (base, self.volume(meta, &v.volume_id).await?) {
                (Some(b), Some(from)) => b.volume_id == from.id,
                _ => false,
            },
        })
    }

    async fn snapshot(&self, meta: &Meta, name: &str) -> Result<Option<SnapshotRecord>, Status> {
        Ok(meta
            .snapshot(name)
            .await
            .map_err(|e| from_store(e.into()))?
            .filter(|s| !s.deleted))
    }
}

impl ControllerService {
    async fn create_volume_call(
        &self,
        req: CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, Status> {
        if req.name.is_empty() {
            return Err(required("CreateVolume", "name"));
        }
        capability::check_all(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        cli::check_name(&req.name).map_err(|e| invalid_name("volume", e))?;
        let params = parse_params(&req.parameters)?;
        let range = req.capacity_range.as_ref();
        let source = req
            .volume_content_source
            .clone()
            .filter(|s| s.r#type.is_some());
        let _guard = self.locks.lock(&format!("volume:{}", req.name)).await;
        let meta = self.meta().await?;
        if let Some(existing) = self.volume(&meta, &req.name).await? {
            // The same request again: the same answer; anything else is a
            // conflict with what exists.
            // A clone's code is its source's, whatever the parameters say.
            let code_differs = source.is_none()
                && (existing.data_shards != params.data_shards
                    || existing.parity_shards != params.parity_shards);
            let source_differs = !self.made_from(&meta, &existing, source.as_ref()).await?;
            if !fits(existing.size, range) || code_differs || source_differs {
                return Err(Status::already_exists(format!(
                    "volume {:?} exists with {} bytes, a {}+{} code and its own content source, which this request does not match",
                    req.name, existing.size, existing.data_shards, existing.parity_shards
                )));
            }
            return Ok(CreateVolumeResponse {
                volume: Some(volume_message(&existing, source, params.fs_type.as_deref())),
            });
        }
        let record = match source.as_ref().and_then(|s| s.r#type.clone()) {
            Some(SourceType::Snapshot(SnapshotSource { snapshot_id })) => {
                let snap = self.snapshot(&meta, &snapshot_id).await?.ok_or_else(|| {
                    Status::not_found(format!("no snapshot named {snapshot_id:?}"))
                })?;
                let size = size_for(range, snap.size)?;
                if size < snap.size {
                    return Err(Status::out_of_range(format!(
                        "snapshot {snapshot_id:?} holds {} bytes; the requested {size} cannot hold it",
                        snap.size
                    )));
                }
                snapshots::create_clone(
                    &meta,
                    &req.name,
                    CloneSource::Snapshot(snapshot_id),
                    Some(size),
                )
                .await
                .map_err(from_store)?
            }
            Some(SourceType::Volume(VolumeSource { volume_id })) => {
                let from = self
                    .volume(&meta, &volume_id)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no volume named {volume_id:?}")))?;
                let size = size_for(range, from.size)?;
                if size < from.size {
                    return Err(Status::out_of_range(format!(
                        "volume {volume_id:?} holds {} bytes; the requested {size} cannot hold it",
                        from.size
                    )));
                }
                snapshots::create_clone(
                    &meta,
                    &req.name,
                    CloneSource::Volume(volume_id),
                    Some(size),
                )
                .await
                .map_err(from_store)?
            }
            None => cli::create_volume(
                &meta,
                &CreateRequest {
                    name: req.name.clone(),
                    size: size_for(range, DEFAULT_VOLUME_SIZE)?,
                    data_shards: params.data_shards,
                    parity_shards: params.parity_shards,
                    write_quorum: None,
                    segment_size: DEFAULT_SEGMENT_SIZE,
                },
            )
            .await
            .map_err(|e| {
                // Bad shard counts are the caller's mistake.
                if e.to_string().contains("--data-shards") {
                    Status::invalid_argument(format!("{e:#}"))
                } else {
                    from_store(e)
                }
            })?,
        };
        tracing::info!(volume = %record.name, size = record.size, "created");
        Ok(CreateVolumeResponse {
            volume: Some(volume_message(&record, source, params.fs_type.as_deref())),
        })
    }

    async fn delete_volume_call(
        &self,
        req: DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("DeleteVolume", "volume_id"));
        }
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let meta = self.meta().await?;
        if self.volume(&meta, &req.volume_id).await?.is_none() {
            return Ok(DeleteVolumeResponse {});
        }
        cli::delete_volume(&meta, &req.volume_id)
            .await
            .map_err(from_store)?;
        tracing::info!(volume = %req.volume_id, "deleted");
        Ok(DeleteVolumeResponse {})
    }

    async fn create_snapshot_call(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, Status> {
        if req.name.is_empty() {
            return Err(required("CreateSnapshot", "name"));
        }
        if req.source_volume_id.is_empty() {
            return Err(required("CreateSnapshot", "source_volume_id"));
        }
        cli::check_name(&req.name).map_err(|e| invalid_name("snapshot", e))?;
        if !req.parameters.is_empty() {
            return Err(Status::invalid_argument(format!(
                "snapshots take no parameters (got {:?})",
                req.parameters.keys().collect::<Vec<_>>()
            )));
        }
        let _guard = self.locks.lock(&format!("snapshot:{}", req.name)).await;
        let meta = self.meta().await?;
        if let Some(existing) = meta
            .snapshot(&req.name)
            .await
            .map_err(|e| from_store(e.into()))?
        {
            if existing.deleted || existing.volume != req.source_volume_id {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} exists, of volume {:?}{}",
                    req.name,
                    existing.volume,
                    if existing.deleted {
                        " (deleted, but still read by clones)"
                    } else {
                        ""
                    }
                )));
            }
            return Ok(CreateSnapshotResponse {
                snapshot: Some(snapshot_message(&existing)),
            });
        }
        if self.volume(&meta, &req.source_volume_id).await?.is_none() {
            return Err(Status::not_found(format!(
                "no volume named {:?}",
                req.source_volume_id
            )));
        }
        let record =
            snapshots::create_snapshot(&meta, &req.source_volume_id, &req.name, SNAPSHOT_TIMEOUT)
                .await
                .map_err(from_store)?;
        tracing::info!(snapshot = %record.name, volume = %record.volume, "snapshot created");
        Ok(CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&record)),
        })
    }

    async fn delete_snapshot_call(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, Status> {
        if req.snapshot_id.is_empty() {
            return Err(required("DeleteSnapshot", "snapshot_id"));
        }
        let _guard = self
            .locks
            .lock(&format!("snapshot:{}", req.snapshot_id))
            .await;
        let meta = self.meta().await?;
        if self.snapshot(&meta, &req.snapshot_id).await?.is_none() {
            return Ok(DeleteSnapshotResponse {});
        }
        snapshots::delete_snapshot(&meta, &req.snapshot_id)
            .await
            .map_err(from_store)?;
        tracing::info!(snapshot = %req.snapshot_id, "snapshot deleted");
        Ok(DeleteSnapshotResponse {})
    }

    async fn controller_expand_volume_call(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, Status> {
        if req.volume_id.is_empty() {
            return Err(required("ControllerExpandVolume", "volume_id"));
        }
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(required("ControllerExpandVolume", "capacity_range"));
        };
        let size = size_for(Some(range), 0)?;
        let _guard = self.locks.lock(&format!("volume:{}", req.volume_id)).await;
        let meta = self.meta().await?;
        let record = self
            .volume(&meta, &req.volume_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no volume named {:?}", req.volume_id)))?;
        if range.limit_bytes > 0 && record.size > range.limit_bytes as u64 {
            return Err(Status::out_of_range(format!(
                "volume {:?} is already {} bytes, more than the limit {}; volumes do not shrink",
                req.volume_id, record.size, range.limit_bytes
            )));
        }
        let record = if size > record.size {
            let (_, grown) = cli::expand_volume(&meta, &req.volume_id, size)
                .await
                .map_err(from_store)?;
            tracing::info!(volume = %req.volume_id, size = grown.size, "expanded");
            grown
        } else {
            record
        };
        // A block volume grows by itself on its node (the attach process
        // follows the control plane); a filesystem needs NodeExpandVolume.
        let block = req
            .volume_capability
            .as_ref()
            .is_some_and(|c| matches!(c.access_type, Some(AccessType::Block(_))));
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: record.size as i64,
            node_expansion_required: !block,
        })
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.create_volume_call(request.into_inner()).await }).await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.delete_volume_call(request.into_inner()).await }).await
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.create_snapshot_call(request.into_inner()).await })
            .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move { this.delete_snapshot_call(request.into_inner()).await })
            .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let this = self.clone();
        run_to_completion(async move {
            this.controller_expand_volume_call(request.into_inner())
                .await
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(required("ValidateVolumeCapabilities", "volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(required(
                "ValidateVolumeCapabilities",
                "volume_capabilities",
            ));
        }
        let meta = self.meta().await?;
        if self.volume(&meta, &req.volume_id).await?.is_none() {
            return Err(Status::not_found(format!(
                "no volume named {:?}",
                req.volume_id
            )));
        }
        let reply = match capability::check_all(&req.volume_capabilities) {
            Ok(_) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(reply))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let meta = self.meta().await?;
        let volumes = meta.volumes().await.map_err(|e| from_store(e.into()))?;
        let items = volumes.into_iter().map(|v| (v.name.clone(), v)).collect();
        let (volumes, next_token) = page(items, &req.starting_token, req.max_entries)?;
        Ok(Response::new(ListVolumesResponse {
            entries: volumes
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(volume_message(v, None, None)),
                    status: None,
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let params = parse_params(&req.parameters)?;
        let meta = self.meta().await?;
        let nodes: Vec<_> = meta
            .nodes()
            .await
            .map_err(|e| from_store(e.into()))?
            .into_iter()
            .filter(|n| n.alive && !n.draining)
            .collect();
        let (k, m) = (params.data_shards as u128, params.parity_shards as u128);
        let unsupported = !req.volume_capabilities.is_empty()
            && capability::check_all(&req.volume_capabilities).is_err();
        let available = if unsupported || k == 0 || (nodes.len() as u128) < k + m {
            0
        } else {
            // Raw free space, at the code's rate of data per raw byte.
            let free: u128 = nodes
                .iter()
                .map(|n| u128::from(n.record.capacity.saturating_sub(n.record.used)))
                .sum();
            (free * k / (k + m)).min(i64::MAX as u128) as i64
        };
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(available.min(MAX_VOLUME_SIZE as i64)),
            minimum_volume_size: Some(BLOCK as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        let capabilities = [
            CreateDeleteVolume,
            ListVolumes,
            GetCapacity,
            CreateDeleteSnapshot,
            ListSnapshots,
            CloneVolume,
            ExpandVolume,
            GetVolume,
            VolumeCondition,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(CapabilityType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let meta = self.meta().await?;
        let all = meta.snapshots().await.map_err(|e| from_store(e.into()))?;
        let items = all
            .into_iter()
            .filter(|s| !s.deleted)
            .filter(|s| req.snapshot_id.is_empty() || s.name == req.snapshot_id)
            .filter(|s| req.source_volume_id.is_empty() || s.volume == req.source_volume_id)
            .map(|s| (s.name.clone(), s))
            .collect();
        let (snapshots, next_token) = page(items, &req.starting_token, req.max_entries)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: snapshots
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(snapshot_message(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(required("ControllerGetVolume", "volume_id"));
        }
        let meta = self.meta().await?;
        let record = self
            .volume(&meta, &req.volume_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no volume named {:?}", req.volume_id)))?;
        let attached = meta
            .attached(&req.volume_id)
            .await
            .map_err(|e| from_store(e.into()))?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume_message(&record, None, None)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: attached.map(|a| a.host).into_iter().collect(),
                volume_condition: Some(condition(&meta, &req.volume_id).await?),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_round_up_to_blocks_within_the_limit() {
        assert_eq!(size_for(None, 1 << 30).unwrap(), 1 << 30);
        assert_eq!(size_for(Some(&range(1, 0)), 1 << 30).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(0, 10_000)), 1 << 30).unwrap(), 8192);
        assert_eq!(size_for(Some(&range(8192, 8192)), 1 << 30).unwrap(), 8192);
        for bad in [
            range(5000, 6000),
            range(0, 100),
            range(-1, 0),
            range(1 << 60, 0),
        ] {
            assert_eq!(
                size_for(Some(&bad), 1 << 30).unwrap_err().code(),
                tonic::Code::OutOfRange,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parameters_are_checked() {
        let p = |pairs: &[(&str, &str)]| {
            parse_params(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let ok = p(&[
            ("dataShards", "8"),
            ("parityShards", "3"),
            ("csi.storage.k8s.io/fstype", "xfs"),
        ])
        .unwrap();
        assert_eq!(
            (ok.data_shards, ok.parity_shards, ok.fs_type.as_deref()),
            (8, 3, Some("xfs"))
        );
        assert!(p(&[("csi.storage.k8s.io/pvc/name", "x")]).is_ok());
        for bad in [
            &[("dataShards", "four")][..],
            &[("csi.storage.k8s.io/fstype", "ntfs")],
            &[("replicas", "3")],
        ] {
            assert_eq!(p(bad).err().unwrap().code(), tonic::Code::InvalidArgument);
        }
    }
}
