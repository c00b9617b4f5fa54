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

/// Whether `result` is a refusal because the log is corrupt.
fn is_corrupt<T>(result: &Result<T, WalError>) -> bool {
    matches!(result, Err(WalError::Corrupt { .. }))
}

/// Writes `acked`, then one more batch `torn` whose write is torn as a power
/// loss tears it: the sectors whose index `lost` picks keep what they held
/// before that write (the bytes it would have put there stay zero).
/// Returns the directory.
fn log_with_torn_last_write(
    acked: &[Vec<u8>],
    torn: &[Vec<u8>],
    segment_size: u64,
    lost: &dyn Fn(usize) -> bool,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let opened = open(dir.path(), segment_size);
        append_all(&opened.wal, acked, 3);
        let files = segment_files(dir.path());
        let last = files.last().unwrap().clone();
        let before = std::fs::read(&last).unwrap();
        append_all(&opened.wal, torn, torn.len());
        (files.len(), last, before)
    };
    let (count, last, old) = before;
    let files = segment_files(dir.path());
    // The last write went to the last file: from where it changed the old
    // last segment, or from the start of a segment it rolled to.
    let (path, from) = if files.len() == count {
        let new = std::fs::read(&last).unwrap();
        let from = old
            .iter()
            .zip(&new)
            .position(|(a, b)| a != b)
            .unwrap_or(old.len());
        (last, from)
    } else {
        (files.last().unwrap().clone(), 0)
    };
    let mut data = std::fs::read(&path).unwrap();
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    for sector in from / 512..end.div_ceil(512) {
        if lost(sector) {
            let start = (sector * 512).max(from);
            let stop = ((sector + 1) * 512).min(data.len());
            data[start..stop].iter_mut().for_each(|b| *b = 0);
        }
    }
    std::fs::write(&path, data).unwrap();
    dir
}

/// The torn last write of a power loss is cut off, and nothing before it
/// (all acknowledged) is lost, whichever of its sectors reached the disk.
#[test]
fn a_torn_last_write_is_cut_and_everything_before_it_kept() {
    let acked: Vec<Vec<u8>> = (0..20u64).map(|i| payload(i + 1, &[5; 300])).collect();
    let torn: Vec<Vec<u8>> = (20..26u64).map(|i| payload(i + 1, &[6; 700])).collect();
    for pattern in 0..16usize {
        // Which sectors the power loss kept from the disk: every k-th.
        let lost = |sector: usize| (sector + pattern).is_multiple_of(pattern % 4 + 2);
        let dir = log_with_torn_last_write(&acked, &torn, 64 << 10, &lost);
        let opened = open(dir.path(), 64 << 10);
        let data = data_records(&opened.records);
        assert!(
            is_prefix(&acked, &data),
            "pattern {pattern}: lost acknowledged records"
        );
        assert!(is_prefix(&data, &[acked.clone(), torn.clone()].concat()));
        assert!(
            opened.truncation.is_some(),
            "pattern {pattern}: nothing was cut"
        );
    }
}

/// A flipped bit in an older segment is corruption, not a torn tail: the
/// log refuses to open rather than drop everything after it (the newest
/// entries and votes).
#[test]
fn corruption_in_an_older_segment_stops_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..100u64).map(|i| payload(i + 1, &[3; 60])).collect();
    {
        let opened = open(dir.path(), 1024);
        append_all(&opened.wal, &payloads, 2);
    }
    let files = segment_files(dir.path());
    assert!(files.len() > 3);
    let mut data = std::fs::read(&files[1]).unwrap();
    data[200] ^= 0x10;
    std::fs::write(&files[1], data).unwrap();
    let err = Wal::open(dir.path(), options(1024), tag_of).err();
    assert!(matches!(err, Some(WalError::Corrupt { .. })), "{err:?}");
    let text = err.unwrap().to_string();
    assert!(
        text.contains("0000000000000001.wal") && text.contains("restore this member"),
        "{text}"
    );
    // Nothing was deleted or cut.
    assert_eq!(segment_files(dir.path()).len(), files.len());
}

/// In the last segment too, a damaged record whose sectors were all
/// written is corruption (a torn write leaves sectors unwritten).
#[test]
fn corruption_in_the_middle_of_the_last_segment_stops_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..40u64).map(|i| payload(i + 1, &[4; 100])).collect();
    {
        let opened = open(dir.path(), 1 << 20);
        append_all(&opened.wal, &payloads, 4);
    }
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let mut data = std::fs::read(&files[0]).unwrap();
    data[1500] ^= 0x01;
    std::fs::write(&files[0], data).unwrap();
    assert!(is_corrupt(&Wal::open(dir.path(), options(1 << 20), tag_of)));
}

