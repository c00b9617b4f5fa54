//! `tessera-store serve`: a storage node. It keeps shards in its
//! [`ShardLog`], serves the `tessera.store.Store` gRPC service to volume
//! writers and readers, registers itself in the control plane under a lease
//! (its heartbeat), gives the space of deleted volumes back, drops shards
//! it is no longer placed for (repair moved them while it was away: it
//! never serves them), scrubs ([`crate::scrub`]), takes part in repair
//! ([`crate::repair`]), and exposes `/metrics` and `/health`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tessera_proto::store::store_server::{Store, StoreServer};
use tessera_proto::store::{
    AppendReply, AppendRequest, DiscardReply, DiscardRequest, DropVolumeReply, DropVolumeRequest,
    FenceReply, FenceRequest, InfoReply, InfoRequest, ReadReply, ReadRequest, ScrubReply,
    ScrubRequest, ShardRecord, StripeInfo, StripesReply, StripesRequest,
};
use tonic::{Request, Response, Status};

use crate::meta::{Meta, MetaError, NodeRecord};
use crate::repair::{RepairOptions, RepairStats};
use crate::scrub::{ScrubStats, Scrubber};
use crate::shardlog::{stripe_id, stripe_of, LogError, LogOptions, ShardLog};

/// Largest message on the node protocol (a 64-row shard is 256 KiB; a
/// segment's stripe list can be larger).
pub const MAX_MESSAGE: usize = 64 << 20;
/// TTL of a node's liveness lease, seconds.
const LEASE_TTL: i64 = 10;
/// How long a starting node retries registering while the control plane
/// does not answer.
const REGISTER_PATIENCE: Duration = Duration::from_secs(60);
/// How often the node's use is published and deleted volumes are looked for.
const HOUSEKEEPING: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    pub zone: String,
    pub capacity: u64,
    pub endpoints: Vec<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub log: LogOptions,
    pub repair: RepairOptions,
    /// Bytes a second the background scrubber reads (0: off).
    pub scrub_rate: u64,
    /// Rest between background scrub passes.
    pub scrub_interval: Duration,
}

/// The node's counters beyond its shard log's, for `/metrics`.
#[derive(Default, Clone)]
pub struct NodeStats {
    pub scrub: Arc<ScrubStats>,
    pub repair: Arc<RepairStats>,
}

/// How a shard log error reaches the client: a fenced writer must tell
/// fencing apart from a node that is down, and a checksum failure from a
/// missing shard.
pub fn status_of(e: LogError) -> Status {
    match e {
        LogError::Fenced { .. } | LogError::Dropped(_) => {
            Status::failed_precondition(e.to_string())
        }
        LogError::NotFound { .. } => Status::not_found(e.to_string()),
        LogError::Checksum { .. } => Status::data_loss(e.to_string()),
        LogError::Invalid(_) => Status::invalid_argument(e.to_string()),
        LogError::Closed => Status::unavailable(e.to_string()),
        LogError::Io(_) | LogError::Failed(_) => Status::internal(e.to_string()),
    }
}

/// The gRPC service over the shard log.
pub struct StoreService {
    log: ShardLog,
    name: String,
    zone: String,
    capacity: u64,
    scrubber: Arc<Scrubber>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status_of)
}

#[tonic::async_trait]
impl Store for StoreService {
    async fn append(&self, req: Request<AppendRequest>) -> Result<Response<AppendReply>, Status> {
        let r = req.into_inner();
        let record = ShardRecord {
            volume: r.volume,
            segment: r.segment,
            shard: r.shard,
            stripe: r.stripe,
            layout: r.layout,
            crcs: r.crcs,
        };
        let log = self.log.clone();
        let data = Bytes::from(r.data);
        let writer_epoch = r.writer_epoch;
        blocking(move || log.append(record, data, writer_epoch)).await?;
        Ok(Response::new(AppendReply {}))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let r = req.into_inner();
        let log = self.log.clone();
        let stripe = stripe_of(r.stripe.as_ref());
        let (data, crcs) =
            blocking(move || log.read(r.volume, r.segment, r.shard, stripe, r.first_row, r.rows))
                .await?;
        Ok(Response::new(ReadReply { data, crcs }))
    }

