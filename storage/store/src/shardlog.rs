//! A storage node's shards, in one checksummed append-only log.
//!
//! Every shard of every stripe a node receives, and every fence, discard
//! and drop, is a record appended to the node's log (files of up to
//! [`LogOptions::file_size`] under `shards/`). One writer thread takes every
//! operation queued while the previous sync ran and writes them with one
//! write and one `fdatasync` (io_uring, or plain syscalls: the WAL's
//! [`Backend`]); an operation is answered, and becomes visible to reads,
//! only once it is durable. After a write or sync fails, the log refuses
//! every later write and says why: a failed `fdatasync` is never retried
//! as if it had succeeded.
//!
//! A record is `magic ‖ header length ‖ data length ‖ CRC-32` (16 bytes,
//! the CRC over the first 12 and the header), a `LogRecord` header, then the
//! shard's rows. Each 4 KiB block's CRC-32 travels in the header and is
//! checked on every read; a mismatch is an error, counted, never data.
//!
//! Epochs (fencing) are per volume: an append, discard or fence with an
//! epoch older than the volume's is refused, checked by the writer thread in
//! the order operations are written. Each new file starts with a checkpoint
//! of every volume's epoch and the dropped volumes, so old files can be
//! deleted without losing them. Files are deleted oldest first, once none
//! of their shards is live; discarded shards' data is freed at once by
//! punching holes.
//!
//! Recovery reads the record headers of every file (not the data). A torn
//! tail of the last file is cut; a damaged record elsewhere loses the rest
//! of that file (logged: those shards are missing, and the volume's other
//! shards rebuild them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tessera_proto::store::{
    log_record::Kind, CheckpointRecord, DiscardRecord, DropRecord, FenceRecord, Layout, LogRecord,
    ShardRecord, StripeId,
};
use tessera_storage::histogram::Histogram;
use tessera_storage::wal::io::{Backend, IoMode};

use crate::codec::{BLOCK, MAX_ROWS, MAX_SHARDS};

const MAGIC: u32 = u32::from_le_bytes(*b"TSL1");
const FRAME: usize = 16;
/// Bytes gathered into one group commit at most.
const MAX_GROUP_BYTES: usize = 64 << 20;
/// A record header larger than this is damage, not a record (a shard's
/// header is a few KiB; a checkpoint grows with the number of volumes).
const MAX_HEADER: usize = 64 << 20;
/// The largest segment-relative block number (segments are at most 1 GiB).
const MAX_BLOCK: u32 = 1 << 18;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("shard log I/O: {0}")]
    Io(#[from] io::Error),
    #[error("fenced: volume {volume:x} is at epoch {current}; epoch {given} is older")]
    Fenced {
        volume: u64,
        current: u64,
        given: u64,
    },
    #[error("volume {0:x} was deleted")]
    Dropped(u64),
    #[error(
        "no shard {shard} of stripe {epoch}/{seq} of volume {volume:x} segment {segment} here"
    )]
    NotFound {
        volume: u64,
        segment: u32,
        shard: u32,
        epoch: u64,
        seq: u64,
    },
    #[error("checksum mismatch in {count} block(s) of shard {shard} of stripe {epoch}/{seq} of volume {volume:x} segment {segment}")]
    Checksum {
        volume: u64,
        segment: u32,
        shard: u32,
        epoch: u64,
        seq: u64,
        count: usize,
    },
    #[error("bad request: {0}")]
    Invalid(String),
    #[error("the shard log refuses writes after a failed write or sync: {0}")]
    Failed(String),
    #[error("the shard log is closed")]
    Closed,
}

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub file_size: u64,
    pub io_mode: IoMode,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            file_size: 256 << 20,
            io_mode: IoMode::Auto,
        }
    }
}

/// A stripe's place in a segment's log, ordered as writers order them.
pub type Stripe = (u64, u64);

pub fn stripe_of(id: Option<&StripeId>) -> Stripe {
    id.map_or((0, 0), |s| (s.epoch, s.seq))
}

pub fn stripe_id(s: Stripe) -> StripeId {
    StripeId {
        epoch: s.0,
        seq: s.1,
    }
}

/// Where a shard's rows are.
#[derive(Clone)]
struct Loc {
    file: u64,
    data_offset: u64,
    layout: Arc<Layout>,
    crcs: Arc<Vec<u32>>,
}

/// A shard held here, as [`ShardLog::stripes`] lists it.
#[derive(Debug, Clone)]
pub struct HeldShard {
    pub shard: u32,
    pub stripe: Stripe,
    pub layout: Layout,
}

#[derive(Default)]
struct VolState {
    epoch: u64,
    /// segment → (stripe, shard) → location
    segments: HashMap<u32, BTreeMap<(Stripe, u32), Loc>>,
}

struct FileState {
    file: Arc<File>,
    /// Shards in it not yet discarded.
    live: usize,
}

#[derive(Default)]
struct State {
    volumes: HashMap<u64, VolState>,
    dropped: HashSet<u64>,
    files: BTreeMap<u64, FileState>,
}

impl State {
    fn epoch(&self, volume: u64) -> u64 {
        self.volumes.get(&volume).map_or(0, |v| v.epoch)
    }

    fn checkpoint(&self) -> CheckpointRecord {
        CheckpointRecord {
            epochs: self
                .volumes
                .iter()
                .filter(|(_, v)| v.epoch > 0)
                .map(|(&volume, v)| FenceRecord {
                    volume,
                    epoch: v.epoch,
                })
                .collect(),
            dropped: self
                .dropped
                .iter()
                .map(|&volume| DropRecord { volume })
                .collect(),
        }
    }

