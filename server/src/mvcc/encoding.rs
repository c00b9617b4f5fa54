//! On-disk key layout of the MVCC history.
//!
//! Every version of a user key is one RocksDB entry in the `kv` column family:
//!
//! ```text
//! escape(user_key) ‖ !main (u64 BE) ‖ !sub (u64 BE)   →   tag ‖ KeyValue (without key)
//! ```
//!
//! `escape` is order-preserving and prefix-free (0x00 becomes 0x00 0xFF, the key
//! ends with 0x00 0x01), so all versions of one user key are contiguous and user
//! keys sort exactly as etcd sorts them. Revisions are stored inverted so the
//! newest version comes first: "latest version at or below revision R" is one
//! seek to `escape(key) ‖ !R`.

use std::cmp::Ordering;

/// An MVCC revision: `main` is the store revision, `sub` the index of the change
/// within that revision's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Length of the revision suffix of a `kv` key.
pub const REVISION_SUFFIX_LEN: usize = 16;

/// Value tag: a live version.
pub const TAG_PUT: u8 = 0;
/// Value tag: a tombstone left by a delete.
pub const TAG_TOMBSTONE: u8 = 1;

/// Appends the order-preserving, self-delimiting form of `key`.
pub fn escape_into(key: &[u8], out: &mut Vec<u8>) {
    out.reserve(key.len() + 2);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// The escaped form of `key` alone: the common prefix of all its versions.
pub fn key_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 2 + REVISION_SUFFIX_LEN);
    escape_into(key, &mut out);
    out
}

/// The full `kv` key of one version.
pub fn version_key(key: &[u8], rev: Revision) -> Vec<u8> {
    let mut out = key_prefix(key);
    push_revision(&mut out, rev);
    out
}

/// The smallest `kv` key whose version is at or below `(main, any sub)`:
/// seeking there lands on the newest version visible at revision `main`.
pub fn seek_key_at(key: &[u8], main: i64) -> Vec<u8> {
    let mut out = key_prefix(key);
    out.extend_from_slice(&(u64::MAX - main as u64).to_be_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out
}

/// A `kv` key greater than every version of `prefix`'s user key and smaller
/// than any later user key.
pub fn after_all_versions(prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + REVISION_SUFFIX_LEN);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&[0xFF; REVISION_SUFFIX_LEN]);
    out
}

/// The `rev` column family key of a revision: `main ‖ sub`, big-endian, so
/// entries iterate in revision order.
pub fn rev_key(rev: Revision) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&(rev.main as u64).to_be_bytes());
    out[8..].copy_from_slice(&(rev.sub as u64).to_be_bytes());
    out
}

/// Inverse of [`rev_key`].
pub fn parse_rev_key(raw: &[u8]) -> Option<Revision> {
    let main = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
    let sub = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
    Some(Revision {
        main: main as i64,
        sub: sub as i64,
    })
}

fn push_revision(out: &mut Vec<u8>, rev: Revision) {
    out.extend_from_slice(&(u64::MAX - rev.main as u64).to_be_bytes());
    out.extend_from_slice(&(u64::MAX - rev.sub as u64).to_be_bytes());
}

/// Splits a `kv` key into (escaped user-key prefix, user key, revision).
/// Returns `None` for a malformed key (which would mean on-disk corruption).
pub fn split_version_key(raw: &[u8]) -> Option<(&[u8], Vec<u8>, Revision)> {
    if raw.len() < REVISION_SUFFIX_LEN + 2 {
        return None;
    }
    let (prefix, suffix) = raw.split_at(raw.len() - REVISION_SUFFIX_LEN);
    let user = unescape(prefix)?;
    let main = u64::MAX - u64::from_be_bytes(suffix[..8].try_into().ok()?);
    let sub = u64::MAX - u64::from_be_bytes(suffix[8..].try_into().ok()?);
    Some((
        prefix,
        user,
        Revision {
            main: main as i64,
            sub: sub as i64,
        },
    ))
}

fn unescape(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(prefix.len());
    let mut i = 0;
    while i < prefix.len() {
        let b = prefix[i];
        if b != 0 {
            out.push(b);
            i += 1;
            continue;
        }
        match prefix.get(i + 1) {
            Some(0xFF) => {
                out.push(0);
                i += 2;
            }
            Some(0x01) if i + 2 == prefix.len() => return Some(out),
            _ => return None,
        }
    }
    None
}

/// The first key after every key that starts with `prefix`, or `None` when
/// no such key exists (the prefix is all 0xff bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// etcd's `range_end` for "every key with this prefix" (`"\0"` = to the end).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    prefix_end(prefix).unwrap_or_else(|| vec![0])
}

/// etcd's range semantics: an empty `end` means the single key, `"\0"` means
/// every key from `key` on, anything else is the half-open range `[key, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    Single(Vec<u8>),
    FromKey(Vec<u8>),
    Between(Vec<u8>, Vec<u8>),
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::FromKey(key.to_vec()),
            end => KeyRange::Between(key.to_vec(), end.to_vec()),
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeyRange::Single(key) => k == key.as_slice(),
            KeyRange::FromKey(key) => k >= key.as_slice(),
            KeyRange::Between(key, end) => k >= key.as_slice() && k.cmp(end) == Ordering::Less,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_preserves_order_and_round_trips() {
        let keys: Vec<&[u8]> = vec![
            b"",
            b"\x00",
            b"\x00\x00",
            b"\x00\x01",
            b"\x00\xff",
            b"a",
            b"a\x00",
            b"a\x00b",
            b"a\x01",
            b"ab",
            b"b",
            b"\xff",
            b"\xff\x00",
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(key_prefix(w[0]) < key_prefix(w[1]), "{:?} {:?}", w[0], w[1]);
            // every version of the smaller key sorts before the larger key
            assert!(after_all_versions(&key_prefix(w[0])) < key_prefix(w[1]));
        }
        for k in keys {
            let rev = Revision { main: 42, sub: 3 };
            let vk = version_key(k, rev);
            let (prefix, user, r) = split_version_key(&vk).unwrap();
            assert_eq!(prefix, key_prefix(k).as_slice());
            assert_eq!(user, k);
            assert_eq!(r, rev);
        }
    }

    #[test]
    fn newer_versions_sort_first_and_seek_finds_latest_visible() {
        let v = |main, sub| version_key(b"k", Revision { main, sub });
        assert!(v(10, 1) < v(10, 0));
        assert!(v(10, 0) < v(9, 5));
        // seeking at revision 10 must land at or before (10, any sub)
        assert!(seek_key_at(b"k", 10) <= v(10, 7));
        assert!(seek_key_at(b"k", 10) > v(11, 0));
    }

    #[test]
    fn key_range_semantics() {
        assert!(KeyRange::new(b"a", b"").contains(b"a"));
        assert!(!KeyRange::new(b"a", b"").contains(b"ab"));
        assert!(KeyRange::new(b"a", b"\0").contains(b"zzz"));
        assert!(!KeyRange::new(b"b", b"\0").contains(b"a"));
        assert!(KeyRange::new(b"a", b"c").contains(b"b"));
        assert!(!KeyRange::new(b"a", b"c").contains(b"c"));
    }
}