    async fn stripes(
        &self,
        req: Request<StripesRequest>,
    ) -> Result<Response<StripesReply>, Status> {
        let r = req.into_inner();
        let stripes = self
            .log
            .stripes(r.volume, r.segment)
            .into_iter()
            .map(|h| StripeInfo {
                shard: h.shard,
                stripe: Some(stripe_id(h.stripe)),
                layout: Some(h.layout),
            })
            .collect();
        Ok(Response::new(StripesReply {
            stripes,
            epoch: self.log.epoch(r.volume),
        }))
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<FenceReply>, Status> {
        let r = req.into_inner();
        let log = self.log.clone();
        let epoch = blocking(move || log.fence(r.volume, r.epoch)).await?;
        Ok(Response::new(FenceReply { epoch }))
    }

    async fn discard(
        &self,
        req: Request<DiscardRequest>,
    ) -> Result<Response<DiscardReply>, Status> {
        let r = req.into_inner();
        let log = self.log.clone();
        blocking(move || log.discard(r.volume, r.segment, r.epoch, r.stripes, None)).await?;
        Ok(Response::new(DiscardReply {}))
    }

    async fn drop_volume(
        &self,
        req: Request<DropVolumeRequest>,
    ) -> Result<Response<DropVolumeReply>, Status> {
        let volume = req.into_inner().volume;
        let log = self.log.clone();
        blocking(move || log.drop_volume(volume)).await?;
        Ok(Response::new(DropVolumeReply {}))
    }

    async fn scrub(&self, _req: Request<ScrubRequest>) -> Result<Response<ScrubReply>, Status> {
        let report = self.scrubber.pass(0).await;
        Ok(Response::new(ScrubReply {
            checked_blocks: report.checked,
            bad_blocks: report.bad,
            repaired_blocks: report.repaired,
            unrepaired_blocks: report.unrepaired,
        }))
    }

    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        Ok(Response::new(InfoReply {
            name: self.name.clone(),
            zone: self.zone.clone(),
            capacity: self.capacity,
            used: self.log.used_bytes(),
        }))
    }
}

/// The data directory's claim: which node it belongs to, and a lock held
/// while a node runs on it.
struct DataDir {
    _lock: std::fs::File,
}

