//! The MVCC key-value store on RocksDB: point-in-time reads, write
//! transactions with read-your-writes, compaction and etcd's HashKV.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message;
use rocksdb::{
    DBPinnableSlice, DBRawIteratorWithThreadMode, ReadOptions, SnapshotWithThreadMode, WriteBatch,
    WriteOptions, DB,
};
use tessera_proto::mvccpb::{event::EventType, Event, KeyValue};
use tessera_storage::histogram::Histogram;

use super::encoding::{
    after_all_versions, key_prefix, parse_rev_key, rev_key, seek_key_at, split_version_key,
    version_key, KeyRange, Revision, TAG_PUT, TAG_TOMBSTONE,
};
use super::latest::{self, Current};
use crate::db::{CF_KV, CF_LATEST, CF_LEASE, CF_META, CF_REV};

const META_CURRENT_REV: &[u8] = b"current_rev";
const META_COMPACT_REV: &[u8] = b"compact_rev";
/// The compacted revision whose old versions are all deleted (etcd's
/// `finishedCompactRev`); below [`META_COMPACT_REV`] while a compaction
/// runs in the background.
const META_FINISHED_COMPACT_REV: &[u8] = b"finished_compact_rev";

/// etcd starts a new store at revision 1; the first write creates revision 2.
pub const INITIAL_REVISION: i64 = 1;
/// etcd's "never compacted" marker.
pub const NEVER_COMPACTED: i64 = -1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt MVCC record: {0}")]
    Corrupt(String),
    #[error("missing column family {0}")]
    MissingColumnFamily(&'static str),
    #[error("empty key")]
    EmptyKey,
}

