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
//! stripes is discarded on its nodes, which give the space back, unless a
//! snapshot still needs it.
//!
//! **Snapshots and clones** are cuts, not copies. Stripe sequence numbers
//! run over the whole volume, so a flush point is one stripe id, and a
//! snapshot is the volume's stripes up to one: an attached volume's last
//! flush point, whose stripes the writer keeps until the next flush is
//! durable (from a snapshot on, a stripe it still reads is kept when its
//! blocks are overwritten). Taking one reads, writes and waits for
//! nothing. A clone's content is layers: its own stripes over a
//! snapshot's (its base), over that snapshot's own bases; a block comes
//! from the topmost layer that has it, nothing is copied, and writes go to
//! the clone's own layer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tessera_proto::store::store_client::StoreClient;
use tessera_proto::store::{
    AppendRequest, DiscardRequest, FenceRequest, Layout, ReadRequest, StripeId, StripesRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::codec::{block_crcs, position, rows_for, Codec, CodecError, BLOCK, MAX_ROWS};
use crate::meta::{Base, Meta, MetaError, SnapshotRecord, VolumeRecord};
use crate::node::MAX_MESSAGE;
use crate::shardlog::{stripe_id, stripe_of, Stripe};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("no snapshot named {0:?}")]
    NoSuchSnapshot(String),
    #[error("the data of volume {0:016x}, which this one reads through, is gone")]
    MissingBase(u64),
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
    /// The layer: 0 is the volume's own stripes, then its bases.
    layer: u8,
    stripe: Stripe,
    /// Its index in the stripe's layout.
    pos: u32,
}

/// A stripe in a segment's map: its layer and id.
type Key = (u8, Stripe);

struct StripeState {
    layout: Arc<Layout>,
    /// Blocks of the map that point here.
    live: u32,
    /// Sequence number of the stripe that took its last live block.
    dead_at: Option<u64>,
    /// All shards, while some are not yet durable (served to reads too).
    data: Option<Arc<Vec<Vec<u8>>>>,
    /// Snapshot cuts that still read some of its blocks: kept while any.
    pinned_by: Vec<Stripe>,
}

#[derive(Default)]
struct SegState {
    /// Written blocks only: a volume's map grows with what was written.
    map: HashMap<u32, Loc>,
    dirty: BTreeMap<u32, Arc<Vec<u8>>>,
    stripes: HashMap<Key, StripeState>,
    /// Sealed stripes of this segment not yet acknowledged.
    unacked: BTreeSet<u64>,
    /// Why an unacknowledged stripe has not reached its quorum yet (the
    /// last round of sends), for error messages.
    trouble: Option<(u64, String)>,
    /// The same once it has lasted the write timeout: flushes fail on it.
    failure: Option<(u64, String)>,
    /// For each cut, the own stripes it pins (to release it quickly).
    pinned: HashMap<Stripe, Vec<Stripe>>,
}

impl SegState {
    /// Every stripe of this writer in this segment up to this sequence
    /// number is acknowledged.
    fn acked_through(&self) -> u64 {
        match self.unacked.first() {
            Some(&first) => first - 1,
            None => u64::MAX,
        }
    }
}

struct Segment {
    index: u32,
    state: Mutex<SegState>,
}

/// A storage node as the client reaches it.
#[derive(Clone)]
struct NodeHandle {
    name: String,
    client: Option<StoreClient<Channel>>,
}

/// One layer of the volume's content: its own stripes (layer 0), or a
/// base's up to a cut.
struct Layer {
    volume_id: u64,
    /// Stripes of the layer up to and including this id; `None`: all.
    cut: Option<Stripe>,
    /// For each of the layer's segments, the node of each shard (repair
    /// and expansion change it while the volume is open).
    segments: RwLock<Vec<Vec<NodeHandle>>>,
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

/// What [`Volume::refresh`] found changed in the control plane.
#[derive(Debug, Default, PartialEq)]
pub struct Refreshed {
    /// The volume grew to this size.
    pub grown: Option<u64>,
    /// Shards placed on other nodes (repair, drain).
    pub moved: usize,
    /// Snapshot cuts released (their stripes given back).
    pub released: usize,
}

struct Inner {
    name: String,
    /// The id of the volume's own layer.
    id: u64,
    /// This writer's epoch (0 when read-only).
    epoch: u64,
    codec: Codec,
    k: usize,
    n: usize,
    quorum: usize,
    seg_blocks: u32,
    size: AtomicU64,
    layers: Vec<Layer>,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// Connections by node name, shared by every layer.
    clients: Mutex<HashMap<String, NodeHandle>>,
    /// The next stripe's sequence number, over all segments: a flush point
    /// is one stripe id. Taken only under `cuts`' lock, so a cut and the
    /// stripes sealed after it are ordered.
    next_seq: AtomicU64,
    /// Cuts of the volume's own layer whose stripes are kept.
    cuts: Mutex<Cuts>,
    /// Serializes taking snapshots and refreshing from the control plane.
    admin: tokio::sync::Mutex<()>,
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
    Remote(u8, Stripe, Arc<Layout>, u32),
}

fn is_fenced(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition && status.message().starts_with("fenced")
}

fn lock(seg: &Segment) -> MutexGuard<'_, SegState> {
    seg.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_cuts(inner: &Inner) -> MutexGuard<'_, Cuts> {
    inner.cuts.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cuts whose stripes a writer keeps: snapshots' (recorded in the
/// control plane, or being recorded), and flush points' (the last flush
/// whose stripes are all acknowledged, and the flushes in progress, any of
/// which may become it). A snapshot taken of an attached volume is its
/// last flush point: exactly what the volume's user last made durable.
#[derive(Clone, Default)]
struct Cuts {
    snapshots: BTreeSet<Stripe>,
    /// Flush points, each with how many flushes (or the last-flush role)
    /// hold it.
    flushes: BTreeMap<Stripe, usize>,
    last_flush: Stripe,
}

impl Cuts {
    /// Every cut in `old..new`: a stripe `old` superseded by `new` is read
    /// by them.
    fn between(&self, old: Stripe, new: Stripe) -> Vec<Stripe> {
        let mut out: Vec<Stripe> = self.snapshots.range(old..new).copied().collect();
        out.extend(self.flushes.range(old..new).map(|(c, _)| *c));
        out
    }

