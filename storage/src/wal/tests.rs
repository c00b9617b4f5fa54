use std::path::Path;
use std::sync::mpsc;

use proptest::prelude::*;

use super::*;

const DATA: u8 = 1;
const CHECKPOINT: u8 = 2;

/// The suite's I/O mode: `TESSERA_WAL_IO` when set, so CI can force io_uring off.
fn options(segment_size: u64) -> WalOptions {
    WalOptions {
        segment_size,
        io_mode: IoMode::from_env().unwrap().unwrap_or(IoMode::Auto),
    }
}

/// Tags are the first 8 bytes of a data record's payload.
fn tag_of(kind: u8, payload: &[u8]) -> u64 {
    if kind == DATA && payload.len() >= 8 {
        u64::from_le_bytes(payload[..8].try_into().unwrap())
    } else {
        0
    }
}

fn payload(tag: u64, body: &[u8]) -> Vec<u8> {
    let mut p = tag.to_le_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

fn open(dir: &Path, segment_size: u64) -> Opened {
    let opened = Wal::open(dir, options(segment_size), tag_of).unwrap();
    opened
        .wal
        .set_checkpoint(CHECKPOINT, b"checkpoint".to_vec());
    opened
}

fn data_records(records: &[Record]) -> Vec<Vec<u8>> {
    records
        .iter()
        .filter(|r| r.kind == DATA)
        .map(|r| r.payload.clone())
        .collect()
}

/// Appends `payloads` as batches of `batch` records, all submitted before
/// any is waited for, so the writer groups them.
fn append_all(wal: &Wal, payloads: &[Vec<u8>], batch: usize) {
    let (tx, rx) = mpsc::channel();
    let mut pending = 0;
    for group in payloads.chunks(batch.max(1)) {
        let mut b = Batch::default();
        for p in group {
            b.push(DATA, tag_of(DATA, p), p);
        }
        let tx = tx.clone();
        wal.submit(b, Box::new(move |r| tx.send(r).unwrap()));
        pending += 1;
    }
    for _ in 0..pending {
        rx.recv().unwrap().unwrap();
    }
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    segment::list(dir)
        .unwrap()
        .into_iter()
        .map(|s| segment::path(dir, s))
        .collect()
}

#[test]
fn records_survive_reopen_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..200u64)
        .map(|i| payload(i + 1, &[i as u8; 40]))
        .collect();
    {
        let opened = open(dir.path(), 1024);
        assert!(opened.records.is_empty());
        append_all(&opened.wal, &payloads, 7);
        assert!(opened.wal.stats().syncs.load(Ordering::Relaxed) > 0);
    }
    assert!(
        segment_files(dir.path()).len() > 5,
        "expected several segments"
    );
    let opened = open(dir.path(), 1024);
    assert_eq!(opened.truncation, None);
    assert_eq!(data_records(&opened.records), payloads);
    // Every segment after the first starts with the checkpoint.
    let checkpoints = opened
        .records
        .iter()
        .filter(|r| r.kind == CHECKPOINT)
        .count();
    assert_eq!(checkpoints, segment_files(dir.path()).len() - 1);
}

#[test]
fn purge_keeps_the_checkpoint_and_everything_above() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..100u64).map(|i| payload(i + 1, &[7; 50])).collect();
    {
        let opened = open(dir.path(), 512);
        append_all(&opened.wal, &payloads, 3);
        let before = segment_files(dir.path()).len();
        opened.wal.purge(60).unwrap();
        let after = segment_files(dir.path()).len();
        assert!(after < before, "purge removed nothing ({before} segments)");
    }
    let opened = open(dir.path(), 512);
    let data = data_records(&opened.records);
    assert!(data.len() < payloads.len());
    assert_eq!(data[..], payloads[payloads.len() - data.len()..]);
    assert!(
        tag_of(DATA, &data[0]) <= 61,
        "an entry above the purge point was lost"
    );
    assert_eq!(opened.records[0].kind, CHECKPOINT);
}

