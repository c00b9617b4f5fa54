//! Nemeses: faults chosen from a seeded generator, applied to a control
//! plane and healed. The choices (which fault, which kind of partition,
//! whether to aim at the leader, how long) come from the seed alone, so a
//! seed replays the same schedule; which member is leader at the time is
//! the cluster's.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::netns::Network;
use crate::process::{ProcessError, Processes};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nemesis {
    /// Network faults: an isolated leader, a minority cut off, a bridge
    /// (two halves that only one member joins), a one-way drop, a link
    /// down.
    Partition,
    /// SIGSTOP of a member (the leader half the time), SIGCONT at heal.
    Pause,
    /// SIGKILL of a member (the leader half the time), restart at heal.
    Kill,
}

impl std::str::FromStr for Nemesis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "partition" => Ok(Nemesis::Partition),
            "pause" => Ok(Nemesis::Pause),
            "kill" => Ok(Nemesis::Kill),
            other => Err(format!(
                "unknown nemesis {other:?} (known: partition, pause, kill)"
            )),
        }
    }
}

/// One concrete fault, with the member indexes it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Members in different groups cannot talk to each other.
    Partition {
        groups: Vec<Vec<usize>>,
    },
    /// `left` and `right` cannot talk; `bridge` talks to both.
    Bridge {
        left: Vec<usize>,
        right: Vec<usize>,
        bridge: usize,
    },
    /// `to` drops everything from `from`.
    OneWay {
        from: usize,
        to: usize,
    },
    LinkDown {
        member: usize,
    },
    Pause {
        member: usize,
    },
    Kill {
        member: usize,
    },
}

impl Fault {
    pub fn nemesis(&self) -> Nemesis {
        match self {
            Fault::Partition { .. }
            | Fault::Bridge { .. }
            | Fault::OneWay { .. }
            | Fault::LinkDown { .. } => Nemesis::Partition,
            Fault::Pause { .. } => Nemesis::Pause,
            Fault::Kill { .. } => Nemesis::Kill,
        }
    }
}

/// The seeded generator of faults and of their timing.
pub struct Schedule {
    rng: StdRng,
    nemeses: Vec<Nemesis>,
}

impl Schedule {
    pub fn new(seed: u64, nemeses: &[Nemesis]) -> Schedule {
        Schedule {
            rng: StdRng::seed_from_u64(seed),
            nemeses: nemeses.to_vec(),
        }
    }

    /// How long to wait before the next fault.
    pub fn quiet(&mut self) -> Duration {
        Duration::from_millis(self.rng.gen_range(1_000..3_000))
    }

    /// How long the next fault lasts.
    pub fn hold(&mut self) -> Duration {
        Duration::from_millis(self.rng.gen_range(1_000..5_000))
    }

    /// The next fault for a cluster of `members` whose leader (if known)
    /// is `leader`. `None` when no nemesis is enabled.
    pub fn next(&mut self, members: usize, leader: Option<usize>) -> Option<Fault> {
        let nemesis = *self
            .nemeses
            .get(self.rng.gen_range(0..self.nemeses.len().max(1)))?;
        let aim_at_leader = self.rng.gen_bool(0.5);
        let random = self.rng.gen_range(0..members);
        let target = if aim_at_leader {
            leader.unwrap_or(random)
        } else {
            random
        };
        let mut order: Vec<usize> = (0..members).collect();
        // Fisher-Yates with our own generator, so the seed decides it.
        for i in (1..members).rev() {
            order.swap(i, self.rng.gen_range(0..=i));
        }
        let others: Vec<usize> = (0..members).filter(|&m| m != target).collect();
        if nemesis == Nemesis::Partition && members < 3 {
            // Nothing to split: cut the one server off from everyone.
            return Some(Fault::LinkDown { member: target });
        }
        Some(match nemesis {
            Nemesis::Pause => Fault::Pause { member: target },
            Nemesis::Kill => Fault::Kill { member: target },
            Nemesis::Partition => match self.rng.gen_range(0..5) {
                // The target (often the leader) alone.
                0 => Fault::Partition {
                    groups: vec![vec![target], others],
                },
                // A random minority against the majority.
                1 => {
                    let minority = (members - 1) / 2;
                    Fault::Partition {
                        groups: vec![order[..minority].to_vec(), order[minority..].to_vec()],
                    }
                }
                2 => {
                    let half = (members - 1) / 2;
                    Fault::Bridge {
                        bridge: order[0],
                        left: order[1..1 + half].to_vec(),
                        right: order[1 + half..].to_vec(),
                    }
                }
                3 => Fault::OneWay {
                    from: others[self.rng.gen_range(0..others.len())],
                    to: target,
                },
                _ => Fault::LinkDown { member: target },
            },
        })
    }
}

