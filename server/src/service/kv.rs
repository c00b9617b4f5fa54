//! The etcd KV service.

use std::sync::Arc;

use tessera_proto::etcdserverpb::kv_server::Kv;
use tessera_proto::etcdserverpb::{
    request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tessera_proto::tessera::{raft_command::Request as Cmd, raft_result::Response as Res};
use tonic::{Request, Response, Status};

use crate::auth::store::AuthView;
use crate::auth::{AuthInfo, Credentials, PermType};
use crate::errors::EtcdError;
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

    /// Who a request with `creds` comes from (see [`Node::caller`]).
    pub fn caller(&self, creds: &Credentials) -> Result<Option<AuthInfo>, Status> {
        Ok(self.node.auth.identify(creds)?)
    }
}

/// The KV requests, shared by the gRPC service, the JSON gateway and the
/// lock and election services.
impl KvService {
    pub async fn do_range(
        &self,
        who: Option<&AuthInfo>,
        r: RangeRequest,
    ) -> Result<RangeResponse, Status> {
        validate::check_range(&r)?;
        if !r.serializable {
            self.node.read_barrier().await?;
        }
        self.node.metrics.inc(&self.node.metrics.ranges);
        let mut resp = self.serialized(
            who,
            |view| view.check(who, &r.key, &r.range_end, PermType::Read),
            || {
                let txn = self.node.store.read_txn();
                apply::range(&txn, &r).map_err(apply_error)
            },
        )?;
        resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
        Ok(resp)
    }

    /// etcd's `doSerialize`: a read served from local state, after `check`
    /// allowed it, and refused if the auth state moved while it ran.
    fn serialized<T>(
        &self,
        who: Option<&AuthInfo>,
        check: impl FnOnce(&AuthView) -> Result<(), EtcdError>,
        read: impl FnOnce() -> Result<T, Status>,
    ) -> Result<T, Status> {
        check(&self.node.auth.store.view())?;
        let out = read()?;
        if let Some(who) = who.filter(|w| w.revision != 0) {
            if who.revision != self.node.auth.store.view().state.revision {
                return Err(EtcdError::AuthOldRevision.into());
            }
        }
        Ok(out)
    }

    pub async fn do_put(
        &self,
        who: Option<&AuthInfo>,
        p: PutRequest,
    ) -> Result<PutResponse, Status> {
        validate::check_put(&p)?;
        self.node.check_quota(put_cost(&p)).await?;
        match self.node.propose_as(who, Cmd::Put(p)).await? {
            Res::Put(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    pub async fn do_delete_range(
        &self,
        who: Option<&AuthInfo>,
        d: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, Status> {
        validate::check_delete(&d)?;
        match self.node.propose_as(who, Cmd::DeleteRange(d)).await? {
            Res::DeleteRange(mut resp) => {
                resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
                Ok(resp)
            }
            _ => Err(unexpected()),
        }
    }

    pub async fn do_txn(
        &self,
        who: Option<&AuthInfo>,
        t: TxnRequest,
    ) -> Result<TxnResponse, Status> {
        validate::check_txn(&t, self.node.config.max_txn_ops as usize)?;
        let mut resp = if apply::is_txn_read_only(&t) {
            if !txn_serializable(&t) {
                self.node.read_barrier().await?;
            }
            self.node.metrics.inc(&self.node.metrics.txns);
            self.serialized(
                who,
                |view| view.check_txn(who, &t),
                || {
                    let mut txn = self.node.store.read_txn();
                    apply::txn(&mut txn, &t).map_err(apply_error)
                },
            )?
        } else {
            self.node.check_quota(txn_cost(&t)).await?;
            match self.node.propose_as(who, Cmd::Txn(t)).await? {
                Res::Txn(resp) => resp,
                _ => return Err(unexpected()),
            }
        };
        resp.header = self.node.header(resp.header.map_or(0, |h| h.revision));
        Ok(resp)
    }

    pub async fn do_compact(
        &self,
        who: Option<&AuthInfo>,
        c: CompactionRequest,
    ) -> Result<CompactionResponse, Status> {
        // Root only, as in etcd since its auth hardening (kvServer.Compact):
        // compaction erases history every reader depends on.
        self.node.auth.store.view().check_admin(who)?;
        let (rev, physical) = (c.revision, c.physical);
        match self.node.propose_as(who, Cmd::Compaction(c)).await? {
            Res::Compaction(mut resp) => {
                // The old versions are deleted in the background; `physical`
                // answers once this member has deleted them, as in etcd.
                if physical {
                    self.node.store.wait_compacted(rev).await;
                }
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
        let who = self.node.caller(&req)?;
        self.do_range(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.do_put(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.do_delete_range(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.do_txn(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let who = self.node.caller(&req)?;
        self.do_compact(who.as_ref(), req.into_inner())
            .await
            .map(Response::new)
    }
}
