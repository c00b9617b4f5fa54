//! The erasure code and a stripe's layout.
//!
//! A stripe carries `n` blocks of 4 KiB. They are laid out column by
//! column over `k` data shards of `rows = ceil(n / k)` blocks each (block
//! `i` is row `i % rows` of data shard `i / rows`; the tail is zero), so a
//! run of consecutive blocks of a stripe is one contiguous read from one
//! node. `m` parity shards of the same size come from Reed–Solomon over
//! GF(2^8) (`reed-solomon-erasure` with its SIMD kernels): any `k` of the
//! `k + m` shards give back the others. The code works byte by byte across
//! shards, so the same rows of any `k` shards rebuild those rows of the
//! rest: a degraded read of one block reads one row from each of `k` nodes.

use reed_solomon_erasure::galois_8::ReedSolomon;

/// The unit of I/O, checksums and placement in a stripe.
pub const BLOCK: usize = 4096;
/// Rows a stripe's shard holds at most: 256 KiB a shard, so a full 4+2
/// stripe carries 1 MiB of data.
pub const MAX_ROWS: usize = 64;
/// Shards a stripe may have in all (k + m).
pub const MAX_SHARDS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("invalid code {k}+{m}: need 1 <= k, 1 <= m, k + m <= {MAX_SHARDS}")]
    BadCode { k: usize, m: usize },
    #[error("too few shards to rebuild the stripe: {present} of the {needed} needed")]
    TooFewShards { present: usize, needed: usize },
    #[error("a block of {0} bytes; blocks are {BLOCK}")]
    BadBlock(usize),
    #[error("erasure code: {0:?}")]
    Rs(reed_solomon_erasure::Error),
}

/// A `k + m` Reed–Solomon code.
pub struct Codec {
    k: usize,
    m: usize,
    rs: ReedSolomon,
}

impl Codec {
    pub fn new(k: usize, m: usize) -> Result<Self, CodecError> {
        if k == 0 || m == 0 || k + m > MAX_SHARDS {
            return Err(CodecError::BadCode { k, m });
        }
        let rs = ReedSolomon::new(k, m).map_err(CodecError::Rs)?;
        Ok(Codec { k, m, rs })
    }

    pub fn data_shards(&self) -> usize {
        self.k
    }

    pub fn parity_shards(&self) -> usize {
        self.m
    }

    /// The `k + m` shards of a stripe holding `blocks` (each `BLOCK` bytes,
    /// in stripe order), `rows` blocks each.
    pub fn encode(&self, blocks: &[&[u8]], rows: usize) -> Result<Vec<Vec<u8>>, CodecError> {
        // Data shards are built by appending their blocks: one copy and no
        // zero-fill first (a 1 MiB 4+2 stripe encodes in a quarter less
        // time); only the tail and the parity start as zeros.
        let len = rows * BLOCK;
        let mut shards: Vec<Vec<u8>> = (0..self.k).map(|_| Vec::with_capacity(len)).collect();
        for (i, block) in blocks.iter().enumerate() {
            if block.len() != BLOCK {
                return Err(CodecError::BadBlock(block.len()));
            }
            let (shard, _) = position(i, rows);
            shards[shard].extend_from_slice(block);
        }
        for shard in &mut shards {
            shard.resize(len, 0);
        }
        shards.extend((0..self.m).map(|_| vec![0u8; len]));
        self.rs.encode(&mut shards).map_err(CodecError::Rs)?;
        Ok(shards)
    }

    /// Fills in the missing (`None`) shards from any `k` present ones; all
    /// present shards must have the same length (the same rows of each).
    pub fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), CodecError> {
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.k {
            return Err(CodecError::TooFewShards {
                present,
                needed: self.k,
            });
        }
        self.rs.reconstruct(shards).map_err(CodecError::Rs)
    }

    /// Like [`Codec::reconstruct`], but only the data shards are rebuilt.
    pub fn reconstruct_data(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), CodecError> {
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.k {
            return Err(CodecError::TooFewShards {
                present,
                needed: self.k,
            });
        }
        self.rs.reconstruct_data(shards).map_err(CodecError::Rs)
    }
}

/// Rows each shard needs for a stripe of `blocks` blocks over `k` data shards.
pub fn rows_for(blocks: usize, k: usize) -> usize {
    blocks.div_ceil(k).max(1)
}

/// Where the `i`-th block of a stripe with `rows` rows lives: (data shard, row).
pub fn position(i: usize, rows: usize) -> (usize, usize) {
    (i / rows, i % rows)
}

/// The CRC-32 of each 4 KiB block of `data` (a whole number of blocks).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK).map(crc32fast::hash).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8) -> Vec<u8> {
        (0..BLOCK).map(|i| fill.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn any_k_shards_rebuild_the_stripe_and_any_k_rows_rebuild_rows() {
        let codec = Codec::new(4, 2).unwrap();
        let blocks: Vec<Vec<u8>> = (0..10).map(|i| block(i as u8 * 17)).collect();
        let rows = rows_for(blocks.len(), 4);
        assert_eq!(rows, 3);
        let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
        let shards = codec.encode(&refs, rows).unwrap();
        assert_eq!(shards.len(), 6);
        // Every pair of lost shards is survivable.
        for a in 0..6 {
            for b in a + 1..6 {
                let mut partial: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                partial[a] = None;
                partial[b] = None;
                codec.reconstruct(&mut partial).unwrap();
                for (i, s) in partial.iter().enumerate() {
                    assert_eq!(s.as_ref().unwrap(), &shards[i], "lost {a},{b}");
                }
            }
        }
        // One row of the shards rebuilds that row.
        let row = 1;
        let mut slice: Vec<Option<Vec<u8>>> = shards
            .iter()
            .map(|s| Some(s[row * BLOCK..(row + 1) * BLOCK].to_vec()))
            .collect();
        slice[0] = None;
        slice[5] = None;
        codec.reconstruct_data(&mut slice).unwrap();
        let (shard, r) = position(1, rows);
        assert_eq!((shard, r), (0, 1));
        assert_eq!(slice[0].as_ref().unwrap(), &blocks[1]);
        // Three lost of 4+2 is too many.
        let mut three: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
        three[0] = None;
        three[1] = None;
        three[2] = None;
        assert!(matches!(
            codec.reconstruct(&mut three),
            Err(CodecError::TooFewShards {
                present: 3,
                needed: 4
            })
        ));
    }

    #[test]
    fn bad_codes_are_refused() {
        assert!(Codec::new(0, 2).is_err());
        assert!(Codec::new(4, 0).is_err());
        assert!(Codec::new(30, 3).is_err());
        assert!(Codec::new(8, 3).is_ok());
    }
}
