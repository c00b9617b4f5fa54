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
use std::io::{BufReader, BufWriter, Read, Write};

use rocksdb::{WriteBatch, WriteOptions, DB};
use sha2::{Digest, Sha256};

use crate::db::STATE_MACHINE_CFS;

const MAGIC: &[u8] = b"TESSERA-SNAPSHOT-1\n";
const END: u8 = 0xFF;
/// Buffer between the dump and its file: large writes, few syscalls.
const FILE_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
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

/// What a dump wrote: its length, and the `meta` entries it contains (for
/// reading the applied index and membership consistent with the data).
pub struct DumpInfo {
    pub bytes: u64,
    pub meta: HashMap<Vec<u8>, Vec<u8>>,
}

/// A writer that checksums and counts what passes through it.
struct Checksummed<W> {
    inner: W,
    crc: u32,
    len: u64,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes every entry of the state-machine families, as of one RocksDB
/// snapshot, to `out`. Nothing but the current entry is held in memory.
pub fn dump_into<W: Write>(db: &DB, out: W) -> Result<DumpInfo, SnapshotError> {
    let snap = db.snapshot();
    let mut w = Checksummed {
        inner: out,
        crc: 0,
        len: 0,
    };
    let mut meta = HashMap::new();
    w.write_all(MAGIC)?;
    for (idx, name) in STATE_MACHINE_CFS.iter().enumerate() {
        let cf = db
            .cf_handle(name)
            .ok_or(SnapshotError::MissingColumnFamily(name))?;
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_snapshot(&snap);
        let mut it = db.raw_iterator_cf_opt(cf, opts);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            w.write_all(&[idx as u8])?;
            w.write_all(&(k.len() as u32).to_be_bytes())?;
            w.write_all(k)?;
            w.write_all(&(v.len() as u32).to_be_bytes())?;
            w.write_all(v)?;
            if *name == crate::db::CF_META {
                meta.insert(k.to_vec(), v.to_vec());
            }
            it.next();
        }
        it.status()?;
    }
    w.write_all(&[END])?;
    let crc = w.crc;
    w.write_all(&crc.to_be_bytes())?;
    w.flush()?;
    Ok(DumpInfo { bytes: w.len, meta })
}

/// A dump in memory, for tests.
#[cfg(test)]
pub fn dump(db: &DB) -> Result<Vec<u8>, SnapshotError> {
    let mut data = Vec::new();
    dump_into(db, &mut data)?;
    Ok(data)
}

/// A dump into `file`, buffered; written to it (not synced) on return.
pub fn dump_to_file(db: &DB, file: &std::fs::File) -> Result<DumpInfo, SnapshotError> {
    dump_into(db, BufWriter::with_capacity(FILE_BUFFER, file))
}

/// Length of etcd's snapshot-stream trailer.
const SHA256_LEN: usize = 32;
/// etcd pads its database file to whole 512-byte sectors.
const SECTOR: usize = 512;

/// The length of the Maintenance `Snapshot` stream of a `dump_len`-byte
/// dump: padded to whole sectors, then the SHA-256 of what precedes it.
pub fn stream_len(dump_len: u64) -> u64 {
    dump_len.div_ceil(SECTOR as u64) * SECTOR as u64 + SHA256_LEN as u64
}

/// The dump inside `data`: a streamed snapshot (as `etcdctl snapshot save`
/// stores it) has its SHA-256 trailer checked and removed; a plain dump is
/// returned as it is.
pub fn without_stream_trailer(data: &[u8]) -> Result<&[u8], SnapshotError> {
    if data.len() % SECTOR != SHA256_LEN {
        return Ok(data);
    }
    let (body, sha) = data.split_at(data.len() - SHA256_LEN);
    if Sha256::digest(body).as_slice() != sha {
        return Err(SnapshotError::Sha256);
    }
    Ok(body)
}

/// A reader that checksums what it reads.
struct Verified<R> {
    inner: R,
    crc: u32,
}

