//! The etcd Maintenance service: status, alarms, hashes, defragmentation and
//! snapshots, and MoveLeader (run by the cluster service). Downgrade answers
//! Unimplemented, after etcd's admin check.

use std::io::Seek;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tessera_proto::etcdserverpb::maintenance_server::Maintenance;
use tessera_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest,
    DefragmentResponse, DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse,
};
use tessera_proto::tessera::{raft_command::Request as Cmd, raft_result::Response as Res};
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::config::ETCD_VERSION;
use crate::db::{self, STATE_MACHINE_CFS};
use crate::errors::EtcdError;
use crate::node::{internal, Node};
use crate::{etcd_snapshot, snapshot};

/// Snapshot stream chunk size (etcd sends 32 KiB blobs).
const SNAPSHOT_CHUNK: usize = 32 * 1024;
/// Chunks read ahead of a client that is slow to take them.
const SNAPSHOT_CHUNKS_AHEAD: usize = 8;

#[derive(Clone)]
pub struct MaintenanceService {
    node: Arc<Node>,
}

impl MaintenanceService {
    /// The members as etcd's `members` bucket holds them.
    fn etcd_members(&self) -> Vec<etcd_snapshot::EtcdMember> {
        let attrs = crate::members::load_all(self.node.store.db()).unwrap_or_default();
        self.node
            .membership()
            .into_iter()
            .map(|m| {
                let a = attrs.get(&m.id);
                etcd_snapshot::EtcdMember {
                    id: m.id,
                    peer_urls: m.peer_urls,
                    name: a.map(|a| a.name.clone()).unwrap_or_default(),
                    client_urls: a.map(|a| a.client_urls.clone()).unwrap_or_default(),
                    is_learner: m.is_learner,
                }
            })
            .collect()
    }

    pub fn new(node: Arc<Node>) -> Self {
        MaintenanceService { node }
    }
}

fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map_or("UNKNOWN", |a| a.as_str_name())
}

impl MaintenanceService {
    /// etcd's `authMaintenanceServer`: defragment, hash and snapshot are
    /// for the root role when auth is on.
    /// etcd returns these errors untranslated (code Unknown, auth texts).
    fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = &self.node.auth;
        auth.identify(&Credentials::of(req))
            .and_then(|who| auth.store.view().check_admin(who.as_ref()))
            .map_err(EtcdError::untranslated)
    }

    /// The read-only maintenance calls (Status, listing alarms) need a
    /// known caller when auth is on, as in etcd since its auth hardening.
    fn require_authenticated<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = &self.node.auth;
        auth.identify(&Credentials::of(req))
            .and_then(|who| auth.store.view().check_authenticated(who.as_ref()))
            .map_err(EtcdError::untranslated)
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        if req.get_ref().action == AlarmAction::Get as i32 {
            self.require_authenticated(&req)?;
        } else {
            // Raising or clearing an alarm stops or resumes writes.
            self.require_admin(&req)?;
        }
        let who = self.node.caller(&req)?;
        let a = req.into_inner();
        let mut resp = if a.action == AlarmAction::Get as i32 {
            let filter = AlarmType::try_from(a.alarm).unwrap_or(AlarmType::None);
            AlarmResponse {
                header: None,
                alarms: self.node.alarms.list(filter),
            }
        } else {
            match self.node.propose_as(who.as_ref(), Cmd::Alarm(a)).await? {
                Res::Alarm(r) => r,
                _ => {
                    return Err(Status::internal(
                        "apply returned a response of the wrong kind",
                    ))
                }
            }
        };
        // etcd (3.4, the reference) answers alarm requests without a header.
        resp.header = None;
        Ok(Response::new(resp))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.require_authenticated(&req)?;
        let m = self.node.raft.metrics().borrow().clone();
        let errors = self
            .node
            .alarms
            .list(AlarmType::None)
            .iter()
            .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)))
            .collect();
        Ok(Response::new(StatusResponse {
            header: self.node.header(0),
            version: ETCD_VERSION.to_string(),
            db_size: db::total_size(self.node.store.db()) as i64,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map_or(0, |l| l.index),
            errors,
            db_size_in_use: db::live_size(self.node.store.db()) as i64,
            is_learner: self
                .node
                .membership()
                .iter()
                .any(|m| m.id == self.node.member_id && m.is_learner),
        }))
    }

    /// As in etcd, only the leader takes this request.
    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.require_admin(&req)?;
        crate::service::cluster::ClusterService::new(self.node.clone())
            .move_leader_on_leader(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.require_admin(&req)?;
        // RocksDB compacts in the background: reads and writes go on meanwhile.
        let store = self.node.store.clone();
        let before = db::total_size(store.db());
        tokio::task::spawn_blocking(move || {
            let db = store.db();
            for name in STATE_MACHINE_CFS.iter().chain(&[db::CF_LATEST]) {
                if let Some(cf) = db.cf_handle(name) {
                    db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
                }
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(
            before,
            after = db::total_size(self.node.store.db()),
            "defragmented backend"
        );
        Ok(Response::new(DefragmentResponse {
            header: self.node.header(0),
        }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.require_admin(&req)?;
        let store = self.node.store.clone();
        let (hash, rev) = tokio::task::spawn_blocking(move || store.hash_all())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(internal)?;
        Ok(Response::new(HashResponse {
            header: self.node.header(rev),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.require_admin(&req)?;
        let rev = req.into_inner().revision;
        Ok(Response::new(self.node.local_hash_kv(rev).await?))
    }

    /// Not implemented; root only first, as every maintenance call that
    /// changes the cluster.
    async fn downgrade(
        &self,
        req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        self.require_admin(&req)?;
        Err(Status::unimplemented("Not yet implemented"))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        self.require_admin(&req)?;
        let store = self.node.store.clone();
        let mut header = self.node.header(0);
        // Dumped to a nameless file, then read back chunk by chunk as the
        // client takes them: the state never has to fit in memory.
        let file = self
            .node
            .snapshots
            .scratch()
            .map_err(|e| Status::internal(format!("cannot create a snapshot file: {e}")))?;
        let auth = self.node.auth.store.view().state.clone();
        let members = self.etcd_members();
        let applied = self
            .node
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        let (mut file, db_len, summary) = tokio::task::spawn_blocking(move || {
            let view = store.read_view();
            let (mut file, len, summary) =
                etcd_snapshot::export(&view, &auth, &members, applied, file)?;
            file.rewind()?;
            Ok::<_, etcd_snapshot::EtcdSnapshotError>((file, len, summary))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        let total = snapshot::stream_len(db_len);
        tracing::info!(
            bytes = total,
            revision = summary.revision,
            versions = summary.versions,
            "sending snapshot"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || {
            let mut sent = 0u64;
            let streamed = snapshot::stream_file(&mut file, db_len, SNAPSHOT_CHUNK, |blob| {
                sent += blob.len() as u64;
                let chunk = SnapshotResponse {
                    header: header.take(),
                    remaining_bytes: total - sent,
                    blob,
                };
                tx.blocking_send(Ok(chunk)).is_ok()
            });
            if let Err(e) = streamed {
                tracing::warn!(error = %e, "snapshot stream failed");
                let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
