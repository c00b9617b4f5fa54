//! Lease deadlines, kept in memory by the member that leads.
//!
//! Which leases exist, and their granted TTLs, is replicated state in the
//! `lease` column family. When each one expires is not: as in etcd, only the
//! leader tracks deadlines, renews them on keep-alive and proposes a revoke
//! through Raft once one passes. A member that becomes leader (including on
//! restart) gives every lease its full TTL again plus an election timeout,
//! which is etcd's behaviour without lease checkpointing.
//!
//! Deadlines mean something only while the lessor is *primary*: from its
//! promotion (which resets them all) until leadership is lost. A follower's
//! deadlines are never renewed, so nothing is due for revoke and no renewal
//! is answered until the lessor has been promoted (etcd's lessor checks
//! its primary state the same way).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::mvcc::LeaseRecord;

/// etcd's largest grantable TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// How long an expired lease waits before its revoke is proposed again, if
/// the first proposal did not take effect (etcd's expiredLeaseRetryInterval).
const REVOKE_RETRY: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
struct Deadline {
    ttl: i64,
    expiry: Instant,
    revoke_proposed: Option<Instant>,
}

/// What a keep-alive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for this many seconds.
    Renewed(i64),
    /// Past its deadline; a revoke is on its way.
    Expired,
    /// No such lease.
    NotFound,
    /// This lessor is not primary (yet): ask again after its promotion.
    NotPrimary,
}

pub struct Lessor {
    /// etcd's minimum TTL: 1.5 election timeouts, rounded up to seconds.
    pub min_ttl: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    deadlines: HashMap<i64, Deadline>,
    /// Promoted and not demoted since: the deadlines are this leader's.
    primary: bool,
}

/// Seconds from `duration` rounded up, as etcd computes its minimum TTL.
fn ceil_secs(duration: Duration) -> i64 {
    let ms = duration.as_millis() as i64;
    (ms + 999) / 1000
}

fn deadline_after(ttl: i64, now: Instant, extend: Duration) -> Instant {
    let ttl = Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64);
    now.checked_add(ttl + extend)
        .unwrap_or(now + Duration::from_secs(u32::MAX as u64))
}