impl<R: Read> Verified<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.inner.read_exact(buf).map_err(truncated)?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut b = [0; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// `len` bytes into `buf`, grown as they arrive, so a corrupt length
    /// runs into the end of the data rather than into one huge allocation.
    fn bytes(&mut self, len: u32, buf: &mut Vec<u8>) -> Result<(), SnapshotError> {
        buf.clear();
        (&mut self.inner).take(len.into()).read_to_end(buf)?;
        if buf.len() != len as usize {
            return Err(SnapshotError::Truncated);
        }
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }
}

fn truncated(e: std::io::Error) -> SnapshotError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
        _ => SnapshotError::Io(e),
    }
}

/// Reads the dump in `data`, handing each record (column family index,
/// key, value) to `record`; checks the framing, then the checksum at the
/// end, so a caller must not act on the records before this returns Ok.
/// Returns the number of records.
pub fn for_each_record(
    data: impl Read,
    mut record: impl FnMut(u8, &[u8], &[u8]) -> Result<(), SnapshotError>,
) -> Result<u64, SnapshotError> {
    let mut r = Verified {
        inner: BufReader::with_capacity(FILE_BUFFER, data),
        crc: 0,
    };
    let mut magic = vec![0; MAGIC.len()];
    match r.exact(&mut magic) {
        Ok(()) if magic == MAGIC => {}
        Ok(()) | Err(SnapshotError::Truncated) => return Err(SnapshotError::BadMagic),
        Err(e) => return Err(e),
    }
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let mut records = 0;
    loop {
        let mut cf = [0];
        r.exact(&mut cf)?;
        if cf[0] == END {
            break;
        }
        if cf[0] as usize >= STATE_MACHINE_CFS.len() {
            return Err(SnapshotError::UnknownColumnFamily(cf[0]));
        }
        let klen = r.u32()?;
        r.bytes(klen, &mut key)?;
        let vlen = r.u32()?;
        r.bytes(vlen, &mut value)?;
        record(cf[0], &key, &value)?;
        records += 1;
    }
    let computed = r.crc;
    let stored = r.u32()?;
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    // Only the zero padding of a streamed snapshot may follow.
    let mut rest = [0u8; 4096];
    loop {
        let n = r.inner.read(&mut rest)?;
        if n == 0 {
            return Ok(records);
        }
        if rest[..n].iter().any(|&b| b != 0) {
            return Err(SnapshotError::TrailingData);
        }
    }
}

/// Replaces the state-machine column families with the content of the dump
/// in `data`, leaving out `meta` keys for which `skip_meta` returns true. The
/// current-version index is emptied in the same batch: `Store::reload`
/// rebuilds it from the restored history. Nothing is written unless the
/// whole dump checks out; the batch holds the restored state in memory
/// until it is written.
pub fn restore(
    db: &DB,
    data: impl Read,
    skip_meta: impl Fn(&[u8]) -> bool,
) -> Result<(), SnapshotError> {
    let batch = restore_batch(db, data, skip_meta)?;
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)?;
    Ok(())
}

/// What [`restore`] writes, as one batch: the removal of every entry of
/// the state-machine families, the snapshot's entries (except the `meta`
/// keys `skip_meta` names), and the current-version index built from them.
/// Nothing is returned unless the whole snapshot checked out.
pub fn restore_batch(
    db: &DB,
    data: impl Read,
    skip_meta: impl Fn(&[u8]) -> bool,
) -> Result<WriteBatch, SnapshotError> {
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
    let latest = db
        .cf_handle(crate::db::CF_LATEST)
        .ok_or(SnapshotError::MissingColumnFamily(crate::db::CF_LATEST))?;
    let mut index = crate::mvcc::latest::Indexer::default();
    for_each_record(data, |cf, k, v| {
        let name = STATE_MACHINE_CFS[cf as usize];
        if !(name == crate::db::CF_META && skip_meta(k)) {
            batch.put_cf(handles[cf as usize], k, v);
        }
        if name == crate::db::CF_KV {
            index.add(latest, k, v, &mut batch)?;
        }
        Ok(())
    })?;
    index.finish(latest, &mut batch);
    Ok(batch)
}

