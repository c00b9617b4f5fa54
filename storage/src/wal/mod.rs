//! A segmented write-ahead log with group commit.
//!
//! Callers hand over [`Batch`]es of records; one writer thread takes every
//! batch queued since its last write, writes them with one write and one
//! `fdatasync` (through io_uring when available, see [`io`]) and only then
//! calls each batch's completion. Nothing is acknowledged before it is
//! durable.
//!
//! Records carry a caller-defined `tag` (the Raft layer uses the entry index)
//! so that [`Wal::purge`] can delete whole segments whose records are all at
//! or below a tag. Every segment starts with the caller's current checkpoint
//! record ([`Wal::set_checkpoint`]), so state recorded only in purged
//! segments is not lost.

pub mod io;
pub mod record;
mod recovery;
mod segment;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use self::io::Backend;
pub use self::io::IoMode;
pub use self::record::Record;
use self::record::SegmentHeader;
use self::recovery::SegmentState;
pub use self::recovery::Truncation;
use crate::histogram::Histogram;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the WAL stopped after an earlier write failure: {0}")]
    Failed(String),
    #[error("the WAL is closed")]
    Closed,
    #[error(
        "WAL segment {} is corrupt at offset {offset}: {reason}; only the tail of the last \
         segment can be torn by a crash, so this log has lost data: restore this member from \
         a snapshot, or remove it from the cluster and add it again with an empty data directory",
        segment.display()
    )]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size each segment file is preallocated to.
    pub segment_size: u64,
    pub io_mode: IoMode,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 << 20,
            io_mode: IoMode::Auto,
        }
    }
}

/// Records to append together; encoded on the caller's thread.
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// End offset in `buf` and tag of each record.
    records: Vec<(usize, u64)>,
}

impl Batch {
    /// Adds a record. Kinds 0 and 255 are reserved for the WAL itself.
    pub fn push(&mut self, kind: u8, tag: u64, payload: &[u8]) {
        assert!(
            kind != record::SEGMENT_HEADER && kind != record::SEGMENT_HEADER_V2,
            "record kinds 254 and 255 are reserved"
        );
        record::encode(kind, payload, &mut self.buf);
        self.records.push((self.buf.len(), tag));
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }
}

/// The record (kind, payload) each new segment starts with.
type SharedCheckpoint = Arc<Mutex<Option<(u8, Vec<u8>)>>>;

/// Called once the batch is durable, or with the error that stopped it.
pub type Completion = Box<dyn FnOnce(Result<(), WalError>) + Send>;

enum Op {
    Append(Batch, Completion),
    Purge(u64, Completion),
}

/// Counters for metrics and benchmarks.
#[derive(Debug)]
pub struct WalStats {
    pub syncs: AtomicU64,
    pub batches: AtomicU64,
    pub bytes: AtomicU64,
    pub segments_purged: AtomicU64,
    /// How long each group commit's write + `fdatasync` took (one linked
    /// submission under io_uring, so the two are not timed apart).
    pub sync_seconds: Histogram,
}

impl Default for WalStats {
    fn default() -> Self {
        WalStats {
            syncs: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            segments_purged: AtomicU64::new(0),
            sync_seconds: Histogram::disk_latency(),
        }
    }
}

/// What [`Wal::open`] found on disk.
pub struct Opened {
    pub wal: Wal,
    /// Every record that survived recovery, in append order.
    pub records: Vec<Record>,
    /// Set when recovery cut off a torn tail.
    pub truncation: Option<Truncation>,
}

pub struct Wal {
    ops: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    checkpoint: SharedCheckpoint,
    stats: Arc<WalStats>,
    backend: &'static str,
}

