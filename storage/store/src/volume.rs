//! The volume client: a volume's single writer (or a reader), turning block
//! reads and writes into erasure-coded stripes on storage nodes.
//!
//! **Writes are log-structured per segment** (Aurora's "the log is the
//! database"). Written blocks wait in memory until a stripe's worth has
//! gathered or a flush comes; then they are sealed into a stripe with the
//! next sequence number of the writer's epoch, encoded (k data + m parity
//! shards, see [`crate::codec`]), and each shard is sent to its node, all
//! at once. The segment's block map points at the newest stripe of each
//! block. A stripe is acknowledged once `write_quorum` (default k+1) shards
//! are durable; a flush waits until every stripe sealed before it is
//! acknowledged, in every segment, and fails with a clear error (never
//! hangs) when that cannot happen in `write_timeout`. Shards still missing
//! are retried in the background. Blocks are never written in place, so a
//! crash never tears one: a block reads its old or its new content.
//!
//! **Reads** of a block go to the node of its data shard (one row); when
//! that node is down, or answers that the block's checksum failed, the same
//! row is read from the other shards and rebuilt from any k.
//!
//! **Fencing and recovery.** Opening a volume for writing bumps its epoch in
//! the control plane (a compare-and-swap), then fences every reachable node
//! of every segment with it: nodes refuse older epochs from then on, so a
//! writer cut off from the cluster can never have a write acknowledged
//! again. It then lists the stripes the nodes hold. A stripe with at least k
//! shards is kept. One with fewer could not have been acknowledged if even
//! counting the unreachable nodes it falls short of the write quorum: its
//! shards are discarded, so it can never come back. If it might have been
//! acknowledged (the unreachable nodes could complete its quorum), the open
//! fails and says so: nothing acknowledged is ever dropped.
//!
//! **Space.** A stripe whose blocks were all superseded by acknowledged
//! stripes is discarded on its nodes, which give the space back.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tessera_proto::store::store_client::StoreClient;
use tessera_proto::store::{
    AppendRequest, DiscardRequest, FenceRequest, Layout, ReadRequest, StripeId, StripesRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::codec::{block_crcs, position, rows_for, Codec, CodecError, BLOCK, MAX_ROWS};
use crate::meta::{Meta, MetaError, VolumeRecord};
use crate::node::MAX_MESSAGE;
use crate::shardlog::{stripe_id, stripe_of, Stripe};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("segment {segment}: only {reachable} of its {shards} nodes are reachable ({down}); {needed} are needed to {what}")]
    TooFewNodes {
        segment: u32,
        reachable: usize,
        shards: usize,
        needed: usize,
        down: String,
        what: &'static str,
    },
    #[error("segment {segment}: stripe {epoch}/{seq} has {present} shards on reachable nodes and may have been acknowledged on the unreachable ones ({down}); bring them back before writing")]
    Uncertain {
        segment: u32,
        epoch: u64,
        seq: u64,
        present: usize,
        down: String,
    },
    #[error("cannot make writes durable within {timeout:?}: {why}")]
    NotDurable { timeout: Duration, why: String },
    #[error("segment {segment}: block {block} cannot be read: {why}")]
    Unreadable {
        segment: u32,
        block: u32,
        why: String,
    },
    #[error("the volume is open read-only")]
    ReadOnly,
    #[error("{offset}+{len} is outside the volume's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the volume is closed")]
    Closed,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// How long a flush (or a write waiting for room) may take before it
    /// fails.
    pub write_timeout: Duration,
    /// Timeout of one request to a node.
    pub request_timeout: Duration,
    /// Memory of written data not yet acknowledged before writes wait.
    pub max_unacked_bytes: usize,
    /// Memory of acknowledged stripes kept to complete their missing
    /// shards; beyond it, completion is left to repair.
    pub max_retained_bytes: usize,
    /// How long shards missing after a stripe's acknowledgement are retried.
    pub completion_window: Duration,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            write_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_unacked_bytes: 256 << 20,
            max_retained_bytes: 256 << 20,
            completion_window: Duration::from_secs(60),
        }
    }
}

/// Where a block's newest version is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    stripe: Stripe,
    /// Its index in the stripe's layout.
    pos: u32,
}

struct StripeState {
    layout: Arc<Layout>,
    /// Blocks of the map that point here.
    live: u32,
    /// Sequence number of the stripe that took its last live block.
    dead_at: Option<u64>,
    /// All shards, while some are not yet durable (served to reads too).
    data: Option<Arc<Vec<Vec<u8>>>>,
}

#[derive(Default)]
struct SegState {
    /// Written blocks only: a volume's map grows with what was written.
    map: HashMap<u32, Loc>,
    dirty: BTreeMap<u32, Arc<Vec<u8>>>,
    stripes: HashMap<Stripe, StripeState>,
    /// The next stripe's sequence number (this epoch's start at 1).
    next_seq: u64,
    /// Sealed stripes not yet acknowledged.
    unacked: BTreeSet<u64>,
    /// Why an unacknowledged stripe has not reached its quorum yet (the
    /// last round of sends), for error messages.
    trouble: Option<(u64, String)>,
    /// The same once it has lasted the write timeout: flushes fail on it.
    failure: Option<(u64, String)>,
}