fn claim_data_dir(dir: &Path, name: &str) -> anyhow::Result<DataDir> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .with_context(|| format!("cannot open {}", dir.join("LOCK").display()))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "data directory {} is in use by another tessera-store process",
            dir.display()
        );
    }
    let identity = dir.join("node-name");
    match std::fs::read_to_string(&identity) {
        Ok(owner) if owner.trim() != name => anyhow::bail!(
            "data directory {} belongs to node {:?}, not {name:?}: start that node with --name {}, or give this one its own --data-dir",
            dir.display(),
            owner.trim(),
            owner.trim()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = dir.join("node-name.tmp");
            std::fs::write(&tmp, format!("{name}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &identity)?;
            std::fs::File::open(dir)?.sync_all()?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", identity.display())),
    }
    Ok(DataDir { _lock: lock })
}

/// Runs a storage node until `stop` resolves.
pub async fn serve(
    config: NodeConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _dir = claim_data_dir(&config.data_dir, &config.name)?;
    let log_dir = config.data_dir.join("shards");
    let log = {
        let options = config.log.clone();
        let dir = log_dir.clone();
        tokio::task::spawn_blocking(move || ShardLog::open(&dir, options)).await??
    };
    tracing::info!(name = %config.name, data_dir = %config.data_dir.display(), volumes = log.volumes().len(), "shard log opened");
    let meta = Meta::connect(&config.endpoints)
        .await
        .context("cannot reach the control plane")?;
    let instance: u64 = rand::random();
    let instance_file = config.data_dir.join("instance");
    let previous = std::fs::read_to_string(&instance_file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut record = NodeRecord {
        name: config.name.clone(),
        address: config.advertise.clone(),
        zone: config.zone.clone(),
        capacity: config.capacity,
        used: log.used_bytes(),
    };
    // The control plane may be electing a leader, or out of reach for a
    // moment, just as this node starts: registering is retried for a while
    // before the node gives up.
    let started = std::time::Instant::now();
    let mut lease = loop {
        let attempt = async {
            let lease = meta.keep_lease(LEASE_TTL).await?;
            meta.register_node(&record, instance, previous, lease.id)
                .await?;
            Ok::<_, MetaError>(lease)
        }
        .await;
        match attempt {
            Ok(lease) => break lease,
            Err(e @ MetaError::Etcd { .. }) if started.elapsed() < REGISTER_PATIENCE => {
                tracing::warn!(error = %e, "cannot register in the control plane yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    std::fs::write(&instance_file, format!("{instance}\n"))
        .with_context(|| format!("cannot write {}", instance_file.display()))?;
    tracing::info!(name = %config.name, address = %config.advertise, zone = %config.zone, "registered in the control plane");
    // Before serving: shards moved elsewhere while this node was away are
    // never served again.
    drop_unplaced(&meta, &log, &config.name).await;
    let stats = NodeStats::default();
    let scrubber = Arc::new(Scrubber::new(
        log.clone(),
        meta.clone(),
        stats.scrub.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let service = StoreService {
        log: log.clone(),
        name: config.name.clone(),
        zone: config.zone.clone(),
        capacity: config.capacity,
        scrubber: scrubber.clone(),
    };
    let server = StoreServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(server)
            .serve_with_incoming_shutdown(
                // TCP_NODELAY here: the builder's flag does not reach
                // connections from an incoming stream, and without it each
                // reply waits for the client's delayed ACK (40 ms).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = grpc_stop.changed().await;
                },
            ),
    );
    if let Some(addr) = config.metrics_listen {
        let stats = NodeStats {
            scrub: stats.scrub.clone(),
            repair: stats.repair.clone(),
        };
        crate::metrics::serve(addr, log.clone(), config.clone(), stats, stop_rx.clone()).await?;
    }
    tracing::info!(listen = %config.listen, "serving");
    let repair = tokio::spawn(crate::repair::run(
        meta.clone(),
        config.name.clone(),
        config.repair.clone(),
        stats.repair.clone(),
    ));
    let scrubbing = tokio::spawn(crate::scrub::run(
        scrubber,
        config.scrub_rate,
        config.scrub_interval,
    ));

    let housekeeping = {
        let meta = meta.clone();
        let log = log.clone();
        let name = config.name.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HOUSEKEEPING).await;
                // A lease that expired (the control plane was away too
                // long): register again under a new one.
                let still = meta.node_alive_as(&name, instance).await.unwrap_or(true);
                if lease.expired() || !still {
                    match meta.keep_lease(LEASE_TTL).await {
                        Ok(l) => {
                            lease = l;
                            if let Err(e) = meta
                                .register_node(&record, instance, Some(instance), lease.id)
                                .await
                            {
                                tracing::error!(error = %e, "cannot register again");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot renew the node's lease"),
                    }
                }
                record.used = log.used_bytes();
                if let Err(e) = meta.update_node(&record).await {
                    tracing::debug!(error = %e, "cannot publish the node's use");
                }
                give_back_deleted(&meta, &log).await;
                drop_unplaced(&meta, &log, &name).await;
            }
        })
    };
    give_back_deleted(&meta, &log).await;
    stop.await;
    tracing::info!("stopping");
    housekeeping.abort();
    repair.abort();
    scrubbing.abort();
    // Gone now, not when the lease expires.
    if let Err(e) = meta.unregister_node(&config.name, instance).await {
        tracing::warn!(error = %e, "cannot unregister");
    }
    let _ = stop_tx.send(true);
    let _ = grpc.await;
    Ok(())
}

/// Drops the shards of volumes the control plane says were deleted.
async fn give_back_deleted(meta: &Meta, log: &ShardLog) {
    let deleted = match meta.deleted_volumes().await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list deleted volumes");
            return;
        }
    };
    let held: std::collections::HashSet<u64> = log.volumes().into_iter().collect();
    for id in deleted.into_iter().filter(|id| held.contains(id)) {
        let log = log.clone();
        let before = log.used_bytes();
        match tokio::task::spawn_blocking(move || log.drop_volume(id).map(|()| log.used_bytes()))
            .await
        {
            Ok(Ok(after)) => {
                tracing::info!(volume = %format!("{id:x}"), freed = before.saturating_sub(after), "gave back the space of a deleted volume")
            }
            Ok(Err(e)) => {
                tracing::warn!(volume = %format!("{id:x}"), error = %e, "cannot drop a deleted volume")
            }
            Err(_) => {}
        }
    }
}

/// Drops the shards this node holds but is no longer placed for: repair
/// rebuilt them on another node while this one was away (or drained it).
/// What the log holds is listed before the placements are read, so a
/// shard placed here meanwhile is never dropped.
async fn drop_unplaced(meta: &Meta, log: &ShardLog, me: &str) {
    let mut held: Vec<(u64, u32, Vec<crate::shardlog::HeldShard>)> = Vec::new();
    for volume in log.volumes() {
        for segment in log.segments(volume) {
            held.push((volume, segment, log.stripes(volume, segment)));
        }
    }
    if held.is_empty() {
        return;
    }
    let records = match meta.volume_records().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read placements");
            return;
        }
    };
    let by_id: std::collections::HashMap<u64, &crate::meta::VolumeRecord> =
        records.iter().map(|(r, _, _)| (r.id, r)).collect();
    for (volume, segment, shards) in held {
        // No record: being created or deleted; the tombstone decides.
        let Some(record) = by_id.get(&volume) else {
            continue;
        };
        let placed = |shard: u32| {
            record
                .segments
                .get(segment as usize)
                .and_then(|p| p.get(shard as usize))
                .and_then(|&i| record.nodes.get(i as usize))
                .is_some_and(|n| n == me)
        };
        let mut by_shard: std::collections::BTreeMap<u32, Vec<tessera_proto::store::StripeId>> =
            Default::default();
        for h in shards.iter().filter(|h| !placed(h.shard)) {
            by_shard
                .entry(h.shard)
                .or_default()
                .push(stripe_id(h.stripe));
        }
        for (shard, stripes) in by_shard {
            let count = stripes.len();
            let log = log.clone();
            let epoch = log.epoch(volume);
            let dropped = tokio::task::spawn_blocking(move || {
                log.discard(volume, segment, epoch, stripes, Some(shard))
            })
            .await;
            match dropped {
                Ok(Ok(())) => {
                    tracing::info!(volume = %record.name, segment, shard, stripes = count, "dropped shards placed on another node now")
                }
                Ok(Err(e)) => {
                    tracing::warn!(volume = %record.name, segment, shard, error = %e, "cannot drop shards placed elsewhere")
                }
                Err(_) => {}
            }
        }
    }
}

/// Counts for `/metrics`, from the log's stats.
pub fn log_counters(log: &ShardLog) -> Vec<(&'static str, &'static str, u64)> {
    let s = log.stats();
    vec![
        (
            "tessera_store_appends_total",
            "Shards appended.",
            s.appends.load(Ordering::Relaxed),
        ),
        (
            "tessera_store_append_bytes_total",
            "Bytes written to the shard log.",
            s.append_bytes.load(Ordering::Relaxed),
        ),
        (
            "tessera_store_syncs_total",
            "Group commits (one write and one fdatasync each).",
            s.syncs.load(Ordering::Relaxed),
        ),
        (
            "tessera_store_reads_total",
            "Shard reads.",
            s.reads.load(Ordering::Relaxed),
        ),
        (
            "tessera_store_read_bytes_total",
            "Bytes read and verified.",
            s.read_bytes.load(Ordering::Relaxed),
        ),
        (
            "tessera_store_checksum_failures_total",
            "4 KiB blocks whose CRC-32 did not match (on read or on arrival).",
            s.checksum_failures.load(Ordering::Relaxed),
        ),
        (
            "tessera_store_log_files_deleted_total",
            "Shard log files deleted once nothing in them was live.",
            s.files_deleted.load(Ordering::Relaxed),
        ),
    ]
}
