//! A checker for list-append histories on single keys: each key holds a
//! list, clients append unique values and read whole lists. A strictly
//! serializable store gives lists that grow along one order:
//! - every list read holds only appended values, each once;
//! - all reads of a key are prefixes of its longest read (one order);
//! - real time: a read that returned before another read was called saw no
//!   more than it; an append acknowledged before a read was called is in
//!   that read; an append acknowledged before another append was called
//!   comes first in the list;
//! - nothing acknowledged is lost: every acknowledged append is in the
//!   final read, taken after the faults stopped.
//!
//! Appends whose outcome is unknown may be in the list or not.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListOp {
    Append(u64),
    /// The list a read returned (`None` when the read failed).
    Read(Option<Vec<u64>>),
}

/// One operation on one key, with call and return times (one monotonic
/// clock); `returned: None` when the outcome is unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEvent {
    pub op: ListOp,
    pub called: u64,
    pub returned: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListViolation {
    #[error("read returned {value} twice")]
    Duplicate { value: u64 },
    #[error("read returned {value}, which no client appended")]
    Phantom { value: u64 },
    #[error("reads disagree on the order: {a:?} and {b:?} are not prefixes of one another")]
    Diverged { a: Vec<u64>, b: Vec<u64> },
    #[error("stale read: a read called at {later_called} saw {later_len} values after one that returned at {earlier_returned} saw {earlier_len}")]
    StaleRead {
        earlier_returned: u64,
        earlier_len: usize,
        later_called: u64,
        later_len: usize,
    },
    #[error(
        "append of {value} acknowledged at {acked} is missing from a read called at {read_called}"
    )]
    MissingAppend {
        value: u64,
        acked: u64,
        read_called: u64,
    },
    #[error("append of {first} was acknowledged before append of {second} was called, but comes after it")]
    Reordered { first: u64, second: u64 },
    #[error("acknowledged append of {value} is not in the final list")]
    Lost { value: u64 },
    #[error("a read that returned at {read_returned} saw {value}, whose append was called later, at {append_called}")]
    ReadFromFuture {
        value: u64,
        read_returned: u64,
        append_called: u64,
    },
}

