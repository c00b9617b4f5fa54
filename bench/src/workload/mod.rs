//! The workloads of etcd's `benchmark` tool, one module per family.

pub mod kv;
pub mod lease;
pub mod watch;

use rand::Rng;

/// A key of exactly `size` bytes naming slot `n`, as etcd's benchmark makes
/// them: the zig-zag varint of `n`, zero-padded (or cut) to `size`.
pub fn key(n: u64, size: usize) -> Vec<u8> {
    let mut k = vec![0u8; size.max(1)];
    let mut v = n << 1; // zig-zag of a non-negative number
    let mut i = 0;
    while i < k.len() {
        k[i] = (v as u8 & 0x7f) | if v >= 0x80 { 0x80 } else { 0 };
        v >>= 7;
        i += 1;
        if v == 0 {
            break;
        }
    }
    k
}

/// The key slot of request `i`: `i mod space` with `--sequential-keys`,
/// otherwise uniformly random in the key space.
pub fn slot(i: u64, space: u64, sequential: bool) -> u64 {
    let space = space.max(1);
    if sequential {
        i % space
    } else {
        rand::thread_rng().gen_range(0..space)
    }
}

/// `size` random printable bytes.
pub fn value(size: usize) -> Vec<u8> {
    let mut rng = rand::thread_rng();
    (0..size).map(|_| rng.gen_range(b'a'..=b'z')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_size_and_distinct() {
        let keys: std::collections::HashSet<Vec<u8>> = (0..100_000).map(|n| key(n, 8)).collect();
        assert_eq!(keys.len(), 100_000);
        assert!(keys.iter().all(|k| k.len() == 8));
        assert_eq!(key(0, 8), vec![0; 8]);
        assert_eq!(key(1, 3), vec![2, 0, 0]);
    }

    #[test]
    fn sequential_slots_wrap_around_the_key_space() {
        let slots: Vec<u64> = (0..5).map(|i| slot(i, 3, true)).collect();
        assert_eq!(slots, vec![0, 1, 2, 0, 1]);
        assert!((0..100).all(|i| slot(i, 7, false) < 7));
    }
}
