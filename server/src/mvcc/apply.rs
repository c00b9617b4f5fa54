//! etcd's request semantics on top of a [`WriteTxn`]: Range, Put, DeleteRange
//! and Txn exactly as etcd's applier evaluates them, including the quirks
//! clients can observe (which revision each nested header carries, when a
//! delete does not create a revision, how limits interact with sorting).

use std::cmp::Ordering;

use tessera_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use tessera_proto::mvccpb::KeyValue;

use super::encoding::KeyRange;
use super::store::{StoreError, WriteTxn};
use crate::errors::EtcdError;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// etcd's `rangeKeys` revision rules.
fn resolve_read_rev(txn: &WriteTxn<'_>, requested: i64) -> Result<i64, EtcdError> {
    let cur = txn.read_rev();
    if requested > cur {
        return Err(EtcdError::FutureRev);
    }
    let rev = if requested <= 0 { cur } else { requested };
    if rev < txn.compact_rev() {
        return Err(EtcdError::Compacted);
    }
    Ok(rev)
}

/// A Range request.
pub fn range(txn: &WriteTxn<'_>, r: &RangeRequest) -> Result<RangeResponse, ApplyError> {
    use range_request::{SortOrder, SortTarget};
    let rev = resolve_read_rev(txn, r.revision)?;
    let filtered = r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    // etcd fetches one more than the limit (to compute `more`) unless it has to
    // sort or filter everything first. Note it checks the *requested* order.
    let fetch = if r.sort_order != SortOrder::None as i32 || filtered || r.limit <= 0 {
        0
    } else {
        r.limit as usize + 1
    };
    let (mut kvs, count) = txn.range(
        &KeyRange::new(&r.key, &r.range_end),
        rev,
        fetch,
        r.count_only,
    )?;

    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }

    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        // Stable sorts: ties keep key order, as etcd's (insertion) sort does.
        match order {
            SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
            _ => kvs.sort_by(cmp),
        }
    }

    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: header(txn.read_rev()),
        kvs,
        more,
        count: count as i64,
    })
}