impl From<prost::DecodeError> for StoreError {
    fn from(e: prost::DecodeError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// The MVCC store. Cheap to share behind an `Arc`.
pub struct Store {
    db: Arc<DB>,
    current_rev: AtomicI64,
    compact_rev: AtomicI64,
    /// Readers hold it shared while they pick their revision and RocksDB
    /// snapshot; commits hold it exclusively while they write and publish the
    /// new revisions, so a view's revisions always match its snapshot.
    view_lock: RwLock<()>,
    /// Wakes the background compaction (`background_compaction`).
    compaction_wanted: tokio::sync::Notify,
    /// Counts installed snapshots: a compaction pass that sees it change
    /// starts over on the new state.
    installs: std::sync::atomic::AtomicU64,
    /// The finished compacted revision, for `--physical` compactions.
    compaction_done: tokio::sync::watch::Sender<i64>,
    /// How long each applied batch's RocksDB write took (etcd's
    /// `etcd_disk_backend_commit_duration_seconds`).
    pub commit_seconds: Histogram,
}

impl Store {
    pub fn open(db: Arc<DB>) -> Result<Self, StoreError> {
        let store = Store {
            db,
            current_rev: AtomicI64::new(INITIAL_REVISION),
            compact_rev: AtomicI64::new(NEVER_COMPACTED),
            view_lock: RwLock::new(()),
            compaction_wanted: tokio::sync::Notify::new(),
            installs: std::sync::atomic::AtomicU64::new(0),
            compaction_done: tokio::sync::watch::Sender::new(NEVER_COMPACTED),
            commit_seconds: Histogram::disk_latency(),
        };
        store.reload()?;
        store.publish_finished_compaction()?;
        Ok(store)
    }

    /// Reads the revisions from disk, rebuilding the current-version index
    /// first if it is missing (a data directory from before it).
    fn reload(&self) -> Result<(), StoreError> {
        if !latest::is_built(&self.db)? {
            let started = std::time::Instant::now();
            tracing::info!("building the current-version index from the MVCC history");
            let keys = latest::rebuild(&self.db)?;
            self.db.flush_wal(true)?;
            tracing::info!(keys, elapsed = ?started.elapsed(), "current-version index built");
        }
        let _w = self.view_lock.write().unwrap_or_else(|p| p.into_inner());
        self.load_revisions()
    }

    /// Publishes the revisions on disk; the caller holds the view lock.
    fn load_revisions(&self) -> Result<(), StoreError> {
        let cur = self.meta_i64(META_CURRENT_REV)?.unwrap_or(INITIAL_REVISION);
        let compact = self.meta_i64(META_COMPACT_REV)?.unwrap_or(NEVER_COMPACTED);
        self.current_rev.store(cur, Ordering::SeqCst);
        self.compact_rev.store(compact, Ordering::SeqCst);
        Ok(())
    }

    /// Replaces the whole state with `batch` (a snapshot being installed,
    /// index included, see `snapshot::restore_batch`). Readers see the
    /// switch as one step: no read view is taken between the write and the
    /// new revisions, and views taken before keep reading the old state from
    /// their RocksDB snapshots. Synced: the log before the snapshot may be
    /// purged right after.
    pub fn install(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let _w = self.view_lock.write().unwrap_or_else(|p| p.into_inner());
        self.db.write_opt(batch, &opts)?;
        self.installs.fetch_add(1, Ordering::SeqCst);
        self.compaction_wanted.notify_one();
        self.load_revisions()
    }

    /// How many snapshots were installed under this store so far.
    pub fn installs(&self) -> u64 {
        self.installs.load(Ordering::SeqCst)
    }

    /// Makes everything written so far durable (RocksDB's WAL synced): done
    /// before the Raft log is purged behind the applied index, since after
    /// a power loss the state machine must not restart behind the log.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn current_rev(&self) -> i64 {
        self.current_rev.load(Ordering::SeqCst)
    }

    pub fn compact_rev(&self) -> i64 {
        self.compact_rev.load(Ordering::SeqCst)
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }

    fn meta_i64(&self, key: &[u8]) -> Result<Option<i64>, StoreError> {
        match self.db.get_cf(self.cf(CF_META)?, key)? {
            Some(v) => {
                let b: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("meta {key:?} length")))?;
                Ok(Some(i64::from_be_bytes(b)))
            }
            None => Ok(None),
        }
    }

    /// A consistent point-in-time view for serving reads.
    pub fn read_view(&self) -> ReadView<'_> {
        let _r = self.view_lock.read().unwrap_or_else(|p| p.into_inner());
        ReadView {
            db: &self.db,
            rev: self.current_rev(),
            compact_rev: self.compact_rev(),
            snapshot: Some(self.db.snapshot()),
        }
    }

    /// A write transaction on the latest state. Only the (single) apply path
    /// writes, so its reads need no snapshot.
    pub fn write_txn(&self) -> WriteTxn<'_> {
        self.txn_on(ReadView {
            db: &self.db,
            rev: self.current_rev(),
            compact_rev: self.compact_rev(),
            snapshot: None,
        })
    }

    /// A transaction over a snapshot, for read-only txns served locally.
    pub fn read_txn(&self) -> WriteTxn<'_> {
        self.txn_on(self.read_view())
    }

    fn txn_on<'a>(&'a self, view: ReadView<'a>) -> WriteTxn<'a> {
        WriteTxn {
            base_rev: view.rev,
            begin_rev: view.rev,
            view,
            changes: 0,
            overlay: BTreeMap::new(),
            prefetched: HashMap::new(),
            batch: WriteBatch::default(),
            events: Vec::new(),
        }
    }

    /// Commits a write transaction together with `extra` writes (such as the
    /// applied log index) in one atomic batch; returns the transaction's
    /// events, in order.
    pub fn commit(
        &self,
        txn: WriteTxn<'_>,
        extra: impl FnOnce(&mut WriteBatch) -> Result<(), StoreError>,
    ) -> Result<Vec<Event>, StoreError> {
        let new_rev = txn.read_rev();
        let changed = new_rev > txn.base_rev;
        let mut batch = txn.batch;
        if changed {
            batch.put_cf(self.cf(CF_META)?, META_CURRENT_REV, new_rev.to_be_bytes());
        }
        extra(&mut batch)?;
        self.write_and_publish(batch, changed.then_some(new_rev), None)?;
        Ok(txn.events)
    }

    /// Writes `batch` and, in the same exclusive section, publishes new revisions.
    fn write_and_publish(
        &self,
        batch: WriteBatch,
        new_rev: Option<i64>,
        new_compact: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        let _w = self.view_lock.write().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        self.db.write_opt(batch, &opts)?;
        self.commit_seconds.observe(started.elapsed());
        if let Some(r) = new_rev {
            self.current_rev.store(r, Ordering::SeqCst);
        }
        if let Some(c) = new_compact {
            self.compact_rev.store(c, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Hands RocksDB's buffered WAL to the OS (see `db::open`): after this,
    /// everything written so far survives a crash of the process, but not
    /// a power loss (see [`Store::sync`]).
    ///
    /// Failpoint `state-machine-writes-unsynced-lost`: the hand-off is
    /// skipped, so what was not synced stays in the process and a SIGKILL
    /// loses it, as a power loss loses what the OS had not written back.
    pub fn flush_wal(&self) -> Result<(), StoreError> {
        if tessera_storage::failpoint::is_on("state-machine-writes-unsynced-lost") {
            return Ok(());
        }
        self.db.flush_wal(false)?;
        Ok(())
    }

    /// Checks a compaction request the way etcd does, without changing anything.
    pub fn check_compact(&self, rev: i64) -> Result<(), crate::errors::EtcdError> {
        if rev <= self.compact_rev() {
            return Err(crate::errors::EtcdError::Compacted);
        }
        if rev > self.current_rev() {
            return Err(crate::errors::EtcdError::FutureRev);
        }
        Ok(())
    }

    /// Schedules compaction at `rev` (already validated with
    /// [`Store::check_compact`]), as etcd does: the new compacted revision is
    /// written (with `extra`, in the same batch) and published at once, so
    /// reads below it are refused from now on; the old versions are deleted
    /// afterwards, in bounded batches ([`Store::compact_step`]), by the
    /// background compaction, which also resumes it after a restart.
    pub fn schedule_compact(
        &self,
        rev: i64,
        extra: impl FnOnce(&mut WriteBatch) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let meta = self.cf(CF_META)?;
        let mut batch = WriteBatch::default();
        if self.meta_i64(META_FINISHED_COMPACT_REV)?.is_none() {
            // Data from before background compaction: every compaction
            // there was ran to its end when it was applied.
            batch.put_cf(
                meta,
                META_FINISHED_COMPACT_REV,
                self.compact_rev().to_be_bytes(),
            );
        }
        batch.put_cf(meta, META_COMPACT_REV, rev.to_be_bytes());
        extra(&mut batch)?;
        self.write_and_publish(batch, None, Some(rev))?;
        self.compaction_wanted.notify_one();
        Ok(())
    }

    /// The revision of a compaction whose old versions are not all deleted
    /// yet, if there is one.
    pub fn compaction_pending(&self) -> Result<Option<i64>, StoreError> {
        let scheduled = self.compact_rev();
        let finished = self
            .meta_i64(META_FINISHED_COMPACT_REV)?
            .unwrap_or(scheduled);
        Ok((finished < scheduled).then_some(scheduled))
    }

    /// Resolves when a compaction has been scheduled (or a second has
    /// passed: a snapshot installed under the store may hold one too).
    pub async fn compaction_wanted(&self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.compaction_wanted.notified(),
        )
        .await;
    }

    /// One bounded batch of the compaction at `rev`, from `from` on: every
    /// version at or below `rev` is removed except each key's newest one,
    /// which stays unless it is a tombstone. Stops once `limit` versions
    /// are removed (or eight times as many looked at), even inside one
    /// key's versions: the cursor carries whether that key already kept
    /// its version. Returns how many were removed and where the next batch
    /// starts (None when the compaction is done).
    ///
    /// Safe while writes go on: they only add versions above `rev`, which
    /// sort before the older ones of the same key and change nothing this
    /// decides, and readers never look below `rev`.
    pub fn compact_step(
        &self,
        rev: i64,
        from: &CompactCursor,
        limit: usize,
    ) -> Result<(usize, Option<CompactCursor>), StoreError> {
        let kv = self.cf(CF_KV)?;
        let rev_cf = self.cf(CF_REV)?;
        let mut batch = WriteBatch::default();
        let (mut removed, mut examined) = (0usize, 0usize);
        let mut next = None;
        let mut it = self.db.raw_iterator_cf(kv);
        it.seek(&from.key);
        let mut current_prefix = from.prefix.clone();
        let mut kept_one = from.kept_one;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (prefix, _, r) =
                split_version_key(k).ok_or_else(|| StoreError::Corrupt("kv key".into()))?;
            let same_key = prefix == current_prefix.as_slice();
            if removed >= limit || examined >= limit.saturating_mul(8) {
                next = Some(CompactCursor {
                    key: k.to_vec(),
                    prefix: prefix.to_vec(),
                    kept_one: same_key && kept_one,
                });
                break;
            }
            if !same_key {
                current_prefix = prefix.to_vec();
                kept_one = false;
            }
            examined += 1;
            if r.main <= rev {
                if kept_one || v.first() == Some(&TAG_TOMBSTONE) {
                    batch.delete_cf(kv, k);
                    batch.delete_cf(rev_cf, rev_key(r));
                    removed += 1;
                }
                kept_one = true;
            }
            it.next();
        }
        it.status()?;
        drop(it);
        if removed > 0 {
            // Not synced: a crash before the end repeats the compaction.
            let mut opts = WriteOptions::default();
            opts.set_sync(false);
            self.db.write_opt(batch, &opts)?;
        }
        Ok((removed, next))
    }

    /// Records that the compaction at `rev` has deleted everything it had
    /// to, and tells whoever waits for it (see [`Store::wait_compacted`]).
    pub fn finish_compaction(&self, rev: i64) -> Result<(), StoreError> {
        if self
            .meta_i64(META_FINISHED_COMPACT_REV)?
            .unwrap_or(i64::MIN)
            >= rev
        {
            return self.publish_finished_compaction();
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META)?,
            META_FINISHED_COMPACT_REV,
            rev.to_be_bytes(),
        );
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(batch, &opts)?;
        self.publish_finished_compaction()
    }

    /// Publishes the finished compacted revision on disk (it changes with a
    /// finished compaction, and with an installed snapshot).
    pub fn publish_finished_compaction(&self) -> Result<(), StoreError> {
        let finished = self
            .meta_i64(META_FINISHED_COMPACT_REV)?
            .unwrap_or_else(|| self.compact_rev());
        self.compaction_done.send_if_modified(|f| {
            let changed = *f != finished;
            *f = finished;
            changed
        });
        Ok(())
    }

    /// Waits until the compaction at `rev` (or a later one) has deleted
    /// everything it had to on this member: etcd's `--physical`.
    pub async fn wait_compacted(&self, rev: i64) {
        let mut done = self.compaction_done.subscribe();
        let _ = done.wait_for(|&f| f >= rev).await;
    }

    /// Compacts at `rev` to the end, in the caller's thread (tests).
    #[cfg(test)]
    pub fn compact_now(&self, rev: i64) -> Result<usize, StoreError> {
        self.schedule_compact(rev, |_| Ok(()))?;
        let (mut removed, mut from) = (0, CompactCursor::default());
        loop {
            let (n, next) = self.compact_step(rev, &from, 2)?;
            removed += n;
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
        self.finish_compaction(rev)?;
        Ok(removed)
    }

    /// etcd's HashKV: CRC-32C over the `key` bucket as etcd lays it out
    /// (revision-ordered, 17/18-byte revision keys, marshalled KeyValues), so
    /// the same history gives the same hash as etcd itself.
    /// Returns (hash, current revision, compacted revision).
    pub fn hash_kv(
        &self,
        rev: i64,
    ) -> Result<Result<(u32, i64, i64), crate::errors::EtcdError>, StoreError> {
        use crate::errors::EtcdError;
        let view = self.read_view();
        let (cur, compact) = (view.rev, view.compact_rev);
        if rev > 0 && rev <= compact {
            return Ok(Err(EtcdError::Compacted));
        }
        if rev > 0 && rev > cur {
            return Ok(Err(EtcdError::FutureRev));
        }
        let rev = if rev == 0 { cur } else { rev };
        let kv_cf = self.cf(CF_KV)?;
        let mut it = self.db.raw_iterator_cf_opt(kv_cf, view.read_opts());
        it.seek_to_first();
        // (revision, is tombstone, user key, stored value) of every version <= rev,
        // plus the revision each key would keep if compacted at `rev`.
        let mut versions: Vec<(Revision, bool, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut keep: std::collections::HashSet<Revision> = Default::default();
        let mut last_prefix: Vec<u8> = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (prefix, user, r) =
                split_version_key(k).ok_or_else(|| StoreError::Corrupt("kv key".into()))?;
            if r.main <= rev {
                let tomb = v.first() == Some(&TAG_TOMBSTONE);
                if prefix != last_prefix.as_slice() {
                    last_prefix = prefix.to_vec();
                    if !tomb {
                        keep.insert(r);
                    }
                }
                versions.push((r, tomb, user, v.get(1..).unwrap_or_default().to_vec()));
            }
            it.next();
        }
        it.status()?;
        versions.sort_by_key(|v| v.0);
        let mut crc = crc32c::crc32c(b"key");
        for (r, tomb, user, stored) in versions {
            if r.main <= compact && !keep.is_empty() && !keep.contains(&r) {
                continue;
            }
            let mut rk = Vec::with_capacity(18);
            rk.extend_from_slice(&r.main.to_be_bytes());
            rk.push(b'_');
            rk.extend_from_slice(&r.sub.to_be_bytes());
            let value = if tomb {
                rk.push(b't');
                KeyValue {
                    key: user,
                    ..Default::default()
                }
                .encode_to_vec()
            } else {
                let mut kv = KeyValue::decode(stored.as_slice())?;
                kv.key = user;
                kv.encode_to_vec()
            };
            crc = crc32c::crc32c_append(crc, &rk);
            crc = crc32c::crc32c_append(crc, &value);
        }
        Ok(Ok((crc, cur, compact)))
    }

    /// A hash of the whole applied key space (MVCC history, leases and the
    /// revisions): deterministic for a given history, stable across restarts.
    pub fn hash_all(&self) -> Result<(u32, i64), StoreError> {
        let view = self.read_view();
        let mut crc = 0u32;
        for name in [CF_KV, CF_LEASE] {
            let mut it = self
                .db
                .raw_iterator_cf_opt(self.cf(name)?, view.read_opts());
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                crc = crc32c::crc32c_append(crc, k);
                crc = crc32c::crc32c_append(crc, v);
                it.next();
            }
            it.status()?;
        }
        crc = crc32c::crc32c_append(crc, &view.rev.to_be_bytes());
        crc = crc32c::crc32c_append(crc, &view.compact_rev.to_be_bytes());
        Ok((crc, view.rev))
    }
}

