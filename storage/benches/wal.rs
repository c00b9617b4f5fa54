//! WAL append throughput: one record per sync versus many writers sharing
//! each `fdatasync` (group commit), for both I/O backends.
//!
//! `cargo bench -p tessera-storage --bench wal`

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tessera_storage::wal::{Batch, IoMode, Wal, WalOptions};

const RECORD: usize = 256;

fn open(dir: &std::path::Path, io_mode: IoMode) -> Wal {
    let options = WalOptions {
        segment_size: 64 << 20,
        io_mode,
    };
    Wal::open(dir, options, |_, _| 0).expect("open WAL").wal
}

/// `in_flight` appends of one record are kept queued at all times, as
/// concurrent Raft proposals are; each completes when it is durable.
fn append_records(wal: &Wal, records: u64, in_flight: u64) -> Duration {
    let payload = vec![0xabu8; RECORD];
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let mut submitted = 0;
    let mut done = 0;
    while done < records {
        while submitted < records && submitted - done < in_flight {
            let mut batch = Batch::default();
            batch.push(1, submitted, &payload);
            let tx = tx.clone();
            wal.submit(batch, Box::new(move |r| tx.send(r).expect("bench alive")));
            submitted += 1;
        }
        rx.recv().expect("writer alive").expect("append failed");
        done += 1;
    }
    start.elapsed()
}

fn bench_append(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append_256B");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for mode in [IoMode::Auto, IoMode::Syscall] {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = open(dir.path(), mode);
        let backend = wal.backend();
        for in_flight in [1u64, 16, 256] {
            group.bench_with_input(
                BenchmarkId::new(backend, format!("{in_flight}_in_flight")),
                &in_flight,
                |b, &in_flight| b.iter_custom(|iters| append_records(&wal, iters, in_flight)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
