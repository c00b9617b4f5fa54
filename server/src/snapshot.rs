//! The snapshot file format, shared by Raft snapshots and the Maintenance
//! `Snapshot` RPC: every entry of the state-machine column families, read
//! from one RocksDB snapshot, framed and protected by a CRC-32C trailer.
//!
//! ```text
//! MAGIC ‖ { cf:u8 ‖ klen:u32 ‖ key ‖ vlen:u32 ‖ value }* ‖ 0xFF ‖ crc32c:u32
//! ```
//!
//! Over the Maintenance API the dump is sent the way etcd sends its database
//! file, which `etcdctl snapshot save` checks for: zero-padded to a multiple
//! of 512 bytes and followed by the SHA-256 of what precedes it.

use std::collections::HashMap;

use rocksdb::{WriteBatch, WriteOptions, DB};
use sha2::{Digest, Sha256};

use crate::db::STATE_MACHINE_CFS;

const MAGIC: &[u8] = b"TESSERA-SNAPSHOT-1\n";
const END: u8 = 0xFF;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("not a Tessera snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot is truncated")]
    Truncated,
    #[error("snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("snapshot sha256 checksum mismatch")]
    Sha256,
    #[error("snapshot has trailing garbage after its checksum")]
    TrailingData,
    #[error("snapshot names unknown column family #{0}")]
    UnknownColumnFamily(u8),
    #[error("missing column family {0}")]
    MissingColumnFamily(&'static str),
    #[error(transparent)]
    Store(#[from] crate::mvcc::StoreError),
}

/// A dump plus the `meta` entries it contains (for reading the applied index
/// and membership consistent with the data).
pub struct Dump {
    pub data: Vec<u8>,
    pub meta: HashMap<Vec<u8>, Vec<u8>>,
}

pub fn dump(db: &DB) -> Result<Dump, SnapshotError> {
    let snap = db.snapshot();
    let mut data = MAGIC.to_vec();
    let mut meta = HashMap::new();
    for (idx, name) in STATE_MACHINE_CFS.iter().enumerate() {
        let cf = db
            .cf_handle(name)
            .ok_or(SnapshotError::MissingColumnFamily(name))?;
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_snapshot(&snap);
        let mut it = db.raw_iterator_cf_opt(cf, opts);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            data.push(idx as u8);
            data.extend_from_slice(&(k.len() as u32).to_be_bytes());
            data.extend_from_slice(k);
            data.extend_from_slice(&(v.len() as u32).to_be_bytes());
            data.extend_from_slice(v);
            if *name == crate::db::CF_META {
                meta.insert(k.to_vec(), v.to_vec());
            }
            it.next();
        }
        it.status()?;
    }
    data.push(END);
    let crc = crc32c::crc32c(&data);
    data.extend_from_slice(&crc.to_be_bytes());
    Ok(Dump { data, meta })
}

/// One decoded entry: (column family index, key, value).
type Record<'a> = (u8, &'a [u8], &'a [u8]);

/// Length of etcd's snapshot-stream trailer.
const SHA256_LEN: usize = 32;
/// etcd pads its database file to whole 512-byte sectors.
const SECTOR: usize = 512;

/// The bytes the Maintenance `Snapshot` RPC streams for `dump`.
pub fn to_stream(mut dump: Vec<u8>) -> Vec<u8> {
    let padded = dump.len().div_ceil(SECTOR) * SECTOR;
    dump.resize(padded, 0);
    let sha = Sha256::digest(&dump);
    dump.extend_from_slice(&sha);
    dump
}

/// Checks magic, framing and checksums of a dump or a streamed snapshot;
/// returns the records.
pub fn parse(data: &[u8]) -> Result<Vec<Record<'_>>, SnapshotError> {
    let data = if data.len() % SECTOR == SHA256_LEN {
        let (body, sha) = data.split_at(data.len() - SHA256_LEN);
        if Sha256::digest(body).as_slice() != sha {
            return Err(SnapshotError::Sha256);
        }
        body
    } else {
        data
    };
    if !data.starts_with(MAGIC) {
        return Err(SnapshotError::BadMagic);
    }
    let mut records = Vec::new();
    let mut pos = MAGIC.len();
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], SnapshotError> {
        let s = data.get(*pos..*pos + n).ok_or(SnapshotError::Truncated)?;
        *pos += n;
        Ok(s)
    };
    let u32_at = |pos: &mut usize| -> Result<u32, SnapshotError> {
        let b = take(pos, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    loop {
        let cf = take(&mut pos, 1)?[0];
        if cf == END {
            break;
        }
        if cf as usize >= STATE_MACHINE_CFS.len() {
            return Err(SnapshotError::UnknownColumnFamily(cf));
        }
        let klen = u32_at(&mut pos)? as usize;
        let key = take(&mut pos, klen)?;
        let vlen = u32_at(&mut pos)? as usize;
        let value = take(&mut pos, vlen)?;
        records.push((cf, key, value));
    }
    let computed = crc32c::crc32c(&data[..pos]);
    let stored = u32_at(&mut pos)?;
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    if data[pos..].iter().any(|&b| b != 0) {
        return Err(SnapshotError::TrailingData);
    }
    Ok(records)
}

/// Replaces the state-machine column families with the snapshot's content,
/// leaving out `meta` keys for which `skip_meta` returns true. The
/// current-version index is emptied in the same batch: `Store::reload`
/// rebuilds it from the restored history.
pub fn restore(
    db: &DB,
    data: &[u8],
    skip_meta: impl Fn(&[u8]) -> bool,
) -> Result<(), SnapshotError> {
    let records = parse(data)?;
    let mut batch = WriteBatch::default();
    let mut handles = Vec::new();
    for name in STATE_MACHINE_CFS {
        let cf = db
            .cf_handle(name)
            .ok_or(SnapshotError::MissingColumnFamily(name))?;
        crate::db::delete_all_into(db, cf, &mut batch)?;
        handles.push(cf);
    }
    crate::mvcc::latest::clear_into(db, &mut batch)?;
    for (cf, k, v) in records {
        if STATE_MACHINE_CFS[cf as usize] == crate::db::CF_META && skip_meta(k) {
            continue;
        }
        batch.put_cf(handles[cf as usize], k, v);
    }
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let kv = db.cf_handle(crate::db::CF_KV).unwrap();
        db.put_cf(kv, b"a", b"1").unwrap();
        db.put_cf(kv, b"b", b"2").unwrap();
        let dump = dump(&db).unwrap();
        assert_eq!(parse(&dump.data).unwrap().len(), 2);

        let mut bad = dump.data.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(parse(&bad).is_err());
        assert!(parse(&dump.data[..dump.data.len() - 3]).is_err());

        let stream = to_stream(dump.data.clone());
        assert_eq!(stream.len() % 512, 32, "etcdctl's checksum rule");
        assert_eq!(parse(&stream).unwrap().len(), 2);
        let mut bad = stream.clone();
        bad[3] ^= 1;
        assert!(matches!(parse(&bad), Err(SnapshotError::Sha256)));

        let other = tempfile::tempdir().unwrap();
        let db2 = crate::db::open(other.path()).unwrap();
        let kv2 = db2.cf_handle(crate::db::CF_KV).unwrap();
        db2.put_cf(kv2, b"stale", b"x").unwrap();
        restore(&db2, &dump.data, |_| false).unwrap();
        assert_eq!(db2.get_cf(kv2, b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(db2.get_cf(kv2, b"stale").unwrap(), None);
    }
}