/// Where a compaction's next batch starts ([`Store::compact_step`]): a
/// `kv` key, the user key it belongs to (escaped), and whether that key
/// already kept its newest version at or below the compacted revision.
#[derive(Debug, Clone, Default)]
pub struct CompactCursor {
    key: Vec<u8>,
    prefix: Vec<u8>,
    kept_one: bool,
}

/// One version of the history, as [`ReadView::for_each_version`] gives it.
pub struct Version<'v> {
    pub rev: Revision,
    pub user_key: &'v [u8],
    /// The version's KeyValue without its key; None for a tombstone.
    pub value: Option<KeyValue>,
}

impl ReadView<'_> {
    /// The compacted revision whose deletion had finished when the view was
    /// taken (equal to `compact_rev` unless a compaction was running).
    pub fn finished_compact_rev(&self) -> Result<i64, StoreError> {
        let raw = self.db.get_pinned_cf_opt(
            self.cf(CF_META)?,
            META_FINISHED_COMPACT_REV,
            &self.read_opts(),
        )?;
        Ok(match raw {
            Some(v) => i64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("finished compacted revision".into()))?,
            ),
            None => self.compact_rev,
        })
    }

    /// Every stored version, in revision order (as etcd's `key` bucket
    /// holds them).
    pub fn for_each_version(
        &self,
        mut f: impl FnMut(Version<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let kv_cf = self.cf(CF_KV)?;
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.cf(CF_REV)?, self.read_opts());
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let rev = parse_rev_key(k).ok_or_else(|| StoreError::Corrupt("rev key".into()))?;
            let user_key = v.get(1..).unwrap_or_default();
            let stored = self
                .db
                .get_pinned_cf_opt(kv_cf, version_key(user_key, rev), &self.read_opts())?
                .ok_or_else(|| {
                    StoreError::Corrupt("indexed revision without its version".into())
                })?;
            let value = match stored.first() {
                Some(&TAG_PUT) => Some(KeyValue::decode(&stored[1..])?),
                Some(&TAG_TOMBSTONE) => None,
                _ => return Err(StoreError::Corrupt("version tag".into())),
            };
            f(Version {
                rev,
                user_key,
                value,
            })?;
            it.next();
        }
        it.status()?;
        Ok(())
    }
}

/// Stages, into `batch`, one version of a history being restored (a
/// snapshot from etcd): the version, and its entry in the revision index.
/// `value` is the KeyValue without its key; None for a tombstone.
pub fn stage_version(
    db: &DB,
    batch: &mut WriteBatch,
    user_key: &[u8],
    rev: Revision,
    value: Option<&KeyValue>,
) -> Result<(), StoreError> {
    let cf = |name| {
        db.cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    };
    let (tag, stored) = match value {
        Some(kv) => {
            let mut stored = Vec::with_capacity(kv.encoded_len() + 1);
            stored.push(TAG_PUT);
            kv.encode(&mut stored)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            (TAG_PUT, stored)
        }
        None => (TAG_TOMBSTONE, vec![TAG_TOMBSTONE]),
    };
    batch.put_cf(cf(CF_KV)?, version_key(user_key, rev), stored);
    let mut entry = Vec::with_capacity(user_key.len() + 1);
    entry.push(tag);
    entry.extend_from_slice(user_key);
    batch.put_cf(cf(CF_REV)?, rev_key(rev), entry);
    Ok(())
}

/// Stages the revisions of a restored history: its current revision, its
/// compacted revision, and how far that compaction has deleted (the
/// background compaction finishes the rest).
pub fn stage_revisions(
    db: &DB,
    batch: &mut WriteBatch,
    current: i64,
    compacted: i64,
    finished: i64,
) -> Result<(), StoreError> {
    let meta = db
        .cf_handle(CF_META)
        .ok_or(StoreError::MissingColumnFamily(CF_META))?;
    batch.put_cf(meta, META_CURRENT_REV, current.to_be_bytes());
    batch.put_cf(meta, META_COMPACT_REV, compacted.to_be_bytes());
    batch.put_cf(meta, META_FINISHED_COMPACT_REV, finished.to_be_bytes());
    Ok(())
}

/// A point-in-time view of the store.
pub struct ReadView<'a> {
    db: &'a DB,
    /// The store's current revision when the view was taken.
    pub rev: i64,
    /// The compacted revision when the view was taken.
    pub compact_rev: i64,
    snapshot: Option<SnapshotWithThreadMode<'a, DB>>,
}

