//! Leases in the `lease` column family, written in the same batches as the
//! key-value changes they go with.
//!
//! Layout:
//! - `L ‖ id` → granted TTL in seconds (i64, big-endian): the lease exists.
//! - `K ‖ id ‖ key` → empty: `key`'s live version is attached to the lease.
//!
//! The attachment rows mirror the `lease` field of each key's newest live
//! version; [`WriteTxn::put`] and [`WriteTxn::delete_range`] keep them in
//! step, so revoking a lease finds its keys without scanning the key space.
//! Ids are stored as the big-endian bytes of the i64.

use super::encoding::{prefix_end, KeyRange};
use super::store::{ReadView, StoreError, WriteTxn};
use crate::db::CF_LEASE;

const TAG_RECORD: u8 = b'L';
const TAG_ATTACHMENT: u8 = b'K';

fn record_key(id: i64) -> [u8; 9] {
    let mut k = [TAG_RECORD; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn attachment_prefix(id: i64) -> [u8; 9] {
    let mut k = [TAG_ATTACHMENT; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn attachment_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.extend_from_slice(&attachment_prefix(id));
    k.extend_from_slice(key);
    k
}

/// Stages lease `id` with its granted TTL (a restored history).
pub fn stage_lease(
    db: &rocksdb::DB,
    batch: &mut rocksdb::WriteBatch,
    id: i64,
    ttl: i64,
) -> Result<(), StoreError> {
    let cf = db
        .cf_handle(CF_LEASE)
        .ok_or(StoreError::MissingColumnFamily(CF_LEASE))?;
    batch.put_cf(cf, record_key(id), ttl.to_be_bytes());
    Ok(())
}

/// Stages the attachment of `key`'s live version to lease `id`.
pub fn stage_attachment(
    db: &rocksdb::DB,
    batch: &mut rocksdb::WriteBatch,
    id: i64,
    key: &[u8],
) -> Result<(), StoreError> {
    let cf = db
        .cf_handle(CF_LEASE)
        .ok_or(StoreError::MissingColumnFamily(CF_LEASE))?;
    batch.put_cf(cf, attachment_key(id, key), []);
    Ok(())
}

fn decode_ttl(raw: &[u8]) -> Result<i64, StoreError> {
    let b: [u8; 8] = raw
        .try_into()
        .map_err(|_| StoreError::Corrupt("lease record length".into()))?;
    Ok(i64::from_be_bytes(b))
}

/// A lease as stored: its id and granted TTL in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    pub ttl: i64,
}

impl ReadView<'_> {
    /// The granted TTL of lease `id`, if it exists.
    pub fn lease_ttl(&self, id: i64) -> Result<Option<i64>, StoreError> {
        let cf = self.cf(CF_LEASE)?;
        match self
            .db()
            .get_pinned_cf_opt(cf, record_key(id), &self.read_opts())?
        {
            Some(raw) => Ok(Some(decode_ttl(&raw)?)),
            None => Ok(None),
        }
    }

    /// Every lease, in id byte order.
    pub fn leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut out = Vec::new();
        self.scan_lease_cf(&[TAG_RECORD], |k, v| {
            let id = i64::from_be_bytes(
                k[1..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("lease record key".into()))?,
            );
            out.push(LeaseRecord {
                id,
                ttl: decode_ttl(v)?,
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// The keys attached to lease `id`, sorted.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        self.scan_lease_cf(&attachment_prefix(id), |k, _| {
            keys.push(k[9..].to_vec());
            Ok(())
        })?;
        Ok(keys)
    }

    fn scan_lease_cf(
        &self,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut opts = self.read_opts();
        if let Some(end) = prefix_end(prefix) {
            opts.set_iterate_upper_bound(end);
        }
        let mut it = self.db().raw_iterator_cf_opt(self.cf(CF_LEASE)?, opts);
        it.seek(prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            visit(k, v)?;
            it.next();
        }
        it.status()?;
        Ok(())
    }
}

impl WriteTxn<'_> {
    /// Whether lease `id` exists as this transaction sees it.
    pub fn lease_exists(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self.view().lease_ttl(id)?.is_some())
    }

    /// Creates lease `id` with `ttl` seconds (the caller checked it is new).
    pub fn grant_lease(&mut self, id: i64, ttl: i64) -> Result<(), StoreError> {
        let cf = self.view().cf(CF_LEASE)?;
        self.batch_mut()
            .put_cf(cf, record_key(id), ttl.to_be_bytes());
        Ok(())
    }

    /// Deletes every key attached to lease `id`, in key order and so in one
    /// revision, then the lease itself. Returns how many keys were deleted.
    pub fn revoke_lease(&mut self, id: i64) -> Result<usize, StoreError> {
        let keys = self.view().lease_keys(id)?;
        let mut deleted = 0;
        for key in &keys {
            deleted += self.delete_range(&KeyRange::new(key, b""), false)?.count;
        }
        let cf = self.view().cf(CF_LEASE)?;
        let batch = self.batch_mut();
        for key in &keys {
            batch.delete_cf(cf, attachment_key(id, key));
        }
        batch.delete_cf(cf, record_key(id));
        Ok(deleted)
    }

    /// Moves `key`'s attachment from lease `old` to lease `new` (0 = none).
    pub(super) fn reattach(&mut self, key: &[u8], old: i64, new: i64) -> Result<(), StoreError> {
        if old == new {
            return Ok(());
        }
        let cf = self.view().cf(CF_LEASE)?;
        let batch = self.batch_mut();
        if old != 0 {
            batch.delete_cf(cf, attachment_key(old, key));
        }
        if new != 0 {
            batch.put_cf(cf, attachment_key(new, key), []);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::store::tests::store;

    #[test]
    fn attachments_follow_puts_deletes_and_revocation() {
        let (_d, s) = store();
        let mut t = s.write_txn();
        t.grant_lease(7, 10).unwrap();
        t.grant_lease(-3, 5).unwrap();
        s.commit(t, |_| Ok(())).unwrap();
        assert_eq!(s.current_rev(), 1, "granting a lease is not a revision");

        let mut t = s.write_txn();
        t.put(b"a", b"1".to_vec(), 7).unwrap();
        t.put(b"b", b"1".to_vec(), 7).unwrap();
        t.put(b"c", b"1".to_vec(), -3).unwrap();
        s.commit(t, |_| Ok(())).unwrap();
        // b moves to no lease, c moves from -3 to 7
        let mut t = s.write_txn();
        t.put(b"b", b"2".to_vec(), 0).unwrap();
        t.put(b"c", b"2".to_vec(), 7).unwrap();
        s.commit(t, |_| Ok(())).unwrap();
        let v = s.read_view();
        assert_eq!(v.lease_keys(7).unwrap(), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(v.lease_keys(-3).unwrap().is_empty());
        assert_eq!(
            v.leases().unwrap(),
            vec![
                LeaseRecord { id: 7, ttl: 10 },
                LeaseRecord { id: -3, ttl: 5 }
            ]
        );
        drop(v);

        let before = s.current_rev();
        let mut t = s.write_txn();
        assert_eq!(t.revoke_lease(7).unwrap(), 2);
        let events = s.commit(t, |_| Ok(())).unwrap();
        assert_eq!(s.current_rev(), before + 1, "all keys go in one revision");
        let keys: Vec<_> = events.iter().map(|e| e.kv.clone().unwrap().key).collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"c".to_vec()]);
        let v = s.read_view();
        assert_eq!(v.lease_ttl(7).unwrap(), None);
        assert!(v.lease_keys(7).unwrap().is_empty());
        assert!(v.get(b"b", v.rev).unwrap().is_some());
    }
}
