//! etcd's client-side concurrency recipes (clientv3/concurrency), run inside
//! the server the way etcd's v3lock and v3election services run them: keys
//! `name/<lease in hex>`, ownership by lowest create revision, and waiting
//! for the deletion of every older contender.

use std::sync::Arc;

use tessera_proto::etcdserverpb::{
    compare, range_request::SortOrder, range_request::SortTarget, request_op, Compare,
    DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use tessera_proto::mvccpb::{event::EventType, KeyValue};
use tonic::Status;

use super::kv::KvService;
use super::lease::LeaseService;
use super::watch::InternalWatch;
use crate::auth::AuthInfo;
use crate::mvcc::encoding::{prefix_range_end, KeyRange};
use crate::node::Node;

/// TTL of the lease a lock or campaign without one gets (etcd's session default).
const SESSION_TTL: i64 = 60;

#[derive(Clone)]
pub struct Recipes {
    pub node: Arc<Node>,
    pub kv: KvService,
    lease: LeaseService,
    /// Whose rights the recipe's reads and writes run with (etcd's v3lock
    /// and v3election act with the caller's credentials).
    who: Option<AuthInfo>,
}

/// `prefix` followed by the lease id the way Go's `%x` prints it.
pub fn contender_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    [prefix, hex.as_bytes()].concat()
}

/// `name` + "/", the prefix every contender's key starts with.
pub fn contenders_prefix(name: &[u8]) -> Vec<u8> {
    [name, b"/"].concat()
}

pub fn put_op(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

pub fn get_key(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

pub fn get_op(range: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(range)),
    }
}

pub fn delete_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                ..Default::default()
            },
        )),
    }
}

/// `create_revision(key) == rev`.
pub fn created_at(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

/// The contender with the lowest (`ascend`) or highest create revision under
/// `prefix`, created at or before `max_create_rev` (0 = any).
pub fn by_create(prefix: &[u8], ascend: bool, max_create_rev: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_range_end(prefix),
        limit: 1,
        sort_target: SortTarget::Create as i32,
        sort_order: if ascend {
            SortOrder::Ascend
        } else {
            SortOrder::Descend
        } as i32,
        max_create_revision: max_create_rev,
        ..Default::default()
    }
}

/// The range result of `resp.responses[i]`.
pub fn range_result(resp: &TxnResponse, i: usize) -> Option<&RangeResponse> {
    match resp.responses.get(i)?.response.as_ref()? {
        tessera_proto::etcdserverpb::response_op::Response::ResponseRange(r) => Some(r),
        _ => None,
    }
}

impl Recipes {
    pub fn new(node: Arc<Node>) -> Self {
        Recipes {
            kv: KvService::new(node.clone()),
            lease: LeaseService::new(node.clone()),
            node,
            who: None,
        }
    }

    /// These recipes acting for the caller of `req`.
    pub fn for_caller<T>(&self, req: &tonic::Request<T>) -> Result<Recipes, Status> {
        Ok(Recipes {
            who: self.node.caller(req)?,
            ..self.clone()
        })
    }

    pub fn who(&self) -> Option<&AuthInfo> {
        self.who.as_ref()
    }

    /// The lease a contender uses: the one asked for, or a new one with
    /// etcd's session TTL.
    pub async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let granted = self
            .lease
            .grant(
                self.who(),
                LeaseGrantRequest {
                    ttl: SESSION_TTL,
                    id: 0,
                },
            )
            .await?;
        Ok(granted.id)
    }

    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
        failure: Vec<RequestOp>,
    ) -> Result<TxnResponse, Status> {
        self.kv
            .do_txn(
                self.who(),
                TxnRequest {
                    compare,
                    success,
                    failure,
                },
            )
            .await
    }

    /// Waits until every key under `prefix` created at or before
    /// `max_create_rev` is deleted (etcd's waitDeletes); returns the header
    /// of the read that found none.
    pub async fn wait_deletes(
        &self,
        prefix: &[u8],
        max_create_rev: i64,
    ) -> Result<Option<ResponseHeader>, Status> {
        loop {
            let resp = self
                .kv
                .do_range(self.who(), by_create(prefix, false, max_create_rev))
                .await?;
            let Some(last) = resp.kvs.first() else {
                return Ok(resp.header);
            };
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            self.wait_delete(&last.key, rev).await?;
        }
    }

    /// Waits for a delete of `key` at or after revision `from`.
    async fn wait_delete(&self, key: &[u8], from: i64) -> Result<(), Status> {
        let mut watch = InternalWatch::start(self.node.clone(), KeyRange::new(key, b""), from);
        while let Some(resp) = watch.responses.recv().await {
            let resp = resp?;
            if resp.canceled {
                return Err(Status::unavailable("watch canceled while waiting"));
            }
            if resp
                .events
                .iter()
                .any(|e| e.r#type == EventType::Delete as i32)
            {
                return Ok(());
            }
        }
        Err(Status::unavailable("lost watcher waiting for delete"))
    }

    /// The first contender under `prefix` (the lock holder or leader).
    pub async fn first_contender(
        &self,
        prefix: &[u8],
    ) -> Result<(Option<ResponseHeader>, Option<KeyValue>), Status> {
        let resp = self
            .kv
            .do_range(self.who(), by_create(prefix, true, 0))
            .await?;
        Ok((resp.header, resp.kvs.into_iter().next()))
    }
}

/// Deletes a contender's key if the operation that created it is abandoned
/// (the client went away while waiting), as etcd's recipes do on error.
pub struct CleanupGuard {
    pending: Option<(Recipes, Vec<u8>, i64)>,
}

impl CleanupGuard {
    /// Deletes `key` on drop if it still has create revision `rev`.
    pub fn new(recipes: &Recipes, key: &[u8], rev: i64) -> Self {
        CleanupGuard {
            pending: Some((recipes.clone(), key.to_vec(), rev)),
        }
    }

    pub fn disarm(mut self) {
        self.pending = None;
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some((recipes, key, rev)) = self.pending.take() {
            tokio::spawn(async move {
                let cmp = vec![created_at(&key, rev)];
                if let Err(e) = recipes.txn(cmp, vec![delete_op(&key)], vec![]).await {
                    tracing::warn!(error = %e, "could not remove an abandoned contender");
                }
            });
        }
    }
}
