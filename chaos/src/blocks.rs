//! Volume blocks for data-plane checks: a self-describing pattern per
//! (block, version), and the checkers for what a volume reads back.
//!
//! A writer writes versions of blocks and flushes; every flush that
//! returned acknowledges the versions written before it. After a fault the
//! volume must read back, for every block, the last acknowledged version
//! or a later one that was written (an unacknowledged write may or may not
//! have landed) — never an older version, zeros after an acknowledged
//! write, or bytes that are not a whole version (torn or corrupt). A writer
//! that was fenced must never have a flush acknowledged after the fence.

use serde::{Deserialize, Serialize};

const MAGIC: u32 = 0x7e55_b10c;
/// magic, block, version, crc of the rest of the block.
const HEADER: usize = 4 + 8 + 8 + 4;

/// The bytes of version `version` of block `block`, `size` bytes long
/// (at least the 24-byte header).
pub fn encode(block: u64, version: u64, size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size.max(HEADER)];
    // A cheap deterministic filler that differs per block and version.
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_add(1);
    for chunk in bytes[HEADER..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32fast::hash(&bytes[HEADER..]);
    bytes[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    bytes[4..12].copy_from_slice(&block.to_le_bytes());
    bytes[12..20].copy_from_slice(&version.to_le_bytes());
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// What a block read back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readback {
    /// All zeros: never written.
    Zero,
    /// A whole version of this block.
    Version(u64),
    /// Anything else: torn, corrupt, or another block's data.
    Garbage,
}

/// Decodes what block `block` read back as.
pub fn decode(block: u64, bytes: &[u8]) -> Readback {
    if bytes.iter().all(|&b| b == 0) {
        return Readback::Zero;
    }
    if bytes.len() < HEADER {
        return Readback::Garbage;
    }
    let field = |range: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..range.len()].copy_from_slice(&bytes[range]);
        u64::from_le_bytes(b)
    };
    let version = field(12..20);
    if field(0..4) as u32 != MAGIC || field(4..12) != block {
        return Readback::Garbage;
    }
    if encode(block, version, bytes.len()) == bytes {
        Readback::Version(version)
    } else {
        Readback::Garbage
    }
}

/// One write of one block: its version, when it was written (called), and
/// when a flush covering it returned (`None`: never acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockWrite {
    pub block: u64,
    pub version: u64,
    pub called: u64,
    pub flushed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockViolation {
    #[error("block {block}: read back {read:?}, but version {acknowledged} was acknowledged (flushed at {flushed_at})")]
    LostWrite {
        block: u64,
        read: Readback,
        acknowledged: u64,
        flushed_at: u64,
    },
    #[error("block {block}: read back torn or corrupt data")]
    Corrupt { block: u64 },
    #[error("block {block}: read back version {version}, which was never written")]
    Phantom { block: u64, version: u64 },
    #[error("split brain: block {block} version {version}, written at {called} after the writer was fenced at {fenced_at}, was acknowledged at {flushed}")]
    AckedAfterFence {
        block: u64,
        version: u64,
        called: u64,
        flushed: u64,
        fenced_at: u64,
    },
}

/// Checks a readback of every block (`reads[b]` for block `b`, by a read
/// called at `read_called`) against the writes.
pub fn check_readback(
    writes: &[BlockWrite],
    reads: &[Readback],
    read_called: u64,
) -> Result<(), BlockViolation> {
    for (block, &read) in reads.iter().enumerate() {
        let block = block as u64;
        let of_block = writes.iter().filter(|w| w.block == block);
        let acknowledged = of_block
            .clone()
            .filter(|w| w.flushed.is_some_and(|f| f < read_called))
            .max_by_key(|w| w.version);
        match read {
            Readback::Garbage => return Err(BlockViolation::Corrupt { block }),
            Readback::Version(v) => {
                if !of_block.clone().any(|w| w.version == v) {
                    return Err(BlockViolation::Phantom { block, version: v });
                }
            }
            Readback::Zero => {}
        }
        if let Some(ack) = acknowledged {
            let read_version = match read {
                Readback::Version(v) => Some(v),
                _ => None,
            };
            if read_version.is_none_or(|v| v < ack.version) {
                return Err(BlockViolation::LostWrite {
                    block,
                    read,
                    acknowledged: ack.version,
                    flushed_at: ack.flushed.unwrap_or(0),
                });
            }
        }
    }
    Ok(())
}

