//! How the log reaches the disk: one write and one `fdatasync` per group
//! commit, submitted together through io_uring (a linked pair, one
//! `io_uring_enter`), or as plain `pwrite` + `fdatasync` where io_uring is
//! unavailable (old kernels, seccomp profiles that block it) or turned off.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::str::FromStr;

use io_uring::{opcode, squeue, types, IoUring};

/// Which system interface the writer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring when the kernel offers it, otherwise plain syscalls.
    #[default]
    Auto,
    /// io_uring or fail to open.
    Uring,
    /// `pwrite` + `fdatasync`.
    Syscall,
}

impl FromStr for IoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" => Ok(IoMode::Uring),
            "syscall" | "sync" => Ok(IoMode::Syscall),
            other => Err(format!(
                "unknown WAL I/O mode {other:?} (expected auto, uring or syscall)"
            )),
        }
    }
}

impl IoMode {
    /// The mode named by `TESSERA_WAL_IO`, if set; lets a whole test suite
    /// run with io_uring forced off.
    pub fn from_env() -> Result<Option<IoMode>, String> {
        match std::env::var("TESSERA_WAL_IO") {
            Ok(v) if !v.is_empty() => v.parse().map(Some),
            _ => Ok(None),
        }
    }
}

pub enum Backend {
    Uring(Box<IoUring>),
    Syscall,
}

impl Backend {
    pub fn new(mode: IoMode) -> io::Result<Backend> {
        match mode {
            IoMode::Syscall => Ok(Backend::Syscall),
            IoMode::Uring => Ok(Backend::Uring(Box::new(IoUring::new(8)?))),
            IoMode::Auto => match IoUring::new(8) {
                Ok(ring) => Ok(Backend::Uring(Box::new(ring))),
                Err(e) => {
                    tracing::info!(error = %e, "io_uring unavailable; the WAL uses pwrite + fdatasync");
                    Ok(Backend::Syscall)
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Uring(_) => "io_uring",
            Backend::Syscall => "syscall",
        }
    }

    /// Writes `buf` at `offset` and makes it durable before returning.
    pub fn write_durably(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        if sync_fails_now() {
            // As a failed fdatasync whose dirty pages the kernel dropped:
            // the caller is told EIO and nothing reaches the disk.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.write_and_sync(file, offset, buf)
    }

    fn write_and_sync(&mut self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        match self {
            Backend::Syscall => {
                file.write_all_at(buf, offset)?;
                file.sync_data()
            }
            Backend::Uring(ring) => {
                let written = uring_write_and_sync(ring, file, offset, buf)?;
                if written < buf.len() {
                    // A short write breaks the link and cancels the sync:
                    // finish the rest the plain way.
                    file.write_all_at(&buf[written..], offset + written as u64)?;
                    file.sync_data()?;
                }
                Ok(())
            }
        }
    }
}

/// Failpoint `wal-sync-fails-once-after=N`: the process's durable write
/// number N+1 (counting from 0, over every log that writes through a
/// `Backend`) reports `EIO` once and writes nothing, as a disk whose
/// `fdatasync` failed and lost the pages; the ones after it succeed again. A log must not carry on as if the failed one
/// had been durable (fsyncgate).
fn sync_fails_now() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static DURABLE_WRITES: AtomicU64 = AtomicU64::new(0);
    let Some(after) =
        crate::failpoint::value("wal-sync-fails-once-after").and_then(|v| v.parse::<u64>().ok())
    else {
        return false;
    };
    DURABLE_WRITES.fetch_add(1, Ordering::Relaxed) == after
}

/// Submits a linked write + fdatasync; returns how many bytes were written
/// (all of them unless the write came back short).
fn uring_write_and_sync(
    ring: &mut IoUring,
    file: &File,
    offset: u64,
    buf: &[u8],
) -> io::Result<usize> {
    const WRITE: u64 = 1;
    const SYNC: u64 = 2;
    let fd = types::Fd(file.as_raw_fd());
    let len = u32::try_from(buf.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "WAL write over 4 GiB"))?;
    let sync = opcode::Fsync::new(fd)
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(SYNC);
    let mut expected = 1;
    // SAFETY: `buf` and `file` outlive the submission: we wait for every
    // completion below before returning.
    unsafe {
        let mut sq = ring.submission();
        if len > 0 {
            let write = opcode::Write::new(fd, buf.as_ptr(), len)
                .offset(offset)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(WRITE);
            sq.push(&write)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            expected = 2;
        }
        sq.push(&sync)
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut done = 0;
    let mut written = 0usize;
    let mut failure: Option<io::Error> = None;
    while done < expected {
        match ring.submit_and_wait(expected - done) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            done += 1;
            let res = cqe.result();
            match cqe.user_data() {
                WRITE if res >= 0 => written = res as usize,
                SYNC if res == -libc::ECANCELED => {} // after a short write
                _ if res < 0 => {
                    failure.get_or_insert(io::Error::from_raw_os_error(-res));
                }
                _ => {}
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(if len == 0 { 0 } else { written }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_write_durably() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [IoMode::Auto, IoMode::Syscall] {
            let path = dir.path().join(format!("{mode:?}"));
            let file = File::options()
                .create(true)
                .read(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            let mut backend = Backend::new(mode).unwrap();
            backend.write_durably(&file, 0, b"hello ").unwrap();
            backend.write_durably(&file, 6, b"world").unwrap();
            backend.write_durably(&file, 11, &[]).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"hello world", "{mode:?}");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("syscall".parse::<IoMode>(), Ok(IoMode::Syscall));
        assert_eq!("uring".parse::<IoMode>(), Ok(IoMode::Uring));
        assert!("fast".parse::<IoMode>().is_err());
    }
}
