//! Torn and corrupted write-ahead logs: a log of records spread over several
//! small segments is damaged as the input says (bytes overwritten, files cut
//! short) and opened again. Recovery must not panic, must return a prefix
//! of what was written (never a damaged record), and the log must take new
//! records after it and return them on the next open.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tessera_storage::wal::{Batch, IoMode, Wal, WalOptions};

const DATA: u8 = 1;
const SEGMENT: u64 = 4096;

fn options() -> WalOptions {
    WalOptions {
        segment_size: SEGMENT,
        io_mode: IoMode::Syscall,
    }
}

fn tag_of(_kind: u8, payload: &[u8]) -> u64 {
    payload.first().copied().unwrap_or(0) as u64
}

/// The records of the pristine log, and a directory holding it.
fn pristine() -> &'static (tempfile::TempDir, Vec<Vec<u8>>) {
    static LOG: OnceLock<(tempfile::TempDir, Vec<Vec<u8>>)> = OnceLock::new();
    LOG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let opened = Wal::open(dir.path(), options(), tag_of).expect("open a new WAL");
        let records: Vec<Vec<u8>> = (0..40u8)
            .map(|i| std::iter::repeat_n(i, 10 + (i as usize * 37) % 300).collect())
            .collect();
        for group in records.chunks(3) {
            let mut b = Batch::default();
            for r in group {
                b.push(DATA, tag_of(DATA, r), r);
            }
            opened.wal.append(b).expect("append");
        }
        drop(opened);
        (dir, records)
    })
}

fn copy_dir(from: &Path, to: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(from).expect("read the pristine log") {
        let entry = entry.expect("dir entry");
        let dest = to.join(entry.file_name());
        std::fs::copy(entry.path(), &dest).expect("copy a segment");
        files.push(dest);
    }
    files.sort();
    files
}

fn data_records(records: &[tessera_storage::wal::Record]) -> Vec<Vec<u8>> {
    records
        .iter()
        .filter(|r| r.kind == DATA)
        .map(|r| r.payload.clone())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (source, written) = pristine();
    let dir = tempfile::tempdir().expect("temp dir");
    let files = copy_dir(source.path(), dir.path());
    // Each 4-byte chunk damages one file: [file, op, offset hi, offset lo].
    for op in data.chunks_exact(4) {
        let file = &files[op[0] as usize % files.len()];
        let offset = u64::from(u16::from_be_bytes([op[2], op[3]])) % SEGMENT;
        let mut bytes = std::fs::read(file).expect("read a segment");
        if op[1] & 1 == 0 {
            // Overwrite a byte (a bit flip or a torn sector's garbage).
            if let Some(b) = bytes.get_mut(offset as usize) {
                *b ^= op[1] | 1;
            }
        } else {
            // Cut the file short, as a crash while it grew would.
            bytes.truncate(offset as usize);
        }
        std::fs::write(file, bytes).expect("write a segment");
    }
    let opened = match Wal::open(dir.path(), options(), tag_of) {
        Ok(o) => o,
        // A refusal with an error is allowed; a panic or a wrong log is not.
        Err(_) => return,
    };
    let recovered = data_records(&opened.records);
    assert!(
        recovered.len() <= written.len() && recovered[..] == written[..recovered.len()],
        "recovery returned records that were not a prefix of the log"
    );
    // The log goes on after the cut, and keeps what it is given.
    let next = vec![200u8; 50];
    let mut b = Batch::default();
    b.push(DATA, tag_of(DATA, &next), &next);
    opened.wal.append(b).expect("append after recovery");
    drop(opened);
    let again = Wal::open(dir.path(), options(), tag_of).expect("reopen");
    let mut expected = recovered;
    expected.push(next);
    assert_eq!(
        data_records(&again.records),
        expected,
        "the appended record was lost"
    );
});