impl Wal {
    /// Recovers the log in `dir` (created if missing) and starts the writer.
    /// `tag_of` gives the tag of a recovered record, as it was pushed.
    pub fn open(
        dir: &Path,
        options: WalOptions,
        tag_of: impl Fn(u8, &[u8]) -> u64,
    ) -> Result<Opened, WalError> {
        std::fs::create_dir_all(dir)?;
        let recovered = recovery::recover(dir, options.segment_size, &tag_of)?;
        let mut segments = recovered.segments;
        let mut backend = Backend::new(options.io_mode)?;
        let (file, offset) = match segments.last() {
            Some(last) => (segment::open(dir, last.seq)?, last.end),
            None => {
                let file = segment::create(dir, 0, options.segment_size)?;
                let mut header = Vec::new();
                SegmentHeader {
                    seq: 0,
                    prev_end: 0,
                }
                .encode(&mut header);
                backend.write_durably(&file, 0, &header)?;
                segments.push(SegmentState {
                    seq: 0,
                    version: record::Version::V2,
                    max_tag: 0,
                    end: header.len() as u64,
                    capacity: options.segment_size,
                });
                (file, header.len() as u64)
            }
        };
        let backend_name = backend.name();
        // A segment written by an older version keeps its framing; new
        // records go to a new segment.
        let must_roll = segments
            .last()
            .is_some_and(|s| s.version != record::Version::V2);
        let checkpoint = Arc::new(Mutex::new(None));
        let stats = Arc::new(WalStats::default());
        let writer = Writer {
            dir: dir.to_path_buf(),
            segment_size: options.segment_size,
            backend,
            segments,
            file,
            offset,
            checkpoint: checkpoint.clone(),
            stats: stats.clone(),
            failed: None,
            scratch: Vec::new(),
            must_roll,
        };
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(rx))?;
        tracing::info!(dir = %dir.display(), io = backend_name, records = recovered.records.len(), "WAL opened");
        Ok(Opened {
            wal: Wal {
                ops: Some(tx),
                writer: Some(handle),
                checkpoint,
                stats,
                backend: backend_name,
            },
            records: recovered.records,
            truncation: recovered.truncation,
        })
    }

    /// Whether `dir` holds a log (at least one segment).
    pub fn exists(dir: &Path) -> Result<bool, WalError> {
        match segment::list(dir) {
            Ok(segments) => Ok(!segments.is_empty()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `io_uring` or `syscall`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn stats(&self) -> &Arc<WalStats> {
        &self.stats
    }

    /// The record written first in every new segment from now on.
    pub fn set_checkpoint(&self, kind: u8, payload: Vec<u8>) {
        if let Ok(mut slot) = self.checkpoint.lock() {
            *slot = Some((kind, payload));
        }
    }

    /// Queues `batch`; `done` runs on the writer thread once it is durable.
    pub fn submit(&self, batch: Batch, done: Completion) {
        self.send(Op::Append(batch, done));
    }

    /// Appends `batch` and waits until it is durable.
    pub fn append(&self, batch: Batch) -> Result<(), WalError> {
        self.wait(|done| Op::Append(batch, done))
    }

    /// Deletes the oldest segments (never the one being written) whose
    /// records all have tags at or below `upto`, and waits.
    pub fn purge(&self, upto: u64) -> Result<(), WalError> {
        self.wait(|done| Op::Purge(upto, done))
    }

    fn wait(&self, op: impl FnOnce(Completion) -> Op) -> Result<(), WalError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(op(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.recv().unwrap_or(Err(WalError::Closed))
    }

    fn send(&self, op: Op) {
        let Some(ops) = &self.ops else { return };
        if let Err(mpsc::SendError(op)) = ops.send(op) {
            match op {
                Op::Append(_, done) | Op::Purge(_, done) => done(Err(WalError::Closed)),
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Closing the channel ends the writer after the queued work.
        self.ops.take();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

/// The writer thread's state: the open segment and where the next byte goes.
struct Writer {
    dir: PathBuf,
    segment_size: u64,
    backend: Backend,
    /// Every live segment, oldest first; the last one is being written.
    segments: Vec<SegmentState>,
    file: File,
    offset: u64,
    checkpoint: SharedCheckpoint,
    stats: Arc<WalStats>,
    /// Set by the first I/O error; everything after it fails.
    failed: Option<String>,
    scratch: Vec<u8>,
    /// The last segment has an older record framing: roll before writing.
    must_roll: bool,
}

/// Upper bound of bytes gathered into one group commit.
const MAX_GROUP_BYTES: usize = 16 << 20;

impl Writer {
    fn run(mut self, ops: mpsc::Receiver<Op>) {
        while let Ok(first) = ops.recv() {
            let mut group = vec![first];
            let mut bytes = 0;
            while bytes < MAX_GROUP_BYTES {
                match ops.try_recv() {
                    Ok(op) => {
                        if let Op::Append(b, _) = &op {
                            bytes += b.bytes();
                        }
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.handle_group(group);
        }
    }

    fn handle_group(&mut self, group: Vec<Op>) {
        let mut appends = Vec::new();
        let mut purges = Vec::new();
        for op in group {
            match op {
                Op::Append(batch, done) => appends.push((batch, done)),
                Op::Purge(upto, done) => purges.push((upto, done)),
            }
        }
        let written = match &self.failed {
            Some(msg) => Err(msg.clone()),
            None => self
                .write_batches(appends.iter().map(|(b, _)| b))
                .map_err(|e| {
                    tracing::error!(error = %e, "WAL write failed; the log is stopped");
                    let msg = e.to_string();
                    self.failed = Some(msg.clone());
                    msg
                }),
        };
        for (_, done) in appends {
            done(written.clone().map_err(WalError::Failed));
        }
        // Purges queued with these appends run after them: the appends may
        // have rolled to a new segment, which only makes more purgeable.
        for (upto, done) in purges {
            done(self.purge(upto).map_err(WalError::from));
        }
    }

    /// Writes every record of `batches`, as few writes and syncs as segment
    /// boundaries allow (one in the common case).
    fn write_batches<'a>(
        &mut self,
        batches: impl Iterator<Item = &'a Batch>,
    ) -> std::io::Result<()> {
        let mut chunk = std::mem::take(&mut self.scratch);
        chunk.clear();
        let mut count = 0u64;
        let mut total = 0u64;
        for batch in batches {
            count += 1;
            let mut start = 0;
            for &(end, tag) in &batch.records {
                let rec = &batch.buf[start..end];
                start = end;
                let capacity = self.current().capacity;
                // The new segment is sized to take the record, whatever its size.
                if self.must_roll || self.offset + (chunk.len() + rec.len()) as u64 > capacity {
                    self.must_roll = false;
                    total += chunk.len() as u64;
                    self.flush(&mut chunk)?;
                    self.roll(rec.len(), &mut chunk)?;
                }
                chunk.extend_from_slice(rec);
                let current = self.current_mut();
                current.max_tag = current.max_tag.max(tag);
            }
        }
        total += chunk.len() as u64;
        self.flush(&mut chunk)?;
        self.scratch = chunk;
        self.stats.batches.fetch_add(count, Ordering::Relaxed);
        self.stats.bytes.fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    fn current(&self) -> &SegmentState {
        &self.segments[self.segments.len() - 1]
    }

    fn current_mut(&mut self) -> &mut SegmentState {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    fn flush(&mut self, chunk: &mut Vec<u8>) -> std::io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.backend.write_durably(&self.file, self.offset, chunk)?;
        self.stats.sync_seconds.observe(started.elapsed());
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.offset += chunk.len() as u64;
        let end = self.offset;
        self.current_mut().end = end;
        chunk.clear();
        Ok(())
    }

    /// Starts the next segment, big enough for its header, the checkpoint
    /// and a record of `record_len`; stages header and checkpoint in `chunk`.
    fn roll(&mut self, record_len: usize, chunk: &mut Vec<u8>) -> std::io::Result<()> {
        let seq = self.current().seq + 1;
        SegmentHeader {
            seq,
            prev_end: self.offset,
        }
        .encode(chunk);
        let checkpoint = self.checkpoint.lock().ok().and_then(|c| c.clone());
        if let Some((kind, payload)) = &checkpoint {
            record::encode(*kind, payload, chunk);
        }

        let capacity = self.segment_size.max((chunk.len() + record_len) as u64);
        self.file = segment::create(&self.dir, seq, capacity)?;
        self.offset = 0;
        self.segments.push(SegmentState {
            seq,
            version: record::Version::V2,
            max_tag: 0,
            end: 0,
            capacity,
        });
        tracing::debug!(segment = seq, "WAL rolled to a new segment");
        Ok(())
    }

    fn purge(&mut self, upto: u64) -> std::io::Result<()> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[0].max_tag <= upto {
            segment::remove(&self.dir, self.segments[0].seq)?;
            // One at a time, oldest first: a crash never leaves a gap at
            // the head of the log, which recovery would take for damage.
            segment::sync_dir(&self.dir)?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            self.stats
                .segments_purged
                .fetch_add(removed, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
