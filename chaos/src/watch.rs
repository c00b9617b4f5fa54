//! A checker for etcd's watch guarantees.
//!
//! The reference is the store's own history of the watched keys, read after
//! the faults stopped (a watch from an early revision on a healthy member),
//! checked first to hold every write a client was acknowledged for. Each
//! watcher's log is then held against it:
//! - ordered and without gaps or duplicates: the events a watcher receives
//!   from its start revision are exactly the reference's, in order;
//! - atomic: the events of one revision arrive in one response;
//! - resumable: a watcher that reconnects from revision `r` receives the
//!   reference from `r` on;
//! - a progress notification at revision `r` comes only after every event
//!   up to `r` was delivered.

use serde::{Deserialize, Serialize};

/// One change of one key, as a watch event carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    /// `None` for a delete.
    pub value: Option<String>,
}

/// What a watcher received or did, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observed {
    /// One watch response carrying events, with its header revision.
    Events { header: i64, events: Vec<Change> },
    /// A progress notification (a response without events) at `revision`.
    Progress { revision: i64 },
    /// The watcher (re)started its watch from `from`.
    Started { from: i64 },
    /// The server canceled the watch (with the compact revision, if any).
    Canceled { compact_revision: i64 },
}

/// Why a watch log breaks a guarantee.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchViolation {
    #[error("acknowledged write of {key:?} at revision {revision} is not in the store's history")]
    LostWrite { revision: i64, key: String },
    #[error("watcher {watcher}: expected {expected:?}, received {received:?} (item {item})")]
    WrongEvent {
        watcher: usize,
        item: usize,
        // Boxed: the error stays small on the checker's success path.
        expected: Option<Box<Change>>,
        received: Box<Change>,
    },
    #[error("watcher {watcher}: revision {revision} split across responses (item {item})")]
    SplitRevision {
        watcher: usize,
        item: usize,
        revision: i64,
    },
    #[error("watcher {watcher}: progress at {progress} before the event at revision {pending} was delivered (item {item})")]
    ProgressAhead {
        watcher: usize,
        item: usize,
        progress: i64,
        pending: i64,
    },
    #[error("watcher {watcher}: response header {header} is behind its event at {revision} (item {item})")]
    HeaderBehind {
        watcher: usize,
        item: usize,
        header: i64,
        revision: i64,
    },
    #[error("watcher {watcher}: events received before the watch started (item {item})")]
    NotStarted { watcher: usize, item: usize },
    #[error("watcher {watcher}: canceled by the server (compact revision {compact_revision}) with compaction off (item {item})")]
    Canceled {
        watcher: usize,
        item: usize,
        compact_revision: i64,
    },
    #[error("the reference history is not ordered at revision {revision}")]
    UnorderedReference { revision: i64 },
    #[error(
        "watcher {watcher}: stalled at revision {last:?}, never received the last revision {end}"
    )]
    Stalled {
        watcher: usize,
        last: Option<i64>,
        end: i64,
    },
}

/// Every acknowledged write (its revision from the response header, key and
/// value) must be in the reference at that revision.
pub fn check_acknowledged(
    reference: &[Change],
    acknowledged: &[Change],
) -> Result<(), WatchViolation> {
    for w in reference.windows(2) {
        if w[1].revision < w[0].revision {
            return Err(WatchViolation::UnorderedReference {
                revision: w[1].revision,
            });
        }
    }
    for ack in acknowledged {
        let at = reference.partition_point(|c| c.revision < ack.revision);
        let found = reference[at..]
            .iter()
            .take_while(|c| c.revision == ack.revision)
            .any(|c| c == ack);
        if !found {
            return Err(WatchViolation::LostWrite {
                revision: ack.revision,
                key: ack.key.clone(),
            });
        }
    }
    Ok(())
}

/// Checks watcher number `watcher`'s `log` against `reference` (the full
/// history of the watched keys, ordered by revision, covering at least
/// every revision the watcher may have seen).
pub fn check_watcher(
    reference: &[Change],
    watcher: usize,
    log: &[Observed],
) -> Result<(), WatchViolation> {
    // Index in `reference` of the next event this watcher must receive;
    // `None` until its first `Started`.
    let mut next: Option<usize> = None;
    for (item, observed) in log.iter().enumerate() {
        match observed {
            Observed::Started { from } => {
                next = Some(reference.partition_point(|c| c.revision < *from));
            }
            Observed::Events { header, events } => {
                let Some(at) = next.as_mut() else {
                    return Err(WatchViolation::NotStarted { watcher, item });
                };
                for received in events {
                    let expected = reference.get(*at);
                    if expected != Some(received) {
                        return Err(WatchViolation::WrongEvent {
                            watcher,
                            item,
                            expected: expected.cloned().map(Box::new),
                            received: Box::new(received.clone()),
                        });
                    }
                    *at += 1;
                }
                if let Some(last) = events.last() {
                    if *header < last.revision {
                        return Err(WatchViolation::HeaderBehind {
                            watcher,
                            item,
                            header: *header,
                            revision: last.revision,
                        });
                    }
                    if reference
                        .get(*at)
                        .is_some_and(|c| c.revision == last.revision)
                    {
                        return Err(WatchViolation::SplitRevision {
                            watcher,
                            item,
                            revision: last.revision,
                        });
                    }
                }
            }
            Observed::Progress { revision } => {
                let Some(at) = next else {
                    return Err(WatchViolation::NotStarted { watcher, item });
                };
                if let Some(pending) = reference.get(at).filter(|c| c.revision <= *revision) {
                    return Err(WatchViolation::ProgressAhead {
                        watcher,
                        item,
                        progress: *revision,
                        pending: pending.revision,
                    });
                }
            }
            Observed::Canceled { compact_revision } => {
                return Err(WatchViolation::Canceled {
                    watcher,
                    item,
                    compact_revision: *compact_revision,
                });
            }
        }
    }
    Ok(())
}

