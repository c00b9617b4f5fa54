//! Self-healing: one node at a time (the holder of the `repairer` key,
//! under its lease) watches the storage nodes. When a node's lease has
//! been gone longer than `--repair-delay`, or the node is being drained,
//! every segment with a shard on it gets another node for that shard
//! (live, not already in the segment, in the zone with the fewest of the
//! segment's shards), recorded in the volume's record with one
//! compare-and-swap, together with a `rebuilding` mark. The volume's writer
//! picks the new placement up and sends new stripes there; the repairer
//! fills the new node with every older stripe, each shard rebuilt from any
//! k others, throttled to `--repair-bandwidth`. A shard is done when a pass
//! that started after the writer had time to switch finds nothing left to
//! rebuild; the mark is then removed. Everything lives in the control
//! plane, so a repairer that dies is replaced and its successor resumes
//! from the marks. A node that comes back before its shards moved is
//! caught up the same way; one that comes back after finds it is no longer
//! placed for them and discards them (see [`crate::node`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::store::AppendRequest;

use crate::codec::{block_crcs, BLOCK};
use crate::meta::{now_secs, LeaseGuard, Meta, MetaError, NodeStatus, RepairStatus, VolumeRecord};
use crate::placement::score;
use crate::rebuild::{list_segment, rebuild_shard, Peers, Throttle};
use crate::shardlog::stripe_id;

#[derive(Debug, Clone)]
pub struct RepairOptions {
    /// How long a node may be gone before its shards are rebuilt elsewhere.
    pub delay: Duration,
    /// Shard bytes rebuilt a second, at most (0: unlimited).
    pub bandwidth: u64,
    /// How often the repairer looks.
    pub interval: Duration,
}

