//! put, range, txn-put and txn-mixed.

use tessera_proto::etcdserverpb::request_op::Request as OpRequest;
use tessera_proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};

use super::{key, slot, value};
use crate::load::{self, error_text, CallFuture, Target};
use crate::report::Stats;
use crate::unary::UnaryConn;

/// Flags shared by the writing workloads.
#[derive(Clone, Debug, clap::Args)]
pub struct WriteArgs {
    /// Total number of requests.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Maximum requests per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// How many distinct keys are written.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Write keys in order instead of at random.
    #[arg(long)]
    pub sequential_keys: bool,
}

/// `--consistency`: l (linearizable) or s (serializable).
pub fn serializable(consistency: &str) -> anyhow::Result<bool> {
    match consistency {
        "l" => Ok(false),
        "s" => Ok(true),
        other => anyhow::bail!("unknown consistency flag {other:?} (expected l or s)"),
    }
}

fn put_request(w: &WriteArgs, i: u64, val: &[u8]) -> PutRequest {
    PutRequest {
        key: key(slot(i, w.key_space_size, w.sequential_keys), w.key_size),
        value: val.to_vec(),
        ..Default::default()
    }
}

fn done<T>(r: Result<T, tonic::Status>) -> Result<(), String> {
    r.map(|_| ()).map_err(error_text)
}

pub async fn put(target: &Target, w: &WriteArgs) -> anyhow::Result<Vec<Stats>> {
    anyhow::ensure!(
        w.key_space_size > 0,
        "expected positive --key-space-size, got ({})",
        w.key_space_size
    );
    let conns = target.connect_unary().await?;
    let val = value(w.val_size);
    let w2 = w.clone();
    let call = move |conn: &UnaryConn, i: u64| -> CallFuture {
        let req = put_request(&w2, i, &val);
        let conn = conn.clone();
        Box::pin(async move { (0, done(conn.put(&req).await)) })
    };
    Ok(load::run(&["put"], &conns, target.clients, w.total, w.rate, call).await)
}

#[derive(Clone, Debug, clap::Args)]
pub struct RangeArgs {
    /// The key (or start of the range) to read.
    pub key: String,
    /// End of the range (exclusive); only `key` when omitted.
    pub end_range: Option<String>,
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// l (linearizable) or s (serializable).
    #[arg(long, default_value = "l")]
    pub consistency: String,
    /// Maximum number of results (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Only count the keys.
    #[arg(long)]
    pub count_only: bool,
}

fn range_request(r: &RangeArgs, serializable: bool) -> RangeRequest {
    RangeRequest {
        key: r.key.as_bytes().to_vec(),
        range_end: r.end_range.clone().unwrap_or_default().into_bytes(),
        limit: r.limit,
        serializable,
        count_only: r.count_only,
        ..Default::default()
    }
}

pub async fn range(target: &Target, r: &RangeArgs) -> anyhow::Result<Vec<Stats>> {
    let req = range_request(r, serializable(&r.consistency)?);
    let conns = target.connect_unary().await?;
    let call = move |conn: &UnaryConn, _i: u64| -> CallFuture {
        let req = req.clone();
        let conn = conn.clone();
        Box::pin(async move { (0, done(conn.range(&req).await)) })
    };
    Ok(load::run(&["range"], &conns, target.clients, r.total, r.rate, call).await)
}

#[derive(Clone, Debug, clap::Args)]
pub struct TxnPutArgs {
    #[command(flatten)]
    pub write: WriteArgs,
    /// Puts per transaction.
    #[arg(long, default_value_t = 1)]
    pub txn_ops: u64,
}

pub async fn txn_put(target: &Target, t: &TxnPutArgs) -> anyhow::Result<Vec<Stats>> {
    anyhow::ensure!(t.txn_ops > 0, "--txn-ops must be at least 1");
    // A txn may not put the same key twice: its keys are consecutive slots.
    anyhow::ensure!(
        t.txn_ops <= t.write.key_space_size,
        "--txn-ops ({}) must not exceed --key-space-size ({})",
        t.txn_ops,
        t.write.key_space_size
    );
    let conns = target.connect_unary().await?;
    let val = value(t.write.val_size);
    let (w, ops) = (t.write.clone(), t.txn_ops);
    let call = move |conn: &UnaryConn, i: u64| -> CallFuture {
        let space = w.key_space_size;
        let first = slot(i * ops, space, w.sequential_keys);
        let success = (0..ops)
            .map(|j| RequestOp {
                request: Some(OpRequest::RequestPut(PutRequest {
                    key: key((first + j) % space, w.key_size),
                    value: val.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        let txn = TxnRequest {
            success,
            ..Default::default()
        };
        let conn = conn.clone();
        Box::pin(async move { (0, done(conn.txn(&txn).await)) })
    };
    let w = &t.write;
    Ok(load::run(&["txn-put"], &conns, target.clients, w.total, w.rate, call).await)
}

#[derive(Clone, Debug, clap::Args)]
pub struct TxnMixedArgs {
    /// The key (or start of the range) reads ask for.
    pub key: String,
    /// End of the range reads ask for.
    pub end_range: Option<String>,
    #[command(flatten)]
    pub write: WriteArgs,
    /// Reads per write.
    #[arg(long, default_value_t = 1.0)]
    pub rw_ratio: f64,
    /// l (linearizable) or s (serializable) reads.
    #[arg(long, default_value = "l")]
    pub consistency: String,
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
}

/// Reads (ranges wrapped in a txn) and writes (a put in a txn) mixed at
/// `--rw-ratio`; one report for each.
pub async fn txn_mixed(target: &Target, t: &TxnMixedArgs) -> anyhow::Result<Vec<Stats>> {
    anyhow::ensure!(t.rw_ratio >= 0.0, "--rw-ratio must not be negative");
    let read = range_request(
        &RangeArgs {
            key: t.key.clone(),
            end_range: t.end_range.clone(),
            total: 0,
            rate: 0,
            consistency: t.consistency.clone(),
            limit: t.limit,
            count_only: false,
        },
        serializable(&t.consistency)?,
    );
    let conns = target.connect_unary().await?;
    let val = value(t.write.val_size);
    let (w, ratio) = (t.write.clone(), t.rw_ratio);
    let call = move |conn: &UnaryConn, i: u64| -> CallFuture {
        // Request i is a write when it crosses a multiple of (ratio + 1).
        let is_write =
            ((i as f64) / (ratio + 1.0)).floor() != (((i + 1) as f64) / (ratio + 1.0)).floor();
        let (kind, op) = if is_write {
            (1, OpRequest::RequestPut(put_request(&w, i, &val)))
        } else {
            (0, OpRequest::RequestRange(read.clone()))
        };
        let txn = TxnRequest {
            success: vec![RequestOp { request: Some(op) }],
            ..Default::default()
        };
        let conn = conn.clone();
        Box::pin(async move { (kind, done(conn.txn(&txn).await)) })
    };
    let w = &t.write;
    Ok(load::run(
        &["read", "write"],
        &conns,
        target.clients,
        w.total,
        w.rate,
        call,
    )
    .await)
}
