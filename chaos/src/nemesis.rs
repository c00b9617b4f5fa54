//! Nemeses: faults chosen from a seeded generator, applied to a control
//! plane and healed. The choices (which fault, which kind of partition,
//! whether to aim at the leader, how long) come from the seed alone, so a
//! seed replays the same schedule; which member is leader at the time is
//! the cluster's.

use std::os::unix::fs::FileExt;
use std::path::Path;
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
    /// down, a slow link.
    Partition,
    /// SIGSTOP of a member (the leader half the time), SIGCONT at heal.
    Pause,
    /// SIGKILL of a member (the leader half the time), restart at heal.
    Kill,
    /// A failing disk under a server: restarted with a disk failpoint
    /// (see [`DiskFault`]); at heal killed and restarted without it.
    Disk,
}

impl std::str::FromStr for Nemesis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "partition" => Ok(Nemesis::Partition),
            "pause" => Ok(Nemesis::Pause),
            "kill" => Ok(Nemesis::Kill),
            "disk" => Ok(Nemesis::Disk),
            other => Err(format!(
                "unknown nemesis {other:?} (known: partition, pause, kill, disk)"
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
    /// `member`'s link carries at most `bytes_per_second` each way.
    SlowLink {
        member: usize,
        bytes_per_second: u64,
    },
    Pause {
        member: usize,
    },
    Kill {
        member: usize,
    },
    Disk {
        member: usize,
        fault: DiskFault,
    },
}

/// What a failing disk does, as the failpoint set in the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFault {
    /// The server's `after`+1-th durable write (Raft log or shard log)
    /// fails its fdatasync and loses its data; the server must refuse
    /// every later write (fsyncgate) until restarted.
    SyncFails { after: u64 },
    /// Storage node: every shard read fails with EIO (clients rebuild the
    /// rows from other shards).
    ReadEio,
    /// Storage node: every shard log write fails with ENOSPC.
    NoSpace,
    /// Storage node: a power loss at heal: what was written but not yet
    /// synced is zeroed before the restart.
    UnsyncedWritesLost,
    /// Member: the state machine's (RocksDB's) unsynced writes are lost at
    /// heal's SIGKILL; the Raft log must bring them back.
    StateMachineWritesLost,
}

impl DiskFault {
    /// The `TESSERA_FAILPOINTS` value that makes it.
    pub fn failpoints(&self) -> String {
        match self {
            DiskFault::SyncFails { after } => format!("wal-sync-fails-once-after={after}"),
            DiskFault::ReadEio => "shard-read-eio".into(),
            DiskFault::NoSpace => "shard-log-enospc".into(),
            DiskFault::UnsyncedWritesLost => "shard-log-unsynced-writes-lost".into(),
            DiskFault::StateMachineWritesLost => "state-machine-writes-unsynced-lost".into(),
        }
    }
}

