//! The peer side of a member: the `tessera.Peer` gRPC service on
//! `--listen-peer-urls` (Raft messages, requests forwarded to the leader,
//! membership for joining members) and the client connections to peers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tessera_proto::etcdserverpb::{
    HashKvRequest, LeaseKeepAliveRequest, LeaseTimeToLiveRequest, MemberAddRequest,
    MemberPromoteRequest, MemberRemoveRequest, MemberUpdateRequest,
};
use tessera_proto::tessera::peer_client::PeerClient;
use tessera_proto::tessera::peer_server::{Peer, PeerServer};
use tessera_proto::tessera::{
    Blob, ForwardRequest, IndexReply, MembersRequest, MembersResponse, PeerMember, ProposeReply,
    RaftBatchResult,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::service::cluster::ClusterService;
use crate::service::lease::LeaseService;

/// Names of the requests a member forwards to the leader.
pub mod method {
    pub const PROPOSE: &str = "propose";
    pub const READ_INDEX: &str = "read_index";
    pub const MEMBER_ADD: &str = "member_add";
    pub const MEMBER_REMOVE: &str = "member_remove";
    pub const MEMBER_UPDATE: &str = "member_update";
    pub const MEMBER_PROMOTE: &str = "member_promote";
    pub const LEASE_RENEW: &str = "lease_renew";
    pub const LEASE_TIME_TO_LIVE: &str = "lease_time_to_live";
    /// Sent by the leader to a move-leader target: start an election now.
    pub const TIMEOUT_NOW: &str = "timeout_now";
    /// A member's HashKV at a revision, for the corruption checks (etcd's
    /// peer `/members/hashkv`).
    pub const HASH_KV: &str = "hash_kv";
}

/// Raft messages and snapshot chunks can be large; client limits do not apply.
const MAX_PEER_MESSAGE: usize = 512 << 20;

/// Connections to peers, one lazily connected channel per address.
#[derive(Clone, Default)]
pub struct PeerClients {
    channels: Arc<Mutex<HashMap<String, PeerClient<Channel>>>>,
    /// How `https://` peer URLs are dialled (`--peer-*` TLS files).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl PeerClients {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        PeerClients {
            channels: Arc::default(),
            tls,
        }
    }

    /// A client for the member whose peer URLs are `addr` (comma-separated;
    /// the first is used).
    pub fn client(&self, addr: &str) -> Result<PeerClient<Channel>, tonic::transport::Error> {
        let url = addr.split(',').next().unwrap_or(addr).trim().to_string();
        if let Ok(map) = self.channels.lock() {
            if let Some(c) = map.get(&url) {
                return Ok(c.clone());
            }
        }
        // TLS is ours, not tonic's (whose configuration cannot take the
        // verifier etcd's rules need): tonic is given the plain URL and a
        // connector that makes the TLS connection. Without peer TLS, tonic
        // keeps the https URL and refuses to dial it.
        let tls = url
            .strip_prefix("https://")
            .zip(self.tls.clone())
            .and_then(|(rest, config)| {
                let host = rest.split('/').next()?.rsplit_once(':')?.0;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Some((format!("http://{rest}"), host.to_string(), config))
            });
        let channel = match tls {
            Some((dial_url, host, config)) => {
                let endpoint = Endpoint::from_shared(dial_url)?
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10));
                let connector = TlsConnector { config, host };
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri| {
                    connector.clone().connect(uri)
                }))
            }
            None => Endpoint::from_shared(url.clone())?
                .connect_timeout(PEER_CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .connect_lazy(),
        };
        let client = PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        if let Ok(mut map) = self.channels.lock() {
            map.insert(url, client.clone());
        }
        Ok(client)
    }
}

/// How long connecting to a peer (TCP, and TLS on `https://` URLs) may take.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Dials one `https://` peer URL: TCP, then TLS with the member's peer
/// client configuration, checking the certificate against the URL's host.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    host: String,
}

/// A connection to a peer that could not be made: no request was sent on
/// it, so whatever was to be sent never reached the peer.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to peer: {0}")]
pub struct PeerConnectFailed(std::io::Error);