impl SegState {
    /// Every stripe of this epoch up to this one is acknowledged.
    fn acked_through(&self) -> u64 {
        match self.unacked.first() {
            Some(&first) => first - 1,
            None => self.next_seq.saturating_sub(1),
        }
    }
}

struct Segment {
    index: u32,
    /// The node (index into `Inner::nodes`) of each shard.
    nodes: Vec<usize>,
    state: Mutex<SegState>,
}

/// A storage node as the client reaches it.
struct NodeHandle {
    name: String,
    client: Option<StoreClient<Channel>>,
}

/// Counters for `/metrics` and tests.
#[derive(Default, Debug)]
pub struct VolumeStats {
    pub stripes_sealed: AtomicU64,
    pub stripes_acked: AtomicU64,
    pub degraded_reads: AtomicU64,
    pub stripes_discarded: AtomicU64,
    pub shards_completed: AtomicU64,
}

struct Inner {
    record: VolumeRecord,
    /// This writer's epoch (0 when read-only).
    epoch: u64,
    codec: Codec,
    k: usize,
    n: usize,
    quorum: usize,
    seg_blocks: u32,
    nodes: Vec<NodeHandle>,
    segments: Vec<Segment>,
    fenced: Mutex<Option<String>>,
    closed: AtomicBool,
    unacked_bytes: AtomicUsize,
    /// Bytes of stripes held in memory (unacknowledged, or acknowledged
    /// with shards still missing).
    retained_bytes: AtomicUsize,
    /// Woken on every acknowledgement, failure or fencing.
    changed: tokio::sync::Notify,
    /// Serializes partial-block writes (read, patch, write back).
    partial: tokio::sync::Mutex<()>,
    options: VolumeOptions,
    stats: VolumeStats,
}

/// An open volume (cheap to clone).
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

/// Where one block's content comes from, decided under the segment lock.
enum Source {
    Zero,
    Bytes(Arc<Vec<u8>>),
    InStripe(Arc<Vec<Vec<u8>>>, usize, usize),
    Remote(Stripe, Arc<Layout>, u32),
}

fn is_fenced(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition && status.message().starts_with("fenced")
}