/// No write a fenced writer issued after the fence (`fenced_at`: when the
/// fencing attach returned) was acknowledged. (A write issued before it may
/// be acknowledged later: its shards can have reached the nodes before the
/// fence; whether the new writer sees it is `check_readback`'s business.)
pub fn check_fenced(writes: &[BlockWrite], fenced_at: u64) -> Result<(), BlockViolation> {
    match writes
        .iter()
        .find(|w| w.called > fenced_at && w.flushed.is_some())
    {
        Some(w) => Err(BlockViolation::AckedAfterFence {
            block: w.block,
            version: w.version,
            called: w.called,
            flushed: w.flushed.unwrap_or(0),
            fenced_at,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(block: u64, version: u64, called: u64, flushed: Option<u64>) -> BlockWrite {
        BlockWrite {
            block,
            version,
            called,
            flushed,
        }
    }

    #[test]
    fn patterns_decode_to_their_version_and_damage_is_seen() {
        let b = encode(7, 3, 4096);
        assert_eq!(decode(7, &b), Readback::Version(3));
        assert_eq!(decode(8, &b), Readback::Garbage, "another block's data");
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&encode(7, 4, 4096)[2048..]);
        assert_eq!(decode(7, &torn), Readback::Garbage);
        let mut flipped = b;
        flipped[100] ^= 1;
        assert_eq!(decode(7, &flipped), Readback::Garbage);
        assert_eq!(decode(7, &[0u8; 4096]), Readback::Zero);
    }

    #[test]
    fn the_acknowledged_version_or_a_later_one_passes() {
        let writes = [w(0, 1, 0, Some(5)), w(0, 2, 6, None), w(1, 1, 0, None)];
        for read0 in [Readback::Version(1), Readback::Version(2)] {
            for read1 in [Readback::Zero, Readback::Version(1)] {
                assert_eq!(check_readback(&writes, &[read0, read1], 10), Ok(()));
            }
        }
    }

    #[test]
    fn lost_corrupt_and_phantom_blocks_are_caught() {
        let writes = [w(0, 1, 0, Some(5)), w(0, 2, 6, Some(8))];
        assert!(matches!(
            check_readback(&writes, &[Readback::Version(1)], 10),
            Err(BlockViolation::LostWrite {
                acknowledged: 2,
                ..
            })
        ));
        assert!(matches!(
            check_readback(&writes, &[Readback::Zero], 10),
            Err(BlockViolation::LostWrite { .. })
        ));
        assert_eq!(
            check_readback(&writes, &[Readback::Garbage], 10),
            Err(BlockViolation::Corrupt { block: 0 })
        );
        assert_eq!(
            check_readback(&writes, &[Readback::Version(9)], 10),
            Err(BlockViolation::Phantom {
                block: 0,
                version: 9
            })
        );
        // A flush that returned after the read was called does not count.
        assert_eq!(check_readback(&writes, &[Readback::Version(1)], 7), Ok(()));
    }

    #[test]
    fn an_ack_after_the_fence_is_split_brain() {
        let writes = [
            w(0, 1, 0, Some(5)),
            // Issued before the fence, acknowledged after it: allowed.
            w(0, 2, 6, Some(12)),
            // Issued after it, never acknowledged: the fence working.
            w(1, 1, 11, None),
            // Issued after it and acknowledged: split brain.
            w(1, 2, 13, Some(14)),
        ];
        assert_eq!(check_fenced(&writes[..3], 10), Ok(()));
        assert!(matches!(
            check_fenced(&writes, 10),
            Err(BlockViolation::AckedAfterFence {
                block: 1,
                version: 2,
                ..
            })
        ));
    }
}
