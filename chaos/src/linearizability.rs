//! A linearizability checker for single-register histories (put, get,
//! compare-and-set), after Wing & Gong with Lowe's memoization: search for
//! an order of the operations that respects real time (an operation that
//! returned before another was called comes first) and in which every
//! operation's result is what a single register would have answered.
//!
//! Operations whose outcome is unknown (the client timed out or lost its
//! connection) never returned: they may take effect at any point after
//! they were called, or never.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// What a client asked and, when it knows, what it was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Set the register to a value.
    Put(u64),
    /// Read the register: the value seen (`None`: the key did not exist).
    Get(Option<u64>),
    /// Set to `new` if the register holds `expect`; whether it did, when
    /// known, and on failure the value `found` instead (`None`: no key), so
    /// that a failure is an observation like a read.
    Cas {
        expect: u64,
        new: u64,
        succeeded: Option<bool>,
        found: Option<u64>,
    },
}

/// One operation of a history, with its call and return times (any
/// monotonic clock). `returned: None` means the outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub op: Op,
    pub called: u64,
    pub returned: Option<u64>,
}

/// Why a history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The longest prefix of a valid order the search found.
    pub longest_prefix: Vec<Event>,
    /// Operations that could not be placed after it.
    pub stuck_at: Vec<Event>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "history is not linearizable")?;
        writeln!(
            f,
            "longest linearizable prefix ({} ops):",
            self.longest_prefix.len()
        )?;
        for e in self.longest_prefix.iter().rev().take(10).rev() {
            writeln!(f, "  {e:?}")?;
        }
        writeln!(f, "none of these can come next:")?;
        for e in &self.stuck_at {
            writeln!(f, "  {e:?}")?;
        }
        Ok(())
    }
}

/// The register's answer to `op` in `state`: the next state, or `None`
/// when the recorded result is impossible there.
fn step(state: Option<u64>, op: &Op) -> Option<Option<u64>> {
    match *op {
        Op::Put(v) => Some(Some(v)),
        Op::Get(seen) => (seen == state).then_some(state),
        Op::Cas {
            expect,
            new,
            succeeded,
            found,
        } => {
            let matches = state == Some(expect);
            match succeeded {
                Some(true) if matches => Some(Some(new)),
                Some(false) if !matches && found == state => Some(state),
                Some(_) => None,
                None => Some(if matches { Some(new) } else { state }),
            }
        }
    }
}

/// Whether an operation with an unknown outcome can matter: only if some
/// operation observed the value it would have written. One nobody observed
/// may as well never have happened, which is always a valid outcome, so it
/// is dropped (this keeps the search from trying it at every position).
/// Failed compare-and-sets report the value they found, so they observe too.
fn observed(op: &Op, seen: &HashSet<u64>) -> bool {
    match op {
        Op::Put(v) | Op::Cas { new: v, .. } => seen.contains(v),
        Op::Get(_) => false,
    }
}

/// Checks `history`, which starts from an empty register (missing key).
/// Written values should be unique, as the pruning above relies on it.
pub fn check(history: &[Event]) -> Result<(), Violation> {
    let seen: HashSet<u64> = history
        .iter()
        .filter_map(|e| match e.op {
            Op::Get(Some(v)) => Some(v),
            Op::Cas {
                succeeded: Some(false),
                found,
                ..
            } => found,
            Op::Cas { expect, .. } => Some(expect),
            _ => None,
        })
        .collect();
    let mut events: Vec<Event> = history
        .iter()
        .copied()
        .filter(|e| e.returned.is_some() || observed(&e.op, &seen))
        .collect();
    events.sort_by_key(|e| e.called);
    let mut search = Search::new(&events);
    if search.run() {
        return Ok(());
    }
    let mut placed = Bits::new(events.len());
    for &i in &search.best {
        placed.set(i, true);
    }
    let stuck_at = search
        .candidates(&placed)
        .into_iter()
        .map(|i| events[i])
        .collect();
    Err(Violation {
        longest_prefix: search.best.iter().map(|&i| events[i]).collect(),
        stuck_at,
    })
}

