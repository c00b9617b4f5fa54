//! etcd's data corruption checks (`--experimental-initial-corrupt-check`,
//! `--experimental-corrupt-check-time`): members compare their HashKV at a
//! common revision.
//!
//! - At start, before serving clients, a member asks every peer for its hash
//!   at the member's own revision; a peer with the same compacted revision
//!   and a different hash means the data differ, and the member refuses to
//!   start ("found data inconsistency with peers").
//! - Periodically, the leader asks every peer for its hash at the leader's
//!   revision and raises the `CORRUPT` alarm for a member whose revision or
//!   compacted revision is ahead of the leader's, or whose hash differs at
//!   the same compacted revision (or for itself, when its own hash changed
//!   under the same revision). While the alarm is raised, writes are
//!   refused with `etcdserver: corrupt cluster` (see the state machine).

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::etcdserverpb::{AlarmType, HashKvRequest, HashKvResponse};
use tonic::Status;

use crate::errors::EtcdError;
use crate::node::Node;
use crate::peer::method;

/// How long a peer may take to compute and send its hash.
const PEER_HASH_TIMEOUT: Duration = Duration::from_secs(10);

/// Every other member's answer to "your HashKV at `revision`".
async fn peer_hashes(node: &Node, revision: i64) -> Vec<(u64, Result<HashKvResponse, Status>)> {
    let others: Vec<u64> = node
        .membership()
        .into_iter()
        .map(|m| m.id)
        .filter(|&id| id != node.member_id)
        .collect();
    let asks = others.into_iter().map(|id| async move {
        let request = HashKvRequest { revision };
        let ask = node.forward::<_, HashKvResponse>(id, method::HASH_KV, &request);
        let answer = tokio::time::timeout(PEER_HASH_TIMEOUT, ask)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")));
        (id, answer)
    });
    futures::future::join_all(asks).await
}

fn revision_of(r: &HashKvResponse) -> i64 {
    r.header.as_ref().map_or(0, |h| h.revision)
}

#[derive(Debug, thiserror::Error)]
#[error("{member:x} found data inconsistency with peers")]
pub struct Inconsistent {
    member: u64,
}

/// etcd's `CheckInitialHashKV`.
pub async fn initial_check(node: &Node) -> anyhow::Result<()> {
    let id = format!("{:x}", node.member_id);
    tracing::info!(local_member_id = %id, "starting initial corruption check");
    let own = node.local_hash_kv(0).await?;
    let revision = revision_of(&own);
    let mut mismatches = 0;
    for (peer, answer) in peer_hashes(node, revision).await {
        let peer = format!("{peer:x}");
        match answer {
            Ok(p) if p.hash != own.hash && p.compact_revision == own.compact_revision => {
                mismatches += 1;
                tracing::error!(local_member_id = %id, local_member_revision = revision,
                    local_member_compact_revision = own.compact_revision, local_member_hash = own.hash,
                    remote_peer_id = %peer, remote_peer_hash = p.hash,
                    "found different hash values from remote peer");
            }
            Ok(p) if p.hash != own.hash => {
                tracing::warn!(local_member_id = %id, local_member_compact_revision = own.compact_revision,
                    remote_peer_id = %peer, remote_peer_compact_revision = p.compact_revision,
                    "found different compact revision values");
            }
            Ok(_) => {}
            Err(e) if e.message() == EtcdError::FutureRev.to_string() => {
                tracing::warn!(local_member_id = %id, remote_peer_id = %peer, error = %e.message(),
                    "cannot fetch hash from slow remote peer");
            }
            Err(e) if e.message() == EtcdError::Compacted.to_string() => {
                tracing::warn!(local_member_id = %id, remote_peer_id = %peer, error = %e.message(),
                    "cannot fetch hash from remote peer; local member is behind");
            }
            Err(e) => {
                tracing::warn!(local_member_id = %id, remote_peer_id = %peer, error = %e.message(),
                    "cannot fetch hash from remote peer");
            }
        }
    }
    if mismatches > 0 {
        return Err(Inconsistent {
            member: node.member_id,
        }
        .into());
    }
    tracing::info!(local_member_id = %id, "initial corruption checking passed; no corruption");
    Ok(())
}

/// Runs etcd's periodic check on the leader every `every`.
pub fn spawn_periodic(node: Arc<Node>, every: Duration) {
    tracing::info!(interval = ?every, "enabled corruption checking");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !node.is_leader() {
                continue;
            }
            if let Err(e) = check_as_leader(&node).await {
                tracing::warn!(error = %e.message(), "corruption check failed");
            }
        }
    });
}

/// etcd's `checkHashKV`: which member, if any, the leader finds corrupt.
async fn check_as_leader(node: &Arc<Node>) -> Result<(), Status> {
    let first = node.local_hash_kv(0).await?;
    let (hash, revision, compact) = (first.hash, revision_of(&first), first.compact_revision);
    let peers = peer_hashes(node, revision).await;
    node.read_barrier().await?;
    let now = node.local_hash_kv(0).await?;
    let (revision2, compact2) = (revision_of(&now), now.compact_revision);

    let mut corrupt = None;
    if now.hash != hash && revision2 == revision && compact2 == compact {
        tracing::error!(
            revision,
            compact_revision = compact,
            hash,
            hash2 = now.hash,
            "found hash mismatch on the leader itself"
        );
        corrupt = Some(node.member_id);
    }
    for (id, answer) in peers {
        let Ok(p) = answer else { continue };
        let reason = if revision_of(&p) > revision2 {
            "revision from follower must be less than or equal to leader's"
        } else if p.compact_revision > compact2 {
            "compact revision from follower must be less than or equal to leader's"
        } else if p.compact_revision == compact && p.hash != hash {
            "same compact revision then hashes must match"
        } else {
            continue;
        };
        tracing::error!(remote_peer_id = %format!("{id:x}"), leader_revision = revision2,
            follower_revision = revision_of(&p), leader_compact_revision = compact2,
            follower_compact_revision = p.compact_revision, leader_hash = hash,
            follower_hash = p.hash, "{reason}");
        corrupt.get_or_insert(id);
    }
    if let Some(member) = corrupt {
        tracing::error!(member = %format!("{member:x}"), "raising CORRUPT alarm");
        node.raise_alarm(member, AlarmType::Corrupt).await?;
    }
    Ok(())
}