    /// Applies a record found (at recovery) or written; returns the data
    /// regions it freed, to punch.
    fn apply(&mut self, record: &Kind, file: u64, data_offset: u64) -> Vec<(Arc<File>, u64, u64)> {
        let mut freed = Vec::new();
        match record {
            Kind::Shard(s) => {
                let Some(layout) = s.layout.clone() else {
                    return freed;
                };
                let loc = Loc {
                    file,
                    data_offset,
                    layout: Arc::new(layout),
                    crcs: Arc::new(s.crcs.clone()),
                };
                let segment = self
                    .volumes
                    .entry(s.volume)
                    .or_default()
                    .segments
                    .entry(s.segment)
                    .or_default();
                let replaced = segment.insert((stripe_of(s.stripe.as_ref()), s.shard), loc);
                if let Some(f) = self.files.get_mut(&file) {
                    f.live += 1;
                }
                if let Some(old) = replaced {
                    freed.extend(self.release(&old));
                }
            }
            Kind::Fence(f) => {
                let v = self.volumes.entry(f.volume).or_default();
                v.epoch = v.epoch.max(f.epoch);
            }
            Kind::Discard(d) => {
                let gone: Vec<Loc> = match self
                    .volumes
                    .get_mut(&d.volume)
                    .and_then(|v| v.segments.get_mut(&d.segment))
                {
                    Some(segment) => {
                        let wanted: HashSet<Stripe> =
                            d.stripes.iter().map(|s| (s.epoch, s.seq)).collect();
                        let keys: Vec<(Stripe, u32)> = segment
                            .keys()
                            .filter(|(stripe, shard)| {
                                wanted.contains(stripe) && d.shard.is_none_or(|s| s == *shard)
                            })
                            .copied()
                            .collect();
                        keys.iter().filter_map(|k| segment.remove(k)).collect()
                    }
                    None => Vec::new(),
                };
                for loc in gone {
                    freed.extend(self.release(&loc));
                }
            }
            Kind::Drop(d) => {
                if let Some(v) = self.volumes.remove(&d.volume) {
                    for loc in v.segments.into_values().flat_map(|s| s.into_values()) {
                        freed.extend(self.release(&loc));
                    }
                }
                self.dropped.insert(d.volume);
            }
            Kind::Checkpoint(c) => {
                for f in &c.epochs {
                    let v = self.volumes.entry(f.volume).or_default();
                    v.epoch = v.epoch.max(f.epoch);
                }
                self.dropped.extend(c.dropped.iter().map(|d| d.volume));
            }
        }
        freed
    }

    /// Forgets the shards in file `last` whose rows do not match their
    /// checksums; returns them, and their regions to punch. A power loss
    /// during the last group write can keep a record's header but lose
    /// pages of its rows, and the header scan cannot tell: held on, such a
    /// shard would count toward its stripe (a stripe that never reached its
    /// quorum could then look readable and hide the older, acknowledged
    /// version of its blocks). Forgotten, it is missing, and the writer or
    /// repair rebuilds it. Only the newest file with shard records can hold
    /// an unsynced one (a group write never spans files, and a sync covers
    /// everything written before it); damage elsewhere is the scrubber's.
    #[allow(clippy::type_complexity)]
    fn forget_torn_shards(
        &mut self,
        last: u64,
    ) -> io::Result<(Vec<(u64, u32, (Stripe, u32))>, Vec<(Arc<File>, u64, u64)>)> {
        let Some(file) = self.files.get(&last).map(|f| f.file.clone()) else {
            return Ok(Default::default());
        };
        let mut torn = Vec::new();
        let mut data = Vec::new();
        for (&volume, vol) in &self.volumes {
            for (&segment, shards) in &vol.segments {
                for (&key, loc) in shards.iter().filter(|(_, loc)| loc.file == last) {
                    data.resize(loc.layout.rows as usize * BLOCK, 0);
                    file.read_exact_at(&mut data, loc.data_offset)?;
                    let intact = data
                        .chunks(BLOCK)
                        .zip(loc.crcs.iter())
                        .all(|(block, &crc)| crc32fast::hash(block) == crc);
                    if !intact {
                        torn.push((volume, segment, key));
                    }
                }
            }
        }
        let mut freed = Vec::new();
        for &(volume, segment, key) in &torn {
            let loc = self
                .volumes
                .get_mut(&volume)
                .and_then(|v| v.segments.get_mut(&segment))
                .and_then(|s| s.remove(&key));
            if let Some(loc) = loc {
                tracing::warn!(volume = %format!("{volume:x}"), segment, shard = key.1, epoch = (key.0).0, seq = (key.0).1, "shard log: a shard torn by a crash in its last write is forgotten (rebuilt from the others)");
                freed.extend(self.release(&loc));
            }
        }
        Ok((torn, freed))
    }

    /// A shard no longer held: its file has one live shard less; returns its
    /// data region to punch.
    fn release(&mut self, loc: &Loc) -> Option<(Arc<File>, u64, u64)> {
        let f = self.files.get_mut(&loc.file)?;
        f.live = f.live.saturating_sub(1);
        let len = u64::from(loc.layout.rows) * BLOCK as u64;
        Some((f.file.clone(), loc.data_offset, len))
    }
}

/// Counters for `/metrics`.
pub struct LogStats {
    pub appends: AtomicU64,
    pub append_bytes: AtomicU64,
    pub syncs: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Blocks whose checksum did not match when read.
    pub checksum_failures: AtomicU64,
    pub files_deleted: AtomicU64,
    /// How long each group commit's write + `fdatasync` took.
    pub sync_seconds: Histogram,
}

impl Default for LogStats {
    fn default() -> Self {
        LogStats {
            appends: AtomicU64::new(0),
            append_bytes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            checksum_failures: AtomicU64::new(0),
            files_deleted: AtomicU64::new(0),
            sync_seconds: Histogram::disk_latency(),
        }
    }
}

type Reply = std::sync::mpsc::SyncSender<Result<(), LogError>>;

enum Op {
    Append {
        record: ShardRecord,
        data: Bytes,
        /// The epoch the fence check applies to.
        writer_epoch: u64,
        reply: Reply,
    },
    Fence {
        volume: u64,
        epoch: u64,
        reply: Reply,
    },
    Discard {
        record: DiscardRecord,
        epoch: u64,
        reply: Reply,
    },
    Drop {
        volume: u64,
        reply: Reply,
    },
}

struct Inner {
    dir: PathBuf,
    state: Mutex<State>,
    stats: LogStats,
}

/// The node's shard log (cheap to clone).
#[derive(Clone)]
pub struct ShardLog {
    inner: Arc<Inner>,
    ops: mpsc::Sender<Op>,
}

fn file_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.log"))
}

