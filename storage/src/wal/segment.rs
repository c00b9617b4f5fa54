//! Segment files: `<sequence as 16 hex digits>.wal`, preallocated so that a
//! group commit's `fdatasync` does not also have to grow the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".wal";

pub fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}{SUFFIX}"))
}

/// The sequence numbers of the segments in `dir`, ascending.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hex) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        if hex.len() == 16 {
            if let Ok(seq) = u64::from_str_radix(hex, 16) {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

pub fn open(dir: &Path, seq: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path(dir, seq))
}

/// Creates a new segment of `capacity` zero bytes, durable with its
/// directory entry.
pub fn create(dir: &Path, seq: u64, capacity: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path(dir, seq))?;
    preallocate(&file, capacity)?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// Cuts `file` at `offset` and zero-fills it back to `capacity`, so nothing
/// that was after the cut can be read as a record again.
pub fn cut(file: &File, offset: u64, capacity: u64) -> io::Result<()> {
    file.set_len(offset)?;
    preallocate(file, capacity.max(offset))?;
    file.sync_all()
}

/// Allocates blocks for `len` bytes (zeros); falls back to a sparse length
/// where the filesystem cannot allocate ahead.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let len_arg = i64::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_arg) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
        _ => Err(err),
    }
}

pub fn remove(dir: &Path, seq: u64) -> io::Result<()> {
    std::fs::remove_file(path(dir, seq))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
