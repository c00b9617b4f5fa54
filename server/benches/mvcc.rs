//! Micro-benchmarks of the applied state: MVCC put (one committed write
//! transaction, as the state machine applies a Put), MVCC range (a point
//! read and a 100-key scan over 10,000 keys), and watch fan-out (one
//! revision's events delivered to many subscribers of the watch hub).
//! Real RocksDB in a temporary directory.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tessera_proto::etcdserverpb::PutRequest;
use tessera_proto::mvccpb::{Event, KeyValue};
use tessera_server::mvcc::encoding::KeyRange;
use tessera_server::mvcc::{apply, Store};
use tessera_server::watch_hub::WatchHub;

const VALUE: [u8; 256] = [b'v'; 256];

fn key(i: u64) -> Vec<u8> {
    format!("{i:08}").into_bytes()
}

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = tessera_server::db::open(dir.path()).expect("open RocksDB");
    (dir, Store::open(db).expect("open store"))
}

fn put(store: &Store, i: u64) {
    let mut txn = store.write_txn();
    let req = PutRequest {
        key: key(i),
        value: VALUE.to_vec(),
        ..Default::default()
    };
    apply::put(&mut txn, &req, true).expect("put");
    store.commit(txn, |_| Ok(())).expect("commit");
}

fn mvcc_put(c: &mut Criterion) {
    let (_dir, store) = temp_store();
    let mut g = c.benchmark_group("mvcc_put");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("8B key, 256B value", |b| {
        b.iter(|| {
            i += 1;
            put(&store, i % 100_000);
        })
    });
    g.finish();
}

fn mvcc_range(c: &mut Criterion) {
    let (_dir, store) = temp_store();
    for i in 0..10_000 {
        put(&store, i);
    }
    let mut g = c.benchmark_group("mvcc_range");
    let rev = store.current_rev();
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("point read of 10k keys", |b| {
        b.iter(|| {
            i = (i + 7919) % 10_000;
            let k = key(i);
            let view = store.read_view();
            let (kvs, _) = view
                .range(&KeyRange::new(&k, &[]), rev, 0, false)
                .expect("range");
            assert_eq!(kvs.len(), 1);
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("100-key scan of 10k keys", |b| {
        b.iter(|| {
            i = (i + 7919) % 9_900;
            let view = store.read_view();
            let range = KeyRange::new(&key(i), &key(i + 100));
            let (kvs, _) = view.range(&range, rev, 0, false).expect("range");
            assert_eq!(kvs.len(), 100);
        })
    });
    g.finish();
}

fn watch_fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("watch_fan_out");
    let event = Event {
        kv: Some(KeyValue {
            key: key(1),
            value: VALUE.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for watchers in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(watchers as u64));
        g.bench_with_input(
            BenchmarkId::new("one event to", watchers),
            &watchers,
            |b, &n| {
                b.iter_batched(
                    || {
                        let hub = WatchHub::default();
                        let subs: Vec<_> = (0..n).map(|_| hub.subscribe()).collect();
                        (hub, subs)
                    },
                    |(hub, mut subs)| {
                        hub.publish(2, vec![event.clone()]);
                        for s in &mut subs {
                            let got = s.try_recv().expect("event delivered");
                            assert_eq!(got.revision, 2);
                        }
                    },
                    BatchSize::SmallInput,
                )
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).sample_size(20);
    targets = mvcc_put, mvcc_range, watch_fan_out
}
criterion_main!(benches);