fn list_files(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(".log") {
            if let Ok(n) = u64::from_str_radix(hex, 16) {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on an open descriptor; failure only leaves space
    // allocated.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot punch a hole for freed shard data");
    }
}

/// Checks that a shard's layout is one a writer makes: a valid code, the
/// shard one of its shards, a sane number of rows, and as many distinct
/// blocks as the data shards' rows hold (so its header stays small).
pub fn check_layout(layout: &Layout, shard: u32) -> Result<(), LogError> {
    let (k, m, rows) = (
        layout.data_shards as usize,
        layout.parity_shards as usize,
        layout.rows as usize,
    );
    let bad = |why: String| Err(LogError::Invalid(format!("bad stripe layout: {why}")));
    if k == 0 || m == 0 || k + m > MAX_SHARDS {
        return bad(format!("code {k}+{m}"));
    }
    if shard as usize >= k + m {
        return bad(format!("shard {shard} of a {k}+{m} code"));
    }
    if rows == 0 || rows > MAX_ROWS {
        return bad(format!("{rows} rows (1 to {MAX_ROWS})"));
    }
    // Writers use the fewest rows that hold the blocks: ceil(n / k).
    let n = layout.blocks.len();
    if n == 0 || n > k * rows || n <= k * (rows - 1) {
        return bad(format!("{n} blocks in {k} data shards of {rows} rows"));
    }
    let mut blocks = layout.blocks.clone();
    blocks.sort_unstable();
    blocks.dedup();
    if blocks.len() != n || blocks.last().is_some_and(|&b| b >= MAX_BLOCK) {
        return bad("repeated or out-of-range block numbers".into());
    }
    Ok(())
}

/// Appends the framed `record` (and `data`) to `out`; returns the offset of
/// the data within `out`.
fn encode(record: &LogRecord, data: &[u8], out: &mut Vec<u8>) -> usize {
    let header = record.encode_to_vec();
    let mut frame = Vec::with_capacity(FRAME);
    frame.extend_from_slice(&MAGIC.to_le_bytes());
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame);
    crc.update(&header);
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&frame);
    out.extend_from_slice(&header);
    let at = out.len();
    out.extend_from_slice(data);
    at
}

/// Whether a good record frame starts anywhere in `[from, len)` of `file`.
fn valid_frame_after(file: &File, from: u64, len: u64) -> io::Result<bool> {
    const CHUNK: u64 = 1 << 20;
    let magic = MAGIC.to_le_bytes();
    let mut at = from;
    while at < len {
        let size = (CHUNK + FRAME as u64).min(len - at) as usize;
        let mut buf = vec![0u8; size];
        file.read_exact_at(&mut buf, at)?;
        let starts = buf
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i);
        for i in starts {
            if let Scanned::Record { .. } = scan_at(file, at + i as u64, len)? {
                return Ok(true);
            }
        }
        at += CHUNK;
    }
    Ok(false)
}

/// What is at `offset` of a log file.
enum Scanned {
    Record {
        record: LogRecord,
        data_offset: u64,
        end: u64,
    },
    /// Nothing written here (end of the file, or zeros).
    End,
    Damaged(String),
}

fn scan_at(file: &File, offset: u64, len: u64) -> io::Result<Scanned> {
    if offset + FRAME as u64 > len {
        return Ok(if offset == len {
            Scanned::End
        } else {
            Scanned::Damaged("a record frame cut short".into())
        });
    }
    let mut frame = [0u8; FRAME];
    file.read_exact_at(&mut frame, offset)?;
    if frame.iter().all(|&b| b == 0) {
        return Ok(Scanned::End);
    }
    let word = |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    if word(0) != MAGIC {
        return Ok(Scanned::Damaged("bad record magic".into()));
    }
    let (header_len, data_len, crc) = (word(4) as usize, word(8) as u64, word(12));
    let header_at = offset + FRAME as u64;
    if header_len > MAX_HEADER || header_at + header_len as u64 + data_len > len {
        return Ok(Scanned::Damaged(
            "a record runs past the end of its file".into(),
        ));
    }
    let mut header = vec![0u8; header_len];
    file.read_exact_at(&mut header, header_at)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[..12]);
    hasher.update(&header);
    if hasher.finalize() != crc {
        return Ok(Scanned::Damaged("record header checksum mismatch".into()));
    }
    let record = match LogRecord::decode(header.as_slice()) {
        Ok(r) => r,
        Err(e) => return Ok(Scanned::Damaged(format!("undecodable record header: {e}"))),
    };
    let data_offset = header_at + header_len as u64;
    Ok(Scanned::Record {
        record,
        data_offset,
        end: data_offset + data_len,
    })
}