/// A fixed-size set of operation indexes.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize, on: bool) {
        if on {
            self.0[i / 64] |= 1 << (i % 64);
        } else {
            self.0[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The lowest index not in the set (`n` rounded up when all are).
    fn first_unset(&self) -> usize {
        self.0
            .iter()
            .position(|&w| w != u64::MAX)
            .map_or(self.0.len() * 64, |w| {
                w * 64 + self.0[w].trailing_ones() as usize
            })
    }
}

/// SplitMix64: the per-operation keys of the placed set's hash.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One level of the depth-first search: the state before it, the
/// operations that may come next, and which one is being tried.
struct Frame {
    state: Option<u64>,
    candidates: Vec<usize>,
    next: usize,
    /// The operation this frame placed (to undo when it is abandoned).
    placed: Option<usize>,
}

struct Search<'a> {
    events: &'a [Event],
    placed: Bits,
    /// A 128-bit Zobrist hash of `placed` (the XOR of its operations'
    /// keys), kept up to date in O(1): Lowe's cache holds it instead of
    /// the set, so a 30-minute history (10^5 operations) fits in memory
    /// and each step costs no copy of the set. Two sets sharing a hash
    /// would wrongly prune a branch; at 2^-128 per pair, never in practice.
    hash: u128,
    keys: Vec<u128>,
    /// Returned operations still to place.
    remaining: usize,
    /// (placed-set hash, register state) pairs already explored.
    seen: HashSet<(u128, Option<u64>)>,
    /// The longest order found, and how much of it the current order
    /// still shares (extended in O(1) while the search does not back up).
    best: Vec<usize>,
    shared_with_best: usize,
}

impl<'a> Search<'a> {
    fn new(events: &'a [Event]) -> Self {
        let keys = (0..events.len() as u64)
            .map(|i| (u128::from(splitmix64(2 * i)) << 64) | u128::from(splitmix64(2 * i + 1)))
            .collect();
        Search {
            events,
            placed: Bits::new(events.len()),
            hash: 0,
            keys,
            remaining: events.iter().filter(|e| e.returned.is_some()).count(),
            seen: HashSet::new(),
            best: Vec::new(),
            shared_with_best: 0,
        }
    }

    fn place(&mut self, i: usize, on: bool) {
        self.placed.set(i, on);
        self.hash ^= self.keys[i];
    }

    /// Operations that may be linearized next: not placed yet and called
    /// before every unplaced operation returned. Events are sorted by call
    /// time, and every event before the first unplaced one is placed, so
    /// the scan starts there and stops at the first call after the
    /// earliest return seen (later events return later still).
    fn candidates(&self, placed: &Bits) -> Vec<usize> {
        let first = placed.first_unset().min(self.events.len());
        let mut horizon = u64::MAX;
        let mut out = Vec::new();
        for i in first..self.events.len() {
            let e = &self.events[i];
            if e.called > horizon {
                break;
            }
            if placed.get(i) {
                continue;
            }
            if let Some(r) = e.returned {
                horizon = horizon.min(r);
            }
            out.push(i);
        }
        // An operation called after the earliest return among the
        // unplaced ones (found later in the scan) must wait.
        out.retain(|&i| self.events[i].called <= horizon);
        out
    }