impl TlsConnector {
    async fn connect(
        self,
        uri: tonic::codegen::http::Uri,
    ) -> Result<
        hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        PeerConnectFailed,
    > {
        let port = uri.port_u16().unwrap_or(443);
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            tokio_rustls::TlsConnector::from(self.config)
                .connect(name, tcp)
                .await
        };
        match tokio::time::timeout(PEER_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tls)) => Ok(hyper_util::rt::TokioIo::new(tls)),
            Ok(Err(e)) => Err(PeerConnectFailed(e)),
            Err(_) => Err(PeerConnectFailed(std::io::ErrorKind::TimedOut.into())),
        }
    }
}

/// Whether a failed call to a peer certainly never reached it: the TCP
/// connection was refused or could not be made in time. Only then may a
/// forwarded proposal be sent again elsewhere; an error after the connection
/// existed (reset, closed, timed out mid-call) leaves its fate unknown, and a
/// retry could apply it twice.
pub fn never_reached_peer(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<PeerConnectFailed>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        // hyper's connector wraps the refused or timed-out TCP connect.
        if e.to_string().starts_with("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

fn decode_blob<T: DeserializeOwned>(req: Request<Blob>) -> Result<T, Status> {
    bincode::deserialize(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("malformed peer message: {e}")))
}

fn encode_blob<T: Serialize>(value: &T) -> Result<Response<Blob>, Status> {
    bincode::serialize(value)
        .map(|data| Response::new(Blob { data }))
        .map_err(|e| Status::internal(e.to_string()))
}

/// Decodes a forwarded request, runs `f` and encodes its answer.
async fn handle<Req, Resp, F, Fut>(body: &[u8], f: F) -> Result<Vec<u8>, Status>
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let req = Req::decode(body)
        .map_err(|e| Status::invalid_argument(format!("malformed forwarded request: {e}")))?;
    Ok(f(req).await?.encode_to_vec())
}

