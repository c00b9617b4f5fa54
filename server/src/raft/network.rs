//! openraft's network over the peer gRPC service (`tessera.Peer`): each Raft
//! message travels bincode-encoded in a blob, and the remote's own result
//! (including its Raft errors) comes back the same way.

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tessera_proto::tessera::peer_client::PeerClient;
use tessera_proto::tessera::Blob;
use tonic::transport::Channel;

use super::types::{NodeId, TypeConfig};
use crate::peer::PeerClients;

/// Creates connections to members at the address in their Raft node record.
#[derive(Clone)]
pub struct PeerNetwork {
    clients: PeerClients,
}

impl PeerNetwork {
    pub fn new(clients: PeerClients) -> Self {
        PeerNetwork { clients }
    }
}

pub struct PeerConnection {
    target: NodeId,
    client: Option<PeerClient<Channel>>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let client = match self.clients.client(&node.addr) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(target, addr = %node.addr, error = %e, "bad peer address");
                None
            }
        };
        PeerConnection { target, client }
    }
}

type Rpc<E> = RPCError<NodeId, BasicNode, E>;

fn network_error<E: std::error::Error>(e: impl std::error::Error + 'static) -> Rpc<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl PeerConnection {
    /// Sends `req` with `call` and decodes the remote's `Result`.
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        call: F,
    ) -> Result<Resp, Rpc<RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(PeerClient<Channel>, tonic::Request<Blob>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Blob>, tonic::Status>>,
    {
        let Some(client) = self.client.clone() else {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other("no usable peer URL"),
            )));
        };
        let data = bincode::serialize(req).map_err(network_error)?;
        let mut request = tonic::Request::new(Blob { data });
        request.set_timeout(option.hard_ttl());
        let reply = call(client, request).await.map_err(|status| {
            if status.code() == tonic::Code::Unavailable {
                RPCError::Unreachable(Unreachable::new(&status))
            } else {
                network_error(status)
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply.into_inner().data).map_err(network_error)?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, Rpc<RaftError<NodeId>>> {
        self.call(&rpc, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, Rpc<RaftError<NodeId, InstallSnapshotError>>> {
        self.call(&rpc, &option, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, Rpc<RaftError<NodeId>>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await })
            .await
    }
}