/// A Put request. `check_lease` is set for a Put outside a Txn (inside one,
/// [`txn`] has checked every put before writing anything).
pub fn put(
    txn: &mut WriteTxn<'_>,
    p: &PutRequest,
    check_lease: bool,
) -> Result<PutResponse, ApplyError> {
    if check_lease && p.lease != 0 && !txn.lease_exists(p.lease)? {
        return Err(EtcdError::LeaseNotFound.into());
    }
    let prev = if p.ignore_value || p.ignore_lease || p.prev_kv {
        txn.latest(&p.key)?
    } else {
        None
    };
    if (p.ignore_value || p.ignore_lease) && prev.is_none() {
        return Err(EtcdError::KeyNotFound.into());
    }
    let value = match (&prev, p.ignore_value) {
        (Some(prev), true) => prev.value.clone(),
        _ => p.value.clone(),
    };
    let lease = match (&prev, p.ignore_lease) {
        (Some(prev), true) => prev.lease,
        _ => p.lease,
    };
    txn.put(&p.key, value, lease)?;
    Ok(PutResponse {
        header: header(txn.begin_rev() + 1),
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

/// A DeleteRange request.
pub fn delete_range(
    txn: &mut WriteTxn<'_>,
    d: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, ApplyError> {
    let deleted = txn.delete_range(&KeyRange::new(&d.key, &d.range_end), d.prev_kv)?;
    let revision = if deleted.count > 0 || txn.has_changes() {
        txn.begin_rev() + 1
    } else {
        txn.begin_rev()
    };
    Ok(DeleteRangeResponse {
        header: header(revision),
        deleted: deleted.count as i64,
        prev_kvs: deleted.prev_kvs,
    })
}

/// True when the txn (including nested txns, both branches) never writes.
pub fn is_txn_read_only(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) | None => true,
            Some(request_op::Request::RequestTxn(inner)) => is_txn_read_only(inner),
            Some(_) => false,
        })
}

/// A Txn request: evaluate every compare (also of nested txns on the taken
/// path) against the state before the txn, check the taken path, then apply.
pub fn txn(txn: &mut WriteTxn<'_>, t: &TxnRequest) -> Result<TxnResponse, ApplyError> {
    let mut path = Vec::new();
    compare_to_path(txn, t, &mut path)?;
    if !is_txn_read_only(t) {
        check_requests(t, &path, &mut |op| check_put(txn, op))?;
    }
    check_requests(t, &path, &mut |op| check_range(txn, op))?;
    let (mut resp, _) = apply_ops(txn, t, &path)?;
    resp.header = header(txn.read_rev());
    Ok(resp)
}

fn branch(t: &TxnRequest, succeeded: bool) -> &[RequestOp] {
    if succeeded {
        &t.success
    } else {
        &t.failure
    }
}

fn compare_to_path(
    txn: &WriteTxn<'_>,
    t: &TxnRequest,
    path: &mut Vec<bool>,
) -> Result<(), StoreError> {
    let mut ok = true;
    for c in &t.compare {
        if !compare_holds(txn, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    for op in branch(t, ok) {
        if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
            compare_to_path(txn, inner, path)?;
        }
    }
    Ok(())
}

fn compare_holds(txn: &WriteTxn<'_>, c: &Compare) -> Result<bool, StoreError> {
    let (kvs, _) = txn.range(
        &KeyRange::new(&c.key, &c.range_end),
        txn.read_rev(),
        0,
        false,
    )?;
    if kvs.is_empty() {
        if c.target == compare::CompareTarget::Value as i32 {
            return Ok(false);
        }
        return Ok(compare_kv(c, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    // As in etcd, a target union of the wrong kind compares against zero (or
    // the empty value).
    let ord = match (CompareTarget::try_from(c.target), &c.target_union) {
        (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => kv.value.as_slice().cmp(v),
        (Ok(CompareTarget::Value), _) => kv.value.as_slice().cmp(&[]),
        (Ok(CompareTarget::Create), u) => kv.create_revision.cmp(&match u {
            Some(TargetUnion::CreateRevision(r)) => *r,
            _ => 0,
        }),
        (Ok(CompareTarget::Mod), u) => kv.mod_revision.cmp(&match u {
            Some(TargetUnion::ModRevision(r)) => *r,
            _ => 0,
        }),
        (Ok(CompareTarget::Version), u) => kv.version.cmp(&match u {
            Some(TargetUnion::Version(r)) => *r,
            _ => 0,
        }),
        (Ok(CompareTarget::Lease), u) => kv.lease.cmp(&match u {
            Some(TargetUnion::Lease(r)) => *r,
            _ => 0,
        }),
        (Err(_), _) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

/// Runs `check` over every non-txn op on the taken path; returns how many path
/// entries the txn consumed.
fn check_requests(
    t: &TxnRequest,
    path: &[bool],
    check: &mut dyn FnMut(&RequestOp) -> Result<(), ApplyError>,
) -> Result<usize, ApplyError> {
    let mut used = 1;
    for op in branch(t, path[0]) {
        match &op.request {
            Some(request_op::Request::RequestTxn(inner)) => {
                used += check_requests(inner, &path[used..], check)?;
            }
            _ => check(op)?,
        }
    }
    Ok(used)
}

fn check_put(txn: &WriteTxn<'_>, op: &RequestOp) -> Result<(), ApplyError> {
    let Some(request_op::Request::RequestPut(p)) = &op.request else {
        return Ok(());
    };
    if (p.ignore_value || p.ignore_lease) && txn.latest(&p.key)?.is_none() {
        return Err(EtcdError::KeyNotFound.into());
    }
    if p.lease != 0 && !txn.lease_exists(p.lease)? {
        return Err(EtcdError::LeaseNotFound.into());
    }
    Ok(())
}

fn check_range(txn: &WriteTxn<'_>, op: &RequestOp) -> Result<(), ApplyError> {
    let Some(request_op::Request::RequestRange(r)) = &op.request else {
        return Ok(());
    };
    // etcd compares against the first (compacted) revision with `<`, so a
    // negative revision inside a txn is "compacted" while a top-level Range
    // treats it as "latest".
    match r.revision {
        0 => Ok(()),
        rev if rev > txn.begin_rev() => Err(EtcdError::FutureRev.into()),
        rev if rev < txn.compact_rev() => Err(EtcdError::Compacted.into()),
        _ => Ok(()),
    }
}

fn apply_ops(
    txn: &mut WriteTxn<'_>,
    t: &TxnRequest,
    path: &[bool],
) -> Result<(TxnResponse, usize), ApplyError> {
    let succeeded = path[0];
    let mut used = 1;
    let mut responses = Vec::new();
    for op in branch(t, succeeded) {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                Some(response_op::Response::ResponseRange(range(txn, r)?))
            }
            Some(request_op::Request::RequestPut(p)) => {
                Some(response_op::Response::ResponsePut(put(txn, p, false)?))
            }
            Some(request_op::Request::RequestDeleteRange(d)) => Some(
                response_op::Response::ResponseDeleteRange(delete_range(txn, d)?),
            ),
            Some(request_op::Request::RequestTxn(inner)) => {
                let (resp, n) = apply_ops(txn, inner, &path[used..])?;
                used += n;
                Some(response_op::Response::ResponseTxn(resp))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    // Nested txn headers stay empty, as in etcd; the caller fills the outer one.
    Ok((
        TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded,
            responses,
        },
        used,
    ))
}