#[test]
fn a_record_larger_than_a_segment_gets_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let payloads = vec![
        payload(1, b"small"),
        payload(2, &[9; 5000]),
        payload(3, b"after"),
    ];
    {
        let opened = open(dir.path(), 256);
        append_all(&opened.wal, &payloads, 1);
    }
    assert_eq!(data_records(&open(dir.path(), 256).records), payloads);
}

#[test]
fn a_crash_while_rolling_leaves_a_usable_log() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..30u64).map(|i| payload(i + 1, &[1; 30])).collect();
    {
        let opened = open(dir.path(), 512);
        append_all(&opened.wal, &payloads, 1);
    }
    // The next segment was created, but nothing was written to it.
    let last = *segment::list(dir.path()).unwrap().last().unwrap();
    segment::create(dir.path(), last + 1, 512).unwrap();
    {
        let opened = open(dir.path(), 512);
        assert_eq!(data_records(&opened.records), payloads);
        append_all(&opened.wal, &[payload(99, b"more")], 1);
    }
    let mut expected = payloads.clone();
    expected.push(payload(99, b"more"));
    assert_eq!(data_records(&open(dir.path(), 512).records), expected);
}

#[derive(Debug, Clone)]
enum Damage {
    /// Cut the chosen segment file at a fraction of its written length.
    Cut { segment: usize, at: f64 },
    /// Flip bits at fractions of a segment's length.
    Flip {
        segment: usize,
        bits: Vec<(f64, u8)>,
    },
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0.0..1.0f64).prop_map(|(segment, at)| Damage::Cut { segment, at }),
        (
            any::<usize>(),
            prop::collection::vec((0.0..1.0f64, 0u8..8), 1..5)
        )
            .prop_map(|(segment, bits)| Damage::Flip { segment, bits }),
    ]
}

fn apply(dir: &Path, damage: &Damage) {
    let files = segment_files(dir);
    match damage {
        Damage::Cut { segment, at } => {
            let path = &files[segment % files.len()];
            let data = std::fs::read(path).unwrap();
            // Cut inside the written part, where it matters.
            let written = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            let cut = (written as f64 * at) as u64;
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(cut).unwrap();
        }
        Damage::Flip { segment, bits } => {
            let path = &files[segment % files.len()];
            let mut data = std::fs::read(path).unwrap();
            if data.is_empty() {
                return;
            }
            // Mostly inside the written part, sometimes in the zero tail.
            let written = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            let span = (written + 16).min(data.len());
            for &(at, bit) in bits {
                let pos = ((span as f64 * at) as usize).min(data.len() - 1);
                data[pos] ^= 1 << bit;
            }
            std::fs::write(path, data).unwrap();
        }
    }
}

fn is_prefix(short: &[Vec<u8>], long: &[Vec<u8>]) -> bool {
    short.len() <= long.len() && short == &long[..short.len()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whatever is cut or flipped, recovery yields a prefix of the
    /// acknowledged records with no damaged record in it, and appending
    /// after recovery never resurrects anything that was cut off.
    #[test]
    fn recovery_after_damage_yields_a_prefix(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 1..60),
        batch in 1usize..8,
        segment_size in 200u64..1500,
        damage in damage_strategy(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let acked: Vec<Vec<u8>> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| payload(i as u64 + 1, b))
            .collect();
        {
            let opened = open(dir.path(), segment_size);
            append_all(&opened.wal, &acked, batch);
        }
        apply(dir.path(), &damage);

        let recovered = {
            let opened = open(dir.path(), segment_size);
            let data = data_records(&opened.records);
            prop_assert!(is_prefix(&data, &acked), "recovered {} records, not a prefix", data.len());
            // Append after recovery, then recover again.
            append_all(&opened.wal, &[payload(1000, b"after recovery")], 1);
            data
        };
        let mut expected = recovered;
        expected.push(payload(1000, b"after recovery"));
        let again = open(dir.path(), segment_size);
        prop_assert_eq!(again.truncation, None);
        prop_assert_eq!(data_records(&again.records), expected);
    }
}
