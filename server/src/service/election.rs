//! etcd's Election service (v3electionpb): the contender whose key under
//! `name/` was created first leads; its value is the election's value.

use tessera_proto::etcdserverpb::ResponseHeader;
use tessera_proto::mvccpb::event::EventType;
use tessera_proto::v3electionpb::election_server::Election;
use tessera_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::recipes::{
    contender_key, contenders_prefix, created_at, delete_op, get_key, get_op, put_op, range_result,
    CleanupGuard, Recipes,
};
use super::watch::InternalWatch;
use crate::mvcc::encoding::{prefix_range_end, KeyRange};

/// clientv3/concurrency's errors; etcd returns them as plain errors, which
/// gRPC carries with code Unknown.
fn not_leader() -> Status {
    Status::unknown("election: not leader")
}

fn no_leader() -> Status {
    Status::unknown("election: no leader")
}

fn missing_leader_key() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

#[derive(Clone)]
pub struct ElectionService {
    recipes: Recipes,
}

impl ElectionService {
    pub fn new(recipes: Recipes) -> Self {
        ElectionService { recipes }
    }

    pub async fn campaign(&self, r: CampaignRequest) -> Result<CampaignResponse, Status> {
        let lease = self.recipes.session_lease(r.lease).await?;
        let prefix = contenders_prefix(&r.name);
        let key = contender_key(&prefix, lease);
        let resp = self
            .recipes
            .txn(
                vec![created_at(&key, 0)],
                vec![put_op(&key, &r.value, lease)],
                vec![get_op(get_key(&key))],
            )
            .await?;
        let mut leader = LeaderKey {
            name: r.name.clone(),
            key: key.clone(),
            rev: resp.header.as_ref().map_or(0, |h| h.revision),
            lease,
        };
        if !resp.succeeded {
            if let Some(existing) = range_result(&resp, 0).and_then(|r| r.kvs.first()) {
                leader.rev = existing.create_revision;
                if existing.value != r.value {
                    if let Err(e) = self.proclaim_value(&leader, &r.value).await {
                        let _ = self.resign_key(&leader).await;
                        return Err(e);
                    }
                }
            }
        }
        let guard = CleanupGuard::new(&self.recipes, &key, leader.rev);
        self.recipes.wait_deletes(&prefix, leader.rev - 1).await?;
        guard.disarm();
        Ok(CampaignResponse {
            header: resp.header,
            leader: Some(leader),
        })
    }

    async fn proclaim_value(
        &self,
        leader: &LeaderKey,
        value: &[u8],
    ) -> Result<Option<ResponseHeader>, Status> {
        let resp = self
            .recipes
            .txn(
                vec![created_at(&leader.key, leader.rev)],
                vec![put_op(&leader.key, value, leader.lease)],
                vec![],
            )
            .await?;
        if !resp.succeeded {
            return Err(not_leader());
        }
        Ok(resp.header)
    }

    async fn resign_key(&self, leader: &LeaderKey) -> Result<Option<ResponseHeader>, Status> {
        let resp = self
            .recipes
            .txn(
                vec![created_at(&leader.key, leader.rev)],
                vec![delete_op(&leader.key)],
                vec![],
            )
            .await?;
        Ok(resp.header)
    }

    pub async fn proclaim(&self, r: ProclaimRequest) -> Result<ProclaimResponse, Status> {
        let leader = r.leader.ok_or_else(missing_leader_key)?;
        let header = self.proclaim_value(&leader, &r.value).await?;
        Ok(ProclaimResponse { header })
    }

    pub async fn resign(&self, r: ResignRequest) -> Result<ResignResponse, Status> {
        let leader = r.leader.ok_or_else(missing_leader_key)?;
        let header = self.resign_key(&leader).await?;
        Ok(ResignResponse { header })
    }

    pub async fn leader(&self, r: LeaderRequest) -> Result<LeaderResponse, Status> {
        let (header, kv) = self
            .recipes
            .first_contender(&contenders_prefix(&r.name))
            .await?;
        let kv = kv.ok_or_else(no_leader)?;
        Ok(LeaderResponse {
            header,
            kv: Some(kv),
        })
    }

    /// etcd's Observe: the current leader, then each of its new values,
    /// then the next leader once its key is deleted, and so on.
    async fn observe_into(
        self,
        name: Vec<u8>,
        tx: mpsc::Sender<Result<LeaderResponse, Status>>,
    ) -> Result<(), Status> {
        let prefix = contenders_prefix(&name);
        loop {
            let (header, first) = self.recipes.first_contender(&prefix).await?;
            let (header, kv) = match first {
                Some(kv) => (header.unwrap_or_default(), kv),
                None => {
                    let from = header.as_ref().map_or(0, |h| h.revision);
                    let range = KeyRange::new(&prefix, &prefix_range_end(&prefix));
                    let mut watch = InternalWatch::start(self.recipes.node.clone(), range, from);
                    loop {
                        let Some(resp) = watch.responses.recv().await else {
                            return Ok(());
                        };
                        let resp = resp?;
                        let put = resp
                            .events
                            .into_iter()
                            .find(|e| e.r#type == EventType::Put as i32)
                            .and_then(|e| e.kv);
                        if let (Some(kv), Some(mut h)) = (put, resp.header) {
                            h.revision = kv.mod_revision;
                            break (h, kv);
                        }
                    }
                }
            };
            let key = kv.key.clone();
            let watch_from = header.revision + 1;
            let first = LeaderResponse {
                header: Some(header),
                kv: Some(kv),
            };
            if tx.send(Ok(first)).await.is_err() {
                return Ok(());
            }
            let mut watch = InternalWatch::start(
                self.recipes.node.clone(),
                KeyRange::new(&key, b""),
                watch_from,
            );
            'leader: while let Some(resp) = watch.responses.recv().await {
                let resp = resp?;
                for ev in resp.events {
                    if ev.r#type == EventType::Delete as i32 {
                        break 'leader;
                    }
                    let update = LeaderResponse {
                        header: resp.header,
                        kv: ev.kv,
                    };
                    if tx.send(Ok(update)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let svc = ElectionService::new(self.recipes.for_caller(&req)?);
        ElectionService::campaign(&svc, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let svc = ElectionService::new(self.recipes.for_caller(&req)?);
        ElectionService::proclaim(&svc, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let svc = ElectionService::new(self.recipes.for_caller(&req)?);
        ElectionService::leader(&svc, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let service = ElectionService::new(self.recipes.for_caller(&req)?);
        let name = req.into_inner().name;
        tokio::spawn(async move {
            let errors = tx.clone();
            if let Err(e) = service.observe_into(name, tx).await {
                let _ = errors.send(Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let svc = ElectionService::new(self.recipes.for_caller(&req)?);
        ElectionService::resign(&svc, req.into_inner())
            .await
            .map(Response::new)
    }
}
