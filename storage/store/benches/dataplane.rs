//! The data plane's CPU and disk kernels: Reed–Solomon encode and
//! reconstruct (4+2 and 8+3, over 1 MiB stripes and over one 4 KiB row),
//! the block checksum, and a shard append (checksum check, write,
//! `fdatasync`) into the shard log.
//!
//! `cargo bench -p tessera-store --bench dataplane`
//!
//! Throughput is reported over the stripe's data bytes (what a writer
//! hands in), so encode GB/s compares directly with ISA-L's figures.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tessera_proto::store::{Layout, ShardRecord, StripeId};
use tessera_store::codec::{block_crcs, Codec, BLOCK};
use tessera_store::shardlog::{LogOptions, ShardLog};

// The allocator of the tessera-store binary: the encoder allocates its
// shards, and glibc's malloc would mmap and fault in each 256 KiB one.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// (k, m) codes measured.
const CODES: [(usize, usize); 2] = [(4, 2), (8, 3)];

/// Data blocks of a stripe carrying `bytes` of data, filled with a pattern
/// that is not all zeros (zeros would flatter nothing here, but be honest).
fn blocks(bytes: usize) -> Vec<Vec<u8>> {
    (0..bytes / BLOCK)
        .map(|b| (0..BLOCK).map(|i| (i * 31 + b * 7) as u8).collect())
        .collect()
}

/// Stripe sizes: a full 1 MiB stripe, and one row of 4 KiB blocks (the
/// smallest write, one block a data shard).
fn stripes(k: usize) -> [(String, usize); 2] {
    [
        ("1MiB".to_string(), 1 << 20),
        (format!("{k}x4KiB"), k * BLOCK),
    ]
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("rs_encode");
    for (k, m) in CODES {
        let codec = Codec::new(k, m).expect("valid code");
        for (label, bytes) in stripes(k) {
            let data = blocks(bytes);
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let rows = bytes / BLOCK / k;
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(BenchmarkId::new(format!("{k}+{m}"), label), |b| {
                b.iter(|| codec.encode(&refs, rows).expect("encode"))
            });
        }
    }
    group.finish();
}

/// The worst case: `m` data shards lost, rebuilt from the survivors.
fn bench_reconstruct(c: &mut Criterion) {
    let mut group = c.benchmark_group("rs_reconstruct");
    for (k, m) in CODES {
        let codec = Codec::new(k, m).expect("valid code");
        for (label, bytes) in stripes(k) {
            let data = blocks(bytes);
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let shards = codec.encode(&refs, bytes / BLOCK / k).expect("encode");
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(
                BenchmarkId::new(format!("{k}+{m}_lose_{m}_data"), label),
                |b| {
                    b.iter_batched(
                        || {
                            let mut present: Vec<Option<Vec<u8>>> =
                                shards.iter().cloned().map(Some).collect();
                            for lost in present.iter_mut().take(m) {
                                *lost = None;
                            }
                            present
                        },
                        |mut present| codec.reconstruct_data(&mut present).expect("rebuild"),
                        criterion::BatchSize::LargeInput,
                    )
                },
            );
        }
    }
    group.finish();
}

fn bench_checksum(c: &mut Criterion) {
    let mut group = c.benchmark_group("block_checksum");
    let data: Vec<u8> = blocks(1 << 20).concat();
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("crc32_1MiB_in_4KiB_blocks", |b| {
        b.iter(|| block_crcs(&data))
    });
    group.finish();
}

/// One shard appended durably: what a node does for every write it acks.
fn bench_shard_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_append");
    group.sample_size(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = ShardLog::open(dir.path(), LogOptions::default()).expect("open shard log");
    let mut seq = 0u64;
    for rows in [1u32, 64] {
        let data = Bytes::from(blocks(rows as usize * BLOCK).concat());
        let crcs = block_crcs(&data);
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(
            BenchmarkId::new("fdatasync_each", format!("{}KiB", rows as usize * 4)),
            |b| {
                b.iter(|| {
                    seq += 1;
                    let record = ShardRecord {
                        volume: 1,
                        segment: (seq % 16) as u32,
                        shard: 0,
                        stripe: Some(StripeId { epoch: 1, seq }),
                        layout: Some(Layout {
                            data_shards: 4,
                            parity_shards: 2,
                            rows,
                            blocks: (0..rows * 4).collect(),
                        }),
                        crcs: crcs.clone(),
                    };
                    log.append(record, data.clone(), 1).expect("append")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_encode,
    bench_reconstruct,
    bench_checksum,
    bench_shard_append
);
criterion_main!(benches);
