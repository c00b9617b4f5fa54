//! Snapshots in etcd's format, both ways: the Maintenance `Snapshot` stream
//! is a bbolt database laid out as etcd's backend (what `etcdctl snapshot
//! status` and `etcdctl snapshot restore` read), and `tessera
//! snapshot-restore` accepts one saved from etcd.
//!
//! etcd's buckets, as etcd 3.4/3.5 write them:
//! - `key`: `main ‖ '_' ‖ sub` (big-endian, 17 bytes; a tombstone adds
//!   `'t'`) → `mvccpb.KeyValue` (a tombstone's holds only the key);
//! - `meta`: `consistent_index` (u64 BE), `scheduledCompactRev` and
//!   `finishedCompactRev` (a 17-byte revision);
//! - `lease`: id (i64 BE) → `leasepb.Lease {ID, TTL}`;
//! - `auth`: `authEnabled` (one byte), `authRevision` (u64 BE);
//!   `authUsers`, `authRoles`: name → `authpb.User` / `authpb.Role`;
//! - `members`: hex id → JSON `{id, peerURLs, name, clientURLs, isLearner}`;
//!   `members_removed`; `cluster`: `clusterVersion`.

pub mod bbolt;

use std::collections::HashMap;
use std::io::Read;

use prost::Message;
use rocksdb::{WriteBatch, DB};
use sha2::{Digest, Sha256};
use tessera_proto::authpb::{Role, User};
use tessera_proto::mvccpb::KeyValue;

use crate::auth::store::AuthState;
use crate::mvcc::encoding::Revision;
use crate::mvcc::store::{stage_revisions, stage_version, ReadView, StoreError};

/// The cluster version written into exported snapshots: the oldest etcd
/// that serves them; newer ones raise it when they start.
const CLUSTER_VERSION: &str = "3.4.0";
/// etcd's snapshot stream ends with the SHA-256 of the database; files
/// are whole 512-byte sectors before it.
const SHA256_LEN: u64 = 32;
const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum EtcdSnapshotError {
    #[error(transparent)]
    Bolt(#[from] bbolt::BoltError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot file checksum mismatch: expected sha256 {expected}, got {computed}")]
    Sha256 { expected: String, computed: String },
    #[error("bad {bucket} entry: {what}")]
    Entry { bucket: &'static str, what: String },
}

fn bad(bucket: &'static str, what: impl Into<String>) -> EtcdSnapshotError {
    EtcdSnapshotError::Entry {
        bucket,
        what: what.into(),
    }
}

/// `leasepb.Lease`.
#[derive(Clone, PartialEq, prost::Message)]
struct Lease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// A member as etcd stores it in the `members` bucket.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EtcdMember {
    pub id: u64,
    #[serde(rename = "peerURLs")]
    pub peer_urls: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(rename = "clientURLs", skip_serializing_if = "Vec::is_empty")]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner", skip_serializing_if = "std::ops::Not::not")]
    pub is_learner: bool,
}