/// Checks one key's history; `final_read` is the list read after the faults
/// stopped and every member caught up.
pub fn check_list(history: &[ListEvent], final_read: &[u64]) -> Result<(), ListViolation> {
    // Each appended value and when its append was called.
    let appended: HashMap<u64, u64> = history
        .iter()
        .filter_map(|e| match e.op {
            ListOp::Append(v) => Some((v, e.called)),
            ListOp::Read(_) => None,
        })
        .collect();
    // (called, returned, list) of every completed read, the final one last.
    let mut reads: Vec<(u64, u64, &[u64])> = history
        .iter()
        .filter_map(|e| match (&e.op, e.returned) {
            (ListOp::Read(Some(list)), Some(returned)) => Some((e.called, returned, &list[..])),
            _ => None,
        })
        .collect();
    reads.push((u64::MAX, u64::MAX, final_read));

    let mut longest: &[u64] = &[];
    for &(_, returned, list) in &reads {
        let mut seen = HashSet::new();
        for &v in list {
            if !seen.insert(v) {
                return Err(ListViolation::Duplicate { value: v });
            }
            match appended.get(&v) {
                None => return Err(ListViolation::Phantom { value: v }),
                Some(&append_called) if append_called > returned => {
                    return Err(ListViolation::ReadFromFuture {
                        value: v,
                        read_returned: returned,
                        append_called,
                    })
                }
                Some(_) => {}
            }
        }
        let (short, long) = if list.len() <= longest.len() {
            (list, longest)
        } else {
            (longest, list)
        };
        if !long.starts_with(short) {
            return Err(ListViolation::Diverged {
                a: longest.to_vec(),
                b: list.to_vec(),
            });
        }
        longest = long;
    }

    // Stale reads: sorted by return time, each read called after the
    // largest of the reads returned before it must be at least that long.
    let mut by_return = reads.clone();
    by_return.sort_by_key(|r| r.1);
    let mut by_call = reads.clone();
    by_call.sort_by_key(|r| r.0);
    let mut done = 0;
    let mut longest_done: Option<(u64, usize)> = None;
    for &(called, _, list) in &by_call {
        while done < by_return.len() && by_return[done].1 < called {
            let (_, returned, l) = by_return[done];
            if longest_done.is_none_or(|(_, len)| l.len() > len) {
                longest_done = Some((returned, l.len()));
            }
            done += 1;
        }
        if let Some((returned, len)) = longest_done {
            if list.len() < len {
                return Err(ListViolation::StaleRead {
                    earlier_returned: returned,
                    earlier_len: len,
                    later_called: called,
                    later_len: list.len(),
                });
            }
        }
    }

    let acked: Vec<(u64, u64, u64)> = history
        .iter()
        .filter_map(|e| match (&e.op, e.returned) {
            (ListOp::Append(v), Some(returned)) => Some((*v, e.called, returned)),
            _ => None,
        })
        .collect();
    // Acknowledged appends are in every read called after their ack.
    for &(value, _, returned) in &acked {
        for &(called, _, list) in &reads {
            if called > returned && !list.contains(&value) {
                if called == u64::MAX {
                    return Err(ListViolation::Lost { value });
                }
                return Err(ListViolation::MissingAppend {
                    value,
                    acked: returned,
                    read_called: called,
                });
            }
        }
    }
    // Real-time order of appends that are both in the list.
    let position: HashMap<u64, usize> = longest.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut placed: Vec<(u64, u64, u64, usize)> = history
        .iter()
        .filter_map(|e| match e.op {
            ListOp::Append(v) => position
                .get(&v)
                .map(|&p| (v, e.called, e.returned.unwrap_or(u64::MAX), p)),
            ListOp::Read(_) => None,
        })
        .collect();
    // Sorted by position: an append must not have been acknowledged before
    // any earlier-placed append was called.
    placed.sort_by_key(|p| p.3);
    let mut latest_call: Option<(u64, u64)> = None;
    for &(value, called, returned, _) in &placed {
        if let Some((first_called_value, first_called)) = latest_call {
            // `value` comes after `first_called_value` in the list, yet was
            // acknowledged before that one was called.
            if returned < first_called {
                return Err(ListViolation::Reordered {
                    first: value,
                    second: first_called_value,
                });
            }
        }
        if latest_call.is_none_or(|(_, c)| called > c) {
            latest_call = Some((value, called));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(v: u64, called: u64, returned: u64) -> ListEvent {
        ListEvent {
            op: ListOp::Append(v),
            called,
            returned: Some(returned),
        }
    }

    fn read(list: &[u64], called: u64, returned: u64) -> ListEvent {
        ListEvent {
            op: ListOp::Read(Some(list.to_vec())),
            called,
            returned: Some(returned),
        }
    }

    #[test]
    fn a_history_that_grows_in_order_passes() {
        let h = vec![
            append(1, 0, 10),
            read(&[1], 11, 12),
            append(2, 13, 20),
            append(3, 14, 18),
            read(&[1, 3, 2], 21, 22),
            ListEvent {
                op: ListOp::Append(4),
                called: 23,
                returned: None,
            },
        ];
        assert_eq!(check_list(&h, &[1, 3, 2]), Ok(()));
        assert_eq!(check_list(&h, &[1, 3, 2, 4]), Ok(()));
    }

    #[test]
    fn a_stale_read_is_caught() {
        let h = vec![
            append(1, 0, 1),
            append(2, 2, 3),
            read(&[1, 2], 4, 5),
            read(&[1], 6, 7),
        ];
        assert!(matches!(
            check_list(&h, &[1, 2]),
            Err(ListViolation::StaleRead { .. }) | Err(ListViolation::MissingAppend { .. })
        ));
    }

    #[test]
    fn a_lost_append_is_caught() {
        let h = vec![append(1, 0, 1), append(2, 2, 3)];
        assert_eq!(check_list(&h, &[1]), Err(ListViolation::Lost { value: 2 }));
    }

    #[test]
    fn diverging_reads_duplicates_and_phantoms_are_caught() {
        let h = vec![
            append(1, 0, 10),
            append(2, 0, 10),
            read(&[1, 2], 11, 12),
            read(&[2, 1], 11, 12),
        ];
        assert!(matches!(
            check_list(&h, &[1, 2]),
            Err(ListViolation::Diverged { .. })
        ));
        let dup = vec![append(1, 0, 1), read(&[1, 1], 2, 3)];
        assert_eq!(
            check_list(&dup, &[1]),
            Err(ListViolation::Duplicate { value: 1 })
        );
        let phantom = vec![append(1, 0, 1)];
        assert_eq!(
            check_list(&phantom, &[1, 9]),
            Err(ListViolation::Phantom { value: 9 })
        );
    }

    #[test]
    fn a_read_of_a_value_appended_after_it_returned_is_caught() {
        let h = vec![read(&[1], 0, 1), append(1, 5, 6)];
        assert_eq!(
            check_list(&h, &[1]),
            Err(ListViolation::ReadFromFuture {
                value: 1,
                read_returned: 1,
                append_called: 5
            })
        );
    }

    #[test]
    fn appends_placed_against_real_time_are_caught() {
        // 1 was acknowledged before 2 was called, yet 2 comes first.
        let h = vec![append(1, 0, 1), append(2, 5, 6)];
        assert!(matches!(
            check_list(&h, &[2, 1]),
            Err(ListViolation::Reordered { .. })
        ));
    }
}