/// A segment missing from the middle of the sequence is corruption.
#[test]
fn a_missing_segment_stops_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..100u64).map(|i| payload(i + 1, &[3; 60])).collect();
    {
        let opened = open(dir.path(), 1024);
        append_all(&opened.wal, &payloads, 2);
    }
    let files = segment_files(dir.path());
    std::fs::remove_file(&files[2]).unwrap();
    assert!(is_corrupt(&Wal::open(dir.path(), options(1024), tag_of)));
}

/// A flipped bit in a record's length, in the last segment, used to pass
/// for a torn tail (the claimed end reached into the zeros past the data)
/// and drop every record after it. The header checksum catches it.
#[test]
fn a_damaged_length_in_the_last_segment_stops_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..40u64).map(|i| payload(i + 1, &[4; 100])).collect();
    {
        let opened = open(dir.path(), 1 << 20);
        append_all(&opened.wal, &payloads, 4);
    }
    let files = segment_files(dir.path());
    let mut data = std::fs::read(&files[0]).unwrap();
    // The length field of a record in the middle: find a record start by
    // walking the framing from the segment header.
    let mut at = match record::decode(&data, record::Version::V1) {
        record::Decoded::Record { len, .. } => len,
        other => panic!("{other:?}"),
    };
    for _ in 0..20 {
        match record::decode(&data[at..], record::Version::V2) {
            record::Decoded::Record { len, .. } => at += len,
            other => panic!("{other:?}"),
        }
    }
    data[at + 4 + 2] ^= 0x10; // length += 1 MiB: past the written data
    std::fs::write(&files[0], data).unwrap();
    let err = Wal::open(dir.path(), options(1 << 20), tag_of).err();
    assert!(matches!(err, Some(WalError::Corrupt { .. })), "{err:?}");
}

/// A segment written before header checksums (version-1 records) still
/// recovers; new records go to a new segment in the new framing.
#[test]
fn segments_of_the_older_framing_are_read_and_left_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<Vec<u8>> = (0..10u64).map(|i| payload(i + 1, &[9; 50])).collect();
    let mut bytes = Vec::new();
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&0u64.to_le_bytes());
    record::encode_v1(record::SEGMENT_HEADER, &header, &mut bytes);
    for p in &old {
        record::encode_v1(DATA, p, &mut bytes);
    }
    bytes.resize(1 << 16, 0);
    std::fs::write(segment::path(dir.path(), 0), &bytes).unwrap();
    let mut expected = old.clone();
    {
        let opened = open(dir.path(), 1 << 16);
        assert_eq!(data_records(&opened.records), old);
        let new = vec![payload(11, b"new")];
        append_all(&opened.wal, &new, 1);
        expected.extend(new);
    }
    assert_eq!(
        segment_files(dir.path()).len(),
        2,
        "new records in a new segment"
    );
    assert_eq!(
        std::fs::read(segment::path(dir.path(), 0)).unwrap(),
        bytes,
        "the old segment unchanged"
    );
    let opened = open(dir.path(), 1 << 16);
    assert_eq!(data_records(&opened.records), expected);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whatever is cut or flipped, recovery either refuses with
    /// `Corrupt` or yields a prefix of the acknowledged records with no
    /// damaged record in it; and appending after recovery never
    /// resurrects anything that was cut off.
    #[test]
    fn recovery_after_damage_yields_a_prefix_or_refuses(
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

        let opened = Wal::open(dir.path(), options(segment_size), tag_of);
        if is_corrupt(&opened) {
            return Ok(());
        }
        let recovered = {
            let opened = opened.unwrap();
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

    /// A power loss tears at most the last write: recovery always succeeds
    /// and keeps every acknowledged record, whatever sectors of that write
    /// were lost and wherever it falls in the segments.
    #[test]
    fn a_torn_last_write_never_loses_acknowledged_records(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..400), 1..40),
        torn in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..900), 1..6),
        segment_size in 600u64..6000,
        lost in prop::collection::vec(any::<bool>(), 1..16),
    ) {
        let acked: Vec<Vec<u8>> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| payload(i as u64 + 1, b))
            .collect();
        let torn: Vec<Vec<u8>> = torn
            .iter()
            .enumerate()
            .map(|(i, b)| payload(acked.len() as u64 + i as u64 + 1, b))
            .collect();
        let dir = log_with_torn_last_write(&acked, &torn, segment_size, &|s| lost[s % lost.len()]);
        let opened = Wal::open(dir.path(), options(segment_size), tag_of);
        prop_assert!(opened.is_ok(), "a torn tail was refused: {:?}", opened.err());
        let data = data_records(&opened.unwrap().records);
        prop_assert!(is_prefix(&acked, &data), "acknowledged records lost: {} of {}", data.len(), acked.len());
        prop_assert!(is_prefix(&data, &[acked, torn].concat()));
    }
}
