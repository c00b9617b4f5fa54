//! The etcd Cluster service, and MoveLeader (which etcd puts in Maintenance).
//!
//! Membership is openraft's: ids and peer URLs in the Raft membership, names
//! and client URLs published by each member through the log. Changes run on
//! the leader; other members forward them there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::{BasicNode, ChangeMembers};
use tessera_proto::etcdserverpb::cluster_server::Cluster;
use tessera_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, MoveLeaderRequest, MoveLeaderResponse,
    ResponseHeader,
};
use tessera_proto::tessera::{IndexReply, MembersRequest};
use tonic::{Request, Response, Status};

use crate::errors::EtcdError;
use crate::node::{member_id, raft_write_error, MemberInfo, Node};
use crate::peer::method;

/// etcd promotes a learner once it has 90% of the leader's log.
const LEARNER_READY_PERCENT: f64 = 0.9;

#[derive(Clone)]
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> Self {
        ClusterService { node }
    }

    /// etcd's cluster responses carry no revision.
    fn header(&self) -> Option<ResponseHeader> {
        self.node
            .header(0)
            .map(|h| ResponseHeader { revision: 0, ..h })
    }

    /// `members` as etcd lists them: by id, with published names and client
    /// URLs (empty for a member that has not started yet).
    fn etcd_members(&self, members: &[MemberInfo]) -> Vec<Member> {
        let attrs = crate::members::load_all(self.node.store.db()).unwrap_or_default();
        let mut out: Vec<Member> = members
            .iter()
            .map(|m| {
                let a = attrs.get(&m.id);
                Member {
                    id: m.id,
                    name: a.map(|a| a.name.clone()).unwrap_or_default(),
                    peer_ur_ls: m.peer_urls.clone(),
                    client_ur_ls: a.map(|a| a.client_urls.clone()).unwrap_or_default(),
                    is_learner: m.is_learner,
                }
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }

    fn find(&self, id: u64) -> Result<MemberInfo, Status> {
        self.node
            .membership()
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| EtcdError::MemberNotFound.into())
    }

    /// Checks peer URLs the way etcd does and returns them sorted.
    fn checked_urls(&self, urls: &[String], except: Option<u64>) -> Result<Vec<String>, Status> {
        if urls.is_empty() || urls.iter().any(|u| !valid_peer_url(u)) {
            return Err(EtcdError::MemberBadUrls.into());
        }
        let taken: BTreeSet<String> = self
            .node
            .membership()
            .into_iter()
            .filter(|m| Some(m.id) != except)
            .flat_map(|m| m.peer_urls)
            .collect();
        if urls.iter().any(|u| taken.contains(u)) {
            return Err(EtcdError::PeerUrlExists.into());
        }
        let mut sorted = urls.to_vec();
        sorted.sort();
        Ok(sorted)
    }

    async fn change(&self, change: ChangeMembers<u64, BasicNode>) -> Result<(), Status> {
        self.node
            .raft
            .change_membership(change, false)
            .await
            .map_err(raft_write_error)?;
        Ok(())
    }

    pub async fn add_on_leader(&self, r: MemberAddRequest) -> Result<MemberAddResponse, Status> {
        let urls = self.checked_urls(&r.peer_ur_ls, None)?;
        // etcd salts a runtime member's id with the Unix time in seconds.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = member_id(&urls, &self.node.config.initial_cluster_token, Some(now));
        let node = BasicNode {
            addr: urls.join(","),
        };
        self.node
            .raft
            .add_learner(id, node, false)
            .await
            .map_err(raft_write_error)?;
        if !r.is_learner {
            self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
                .await?;
        }
        tracing::info!(member = %format!("{id:x}"), urls = %urls.join(","), learner = r.is_learner, "added member");
        Ok(MemberAddResponse {
            header: self.header(),
            member: Some(Member {
                id,
                peer_ur_ls: urls,
                is_learner: r.is_learner,
                ..Default::default()
            }),
            members: self.etcd_members(&self.node.membership()),
        })
    }

    pub async fn remove_on_leader(
        &self,
        r: MemberRemoveRequest,
    ) -> Result<MemberRemoveResponse, Status> {
        let member = self.find(r.id)?;
        let ids = BTreeSet::from([r.id]);
        if member.is_learner {
            self.change(ChangeMembers::RemoveNodes(ids)).await?;
        } else {
            self.change(ChangeMembers::RemoveVoters(ids)).await?;
        }
        tracing::info!(member = %format!("{:x}", r.id), "removed member");
        Ok(MemberRemoveResponse {
            header: self.header(),
            members: self.etcd_members(&self.node.membership()),
        })
    }

    pub async fn update_on_leader(
        &self,
        r: MemberUpdateRequest,
    ) -> Result<MemberUpdateResponse, Status> {
        self.find(r.id)?;
        let urls = self.checked_urls(&r.peer_ur_ls, Some(r.id))?;
        let node = BasicNode {
            addr: urls.join(","),
        };
        self.change(ChangeMembers::SetNodes(BTreeMap::from([(r.id, node)])))
            .await?;
        Ok(MemberUpdateResponse {
            header: self.header(),
            members: self.etcd_members(&self.node.membership()),
        })
    }

    pub async fn promote_on_leader(
        &self,
        r: MemberPromoteRequest,
    ) -> Result<MemberPromoteResponse, Status> {
        let member = self.find(r.id)?;
        if !member.is_learner {
            return Err(EtcdError::MemberNotLearner.into());
        }
        let metrics = self.node.raft.metrics().borrow().clone();
        let leader_index = metrics.last_log_index.unwrap_or(0);
        let matched = metrics
            .replication
            .as_ref()
            .and_then(|replication| replication.get(&member.id).cloned())
            .flatten()
            .map_or(0, |l| l.index);
        if (matched as f64) < leader_index as f64 * LEARNER_READY_PERCENT {
            return Err(EtcdError::LearnerNotReady.into());
        }
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])))
            .await?;
        tracing::info!(member = %format!("{:x}", r.id), "promoted learner");
        Ok(MemberPromoteResponse {
            header: self.header(),
            members: self.etcd_members(&self.node.membership()),
        })
    }

    /// Hands leadership to `target_id`: heartbeats stop so the followers'
    /// leader leases lapse, and the target campaigns until it wins.
    pub async fn move_leader_on_leader(
        &self,
        r: MoveLeaderRequest,
    ) -> Result<MoveLeaderResponse, Status> {
        if !self.node.is_leader() {
            return Err(EtcdError::NotLeader.into());
        }
        let target = self
            .node
            .membership()
            .into_iter()
            .find(|m| m.id == r.target_id && !m.is_learner)
            .ok_or(EtcdError::BadLeaderTransferee)?;
        if target.id != self.node.member_id {
            tracing::info!(to = %format!("{:x}", target.id), "leadership transfer starting");
            self.node.raft.runtime_config().heartbeat(false);
            let asked = self
                .node
                .forward::<_, IndexReply>(target.id, method::TIMEOUT_NOW, &MembersRequest {})
                .await;
            let moved = self
                .node
                .raft
                .wait(Some(self.node.election_timeout() * 3))
                .current_leader(target.id, "leadership transfer")
                .await;
            self.node.raft.runtime_config().heartbeat(true);
            asked?;
            moved.map_err(|_| EtcdError::LeadershipTransferTimeout)?;
            tracing::info!(to = %format!("{:x}", target.id), "leadership transfer finished");
        }
        Ok(MoveLeaderResponse {
            header: self.node.header(0),
        })
    }
}

