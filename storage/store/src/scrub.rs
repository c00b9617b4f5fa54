//! Scrubbing: a node reads every block it holds, at a configured rate,
//! and verifies its checksum; a shard with rotten blocks is rebuilt from
//! the volume's other shards (any k, on their nodes) and appended again
//! under the same stripe id, which replaces it. `tessera-store node scrub
//! NAME` runs a pass at once, at full speed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tessera_proto::store::ShardRecord;

use crate::codec::{block_crcs, BLOCK};
use crate::meta::Meta;
use crate::rebuild::{rebuild_shard, Peers, Throttle};
use crate::shardlog::{stripe_id, HeldShard, ShardLog};

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct ScrubStats {
    pub passes: AtomicU64,
    pub blocks_checked: AtomicU64,
    pub blocks_bad: AtomicU64,
    pub blocks_repaired: AtomicU64,
    pub blocks_unrepaired: AtomicU64,
}

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ScrubReport {
    pub checked: u64,
    pub bad: u64,
    pub repaired: u64,
    pub unrepaired: u64,
}

pub struct Scrubber {
    log: ShardLog,
    meta: Meta,
    stats: Arc<ScrubStats>,
    /// One pass at a time (the background one, or one asked for).
    running: tokio::sync::Mutex<Peers>,
}

impl Scrubber {
    pub fn new(log: ShardLog, meta: Meta, stats: Arc<ScrubStats>) -> Scrubber {
        Scrubber {
            log,
            meta,
            stats,
            running: tokio::sync::Mutex::new(Peers::default()),
        }
    }

    /// Checks every block held, at `rate` bytes a second (0: at once),
    /// rebuilding the shards with rotten ones.
    pub async fn pass(&self, rate: u64) -> ScrubReport {
        let mut peers = self.running.lock().await;
        let mut throttle = Throttle::new(rate);
        let mut report = ScrubReport::default();
        let stats = &self.stats;
        for volume in self.log.volumes() {
            for segment in self.log.segments(volume) {
                for held in self.log.stripes(volume, segment) {
                    throttle
                        .take(u64::from(held.layout.rows) * BLOCK as u64)
                        .await;
                    let log = self.log.clone();
                    let (shard, stripe) = (held.shard, held.stripe);
                    let verified = tokio::task::spawn_blocking(move || {
                        log.verify(volume, segment, shard, stripe)
                    })
                    .await;
                    let (blocks, bad) = match verified {
                        Ok(Ok(counts)) => counts,
                        Ok(Err(e)) => {
                            tracing::warn!(volume = %format!("{volume:x}"), segment, error = %e, "cannot read a shard to scrub it");
                            continue;
                        }
                        Err(_) => continue,
                    };
                    report.checked += blocks;
                    stats.blocks_checked.fetch_add(blocks, Ordering::Relaxed);
                    if bad == 0 {
                        continue;
                    }
                    report.bad += bad;
                    stats.blocks_bad.fetch_add(bad, Ordering::Relaxed);
                    match self.rebuild(&mut peers, volume, segment, &held).await {
                        Ok(()) => {
                            tracing::info!(volume = %format!("{volume:x}"), segment, shard, epoch = stripe.0, seq = stripe.1, blocks = bad, "rebuilt a shard with rotten blocks");
                            report.repaired += bad;
                            stats.blocks_repaired.fetch_add(bad, Ordering::Relaxed);
                        }
                        Err(why) => {
                            tracing::error!(volume = %format!("{volume:x}"), segment, shard, epoch = stripe.0, seq = stripe.1, blocks = bad, %why, "cannot rebuild a shard with rotten blocks");
                            report.unrepaired += bad;
                            stats.blocks_unrepaired.fetch_add(bad, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        stats.passes.fetch_add(1, Ordering::Relaxed);
        report
    }

    /// Rebuilds `held` from the other shards of its stripe and appends it
    /// again (replacing the rotten copy).
    async fn rebuild(
        &self,
        peers: &mut Peers,
        volume: u64,
        segment: u32,
        held: &HeldShard,
    ) -> Result<(), String> {
        let record = self
            .meta
            .volume_by_id(volume)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the volume has no record".to_string())?;
        if segment as usize >= record.segments.len() {
            return Err(format!("the volume has no segment {segment}"));
        }
        peers.refresh(&self.meta).await.map_err(|e| e.to_string())?;
        let nodes = peers.segment(&record, segment as usize);
        let data = rebuild_shard(
            &nodes,
            volume,
            segment,
            held.stripe,
            &held.layout,
            held.shard as usize,
        )
        .await?;
        let shard = ShardRecord {
            volume,
            segment,
            shard: held.shard,
            stripe: Some(stripe_id(held.stripe)),
            layout: Some(held.layout.clone()),
            crcs: block_crcs(&data),
        };
        let log = self.log.clone();
        // The volume's epoch here: the rebuilt copy passes its own fence.
        let epoch = log.epoch(volume);
        tokio::task::spawn_blocking(move || log.append(shard, Bytes::from(data), epoch))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// Scrubs in the background: a pass at `rate`, then `interval` of rest.
pub async fn run(scrubber: Arc<Scrubber>, rate: u64, interval: Duration) {
    if rate == 0 {
        return;
    }
    loop {
        tokio::time::sleep(interval).await;
        let report = scrubber.pass(rate).await;
        tracing::info!(
            checked = report.checked,
            bad = report.bad,
            repaired = report.repaired,
            "scrub pass done"
        );
    }
}