    /// Iterative depth-first search (histories run to thousands of
    /// operations, too deep for recursion).
    fn run(&mut self) -> bool {
        let mut stack = vec![Frame {
            state: None,
            candidates: self.candidates(&self.placed),
            next: 0,
            placed: None,
        }];
        let mut order: Vec<usize> = Vec::new();
        while let Some(frame) = stack.last_mut() {
            if self.remaining == 0 {
                return true;
            }
            let Some(&i) = frame.candidates.get(frame.next) else {
                // Every choice at this level failed: undo the one that led here.
                let done = stack.pop().and_then(|f| f.placed);
                if let Some(i) = done {
                    self.place(i, false);
                    if self.events[i].returned.is_some() {
                        self.remaining += 1;
                    }
                    order.pop();
                    self.shared_with_best = self.shared_with_best.min(order.len());
                }
                continue;
            };
            frame.next += 1;
            let Some(next_state) = step(frame.state, &self.events[i].op) else {
                continue;
            };
            self.place(i, true);
            if !self.seen.insert((self.hash, next_state)) {
                self.place(i, false);
                continue;
            }
            if self.events[i].returned.is_some() {
                self.remaining -= 1;
            }
            order.push(i);
            if order.len() > self.best.len() {
                if self.shared_with_best == self.best.len() {
                    self.best.push(i);
                } else {
                    self.best = order.clone();
                }
                self.shared_with_best = order.len();
            }
            let candidates = self.candidates(&self.placed);
            stack.push(Frame {
                state: next_state,
                candidates,
                next: 0,
                placed: Some(i),
            });
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Op, called: u64, returned: u64) -> Event {
        Event {
            op,
            called,
            returned: Some(returned),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            ev(Op::Get(None), 0, 1),
            ev(Op::Put(1), 2, 3),
            ev(Op::Get(Some(1)), 4, 5),
            ev(
                Op::Cas {
                    expect: 1,
                    new: 2,
                    succeeded: Some(true),
                    found: None,
                },
                6,
                7,
            ),
            ev(
                Op::Cas {
                    expect: 1,
                    new: 3,
                    succeeded: Some(false),
                    found: Some(2),
                },
                8,
                9,
            ),
            ev(Op::Get(Some(2)), 10, 11),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        // The read overlaps both writes, so it may see either.
        let h = [
            ev(Op::Put(1), 0, 10),
            ev(Op::Put(2), 1, 11),
            ev(Op::Get(Some(1)), 2, 12),
            ev(Op::Get(Some(2)), 20, 21),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_is_caught() {
        let h = [
            ev(Op::Put(1), 0, 10),
            ev(Op::Put(2), 20, 30),
            ev(Op::Get(Some(1)), 40, 50),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.longest_prefix.len(), 2);
        assert!(v.to_string().contains("not linearizable"));
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        let h = [ev(Op::Put(7), 0, 10), ev(Op::Get(None), 20, 30)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn double_successful_cas_is_caught() {
        // Two clients both "win" the same compare-and-set.
        let h = [
            ev(Op::Put(1), 0, 1),
            ev(
                Op::Cas {
                    expect: 1,
                    new: 2,
                    succeeded: Some(true),
                    found: None,
                },
                10,
                20,
            ),
            ev(
                Op::Cas {
                    expect: 1,
                    new: 3,
                    succeeded: Some(true),
                    found: None,
                },
                11,
                21,
            ),
        ];
        assert!(check(&h).is_err());
    }

    /// A long history of overlapping operations, generated from a real
    /// register (each operation takes effect at a point inside its
    /// interval), is accepted.
    #[test]
    fn long_generated_history_is_linearizable() {
        let mut seed = 7u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // (linearization point, call, return, op kind, value)
        let mut planned = Vec::new();
        // As many operations as a key gets in a 30-minute chaos run.
        for i in 0..100_000u64 {
            let point = i * 10 + 5;
            let called = point - rand(40).min(point);
            let returned = point + rand(40);
            planned.push((point, called, returned, rand(3), i + 1));
        }
        let mut state = None;
        let mut history = Vec::new();
        for (_, called, returned, kind, value) in planned {
            let op = match kind {
                0 => {
                    state = Some(value);
                    Op::Put(value)
                }
                1 => Op::Get(state),
                _ => {
                    let expect = state.unwrap_or(0);
                    state = Some(value);
                    Op::Cas {
                        expect,
                        new: value,
                        succeeded: Some(expect != 0),
                        // It fails only on the missing key.
                        found: None,
                    }
                }
            };
            if let Op::Cas {
                succeeded: Some(false),
                ..
            } = op
            {
                state = None;
            }
            history.push(ev(op, called, returned));
        }
        assert_eq!(check(&history), Ok(()));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        let timed_out = |op, called| Event {
            op,
            called,
            returned: None,
        };
        // Took effect:
        let h = [timed_out(Op::Put(5), 0), ev(Op::Get(Some(5)), 10, 11)];
        assert_eq!(check(&h), Ok(()));
        // Never took effect:
        let h = [timed_out(Op::Put(5), 0), ev(Op::Get(None), 10, 11)];
        assert_eq!(check(&h), Ok(()));
        // But it cannot take effect before it was called.
        let h = [ev(Op::Get(Some(5)), 0, 1), timed_out(Op::Put(5), 10)];
        assert!(check(&h).is_err());
    }

    #[test]
    fn a_failed_cas_observes_an_unknown_write() {
        // Nobody read 9, but the failed CAS found it: the timed-out put of 9
        // landed before it (a history the chaos test produced).
        let expect_1 = |called| {
            ev(
                Op::Cas {
                    expect: 1,
                    new: 2,
                    succeeded: Some(false),
                    found: Some(9),
                },
                called,
                called + 1,
            )
        };
        let put_9_timed_out = Event {
            op: Op::Put(9),
            called: 5,
            returned: None,
        };
        let h = [
            ev(Op::Put(1), 0, 1),
            ev(Op::Get(Some(1)), 2, 3),
            put_9_timed_out,
            expect_1(10),
        ];
        assert_eq!(check(&h), Ok(()));
        // Without the put of 9, finding 9 is impossible.
        let h = [
            ev(Op::Put(1), 0, 1),
            ev(Op::Get(Some(1)), 2, 3),
            expect_1(10),
        ];
        assert!(check(&h).is_err());
    }
}