/// Sends `dump` (a file of `dump_len` bytes, read from its start) as the
/// Maintenance `Snapshot` stream, in pieces of `chunk` bytes: the dump, its
/// zero padding, then the SHA-256 of both. Stops early, returning false,
/// when `send` does (the receiver went away).
pub fn stream_file(
    mut dump: impl Read,
    dump_len: u64,
    chunk: usize,
    mut send: impl FnMut(Vec<u8>) -> bool,
) -> Result<bool, SnapshotError> {
    let padded = stream_len(dump_len) - SHA256_LEN as u64;
    let mut sha = Sha256::new();
    let mut sent = 0u64;
    while sent < padded {
        let want = (padded - sent).min(chunk as u64) as usize;
        let mut piece = vec![0u8; want];
        let from_file = dump_len.saturating_sub(sent).min(want as u64) as usize;
        dump.read_exact(&mut piece[..from_file])
            .map_err(truncated)?;
        sha.update(&piece);
        sent += want as u64;
        if !send(piece) {
            return Ok(false);
        }
    }
    Ok(send(sha.finalize().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(data: &[u8]) -> Result<u64, SnapshotError> {
        for_each_record(without_stream_trailer(data)?, |_, _, _| Ok(()))
    }

    fn db_with(entries: &[(&[u8], &[u8])]) -> (tempfile::TempDir, std::sync::Arc<DB>) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let kv = db.cf_handle(crate::db::CF_META).unwrap();
        for (k, v) in entries {
            db.put_cf(kv, k, v).unwrap();
        }
        (dir, db)
    }

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let big = vec![9u8; 3 * FILE_BUFFER];
        let (_d, db) = db_with(&[(b"a", b"1"), (b"b", b"2"), (b"big", &big)]);
        let dump = dump(&db).unwrap();
        assert_eq!(records(&dump).unwrap(), 3);

        let mut bad = dump.clone();
        bad[MAGIC.len() + 10] ^= 0x40; // the value of "a"
        assert!(matches!(records(&bad), Err(SnapshotError::Checksum { .. })));
        let cut = &dump[..dump.len() - 3];
        assert!(matches!(records(cut), Err(SnapshotError::Truncated)));
        assert!(matches!(records(b"TESS"), Err(SnapshotError::BadMagic)));
        let mut extra = dump.clone();
        extra.push(1);
        assert!(matches!(records(&extra), Err(SnapshotError::TrailingData)));

        // A corrupt dump changes nothing; a good one replaces everything.
        let (_d2, db2) = db_with(&[(b"stale", b"x")]);
        let kv2 = db2.cf_handle(crate::db::CF_META).unwrap();
        assert!(restore(&db2, &bad[..], |_| false).is_err());
        assert_eq!(
            db2.get_cf(kv2, b"stale").unwrap().as_deref(),
            Some(&b"x"[..])
        );
        restore(&db2, &dump[..], |_| false).unwrap();
        assert_eq!(db2.get_cf(kv2, b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(db2.get_cf(kv2, b"big").unwrap().as_deref(), Some(&big[..]));
        assert_eq!(db2.get_cf(kv2, b"stale").unwrap(), None);
    }

    #[test]
    fn a_dump_file_streams_as_etcdctl_expects() {
        let (_d, db) = db_with(&[(b"a", b"1"), (b"b", &[5u8; 5000])]);
        let file = tempfile::tempfile().unwrap();
        let info = dump_to_file(&db, &file).unwrap();
        assert_eq!(info.bytes, file.metadata().unwrap().len());
        let mut read = &file;
        std::io::Seek::rewind(&mut read).unwrap();
        let mut stream = Vec::new();
        let mut pieces = 0;
        let done = stream_file(read, info.bytes, 1000, |piece| {
            assert!(piece.len() <= 1000);
            pieces += 1;
            stream.extend_from_slice(&piece);
            true
        })
        .unwrap();
        assert!(done);
        assert!(pieces > 5);
        assert_eq!(stream.len() as u64, stream_len(info.bytes));
        assert_eq!(stream.len() % SECTOR, SHA256_LEN, "etcdctl's checksum rule");
        assert_eq!(records(&stream).unwrap(), 2);
        let mut bad = stream.clone();
        bad[3] ^= 1;
        assert!(matches!(records(&bad), Err(SnapshotError::Sha256)));
        // A receiver that goes away stops the stream.
        std::io::Seek::rewind(&mut read).unwrap();
        assert!(!stream_file(read, info.bytes, 1000, |_| false).unwrap());
    }
}
