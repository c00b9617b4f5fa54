//! Opening the RocksDB instance that holds the applied state.
//!
//! One database, several column families, so a single `WriteBatch` can update
//! MVCC data and the applied index atomically.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, DB};

/// MVCC history: see [`crate::mvcc::encoding`].
pub const CF_KV: &str = "kv";
/// Revision index of the MVCC history: `main ‖ sub → tag ‖ user key`, so
/// watchers can replay events in revision order.
pub const CF_REV: &str = "rev";
/// Store-wide metadata: revisions, applied log id, membership, alarms, identity.
pub const CF_META: &str = "meta";
/// Leases (empty until the lease service lands; puts with a lease look here).
pub const CF_LEASE: &str = "lease";
/// Users, roles and the auth switch: see [`crate::auth::store`].
pub const CF_AUTH: &str = "auth";
/// This member's identity (member and cluster ids). The Raft log, vote and
/// commit index live in the WAL (`tessera_storage::wal`), not here.
pub const CF_RAFT_STATE: &str = "raft_state";
/// Each live key's current version: see [`crate::mvcc::latest`]. Derived from
/// `kv`, so not part of snapshots.
pub const CF_LATEST: &str = "latest";

/// Column families that make up the state machine (what snapshots carry).
/// (New families go at the end: a snapshot names them by position.)
pub const STATE_MACHINE_CFS: [&str; 5] = [CF_KV, CF_META, CF_LEASE, CF_REV, CF_AUTH];

const ALL_CFS: [&str; 7] = [
    CF_KV,
    CF_META,
    CF_LEASE,
    CF_REV,
    CF_AUTH,
    CF_RAFT_STATE,
    CF_LATEST,
];

/// The most RocksDB's own WAL may hold before the column families it
/// keeps alive are flushed. Every applied batch writes `meta` (revision,
/// applied index), whose memtable almost never fills; without a bound a WAL
/// file can only be deleted once every family with data in it has flushed,
/// so the WAL grew to RocksDB's default bound (four times all memtables,
/// over 1.5 GiB here): disk and restart time spent on data that is already
/// in SST files or in the Raft log. Twice the `kv` memtable keeps the
/// forced flushes of the small families rare.
pub const MAX_TOTAL_WAL_BYTES: u64 = 64 << 20;

/// Opens (creating if needed) the database under `dir`.
pub fn open(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    open_with_wal_bound(dir, MAX_TOTAL_WAL_BYTES)
}

/// [`open`] with a given bound on RocksDB's WAL (tests use a small one).
fn open_with_wal_bound(dir: &Path, max_total_wal_bytes: u64) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // Writes to the state machine are not synced individually: the Raft log
    // (synced) is the source of truth and RocksDB's WAL recovers a consistent
    // prefix after a process crash; on restart, entries after the persisted
    // applied index are applied again. The WAL is buffered in memory and
    // written once per applied batch of entries (`Store::flush_wal`) rather
    // than with a write syscall per request; synced writes still flush it.
    opts.set_manual_wal_flush(true);
    if tessera_storage::failpoint::is_on("state-machine-writes-unsynced-lost") {
        // Keep the whole unsynced WAL in the process (see `Store::flush_wal`),
        // not just what RocksDB's write buffer happens to hold.
        opts.set_writable_file_max_buffer_size(256 << 20);
    }
    opts.set_max_total_wal_size(max_total_wal_bytes);
    let cfs = ALL_CFS.iter().map(|name| {
        let mut cf_opts = Options::default();
        cf_opts.set_write_buffer_size(32 << 20);
        if *name == CF_KV || *name == CF_LATEST {
            // Puts look up exact keys here (a key's current version, then
            // that version's value): whole-key bloom filters let the lookup
            // skip every file that does not hold the key.
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            cf_opts.set_block_based_table_factory(&table);
        }
        if *name == CF_LATEST {
            // Small entries (about 50 bytes a key): a smaller memtable keeps
            // the index from adding a full memtable's worth of memory.
            cf_opts.set_write_buffer_size(8 << 20);
        }
        ColumnFamilyDescriptor::new(*name, cf_opts)
    });
    let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
    Ok(Arc::new(db))
}

/// Adds the deletion of every entry of `cf` to `batch`, so that emptying a
/// family commits atomically with whatever else the batch writes.
pub fn delete_all_into(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    batch: &mut rocksdb::WriteBatch,
) -> Result<(), rocksdb::Error> {
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    while let Some(k) = it.key() {
        batch.delete_cf(cf, k);
        it.next();
    }
    it.status()
}

/// Bytes the database occupies on disk: SST files plus memtables.
pub fn total_size(db: &DB) -> u64 {
    sum_property(db, "rocksdb.total-sst-files-size")
        + sum_property(db, "rocksdb.cur-size-all-mem-tables")
}

/// Estimated bytes of live data (what survives a full compaction).
pub fn live_size(db: &DB) -> u64 {
    sum_property(db, "rocksdb.estimate-live-data-size")
        + sum_property(db, "rocksdb.cur-size-all-mem-tables")
}

fn sum_property(db: &DB, name: &str) -> u64 {
    ALL_CFS
        .iter()
        .filter_map(|cf| db.cf_handle(cf))
        .filter_map(|h| db.property_int_value_cf(h, name).ok().flatten())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Bytes in RocksDB's WAL files under `dir`.
    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Writes 8 MiB the way applied batches do: history in `kv`, a small
    /// overwrite in `meta` with every batch. Returns the WAL's size, once
    /// under three times the bound (or after 10 s) when there is one:
    /// RocksDB checks the bound before a write, then flushes what holds the
    /// oldest file, so the WAL can stay above it by the files in flight.
    fn wal_after_applied_batches(max_total_wal_bytes: u64) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let db = open_with_wal_bound(dir.path(), max_total_wal_bytes).unwrap();
        let (kv, meta) = (db.cf_handle(CF_KV).unwrap(), db.cf_handle(CF_META).unwrap());
        for i in 0u32..512 {
            let mut batch = rocksdb::WriteBatch::default();
            batch.put_cf(kv, i.to_be_bytes(), vec![7u8; 16 << 10]);
            batch.put_cf(meta, b"applied", i.to_be_bytes());
            db.write(batch).unwrap();
            db.flush_wal(false).unwrap();
        }
        // RocksDB checks the bound when a write comes: small writes go on
        // while its background flushes free the old files.
        let deadline = Instant::now() + Duration::from_secs(10);
        let bounded = max_total_wal_bytes > 0;
        while bounded
            && wal_bytes(dir.path()) > 3 * max_total_wal_bytes
            && Instant::now() < deadline
        {
            db.put_cf(meta, b"applied", b"more").unwrap();
            db.flush_wal(false).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        wal_bytes(dir.path())
    }

    #[test]
    fn the_wal_stays_bounded_though_meta_never_fills_its_memtable() {
        let bound = 1 << 20;
        let bounded = wal_after_applied_batches(bound);
        assert!(bounded <= 3 * bound, "WAL holds {bounded} bytes");
        // RocksDB's own default keeps all of it: the bound is what frees it.
        let unbounded = wal_after_applied_batches(0);
        assert!(unbounded >= 8 << 20, "WAL holds only {unbounded} bytes");
    }
}