pub struct PeerService {
    node: Arc<Node>,
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode_blob(req)?;
        encode_blob(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode_blob(req)?;
        encode_blob(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode_blob(req)?;
        encode_blob(&self.node.raft.install_snapshot(rpc).await)
    }

    async fn forward(&self, req: Request<ForwardRequest>) -> Result<Response<Blob>, Status> {
        let ForwardRequest { method, body } = req.into_inner();
        let node = self.node.clone();
        let cluster = ClusterService::new(node.clone());
        let lease = LeaseService::new(node.clone());
        let data = match method.as_str() {
            method::PROPOSE => {
                // Kept encoded: the leader splits the batch into its
                // commands, checks each, and proposes them as they came.
                let batch = crate::raft::Command(body.into());
                let (index, results) = node.propose_forwarded(batch).await?;
                ProposeReply {
                    index,
                    results: Some(RaftBatchResult { results }),
                }
                .encode_to_vec()
            }
            method::READ_INDEX => {
                handle(&body, |_: MembersRequest| async move {
                    Ok(IndexReply {
                        index: node.read_index_on_leader().await?,
                    })
                })
                .await?
            }
            method::MEMBER_ADD => {
                handle(&body, |r: MemberAddRequest| cluster.add_on_leader(r)).await?
            }
            method::MEMBER_REMOVE => {
                handle(&body, |r: MemberRemoveRequest| cluster.remove_on_leader(r)).await?
            }
            method::MEMBER_UPDATE => {
                handle(&body, |r: MemberUpdateRequest| cluster.update_on_leader(r)).await?
            }
            method::MEMBER_PROMOTE => {
                handle(&body, |r: MemberPromoteRequest| {
                    cluster.promote_on_leader(r)
                })
                .await?
            }
            method::TIMEOUT_NOW => {
                handle(&body, |_: MembersRequest| async move {
                    node.campaign_now().await?;
                    Ok(IndexReply { index: 0 })
                })
                .await?
            }
            method::HASH_KV => {
                handle(&body, |r: HashKvRequest| async move {
                    node.local_hash_kv(r.revision).await
                })
                .await?
            }
            method::LEASE_RENEW => {
                handle(&body, |r: LeaseKeepAliveRequest| async move {
                    lease.renew_on_leader(r.id).await
                })
                .await?
            }
            method::LEASE_TIME_TO_LIVE => {
                handle(&body, |r: LeaseTimeToLiveRequest| async move {
                    lease.time_to_live_on_leader(r).await
                })
                .await?
            }
            other => {
                return Err(Status::unimplemented(format!(
                    "unknown forwarded request {other}"
                )))
            }
        };
        Ok(Response::new(Blob { data }))
    }

    async fn members(
        &self,
        _req: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let members = self
            .node
            .membership()
            .into_iter()
            .map(|m| PeerMember {
                id: m.id,
                peer_urls: m.peer_urls,
                is_learner: m.is_learner,
            })
            .collect();
        Ok(Response::new(MembersResponse {
            cluster_id: self.node.cluster_id,
            members,
        }))
    }
}

/// Serves the peer service on every `--listen-peer-urls` address, over TLS
/// with the `--peer-*` files for `https://` URLs.
pub async fn serve(node: Arc<Node>) -> anyhow::Result<()> {
    let addrs = node.config.peer_listen_addrs()?;
    let tls_files = node.config.peer_tls();
    let tls = if addrs.iter().any(|a| a.tls) {
        let provider = crate::tls::provider(&node.config.cipher_suite_names())?;
        Some(crate::tls::server_config(&tls_files, provider)?)
    } else {
        None
    };
    for listen in addrs {
        let addr = listen.addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for peers on {addr}"))?;
        let service = PeerServer::new(PeerService { node: node.clone() })
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        let server = tonic::transport::Server::builder().add_service(service);
        let serving = match (&tls, listen.tls) {
            (Some(config), true) => {
                tracing::info!(%addr, peer_client_cert_auth = tls_files.requires_client_cert(), "serving peer traffic over TLS");
                let incoming = crate::tls::TlsListener::new(
                    listener,
                    config.clone(),
                    tls_files.crl_file.clone(),
                )?
                .into_stream();
                tokio::spawn(server.serve_with_incoming(incoming))
            }
            _ => {
                crate::tls::warn_unused(&tls_files, &listen.url);
                tracing::info!(address = %addr, "serving peer traffic");
                // `Server::tcp_nodelay` covers only listeners tonic binds
                // itself: without it here, Nagle held a member's small
                // AppendEntries replies until the delayed ACK (40 ms).
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tokio::spawn(server.serve_with_incoming(incoming))
            }
        };
        tokio::spawn(async move {
            if let Ok(Err(e)) = serving.await {
                tracing::error!(%addr, error = %e, "peer server stopped");
            }
        });
    }
    Ok(())
}

/// Asks the members at `peer_urls` for the cluster's membership, until one
/// answers or `deadline` passes: how a member started with
/// `--initial-cluster-state=existing` finds its id.
pub async fn fetch_members(
    clients: &PeerClients,
    peer_urls: &[String],
    deadline: Duration,
) -> anyhow::Result<MembersResponse> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        for url in peer_urls {
            let Ok(mut client) = clients.client(url) else {
                continue;
            };
            let mut req = Request::new(MembersRequest {});
            req.set_timeout(Duration::from_secs(2));
            match client.members(req).await {
                Ok(resp) if !resp.get_ref().members.is_empty() => return Ok(resp.into_inner()),
                Ok(_) => {}
                Err(e) => tracing::debug!(%url, error = %e, "peer did not answer"),
            }
        }
        if tokio::time::Instant::now() >= until {
            anyhow::bail!(
                "could not reach any member of --initial-cluster to learn the membership"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod reach_tests {
    use super::*;
    use tessera_proto::tessera::ForwardRequest;

    async fn forward_to(addr: std::net::SocketAddr) -> Status {
        let client = PeerClients::default()
            .client(&format!("http://{addr}"))
            .unwrap();
        let mut client = client;
        client
            .forward(ForwardRequest::default())
            .await
            .expect_err("nothing serves the peer API there")
    }

    #[tokio::test]
    async fn a_refused_connection_never_reached_the_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let status = forward_to(addr).await;
        assert!(never_reached_peer(&status), "{status:?}");
    }

    #[tokio::test]
    async fn a_connection_closed_mid_call_may_have_reached_the_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accept, read what the client sends, then hang up without answering.
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
        });
        let status = forward_to(addr).await;
        assert!(!never_reached_peer(&status), "{status:?}");
    }
}