impl<'a> ReadView<'a> {
    pub(super) fn db(&self) -> &'a DB {
        self.db
    }

    pub(super) fn read_opts(&self) -> ReadOptions {
        let mut o = ReadOptions::default();
        if let Some(s) = &self.snapshot {
            o.set_snapshot(s);
        }
        o
    }

    pub(super) fn cf(&self, name: &'static str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }

    fn kv_cf(&self) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.cf(CF_KV)
    }

    /// Events of revisions `from..=to`, in revision order, each with its
    /// previous value when still in history; at most about `max_events`
    /// (never splitting a revision). Returns the events and the last revision
    /// they cover completely.
    pub fn history(
        &self,
        from: i64,
        to: i64,
        max_events: usize,
    ) -> Result<(Vec<Event>, i64), StoreError> {
        let mut opts = self.read_opts();
        opts.set_iterate_upper_bound(
            rev_key(Revision {
                main: to + 1,
                sub: 0,
            })
            .to_vec(),
        );
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_REV)?, opts);
        it.seek(rev_key(Revision {
            main: from.max(0),
            sub: 0,
        }));
        let mut events = Vec::new();
        let mut covered = to;
        let mut last_main = None;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let rev = parse_rev_key(k).ok_or_else(|| StoreError::Corrupt("rev key".into()))?;
            if events.len() >= max_events && last_main != Some(rev.main) {
                covered = rev.main - 1;
                break;
            }
            last_main = Some(rev.main);
            let (tag, key) = v
                .split_first()
                .ok_or_else(|| StoreError::Corrupt("rev entry".into()))?;
            let kv = match *tag {
                TAG_PUT => {
                    let stored = self
                        .db
                        .get_cf_opt(self.kv_cf()?, version_key(key, rev), &self.read_opts())?
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("revision {rev:?} indexed but not stored"))
                        })?;
                    decode_live(key, &stored)?
                        .ok_or_else(|| StoreError::Corrupt("indexed put is a tombstone".into()))?
                }
                _ => tombstone(key, rev.main),
            };
            let r#type = if *tag == TAG_PUT {
                EventType::Put
            } else {
                EventType::Delete
            };
            events.push(Event {
                r#type: r#type as i32,
                // Read when sent, for the watchers that ask for it
                // (`service::watch`): most replayed events are for other
                // keys than a watcher's, or for watchers without `prev_kv`.
                prev_kv: None,
                kv: Some(kv),
            });
            it.next();
        }
        it.status()?;
        Ok((events, covered))
    }

    /// The newest live version of `key` at revision `rev`.
    pub fn get(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>, StoreError> {
        match self.get_stored(key, rev)? {
            Some(stored) => decode_live(key, &stored),
            None => Ok(None),
        }
    }

    /// The current version of `key` in this view, if it is live.
    pub(super) fn current(&self, key: &[u8]) -> Result<Option<Current>, StoreError> {
        match self
            .db
            .get_pinned_cf_opt(self.cf(CF_LATEST)?, key, &self.read_opts())?
        {
            Some(raw) => Current::decode(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// The live version of `key` written at exactly `rev`.
    fn version(&self, key: &[u8], rev: Revision) -> Result<Option<KeyValue>, StoreError> {
        decode_live(key, &self.current_stored(key, rev)?)
    }

    /// The stored bytes of the version `rev` of `key` that the current-version
    /// index points at (so it must exist).
    fn current_stored(&self, key: &[u8], rev: Revision) -> Result<DBPinnableSlice<'a>, StoreError> {
        self.db
            .get_pinned_cf_opt(self.kv_cf()?, version_key(key, rev), &self.read_opts())?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("current version {rev:?} of a key is not stored"))
            })
    }

    /// The stored bytes (tag ‖ KeyValue) of the newest version of `key` at
    /// `rev`, tombstones included.
    fn get_stored(&self, key: &[u8], rev: i64) -> Result<Option<Vec<u8>>, StoreError> {
        // A live key whose current version is at or below `rev` needs no
        // seek through the history: that version is the newest one at `rev`.
        if let Some(current) = self.current(key)? {
            if current.rev.main <= rev {
                return Ok(Some(self.current_stored(key, current.rev)?.to_vec()));
            }
        }
        let mut it = self.db.raw_iterator_cf_opt(self.kv_cf()?, self.read_opts());
        stored_version(&mut it, key, rev, |v| v.to_vec())
    }

    /// Visits the newest live version at `rev` of every key in `range`, in key
    /// order, until `visit` returns false.
    pub fn scan(
        &self,
        range: &KeyRange,
        rev: i64,
        mut visit: impl FnMut(Vec<u8>, &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let (start, end) = match range {
            KeyRange::Single(k) => {
                if let Some(stored) = self.get_stored(k, rev)? {
                    if stored.first() == Some(&TAG_PUT) {
                        visit(k.clone(), &stored)?;
                    }
                }
                return Ok(());
            }
            KeyRange::FromKey(k) => (key_prefix(k), None),
            KeyRange::Between(k, e) => {
                if e.as_slice() <= k.as_slice() {
                    return Ok(());
                }
                (key_prefix(k), Some(key_prefix(e)))
            }
        };
        let mut opts = self.read_opts();
        if let Some(end) = end {
            opts.set_iterate_upper_bound(end);
        }
        let mut it = self.db.raw_iterator_cf_opt(self.kv_cf()?, opts);
        it.seek(&start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (prefix, user, r) =
                split_version_key(k).ok_or_else(|| StoreError::Corrupt("kv key".into()))?;
            let prefix = prefix.to_vec();
            if r.main > rev {
                // Skip the versions newer than `rev` in one seek.
                let mut target = prefix;
                target.extend_from_slice(&(u64::MAX - rev as u64).to_be_bytes());
                target.extend_from_slice(&[0u8; 8]);
                it.seek(&target);
                continue;
            }
            if v.first() == Some(&TAG_PUT) && !visit(user, v)? {
                break;
            }
            it.seek(after_all_versions(&prefix));
        }
        it.status()?;
        Ok(())
    }

    /// Live key-values in `range` at `rev`: at most `limit` of them (0 = no
    /// limit), and the total number of live keys in the range.
    pub fn range(
        &self,
        range: &KeyRange,
        rev: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, usize), StoreError> {
        let mut kvs = Vec::new();
        let mut count = 0usize;
        self.scan(range, rev, |user, stored| {
            count += 1;
            if !count_only && (limit == 0 || kvs.len() < limit) {
                let mut kv = KeyValue::decode(&stored[1..])?;
                kv.key = user;
                kvs.push(kv);
            }
            Ok(true)
        })?;
        Ok((kvs, count))
    }
}

/// What a [`WriteTxn::delete_range`] deleted.
#[derive(Debug, Default)]
pub struct Deleted {
    pub count: usize,
    /// The previous key-values, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// What a deleted key was before: written earlier in the same transaction,
/// or as the current-version index has it.
enum Prev {
    Written(KeyValue),
    Indexed(Current),
}

/// The live keys of a range as a view's current-version index has them, in
/// key order, read one at a time (a range of any size costs one entry).
struct LiveKeys<'a> {
    it: Option<DBRawIteratorWithThreadMode<'a, DB>>,
    /// A single key's entry, looked up instead of iterated.
    single: Option<(Vec<u8>, Current)>,
    range: KeyRange,
}

