//! A checker for lease expiry: a lease must never expire early.
//!
//! A lease granted or kept alive with TTL `t` by a request called at time
//! `c` expires no earlier than `c + t` (the leader renews it when the
//! request arrives, which is after `c`; leader changes only extend leases).
//! A linearizable read that returned at `r` and found the lease's key gone
//! shows the lease expired before `r`. So `r < c + t` for any acknowledged
//! grant or renewal is an early expiry. Times are nanoseconds of one
//! monotonic clock.

use serde::{Deserialize, Serialize};

/// One acknowledged grant or keep-alive: when it was sent and the TTL the
/// server answered with, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub called: u64,
    pub ttl_secs: i64,
}

/// What a lease client saw of one lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLife {
    pub id: i64,
    pub renewals: Vec<Renewal>,
    /// Return time of the first read that found the lease's key gone.
    pub seen_gone: Option<u64>,
    /// The client revoked the lease itself (at or after this call time):
    /// disappearance after that is no expiry.
    pub revoked_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease {id:x} expired early: gone by {gone_ns} ns, but renewed at {called_ns} ns for {ttl_secs} s ({early_ms} ms early)")]
pub struct EarlyExpiry {
    pub id: i64,
    pub gone_ns: u64,
    pub called_ns: u64,
    pub ttl_secs: i64,
    pub early_ms: u64,
}

/// Checks one lease's life.
pub fn check_lease(life: &LeaseLife) -> Result<(), EarlyExpiry> {
    let Some(gone) = life.seen_gone else {
        return Ok(());
    };
    if life.revoked_at.is_some_and(|r| r <= gone) {
        return Ok(());
    }
    for renewal in &life.renewals {
        let ttl_ns = u64::try_from(renewal.ttl_secs.max(0))
            .unwrap_or(0)
            .saturating_mul(1_000_000_000);
        let earliest_expiry = renewal.called.saturating_add(ttl_ns);
        if renewal.called < gone && gone < earliest_expiry {
            return Err(EarlyExpiry {
                id: life.id,
                gone_ns: gone,
                called_ns: renewal.called,
                ttl_secs: renewal.ttl_secs,
                early_ms: (earliest_expiry - gone) / 1_000_000,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn life(renewals: &[(u64, i64)], gone: Option<u64>) -> LeaseLife {
        LeaseLife {
            id: 7,
            renewals: renewals
                .iter()
                .map(|&(called, ttl_secs)| Renewal { called, ttl_secs })
                .collect(),
            seen_gone: gone,
            revoked_at: None,
        }
    }

    #[test]
    fn expiry_after_the_last_renewal_plus_ttl_is_fine() {
        assert_eq!(
            check_lease(&life(&[(0, 3), (S, 3)], Some(4 * S + 1))),
            Ok(())
        );
        assert_eq!(check_lease(&life(&[(0, 3)], None)), Ok(()));
    }

    #[test]
    fn expiry_before_a_renewal_ran_out_is_caught() {
        let err = check_lease(&life(&[(0, 3), (2 * S, 3)], Some(4 * S))).unwrap_err();
        assert_eq!(err.called_ns, 2 * S);
        assert_eq!(err.early_ms, 1000);
    }

    #[test]
    fn a_revoked_lease_may_vanish_at_once() {
        let mut l = life(&[(0, 10)], Some(S));
        l.revoked_at = Some(S / 2);
        assert_eq!(check_lease(&l), Ok(()));
    }
}
