//! The etcd Cluster service. Membership changes arrive with the cluster
//! issue; until then they answer Unimplemented (tonic's default).

use std::sync::Arc;

use tessera_proto::etcdserverpb::cluster_server::Cluster;
use tessera_proto::etcdserverpb::{Member, MemberListRequest, MemberListResponse, ResponseHeader};
use tonic::{Request, Response, Status};

use crate::node::Node;

#[derive(Clone)]
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    pub fn new(node: Arc<Node>) -> Self {
        ClusterService { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.node.read_barrier().await?;
        }
        let config = &self.node.config;
        let me = Member {
            id: self.node.member_id,
            name: config.name.clone(),
            peer_ur_ls: config.advertise_peer_urls(),
            client_ur_ls: config.advertise_client_urls(),
            is_learner: false,
        };
        // etcd's cluster responses carry no revision.
        let header = self
            .node
            .header(0)
            .map(|h| ResponseHeader { revision: 0, ..h });
        Ok(Response::new(MemberListResponse {
            header,
            members: vec![me],
        }))
    }
}
