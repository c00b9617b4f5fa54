//! Automatic compaction (`--auto-compaction-mode/-retention`), run by the
//! leader and applied through Raft like a client's Compact.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::etcdserverpb::CompactionRequest;
use tessera_proto::tessera::raft_command::Request as Cmd;

use crate::config::AutoCompaction;
use crate::node::Node;

/// How often revision-mode compaction checks (etcd: every 5 minutes).
const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);

pub fn spawn(node: Arc<Node>, policy: AutoCompaction) {
    tokio::spawn(async move {
        match policy {
            AutoCompaction::Revision(keep) => revision_mode(node, keep).await,
            AutoCompaction::Periodic(period) => periodic_mode(node, period).await,
        }
    });
}

async fn compact_to(node: &Node, revision: i64) {
    if revision <= node.store.compact_rev() || node.leader() != Some(node.member_id) {
        return;
    }
    let req = CompactionRequest {
        revision,
        physical: false,
    };
    match node.propose_internal(Cmd::Compaction(req)).await {
        Ok(_) => tracing::info!(revision, "auto-compaction finished"),
        Err(e) => tracing::warn!(revision, error = %e.message(), "auto-compaction failed"),
    }
}

async fn revision_mode(node: Arc<Node>, keep: i64) {
    let mut tick = tokio::time::interval(REVISION_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        compact_to(&node, node.store.current_rev() - keep).await;
    }
}

/// Samples the revision every tenth of the period (at most every hour/10) and
/// compacts to the newest sample that is at least one period old.
async fn periodic_mode(node: Arc<Node>, period: Duration) {
    let step = period.min(Duration::from_secs(3600)) / 10;
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut tick = tokio::time::interval(step.max(Duration::from_millis(10)));
    loop {
        tick.tick().await;
        let now = Instant::now();
        samples.push_back((now, node.store.current_rev()));
        let mut target = None;
        while let Some(&(at, rev)) = samples.front() {
            if now.duration_since(at) < period {
                break;
            }
            target = Some(rev);
            samples.pop_front();
        }
        if let Some(rev) = target {
            compact_to(&node, rev).await;
        }
    }
}