    fn holds(&self, cut: Stripe) -> bool {
        self.snapshots.contains(&cut) || self.flushes.contains_key(&cut)
    }

    fn add_flush(&mut self, cut: Stripe) {
        *self.flushes.entry(cut).or_default() += 1;
    }

    /// One holder of flush point `cut` let go; whether no cut holds its
    /// stripes any more.
    fn drop_flush(&mut self, cut: Stripe) -> bool {
        if let Some(count) = self.flushes.get_mut(&cut) {
            *count -= 1;
            if *count == 0 {
                self.flushes.remove(&cut);
            }
        }
        !self.holds(cut)
    }
}

/// The volume's own stripe `old`, whose block is now in stripe `new`, is
/// still read by the cuts in `old..new`: it is kept for them.
fn pin(st: &mut SegState, old: Stripe, new: Stripe, cuts: &Cuts) {
    let Some(state) = st.stripes.get_mut(&(0, old)) else {
        return;
    };
    let mut added = Vec::new();
    for cut in cuts.between(old, new) {
        if !state.pinned_by.contains(&cut) {
            state.pinned_by.push(cut);
            added.push(cut);
        }
    }
    for cut in added {
        st.pinned.entry(cut).or_default().push(old);
    }
}

fn names<'a>(nodes: impl Iterator<Item = &'a NodeHandle>) -> String {
    let list: Vec<&str> = nodes.map(|n| n.name.as_str()).collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// The volume's content as opened: its own layer and the bases below.
struct Opening {
    record: VolumeRecord,
    own_cut: Option<Stripe>,
    bases: Vec<Base>,
    size: u64,
    epoch: u64,
    cuts: Vec<Stripe>,
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
        Self::open_at_epoch(meta, record, options).await
    }

    /// [`Volume::open`] only while no writer is recorded (the epoch bump
    /// checks it): fences a writer that is gone, never one attaching.
    pub async fn open_unattached(
        meta: &Meta,
        name: &str,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let record = meta.bump_epoch_unattached(name).await?;
        Self::open_at_epoch(meta, record, options).await
    }

    async fn open_at_epoch(
        meta: &Meta,
        record: VolumeRecord,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let cuts = meta.snapshot_cuts(record.id).await?;
        let opening = Opening {
            epoch: record.epoch,
            size: record.size,
            bases: record.bases.clone(),
            own_cut: None,
            record,
            cuts,
        };
        Self::open_layers(meta, opening, options).await
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
        let opening = Opening {
            epoch: 0,
            size: record.size,
            bases: record.bases.clone(),
            own_cut: None,
            record,
            cuts: Vec::new(),
        };
        Self::open_layers(meta, opening, options).await
    }

    /// Opens snapshot `name` for reading: the volume's stripes up to the
    /// snapshot's cut, over its bases.
    pub async fn open_snapshot(
        meta: &Meta,
        name: &str,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let snap: SnapshotRecord = meta
            .snapshot(name)
            .await?
            .filter(|s| !s.deleted)
            .ok_or_else(|| VolumeError::NoSuchSnapshot(name.to_string()))?;
        let mut record = meta
            .volume_by_id(snap.volume_id)
            .await?
            .ok_or(VolumeError::MissingBase(snap.volume_id))?;
        record.name = snap.name.clone();
        let opening = Opening {
            epoch: 0,
            size: snap.size,
            bases: snap.bases,
            own_cut: Some(snap.cut),
            record,
            cuts: Vec::new(),
        };
        Self::open_layers(meta, opening, options).await
    }

    async fn open_layers(
        meta: &Meta,
        opening: Opening,
        options: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let Opening {
            record,
            own_cut,
            bases,
            size,
            epoch,
            cuts,
        } = opening;
        let mut base_records = Vec::with_capacity(bases.len());
        for base in &bases {
            let base_record = meta
                .volume_by_id(base.volume_id)
                .await?
                .ok_or(VolumeError::MissingBase(base.volume_id))?;
            base_records.push((base_record, base.cut));
        }
        let k = record.data_shards as usize;
        let m = record.parity_shards as usize;
        let seg_blocks = (record.segment_size / BLOCK as u64) as u32;
        // A snapshot may be smaller than the volume it was taken of.
        let own_segments = size.div_ceil(record.segment_size) as usize;
        let segments = (0..own_segments)
            .map(|i| {
                Arc::new(Segment {
                    index: i as u32,
                    state: Mutex::new(SegState::default()),
                })
            })
            .collect();
        let layer = |volume_id: u64, cut: Option<Stripe>| Layer {
            volume_id,
            cut,
            segments: RwLock::new(Vec::new()),
        };
        let mut layers = vec![layer(record.id, own_cut)];
        layers.extend(base_records.iter().map(|(r, cut)| layer(r.id, Some(*cut))));
        let inner = Arc::new(Inner {
            name: record.name.clone(),
            id: record.id,
            codec: Codec::new(k, m)?,
            k,
            n: k + m,
            quorum: (record.write_quorum as usize).clamp(k, k + m),
            seg_blocks,
            size: AtomicU64::new(size),
            layers,
            segments: RwLock::new(segments),
            clients: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            cuts: Mutex::new(Cuts {
                snapshots: cuts.into_iter().collect(),
                // What was there at open is the first flush point.
                flushes: BTreeMap::from([((epoch, 0), 1)]),
                last_flush: (epoch, 0),
            }),
            admin: tokio::sync::Mutex::new(()),
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
        let addresses = node_addresses(meta).await?;
        volume.place_layer(0, &record, &addresses);
        for (i, (base_record, _)) in base_records.iter().enumerate() {
            volume.place_layer(i + 1, base_record, &addresses);
        }
        let mut recoveries: FuturesUnordered<_> = (0..own_segments)
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

    /// Points layer `layer`'s segments at the nodes `record` places them
    /// on; returns how many shards moved.
    fn place_layer(
        &self,
        layer: usize,
        record: &VolumeRecord,
        addresses: &HashMap<String, String>,
    ) -> usize {
        let inner = &self.inner;
        let mut clients = inner.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut handle = |name: &str| -> NodeHandle {
            let known = clients.get(name).filter(|h| h.client.is_some());
            if let Some(h) = known {
                return h.clone();
            }
            let h = NodeHandle {
                name: name.to_string(),
                client: addresses.get(name).and_then(|a| connect(a, &inner.options)),
            };
            clients.insert(name.to_string(), h.clone());
            h
        };
        let placed: Vec<Vec<NodeHandle>> = (0..record.segments.len())
            .map(|s| record.placement(s).into_iter().map(&mut handle).collect())
            .collect();
        let mut current = inner.layers[layer]
            .segments
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let moved = placed
            .iter()
            .zip(current.iter())
            .map(|(new, old)| {
                new.iter()
                    .zip(old)
                    .filter(|(a, b)| a.name != b.name)
                    .count()
            })
            .sum();
        *current = placed;
        moved
    }

    /// The node of shard `shard` of layer `layer`'s segment `s`.
    fn node(&self, layer: usize, s: usize, shard: usize) -> Option<NodeHandle> {
        self.inner.layers[layer]
            .segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(s)
            .and_then(|nodes| nodes.get(shard))
            .cloned()
    }

    /// Whether layer `layer` has a segment `s` (a base may be smaller than
    /// the volume, which grew after the clone).
    fn layer_has(&self, layer: usize, s: usize) -> bool {
        self.inner.layers[layer]
            .segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            > s
    }

    fn segment(&self, s: usize) -> Option<Arc<Segment>> {
        self.inner
            .segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(s)
            .cloned()
    }

    fn all_segments(&self) -> Vec<Arc<Segment>> {
        self.inner
            .segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The id of the volume's own layer.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::SeqCst)
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
            tracing::error!(volume = %self.inner.name, %why, "this writer was fenced: a newer writer, or a snapshot fencing a writer it found gone, took over");
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

    /// Lists what the reachable nodes of segment `s` hold in every layer,
    /// fencing the volume's own first when writing, and rebuilds the
    /// segment's block map.
    async fn recover_segment(self, s: usize) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let Some(seg) = self.segment(s) else {
            return Ok(());
        };
        let mut state = SegState::default();
        let mut dropped: Vec<(Stripe, u64)> = Vec::new();
        let mut pinned: HashSet<Stripe> = HashSet::new();
        let cuts = lock_cuts(inner).clone();
        // The deepest base first: each layer's blocks cover the ones below.
        for layer in (0..inner.layers.len()).rev() {
            if !self.layer_has(layer, s) {
                continue; // A base smaller than this volume (it was expanded).
            }
            let own = layer == 0;
            let writing = own && self.writable();
            let (held, reachable) = self.list_segment(layer, s, writing).await?;
            let up = reachable.iter().filter(|&&r| r).count();
            let down_names = names(
                (0..inner.n)
                    .filter(|&i| !reachable[i])
                    .filter_map(|i| self.node(layer, s, i))
                    .collect::<Vec<_>>()
                    .iter(),
            );
            // Reading needs k shards. A writer must also have fenced enough
            // nodes that the unfenced ones cannot make a quorum for an older
            // writer (n - quorum + 1), and see a shard of every stripe that
            // could ever be read (n - k + 1: a stripe hidden on the
            // unreachable nodes alone could otherwise come back later). Both
            // are at most k when m < k. With fewer than the quorum up, a
            // writer reads, and its flushes fail until nodes return.
            let needed = if writing {
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
            let cut = inner.layers[layer].cut;
            for (stripe, (holders, layout)) in held {
                if cut.is_some_and(|c| stripe > c) {
                    continue; // Written after the snapshot this layer is.
                }
                let present = holders.count_ones() as usize;
                if present < inner.k {
                    if writing {
                        if present + down >= inner.quorum {
                            return Err(VolumeError::Uncertain {
                                segment: seg.index,
                                epoch: stripe.0,
                                seq: stripe.1,
                                present,
                                down: down_names,
                            });
                        }
                        dropped.push((stripe, holders));
                    }
                    continue;
                }
                let layout = Arc::new(layout);
                for (pos, &block) in layout.blocks.iter().enumerate() {
                    if block >= inner.seg_blocks {
                        continue;
                    }
                    let loc = Loc {
                        layer: layer as u8,
                        stripe,
                        pos: pos as u32,
                    };
                    let Some(old) = state.map.insert(block, loc) else {
                        continue;
                    };
                    if old.layer != 0 || !own {
                        continue; // Only the volume's own stripes are counted.
                    }
                    if let Some(o) = state.stripes.get_mut(&(0, old.stripe)) {
                        o.live -= 1;
                    }
                    pin(&mut state, old.stripe, stripe, &cuts);
                    // Superseded only by a stripe short of its quorum's
                    // redundancy (a writer died before completing it): kept
                    // until that one is rebuilt (the next open discards it).
                    if present < inner.quorum {
                        pinned.insert(old.stripe);
                    }
                }
                state.stripes.insert(
                    (layer as u8, stripe),
                    StripeState {
                        live: layout.blocks.len() as u32,
                        layout,
                        dead_at: None,
                        data: None,
                        pinned_by: Vec::new(),
                    },
                );
            }
        }
        // The volume's own stripes without a live block, not read by a
        // snapshot, are superseded by durable ones: give their space back.
        let mut dead: Vec<Stripe> = Vec::new();
        for (&(layer, stripe), st) in state.stripes.iter_mut() {
            if layer != 0 || st.live > 0 {
                continue;
            }
            st.dead_at = Some(0);
            if pinned.contains(&stripe) {
                st.pinned_by.push(KEEP_UNTIL_REOPEN);
            }
            if st.pinned_by.is_empty() {
                dead.push(stripe);
            }
        }
        *lock(&seg) = state;
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

    /// The stripes the nodes of layer `layer`'s segment `s` hold (each with
    /// the shards present and its layout), and which nodes answered;
    /// fencing them first with this writer's epoch when `fence`.
    async fn list_segment(
        &self,
        layer: usize,
        s: usize,
        fence: bool,
    ) -> Result<(BTreeMap<Stripe, (u64, Layout)>, Vec<bool>), VolumeError> {
        let inner = &self.inner;
        let volume = inner.layers[layer].volume_id;
        let segment = s as u32;
        let mut asks: FuturesUnordered<_> = (0..inner.n)
            .map(|shard| {
                let node = self.node(layer, s, shard);
                let epoch = inner.epoch;
                async move {
                    let Some(mut client) = node.and_then(|n| n.client) else {
                        return (shard, Err(tonic::Status::unavailable("no address known")));
                    };
                    if fence {
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
                                segment = s,
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
                    let node = self
                        .node(layer, s, shard)
                        .map(|n| n.name)
                        .unwrap_or_default();
                    tracing::warn!(segment = s, shard, %node, error = %e.message(), "node unreachable while opening the volume");
                }
            }
        }
        Ok((held, reachable))
    }

    /// Whether a node's `layout` for `shard` is one this volume's writer
    /// made (the volume's code, sane rows and blocks).
    fn layout_fits(&self, layout: &Layout, shard: usize) -> bool {
        let inner = &self.inner;
        layout.data_shards as usize == inner.k
            && layout.parity_shards as usize == inner.n - inner.k
            && crate::shardlog::check_layout(layout, shard as u32).is_ok()
    }

    /// Sends a discard of `stripes` to the nodes of the volume's own
    /// segment `s` in `shards` (a bitmask); with `required`, every one must
    /// take it.
    async fn discard_on(
        &self,
        s: usize,
        shards: u64,
        stripes: Vec<StripeId>,
        required: bool,
    ) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let mut sends: FuturesUnordered<_> = (0..inner.n)
            .filter(|i| shards & (1 << i) != 0)
            .filter_map(|i| {
                let client = self.node(0, s, i)?.client?;
                let request = DiscardRequest {
                    volume: inner.id,
                    segment: s as u32,
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
        if let Some(seg) = self.segment(s) {
            let mut st = lock(&seg);
            for stripe in &dead {
                st.stripes.remove(&(0, *stripe));
            }
        }
        let volume = self.clone();
        let all = (1u64 << self.inner.n) - 1;
        tokio::spawn(async move {
            let stripes = dead.into_iter().map(stripe_id).collect();
            let _ = volume.discard_on(s, all, stripes, false).await;
        });
    }

    /// Catches up with the control plane: new placements of shards (repair,
    /// drain), a larger size (expansion), snapshots deleted (their stripes
    /// are given back) or taken without this writer.
    pub async fn refresh(&self, meta: &Meta) -> Result<Refreshed, VolumeError> {
        let inner = &self.inner;
        let _admin = inner.admin.lock().await;
        let mut out = Refreshed::default();
        let addresses = node_addresses(meta).await?;
        for layer in 0..inner.layers.len() {
            let id = inner.layers[layer].volume_id;
            let Some(record) = meta.volume_by_id(id).await? else {
                continue; // Its record is gone; keep the placement known.
            };
            out.moved += self.place_layer(layer, &record, &addresses);
            if layer == 0 && inner.layers[0].cut.is_none() && record.size > self.size() {
                self.grow(record.size, record.segment_size);
                out.grown = Some(record.size);
            }
        }
        if self.writable() {
            let wanted: BTreeSet<Stripe> =
                meta.snapshot_cuts(inner.id).await?.into_iter().collect();
            let released: Vec<Stripe> = {
                let mut cuts = lock_cuts(inner);
                let gone: Vec<Stripe> = cuts.snapshots.difference(&wanted).copied().collect();
                cuts.snapshots.extend(wanted.iter().copied());
                for cut in &gone {
                    cuts.snapshots.remove(cut);
                }
                gone.into_iter().filter(|c| !cuts.holds(*c)).collect()
            };
            out.released = released.len();
            if !released.is_empty() {
                self.release_cuts(&released);
            }
        }
        Ok(out)
    }

    /// Adds segments up to `size` (an expansion the writer learned of).
    fn grow(&self, size: u64, segment_size: u64) {
        let inner = &self.inner;
        let wanted = size.div_ceil(segment_size) as usize;
        {
            let mut segments = inner.segments.write().unwrap_or_else(|p| p.into_inner());
            for i in segments.len()..wanted {
                segments.push(Arc::new(Segment {
                    index: i as u32,
                    state: Mutex::new(SegState::default()),
                }));
            }
        }
        // The segments exist before any offset in them is accepted.
        inner.size.fetch_max(size, Ordering::SeqCst);
        tracing::info!(volume = %inner.name, size, "the volume grew");
    }

    /// Snapshots whose cuts were deleted: stripes kept only for them are
    /// given back.
    fn release_cuts(&self, released: &[Stripe]) {
        for (s, seg) in self.all_segments().iter().enumerate() {
            let dead = {
                let mut st = lock(seg);
                let through = st.acked_through();
                let mut dead = Vec::new();
                for cut in released {
                    for stripe in st.pinned.remove(cut).unwrap_or_default() {
                        if let Some(state) = st.stripes.get_mut(&(0, stripe)) {
                            state.pinned_by.retain(|c| c != cut);
                            if can_discard(state, through) {
                                dead.push(stripe);
                            }
                        }
                    }
                }
                dead
            };
            self.discard_dead(s, dead);
        }
    }

    fn block_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.size();
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
            if within == 0 && take == BLOCK {
                self.put_block(block, Arc::new(rest[..BLOCK].to_vec()))?;
            } else {
                // A partial block: read it, patch it, write it whole, all
                // under the lock: another partial write of the block must
                // read this one's result, not what was there before it.
                let _one_at_a_time = self.inner.partial.lock().await;
                let mut old = self.read(block * BLOCK as u64, BLOCK).await?;
                old[within..within + take].copy_from_slice(&rest[..take]);
                self.put_block(block, Arc::new(old))?;
            }
            at += take as u64;
            rest = &rest[take..];
        }
        self.wait_for_room().await
    }

    fn put_block(&self, block: u64, content: Arc<Vec<u8>>) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let s = (block / u64::from(inner.seg_blocks)) as usize;
        let b = (block % u64::from(inner.seg_blocks)) as u32;
        let seg = self.segment(s).ok_or(VolumeError::OutOfRange {
            offset: block * BLOCK as u64,
            len: BLOCK as u64,
            size: self.size(),
        })?;
        let sealed = {
            let mut st = lock(&seg);
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

    /// Seals up to a stripe's worth of a segment's written blocks into the
    /// next stripe: encoded, mapped (reads find it in memory until its
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
        // The id and the snapshots it follows are decided together.
        let cuts = lock_cuts(inner);
        let seq = inner.next_seq.fetch_add(1, Ordering::SeqCst);
        let stripe = (inner.epoch, seq);
        for (pos, &b) in blocks.iter().enumerate() {
            let loc = Loc {
                layer: 0,
                stripe,
                pos: pos as u32,
            };
            let Some(old) = st.map.insert(b, loc) else {
                continue;
            };
            if old.layer != 0 {
                continue; // A base's block: the base keeps it.
            }
            if let Some(o) = st.stripes.get_mut(&(0, old.stripe)) {
                o.live -= 1;
                if o.live == 0 {
                    o.dead_at = Some(seq);
                }
            }
            pin(st, old.stripe, stripe, &cuts);
        }
        drop(cuts);
        let layout = Arc::new(Layout {
            data_shards: inner.k as u32,
            parity_shards: (inner.n - inner.k) as u32,
            rows: rows as u32,
            blocks,
        });
        st.stripes.insert(
            (0, stripe),
            StripeState {
                live: layout.blocks.len() as u32,
                layout: layout.clone(),
                dead_at: None,
                data: Some(shards.clone()),
                pinned_by: Vec::new(),
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
    /// retrying the missing ones for a while after (to the shard's current
    /// node: repair may have moved it).
    async fn send(self, s: usize, sealed: Sealed) {
        let inner = &self.inner;
        let Some(seg) = self.segment(s) else { return };
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
                    let node = self.node(0, s, shard);
                    let request = AppendRequest {
                        volume: inner.id,
                        segment: seg.index,
                        shard: shard as u32,
                        stripe: Some(stripe_id(sealed.stripe)),
                        layout: Some((*sealed.layout).clone()),
                        crcs: block_crcs(&sealed.shards[shard]),
                        data: sealed.shards[shard].clone(),
                        writer_epoch: inner.epoch,
                    };
                    async move {
                        let name = node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
                        let result = match node.and_then(|n| n.client) {
                            Some(mut c) => c.append(request).await.map(|_| ()),
                            None => Err(tonic::Status::unavailable("no address known")),
                        };
                        (shard, name, result)
                    }
                })
                .collect();
            let mut errors = Vec::new();
            while let Some((shard, name, result)) = sends.next().await {
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
                    Err(e) => errors.push(format!("{name}: {}", e.message())),
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
                let mut st = lock(&seg);
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
            let mut st = lock(&seg);
            if let Some(state) = st.stripes.get_mut(&(0, sealed.stripe)) {
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
        let dead = match self.segment(s) {
            Some(seg) => {
                let mut st = lock(&seg);
                st.unacked.remove(&stripe.1);
                if st.failure.as_ref().is_some_and(|(seq, _)| *seq == stripe.1) {
                    st.failure = None;
                }
                if st.trouble.as_ref().is_some_and(|(seq, _)| *seq == stripe.1) {
                    st.trouble = None;
                }
                discardable(&st)
            }
            None => Vec::new(),
        };
        inner.changed.notify_waiters();
        self.discard_dead(s, dead);
    }

    /// Seals every segment's waiting blocks and sends them; returns the
    /// flush point: the last stripe id sealed so far (every stripe up to it
    /// must be acknowledged for what was written before to be durable),
    /// whose stripes are kept from now on until [`Cuts::drop_flush`].
    fn seal_all(&self) -> Result<Stripe, VolumeError> {
        for (s, seg) in self.all_segments().iter().enumerate() {
            let mut sealed = Vec::new();
            {
                let mut st = lock(seg);
                while !st.dirty.is_empty() {
                    sealed.push(self.seal(&mut st)?);
                }
            }
            for stripe in sealed {
                tokio::spawn(self.clone().send(s, stripe));
            }
        }
        let mut cuts = lock_cuts(&self.inner);
        let point = (
            self.inner.epoch,
            self.inner.next_seq.load(Ordering::SeqCst) - 1,
        );
        cuts.add_flush(point);
        Ok(point)
    }

    /// Makes everything written so far durable: seals what is waiting and
    /// waits for every stripe's quorum.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        if !self.writable() {
            return Ok(());
        }
        self.check_usable()?;
        let point = self.seal_all()?;
        let result = self.wait_acked(point.1).await;
        // A durable flush point is the newest a snapshot can be; the one
        // it replaces (or a failed one) keeps nothing any more.
        let released = {
            let mut cuts = lock_cuts(&self.inner);
            let done = if result.is_ok() && point > cuts.last_flush {
                std::mem::replace(&mut cuts.last_flush, point)
            } else {
                point
            };
            cuts.drop_flush(done).then_some(done)
        };
        if let Some(cut) = released {
            self.release_cuts(&[cut]);
        }
        result
    }

    /// Waits until every stripe up to `target` is acknowledged, in every
    /// segment; fails (never hangs) after the write timeout.
    async fn wait_acked(&self, target: u64) -> Result<(), VolumeError> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.options.write_timeout;
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.check_usable()?;
            let mut pending = false;
            for seg in self.all_segments() {
                let st = lock(&seg);
                if st.acked_through() < target {
                    if let Some((seq, why)) = &st.failure {
                        if *seq <= target {
                            return Err(VolumeError::NotDurable {
                                timeout: inner.options.write_timeout,
                                why: why.clone(),
                            });
                        }
                    }
                    pending = true;
                }
            }
            if !pending {
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

    /// Takes a snapshot's cut: the last flush point, whose stripes are all
    /// acknowledged (a snapshot holds what the volume's user last made
    /// durable, as a crash at this instant would). Nothing is read, written
    /// or waited for: its cost does not depend on the volume's size. Its
    /// stripes are kept from now on; the caller records the cut in the
    /// control plane, or calls [`Volume::release_cut`].
    pub fn snapshot_point(&self) -> Result<Stripe, VolumeError> {
        if !self.writable() {
            return Err(VolumeError::ReadOnly);
        }
        self.check_usable()?;
        let mut cuts = lock_cuts(&self.inner);
        let cut = cuts.last_flush;
        cuts.snapshots.insert(cut);
        Ok(cut)
    }

    /// Forgets a cut taken by [`Volume::snapshot_point`] that no snapshot
    /// record holds.
    pub fn release_cut(&self, cut: Stripe) {
        let released = {
            let mut cuts = lock_cuts(&self.inner);
            cuts.snapshots.remove(&cut);
            !cuts.holds(cut)
        };
        if released {
            self.release_cuts(&[cut]);
        }
    }

    /// Holds refreshes off while a snapshot is being recorded.
    pub async fn admin_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.admin.lock().await
    }

    /// What keeps stripes from their quorum, for an error message.
    fn quorum_trouble(&self) -> String {
        for seg in self.all_segments() {
            let st = lock(&seg);
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
        type Fetch = (usize, u8, Stripe, usize);
        let mut fetches: BTreeMap<Fetch, Vec<(u64, usize)>> = BTreeMap::new();
        let mut layouts: HashMap<(usize, u8, Stripe), Arc<Layout>> = HashMap::new();
        for block in first..=last {
            let s = (block / u64::from(inner.seg_blocks)) as usize;
            let b = (block % u64::from(inner.seg_blocks)) as u32;
            let source = match self.segment(s) {
                None => Source::Zero,
                Some(seg) => {
                    let st = lock(&seg);
                    if let Some(d) = st.dirty.get(&b) {
                        Source::Bytes(d.clone())
                    } else {
                        match st.map.get(&b).copied() {
                            None => Source::Zero,
                            Some(loc) => match st.stripes.get(&(loc.layer, loc.stripe)) {
                                None => Source::Zero,
                                Some(state) => {
                                    let (shard, row) =
                                        position(loc.pos as usize, state.layout.rows as usize);
                                    match &state.data {
                                        Some(data) => Source::InStripe(data.clone(), shard, row),
                                        None => Source::Remote(
                                            loc.layer,
                                            loc.stripe,
                                            state.layout.clone(),
                                            loc.pos,
                                        ),
                                    }
                                }
                            },
                        }
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
                Source::Remote(layer, stripe, layout, pos) => {
                    let (shard, row) = position(pos as usize, layout.rows as usize);
                    layouts.insert((s, layer, stripe), layout);
                    fetches
                        .entry((s, layer, stripe, shard))
                        .or_default()
                        .push((block_start, row));
                }
            }
        }
        let mut reads: FuturesUnordered<_> = fetches
            .into_iter()
            .map(|((s, layer, stripe, shard), blocks)| {
                let layout = layouts[&(s, layer, stripe)].clone();
                let volume = self.clone();
                async move {
                    let first_row = blocks.iter().map(|b| b.1).min().unwrap_or(0);
                    let last_row = blocks.iter().map(|b| b.1).max().unwrap_or(0);
                    let at = ShardAt {
                        layer: layer as usize,
                        s,
                        stripe,
                    };
                    let rows = volume
                        .read_rows(at, &layout, shard, first_row, last_row + 1 - first_row)
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
        at: ShardAt,
        layout: &Layout,
        shard: usize,
        first_row: usize,
        rows: usize,
    ) -> Result<Vec<u8>, VolumeError> {
        match self.fetch(at, shard, first_row, rows).await {
            Ok(data) => return Ok(data),
            Err(why) => {
                tracing::debug!(segment = at.s, shard, %why, "degraded read: rebuilding from the other shards");
                self.inner
                    .stats
                    .degraded_reads
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let block = layout
            .blocks
            .get(shard * layout.rows as usize + first_row)
            .copied()
            .unwrap_or(0);
        let mut pieces = self
            .fetch_any(at, first_row, rows, Some(shard))
            .await
            .map_err(|why| VolumeError::Unreadable {
                segment: at.s as u32,
                block,
                why,
            })?;
        self.inner.codec.reconstruct_data(&mut pieces)?;
        pieces[shard].take().ok_or_else(|| VolumeError::Unreadable {
            segment: at.s as u32,
            block,
            why: "reconstruction gave nothing".into(),
        })
    }

    /// The same rows of at least k shards of a stripe (other than `skip`),
    /// as the code's input: `None` for the shards not read.
    async fn fetch_any(
        &self,
        at: ShardAt,
        first_row: usize,
        rows: usize,
        skip: Option<usize>,
    ) -> Result<Vec<Option<Vec<u8>>>, String> {
        let inner = &self.inner;
        let mut pieces: Vec<Option<Vec<u8>>> = vec![None; inner.n];
        let mut asks: FuturesUnordered<_> = (0..inner.n)
            .filter(|&i| Some(i) != skip)
            .map(|i| async move { (i, self.fetch(at, i, first_row, rows).await) })
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
        at: ShardAt,
        shard: usize,
        first_row: usize,
        rows: usize,
    ) -> Result<Vec<u8>, String> {
        let node = self
            .node(at.layer, at.s, shard)
            .ok_or_else(|| format!("segment {} has no shard {shard}", at.s))?;
        let Some(mut client) = node.client.clone() else {
            return Err(format!("{}: no address known", node.name));
        };
        let reply = client
            .read(ReadRequest {
                volume: self.inner.layers[at.layer].volume_id,
                segment: at.s as u32,
                shard: shard as u32,
                stripe: Some(stripe_id(at.stripe)),
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
        for (s, seg) in self.all_segments().iter().enumerate() {
            let mut holders: HashMap<Stripe, u64> = HashMap::new();
            for shard in 0..inner.n {
                let Some(mut client) = self.node(0, s, shard).and_then(|n| n.client) else {
                    continue;
                };
                let request = StripesRequest {
                    volume: inner.id,
                    segment: seg.index,
                };
                if let Ok(r) = client.stripes(request).await {
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
                    .filter(|(key, state)| key.0 == 0 && state.data.is_none() && state.live > 0)
                    .map(|(key, state)| (key.1, state.layout.clone()))
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
                let at = ShardAt {
                    layer: 0,
                    s,
                    stripe,
                };
                if let Err(why) = self.rebuild_shards(at, &layout, all & !have).await {
                    tracing::debug!(segment = s, epoch = stripe.0, seq = stripe.1, %why, "cannot complete a stripe's missing shards now");
                }
            }
        }
    }

    /// Rebuilds the shards of `missing` (a bitmask) of one of the volume's
    /// own stripes from any k others and appends them to their nodes.
    async fn rebuild_shards(
        &self,
        at: ShardAt,
        layout: &Layout,
        missing: u64,
    ) -> Result<(), String> {
        let inner = &self.inner;
        let rows = layout.rows as usize;
        let mut pieces = self.fetch_any(at, 0, rows, None).await?;
        inner
            .codec
            .reconstruct(&mut pieces)
            .map_err(|e| e.to_string())?;
        for shard in (0..inner.n).filter(|i| missing & (1 << i) != 0) {
            let Some(mut client) = self.node(0, at.s, shard).and_then(|n| n.client) else {
                continue;
            };
            let Some(data) = pieces[shard].clone() else {
                continue;
            };
            // The stripe keeps its id; the fence check is this writer's.
            let request = AppendRequest {
                volume: inner.id,
                segment: at.s as u32,
                shard: shard as u32,
                stripe: Some(stripe_id(at.stripe)),
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

/// A stripe of one layer's segment.
#[derive(Clone, Copy)]
struct ShardAt {
    layer: usize,
    s: usize,
    stripe: Stripe,
}

/// A pin that no snapshot releases: a stripe superseded only by one short
/// of its quorum's redundancy is kept until the volume is opened again.
const KEEP_UNTIL_REOPEN: Stripe = (u64::MAX, u64::MAX);

/// The volume's own stripes superseded by acknowledged stripes, no longer
/// held in memory and read by no snapshot: their space can be given back.
fn discardable(st: &SegState) -> Vec<Stripe> {
    let through = st.acked_through();
    st.stripes
        .iter()
        .filter(|(key, state)| key.0 == 0 && can_discard(state, through))
        .map(|(key, _)| key.1)
        .collect()
}

/// One of the volume's own stripes can be given back: superseded by
/// stripes acknowledged through `through`, not in memory, read by no cut.
fn can_discard(state: &StripeState, through: u64) -> bool {
    state.dead_at.is_some_and(|at| at <= through)
        && state.data.is_none()
        && state.pinned_by.is_empty()
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

/// Every registered node's address by name.
async fn node_addresses(meta: &Meta) -> Result<HashMap<String, String>, VolumeError> {
    Ok(meta
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.record.name, n.record.address))
        .collect())
}

pub(crate) fn connect(address: &str, options: &VolumeOptions) -> Option<StoreClient<Channel>> {
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
