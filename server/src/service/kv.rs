//! The etcd KV service.

use std::sync::Arc;

use tessera_proto::etcdserverpb::kv_server::Kv;
use tessera_proto::etcdserverpb::{
    request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tessera_proto::tessera::{raft_command::Request as Cmd, raft_result::Response as Res};
use tonic::{Request, Response, Status};

use crate::mvcc::apply::{self, ApplyError};
use crate::node::{internal, Node};
use crate::validate;

/// etcd's quota cost model: an upper bound of the bytes a write adds.
const KV_OVERHEAD: usize = 256;

fn put_cost(p: &PutRequest) -> usize {
    KV_OVERHEAD + p.key.len() + p.value.len()
}

fn txn_cost(t: &TxnRequest) -> usize {
    t.success
        .iter()
        .chain(&t.failure)
        .map(|op| match &op.request {
            Some(request_op::Request::RequestPut(p)) => put_cost(p),
            Some(request_op::Request::RequestTxn(inner)) => txn_cost(inner),
            _ => 0,
        })
        .sum()
}

/// etcd serves a read-only txn from local state without a read index only
/// when every top-level op is a serializable range.
fn txn_serializable(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(
        |op| matches!(&op.request, Some(request_op::Request::RequestRange(r)) if r.serializable),
    )
}

fn apply_error(e: ApplyError) -> Status {
    match e {
        ApplyError::Etcd(e) => e.into(),
        ApplyError::Store(e) => internal(e),
    }
}

fn unexpected() -> Status {
    Status::internal("apply returned a response of the wrong kind")
}

#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        KvService { node }
    }
}

/// The KV requests, shared by the gRPC service, the JSON gateway and the
/// lock and election services.
impl KvService {
    pub async fn do_range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        validate::check_range(&r)?;
        if !r.serializable {
            self.node.read_barrier().await?;
        }
        self.node.metrics.inc(&self.node.metrics.ranges);
        let txn = self.node.store.read_txn();
        let mut resp = apply::range(&txn, &r).map_err(apply_error)?;
        resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
        Ok(resp)
    }

    pub async fn do_put(&self, p: PutRequest) -> Result<PutResponse, Status> {
        validate::check_put(&p)?;
        self.node.check_quota(put_cost(&p)).await?;
        match self.node.propose(Cmd::Put(p)).await? {
            Res::Put(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    pub async fn do_delete_range(
        &self,
        d: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, Status> {
        validate::check_delete(&d)?;
        match self.node.propose(Cmd::DeleteRange(d)).await? {
            Res::DeleteRange(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    pub async fn do_txn(&self, t: TxnRequest) -> Result<TxnResponse, Status> {
        validate::check_txn(&t, self.node.config.max_txn_ops as usize)?;
        let mut resp = if apply::is_txn_read_only(&t) {
            if !txn_serializable(&t) {
                self.node.read_barrier().await?;
            }
            self.node.metrics.inc(&self.node.metrics.txns);
            let mut txn = self.node.store.read_txn();
            apply::txn(&mut txn, &t).map_err(apply_error)?
        } else {
            self.node.check_quota(txn_cost(&t)).await?;
            match self.node.propose(Cmd::Txn(t)).await? {
                Res::Txn(resp) => resp,
                _ => return Err(unexpected()),
            }
        };
        resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
        Ok(resp)
    }

    pub async fn do_compact(&self, c: CompactionRequest) -> Result<CompactionResponse, Status> {
        // Compaction is applied synchronously, so `physical` needs no extra wait.
        match self.node.propose(Cmd::Compaction(c)).await? {
            Res::Compaction(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        self.do_range(req.into_inner()).await.map(Response::new)
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.do_put(req.into_inner()).await.map(Response::new)
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.do_delete_range(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.do_txn(req.into_inner()).await.map(Response::new)
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        self.do_compact(req.into_inner()).await.map(Response::new)
    }
}