/// The watcher received every event up to revision `end` (the last write
/// made for it to reach): a watcher that silently stopped receiving passes
/// `check_watcher`, not this.
pub fn check_caught_up(end: i64, watcher: usize, log: &[Observed]) -> Result<(), WatchViolation> {
    let last = log.iter().rev().find_map(|o| match o {
        Observed::Events { events, .. } => events.last().map(|c| c.revision),
        _ => None,
    });
    if last.is_some_and(|l| l >= end) {
        Ok(())
    } else {
        Err(WatchViolation::Stalled { watcher, last, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(revision: i64, key: &str, value: &str) -> Change {
        Change {
            revision,
            key: key.into(),
            value: Some(value.into()),
        }
    }

    fn reference() -> Vec<Change> {
        vec![
            put(2, "a", "1"),
            put(3, "b", "1"),
            // one transaction: two keys at revision 4
            put(4, "a", "2"),
            Change {
                revision: 4,
                key: "b".into(),
                value: None,
            },
            put(5, "a", "3"),
        ]
    }

    fn events(header: i64, events: &[Change]) -> Observed {
        Observed::Events {
            header,
            events: events.to_vec(),
        }
    }

    #[test]
    fn a_watcher_that_saw_everything_in_order_passes() {
        let r = reference();
        let log = vec![
            Observed::Started { from: 1 },
            events(3, &r[0..2]),
            Observed::Progress { revision: 3 },
            events(5, &r[2..4]),
            events(5, &r[4..5]),
            Observed::Progress { revision: 9 },
        ];
        assert_eq!(check_watcher(&r, 0, &log), Ok(()));
    }

    #[test]
    fn a_resumed_watcher_passes_and_a_gap_is_caught() {
        let r = reference();
        let resumed = vec![
            Observed::Started { from: 1 },
            events(2, &r[0..1]),
            Observed::Started { from: 3 },
            events(5, &r[1..5]),
        ];
        assert_eq!(check_watcher(&r, 0, &resumed), Ok(()));
        let gap = vec![
            Observed::Started { from: 1 },
            events(2, &r[0..1]),
            events(5, &r[2..5]),
        ];
        assert!(matches!(
            check_watcher(&r, 1, &gap),
            Err(WatchViolation::WrongEvent { watcher: 1, .. })
        ));
    }

    #[test]
    fn duplicates_reordering_and_changed_values_are_caught() {
        let r = reference();
        let duplicate = vec![
            Observed::Started { from: 1 },
            events(2, &r[0..1]),
            events(2, &r[0..1]),
        ];
        assert!(check_watcher(&r, 0, &duplicate).is_err());
        let reordered = vec![
            Observed::Started { from: 1 },
            events(3, &[r[1].clone(), r[0].clone()]),
        ];
        assert!(check_watcher(&r, 0, &reordered).is_err());
        let changed = vec![
            Observed::Started { from: 1 },
            events(2, &[put(2, "a", "x")]),
        ];
        assert!(check_watcher(&r, 0, &changed).is_err());
    }

    #[test]
    fn a_split_revision_is_caught() {
        let r = reference();
        let log = vec![
            Observed::Started { from: 4 },
            events(4, &r[2..3]),
            events(4, &r[3..4]),
        ];
        assert_eq!(
            check_watcher(&r, 0, &log),
            Err(WatchViolation::SplitRevision {
                watcher: 0,
                item: 1,
                revision: 4
            })
        );
    }

    #[test]
    fn progress_ahead_of_undelivered_events_is_caught() {
        let r = reference();
        let log = vec![
            Observed::Started { from: 1 },
            events(2, &r[0..1]),
            Observed::Progress { revision: 3 },
        ];
        assert_eq!(
            check_watcher(&r, 0, &log),
            Err(WatchViolation::ProgressAhead {
                watcher: 0,
                item: 2,
                progress: 3,
                pending: 3
            })
        );
    }

    #[test]
    fn header_behind_and_cancellation_are_caught() {
        let r = reference();
        let behind = vec![Observed::Started { from: 1 }, events(1, &r[0..1])];
        assert!(matches!(
            check_watcher(&r, 0, &behind),
            Err(WatchViolation::HeaderBehind { .. })
        ));
        let canceled = vec![
            Observed::Started { from: 1 },
            Observed::Canceled {
                compact_revision: 0,
            },
        ];
        assert!(matches!(
            check_watcher(&r, 0, &canceled),
            Err(WatchViolation::Canceled { .. })
        ));
    }

    #[test]
    fn a_watcher_that_stopped_receiving_is_caught() {
        let r = reference();
        let full = vec![Observed::Started { from: 1 }, events(5, &r)];
        assert_eq!(check_caught_up(5, 0, &full), Ok(()));
        let stalled = vec![Observed::Started { from: 1 }, events(3, &r[0..2])];
        assert_eq!(check_watcher(&r, 0, &stalled), Ok(()));
        assert_eq!(
            check_caught_up(5, 0, &stalled),
            Err(WatchViolation::Stalled {
                watcher: 0,
                last: Some(3),
                end: 5
            })
        );
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let r = reference();
        assert_eq!(
            check_acknowledged(&r, &[r[3].clone(), r[0].clone()]),
            Ok(())
        );
        assert_eq!(
            check_acknowledged(&r, &[put(4, "c", "1")]),
            Err(WatchViolation::LostWrite {
                revision: 4,
                key: "c".into()
            })
        );
        assert_eq!(
            check_acknowledged(&r, &[put(6, "a", "4")]),
            Err(WatchViolation::LostWrite {
                revision: 6,
                key: "a".into()
            })
        );
    }
}