impl Default for RepairOptions {
    fn default() -> Self {
        RepairOptions {
            delay: Duration::from_secs(300),
            bandwidth: 64 << 20,
            interval: Duration::from_secs(2),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct RepairStats {
    /// Whether this node is the repairer now.
    pub leading: AtomicBool,
    pub bytes: AtomicU64,
    pub shards: AtomicU64,
    pub segments_degraded: AtomicU64,
    pub segments_in_repair: AtomicU64,
    pub bytes_left: AtomicU64,
}

/// A writer learns of a new placement within its control interval (half a
/// second); a pass this long after a move sees every stripe it sealed
/// before switching.
const SETTLE: Duration = Duration::from_secs(3);

/// Runs for as long as the node does: campaigns for the repairer role and,
/// while holding it, repairs.
pub async fn run(meta: Meta, me: String, options: RepairOptions, stats: Arc<RepairStats>) {
    let mut repairer = Repairer {
        throttle: Throttle::new(options.bandwidth),
        meta,
        me,
        options,
        stats,
        peers: Peers::default(),
        dead_since: HashMap::new(),
        returned: HashSet::new(),
        moved_at: HashMap::new(),
        window: VecDeque::new(),
    };
    let mut lease: Option<LeaseGuard> = None;
    loop {
        tokio::time::sleep(repairer.options.interval).await;
        if lease.as_ref().is_none_or(|l| l.expired()) {
            lease = repairer.meta.keep_lease(10).await.ok();
        }
        let Some(id) = lease.as_ref().map(|l| l.id) else {
            continue;
        };
        let leading = repairer
            .meta
            .campaign_repairer(&repairer.me, id)
            .await
            .unwrap_or(false);
        if leading && !repairer.stats.leading.swap(true, Ordering::SeqCst) {
            tracing::info!("this node is the repairer now");
        }
        repairer.stats.leading.store(leading, Ordering::SeqCst);
        if let Err(e) = repairer.round(leading).await {
            tracing::warn!(error = %e, "repair round failed");
        }
    }
}

struct Repairer {
    meta: Meta,
    me: String,
    options: RepairOptions,
    stats: Arc<RepairStats>,
    peers: Peers,
    /// When each node was first seen without its lease.
    dead_since: HashMap<String, Instant>,
    /// Nodes back after being seen gone: caught up once.
    returned: HashSet<String>,
    /// When each `(volume, segment, shard)` was placed on a new node.
    moved_at: HashMap<(u64, u32, u32), Instant>,
    throttle: Throttle,
    /// (when, bytes repaired so far), for the rate.
    window: VecDeque<(Instant, u64)>,
}

/// Stripes one backfill rebuilds at once.
const REBUILDS_IN_FLIGHT: usize = 8;

/// What one backfill pass did.
struct Backfill {
    /// Shard bytes still missing on the node after it.
    left: u64,
    /// Every stripe it found missing was rebuilt.
    clean: bool,
}

impl Repairer {
    async fn round(&mut self, leading: bool) -> Result<(), MetaError> {
        let nodes = self.meta.nodes().await?;
        let now = Instant::now();
        for n in &nodes {
            if !n.alive {
                self.dead_since.entry(n.record.name.clone()).or_insert(now);
            } else if self.dead_since.remove(&n.record.name).is_some() {
                self.returned.insert(n.record.name.clone());
            }
        }
        if !leading {
            self.returned.clear();
            return Ok(());
        }
        self.peers.refresh(&self.meta).await?;
        let evacuate: HashSet<&str> = nodes
            .iter()
            .filter(|n| {
                n.draining
                    || self
                        .dead_since
                        .get(&n.record.name)
                        .is_some_and(|t| t.elapsed() >= self.options.delay)
            })
            .map(|n| n.record.name.as_str())
            .collect();
        let usable: Vec<&NodeStatus> = nodes.iter().filter(|n| n.alive && !n.draining).collect();
        let zones: HashMap<&str, &str> = nodes
            .iter()
            .map(|n| (n.record.name.as_str(), n.record.zone.as_str()))
            .collect();
        let (mut degraded, mut in_repair, mut bytes_left) = (0u64, 0u64, 0u64);
        for (mut record, revision, retired) in self.meta.volume_records().await? {
            if self.move_shards(&mut record, &evacuate, &usable, &zones) {
                match self.meta.update_record(&record, revision, retired).await {
                    Ok(()) => {
                        for &(s, i) in &record.rebuilding {
                            self.moved_at.entry((record.id, s, i)).or_insert(now);
                        }
                    }
                    Err(MetaError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
                // The next round fills them, with the record's new revision.
                in_repair += record.rebuilding.len() as u64;
                continue;
            }
            let mut finished = Vec::new();
            for (s, i) in record.rebuilding.clone() {
                let started = Instant::now();
                let done = self.backfill(&record, s as usize, i as usize).await;
                bytes_left += done.left;
                let settled = self
                    .moved_at
                    .get(&(record.id, s, i))
                    .is_none_or(|t| started.duration_since(*t) >= SETTLE);
                if done.clean && settled {
                    finished.push((s, i));
                }
            }
            // Nodes back in time: their segments catch up on what they missed.
            for s in 0..record.segments.len() {
                for (i, name) in record.placement(s).into_iter().enumerate() {
                    let rebuilding = record.rebuilding.contains(&(s as u32, i as u32));
                    if self.returned.contains(name) && !rebuilding {
                        self.backfill(&record, s, i).await;
                    }
                }
            }
            if !finished.is_empty() {
                record.rebuilding.retain(|r| !finished.contains(r));
                for &(s, i) in &finished {
                    self.moved_at.remove(&(record.id, s, i));
                    tracing::info!(volume = %record.name, segment = s, shard = i, "shard rebuilt on its new node");
                }
                if let Err(e) = self.meta.update_record(&record, revision, retired).await {
                    tracing::debug!(error = %e, "cannot record finished repairs now");
                }
            }
            for s in 0..record.segments.len() {
                if record.rebuilding.iter().any(|&(rs, _)| rs as usize == s) {
                    in_repair += 1;
                } else if record
                    .placement(s)
                    .iter()
                    .any(|name| usable.iter().all(|n| n.record.name != *name))
                {
                    degraded += 1;
                }
            }
        }
        self.returned.clear();
        let repaired = self.stats.bytes.load(Ordering::Relaxed);
        self.window.push_back((now, repaired));
        while self.window.len() > 2 && self.window[0].0.elapsed() > Duration::from_secs(10) {
            self.window.pop_front();
        }
        let rate = match self.window.front() {
            Some(&(at, bytes)) if now > at => {
                ((repaired - bytes) as f64 / now.duration_since(at).as_secs_f64()) as u64
            }
            _ => 0,
        };
        self.stats
            .segments_degraded
            .store(degraded, Ordering::Relaxed);
        self.stats
            .segments_in_repair
            .store(in_repair, Ordering::Relaxed);
        self.stats.bytes_left.store(bytes_left, Ordering::Relaxed);
        let status = RepairStatus {
            repairer: self.me.clone(),
            updated: now_secs(),
            bytes_left,
            rate,
            bytes_repaired: repaired,
        };
        self.meta.put_repair_status(&status).await
    }

    /// Places the shards of `record` held by nodes to evacuate on other
    /// nodes; whether anything moved.
    fn move_shards(
        &self,
        record: &mut VolumeRecord,
        evacuate: &HashSet<&str>,
        usable: &[&NodeStatus],
        zones: &HashMap<&str, &str>,
    ) -> bool {
        let mut moved = false;
        for s in 0..record.segments.len() {
            for i in 0..record.segments[s].len() {
                let current = record.nodes[record.segments[s][i] as usize].clone();
                if !evacuate.contains(current.as_str()) {
                    continue;
                }
                let placed: Vec<&str> = record.placement(s);
                let mut taken: HashMap<&str, usize> = HashMap::new();
                for (j, name) in placed.iter().enumerate() {
                    if j != i {
                        *taken
                            .entry(zones.get(name).copied().unwrap_or(""))
                            .or_default() += 1;
                    }
                }
                let choice = usable
                    .iter()
                    .filter(|n| !placed.contains(&n.record.name.as_str()))
                    .min_by_key(|n| {
                        (
                            taken.get(n.record.zone.as_str()).copied().unwrap_or(0),
                            std::cmp::Reverse(score(record.id, s, &n.record.name)),
                        )
                    })
                    .map(|n| n.record.name.clone());
                let Some(new) = choice else {
                    tracing::warn!(volume = %record.name, segment = s, shard = i, node = %current, "no node to move a shard to: the segment stays degraded");
                    continue;
                };
                let index = match record.nodes.iter().position(|n| *n == new) {
                    Some(at) => at,
                    None => {
                        record.nodes.push(new.clone());
                        record.nodes.len() - 1
                    }
                };
                record.segments[s][i] = index as u16;
                if !record.rebuilding.contains(&(s as u32, i as u32)) {
                    record.rebuilding.push((s as u32, i as u32));
                }
                tracing::info!(volume = %record.name, segment = s, shard = i, from = %current, to = %new, "placing a shard on another node");
                moved = true;
            }
        }
        moved
    }

    /// Rebuilds onto the node of shard `i` of segment `s` every stripe it
    /// lacks that k others hold.
    async fn backfill(&mut self, record: &VolumeRecord, s: usize, i: usize) -> Backfill {
        let nodes = self.peers.segment(record, s);
        let (held, answered) = list_segment(&nodes, record.id, s as u32).await;
        let k = record.data_shards as usize;
        let mut missing: Vec<_> = held
            .into_iter()
            .filter(|(_, (_, mask))| mask & (1 << i) == 0 && mask.count_ones() as usize >= k)
            .collect();
        missing.sort_by_key(|(stripe, _)| *stripe);
        let mut left: u64 = missing
            .iter()
            .map(|(_, (layout, _))| u64::from(layout.rows) * BLOCK as u64)
            .sum();
        if !answered.get(i).copied().unwrap_or(false) {
            return Backfill { left, clean: false };
        }
        let Some(target) = nodes[i].client.clone() else {
            return Backfill { left, clean: false };
        };
        let mut clean = true;
        let mut fenced = false;
        let mut todo = missing.into_iter();
        // Rebuilds run as tasks of their own, so they go on while this
        // loop waits for the throttle.
        let peers = Arc::new(nodes);
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            // Up to REBUILDS_IN_FLIGHT stripes at once: one at a time, a
            // rebuild waits on k reads, then on the target's fdatasync.
            while in_flight.len() < REBUILDS_IN_FLIGHT && !fenced {
                let Some((stripe, (layout, _))) = todo.next() else {
                    break;
                };
                let bytes = u64::from(layout.rows) * BLOCK as u64;
                self.throttle.take(bytes).await;
                let (peers, mut target) = (peers.clone(), target.clone());
                let (volume, epoch) = (record.id, record.epoch);
                in_flight.spawn(async move {
                    let data = rebuild_shard(&peers, volume, s as u32, stripe, &layout, i)
                        .await
                        .map_err(|why| (false, format!("cannot rebuild a shard now: {why}")))?;
                    let request = AppendRequest {
                        volume,
                        segment: s as u32,
                        shard: i as u32,
                        stripe: Some(stripe_id(stripe)),
                        crcs: block_crcs(&data),
                        layout: Some(layout),
                        data,
                        // The writer's epoch as recorded: a newer writer
                        // fences this pass, and the next one reads its epoch.
                        writer_epoch: epoch,
                    };
                    match target.append(request).await {
                        Ok(_) => Ok(bytes),
                        Err(e) => Err((
                            e.message().starts_with("fenced"),
                            format!("cannot append a rebuilt shard now: {}", e.message()),
                        )),
                    }
                });
            }
            let Some(joined) = in_flight.join_next().await else {
                break;
            };
            let outcome =
                joined.unwrap_or_else(|e| Err((false, format!("a rebuild task failed: {e}"))));
            match outcome {
                Ok(bytes) => {
                    left -= bytes;
                    self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                    self.stats.shards.fetch_add(1, Ordering::Relaxed);
                }
                Err((was_fenced, why)) => {
                    // Discarded meanwhile, too few shards reachable, or a
                    // newer writer: the next pass sees which.
                    tracing::debug!(volume = %record.name, segment = s, shard = i, %why, "backfill");
                    clean = false;
                    fenced |= was_fenced;
                }
            }
        }
        Backfill { left, clean }
    }
}
