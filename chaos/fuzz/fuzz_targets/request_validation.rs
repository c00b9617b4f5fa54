//! Hostile client requests: any bytes a client sends are decoded as the
//! request they claim to be and go through the checks made before anything
//! is proposed (etcd's `v3rpc/key.go`), and through the permission check a
//! user's roles get. Nothing may panic; a permitted single key must lie in
//! one of the granted intervals; and a txn that passes validation must
//! decode again wherever Tessera decodes it: inside the Raft batch it is
//! proposed in, and as the result a leader sends back to a follower (a
//! committed command that cannot be decoded used to stop every member).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_fuzz::perms::UnifiedPerms;
use tessera_fuzz::validate;
use tessera_proto::authpb::{permission::Type as PermType, Role};
use tessera_proto::etcdserverpb::{
    request_op, response_op, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use tessera_proto::mvccpb::KeyValue;
use tessera_proto::tessera::{
    raft_command, raft_result, ProposeReply, RaftBatch, RaftBatchResult, RaftCommand, RaftResult,
};

/// The deepest reply a txn of `t`'s shape can get: every operation answered
/// with the messages its response nests (a range with a key-value, a put
/// with its previous key-value), every level with its header.
fn deepest_reply(t: &TxnRequest) -> TxnResponse {
    let op = |op: &RequestOp| ResponseOp {
        response: Some(match &op.request {
            Some(request_op::Request::RequestTxn(inner)) => {
                response_op::Response::ResponseTxn(deepest_reply(inner))
            }
            _ => response_op::Response::ResponseRange(RangeResponse {
                header: Some(ResponseHeader::default()),
                kvs: vec![KeyValue::default()],
                ..Default::default()
            }),
        }),
    };
    TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded: true,
        responses: t.success.iter().chain(&t.failure).map(op).collect(),
    }
}

/// A txn that passed validation, proposed and answered: it must decode as
/// the state machine and a follower decode it.
fn check_round_trip(t: &TxnRequest) {
    let batch = RaftBatch {
        commands: vec![RaftCommand {
            request: Some(raft_command::Request::Txn(t.clone())),
            auth: None,
        }],
        proposal: 7,
    };
    let decoded = RaftBatch::decode(batch.encode_to_vec().as_slice())
        .expect("a validated txn does not decode in its Raft batch");
    assert_eq!(decoded, batch);
    let reply = ProposeReply {
        index: 1,
        results: Some(RaftBatchResult {
            results: vec![RaftResult {
                response: Some(raft_result::Response::Txn(deepest_reply(t))),
                error: 0,
            }],
        }),
    };
    ProposeReply::decode(reply.encode_to_vec().as_slice())
        .expect("the reply to a validated txn does not decode on a follower");
}

/// `t` wrapped in `levels` more txns (each holding it in a branch the
/// fuzzer picks), so that any nesting depth is one byte away.
fn wrapped(mut t: TxnRequest, levels: u8, branch_bits: u8) -> TxnRequest {
    for level in 0..levels {
        let op = RequestOp {
            request: Some(request_op::Request::RequestTxn(t)),
        };
        t = if branch_bits >> (level % 8) & 1 == 0 {
            TxnRequest {
                success: vec![op],
                ..Default::default()
            }
        } else {
            TxnRequest {
                failure: vec![op],
                ..Default::default()
            }
        };
    }
    t
}

/// Whether `key` lies in the permission's interval, computed the obvious way.
fn granted(role: &Role, key: &[u8], want: PermType) -> bool {
    role.key_permission.iter().any(|p| {
        let kind = PermType::try_from(p.perm_type).unwrap_or(PermType::Read);
        let kind_ok = kind == PermType::Readwrite || kind == want;
        let inside = match p.range_end.as_slice() {
            [] => key == p.key.as_slice(),
            [0] => key >= p.key.as_slice(),
            end => key >= p.key.as_slice() && key < end,
        };
        kind_ok && inside
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            if let Ok(r) = RangeRequest::decode(rest) {
                let _ = validate::check_range(&r);
            }
        }
        1 => {
            if let Ok(p) = PutRequest::decode(rest) {
                let _ = validate::check_put(&p);
            }
        }
        2 => {
            if let Ok(d) = DeleteRangeRequest::decode(rest) {
                let _ = validate::check_delete(&d);
            }
        }
        3 => {
            if let Ok(t) = TxnRequest::decode(rest) {
                if validate::check_txn(&t, 128).is_ok() {
                    check_round_trip(&t);
                }
            }
        }
        4 => {
            // [levels, branch bits, txn...]: a txn nested deeper.
            let [levels, bits, body @ ..] = rest else {
                return;
            };
            if let Ok(t) = TxnRequest::decode(body) {
                let t = wrapped(t, *levels % 64, *bits);
                if validate::check_txn(&t, 128).is_ok() {
                    check_round_trip(&t);
                }
            }
        }
        _ => {
            // A role, then keys to check against it.
            let Some((&len, rest)) = rest.split_first() else {
                return;
            };
            let (role, keys) = rest.split_at((len as usize).min(rest.len()));
            let Ok(role) = Role::decode(role) else {
                return;
            };
            let perms = UnifiedPerms::of([&role]);
            for key in keys.chunks(3) {
                for want in [PermType::Read, PermType::Write] {
                    assert_eq!(
                        perms.allows(key, &[], want),
                        granted(&role, key, want),
                        "key {key:?} {want:?} in {role:?}"
                    );
                    // Ranges must not panic, whatever their shape.
                    let _ = perms.allows(key, &key[..key.len() / 2], want);
                    let _ = perms.allows(key, &[0], want);
                }
            }
        }
    }
});
