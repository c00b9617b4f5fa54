//! The etcd Lease service: grants and revokes go through Raft; keep-alives,
//! time-to-live and listing are answered by the leader from its deadlines.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tessera_proto::etcdserverpb::lease_server::Lease;
use tessera_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tessera_proto::tessera::{raft_command::Request as Cmd, raft_result::Response as Res};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthInfo, Credentials, PermType};
use crate::errors::EtcdError;
use crate::lessor::Renewal;
use crate::node::{internal, Node};
use crate::peer::method;

/// etcd's quota cost of a lease grant.
const LEASE_OVERHEAD: usize = 64;
/// How long a keep-alive of an expired lease waits for its revocation.
const EXPIRED_WAIT: Duration = Duration::from_secs(10);

fn unexpected() -> Status {
    Status::internal("apply returned a response of the wrong kind")
}

#[derive(Clone)]
pub struct LeaseService {
    node: Arc<Node>,
}

impl LeaseService {
    pub fn new(node: Arc<Node>) -> Self {
        LeaseService { node }
    }
}

/// Grants, revokes, renews and reads leases; shared by the gRPC service,
/// the JSON gateway, and the lock and election services.
impl LeaseService {
    pub async fn grant(
        &self,
        who: Option<&AuthInfo>,
        mut r: LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, Status> {
        // Any known user, as etcd's requireAuthInfo.
        self.node.auth.store.view().check_authenticated(who)?;
        self.node.check_quota(LEASE_OVERHEAD).await?;
        while r.id == 0 {
            r.id = self.node.next_request_id();
        }
        match self.node.propose_as(who, Cmd::LeaseGrant(r)).await? {
            Res::LeaseGrant(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    /// Revokes lease `r.id`; `who` must be allowed to write every key
    /// attached to it (checked when applied, as in etcd).
    pub async fn revoke(
        &self,
        who: Option<&AuthInfo>,
        r: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse, Status> {
        // Any known user; write access to the lease's keys is checked when
        // the revoke is applied.
        self.node.auth.store.view().check_authenticated(who)?;
        match self.node.propose_as(who, Cmd::LeaseRevoke(r)).await? {
            Res::LeaseRevoke(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    /// Renews lease `id` at the leader (forwarding there from a follower, as
    /// etcd does): its TTL, or 0 when it does not exist (etcd's keep-alive
    /// answer for a lease that is gone).
    pub async fn renew(&self, id: i64) -> Result<i64, Status> {
        let this = self.clone();
        let req = LeaseKeepAliveRequest { id };
        let resp = self
            .node
            .on_leader(method::LEASE_RENEW, req, |r| async move {
                this.renew_on_leader(r.id).await
            })
            .await?;
        Ok(resp.ttl)
    }

    pub async fn renew_on_leader(&self, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
        let ttl = self.renew_here(id).await?;
        Ok(LeaseKeepAliveResponse {
            header: None,
            id,
            ttl,
        })
    }

    async fn renew_here(&self, id: i64) -> Result<i64, Status> {
        if !self.node.is_leader() {
            return Err(EtcdError::NotLeader.into());
        }
        self.node.read_barrier().await?;
        let deadline = tokio::time::Instant::now() + EXPIRED_WAIT;
        loop {
            match self.node.lessor.renew(id) {
                Renewal::Renewed(ttl) => return Ok(ttl),
                Renewal::NotFound => return Ok(0),
                // As etcd does, wait until the revoke on its way has deleted
                // the keys, so a client never renews a lease whose keys are
                // about to vanish.
                Renewal::Expired if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Renewal::Expired => return Err(EtcdError::Timeout.into()),
                // Just elected: the lessor is promoted in a moment (etcd's
                // LeaseRenew waits for it too).
                Renewal::NotPrimary if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Renewal::NotPrimary => return Err(EtcdError::NotLeader.into()),
            }
        }
    }

    /// With auth on, whether `who` may `want` every key attached to lease
    /// `id` (as etcd checks a renewal, write, and a listing of keys, read);
    /// a caller that is no known user never may.
    fn check_lease_keys(
        &self,
        who: Option<&AuthInfo>,
        id: i64,
        want: PermType,
    ) -> Result<(), Status> {
        let view = self.node.auth.store.view();
        if !view.enabled() {
            return Ok(());
        }
        view.check_authenticated(who)?;
        let keys = self
            .node
            .store
            .read_view()
            .lease_keys(id)
            .map_err(internal)?;
        for key in &keys {
            view.check(who, key, &[], want)?;
        }
        Ok(())
    }

    /// Serves one keep-alive stream (gRPC or the JSON gateway) for a caller
    /// with `creds`: each renewal needs write access to the lease's keys, as
    /// in etcd (checkLeaseRenew).
    pub async fn serve_keep_alive(
        self,
        creds: Credentials,
        mut inbound: impl Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Unpin,
        tx: mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
    ) {
        while let Some(msg) = inbound.next().await {
            let Ok(r) = msg else { break };
            // The header is taken before renewing, as etcd does, so a client
            // never sees a renewal at a revision after a revoke.
            let header = self.node.header(0);
            let permitted = self
                .node
                .auth
                .identify(&creds)
                .map_err(Status::from)
                .and_then(|who| self.check_lease_keys(who.as_ref(), r.id, PermType::Write));
            let reply = match permitted {
                Ok(()) => self.renew(r.id).await,
                Err(denied) => Err(denied),
            }
            .map(|ttl| LeaseKeepAliveResponse {
                header,
                id: r.id,
                ttl,
            });
            let failed = reply.is_err();
            if tx.send(reply).await.is_err() || failed {
                break;
            }
        }
    }

    /// Answered by the leader, which alone knows the remaining time. Any
    /// known user may ask; listing the keys needs read access to each.
    pub async fn time_to_live(
        &self,
        who: Option<&AuthInfo>,
        r: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        if r.keys {
            self.check_lease_keys(who, r.id, PermType::Read)?;
        } else {
            self.node.auth.store.view().check_authenticated(who)?;
        }
        let this = self.clone();
        let mut resp = self
            .node
            .on_leader(method::LEASE_TIME_TO_LIVE, r, |r| async move {
                this.time_to_live_on_leader(r).await
            })
            .await?;
        // The header is this member's, as in etcd's forwarded answers.
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        resp.header = self.node.header(revision);
        Ok(resp)
    }

    pub async fn time_to_live_on_leader(
        &self,
        r: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, Status> {
        self.node.read_barrier().await?;
        let view = self.node.store.read_view();
        let Some(granted) = view.lease_ttl(r.id).map_err(internal)? else {
            return Ok(LeaseTimeToLiveResponse {
                header: self.node.header(0),
                id: r.id,
                ttl: -1,
                ..Default::default()
            });
        };
        let keys = if r.keys {
            view.lease_keys(r.id).map_err(internal)?
        } else {
            Vec::new()
        };
        // etcd truncates the remaining time to whole seconds.
        let remaining = self
            .node
            .lessor
            .remaining(r.id)
            .map_or(granted, |secs| secs.trunc() as i64);
        Ok(LeaseTimeToLiveResponse {
            header: self.node.header(view.rev),
            id: r.id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        })
    }

    /// Every lease; with auth on, for a caller that may read every leased
    /// key (etcd's checkLeaseLeases walks them all the same way).
    pub async fn leases(&self, who: Option<&AuthInfo>) -> Result<LeaseLeasesResponse, Status> {
        self.node.read_barrier().await?;
        let view = self.node.store.read_view();
        let mut ids: Vec<i64> = view
            .leases()
            .map_err(internal)?
            .iter()
            .map(|l| l.id)
            .collect();
        if self.node.auth.store.view().enabled() {
            for &id in &ids {
                self.check_lease_keys(who, id, PermType::Read)?;
            }
        }
        self.node.lessor.order_by_expiry(&mut ids);
        Ok(LeaseLeasesResponse {
            header: self.node.header(view.rev),
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        })
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.grant(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.revoke(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<LeaseKeepAliveResponse>>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let creds = Credentials::of(&req);
        tokio::spawn(self.clone().serve_keep_alive(creds, req.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.time_to_live(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.leases(who.as_ref()).await.map(Response::new)
    }
}