impl<'a> LiveKeys<'a> {
    fn new(view: &ReadView<'a>, range: &KeyRange) -> Result<Self, StoreError> {
        let (it, single) = match range {
            KeyRange::Single(k) => (None, view.current(k)?.map(|c| (k.clone(), c))),
            KeyRange::Between(k, e) if e.as_slice() <= k.as_slice() => (None, None),
            KeyRange::FromKey(k) | KeyRange::Between(k, _) => {
                let mut opts = view.read_opts();
                if let KeyRange::Between(_, e) = range {
                    opts.set_iterate_upper_bound(e.clone());
                }
                let mut it = view.db().raw_iterator_cf_opt(view.cf(CF_LATEST)?, opts);
                it.seek(k);
                (Some(it), None)
            }
        };
        Ok(LiveKeys {
            it,
            single,
            range: range.clone(),
        })
    }

    /// The next live key and its index entry, without moving past it.
    fn peek(&mut self) -> Result<Option<(Vec<u8>, Current)>, StoreError> {
        let Some(it) = &self.it else {
            return Ok(self.single.clone());
        };
        match (it.key(), it.value()) {
            // The index's marker is the empty key, never in a user range.
            (Some(k), Some(v)) if !k.is_empty() && self.range.contains(k) => {
                Ok(Some((k.to_vec(), Current::decode(v)?)))
            }
            _ => {
                it.status()?;
                Ok(None)
            }
        }
    }

    fn advance(&mut self) {
        match &mut self.it {
            Some(it) => it.next(),
            None => self.single = None,
        }
    }
}

/// The key-value etcd reports in a delete event.
fn tombstone(key: &[u8], revision: i64) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        mod_revision: revision,
        ..Default::default()
    }
}

/// Seeks `it` (over the `kv` column family) to the newest version of `key`
/// at `rev`, tombstones included, and reads its stored bytes with `read`.
fn stored_version<T>(
    it: &mut DBRawIteratorWithThreadMode<'_, DB>,
    key: &[u8],
    rev: i64,
    read: impl FnOnce(&[u8]) -> T,
) -> Result<Option<T>, StoreError> {
    let prefix = key_prefix(key);
    it.seek(seek_key_at(key, rev));
    let found = match (it.key(), it.value()) {
        (Some(k), Some(v)) if k.len() == prefix.len() + 16 && k.starts_with(&prefix) => {
            Some(read(v))
        }
        _ => None,
    };
    it.status()?;
    Ok(found)
}

fn decode_live(key: &[u8], stored: &[u8]) -> Result<Option<KeyValue>, StoreError> {
    match stored.first() {
        Some(&TAG_PUT) => {
            let mut kv = KeyValue::decode(&stored[1..])?;
            kv.key = key.to_vec();
            Ok(Some(kv))
        }
        Some(&TAG_TOMBSTONE) => Ok(None),
        _ => Err(StoreError::Corrupt("unknown version tag".into())),
    }
}

/// A transaction: reads see the transaction's own earlier writes, every write
/// gets the next revision `(begin + 1, sub)`, and nothing is visible to others
/// until [`Store::commit`].
pub struct WriteTxn<'a> {
    view: ReadView<'a>,
    /// The store's revision when the transaction began.
    base_rev: i64,
    begin_rev: i64,
    changes: i64,
    /// Each key's state after this transaction's writes (None = deleted).
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Current versions read ahead in one lookup ([`WriteTxn::prefetch_current`]),
    /// as of this transaction's view; the overlay takes precedence.
    prefetched: HashMap<Vec<u8>, Option<Current>>,
    batch: WriteBatch,
    /// Watch events of this transaction's writes, with their previous values.
    events: Vec<Event>,
}

impl<'a> WriteTxn<'a> {
    /// The revision reads in this transaction see: etcd's `beginRev`, plus one
    /// once the transaction has written something.
    pub fn read_rev(&self) -> i64 {
        self.begin_rev + i64::from(self.changes > 0)
    }

    pub fn begin_rev(&self) -> i64 {
        self.begin_rev
    }

    pub fn compact_rev(&self) -> i64 {
        self.view.compact_rev
    }

    pub fn has_changes(&self) -> bool {
        self.changes > 0
    }

    /// Ends one request of several applied in this transaction (see
    /// `StateMachine`'s put runs): its writes keep their revision, the next
    /// request's get the one after, and it reads what this one wrote.
    /// Returns the request's revision and its watch events.
    pub fn seal_request(&mut self) -> (i64, Vec<Event>) {
        let rev = self.read_rev();
        self.begin_rev = rev;
        self.changes = 0;
        (rev, std::mem::take(&mut self.events))
    }

    /// The newest live version of `key` as this transaction sees it.
    pub fn latest(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        if let Some(state) = self.overlay.get(key) {
            return Ok(state.clone());
        }
        // Outside the overlay the transaction sees its view's state, which
        // is what the index holds: nothing but this transaction's own commit
        // writes while it is open (the apply path is single).
        match self.current_in_view(key)? {
            Some(current) => self.view.version(key, current.rev),
            None => Ok(None),
        }
    }

    /// The index's entry for `key` as of this transaction's view (not its
    /// own writes): read ahead by [`Self::prefetch_current`], or looked up.
    fn current_in_view(&self, key: &[u8]) -> Result<Option<Current>, StoreError> {
        match self.prefetched.get(key) {
            Some(current) => Ok(*current),
            None => self.view.current(key),
        }
    }

    /// Like [`ReadView::range`], with this transaction's writes visible when
    /// reading at its own revision.
    pub fn range(
        &self,
        range: &KeyRange,
        rev: i64,
        limit: usize,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, usize), StoreError> {
        let touched = self.overlay.keys().any(|k| range.contains(k));
        if rev != self.read_rev() || !touched {
            return self
                .view
                .range(range, rev.min(self.begin_rev), limit, count_only);
        }
        let (base, _) = self.view.range(range, self.begin_rev, 0, false)?;
        let mut merged: BTreeMap<Vec<u8>, KeyValue> =
            base.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        for (k, state) in self.overlay.iter().filter(|(k, _)| range.contains(k)) {
            match state {
                Some(kv) => merged.insert(k.clone(), kv.clone()),
                None => merged.remove(k),
            };
        }
        let count = merged.len();
        let take = if count_only {
            0
        } else if limit == 0 {
            count
        } else {
            limit
        };
        Ok((merged.into_values().take(take).collect(), count))
    }

    /// Reads the current versions of `keys` in one batched lookup, for the
    /// puts that follow: one `MultiGet` looks through the memtables and
    /// files once for all of them, where a `Get` per put repeats that for
    /// each. Keys this transaction already wrote are skipped (the overlay
    /// answers for them).
    pub fn prefetch_current(&mut self, mut keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        keys.retain(|k| !k.is_empty() && !self.overlay.contains_key(k));
        keys.sort_unstable();
        keys.dedup();
        if keys.len() < 2 {
            return Ok(()); // One Get is as good.
        }
        let found = self.view.db.batched_multi_get_cf_opt(
            self.view.cf(CF_LATEST)?,
            &keys,
            true,
            &self.view.read_opts(),
        );
        for (key, raw) in keys.into_iter().zip(found) {
            let current = raw?.map(|raw| Current::decode(&raw)).transpose()?;
            self.prefetched.insert(key, current);
        }
        Ok(())
    }