/// etcd's 17-byte revision key (`revToBytes`), plus `'t'` for a tombstone.
fn revision_key(rev: Revision, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&rev.main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&rev.sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn parse_revision_key(k: &[u8]) -> Option<(Revision, bool)> {
    if !(k.len() == 17 || k.len() == 18) || k[8] != b'_' || (k.len() == 18 && k[17] != b't') {
        return None;
    }
    let main = i64::from_be_bytes(k[..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
    Some((Revision { main, sub }, k.len() == 18))
}

/// What an export or import carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub revision: i64,
    pub compact_revision: i64,
    pub versions: u64,
    pub leases: u64,
    pub users: u64,
    pub roles: u64,
}

/// Writes the state seen by `view` as an etcd backend database into `out`
/// (a file, written from its start); returns the file, its length and what
/// it holds. A compaction still running in the background is exported as
/// etcd records one: `scheduledCompactRev` ahead of `finishedCompactRev`,
/// which etcd (and Tessera) finish after a restore.
pub fn export(
    view: &ReadView<'_>,
    auth: &AuthState,
    members: &[EtcdMember],
    consistent_index: u64,
    out: std::fs::File,
) -> Result<(std::fs::File, u64, Summary), EtcdSnapshotError> {
    let mut summary = Summary {
        revision: view.rev,
        compact_revision: view.compact_rev,
        ..Summary::default()
    };
    let mut w = bbolt::Writer::new(std::io::BufWriter::with_capacity(1 << 20, out))?;

    w.bucket(b"key")?;
    let mut failed = None;
    view.for_each_version(|v| {
        let tombstone = v.value.is_none();
        let kv = match v.value {
            Some(kv) => KeyValue {
                key: v.user_key.to_vec(),
                ..kv
            },
            None => KeyValue {
                key: v.user_key.to_vec(),
                ..KeyValue::default()
            },
        };
        if let Err(e) = w.put(&revision_key(v.rev, tombstone), &kv.encode_to_vec()) {
            failed = Some(e);
            return Err(StoreError::Corrupt("export stopped".into()));
        }
        summary.versions += 1;
        Ok(())
    })
    .map_err(|e| {
        failed
            .take()
            .map_or(EtcdSnapshotError::Store(e), Into::into)
    })?;

    w.bucket(b"meta")?;
    w.put(b"consistent_index", &consistent_index.to_be_bytes())?;
    let compacted = |main| revision_key(Revision { main, sub: 0 }, false);
    let finished = view.finished_compact_rev()?;
    if finished > 0 {
        w.put(b"finishedCompactRev", &compacted(finished))?;
    }
    if view.compact_rev > 0 {
        w.put(b"scheduledCompactRev", &compacted(view.compact_rev))?;
    }

    w.bucket(b"lease")?;
    let mut leases = view.leases()?;
    leases.sort_by_key(|l| l.id.to_be_bytes());
    for l in leases {
        let lease = Lease {
            id: l.id,
            ttl: l.ttl,
            remaining_ttl: 0,
        };
        w.put(&l.id.to_be_bytes(), &lease.encode_to_vec())?;
        summary.leases += 1;
    }

    w.bucket(b"auth")?;
    w.put(b"authEnabled", &[u8::from(auth.enabled)])?;
    w.put(b"authRevision", &auth.revision.to_be_bytes())?;
    w.bucket(b"authUsers")?;
    for (name, user) in &auth.users {
        w.put(name.as_bytes(), &user.encode_to_vec())?;
        summary.users += 1;
    }
    w.bucket(b"authRoles")?;
    for (name, role) in &auth.roles {
        w.put(name.as_bytes(), &role.encode_to_vec())?;
        summary.roles += 1;
    }

    w.bucket(b"members")?;
    let mut members: Vec<(String, &EtcdMember)> =
        members.iter().map(|m| (format!("{:x}", m.id), m)).collect();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, m) in members {
        let json = serde_json::to_vec(m).map_err(|e| bad("members", e.to_string()))?;
        w.put(id.as_bytes(), &json)?;
    }
    w.bucket(b"members_removed")?;
    w.bucket(b"cluster")?;
    w.put(b"clusterVersion", CLUSTER_VERSION.as_bytes())?;

    let (buffered, len) = w.finish()?;
    let file = buffered
        .into_inner()
        .map_err(|e| EtcdSnapshotError::Io(e.into_error()))?;
    Ok((file, len, summary))
}

/// Whether `head` (a file's first bytes) starts a bbolt database.
pub fn is_bbolt(head: &[u8]) -> bool {
    head.get(16..20) == Some(&0xED0C_DAEDu32.to_le_bytes()[..])
}

/// The length of the database in a snapshot file of `len` bytes, after
/// checking its SHA-256 trailer when it has one (as `etcdctl snapshot
/// restore` does: a file of whole sectors plus 32 bytes carries one).
pub fn checked_db_len(file: &mut std::fs::File, len: u64) -> Result<u64, EtcdSnapshotError> {
    use std::io::{Seek, SeekFrom};
    if len % SECTOR != SHA256_LEN {
        return Ok(len);
    }
    let body = len - SHA256_LEN;
    file.seek(SeekFrom::Start(0))?;
    let mut sha = Sha256::new();
    std::io::copy(&mut (&mut *file).take(body), &mut sha)?;
    let mut expected = [0u8; SHA256_LEN as usize];
    file.read_exact(&mut expected)?;
    let computed = sha.finalize();
    if computed.as_slice() != expected {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        return Err(EtcdSnapshotError::Sha256 {
            expected: hex(&expected),
            computed: hex(&computed),
        });
    }
    Ok(body)
}

/// How much a restore stages before writing it: the restore happens in a
/// staging directory, so it need not be one batch to be all or nothing.
const IMPORT_BATCH_BYTES: usize = 64 << 20;

/// Writes, into the empty database `db`, the state of the etcd backend
/// `r`: its history with its revisions, compacted revision, leases (and
/// which keys they hold), users and roles; synced at the end. Membership
/// is not taken: the restored member starts a new cluster, as with etcd.
pub fn import(db: &DB, r: &bbolt::Reader) -> Result<Summary, EtcdSnapshotError> {
    let mut batch = WriteBatch::default();
    let summary = import_into(db, r, &mut batch)?;
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync).map_err(StoreError::from)?;
    Ok(summary)
}

/// Writes `batch` (unsynced) once it has grown past [`IMPORT_BATCH_BYTES`].
fn spill(db: &DB, batch: &mut WriteBatch) -> Result<(), StoreError> {
    if batch.size_in_bytes() >= IMPORT_BATCH_BYTES {
        db.write(std::mem::take(batch))?;
    }
    Ok(())
}

