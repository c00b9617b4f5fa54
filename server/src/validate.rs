//! Request checks etcd makes before proposing anything (its `v3rpc/key.go`):
//! empty keys, ignore_value/ignore_lease misuse, txn size, and the rule that a
//! txn may not write the same key twice; plus Tessera's own bound on how deep
//! txns nest (see [`MAX_TXN_DEPTH`]).

use std::collections::HashSet;

use tessera_proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::errors::EtcdError;

pub fn check_range(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

/// How many txns deep a request may nest (a txn without a txn inside is 1).
///
/// etcd has no such limit, but it never decodes a request again once
/// accepted. Tessera decodes each committed command when it applies it,
/// inside the Raft batch and command that wrap it, and a leader's results
/// travel back to followers as a nested message too; protobuf decoders stop
/// at 100 nested messages, and every txn level is two (the txn and its
/// operation). 32 levels stay far below that on every path (a reply to a
/// follower is the deepest: two messages per level plus 4) and far above
/// any client's use.
pub const MAX_TXN_DEPTH: usize = 32;

/// How many txns deep `t` nests, counting itself.
pub fn txn_depth(t: &TxnRequest) -> usize {
    1 + t
        .success
        .iter()
        .chain(&t.failure)
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestTxn(inner)) => Some(txn_depth(inner)),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// The whole txn check: nesting, shape and size first, then the
/// duplicate-write rule on each branch. A txn nested deeper than
/// [`MAX_TXN_DEPTH`] gets etcd's error for a txn with too many operations.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), EtcdError> {
    // The failpoint lets a test put a command that cannot be decoded into
    // the log, to show that applying it does not stop the cluster.
    if txn_depth(r) > MAX_TXN_DEPTH && !tessera_storage::failpoint::is_on("txn-depth-unchecked") {
        return Err(EtcdError::TooManyOps);
    }
    check_txn_shape(r, max_txn_ops as i64)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_shape(r: &TxnRequest, max_txn_ops: i64) -> Result<(), EtcdError> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if opc > max_txn_ops {
        return Err(EtcdError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_request_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_request_op(op: &RequestOp, max_txn_ops: i64) -> Result<(), EtcdError> {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => check_range(r),
        Some(request_op::Request::RequestPut(r)) => check_put(r),
        Some(request_op::Request::RequestDeleteRange(r)) => check_delete(r),
        Some(request_op::Request::RequestTxn(r)) => check_txn_shape(r, max_txn_ops),
        None => Err(EtcdError::KeyNotFound),
    }
}

/// A deleted interval as etcd's interval tree sees it: `[begin, end)` with
/// plain byte comparison, where a single key `k` is `[k, k ‖ 0x00)`. Note that
/// etcd does not special-case a `"\0"` range end here, so such an interval is
/// empty and never conflicts.
#[derive(Clone)]
struct Interval {
    begin: Vec<u8>,
    end: Vec<u8>,
}

impl Interval {
    fn point(k: &[u8]) -> Self {
        let mut end = k.to_vec();
        end.push(0);
        Interval {
            begin: k.to_vec(),
            end,
        }
    }

    fn intersects_point(&self, k: &[u8]) -> bool {
        let p = Interval::point(k);
        self.begin < p.end && p.begin < self.end
    }
}

/// etcd's `checkIntervals`: the keys put and intervals deleted by `reqs`,
/// failing with DuplicateKey when a key is written twice on one path.
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), EtcdError> {
    let mut dels: Vec<Interval> = Vec::new();
    for op in reqs {
        if let Some(request_op::Request::RequestDeleteRange(d)) = &op.request {
            dels.push(if d.range_end.is_empty() {
                Interval::point(&d.key)
            } else {
                Interval {
                    begin: d.key.clone(),
                    end: d.range_end.clone(),
                }
            });
        }
    }
    let hits = |dels: &[Interval], k: &[u8]| dels.iter().any(|iv| iv.intersects_point(k));

    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hits(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(EtcdError::DuplicateKey);
            }
            if hits(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(request_op::Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || hits(&dels, &p.key) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::etcdserverpb::request_op::Request;
    use tessera_proto::etcdserverpb::{ResponseOp, TxnResponse};

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            success,
            ..Default::default()
        }
    }

    #[test]
    fn duplicate_puts_and_put_over_delete_are_rejected() {
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")]), 128),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![del("a", "c"), put("b")]), 128),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(check_txn(&txn(vec![put("a"), put("b")]), 128), Ok(()));
        // "\0" as range end is an empty interval to etcd's checker
        assert_eq!(check_txn(&txn(vec![del("a", "\0"), put("b")]), 128), Ok(()));
    }

    /// A txn `depth` levels deep, each level's success branch holding a
    /// range and the next level.
    fn nested(depth: usize) -> TxnRequest {
        let range = RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })),
        };
        let mut t = txn(vec![range.clone()]);
        for _ in 1..depth {
            t = txn(vec![
                range.clone(),
                RequestOp {
                    request: Some(Request::RequestTxn(t)),
                },
            ]);
        }
        t
    }

    #[test]
    fn txns_may_nest_up_to_the_limit() {
        assert_eq!(txn_depth(&nested(1)), 1);
        assert_eq!(txn_depth(&nested(7)), 7);
        assert_eq!(check_txn(&nested(MAX_TXN_DEPTH), 128), Ok(()));
        assert_eq!(
            check_txn(&nested(MAX_TXN_DEPTH + 1), 128),
            Err(EtcdError::TooManyOps)
        );
    }

    /// The reply a txn of `t`'s shape gets, as deep as it can be: every
    /// range answered with a key-value, every level with its header.
    fn deepest_reply(t: &TxnRequest) -> TxnResponse {
        use tessera_proto::etcdserverpb::{response_op, RangeResponse, ResponseHeader};
        let responses = t
            .success
            .iter()
            .map(|op| ResponseOp {
                response: Some(match &op.request {
                    Some(Request::RequestTxn(inner)) => {
                        response_op::Response::ResponseTxn(deepest_reply(inner))
                    }
                    _ => response_op::Response::ResponseRange(RangeResponse {
                        header: Some(ResponseHeader::default()),
                        kvs: vec![tessera_proto::mvccpb::KeyValue {
                            key: b"k".to_vec(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        TxnResponse {
            header: Some(tessera_proto::etcdserverpb::ResponseHeader::default()),
            succeeded: true,
            responses,
        }
    }

    /// What validation lets through must decode wherever Tessera decodes
    /// it again: as a command inside a Raft batch when it is applied, and
    /// its result inside the reply a leader sends a follower.
    #[test]
    fn the_deepest_txn_allowed_decodes_in_a_raft_batch_and_in_a_reply() {
        use prost::Message;
        use tessera_proto::tessera::{
            raft_command, raft_result, ProposeReply, RaftBatch, RaftBatchResult, RaftCommand,
            RaftResult,
        };
        let t = nested(MAX_TXN_DEPTH);
        let batch = RaftBatch {
            commands: vec![RaftCommand {
                request: Some(raft_command::Request::Txn(t.clone())),
                auth: None,
            }],
            proposal: 0,
        };
        let decoded = RaftBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, batch);
        let reply = ProposeReply {
            index: 1,
            results: Some(RaftBatchResult {
                results: vec![RaftResult {
                    response: Some(raft_result::Response::Txn(deepest_reply(&t))),
                    error: 0,
                }],
            }),
        };
        assert_eq!(
            ProposeReply::decode(reply.encode_to_vec().as_slice()).unwrap(),
            reply
        );
        // The margin is real: a few levels more and decoding fails.
        let too_deep = RaftBatch {
            commands: vec![RaftCommand {
                request: Some(raft_command::Request::Txn(nested(
                    3 * MAX_TXN_DEPTH / 2 + 2,
                ))),
                auth: None,
            }],
            proposal: 0,
        };
        assert!(RaftBatch::decode(too_deep.encode_to_vec().as_slice()).is_err());
    }

    #[test]
    fn too_many_ops_and_empty_keys() {
        let ops: Vec<RequestOp> = (0..3).map(|i| put(&i.to_string())).collect();
        assert_eq!(check_txn(&txn(ops), 2), Err(EtcdError::TooManyOps));
        assert_eq!(check_txn(&txn(vec![put("")]), 2), Err(EtcdError::EmptyKey));
        assert_eq!(
            check_txn(&txn(vec![RequestOp { request: None }]), 2),
            Err(EtcdError::KeyNotFound)
        );
    }
}