fn lock(seg: &Segment) -> MutexGuard<'_, SegState> {
    seg.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn names(nodes: &[NodeHandle], which: impl Iterator<Item = usize>) -> String {
    let list: Vec<&str> = which.map(|i| nodes[i].name.as_str()).collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

impl Volume {
    /// Opens `name` as its one writer: bumps its epoch, fences its nodes,
    /// and recovers every segment's state.
    pub async fn open(
        meta: &Meta,
        name: &str,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        if meta.volume(name).await?.is_none() {
            return Err(VolumeError::NoSuchVolume(name.to_string()));
        }
        let record = meta.bump_epoch(name).await?;
        let epoch = record.epoch;
        Self::open_record(meta, record, epoch, options).await
    }

    /// Opens `name` for reading only: no epoch, nothing fenced or discarded.
    pub async fn open_read_only(
        meta: &Meta,
        name: &str,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let (record, _) = meta
            .volume(name)
            .await?
            .ok_or_else(|| VolumeError::NoSuchVolume(name.to_string()))?;
        Self::open_record(meta, record, 0, options).await
    }

    async fn open_record(
        meta: &Meta,
        record: VolumeRecord,
        epoch: u64,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let addresses: HashMap<String, String> = meta
            .nodes()
            .await?
            .into_iter()
            .map(|n| (n.record.name, n.record.address))
            .collect();
        let nodes = record
            .nodes
            .iter()
            .map(|name| NodeHandle {
                name: name.clone(),
                client: addresses.get(name).and_then(|a| connect(a, &options)),
            })
            .collect();
        let k = record.data_shards as usize;
        let m = record.parity_shards as usize;
        let seg_blocks = (record.segment_size / BLOCK as u64) as u32;
        let segments = record
            .segments
            .iter()
            .enumerate()
            .map(|(i, nodes)| Segment {
                index: i as u32,
                nodes: nodes.iter().map(|&n| n as usize).collect(),
                state: Mutex::new(SegState {
                    next_seq: 1,
                    ..Default::default()
                }),
            })
            .collect();
        let inner = Arc::new(Inner {
            codec: Codec::new(k, m)?,
            k,
            n: k + m,
            quorum: (record.write_quorum as usize).clamp(k, k + m),
            seg_blocks,
            nodes,
            segments,
            record,
            epoch,
            fenced: Mutex::new(None),
            closed: AtomicBool::new(false),
            unacked_bytes: AtomicUsize::new(0),
            retained_bytes: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
            partial: tokio::sync::Mutex::new(()),
            options,
            stats: VolumeStats::default(),
        });
        let volume = Volume { inner };
        let mut recoveries: FuturesUnordered<_> = (0..volume.inner.segments.len())
            .map(|s| volume.clone().recover_segment(s))
            .collect();
        while let Some(done) = recoveries.next().await {
            done?;
        }
        if volume.writable() {
            let completer = volume.clone();
            tokio::spawn(async move { completer.complete_missing().await });
        }
        Ok(volume)
    }

    pub fn record(&self) -> &VolumeRecord {
        &self.inner.record
    }

    pub fn size(&self) -> u64 {
        self.inner.record.size
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    pub fn writable(&self) -> bool {
        self.inner.epoch > 0
    }

    pub fn stats(&self) -> &VolumeStats {
        &self.inner.stats
    }

    /// Bytes of written stripes not yet on all their nodes.
    pub fn pending_bytes(&self) -> usize {
        self.inner.retained_bytes.load(Ordering::SeqCst)
    }

    /// Why this writer was fenced, if it was.
    pub fn fenced(&self) -> Option<String> {
        self.inner
            .fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_fenced(&self, why: String) {
        let mut f = self.inner.fenced.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(volume = %self.inner.record.name, %why, "this writer was fenced: another writer attached");
            *f = Some(why);
        }
        drop(f);
        self.inner.changed.notify_waiters();
    }

    fn check_usable(&self) -> Result<(), VolumeError> {
        if let Some(why) = self.fenced() {
            return Err(VolumeError::Fenced(why));
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(VolumeError::Closed);
        }
        Ok(())
    }

    /// Lists what the reachable nodes of segment `s` hold, fencing them
    /// first when writing, and rebuilds the segment's block map.
    async fn recover_segment(self, s: usize) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let seg = &inner.segments[s];
        let volume = inner.record.id;
        let mut asks: FuturesUnordered<_> = seg
            .nodes
            .iter()
            .enumerate()
            .map(|(shard, &node)| {
                let client = inner.nodes[node].client.clone();
                let epoch = inner.epoch;
                let segment = seg.index;
                async move {
                    let Some(mut client) = client else {
                        return (shard, Err(tonic::Status::unavailable("no address known")));
                    };
                    if epoch > 0 {
                        match client.fence(FenceRequest { volume, epoch }).await {
                            Ok(r) if r.get_ref().epoch > epoch => {
                                return (
                                    shard,
                                    Err(tonic::Status::failed_precondition(format!(
                                        "fenced: a newer writer (epoch {}) attached",
                                        r.get_ref().epoch
                                    ))),
                                )
                            }
                            Ok(_) => {}
                            Err(e) => return (shard, Err(e)),
                        }
                    }
                    let listed = client
                        .stripes(StripesRequest { volume, segment })
                        .await
                        .map(|r| r.into_inner());
                    (shard, listed)
                }
            })
            .collect();
        let mut reachable = vec![false; inner.n];
        let mut held: BTreeMap<Stripe, (u64, Layout)> = BTreeMap::new();
        while let Some((shard, answer)) = asks.next().await {
            match answer {
                Ok(reply) => {
                    reachable[shard] = true;
                    for info in reply
                        .stripes
                        .into_iter()
                        .filter(|i| i.shard as usize == shard)
                    {
                        let Some(layout) = info.layout else { continue };
                        if !self.layout_fits(&layout, shard) {
                            tracing::warn!(
                                segment = seg.index,
                                shard,
                                "ignoring a stripe whose layout does not fit the volume's code"
                            );
                            continue;
                        }
                        let entry = held
                            .entry(stripe_of(info.stripe.as_ref()))
                            .or_insert((0, layout));
                        entry.0 |= 1 << shard;
                    }
                }
                Err(e) if is_fenced(&e) => {
                    self.set_fenced(e.message().to_string());
                    return Err(VolumeError::Fenced(e.message().to_string()));
                }
                Err(e) => {
                    tracing::warn!(segment = seg.index, shard, node = %inner.nodes[seg.nodes[shard]].name, error = %e.message(), "node unreachable while opening the volume");
                }
            }
        }
        let up = reachable.iter().filter(|&&r| r).count();
        let down_names = names(
            &inner.nodes,
            (0..inner.n)
                .filter(|&i| !reachable[i])
                .map(|i| seg.nodes[i]),
        );
        // Reading needs k shards. A writer must also have fenced enough
        // nodes that the unfenced ones cannot make a quorum for an older
        // writer (n - quorum + 1), and see a shard of every stripe that could
        // ever be read (n - k + 1: a stripe hidden on the unreachable nodes
        // alone could otherwise come back later). Both are at most k when
        // m < k. With fewer than the quorum up, a writer reads, and its
        // flushes fail until nodes return.
        let needed = if self.writable() {
            inner
                .k
                .max(inner.n + 1 - inner.quorum)
                .max(inner.n - inner.k + 1)
        } else {
            inner.k
        };
        if up < needed {
            return Err(VolumeError::TooFewNodes {
                segment: seg.index,
                reachable: up,
                shards: inner.n,
                needed,
                down: down_names,
                what: "read",
            });
        }
        let down = inner.n - up;
        let mut dropped: Vec<(Stripe, u64)> = Vec::new();
        let mut state = SegState {
            next_seq: 1,
            ..Default::default()
        };
        // Stripes superseded, block by block, only by stripes that lack
        // their quorum's redundancy (a writer died before completing them)
        // are kept until those are rebuilt (the next open discards them).
        let mut pinned: HashSet<Stripe> = HashSet::new();
        for (stripe, (holders, layout)) in held {
            let present = holders.count_ones() as usize;
            if present < inner.k {
                if self.writable() && present + down >= inner.quorum {
                    return Err(VolumeError::Uncertain {
                        segment: seg.index,
                        epoch: stripe.0,
                        seq: stripe.1,
                        present,
                        down: down_names,
                    });
                }
                dropped.push((stripe, holders));
                continue;
            }
            let layout = Arc::new(layout);
            for (pos, &block) in layout.blocks.iter().enumerate() {
                if block >= inner.seg_blocks {
                    continue;
                }
                let loc = Loc {
                    stripe,
                    pos: pos as u32,
                };
                if let Some(old) = state.map.insert(block, loc) {
                    if let Some(o) = state.stripes.get_mut(&old.stripe) {
                        o.live -= 1;
                    }
                    if present < inner.quorum {
                        pinned.insert(old.stripe);
                    }
                }
            }
            state.stripes.insert(
                stripe,
                StripeState {
                    live: layout.blocks.len() as u32,
                    layout,
                    dead_at: None,
                    data: None,
                },
            );
        }
        // Recovered stripes without a live block are superseded by
        // durable ones: give their space back.
        let mut dead: Vec<Stripe> = Vec::new();
        for (stripe, st) in state.stripes.iter_mut() {
            if st.live == 0 && !pinned.contains(stripe) {
                st.dead_at = Some(0);
                dead.push(*stripe);
            }
        }
        *lock(seg) = state;
        if self.writable() {
            // Stripes that can never be read (and were never acknowledged)
            // are removed before any write, so they cannot come back.
            if !dropped.is_empty() {
                tracing::info!(
                    segment = seg.index,
                    stripes = dropped.len(),
                    "discarding stripes that never reached their quorum"
                );
                let stripes: Vec<StripeId> = dropped.iter().map(|(s, _)| stripe_id(*s)).collect();
                let holders = dropped.iter().fold(0u64, |a, (_, h)| a | h);
                self.discard_on(s, holders, stripes, true).await?;
            }
            self.discard_dead(s, dead);
        }
        Ok(())
    }

    /// Whether a node's `layout` for `shard` is one this volume's writer
    /// made (the volume's code, sane rows and blocks).
    fn layout_fits(&self, layout: &Layout, shard: usize) -> bool {
        let inner = &self.inner;
        layout.data_shards as usize == inner.k
            && layout.parity_shards as usize == inner.n - inner.k
            && crate::shardlog::check_layout(layout, shard as u32).is_ok()
    }

    /// Sends a discard of `stripes` to the nodes of segment `s`'s shards in
    /// `shards` (a bitmask); with `required`, every one must take it.
    async fn discard_on(
        &self,
        s: usize,
        shards: u64,
        stripes: Vec<StripeId>,
        required: bool,
    ) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let seg = &inner.segments[s];
        let mut sends: FuturesUnordered<_> = (0..inner.n)
            .filter(|i| shards & (1 << i) != 0)
            .filter_map(|i| {
                let client = inner.nodes[seg.nodes[i]].client.clone()?;
                let request = DiscardRequest {
                    volume: inner.record.id,
                    segment: seg.index,
                    epoch: inner.epoch,
                    stripes: stripes.clone(),
                };
                Some(async move { client.clone().discard(request).await })
            })
            .collect();
        while let Some(result) = sends.next().await {
            match result {
                Ok(_) => {}
                Err(e) if is_fenced(&e) => {
                    self.set_fenced(e.message().to_string());
                    return Err(VolumeError::Fenced(e.message().to_string()));
                }
                Err(e) if required => {
                    return Err(VolumeError::NotDurable {
                        timeout: inner.options.request_timeout,
                        why: format!("cannot discard unreadable stripes: {}", e.message()),
                    })
                }
                Err(_) => {}
            }
        }
        inner
            .stats
            .stripes_discarded
            .fetch_add(stripes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Discards dead stripes of segment `s` in the background and forgets
    /// them (a node that misses it keeps the space until the next open).
    fn discard_dead(&self, s: usize, dead: Vec<Stripe>) {
        if dead.is_empty() {
            return;
        }
        {
            let mut st = lock(&self.inner.segments[s]);
            for stripe in &dead {
                st.stripes.remove(stripe);
            }
        }
        let volume = self.clone();
        let all = (1u64 << self.inner.n) - 1;
        tokio::spawn(async move {
            let stripes = dead.into_iter().map(stripe_id).collect();
            let _ = volume.discard_on(s, all, stripes, false).await;
        });
    }

    fn block_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.inner.record.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Durable once a later [`Volume::flush`]
    /// returns.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        if !self.writable() {
            return Err(VolumeError::ReadOnly);
        }
        self.check_usable()?;
        self.block_range(offset, data.len() as u64)?;
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let block = at / BLOCK as u64;
            let within = (at % BLOCK as u64) as usize;
            let take = (BLOCK - within).min(rest.len());
            let content = if within == 0 && take == BLOCK {
                Arc::new(rest[..BLOCK].to_vec())
            } else {
                // A partial block: read it, patch it, write it whole.
                let _one_at_a_time = self.inner.partial.lock().await;
                let mut old = self.read(block * BLOCK as u64, BLOCK).await?;
                old[within..within + take].copy_from_slice(&rest[..take]);
                Arc::new(old)
            };
            self.put_block(block, content)?;
            at += take as u64;
            rest = &rest[take..];
        }
        self.wait_for_room().await
    }

    fn put_block(&self, block: u64, content: Arc<Vec<u8>>) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let s = (block / u64::from(inner.seg_blocks)) as usize;
        let b = (block % u64::from(inner.seg_blocks)) as u32;
        let seg = &inner.segments[s];
        let sealed = {
            let mut st = lock(seg);
            st.dirty.insert(b, content);
            if st.dirty.len() >= inner.k * MAX_ROWS {
                Some(self.seal(&mut st)?)
            } else {
                None
            }
        };
        if let Some(sealed) = sealed {
            tokio::spawn(self.clone().send(s, sealed));
        }
        Ok(())
    }

    /// Waits while too much written data is not yet acknowledged.
    async fn wait_for_room(&self) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.options.write_timeout;
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.check_usable()?;
            if inner.unacked_bytes.load(Ordering::SeqCst) <= inner.options.max_unacked_bytes {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(VolumeError::NotDurable {
                    timeout: inner.options.write_timeout,
                    why: self.quorum_trouble(),
                });
            }
        }
    }

    /// Seals up to a stripe's worth of segment `s`'s written blocks into
    /// the next stripe: encoded, mapped (reads find it in memory until its
    /// shards are durable), and counted as unacknowledged.
    fn seal(&self, st: &mut SegState) -> Result<Sealed, VolumeError> {
        let inner = &self.inner;
        let mut blocks = Vec::new();
        let mut contents = Vec::new();
        while blocks.len() < inner.k * MAX_ROWS {
            let Some((b, data)) = st.dirty.pop_first() else {
                break;
            };
            blocks.push(b);
            contents.push(data);
        }
        let rows = rows_for(blocks.len(), inner.k);
        let refs: Vec<&[u8]> = contents.iter().map(|c| c.as_slice()).collect();
        let shards = Arc::new(inner.codec.encode(&refs, rows)?);
        let seq = st.next_seq;
        st.next_seq += 1;
        let stripe = (inner.epoch, seq);
        for (pos, &b) in blocks.iter().enumerate() {
            if let Some(old) = st.map.insert(
                b,
                Loc {
                    stripe,
                    pos: pos as u32,
                },
            ) {
                if let Some(o) = st.stripes.get_mut(&old.stripe) {
                    o.live -= 1;
                    if o.live == 0 {
                        o.dead_at = Some(seq);
                    }
                }
            }
        }
        let layout = Arc::new(Layout {
            data_shards: inner.k as u32,
            parity_shards: (inner.n - inner.k) as u32,
            rows: rows as u32,
            blocks,
        });
        st.stripes.insert(
            stripe,
            StripeState {
                live: layout.blocks.len() as u32,
                layout: layout.clone(),
                dead_at: None,
                data: Some(shards.clone()),
            },
        );
        st.unacked.insert(seq);
        let bytes: usize = shards.iter().map(Vec::len).sum();
        inner.unacked_bytes.fetch_add(bytes, Ordering::SeqCst);
        inner.retained_bytes.fetch_add(bytes, Ordering::SeqCst);
        inner.stats.stripes_sealed.fetch_add(1, Ordering::Relaxed);
        Ok(Sealed {
            stripe,
            layout,
            shards,
        })
    }

    /// Sends every shard of a sealed stripe to its node until the write
    /// quorum is durable (then the stripe is acknowledged), and goes on
    /// retrying the missing ones for a while after.
    async fn send(self, s: usize, sealed: Sealed) {
        let inner = &self.inner;
        let seg = &inner.segments[s];
        let started = Instant::now();
        let all = (1u64 << inner.n) - 1;
        let mut done = 0u64;
        let mut acked = false;
        let mut reported = false;
        let mut pause = Duration::from_millis(100);
        loop {
            let mut sends: FuturesUnordered<_> = (0..inner.n)
                .filter(|i| done & (1 << i) == 0)
                .map(|shard| {
                    let client = inner.nodes[seg.nodes[shard]].client.clone();
                    let request = AppendRequest {
                        volume: inner.record.id,
                        segment: seg.index,
                        shard: shard as u32,
                        stripe: Some(stripe_id(sealed.stripe)),
                        layout: Some((*sealed.layout).clone()),
                        crcs: block_crcs(&sealed.shards[shard]),
                        data: sealed.shards[shard].clone(),
                        writer_epoch: inner.epoch,
                    };
                    async move {
                        match client {
                            Some(mut c) => (shard, c.append(request).await.map(|_| ())),
                            None => (shard, Err(tonic::Status::unavailable("no address known"))),
                        }
                    }
                })
                .collect();
            let mut errors = Vec::new();
            while let Some((shard, result)) = sends.next().await {
                match result {
                    Ok(()) => {
                        done |= 1 << shard;
                        if !acked && done.count_ones() as usize >= inner.quorum {
                            acked = true;
                            let bytes = sealed.shards.iter().map(Vec::len).sum();
                            self.acknowledge(s, sealed.stripe, bytes);
                        }
                    }
                    Err(e) if is_fenced(&e) => {
                        self.set_fenced(e.message().to_string());
                        return;
                    }
                    Err(e) => errors.push(format!(
                        "{}: {}",
                        inner.nodes[seg.nodes[shard]].name,
                        e.message()
                    )),
                }
            }
            if done == all || inner.closed.load(Ordering::SeqCst) {
                break;
            }
            let crowded =
                inner.retained_bytes.load(Ordering::SeqCst) > inner.options.max_retained_bytes;
            if acked && (crowded || started.elapsed() > inner.options.completion_window) {
                tracing::warn!(segment = seg.index, epoch = sealed.stripe.0, seq = sealed.stripe.1, missing = %errors.join("; "), "giving up on shards missing after the stripe's quorum; repair rebuilds them");
                break;
            }
            if !acked {
                let why = format!(
                    "segment {} stripe {}/{}: {} of {} shards durable, {} needed ({})",
                    seg.index,
                    sealed.stripe.0,
                    sealed.stripe.1,
                    done.count_ones(),
                    inner.n,
                    inner.quorum,
                    errors.join("; ")
                );
                let mut st = lock(seg);
                st.trouble = Some((sealed.stripe.1, why.clone()));
                if !reported && started.elapsed() > inner.options.write_timeout {
                    reported = true;
                    tracing::warn!(%why, "a stripe cannot reach its write quorum");
                    st.failure.get_or_insert((sealed.stripe.1, why));
                    drop(st);
                    inner.changed.notify_waiters();
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        // The shards are durable (or given up on): reads go to the nodes.
        let dead = {
            let mut st = lock(seg);
            if let Some(state) = st.stripes.get_mut(&sealed.stripe) {
                if state.data.take().is_some() {
                    let bytes: usize = sealed.shards.iter().map(Vec::len).sum();
                    inner.retained_bytes.fetch_sub(bytes, Ordering::SeqCst);
                }
            }
            discardable(&st)
        };
        inner.changed.notify_waiters();
        self.discard_dead(s, dead);
    }

    /// Stripe `stripe` of segment `s` reached its quorum.
    fn acknowledge(&self, s: usize, stripe: Stripe, bytes: usize) {
        let inner = &self.inner;
        inner.unacked_bytes.fetch_sub(bytes, Ordering::SeqCst);
        inner.stats.stripes_acked.fetch_add(1, Ordering::Relaxed);
        let dead = {
            let mut st = lock(&inner.segments[s]);
            st.unacked.remove(&stripe.1);
            if st.failure.as_ref().is_some_and(|(seq, _)| *seq == stripe.1) {
                st.failure = None;
            }
            if st.trouble.as_ref().is_some_and(|(seq, _)| *seq == stripe.1) {
                st.trouble = None;
            }
            discardable(&st)
        };
        inner.changed.notify_waiters();
        self.discard_dead(s, dead);
    }

    /// Makes everything written so far durable: seals what is waiting and
    /// waits for every stripe's quorum.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        if !self.writable() {
            return Ok(());
        }
        self.check_usable()?;
        let inner = &self.inner;
        let mut targets = Vec::with_capacity(inner.segments.len());
        for (s, seg) in inner.segments.iter().enumerate() {
            let mut sealed = Vec::new();
            let target = {
                let mut st = lock(seg);
                while !st.dirty.is_empty() {
                    sealed.push(self.seal(&mut st)?);
                }
                st.next_seq - 1
            };
            for stripe in sealed {
                tokio::spawn(self.clone().send(s, stripe));
            }
            targets.push(target);
        }
        let deadline = tokio::time::Instant::now() + inner.options.write_timeout;
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.check_usable()?;
            let mut pending = None;
            for (seg, &target) in inner.segments.iter().zip(&targets) {
                let st = lock(seg);
                if st.acked_through() < target {
                    if let Some((seq, why)) = &st.failure {
                        if *seq <= target {
                            return Err(VolumeError::NotDurable {
                                timeout: inner.options.write_timeout,
                                why: why.clone(),
                            });
                        }
                    }
                    pending = Some(seg.index);
                }
            }
            let Some(_) = pending else { return Ok(()) };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(VolumeError::NotDurable {
                    timeout: inner.options.write_timeout,
                    why: self.quorum_trouble(),
                });
            }
        }
    }

    /// What keeps stripes from their quorum, for an error message.
    fn quorum_trouble(&self) -> String {
        for seg in &self.inner.segments {
            let st = lock(seg);
            if let Some((_, why)) = st.failure.as_ref().or(st.trouble.as_ref()) {
                return why.clone();
            }
            if let Some(first) = st.unacked.first() {
                return format!(
                    "segment {} stripe {}/{} has not reached {} durable shards",
                    seg.index, self.inner.epoch, first, self.inner.quorum
                );
            }
        }
        "writes wait for acknowledgement".into()
    }

    /// Reads `len` bytes at `offset` (never-written blocks read as zeros).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
        match self.read_once(offset, len).await {
            // The stripe a block was read from may have been superseded
            // and discarded meanwhile: the map now points elsewhere.
            Err(VolumeError::Unreadable { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.read_once(offset, len).await
            }
            other => other,
        }
    }

    async fn read_once(&self, offset: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
        self.block_range(offset, len as u64)?;
        let inner = &self.inner;
        let mut out = vec![0u8; len];
        if len == 0 {
            return Ok(out);
        }
        let first = offset / BLOCK as u64;
        let last = (offset + len as u64 - 1) / BLOCK as u64;
        // Decide where each block comes from, and group the remote ones by
        // shard into runs of consecutive rows.
        let mut fetches: BTreeMap<(usize, Stripe, usize), Vec<(u64, usize)>> = BTreeMap::new();
        let mut layouts: HashMap<(usize, Stripe), Arc<Layout>> = HashMap::new();
        for block in first..=last {
            let s = (block / u64::from(inner.seg_blocks)) as usize;
            let b = (block % u64::from(inner.seg_blocks)) as u32;
            let source = {
                let st = lock(&inner.segments[s]);
                if let Some(d) = st.dirty.get(&b) {
                    Source::Bytes(d.clone())
                } else {
                    match st.map.get(&b).copied() {
                        None => Source::Zero,
                        Some(loc) => match st.stripes.get(&loc.stripe) {
                            None => Source::Zero,
                            Some(state) => {
                                let (shard, row) =
                                    position(loc.pos as usize, state.layout.rows as usize);
                                match &state.data {
                                    Some(data) => Source::InStripe(data.clone(), shard, row),
                                    None => {
                                        Source::Remote(loc.stripe, state.layout.clone(), loc.pos)
                                    }
                                }
                            }
                        },
                    }
                }
            };
            let block_start = block * BLOCK as u64;
            match source {
                Source::Zero => {}
                Source::Bytes(d) => copy_block(&mut out, offset, block_start, &d),
                Source::InStripe(data, shard, row) => copy_block(
                    &mut out,
                    offset,
                    block_start,
                    &data[shard][row * BLOCK..(row + 1) * BLOCK],
                ),
                Source::Remote(stripe, layout, pos) => {
                    let (shard, row) = position(pos as usize, layout.rows as usize);
                    layouts.insert((s, stripe), layout);
                    fetches
                        .entry((s, stripe, shard))
                        .or_default()
                        .push((block_start, row));
                }
            }
        }
        let mut reads: FuturesUnordered<_> = fetches
            .into_iter()
            .map(|((s, stripe, shard), blocks)| {
                let layout = layouts[&(s, stripe)].clone();
                let volume = self.clone();
                async move {
                    let first_row = blocks.iter().map(|b| b.1).min().unwrap_or(0);
                    let last_row = blocks.iter().map(|b| b.1).max().unwrap_or(0);
                    let rows = volume
                        .read_rows(
                            s,
                            stripe,
                            &layout,
                            shard,
                            first_row,
                            last_row + 1 - first_row,
                        )
                        .await;
                    (blocks, first_row, rows)
                }
            })
            .collect();
        while let Some((blocks, first_row, rows)) = reads.next().await {
            let rows = rows?;
            for (block_start, row) in blocks {
                let at = (row - first_row) * BLOCK;
                copy_block(&mut out, offset, block_start, &rows[at..at + BLOCK]);
            }
        }
        Ok(out)
    }

    /// Rows `first_row..first_row + rows` of data shard `shard` of a stripe:
    /// from its node, or rebuilt from the same rows of any k other shards.
    async fn read_rows(
        &self,
        s: usize,
        stripe: Stripe,
        layout: &Layout,
        shard: usize,
        first_row: usize,
        rows: usize,
    ) -> Result<Vec<u8>, VolumeError> {
        match self.fetch(s, stripe, shard, first_row, rows).await {
            Ok(data) => return Ok(data),
            Err(why) => {
                tracing::debug!(segment = s, shard, %why, "degraded read: rebuilding from the other shards");
                self.inner
                    .stats
                    .degraded_reads
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut pieces = self
            .fetch_any(s, stripe, first_row, rows, Some(shard))
            .await
            .map_err(|why| VolumeError::Unreadable {
                segment: s as u32,
                block: layout
                    .blocks
                    .get(shard * layout.rows as usize + first_row)
                    .copied()
                    .unwrap_or(0),
                why,
            })?;
        self.inner.codec.reconstruct_data(&mut pieces)?;
        pieces[shard].take().ok_or_else(|| VolumeError::Unreadable {
            segment: s as u32,
            block: 0,
            why: "reconstruction gave nothing".into(),
        })
    }

    /// The same rows of at least k shards of a stripe (other than `skip`),
    /// as the code's input: `None` for the shards not read.
    async fn fetch_any(
        &self,
        s: usize,
        stripe: Stripe,
        first_row: usize,
        rows: usize,
        skip: Option<usize>,
    ) -> Result<Vec<Option<Vec<u8>>>, String> {
        let inner = &self.inner;
        let mut pieces: Vec<Option<Vec<u8>>> = vec![None; inner.n];
        let mut asks: FuturesUnordered<_> = (0..inner.n)
            .filter(|&i| Some(i) != skip)
            .map(|i| async move { (i, self.fetch(s, stripe, i, first_row, rows).await) })
            .collect();
        let mut got = 0;
        let mut errors = Vec::new();
        while let Some((i, result)) = asks.next().await {
            match result {
                Ok(data) => {
                    pieces[i] = Some(data);
                    got += 1;
                    if got == inner.k {
                        break;
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if got < inner.k {
            return Err(format!(
                "only {got} of the {} shards needed answered: {}",
                inner.k,
                errors.join("; ")
            ));
        }
        Ok(pieces)
    }

    /// Rows of one shard from its node.
    async fn fetch(
        &self,
        s: usize,
        stripe: Stripe,
        shard: usize,
        first_row: usize,
        rows: usize,
    ) -> Result<Vec<u8>, String> {
        let inner = &self.inner;
        let seg = &inner.segments[s];
        let node = &inner.nodes[seg.nodes[shard]];
        let Some(mut client) = node.client.clone() else {
            return Err(format!("{}: no address known", node.name));
        };
        let reply = client
            .read(ReadRequest {
                volume: inner.record.id,
                segment: seg.index,
                shard: shard as u32,
                stripe: Some(stripe_id(stripe)),
                first_row: first_row as u32,
                rows: rows as u32,
            })
            .await
            .map_err(|e| format!("{}: {}", node.name, e.message()))?
            .into_inner();
        // Checked again here: what crossed the network is what was stored.
        if reply.data.len() != rows * BLOCK
            || reply.crcs.len() != rows
            || block_crcs(&reply.data) != reply.crcs
        {
            return Err(format!("{}: checksum mismatch on the wire", node.name));
        }
        Ok(reply.data)
    }

    /// Rebuilds the shards that recovered stripes miss on reachable nodes
    /// (a node was down while they were written), from any k others.
    async fn complete_missing(self) {
        let inner = &self.inner;
        for (s, seg) in inner.segments.iter().enumerate() {
            let volume = inner.record.id;
            let mut holders: HashMap<Stripe, u64> = HashMap::new();
            for (shard, &node) in seg.nodes.iter().enumerate() {
                let Some(mut client) = inner.nodes[node].client.clone() else {
                    continue;
                };
                if let Ok(r) = client
                    .stripes(StripesRequest {
                        volume,
                        segment: seg.index,
                    })
                    .await
                {
                    for info in r
                        .into_inner()
                        .stripes
                        .iter()
                        .filter(|i| i.shard as usize == shard)
                    {
                        *holders.entry(stripe_of(info.stripe.as_ref())).or_default() |= 1 << shard;
                    }
                }
            }
            let wanted: Vec<(Stripe, Arc<Layout>)> = {
                let st = lock(seg);
                st.stripes
                    .iter()
                    .filter(|(_, state)| state.data.is_none() && state.live > 0)
                    .map(|(id, state)| (*id, state.layout.clone()))
                    .collect()
            };
            for (stripe, layout) in wanted {
                if inner.closed.load(Ordering::SeqCst) || self.fenced().is_some() {
                    return;
                }
                let have = holders.get(&stripe).copied().unwrap_or(0);
                let all = (1u64 << inner.n) - 1;
                if have == all || (have.count_ones() as usize) < inner.k {
                    continue;
                }
                if let Err(why) = self.rebuild_shards(s, stripe, &layout, all & !have).await {
                    tracing::debug!(segment = s, epoch = stripe.0, seq = stripe.1, %why, "cannot complete a stripe's missing shards now");
                }
            }
        }
    }

    /// Rebuilds the shards of `missing` (a bitmask) of a stripe from any k
    /// others and appends them to their nodes.
    async fn rebuild_shards(
        &self,
        s: usize,
        stripe: Stripe,
        layout: &Layout,
        missing: u64,
    ) -> Result<(), String> {
        let inner = &self.inner;
        let seg = &inner.segments[s];
        let rows = layout.rows as usize;
        let mut pieces = self.fetch_any(s, stripe, 0, rows, None).await?;
        inner
            .codec
            .reconstruct(&mut pieces)
            .map_err(|e| e.to_string())?;
        for shard in (0..inner.n).filter(|i| missing & (1 << i) != 0) {
            let Some(mut client) = inner.nodes[seg.nodes[shard]].client.clone() else {
                continue;
            };
            let Some(data) = pieces[shard].clone() else {
                continue;
            };
            // The stripe keeps its id; the fence check is this writer's.
            let request = AppendRequest {
                volume: inner.record.id,
                segment: seg.index,
                shard: shard as u32,
                stripe: Some(stripe_id(stripe)),
                layout: Some(layout.clone()),
                crcs: block_crcs(&data),
                data,
                writer_epoch: inner.epoch,
            };
            match client.append(request).await {
                Ok(_) => {
                    inner.stats.shards_completed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if is_fenced(&e) => {
                    self.set_fenced(e.message().to_string());
                    return Err(e.message().to_string());
                }
                Err(e) => return Err(e.message().to_string()),
            }
        }
        Ok(())
    }

    /// Flushes, then stops every background activity.
    pub async fn close(&self) -> Result<(), VolumeError> {
        let flushed = self.flush().await;
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.changed.notify_waiters();
        flushed
    }
}

/// Stripes of a segment superseded by acknowledged stripes and no longer
/// held in memory: their space can be given back.
fn discardable(st: &SegState) -> Vec<Stripe> {
    let through = st.acked_through();
    st.stripes
        .iter()
        .filter(|(_, state)| state.dead_at.is_some_and(|at| at <= through) && state.data.is_none())
        .map(|(id, _)| *id)
        .collect()
}

struct Sealed {
    stripe: Stripe,
    layout: Arc<Layout>,
    shards: Arc<Vec<Vec<u8>>>,
}

/// Copies the part of block `block` (starting at volume offset
/// `block_start`) that falls inside a read of `out.len()` bytes at `offset`.
fn copy_block(out: &mut [u8], offset: u64, block_start: u64, block: &[u8]) {
    let start = block_start.max(offset);
    let end = (block_start + BLOCK as u64).min(offset + out.len() as u64);
    if start >= end {
        return;
    }
    let from = (start - block_start) as usize;
    let to = (start - offset) as usize;
    let len = (end - start) as usize;
    out[to..to + len].copy_from_slice(&block[from..from + len]);
}

fn connect(address: &str, options: &VolumeOptions) -> Option<StoreClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(options.request_timeout)
        .tcp_nodelay(true);
    Some(
        StoreClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}
