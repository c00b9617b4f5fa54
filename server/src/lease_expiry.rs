//! The leader's expiry loop: leases past their deadline are revoked through
//! Raft, so every member deletes their keys at the same revision.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::etcdserverpb::LeaseRevokeRequest;
use tessera_proto::tessera::raft_command::Request;

use crate::node::Node;

/// How often deadlines are checked (etcd checks every 500 ms).
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Revokes proposed per check: etcd's 1000 revokes per second.
const REVOKES_PER_CHECK: usize = 500;

pub fn spawn(node: Arc<Node>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !node.is_leader() {
                continue;
            }
            for id in node.lessor.due_for_revoke(REVOKES_PER_CHECK) {
                let node = node.clone();
                tokio::spawn(async move {
                    let revoke = Request::LeaseRevoke(LeaseRevokeRequest { id });
                    match node.propose_internal(revoke).await {
                        Ok(_) => tracing::debug!(lease = id, "revoked expired lease"),
                        // Revoked meanwhile by a client: nothing left to do.
                        Err(e) if e.code() == tonic::Code::NotFound => {
                            node.lessor.revoked(id);
                        }
                        Err(e) => {
                            tracing::warn!(lease = id, error = %e, "revoking expired lease failed")
                        }
                    }
                });
            }
        }
    });
}