fn import_into(
    db: &DB,
    r: &bbolt::Reader,
    batch: &mut WriteBatch,
) -> Result<Summary, EtcdSnapshotError> {
    let mut summary = Summary::default();
    // Each key's newest version: its lease, if it is live.
    let mut newest: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut max_rev = 0;
    let mut store_err = None;
    r.for_each(b"key", &mut |k, v| {
        let (rev, tombstone) = parse_revision_key(k)
            .ok_or_else(|| bbolt::BoltError::Invalid("key bucket entry".into()))?;
        let kv = KeyValue::decode(v)
            .map_err(|e| bbolt::BoltError::Invalid(format!("key bucket value: {e}")))?;
        if kv.key.is_empty() || rev.main <= 0 || rev.main == i64::MAX || rev.sub < 0 {
            return Err(bbolt::BoltError::Invalid(format!(
                "key bucket entry at revision {}: empty key or revision out of range",
                rev.main
            )));
        }
        let key = kv.key.clone();
        let value = (!tombstone).then(|| KeyValue {
            key: Vec::new(),
            ..kv
        });
        newest.insert(key.clone(), value.as_ref().map_or(0, |kv| kv.lease));
        if let Err(e) =
            stage_version(db, batch, &key, rev, value.as_ref()).and_then(|()| spill(db, batch))
        {
            store_err = Some(e);
            return Err(bbolt::BoltError::Invalid("cannot stage".into()));
        }
        max_rev = max_rev.max(rev.main);
        summary.versions += 1;
        Ok(())
    })
    .map_err(|e| {
        store_err
            .take()
            .map_or(EtcdSnapshotError::Bolt(e), Into::into)
    })?;

    let never = crate::mvcc::store::NEVER_COMPACTED;
    let mut compact = (never, never); // (scheduled, finished)
    r.for_each(b"meta", &mut |k, v| {
        let rev = || {
            parse_revision_key(v)
                .map(|(r, _)| r.main)
                .ok_or_else(|| bbolt::BoltError::Invalid("compacted revision".into()))
        };
        match k {
            b"scheduledCompactRev" => compact.0 = rev()?,
            b"finishedCompactRev" => compact.1 = rev()?,
            _ => {}
        }
        Ok(())
    })?;
    let (scheduled, finished) = (compact.0.max(compact.1), compact.1);
    let current = max_rev.max(scheduled).max(1);
    stage_revisions(db, batch, current, scheduled, finished)?;
    summary.revision = current;
    summary.compact_revision = scheduled;

    let mut leases = Vec::new();
    r.for_each(b"lease", &mut |_, v| {
        let l = Lease::decode(v).map_err(|e| bbolt::BoltError::Invalid(format!("lease: {e}")))?;
        leases.push((l.id, l.ttl));
        Ok(())
    })?;
    for &(id, ttl) in &leases {
        crate::mvcc::lease::stage_lease(db, batch, id, ttl)?;
    }
    summary.leases = leases.len() as u64;
    let lease_ids: std::collections::HashSet<i64> = leases.iter().map(|&(id, _)| id).collect();
    let mut attached: Vec<(&Vec<u8>, i64)> = newest
        .iter()
        .filter(|(_, &lease)| lease != 0)
        .map(|(k, &lease)| (k, lease))
        .collect();
    attached.sort();
    for (key, lease) in attached {
        if lease_ids.contains(&lease) {
            crate::mvcc::lease::stage_attachment(db, batch, lease, key)?;
            spill(db, batch)?;
        }
    }

    let mut auth = AuthState::default();
    r.for_each(b"auth", &mut |k, v| {
        match k {
            b"authEnabled" => auth.enabled = v == [1],
            b"authRevision" => {
                auth.revision = u64::from_be_bytes(
                    v.try_into()
                        .map_err(|_| bbolt::BoltError::Invalid("authRevision".into()))?,
                )
            }
            _ => {}
        }
        Ok(())
    })?;
    r.for_each(b"authUsers", &mut |k, v| {
        let user = User::decode(v).map_err(|e| bbolt::BoltError::Invalid(format!("user: {e}")))?;
        auth.users
            .insert(String::from_utf8_lossy(k).into_owned(), user);
        Ok(())
    })?;
    r.for_each(b"authRoles", &mut |k, v| {
        let role = Role::decode(v).map_err(|e| bbolt::BoltError::Invalid(format!("role: {e}")))?;
        auth.roles
            .insert(String::from_utf8_lossy(k).into_owned(), role);
        Ok(())
    })?;
    summary.users = auth.users.len() as u64;
    summary.roles = auth.roles.len() as u64;
    crate::auth::store::stage(db, batch, &AuthState::default(), &auth)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_are_etcds() {
        let r = Revision { main: 5, sub: 2 };
        let k = revision_key(r, false);
        assert_eq!(k.len(), 17);
        assert_eq!(k[8], b'_');
        assert_eq!(parse_revision_key(&k), Some((r, false)));
        let t = revision_key(r, true);
        assert_eq!(parse_revision_key(&t), Some((r, true)));
        assert_eq!(parse_revision_key(b"short"), None);
        let mut wrong = t.clone();
        wrong[17] = b'x';
        assert_eq!(parse_revision_key(&wrong), None);
    }

    #[test]
    fn members_are_etcds_json() {
        let m = EtcdMember {
            id: 10,
            peer_urls: vec!["http://a:2380".into()],
            name: "m1".into(),
            client_urls: vec![],
            is_learner: false,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"id":10,"peerURLs":["http://a:2380"],"name":"m1"}"#
        );
    }
}