impl Lessor {
    /// `election_timeout` and `heartbeat` in milliseconds, as configured.
    pub fn new(election_timeout_ms: u64, heartbeat_ms: u64) -> Self {
        let ticks = election_timeout_ms / heartbeat_ms.max(1);
        let min = Duration::from_millis(3 * ticks / 2 * heartbeat_ms);
        Lessor {
            min_ttl: ceil_secs(min).max(1),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TTL a grant asking for `requested` seconds gets.
    pub fn granted_ttl(&self, requested: i64) -> i64 {
        requested.max(self.min_ttl)
    }

    /// Starts tracking every lease in `records` with a fresh deadline
    /// `extend` past its TTL (on start, or snapshot install).
    pub fn reset(&self, records: &[LeaseRecord], extend: Duration) {
        let now = Instant::now();
        let mut state = self.lock();
        let map = &mut state.deadlines;
        map.clear();
        for r in records {
            map.insert(
                r.id,
                Deadline {
                    ttl: r.ttl,
                    expiry: deadline_after(r.ttl, now, extend),
                    revoke_proposed: None,
                },
            );
        }
    }

    /// Makes this lessor primary (its member leads): every tracked lease
    /// gets a full TTL again plus `extend`, in the same step that lets
    /// deadlines expire, so none expires on a deadline from before.
    pub fn promote(&self, extend: Duration) {
        let now = Instant::now();
        let mut state = self.lock();
        for d in state.deadlines.values_mut() {
            d.expiry = deadline_after(d.ttl, now, extend);
            d.revoke_proposed = None;
        }
        state.primary = true;
    }

    /// Leadership is lost: deadlines stop counting until the next promotion.
    pub fn demote(&self) {
        self.lock().primary = false;
    }

    pub fn is_primary(&self) -> bool {
        self.lock().primary
    }

    pub fn granted(&self, id: i64, ttl: i64) {
        self.lock().deadlines.insert(
            id,
            Deadline {
                ttl,
                expiry: deadline_after(ttl, Instant::now(), Duration::ZERO),
                revoke_proposed: None,
            },
        );
    }

    pub fn revoked(&self, id: i64) {
        self.lock().deadlines.remove(&id);
    }

    pub fn renew(&self, id: i64) -> Renewal {
        let now = Instant::now();
        let mut state = self.lock();
        if !state.primary {
            return Renewal::NotPrimary;
        }
        match state.deadlines.get_mut(&id) {
            None => Renewal::NotFound,
            Some(d) if d.expiry <= now => Renewal::Expired,
            Some(d) => {
                d.expiry = deadline_after(d.ttl, now, Duration::ZERO);
                Renewal::Renewed(d.ttl)
            }
        }
    }

    pub fn is_tracked(&self, id: i64) -> bool {
        self.lock().deadlines.contains_key(&id)
    }

    /// Time left before lease `id` expires (negative once past), if tracked.
    pub fn remaining(&self, id: i64) -> Option<f64> {
        let now = Instant::now();
        self.lock()
            .deadlines
            .get(&id)
            .map(|d| seconds_until(d.expiry, now))
    }

    /// The ids of `ids` ordered by deadline, soonest first (etcd lists
    /// leases that way); ids not tracked go last.
    pub fn order_by_expiry(&self, ids: &mut [i64]) {
        let state = self.lock();
        ids.sort_by_key(|id| {
            let expiry = state.deadlines.get(id).map(|d| d.expiry);
            (expiry.is_none(), expiry, *id)
        });
    }

    /// Leases past their deadline whose revoke should be proposed now, at
    /// most `limit` of them; each is marked so it is not proposed again
    /// before [`REVOKE_RETRY`]. None unless this lessor is primary.
    pub fn due_for_revoke(&self, limit: usize) -> Vec<i64> {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut state = self.lock();
        if !state.primary {
            return due;
        }
        for (id, d) in state.deadlines.iter_mut() {
            if due.len() >= limit {
                break;
            }
            let retry_ok = d
                .revoke_proposed
                .is_none_or(|at| now.duration_since(at) >= REVOKE_RETRY);
            if d.expiry <= now && retry_ok {
                d.revoke_proposed = Some(now);
                due.push(*id);
            }
        }
        due
    }
}

fn seconds_until(t: Instant, now: Instant) -> f64 {
    if t >= now {
        (t - now).as_secs_f64()
    } else {
        -(now - t).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_ttl_matches_etcd_defaults() {
        // 1000 ms election timeout, 100 ms heartbeat: 15 ticks of 100 ms = 1.5 s → 2 s.
        let l = Lessor::new(1000, 100);
        assert_eq!(l.min_ttl, 2);
        assert_eq!(l.granted_ttl(1), 2);
        assert_eq!(l.granted_ttl(-5), 2);
        assert_eq!(l.granted_ttl(60), 60);
        assert_eq!(Lessor::new(5000, 500).min_ttl, 8);
    }

    #[test]
    fn deadlines_renew_expire_and_are_proposed_once() {
        let l = Lessor::new(1000, 100);
        l.promote(Duration::ZERO);
        l.granted(1, 0);
        l.granted(2, 100);
        assert_eq!(l.renew(1), Renewal::Expired);
        assert_eq!(l.renew(2), Renewal::Renewed(100));
        assert_eq!(l.renew(3), Renewal::NotFound);
        assert_eq!(l.due_for_revoke(10), vec![1]);
        assert!(
            l.due_for_revoke(10).is_empty(),
            "not proposed twice at once"
        );
        l.revoked(1);
        assert!(!l.is_tracked(1));
        assert!(l.remaining(2).unwrap() > 99.0);

        l.reset(&[LeaseRecord { id: 5, ttl: 0 }], Duration::from_secs(60));
        assert!(!l.is_tracked(2));
        assert_eq!(l.renew(5), Renewal::Renewed(0), "extended after a reset");
    }

    /// A member's deadlines from before it led (set when it started, never
    /// renewed while it followed) must not expire anything: only a promoted
    /// lessor revokes or renews, and promotion starts every clock afresh.
    #[test]
    fn only_a_promoted_lessor_expires_or_renews() {
        let l = Lessor::new(1000, 100);
        l.reset(&[LeaseRecord { id: 1, ttl: 0 }], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            l.due_for_revoke(10).is_empty(),
            "a follower revokes nothing"
        );
        assert_eq!(l.renew(1), Renewal::NotPrimary);
        l.promote(Duration::from_secs(60));
        assert!(
            l.due_for_revoke(10).is_empty(),
            "promotion restarts the clock"
        );
        assert_eq!(l.renew(1), Renewal::Renewed(0));
        l.demote();
        assert_eq!(l.renew(1), Renewal::NotPrimary);
        assert!(!l.is_primary());
    }
}