/// `http://host:port`, as etcd's URL check accepts for members.
fn valid_peer_url(u: &str) -> bool {
    let Some(rest) = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
    else {
        return false;
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        // Root only, as etcd's checkMembershipOperationPermission; checked
        // here, before the request is forwarded to the leader.
        self.node.require_admin(&req)?;
        let this = self.clone();
        self.node
            .on_leader(method::MEMBER_ADD, req.into_inner(), |r| async move {
                this.add_on_leader(r).await
            })
            .await
            .map(Response::new)
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        // Root only, as etcd's checkMembershipOperationPermission; checked
        // here, before the request is forwarded to the leader.
        self.node.require_admin(&req)?;
        let this = self.clone();
        self.node
            .on_leader(method::MEMBER_REMOVE, req.into_inner(), |r| async move {
                this.remove_on_leader(r).await
            })
            .await
            .map(Response::new)
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        // Root only, as etcd's checkMembershipOperationPermission; checked
        // here, before the request is forwarded to the leader.
        self.node.require_admin(&req)?;
        let this = self.clone();
        self.node
            .on_leader(method::MEMBER_UPDATE, req.into_inner(), |r| async move {
                this.update_on_leader(r).await
            })
            .await
            .map(Response::new)
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        // Root only, as etcd's checkMembershipOperationPermission; checked
        // here, before the request is forwarded to the leader.
        self.node.require_admin(&req)?;
        let this = self.clone();
        self.node
            .on_leader(method::MEMBER_PROMOTE, req.into_inner(), |r| async move {
                this.promote_on_leader(r).await
            })
            .await
            .map(Response::new)
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.node.require_authenticated(&req)?;
        if req.into_inner().linearizable {
            self.node.read_barrier().await?;
        }
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members: self.etcd_members(&self.node.membership()),
        }))
    }
}
