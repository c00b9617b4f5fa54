//! The current-version index: for every live key, where its newest version
//! is and what a put needs to know about it, in the `latest` column family:
//!
//! ```text
//! user key   →   main ‖ sub ‖ create_revision ‖ version ‖ lease   (5 × i64 BE)
//! ```
//!
//! A put must know the key's current create revision, version and lease.
//! Finding them in the `kv` history means an iterator seek, which positions
//! every sorted run (memtable, each L0 file, each level) and reads a block
//! from each; with a history spread over many files that seek was the
//! largest cost of a put. Here it is a point `Get`, which bloom filters let
//! skip every file without the key. The previous value is read only when
//! something asks for it: a request's `prev_kv` or `ignore_value` (one more
//! point `Get`, of that exact version) or a watcher's `prev_kv` (read by the
//! watch service, as etcd's watch stream does).
//!
//! The index holds live keys only: a delete removes the entry, so compaction
//! (which keeps each live key's newest version) never leaves one dangling.
//! It is derived data: snapshots do not carry it, and it is rebuilt from
//! `kv` whenever [`BUILT_MARKER`] is missing (a data directory from before
//! the index, or a snapshot just restored).

use prost::Message;
use rocksdb::{WriteBatch, DB};
use tessera_proto::mvccpb::KeyValue;

use super::encoding::{after_all_versions, split_version_key, Revision, TAG_PUT};
use super::StoreError;
use crate::db::{CF_KV, CF_LATEST};

/// Present (under the empty key, which etcd never accepts as a user key) once
/// the index is complete.
pub const BUILT_MARKER: &[u8] = b"";
const MARKER_VALUE: &[u8] = b"1";
const ENTRY_LEN: usize = 40;
/// Entries written per batch while rebuilding.
const REBUILD_BATCH: usize = 10_000;

/// What the index knows about a live key's newest version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    pub rev: Revision,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl Current {
    pub fn of(kv: &KeyValue, rev: Revision) -> Self {
        Current {
            rev,
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }

    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        let fields = [
            self.rev.main,
            self.rev.sub,
            self.create_revision,
            self.version,
            self.lease,
        ];
        for (chunk, field) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&field.to_be_bytes());
        }
        out
    }

    pub fn decode(raw: &[u8]) -> Result<Self, StoreError> {
        if raw.len() != ENTRY_LEN {
            return Err(StoreError::Corrupt(format!(
                "current-version entry of {} bytes",
                raw.len()
            )));
        }
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            i64::from_be_bytes(b)
        };
        Ok(Current {
            rev: Revision {
                main: field(0),
                sub: field(1),
            },
            create_revision: field(2),
            version: field(3),
            lease: field(4),
        })
    }
}

fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or(StoreError::MissingColumnFamily(name))
}

/// Whether the index is complete.
pub fn is_built(db: &DB) -> Result<bool, StoreError> {
    Ok(db
        .get_pinned_cf(cf(db, CF_LATEST)?, BUILT_MARKER)?
        .is_some())
}

/// Rebuilds the index from the `kv` history (nothing else may write
/// meanwhile); returns how many live keys it indexed. The marker is written
/// last, so a crash part way leaves it missing and the next open starts over.
pub fn rebuild(db: &DB) -> Result<usize, StoreError> {
    let latest = cf(db, CF_LATEST)?;
    clear(db)?;
    let mut it = db.raw_iterator_cf(cf(db, CF_KV)?);
    it.seek_to_first();
    let mut batch = WriteBatch::default();
    let mut indexed = 0usize;
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        // The first entry of each user key is its newest version.
        let (prefix, user, rev) =
            split_version_key(k).ok_or_else(|| StoreError::Corrupt("kv key".into()))?;
        let next = after_all_versions(prefix);
        if index_newest(latest, &user, rev, v, &mut batch)? {
            indexed += 1;
            if indexed.is_multiple_of(REBUILD_BATCH) {
                db.write(std::mem::take(&mut batch))?;
                tracing::info!(indexed, "rebuilding the current-version index");
            }
        }
        it.seek(next);
    }
    it.status()?;
    mark_built(latest, &mut batch);
    db.write(batch)?;
    Ok(indexed)
}

/// Indexes `user`'s newest version (at `rev`, stored as `value` in `kv`)
/// into `batch`, unless it is a tombstone; whether it did.
fn index_newest(
    latest: &rocksdb::ColumnFamily,
    user: &[u8],
    rev: Revision,
    value: &[u8],
    batch: &mut WriteBatch,
) -> Result<bool, StoreError> {
    if value.first() != Some(&TAG_PUT) {
        return Ok(false);
    }
    let kv = KeyValue::decode(&value[1..])?;
    batch.put_cf(latest, user, Current::of(&kv, rev).encode());
    Ok(true)
}

fn mark_built(latest: &rocksdb::ColumnFamily, batch: &mut WriteBatch) {
    batch.put_cf(latest, BUILT_MARKER, MARKER_VALUE);
}

/// Builds the index alongside `kv` records arriving in key order (a
/// snapshot being restored), so the restored data and its index go to
/// disk in the same batch, and readers never see one without the other.
#[derive(Default)]
pub struct Indexer {
    /// The version-key prefix (escaped user key) of the last record seen.
    last_prefix: Vec<u8>,
}

impl Indexer {
    /// Takes the `kv` record `key` → `value`, indexing it into `batch` when
    /// it is the first, so newest, of its user key.
    pub fn add(
        &mut self,
        latest: &rocksdb::ColumnFamily,
        key: &[u8],
        value: &[u8],
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let (prefix, user, rev) =
            split_version_key(key).ok_or_else(|| StoreError::Corrupt("kv key".into()))?;
        if prefix != self.last_prefix.as_slice() {
            self.last_prefix = prefix.to_vec();
            index_newest(latest, &user, rev, value, batch)?;
        }
        Ok(())
    }

    /// Marks the index complete, in the same batch.
    pub fn finish(self, latest: &rocksdb::ColumnFamily, batch: &mut WriteBatch) {
        mark_built(latest, batch);
    }
}

/// Removes every entry of the index, marker included, in one batch.
pub fn clear(db: &DB) -> Result<(), StoreError> {
    let mut batch = WriteBatch::default();
    clear_into(db, &mut batch)?;
    db.write(batch)?;
    Ok(())
}

/// Adds the deletion of every entry of the index to `batch` (so a snapshot
/// restore invalidates the index atomically with replacing the data).
pub fn clear_into(db: &DB, batch: &mut WriteBatch) -> Result<(), StoreError> {
    crate::db::delete_all_into(db, cf(db, CF_LATEST)?, batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_lengths_are_corruption() {
        let c = Current {
            rev: Revision { main: 7, sub: 2 },
            create_revision: 3,
            version: 4,
            lease: 0x1234_5678_9abc,
        };
        assert_eq!(Current::decode(&c.encode()).unwrap(), c);
        assert!(matches!(
            Current::decode(&c.encode()[..39]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
