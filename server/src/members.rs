//! Member attributes (name and client URLs) as published by each member
//! through the Raft log, kept in the `meta` column family so they travel
//! with snapshots. Ids and peer URLs live in the Raft membership itself.

use std::collections::BTreeMap;

use rocksdb::{WriteBatch, DB};
use tessera_proto::tessera::MemberAttributes;

use crate::db::CF_META;
use crate::mvcc::StoreError;

const PREFIX: &[u8] = b"member/";

fn key(member_id: u64) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(&member_id.to_be_bytes());
    k
}

/// Stages `attrs` into `batch`.
pub fn stage(db: &DB, batch: &mut WriteBatch, attrs: &MemberAttributes) -> Result<(), StoreError> {
    let cf = db
        .cf_handle(CF_META)
        .ok_or(StoreError::MissingColumnFamily(CF_META))?;
    batch.put_cf(
        cf,
        key(attrs.member_id),
        prost::Message::encode_to_vec(attrs),
    );
    Ok(())
}

/// Every published member's attributes, by id.
pub fn load_all(db: &DB) -> Result<BTreeMap<u64, MemberAttributes>, StoreError> {
    let cf = db
        .cf_handle(CF_META)
        .ok_or(StoreError::MissingColumnFamily(CF_META))?;
    let mut out = BTreeMap::new();
    for item in db.prefix_iterator_cf(cf, PREFIX) {
        let (k, v) = item.map_err(StoreError::from)?;
        if !k.starts_with(PREFIX) {
            break;
        }
        let attrs: MemberAttributes = prost::Message::decode(v.as_ref())
            .map_err(|e| StoreError::Corrupt(format!("member attributes: {e}")))?;
        out.insert(attrs.member_id, attrs);
    }
    Ok(out)
}