impl Fault {
    pub fn nemesis(&self) -> Nemesis {
        match self {
            Fault::Partition { .. }
            | Fault::Bridge { .. }
            | Fault::OneWay { .. }
            | Fault::LinkDown { .. }
            | Fault::SlowLink { .. } => Nemesis::Partition,
            Fault::Pause { .. } => Nemesis::Pause,
            Fault::Kill { .. } => Nemesis::Kill,
            Fault::Disk { .. } => Nemesis::Disk,
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

    /// Whether the next fault hits the storage nodes (two times in three)
    /// rather than the control plane, when a run has both.
    pub fn hits_stores(&mut self) -> bool {
        self.rng.gen_range(0..3) < 2
    }

    /// The next fault for `members` servers (storage nodes when `stores`)
    /// whose leader (if known) is `leader`. `None` when no nemesis is
    /// enabled.
    pub fn next(&mut self, members: usize, leader: Option<usize>, stores: bool) -> Option<Fault> {
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
            Nemesis::Disk => Fault::Disk {
                member: target,
                fault: match (stores, self.rng.gen_range(0..4)) {
                    (true, 0) => DiskFault::ReadEio,
                    (true, 1) => DiskFault::NoSpace,
                    (true, 2) => DiskFault::UnsyncedWritesLost,
                    (false, 0 | 1) => DiskFault::StateMachineWritesLost,
                    _ => DiskFault::SyncFails {
                        after: self.rng.gen_range(5..200),
                    },
                },
            },
            Nemesis::Partition => match self.rng.gen_range(0..6) {
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
                4 => Fault::SlowLink {
                    member: target,
                    // 64 KiB/s to 1 MiB/s.
                    bytes_per_second: 64 << (10 + self.rng.gen_range(0..5)),
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
        Fault::SlowLink {
            member,
            bytes_per_second,
        } => net.slow(host(*member), *bytes_per_second)?,
        Fault::Pause { member } => targets.pause(*member),
        Fault::Kill { member } => targets.kill(*member),
        Fault::Disk { member, fault } => {
            targets.kill(*member);
            targets.spawn_with_failpoints(net, *member, Some(&fault.failpoints()))?;
        }
    }
    Ok(())
}

/// Ends `fault`.
pub fn heal(net: &Network, targets: &mut Processes, fault: &Fault) -> Result<(), ProcessError> {
    match fault {
        Fault::Pause { member } => targets.resume(*member),
        Fault::Kill { member } => targets.spawn(net, *member)?,
        Fault::Disk { member, fault } => {
            targets.kill(*member);
            if *fault == DiskFault::UnsyncedWritesLost {
                let dir = targets.procs[*member].data_dir.join("shards");
                lose_unsynced_writes(&dir)?;
            }
            targets.spawn(net, *member)?;
        }
        _ => net.heal()?,
    }
    Ok(())
}

/// Where `shard-log-unsynced-writes-lost` notes the synced end of a storage
/// node's current log file, in its shard directory (the store's
/// `SYNCED_END_FILE`).
const SYNCED_END_FILE: &str = "synced-end.failpoint";

/// The power loss of [`DiskFault::UnsyncedWritesLost`], on a killed
/// node's shard directory: of what lies past the synced end its failpoint
/// noted, the whole 4 KiB pages of the first half reached the disk and the
/// rest is zeroed (a torn write, when pages of one record survive). Returns
/// the bytes lost.
pub fn lose_unsynced_writes(shard_dir: &Path) -> Result<u64, ProcessError> {
    let io = |what: String| move |source| ProcessError::Io { what, source };
    let marker = shard_dir.join(SYNCED_END_FILE);
    let noted = match std::fs::read_to_string(&marker) {
        Ok(noted) => noted,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(format!("reading {}", marker.display()))(e)),
    };
    let bad = || ProcessError::Io {
        what: format!("reading {}", marker.display()),
        source: std::io::Error::other(format!("not `<path> <offset>`: {noted:?}")),
    };
    let (path, end) = noted.trim().rsplit_once(' ').ok_or_else(bad)?;
    let end: u64 = end.parse().map_err(|_| bad())?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(format!("opening {path}")))?;
    let len = file
        .metadata()
        .map_err(io(format!("reading the size of {path}")))?
        .len();
    const PAGE: u64 = 4096;
    let unsynced = len.saturating_sub(end);
    let kept_to = ((end + unsynced / 2) / PAGE * PAGE).max(end);
    let lost = len.saturating_sub(kept_to);
    if lost > 0 {
        file.write_all_at(&vec![0u8; lost as usize], kept_to)
            .map_err(io(format!("zeroing the unsynced tail of {path}")))?;
        eprintln!(
            "power loss: of {unsynced} unsynced bytes at the end of {path}, zeroed the last {lost}"
        );
    }
    std::fs::remove_file(&marker).map_err(io(format!("removing {}", marker.display())))?;
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let all = [
            Nemesis::Partition,
            Nemesis::Pause,
            Nemesis::Kill,
            Nemesis::Disk,
        ];
        let run = |seed| {
            let mut s = Schedule::new(seed, &all);
            (0..50)
                .map(|i| {
                    let stores = s.hits_stores();
                    (s.quiet(), s.next(3, Some(i % 3), stores), s.hold())
                })
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
                let fault = s.next(members, Some(0), false).unwrap();
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
                    Fault::SlowLink {
                        member,
                        bytes_per_second,
                    } => assert!(member < members && bytes_per_second >= 64 << 10),
                    other => panic!("not a partition: {other:?}"),
                }
            }
        }
        assert_eq!(Schedule::new(1, &[]).next(3, None, false), None);
        assert_eq!(
            Schedule::new(1, &[Nemesis::Partition]).next(1, None, false),
            Some(Fault::LinkDown { member: 0 })
        );
    }

    #[test]
    fn disk_faults_fit_the_servers_they_hit() {
        let mut s = Schedule::new(3, &[Nemesis::Disk]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..400 {
            let stores = i % 2 == 0;
            let Some(Fault::Disk { member, fault }) = s.next(6, None, stores) else {
                panic!("not a disk fault");
            };
            assert!(member < 6);
            if stores {
                assert_ne!(fault, DiskFault::StateMachineWritesLost);
            } else {
                assert!(
                    matches!(
                        fault,
                        DiskFault::StateMachineWritesLost | DiskFault::SyncFails { .. }
                    ),
                    "{fault:?} on a member"
                );
            }
            seen.insert(std::mem::discriminant(&fault));
        }
        assert_eq!(seen.len(), 5, "every disk fault comes up");
    }

    #[test]
    fn a_power_loss_zeroes_exactly_what_was_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            lose_unsynced_writes(dir.path()).unwrap(),
            0,
            "no marker, no loss"
        );
        let log = dir.path().join("0000000000000001.log");
        std::fs::write(&log, [7u8; 100]).unwrap();
        let marker = dir.path().join(SYNCED_END_FILE);
        std::fs::write(&marker, format!("{} 60\n", log.display())).unwrap();
        assert_eq!(lose_unsynced_writes(dir.path()).unwrap(), 40);
        let after = std::fs::read(&log).unwrap();
        assert_eq!(after.len(), 100);
        assert!(after[..60].iter().all(|&b| b == 7));
        assert!(after[60..].iter().all(|&b| b == 0));
        assert!(!marker.exists());
        // Three pages and a bit unsynced: the first half's whole pages stay.
        std::fs::write(&log, [7u8; 3 * 4096 + 200]).unwrap();
        std::fs::write(&marker, format!("{} 100\n", log.display())).unwrap();
        assert_eq!(lose_unsynced_writes(dir.path()).unwrap(), 2 * 4096 + 200);
        let after = std::fs::read(&log).unwrap();
        assert!(after[..4096].iter().all(|&b| b == 7));
        assert!(after[4096..].iter().all(|&b| b == 0));
        std::fs::write(&marker, "garbage").unwrap();
        assert!(lose_unsynced_writes(dir.path()).is_err());
    }
}
