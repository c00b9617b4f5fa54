//! A user's key permissions merged over all its roles, checked the way etcd's
//! `range_perm_cache.go` checks them: a single key is allowed when one
//! granted interval contains it; a range when the granted intervals that
//! overlap it cover it without a gap.

use tessera_proto::authpb::{permission::Type as PermType, Role};

/// One end of an interval; `None` is "to the end of the key space" (etcd's
/// affine infinity, written as a `range_end` of `"\0"`).
type End = Option<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    begin: Vec<u8>,
    end: End,
}

impl Interval {
    /// A permission's or request's `key`/`range_end` pair: an empty end is the
    /// single key, `"\0"` is everything from `key` on.
    fn from_range(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => Some(point_end(key)),
            [0] => None,
            e => Some(e.to_vec()),
        };
        Interval {
            begin: key.to_vec(),
            end,
        }
    }

    fn intersects(&self, other: &Interval) -> bool {
        end_gt(&other.end, &self.begin) && end_gt(&self.end, &other.begin)
    }

    /// etcd's `Interval.Compare(other) == 0`, which the interval tree visits
    /// by: `self` is neither entirely left of `other` nor at or past its
    /// end. The same as [`Interval::intersects`] unless `self` is inverted
    /// (an empty range), where etcd's answer is what requests get.
    fn overlaps_as_etcd(&self, other: &Interval) -> bool {
        let left_of = self.begin < other.begin && !end_gt(&self.end, &other.begin);
        let right_of = !end_gt(&other.end, &self.begin);
        !left_of && !right_of
    }
}

/// The smallest key after `key`: a single key as the interval `[key, key\0)`.
fn point_end(key: &[u8]) -> Vec<u8> {
    let mut e = key.to_vec();
    e.push(0);
    e
}

/// `end > key`, with `None` greater than every key.
fn end_gt(end: &End, key: &[u8]) -> bool {
    end.as_deref().is_none_or(|e| e > key)
}

/// `a >= b` for interval ends.
fn end_ge(a: &End, b: &End) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a >= b,
    }
}

/// A user's merged read and write permissions.
#[derive(Debug, Clone, Default)]
pub struct UnifiedPerms {
    read: Vec<Interval>,
    write: Vec<Interval>,
}

impl UnifiedPerms {
    /// Merges the permissions of `roles` (missing roles are skipped, as in etcd).
    pub fn of<'a>(roles: impl IntoIterator<Item = &'a Role>) -> UnifiedPerms {
        let mut perms = UnifiedPerms::default();
        for role in roles {
            for p in &role.key_permission {
                let ivl = Interval::from_range(&p.key, &p.range_end);
                match PermType::try_from(p.perm_type).unwrap_or(PermType::Read) {
                    PermType::Read => perms.read.push(ivl),
                    PermType::Write => perms.write.push(ivl),
                    PermType::Readwrite => {
                        perms.read.push(ivl.clone());
                        perms.write.push(ivl);
                    }
                }
            }
        }
        for list in [&mut perms.read, &mut perms.write] {
            list.sort_by(|a, b| a.begin.cmp(&b.begin));
        }
        perms
    }

    /// Whether `key` (with `range_end`, in etcd's request encoding) may be
    /// accessed with `want`: READ or WRITE.
    pub fn allows(&self, key: &[u8], range_end: &[u8], want: PermType) -> bool {
        let granted = match want {
            PermType::Read => &self.read,
            _ => &self.write,
        };
        if range_end.is_empty() {
            let point = Interval::from_range(key, &[]);
            return granted.iter().any(|g| g.intersects(&point));
        }
        covers(granted, &Interval::from_range(key, range_end))
    }
}

/// etcd's `intervalTree.Contains`: the granted intervals overlapping `want`
/// (visited in begin order) are contiguous, start at or before it and end at
/// or after it.
fn covers(granted: &[Interval], want: &Interval) -> bool {
    let mut overlapping = granted.iter().filter(|g| want.overlaps_as_etcd(g));
    let Some(first) = overlapping.next() else {
        return false;
    };
    let min_begin = &first.begin;
    let mut max_end = first.end.clone();
    for g in overlapping {
        // A gap between what is covered so far and the next interval.
        if !end_ge(&max_end, &Some(g.begin.clone())) {
            return false;
        }
        if !end_ge(&max_end, &g.end) {
            max_end = g.end.clone();
        }
    }
    end_ge(&max_end, &want.end) && *min_begin <= want.begin
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::authpb::Permission;

    fn role(perms: &[(&str, &str, PermType)]) -> Role {
        Role {
            name: b"r".to_vec(),
            key_permission: perms
                .iter()
                .map(|(k, e, t)| Permission {
                    perm_type: *t as i32,
                    key: k.as_bytes().to_vec(),
                    range_end: e.as_bytes().to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn single_keys_need_one_interval_that_holds_them() {
        let r = role(&[("foo", "", PermType::Read), ("a", "c", PermType::Write)]);
        let p = UnifiedPerms::of([&r]);
        assert!(p.allows(b"foo", b"", PermType::Read));
        assert!(!p.allows(b"foo", b"", PermType::Write));
        assert!(!p.allows(b"foo0", b"", PermType::Read));
        assert!(p.allows(b"b", b"", PermType::Write));
        assert!(p.allows(b"a", b"", PermType::Write));
        assert!(!p.allows(b"c", b"", PermType::Write));
    }

    #[test]
    fn ranges_must_be_covered_without_gaps() {
        let r = role(&[
            ("a", "c", PermType::Readwrite),
            ("c", "e", PermType::Read),
            ("f", "g", PermType::Read),
        ]);
        let p = UnifiedPerms::of([&r]);
        assert!(p.allows(b"a", b"e", PermType::Read));
        assert!(p.allows(b"b", b"d", PermType::Read));
        assert!(!p.allows(b"a", b"e", PermType::Write));
        assert!(!p.allows(b"d", b"g", PermType::Read), "gap between e and f");
        assert!(!p.allows(b"a", b"\0", PermType::Read), "open end");
        // A single-key grant does not cover a range starting there.
        let p = UnifiedPerms::of([&role(&[("k", "", PermType::Read)])]);
        assert!(!p.allows(b"k", b"l", PermType::Read));
        assert!(p.allows(b"k", b"k\0", PermType::Read));
    }

    #[test]
    fn inverted_ranges_are_judged_as_etcd_judges_them() {
        // etcd's interval compare finds [ab, a) overlapping [a, b), and the
        // grant covers it; nothing is read or written by such a range anyway.
        let p = UnifiedPerms::of([&role(&[("a", "b", PermType::Write)])]);
        assert!(p.allows(b"ab", b"a", PermType::Write));
        assert!(!p.allows(b"c", b"a", PermType::Write));
    }

    #[test]
    fn from_key_grants_cover_everything_after() {
        let p = UnifiedPerms::of([&role(&[("m", "\0", PermType::Read)])]);
        assert!(p.allows(b"m", b"\0", PermType::Read));
        assert!(p.allows(b"zzz", b"", PermType::Read));
        assert!(p.allows(b"x", b"y", PermType::Read));
        assert!(!p.allows(b"a", b"\0", PermType::Read));
        assert!(!p.allows(b"l", b"", PermType::Read));
    }

    #[test]
    fn roles_merge() {
        let a = role(&[("a", "b", PermType::Read)]);
        let b = role(&[("b", "c", PermType::Read)]);
        let p = UnifiedPerms::of([&a, &b]);
        assert!(p.allows(b"a", b"c", PermType::Read));
        assert!(!UnifiedPerms::of([&a]).allows(b"a", b"c", PermType::Read));
    }
}