    /// Writes a new version of `key`; returns it.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<KeyValue, StoreError> {
        if key.is_empty() {
            // Never a user key (etcd rejects it before this): the empty key
            // holds the current-version index's marker.
            return Err(StoreError::EmptyKey);
        }
        let rev = Revision {
            main: self.begin_rev + 1,
            sub: self.changes,
        };
        // Only the previous version's metadata: its value is read when a
        // request (see `apply::put`) or a watcher (`service::watch`) asks
        // for it, as etcd does, not on every put.
        let (create_revision, version, prev_lease, prev_kv) = match self.overlay.get(key) {
            Some(Some(kv)) => (kv.create_revision, kv.version, kv.lease, Some(kv.clone())),
            Some(None) => (rev.main, 0, 0, None),
            None => match self.current_in_view(key)? {
                Some(c) => (c.create_revision, c.version, c.lease, None),
                None => (rev.main, 0, 0, None),
            },
        };
        let kv = KeyValue {
            key: Vec::new(),
            create_revision,
            mod_revision: rev.main,
            version: version + 1,
            value,
            lease,
        };
        let mut stored = Vec::with_capacity(kv.encoded_len() + 1);
        stored.push(TAG_PUT);
        kv.encode(&mut stored)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.batch
            .put_cf(self.view.cf(CF_KV)?, version_key(key, rev), stored);
        self.batch.put_cf(
            self.view.cf(CF_LATEST)?,
            key,
            Current::of(&kv, rev).encode(),
        );
        self.index_revision(rev, TAG_PUT, key)?;
        self.reattach(key, prev_lease, lease)?;
        let kv = KeyValue {
            key: key.to_vec(),
            ..kv
        };
        self.overlay.insert(key.to_vec(), Some(kv.clone()));
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv.clone()),
            // What the overlay already holds, else left for the watch
            // service to read for the watchers that want it.
            prev_kv,
        });
        Ok(kv)
    }

    /// Deletes every live key in `range`, in key order, each with its own
    /// sub-revision. Values are read only when `with_values` asks for the
    /// previous key-values (a request's `prev_kv`): otherwise the keys come
    /// from the current-version index and this transaction's own writes, so
    /// deleting a large range costs its keys, not its data. Delete events
    /// carry the previous version only when this transaction wrote it (the
    /// watch service reads it for the watchers that ask, as for puts).
    pub fn delete_range(
        &mut self,
        range: &KeyRange,
        with_values: bool,
    ) -> Result<Deleted, StoreError> {
        let mut deleted = Deleted::default();
        // This transaction's own writes in the range, in key order.
        let own: Vec<(Vec<u8>, Option<KeyValue>)> = match range {
            KeyRange::Single(k) => self
                .overlay
                .get(k)
                .map(|state| (k.clone(), state.clone()))
                .into_iter()
                .collect(),
            _ => self
                .overlay
                .iter()
                .filter(|(k, _)| range.contains(k))
                .map(|(k, state)| (k.clone(), state.clone()))
                .collect(),
        };
        let mut own = own.into_iter().peekable();
        let mut indexed = LiveKeys::new(&self.view, range)?;
        loop {
            let from_index = indexed.peek()?;
            let take_own = match (own.peek(), &from_index) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((ok, _)), Some((ik, _))) => ok.as_slice() <= ik.as_slice(),
            };
            if take_own {
                let Some((key, state)) = own.next() else {
                    break;
                };
                if from_index.as_ref().is_some_and(|(ik, _)| *ik == key) {
                    indexed.advance(); // The transaction's write replaces it.
                }
                if let Some(prev) = state {
                    self.delete_one(&key, Prev::Written(prev), with_values, &mut deleted)?;
                }
            } else if let Some((key, current)) = from_index {
                indexed.advance();
                self.delete_one(&key, Prev::Indexed(current), with_values, &mut deleted)?;
            }
        }
        Ok(deleted)
    }

    /// Writes the tombstone of live key `key`, whose current version is `prev`.
    fn delete_one(
        &mut self,
        key: &[u8],
        prev: Prev,
        with_values: bool,
        deleted: &mut Deleted,
    ) -> Result<(), StoreError> {
        let rev = Revision {
            main: self.begin_rev + 1,
            sub: self.changes,
        };
        self.batch
            .put_cf(self.view.cf(CF_KV)?, version_key(key, rev), [TAG_TOMBSTONE]);
        self.batch.delete_cf(self.view.cf(CF_LATEST)?, key);
        self.index_revision(rev, TAG_TOMBSTONE, key)?;
        let (lease, written) = match &prev {
            Prev::Written(kv) => (kv.lease, Some(kv.clone())),
            Prev::Indexed(current) => (current.lease, None),
        };
        self.reattach(key, lease, 0)?;
        if with_values {
            let prev_kv = match prev {
                Prev::Written(kv) => Some(kv),
                Prev::Indexed(current) => self.view.version(key, current.rev)?,
            };
            deleted.prev_kvs.extend(prev_kv);
        }
        self.overlay.insert(key.to_vec(), None);
        self.events.push(Event {
            r#type: EventType::Delete as i32,
            kv: Some(tombstone(key, rev.main)),
            // Read for watchers that want it unless written here, where a
            // read at the revision before would find an older version.
            prev_kv: written,
        });
        deleted.count += 1;
        Ok(())
    }

    /// Records `rev` in the revision index and counts the change.
    fn index_revision(&mut self, rev: Revision, tag: u8, key: &[u8]) -> Result<(), StoreError> {
        let mut entry = Vec::with_capacity(key.len() + 1);
        entry.push(tag);
        entry.extend_from_slice(key);
        self.batch
            .put_cf(self.view.cf(CF_REV)?, rev_key(rev), entry);
        self.changes += 1;
        Ok(())
    }

    pub(super) fn view(&self) -> &ReadView<'a> {
        &self.view
    }

    pub(super) fn batch_mut(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::errors::EtcdError;

    /// A store on a fresh RocksDB in a temporary directory.
    pub(crate) fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        (dir, Store::open(db).unwrap())
    }

    fn put(s: &Store, k: &str, v: &str) -> i64 {
        let mut t = s.write_txn();
        t.put(k.as_bytes(), v.as_bytes().to_vec(), 0).unwrap();
        s.commit(t, |_| Ok(())).unwrap();
        s.current_rev()
    }

    fn del(s: &Store, k: &str) -> usize {
        let mut t = s.write_txn();
        let n = t
            .delete_range(&KeyRange::new(k.as_bytes(), b""), false)
            .unwrap()
            .count;
        s.commit(t, |_| Ok(())).unwrap();
        n
    }

    fn value_at(s: &Store, k: &str, rev: i64) -> Option<String> {
        s.read_view()
            .get(k.as_bytes(), rev)
            .unwrap()
            .map(|kv| String::from_utf8(kv.value).unwrap())
    }

    /// Writes the `kv` and `latest` memtables out to new SST files.
    fn flush_kv(s: &Store) {
        for cf in [CF_KV, CF_LATEST] {
            s.db().flush_cf(s.db().cf_handle(cf).unwrap()).unwrap();
        }
    }

    /// Every entry of the current-version index, marker included.
    fn index_entries(s: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        s.db()
            .iterator_cf(
                s.db().cf_handle(CF_LATEST).unwrap(),
                rocksdb::IteratorMode::Start,
            )
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// A history with overwrites, deletes, re-creations, a lease and a
    /// compaction, spread over several SST files.
    fn varied_history(s: &Store) {
        put(s, "a", "1");
        put(s, "b", "1");
        flush_kv(s);
        put(s, "a", "2");
        del(s, "b");
        put(s, "c\0d", "1");
        flush_kv(s);
        put(s, "b", "again");
        let mut t = s.write_txn();
        t.grant_lease(7, 60).unwrap();
        t.put(b"leased", b"v".to_vec(), 7).unwrap();
        s.commit(t, |_| Ok(())).unwrap();
        del(s, "c\0d");
        let rev = s.current_rev() - 1;
        s.compact_now(rev).unwrap();
        put(s, "a", "3");
    }

    fn raw_versions(s: &Store) -> usize {
        s.db()
            .iterator_cf(
                s.db().cf_handle(CF_KV).unwrap(),
                rocksdb::IteratorMode::Start,
            )
            .count()
    }

    #[test]
    fn versions_revisions_and_tombstones() {
        let (_d, s) = store();
        assert_eq!(s.current_rev(), INITIAL_REVISION);
        assert_eq!(put(&s, "a", "1"), 2);
        assert_eq!(put(&s, "a", "2"), 3);
        assert_eq!(put(&s, "b", "x"), 4);
        assert_eq!(del(&s, "a"), 1);
        assert_eq!(s.current_rev(), 5);
        assert_eq!(value_at(&s, "a", 2).as_deref(), Some("1"));
        assert_eq!(value_at(&s, "a", 4).as_deref(), Some("2"));
        assert_eq!(value_at(&s, "a", 5), None);

        let kv = s.read_view().get(b"a", 3).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
        put(&s, "a", "3");
        let kv = s.read_view().get(b"a", 6).unwrap().unwrap();
        assert_eq!(
            (kv.create_revision, kv.version),
            (6, 1),
            "a re-created key starts over"
        );

        let view = s.read_view();
        let (kvs, count) = view
            .range(&KeyRange::new(b"\0", b"\0"), 4, 1, false)
            .unwrap();
        assert_eq!((kvs.len(), count), (1, 2));
        assert_eq!(kvs[0].key, b"a");
        let (kvs, count) = view.range(&KeyRange::new(b"a", b"b"), 6, 0, true).unwrap();
        assert_eq!((kvs.len(), count), (0, 1));
    }

    #[test]
    fn deleting_nothing_creates_no_revision() {
        let (_d, s) = store();
        put(&s, "a", "1");
        assert_eq!(del(&s, "missing"), 0);
        assert_eq!(s.current_rev(), 2);
    }

    #[test]
    fn one_keys_many_versions_are_compacted_in_small_batches() {
        let (_d, s) = store();
        for i in 0..50 {
            put(&s, "hot", &i.to_string()); // revisions 2..=51
        }
        put(&s, "other", "x"); // 52
        s.schedule_compact(40, |_| Ok(())).unwrap();
        let (mut from, mut batches, mut removed) = (CompactCursor::default(), 0, 0);
        loop {
            let (n, next) = s.compact_step(40, &from, 3).unwrap();
            assert!(n <= 3, "{n}");
            removed += n;
            batches += 1;
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
        assert_eq!(removed, 38, "hot@2..=39 go, hot@40 stays");
        assert!(batches >= 13, "{batches}");
        assert_eq!(raw_versions(&s), 50 - 38 + 1);
        assert_eq!(value_at(&s, "hot", 40).as_deref(), Some("38"));
        assert_eq!(value_at(&s, "hot", 51).as_deref(), Some("49"));
    }

    #[test]
    fn compaction_keeps_each_keys_newest_version_and_drops_tombstones() {
        let (_d, s) = store();
        put(&s, "a", "1"); // 2
        put(&s, "a", "2"); // 3
        put(&s, "b", "x"); // 4
        del(&s, "b"); // 5
        put(&s, "c", "y"); // 6
        assert_eq!(raw_versions(&s), 5);
        s.check_compact(5).unwrap();
        assert_eq!(s.compaction_pending().unwrap(), None);
        s.schedule_compact(5, |_| Ok(())).unwrap();
        assert_eq!(s.compact_rev(), 5, "reads below 5 refused at once");
        assert_eq!(raw_versions(&s), 5, "nothing deleted yet");
        assert_eq!(s.compaction_pending().unwrap(), Some(5));
        // Batches of one: a key's versions are split between batches, and
        // each key still keeps its newest version.
        let (mut from, mut batches) = (CompactCursor::default(), 0);
        loop {
            let (_, next) = s.compact_step(5, &from, 1).unwrap();
            batches += 1;
            match next {
                Some(k) => from = k,
                None => break,
            }
        }
        assert!(batches > 1, "{batches}");
        s.finish_compaction(5).unwrap();
        assert_eq!(s.compaction_pending().unwrap(), None);
        assert_eq!(raw_versions(&s), 2, "a@3 and c@6 remain");
        assert_eq!(s.compact_rev(), 5);
        assert_eq!(value_at(&s, "a", 5).as_deref(), Some("2"));
        assert_eq!(s.check_compact(5), Err(EtcdError::Compacted));
        assert_eq!(s.check_compact(7), Err(EtcdError::FutureRev));
        // survives reopening
        let db = s.db().clone();
        drop(s);
        let s = Store::open(db).unwrap();
        assert_eq!((s.current_rev(), s.compact_rev()), (6, 5));
    }

    #[test]
    fn a_transaction_reads_its_own_writes() {
        let (_d, s) = store();
        put(&s, "a", "1");
        let mut t = s.write_txn();
        t.put(b"b", b"2".to_vec(), 0).unwrap();
        let all = KeyRange::new(b"\0", b"\0");
        let (kvs, count) = t.range(&all, t.read_rev(), 0, false).unwrap();
        assert_eq!(count, 2);
        assert_eq!(kvs[1].mod_revision, 3);
        t.delete_range(&KeyRange::new(b"a", b""), false).unwrap();
        let (kvs, _) = t.range(&all, t.read_rev(), 0, false).unwrap();
        assert_eq!(
            kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
            vec![b"b".to_vec()]
        );
        // the store itself is unchanged until commit
        assert_eq!(s.current_rev(), 2);
        assert_eq!(value_at(&s, "b", 3), None);
        s.commit(t, |_| Ok(())).unwrap();
        assert_eq!(s.current_rev(), 3);
        assert_eq!(value_at(&s, "a", 3), None);
    }

    /// Lookups of a key's versions find it in whichever SST file holds it,
    /// and scans see every key, across files and the memtable.
    #[test]
    fn versions_and_scans_are_found_across_sst_files() {
        let (_d, s) = store();
        // Keys that are prefixes of each other, and one with a NUL byte.
        put(&s, "a", "1");
        put(&s, "ab", "1");
        flush_kv(&s);
        put(&s, "a\0b", "1");
        put(&s, "b", "1");
        flush_kv(&s);
        put(&s, "ab", "2");
        put(&s, "c", "1");
        // "a" lives only in the first file, "ab" in it and the memtable; one
        // transaction looks all of them up.
        let mut t = s.write_txn();
        for (key, version) in [
            ("a", 2),
            ("ab", 3),
            ("a\0b", 2),
            ("b", 2),
            ("c", 2),
            ("d", 1),
        ] {
            let kv = t.put(key.as_bytes(), b"x".to_vec(), 0).unwrap();
            assert_eq!(kv.version, version, "version of {key:?}");
        }
        s.commit(t, |_| Ok(())).unwrap();
        // (The first put is revision 2.)
        assert_eq!(value_at(&s, "a", 2), Some("1".into()));
        assert_eq!(value_at(&s, "ab", 2), None);
        assert_eq!(value_at(&s, "ab", 5), Some("1".into()));
        assert_eq!(value_at(&s, "ab", 6), Some("2".into()));
        assert_eq!(value_at(&s, "e", s.current_rev()), None);
        let view = s.read_view();
        let (kvs, count) = view
            .range(&KeyRange::new(b"\0", b"\0"), view.rev, 0, false)
            .unwrap();
        assert_eq!(count, 6);
        let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(keys, [&b"a"[..], b"a\0b", b"ab", b"b", b"c", b"d"]);
        assert_eq!(raw_versions(&s), 12);
    }

    /// A scan at an old revision skips each key's newer versions with a seek
    /// inside that key; it must still go on to keys in files that do not
    /// hold that key.
    #[test]
    fn scans_at_old_revisions_see_keys_in_every_file() {
        let (_d, s) = store();
        let long = "a-key-longer-than-a-revision-suffix";
        put(&s, "z", "1");
        flush_kv(&s);
        put(&s, long, "1");
        put(&s, "b", "1");
        flush_kv(&s);
        put(&s, long, "2");
        put(&s, "b", "2");
        let view = s.read_view();
        for start in [&b"\0"[..], long.as_bytes()] {
            let (kvs, count) = view
                .range(&KeyRange::new(start, b"\0"), 4, 0, false)
                .unwrap();
            let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
            assert_eq!(keys, [long.as_bytes(), b"b", b"z"], "from {start:?}");
            assert_eq!(count, 3);
            assert!(kvs.iter().all(|kv| kv.value == b"1"));
        }
    }

    /// The index points at each live key's newest version, with its create
    /// revision, version and lease, and holds nothing for deleted keys.
    #[test]
    fn the_current_version_index_follows_puts_deletes_and_compaction() {
        let (_d, s) = store();
        varied_history(&s);
        let view = s.read_view();
        for key in ["a", "b", "leased"] {
            let current = view.current(key.as_bytes()).unwrap().unwrap();
            let kv = view.get(key.as_bytes(), view.rev).unwrap().unwrap();
            assert_eq!(current.rev.main, kv.mod_revision, "{key}");
            assert_eq!(
                (current.create_revision, current.version, current.lease),
                (kv.create_revision, kv.version, kv.lease),
                "{key}"
            );
        }
        let a = view.get(b"a", view.rev).unwrap().unwrap();
        assert_eq!((a.version, a.value.as_slice()), (3, &b"3"[..]));
        let b = view.get(b"b", view.rev).unwrap().unwrap();
        assert_eq!(b.version, 1, "b was re-created after its delete");
        assert_eq!(view.current(b"leased").unwrap().unwrap().lease, 7);
        assert_eq!(view.current(b"c\0d").unwrap(), None);
        assert_eq!(view.current(b"never").unwrap(), None);
        // Reads at older revisions still see the history.
        assert_eq!(value_at(&s, "a", 2).as_deref(), None, "compacted away");
        assert_eq!(value_at(&s, "a", s.current_rev() - 1).as_deref(), Some("2"));
        // Live keys, and the marker.
        assert_eq!(index_entries(&s).len(), 4);
    }

    /// A data directory from before the index (or with its marker lost part
    /// way through a rebuild) gets the same index as one that always had it.
    #[test]
    fn a_missing_index_is_rebuilt_from_the_history_on_open() {
        let (_d, s) = store();
        varied_history(&s);
        let expected = index_entries(&s);
        latest::clear(s.db()).unwrap();
        assert!(index_entries(&s).is_empty());
        let db = s.db().clone();
        drop(s);
        let s = Store::open(db).unwrap();
        assert_eq!(index_entries(&s), expected);
        // Puts go on from the rebuilt index.
        let mut t = s.write_txn();
        let kv = t.put(b"a", b"4".to_vec(), 0).unwrap();
        assert_eq!(kv.version, 4);
        let kv = t.put(b"c\0d", b"new".to_vec(), 0).unwrap();
        assert_eq!(kv.version, 1);
    }

    /// Snapshots do not carry the index: restoring one replaces it, in the
    /// same batch, with one built from the restored data.
    #[test]
    fn a_restored_snapshot_gets_an_index_of_its_own_data() {
        let (_d, source) = store();
        varied_history(&source);
        let dump = crate::snapshot::dump(source.db()).unwrap();
        let (_d2, target) = store();
        put(&target, "only-in-target", "x");
        crate::snapshot::restore(target.db(), &dump[..], |_| false).unwrap();
        assert_eq!(index_entries(&target), index_entries(&source));
    }

    /// Installing a snapshot is one step for readers: every read view sees
    /// either the old state at the old revision or the new state at the new
    /// one, never the new data at the old revision (whatever the size of
    /// the snapshot, whose index used to be rebuilt in between).
    #[test]
    fn readers_see_a_snapshot_install_as_one_step() {
        let (_d, source) = store();
        put(&source, "a", "new");
        let mut t = source.write_txn();
        for i in 0..100_000u32 {
            t.put(format!("k{i:06}").as_bytes(), vec![b'v'; 16], 0)
                .unwrap();
        }
        source.commit(t, |_| Ok(())).unwrap();
        let new_rev = source.current_rev();
        let dump = crate::snapshot::dump(source.db()).unwrap();

        let (_d2, target) = store();
        put(&target, "a", "old");
        let old_rev = target.current_rev();
        assert_eq!(old_rev, 2, "\"a\" is at revision 2 in both stores");
        let target = Arc::new(target);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (target, done) = (target.clone(), done.clone());
            std::thread::spawn(move || {
                let mut views = 0;
                while !done.load(Ordering::SeqCst) {
                    let view = target.read_view();
                    let a = view.get(b"a", view.rev).unwrap().map(|kv| kv.value);
                    let expected: &[u8] = if view.rev == old_rev { b"old" } else { b"new" };
                    assert_eq!(a.as_deref(), Some(expected), "at revision {}", view.rev);
                    views += 1;
                }
                views
            })
        };
        let batch = crate::snapshot::restore_batch(target.db(), &dump[..], |_| false).unwrap();
        target.install(batch).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        done.store(true, Ordering::SeqCst);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(target.current_rev(), new_rev);
    }

    /// A delete of a range reads no values unless the previous key-values
    /// are asked for: its events carry none (the watch service reads them
    /// for the watchers that want them), so deleting a large range costs
    /// its keys, not its data. A key written earlier in the same
    /// transaction keeps the version it had there as its event's previous
    /// one (a read at the revision before would find an older version).
    #[test]
    fn deleting_a_range_reads_values_only_when_asked_for() {
        let (_d, s) = store();
        let mut t = s.write_txn();
        for i in 0..50u32 {
            t.put(format!("big/{i:02}").as_bytes(), vec![7; 4096], 0)
                .unwrap();
        }
        t.put(b"other", b"x".to_vec(), 0).unwrap();
        s.commit(t, |_| Ok(())).unwrap();
        let range = KeyRange::new(b"big/", b"big0");

        let mut t = s.write_txn();
        let deleted = t.delete_range(&range, false).unwrap();
        assert_eq!((deleted.count, deleted.prev_kvs.len()), (50, 0));
        assert!(t.events.iter().all(|e| e.prev_kv.is_none()));
        let keys: Vec<Vec<u8>> = t.events.iter().map(|e| e.kv.clone().unwrap().key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "deleted in key order");
        drop(t);

        // Asked for, the previous values come back (and still not in events).
        let mut t = s.write_txn();
        t.put(b"big/new", b"fresh".to_vec(), 0).unwrap();
        t.delete_range(&KeyRange::new(b"big/00", b""), false)
            .unwrap();
        let deleted = t.delete_range(&range, true).unwrap();
        assert_eq!(deleted.count, 50, "49 left from before, and big/new");
        assert!(deleted.prev_kvs[..49]
            .iter()
            .all(|kv| kv.value == vec![7; 4096]));
        assert_eq!(deleted.prev_kvs[49].value, b"fresh");
        let new_event = t
            .events
            .iter()
            .rfind(|e| e.kv.as_ref().unwrap().key == b"big/new");
        assert_eq!(
            new_event
                .unwrap()
                .prev_kv
                .as_ref()
                .map(|kv| kv.value.clone()),
            Some(b"fresh".to_vec()),
            "written in this transaction: its event carries it"
        );
        s.commit(t, |_| Ok(())).unwrap();
        let view = s.read_view();
        assert_eq!(view.range(&range, view.rev, 0, true).unwrap().1, 0);
        assert!(view.get(b"other", view.rev).unwrap().is_some());
    }

    #[test]
    fn the_empty_key_is_refused() {
        let (_d, s) = store();
        let mut t = s.write_txn();
        assert!(matches!(
            t.put(b"", b"v".to_vec(), 0),
            Err(StoreError::EmptyKey)
        ));
    }
}