/// Applies `fault` to `targets` (the servers its indexes name), on `net`.
/// `world` are hosts outside the targets that join the largest group of a
/// partition (storage nodes cut off from the client and the control plane
/// too); with none, hosts outside the targets talk to every group.
pub fn apply(
    net: &Network,
    targets: &mut Processes,
    world: &[usize],
    fault: &Fault,
) -> Result<(), ProcessError> {
    let host = |i: usize| targets.procs[i].host;
    let hosts = |list: &[usize]| list.iter().map(|&i| host(i)).collect::<Vec<_>>();
    match fault {
        Fault::Partition { groups } => {
            let mut groups: Vec<Vec<usize>> = groups.iter().map(|g| hosts(g)).collect();
            if let Some(largest) = groups.iter_mut().max_by_key(|g| g.len()) {
                largest.extend_from_slice(world);
            }
            net.partition(&groups)?;
        }
        Fault::Bridge { left, right, .. } => net.cut(&hosts(left), &hosts(right))?,
        Fault::OneWay { from, to } => net.drop_one_way(host(*from), host(*to))?,
        Fault::LinkDown { member } => net.link(host(*member), false)?,
        Fault::Pause { member } => targets.pause(*member),
        Fault::Kill { member } => targets.kill(*member),
    }
    Ok(())
}

/// Ends `fault`.
pub fn heal(net: &Network, targets: &mut Processes, fault: &Fault) -> Result<(), ProcessError> {
    match fault {
        Fault::Pause { member } => targets.resume(*member),
        Fault::Kill { member } => targets.spawn(net, *member)?,
        _ => net.heal()?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let all = [Nemesis::Partition, Nemesis::Pause, Nemesis::Kill];
        let run = |seed| {
            let mut s = Schedule::new(seed, &all);
            (0..50)
                .map(|i| (s.quiet(), s.next(3, Some(i % 3)), s.hold()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn faults_name_valid_members_and_only_enabled_nemeses() {
        for members in [3, 5] {
            let mut s = Schedule::new(1, &[Nemesis::Partition]);
            for _ in 0..200 {
                let fault = s.next(members, Some(0)).unwrap();
                assert_eq!(fault.nemesis(), Nemesis::Partition);
                match fault {
                    Fault::Partition { groups } => {
                        let mut all: Vec<usize> = groups.concat();
                        all.sort();
                        assert_eq!(all, (0..members).collect::<Vec<_>>());
                        assert!(groups.iter().all(|g| !g.is_empty()));
                    }
                    Fault::Bridge {
                        left,
                        right,
                        bridge,
                    } => {
                        assert!(!left.is_empty() && !right.is_empty());
                        assert!(!left.contains(&bridge) && !right.contains(&bridge));
                        assert_eq!(left.len() + right.len() + 1, members);
                    }
                    Fault::OneWay { from, to } => assert!(from != to && from < members),
                    Fault::LinkDown { member } => assert!(member < members),
                    other => panic!("not a partition: {other:?}"),
                }
            }
        }
        assert_eq!(Schedule::new(1, &[]).next(3, None), None);
        assert_eq!(
            Schedule::new(1, &[Nemesis::Partition]).next(1, None),
            Some(Fault::LinkDown { member: 0 })
        );
    }
}