impl ShardLog {
    /// Opens (recovering) the log in `dir`, created if missing.
    pub fn open(dir: &Path, options: LogOptions) -> Result<ShardLog, LogError> {
        std::fs::create_dir_all(dir)?;
        let mut state = State::default();
        let numbers = list_files(dir)?;
        let mut punched = Vec::new();
        // The newest file with shard records: the only one a crash can
        // have left a torn shard in (see `forget_torn_shards`).
        let mut last_with_shards = None;
        for (i, &n) in numbers.iter().enumerate() {
            let path = file_path(dir, n);
            let file = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
            let len = file.metadata()?.len();
            state.files.insert(
                n,
                FileState {
                    file: file.clone(),
                    live: 0,
                },
            );
            let mut offset = 0;
            let stop = loop {
                match scan_at(&file, offset, len)? {
                    Scanned::Record {
                        record,
                        data_offset,
                        end,
                    } => {
                        if let Some(kind) = &record.kind {
                            if matches!(kind, Kind::Shard(_)) {
                                last_with_shards = Some(n);
                            }
                            punched.extend(state.apply(kind, n, data_offset));
                        }
                        offset = end;
                    }
                    Scanned::End => break None,
                    Scanned::Damaged(why) => break Some(why),
                }
            };
            let last = i + 1 == numbers.len();
            if let Some(why) = stop {
                // Only a torn last write may be cut: if any good record
                // follows, this is damage, and what follows stays on disk.
                if last && !valid_frame_after(&file, offset + 1, len)? {
                    tracing::warn!(file = %path.display(), offset, %why, "shard log: a torn last write was cut off");
                    file.set_len(offset)?;
                    file.sync_all()?;
                } else {
                    tracing::error!(file = %path.display(), offset, %why, "shard log: damaged record; the shards after it in this file are lost here (the volume's other shards rebuild them)");
                }
            }
        }
        let (torn, freed) = match last_with_shards {
            Some(n) => state.forget_torn_shards(n)?,
            None => Default::default(),
        };
        punched.extend(freed);
        // Discards found after their shards: free those regions again (a
        // crash may have come between the discard and the punch).
        for (file, offset, len) in punched {
            punch(&file, offset, len);
        }
        // Writing goes on in a new file, which starts with a checkpoint of
        // the recovered epochs: never after a damaged or stale tail, and
        // never in a file whose own checkpoint a crash may have lost.
        let current = numbers.last().map_or(0, |&n| n + 1);
        let file = Self::create_file(dir, current, &state)?;
        let offset = file.metadata()?.len();
        state.files.insert(
            current,
            FileState {
                file: Arc::new(file),
                live: 0,
            },
        );
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            stats: LogStats::default(),
        });
        let backend = Backend::new(options.io_mode)?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            inner: inner.clone(),
            backend,
            current,
            offset,
            file_size: options.file_size,
            failed: None,
        };
        if tessera_storage::failpoint::is_on(UNSYNCED_LOST) {
            // The new file is synced: a kill before the first write loses
            // nothing but what that write adds.
            writer.note_synced_end(offset)?;
        }
        std::thread::Builder::new()
            .name("shard-log".into())
            .spawn(move || writer.run(rx))?;
        let log = ShardLog { inner, ops: tx };
        // Torn shards stay forgotten once shards are written after them:
        // until then, the next open checks the same file again.
        for (volume, segment, (stripe, shard)) in torn {
            let epoch = log.epoch(volume);
            log.discard(volume, segment, epoch, vec![stripe_id(stripe)], Some(shard))?;
        }
        log.delete_dead_files();
        Ok(log)
    }

    /// A new log file `n`, starting with a checkpoint of `state`, durable
    /// with its directory entry.
    fn create_file(dir: &Path, n: u64, state: &State) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(file_path(dir, n))?;
        let mut buf = Vec::new();
        let record = LogRecord {
            kind: Some(Kind::Checkpoint(state.checkpoint())),
        };
        encode(&record, &[], &mut buf);
        file.write_all_at(&buf, 0)?;
        file.sync_all()?;
        sync_dir(dir)?;
        Ok(file)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> &LogStats {
        &self.inner.stats
    }

    fn submit(&self, op: impl FnOnce(Reply) -> Op) -> Result<(), LogError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.ops.send(op(tx)).map_err(|_| LogError::Closed)?;
        rx.recv().unwrap_or(Err(LogError::Closed))
    }

    /// Appends one shard of a stripe, durably, for a writer at
    /// `writer_epoch` (0: the stripe's own). The data's checksums must match
    /// `record.crcs`, one per block.
    pub fn append(
        &self,
        record: ShardRecord,
        data: Bytes,
        writer_epoch: u64,
    ) -> Result<(), LogError> {
        let layout = record
            .layout
            .as_ref()
            .ok_or_else(|| LogError::Invalid("a shard without its layout".into()))?;
        check_layout(layout, record.shard)?;
        let rows = layout.rows as usize;
        if data.len() != rows * BLOCK || record.crcs.len() != rows {
            return Err(LogError::Invalid(format!(
                "{} bytes and {} checksums for {rows} rows",
                data.len(),
                record.crcs.len()
            )));
        }
        let bad = data
            .chunks(BLOCK)
            .zip(&record.crcs)
            .filter(|(block, crc)| crc32fast::hash(block) != **crc)
            .count();
        if bad > 0 {
            self.inner
                .stats
                .checksum_failures
                .fetch_add(bad as u64, Ordering::Relaxed);
            return Err(LogError::Checksum {
                volume: record.volume,
                segment: record.segment,
                shard: record.shard,
                epoch: stripe_of(record.stripe.as_ref()).0,
                seq: stripe_of(record.stripe.as_ref()).1,
                count: bad,
            });
        }
        let writer_epoch = writer_epoch.max(stripe_of(record.stripe.as_ref()).0);
        self.submit(|reply| Op::Append {
            record,
            data,
            writer_epoch,
            reply,
        })
    }

    /// Raises the volume's epoch to at least `epoch`; returns it.
    pub fn fence(&self, volume: u64, epoch: u64) -> Result<u64, LogError> {
        self.submit(|reply| Op::Fence {
            volume,
            epoch,
            reply,
        })?;
        Ok(self.lock().epoch(volume))
    }

    /// Forgets `stripes` of a segment (asked by a writer at `epoch`); of
    /// one shard only, or all shards held.
    pub fn discard(
        &self,
        volume: u64,
        segment: u32,
        epoch: u64,
        stripes: Vec<StripeId>,
        shard: Option<u32>,
    ) -> Result<(), LogError> {
        let record = DiscardRecord {
            volume,
            segment,
            stripes,
            shard,
        };
        self.submit(|reply| Op::Discard {
            record,
            epoch,
            reply,
        })?;
        self.delete_dead_files();
        Ok(())
    }

    /// Forgets every shard of a deleted volume.
    pub fn drop_volume(&self, volume: u64) -> Result<(), LogError> {
        if self.lock().dropped.contains(&volume) {
            return Ok(());
        }
        self.submit(|reply| Op::Drop { volume, reply })?;
        self.delete_dead_files();
        Ok(())
    }

    /// The volume's epoch here.
    pub fn epoch(&self, volume: u64) -> u64 {
        self.lock().epoch(volume)
    }

    /// Every volume this node holds shards of.
    pub fn volumes(&self) -> Vec<u64> {
        self.lock()
            .volumes
            .iter()
            .filter(|(_, v)| v.segments.values().any(|s| !s.is_empty()))
            .map(|(&id, _)| id)
            .collect()
    }

    /// The segments of a volume this node holds shards of.
    pub fn segments(&self, volume: u64) -> Vec<u32> {
        let state = self.lock();
        let mut out: Vec<u32> = state
            .volumes
            .get(&volume)
            .map(|v| {
                v.segments
                    .iter()
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(&n, _)| n)
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable();
        out
    }

    /// The shards held of a volume segment, in stripe order.
    pub fn stripes(&self, volume: u64, segment: u32) -> Vec<HeldShard> {
        let state = self.lock();
        let Some(segment) = state
            .volumes
            .get(&volume)
            .and_then(|v| v.segments.get(&segment))
        else {
            return Vec::new();
        };
        segment
            .iter()
            .map(|(&(stripe, shard), loc)| HeldShard {
                shard,
                stripe,
                layout: (*loc.layout).clone(),
            })
            .collect()
    }

    /// Reads `rows` rows from `first_row` of a shard, each block's checksum
    /// verified; returns the data and the blocks' checksums.
    pub fn read(
        &self,
        volume: u64,
        segment: u32,
        shard: u32,
        stripe: Stripe,
        first_row: u32,
        rows: u32,
    ) -> Result<(Vec<u8>, Vec<u32>), LogError> {
        let not_found = || LogError::NotFound {
            volume,
            segment,
            shard,
            epoch: stripe.0,
            seq: stripe.1,
        };
        let (file, loc) = {
            let state = self.lock();
            let loc = state
                .volumes
                .get(&volume)
                .and_then(|v| v.segments.get(&segment))
                .and_then(|s| s.get(&(stripe, shard)))
                .cloned()
                .ok_or_else(not_found)?;
            let file = state
                .files
                .get(&loc.file)
                .map(|f| f.file.clone())
                .ok_or_else(not_found)?;
            (file, loc)
        };
        let end = first_row
            .checked_add(rows)
            .filter(|&e| e <= loc.layout.rows && rows > 0);
        if end.is_none() {
            return Err(LogError::Invalid(format!(
                "rows {first_row}+{rows} of a shard of {} rows",
                loc.layout.rows
            )));
        }
        if tessera_storage::failpoint::is_on("shard-read-eio") {
            // A disk that fails reads: the client must rebuild the rows
            // from the other shards.
            return Err(LogError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        let mut data = vec![0u8; rows as usize * BLOCK];
        file.read_exact_at(
            &mut data,
            loc.data_offset + u64::from(first_row) * BLOCK as u64,
        )?;
        let crcs = loc.crcs[first_row as usize..(first_row + rows) as usize].to_vec();
        let bad = data
            .chunks(BLOCK)
            .zip(&crcs)
            .filter(|(block, crc)| crc32fast::hash(block) != **crc)
            .count();
        let stats = &self.inner.stats;
        stats.reads.fetch_add(1, Ordering::Relaxed);
        if bad > 0 {
            stats
                .checksum_failures
                .fetch_add(bad as u64, Ordering::Relaxed);
            tracing::warn!(volume = %format!("{volume:x}"), segment, shard, epoch = stripe.0, seq = stripe.1, blocks = bad, "checksum mismatch on read: answered as an error");
            return Err(LogError::Checksum {
                volume,
                segment,
                shard,
                epoch: stripe.0,
                seq: stripe.1,
                count: bad,
            });
        }
        stats
            .read_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok((data, crcs))
    }

    /// Reads a whole shard and counts its blocks whose checksum does not
    /// match (a scrub): `(blocks, bad)`.
    pub fn verify(
        &self,
        volume: u64,
        segment: u32,
        shard: u32,
        stripe: Stripe,
    ) -> Result<(u64, u64), LogError> {
        let (file, loc) = {
            let state = self.lock();
            let Some(loc) = state
                .volumes
                .get(&volume)
                .and_then(|v| v.segments.get(&segment))
                .and_then(|s| s.get(&(stripe, shard)))
                .cloned()
            else {
                return Ok((0, 0)); // Discarded meanwhile.
            };
            let Some(file) = state.files.get(&loc.file).map(|f| f.file.clone()) else {
                return Ok((0, 0));
            };
            (file, loc)
        };
        let mut data = vec![0u8; loc.layout.rows as usize * BLOCK];
        file.read_exact_at(&mut data, loc.data_offset)?;
        let bad = data
            .chunks(BLOCK)
            .zip(loc.crcs.iter())
            .filter(|(block, crc)| crc32fast::hash(block) != **crc)
            .count() as u64;
        if bad > 0 {
            self.inner
                .stats
                .checksum_failures
                .fetch_add(bad, Ordering::Relaxed);
        }
        Ok((u64::from(loc.layout.rows), bad))
    }

    /// Bytes the log occupies on disk (holes of freed shards excluded).
    pub fn used_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let files: Vec<Arc<File>> = self.lock().files.values().map(|f| f.file.clone()).collect();
        files
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Deletes log files from the oldest while none of their shards is live
    /// (never the one being written, which is the newest). Oldest first, so
    /// a discard or drop is never deleted before the shards it removed.
    fn delete_dead_files(&self) {
        let mut state = self.lock();
        while state.files.len() > 1 {
            let Some((&n, f)) = state.files.iter().next() else {
                break;
            };
            if f.live > 0 {
                break;
            }
            state.files.remove(&n);
            match std::fs::remove_file(file_path(&self.inner.dir, n)) {
                Ok(()) => {
                    self.inner
                        .stats
                        .files_deleted
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(file = n, error = %e, "cannot delete a dead shard log file")
                }
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    inner: Arc<Inner>,
    backend: Backend,
    current: u64,
    offset: u64,
    file_size: u64,
    /// Set by the first write or sync failure: everything after it fails.
    failed: Option<String>,
}

/// One operation of a group, checked and encoded.
struct Staged {
    record: Kind,
    /// Offset of its data within the group's buffer.
    data_at: usize,
    reply: Reply,
}

impl Writer {
    fn run(mut self, ops: mpsc::Receiver<Op>) {
        while let Ok(first) = ops.recv() {
            let mut group = vec![first];
            let mut bytes = 0usize;
            while bytes < MAX_GROUP_BYTES {
                match ops.try_recv() {
                    Ok(op) => {
                        if let Op::Append { data, .. } = &op {
                            bytes += data.len();
                        }
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.handle(group);
        }
    }

    fn handle(&mut self, group: Vec<Op>) {
        if let Some(why) = &self.failed {
            for op in group {
                let _ = reply_of(op).send(Err(LogError::Failed(why.clone())));
            }
            return;
        }
        // Check every operation against the epochs as they stand after the
        // ones before it in the group; encode the ones that pass.
        let mut buf = Vec::new();
        let mut staged = Vec::new();
        {
            let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut epochs: HashMap<u64, u64> = HashMap::new();
            let mut dropped: HashSet<u64> = HashSet::new();
            for op in group {
                let epoch_of = |epochs: &HashMap<u64, u64>, v: u64| {
                    epochs.get(&v).copied().unwrap_or(state.epoch(v))
                };
                let is_dropped = |dropped: &HashSet<u64>, v: u64| {
                    dropped.contains(&v) || state.dropped.contains(&v)
                };
                let (kind, data, reply, check): (Kind, Bytes, Reply, Result<(), LogError>) =
                    match op {
                        Op::Append {
                            record,
                            data,
                            writer_epoch,
                            reply,
                        } => {
                            let given = writer_epoch;
                            let current = epoch_of(&epochs, record.volume);
                            let check = if is_dropped(&dropped, record.volume) {
                                Err(LogError::Dropped(record.volume))
                            } else if given < current {
                                Err(LogError::Fenced {
                                    volume: record.volume,
                                    current,
                                    given,
                                })
                            } else {
                                if given > current {
                                    epochs.insert(record.volume, given);
                                }
                                Ok(())
                            };
                            (Kind::Shard(record), data, reply, check)
                        }
                        Op::Fence {
                            volume,
                            epoch,
                            reply,
                        } => {
                            let current = epoch_of(&epochs, volume);
                            let check = if is_dropped(&dropped, volume) {
                                Err(LogError::Dropped(volume))
                            } else {
                                epochs.insert(volume, epoch.max(current));
                                Ok(())
                            };
                            (
                                Kind::Fence(FenceRecord {
                                    volume,
                                    epoch: epoch.max(current),
                                }),
                                Bytes::new(),
                                reply,
                                check,
                            )
                        }
                        Op::Discard {
                            record,
                            epoch,
                            reply,
                        } => {
                            let current = epoch_of(&epochs, record.volume);
                            let check = if epoch < current {
                                Err(LogError::Fenced {
                                    volume: record.volume,
                                    current,
                                    given: epoch,
                                })
                            } else {
                                Ok(())
                            };
                            (Kind::Discard(record), Bytes::new(), reply, check)
                        }
                        Op::Drop { volume, reply } => {
                            dropped.insert(volume);
                            (
                                Kind::Drop(DropRecord { volume }),
                                Bytes::new(),
                                reply,
                                Ok(()),
                            )
                        }
                    };
                match check {
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                    Ok(()) => {
                        let data_at = encode(
                            &LogRecord {
                                kind: Some(kind.clone()),
                            },
                            &data,
                            &mut buf,
                        );
                        staged.push(Staged {
                            record: kind,
                            data_at,
                            reply,
                        });
                    }
                }
            }
        }
        if staged.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let written = self.write(&buf);
        match written {
            Err(e) => {
                let why = e.to_string();
                tracing::error!(error = %why, "shard log write failed; refusing every later write");
                self.failed = Some(why.clone());
                for s in staged {
                    let _ = s.reply.send(Err(LogError::Failed(why.clone())));
                }
            }
            Ok((file, base)) => {
                let stats = &self.inner.stats;
                stats.sync_seconds.observe(started.elapsed());
                stats.syncs.fetch_add(1, Ordering::Relaxed);
                stats
                    .append_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                let mut freed = Vec::new();
                {
                    let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                    for s in &staged {
                        if matches!(s.record, Kind::Shard(_)) {
                            stats.appends.fetch_add(1, Ordering::Relaxed);
                        }
                        freed.extend(state.apply(&s.record, file, base + s.data_at as u64));
                    }
                }
                for (f, offset, len) in freed {
                    punch(&f, offset, len);
                }
                for s in staged {
                    let _ = s.reply.send(Ok(()));
                }
            }
        }
    }

    /// Writes `buf` durably at the end of the current file (rolling to a
    /// new one first when it is full); returns the file and the offset.
    fn write(&mut self, buf: &[u8]) -> io::Result<(u64, u64)> {
        if self.offset > 0 && self.offset + buf.len() as u64 > self.file_size {
            let next = self.current + 1;
            let file = {
                let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                ShardLog::create_file(&self.inner.dir, next, &state)?
            };
            let len = file.metadata()?.len();
            self.inner
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .files
                .insert(
                    next,
                    FileState {
                        file: Arc::new(file),
                        live: 0,
                    },
                );
            self.current = next;
            self.offset = len;
            if tessera_storage::failpoint::is_on(UNSYNCED_LOST) {
                // The new file's header is synced: nothing of the old
                // file's is unsynced any more.
                self.note_synced_end(len)?;
            }
        }
        let file = {
            let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state
                .files
                .get(&self.current)
                .map(|f| f.file.clone())
                .ok_or_else(|| io::Error::other("the current shard log file is gone"))?
        };
        if tessera_storage::failpoint::is_on("shard-log-sync-fails") {
            return Err(io::Error::other(
                "fdatasync failed (failpoint shard-log-sync-fails)",
            ));
        }
        if tessera_storage::failpoint::is_on("shard-log-enospc") {
            // A full disk: the write fails before any byte lands.
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let at = self.offset;
        if tessera_storage::failpoint::is_on(UNSYNCED_LOST) {
            self.write_then_sync_slowly(&file, at, buf)?;
        } else {
            self.backend.write_durably(&file, at, buf)?;
        }
        self.offset += buf.len() as u64;
        Ok((self.current, at))
    }

    /// Failpoint `shard-log-unsynced-writes-lost`: the write and its sync
    /// are separate calls with 20 ms between them, so a SIGKILL often finds
    /// written but unsynced bytes, and after every sync the synced end of
    /// the file is noted in [`SYNCED_END_FILE`] (page cache only: it
    /// survives the kill). A harness then plays a power loss: it zeroes
    /// what lies past the noted end before restarting the node, which must
    /// still have every write it acknowledged.
    fn write_then_sync_slowly(&mut self, file: &File, at: u64, buf: &[u8]) -> io::Result<()> {
        file.write_all_at(buf, at)?;
        std::thread::sleep(Duration::from_millis(20));
        file.sync_data()?;
        self.note_synced_end(at + buf.len() as u64)
    }

    /// Notes `end` as the synced end of the current file (see
    /// [`Writer::write_then_sync_slowly`]); replaced whole by a rename, so
    /// a kill never leaves half a note.
    fn note_synced_end(&self, end: u64) -> io::Result<()> {
        let path = file_path(&self.inner.dir, self.current);
        let note = self.inner.dir.join(SYNCED_END_FILE);
        let tmp = note.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {end}\n", path.display()))?;
        std::fs::rename(&tmp, &note)
    }
}

/// The failpoint that simulates a power loss's lost unsynced writes.
const UNSYNCED_LOST: &str = "shard-log-unsynced-writes-lost";
/// Where that failpoint notes the synced end of the current log file:
/// `<path> <offset>`.
pub const SYNCED_END_FILE: &str = "synced-end.failpoint";

fn reply_of(op: Op) -> Reply {
    match op {
        Op::Append { reply, .. }
        | Op::Fence { reply, .. }
        | Op::Discard { reply, .. }
        | Op::Drop { reply, .. } => reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(rows: u32) -> Layout {
        Layout {
            data_shards: 4,
            parity_shards: 2,
            rows,
            blocks: (0..rows * 4).collect(),
        }
    }

    fn shard(
        volume: u64,
        segment: u32,
        shard: u32,
        stripe: Stripe,
        fill: u8,
    ) -> (ShardRecord, Bytes) {
        let data = vec![fill; 2 * BLOCK];
        let record = ShardRecord {
            volume,
            segment,
            shard,
            stripe: Some(stripe_id(stripe)),
            layout: Some(layout(2)),
            crcs: crate::codec::block_crcs(&data),
        };
        (record, Bytes::from(data))
    }

    fn options(file_size: u64) -> LogOptions {
        LogOptions {
            file_size,
            io_mode: IoMode::from_env().ok().flatten().unwrap_or(IoMode::Auto),
        }
    }

    #[test]
    fn shards_survive_reopen_and_fences_refuse_older_epochs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
            for seq in 0..20 {
                let (r, d) = shard(7, 0, 1, (1, seq), seq as u8);
                log.append(r, d, 0).unwrap();
            }
            assert_eq!(log.fence(7, 3).unwrap(), 3);
            let (r, d) = shard(7, 0, 1, (2, 99), 1);
            assert!(matches!(
                log.append(r, d, 0),
                Err(LogError::Fenced {
                    current: 3,
                    given: 2,
                    ..
                })
            ));
            let (data, _) = log.read(7, 0, 1, (1, 5), 1, 1).unwrap();
            assert_eq!(data, vec![5u8; BLOCK]);
        }
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        assert_eq!(log.epoch(7), 3, "the fence is durable");
        assert_eq!(log.stripes(7, 0).len(), 20);
        let (data, _) = log.read(7, 0, 1, (1, 19), 0, 2).unwrap();
        assert_eq!(data, vec![19u8; 2 * BLOCK]);
        let (r, d) = shard(7, 0, 1, (1, 100), 1);
        assert!(matches!(log.append(r, d, 0), Err(LogError::Fenced { .. })));
    }

    #[test]
    fn flipped_bits_are_answered_as_errors_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        let (r, d) = shard(1, 2, 3, (1, 1), 0xab);
        log.append(r, d, 0).unwrap();
        // Damage the data on disk: every byte of the shard is 0xab.
        let path = file_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.iter().rposition(|&b| b == 0xab).unwrap() - 10;
        bytes[at] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let err = log.read(1, 2, 3, (1, 1), 0, 2).unwrap_err();
        assert!(matches!(err, LogError::Checksum { count: 1, .. }), "{err}");
        assert_eq!(log.stats().checksum_failures.load(Ordering::Relaxed), 1);
        // The untouched block still reads.
        assert!(log.read(1, 2, 3, (1, 1), 0, 1).is_ok());
        // A scrub's verification counts the rotten block.
        assert_eq!(log.verify(1, 2, 3, (1, 1)).unwrap(), (2, 1));
        // Rebuilt (appended again under the same id), it reads again.
        let (r, d) = shard(1, 2, 3, (1, 1), 0xab);
        log.append(r, d, 0).unwrap();
        assert_eq!(log.verify(1, 2, 3, (1, 1)).unwrap(), (2, 0));
        assert!(log.read(1, 2, 3, (1, 1), 0, 2).is_ok());
        // Data that does not match its checksums is refused on arrival.
        let (mut r, d) = shard(1, 2, 3, (1, 2), 1);
        r.crcs[0] ^= 1;
        assert!(matches!(
            log.append(r, d, 0),
            Err(LogError::Checksum { .. })
        ));
    }

    #[test]
    fn discards_and_drops_free_space_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ShardLog::open(dir.path(), options(64 << 10)).unwrap();
            for seq in 0..40 {
                let (r, d) = shard(5, 0, 0, (1, seq), 1);
                log.append(r, d, 0).unwrap();
                let (r, d) = shard(6, 0, 0, (1, seq), 2);
                log.append(r, d, 0).unwrap();
            }
            assert!(list_files(dir.path()).unwrap().len() > 5);
            let old: Vec<StripeId> = (0..30).map(|s| stripe_id((1, s))).collect();
            // A stale writer may not discard.
            log.fence(5, 2).unwrap();
            assert!(matches!(
                log.discard(5, 0, 1, old.clone(), None),
                Err(LogError::Fenced { .. })
            ));
            log.discard(5, 0, 2, old, None).unwrap();
            // One shard of a stripe only: the others stay.
            for shard_index in 0..3 {
                let (r, d) = shard(5, 0, shard_index, (2, 35), 1);
                log.append(r, d, 0).unwrap();
            }
            log.discard(5, 0, 2, vec![stripe_id((2, 35))], Some(1))
                .unwrap();
            let shards_of_35: Vec<u32> = log
                .stripes(5, 0)
                .iter()
                .filter(|h| h.stripe == (2, 35))
                .map(|h| h.shard)
                .collect();
            assert_eq!(shards_of_35, vec![0, 2]);
            log.discard(5, 0, 2, vec![stripe_id((2, 35))], Some(2))
                .unwrap();
            let before = log.used_bytes();
            log.drop_volume(6).unwrap();
            assert!(log.used_bytes() < before);
            // (1, 30..40) and shard 0 of (2, 35).
            assert_eq!(log.stripes(5, 0).len(), 11);
            let (r, d) = shard(6, 0, 0, (9, 0), 2);
            assert!(matches!(log.append(r, d, 0), Err(LogError::Dropped(6))));
        }
        let log = ShardLog::open(dir.path(), options(64 << 10)).unwrap();
        assert_eq!(log.stripes(5, 0).len(), 11);
        assert_eq!(log.stripes(6, 0).len(), 0);
        assert_eq!(log.epoch(5), 2);
        assert!(log.read(5, 0, 0, (1, 35), 0, 2).is_ok());
        assert!(log.read(5, 0, 0, (2, 35), 0, 2).is_ok());
        assert!(log.read(5, 0, 1, (2, 35), 0, 2).is_err());
        // The oldest files, which held only freed shards, are gone.
        assert!(list_files(dir.path()).unwrap()[0] > 0);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
            for seq in 0..5 {
                let (r, d) = shard(1, 0, 0, (1, seq), 3);
                log.append(r, d, 0).unwrap();
            }
        }
        // The last record lost its last bytes (never acknowledged).
        let path = file_path(dir.path(), 0);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 100).unwrap();
        drop(f);
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        assert_eq!(log.stripes(1, 0).len(), 4);
        let (r, d) = shard(1, 0, 0, (1, 9), 4);
        log.append(r, d, 0).unwrap();
        drop(log);
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        assert_eq!(log.stripes(1, 0).len(), 5);
    }

    /// A power loss that kept the last record's header but zeroed a page
    /// of its rows: that shard is forgotten at open (so it counts as
    /// missing, not held), the ones before it stay, and so do shards in
    /// older files whatever their state (the scrubber's business).
    #[test]
    fn a_shard_torn_under_an_intact_header_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
            for seq in 0..3 {
                let (r, d) = shard(1, 0, 0, (1, seq), 3 + seq as u8);
                log.append(r, d, 0).unwrap();
            }
        }
        let path = file_path(dir.path(), 0);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // The last shard's second row (its last 4 KiB) is zeroed.
        f.write_all_at(&[0u8; BLOCK], len - BLOCK as u64).unwrap();
        drop(f);
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        let held: Vec<Stripe> = log.stripes(1, 0).iter().map(|h| h.stripe).collect();
        assert_eq!(held, vec![(1, 0), (1, 1)]);
        assert!(matches!(
            log.read(1, 0, 0, (1, 2), 0, 1),
            Err(LogError::NotFound { .. })
        ));
        assert_eq!(
            log.read(1, 0, 0, (1, 1), 0, 2).unwrap().0,
            vec![4u8; 2 * BLOCK]
        );
        // It stays forgotten when the file it is in is no longer the last.
        drop(log);
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        assert_eq!(log.stripes(1, 0).len(), 2);
        // Written again (the writer's retry), it is held again.
        let (r, d) = shard(1, 0, 0, (1, 2), 5);
        log.append(r, d, 0).unwrap();
        drop(log);
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        assert_eq!(log.stripes(1, 0).len(), 3);
        assert_eq!(
            log.read(1, 0, 0, (1, 2), 0, 2).unwrap().0,
            vec![5u8; 2 * BLOCK]
        );
    }

    /// A layout no writer makes (it would make a huge header, or point
    /// reads at parity) is refused on arrival.
    #[test]
    fn layouts_no_writer_makes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        type Damage = Box<dyn Fn(&mut ShardRecord)>;
        let cases: Vec<Damage> = vec![
            Box::new(|r| r.layout.as_mut().unwrap().blocks = (0..300_000).collect()),
            Box::new(|r| r.layout.as_mut().unwrap().blocks = vec![1; 8]),
            Box::new(|r| r.shard = 6),
            Box::new(|r| r.layout.as_mut().unwrap().data_shards = 0),
            Box::new(|r| r.layout.as_mut().unwrap().blocks.truncate(3)),
        ];
        for (i, damage) in cases.iter().enumerate() {
            let (mut r, d) = shard(1, 0, 0, (1, i as u64), 1);
            damage(&mut r);
            assert!(
                matches!(log.append(r, d, 0), Err(LogError::Invalid(_))),
                "case {i}"
            );
        }
        assert!(log.stripes(1, 0).is_empty());
    }

    /// Every layout the writer makes passes the check, whatever the number
    /// of blocks and the code.
    #[test]
    fn every_layout_a_writer_makes_is_accepted() {
        for (k, m) in [(4, 2), (1, 1), (8, 3), (2, 2)] {
            for n in 1..=k * MAX_ROWS {
                let rows = crate::codec::rows_for(n, k);
                let layout = Layout {
                    data_shards: k as u32,
                    parity_shards: m as u32,
                    rows: rows as u32,
                    blocks: (0..n as u32).collect(),
                };
                for shard in 0..(k + m) as u32 {
                    check_layout(&layout, shard)
                        .unwrap_or_else(|e| panic!("{k}+{m}, {n} blocks: {e}"));
                }
            }
        }
    }

    /// Damage in the middle of the last file, with good records after it,
    /// is not a torn tail: nothing is cut, and later records stay on disk.
    #[test]
    fn damage_before_good_records_is_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
            for seq in 0..6 {
                let (r, d) = shard(1, 0, 0, (1, seq), 3);
                log.append(r, d, 0).unwrap();
            }
        }
        let path = file_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        // A record header in the middle: find the third frame's magic.
        let magic = MAGIC.to_le_bytes();
        let third = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .nth(3)
            .unwrap()
            .0;
        bytes[third + 13] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        assert!(log.stripes(1, 0).len() < 6);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len as u64,
            "nothing was cut"
        );
    }

    #[test]
    fn a_failed_sync_stops_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = ShardLog::open(dir.path(), options(1 << 20)).unwrap();
        // A read-only handle underneath: the next write fails.
        {
            let mut state = log.lock();
            let read_only = File::open(file_path(dir.path(), 0)).unwrap();
            state.files.get_mut(&0).unwrap().file = Arc::new(read_only);
        }
        let (r, d) = shard(1, 0, 0, (1, 0), 1);
        assert!(log.append(r, d, 0).is_err());
        let (r, d) = shard(1, 0, 0, (1, 1), 1);
        assert!(matches!(log.append(r, d, 0), Err(LogError::Failed(_))));
        assert!(matches!(log.fence(1, 5), Err(LogError::Failed(_))));
    }
}
