//! A volume as a block device on this machine.
//!
//! This kernel has neither ublk nor NBD, so the volume is served as one
//! file, `volume`, on a FUSE mount of our own (`fuser`, opened with direct
//! I/O so the page cache stays out of the way), and a loop device with
//! direct I/O and 4 KiB sectors is put on that file. Reads, writes and
//! flushes of the loop device arrive as FUSE requests and go to a
//! [`Backend`]: a [`Volume`] here; a plain local file for measuring what the
//! attach path itself costs. Another backend (ublk) would replace the FUSE
//! file and the loop device, not the volume.
//!
//! The I/O process is `tessera-store attach-daemon`, started (in its own
//! session, so it outlives whatever ran `volume attach`) by `volume
//! attach`, which prints the device once the daemon says it is usable.
//! Its state (`state.json`: pid, device, mount) lives under `--run-dir`;
//! `volume detach` removes the loop device and stops the daemon, which
//! flushes first. A daemon that died (SIGKILL) leaves state that the next
//! attach or detach cleans up.

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use serde::{Deserialize, Serialize};

use crate::codec::BLOCK;
use crate::volume::{Volume, VolumeError};

type IoFuture<T> = Pin<Box<dyn Future<Output = Result<T, i32>> + Send>>;

/// What serves the bytes of an attached device.
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: usize) -> IoFuture<Vec<u8>>;
    fn write(&self, offset: u64, data: Vec<u8>) -> IoFuture<()>;
    fn flush(&self) -> IoFuture<()>;
}

fn errno(e: &VolumeError) -> i32 {
    match e {
        VolumeError::OutOfRange { .. } => libc::EINVAL,
        VolumeError::ReadOnly => libc::EROFS,
        _ => libc::EIO,
    }
}

impl Backend for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let v = self.clone();
        Box::pin(async move {
            v.read(offset, len).await.map_err(|e| {
                tracing::warn!(offset, len, error = %e, "read failed");
                errno(&e)
            })
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let v = self.clone();
        Box::pin(async move {
            v.write(offset, &data).await.map_err(|e| {
                tracing::warn!(offset, len = data.len(), error = %e, "write failed");
                errno(&e)
            })
        })
    }

    fn flush(&self) -> IoFuture<()> {
        let v = self.clone();
        Box::pin(async move {
            v.flush().await.map_err(|e| {
                tracing::warn!(error = %e, "flush failed");
                errno(&e)
            })
        })
    }
}

/// A local file as the backend: the attach path without the store.
pub struct LocalFile {
    file: Arc<std::fs::File>,
    size: u64,
}

impl LocalFile {
    pub fn open(path: &Path, size: u64) -> std::io::Result<LocalFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.set_len(size)?;
        Ok(LocalFile {
            file: Arc::new(file),
            size,
        })
    }
}

impl Backend for LocalFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(|_| libc::EIO)?
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&data, offset)
            })
            .await
            .map_err(|_| libc::EIO)?
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        })
    }

    fn flush(&self) -> IoFuture<()> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|_| libc::EIO)?
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
        })
    }
}

/// FUSE_ASYNC_DIO (kernel ABI 7.22), spelled out: fuser exports the name
/// only under a feature that would raise its whole ABI level.
const FUSE_ASYNC_DIO: u64 = 1 << 15;
const ROOT: u64 = 1;
const FILE: u64 = 2;
const FILE_NAME: &str = "volume";
/// Attributes are not cached: an expanded volume's new size must reach the
/// kernel when the loop device re-reads it.
const TTL: Duration = Duration::ZERO;

/// The FUSE filesystem: one directory holding one file, the device's bytes.
struct DeviceFs {
    backend: Arc<dyn Backend>,
    runtime: tokio::runtime::Handle,
}

impl DeviceFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let now = SystemTime::now();
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.backend.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }
}

impl Filesystem for DeviceFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Large requests: a loop device with direct I/O passes on up to its
        // queue's limit; FUSE's default is 128 KiB.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        // Without asynchronous direct I/O the kernel sends a direct I/O
        // file's requests one at a time, so the loop device above would
        // have one request in flight whatever its queue depth.
        if config.add_capabilities(FUSE_ASYNC_DIO).is_err() {
            tracing::warn!(
                "this kernel's FUSE has no asynchronous direct I/O: one request at a time"
            );
        }
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // The device's size is the volume's; nothing else is settable.
        if size.is_some_and(|s| s != self.backend.size()) {
            reply.error(libc::EPERM);
        } else {
            reply.attr(&TTL, &self.attr(ino));
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == FILE {
            reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
        } else {
            reply.error(libc::EISDIR);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let total = self.backend.size();
        let offset = offset.max(0) as u64;
        let len = (size as u64).min(total.saturating_sub(offset)) as usize;
        let read = self.backend.read(offset, len);
        self.runtime.spawn(async move {
            match read.await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let len = data.len() as u32;
        let write = self.backend.write(offset.max(0) as u64, data.to_vec());
        self.runtime.spawn(async move {
            match write.await {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        self.sync(reply);
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(reply);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(libc::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

impl DeviceFs {
    fn sync(&self, reply: ReplyEmpty) {
        let flush = self.backend.flush();
        self.runtime.spawn(async move {
            match flush.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }
}

/// A mounted device file: unmounted when dropped.
pub struct Mounted {
    _session: fuser::BackgroundSession,
    pub file: PathBuf,
}

/// Serves `backend` as `mountpoint/volume` (the mount point is created).
pub fn mount(backend: Arc<dyn Backend>, mountpoint: &Path) -> anyhow::Result<Mounted> {
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("cannot create {}", mountpoint.display()))?;
    let fs = DeviceFs {
        backend,
        runtime: tokio::runtime::Handle::current(),
    };
    let options = [
        MountOption::FSName("tessera".into()),
        MountOption::Subtype("tessera".into()),
        MountOption::RW,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    let session = fuser::spawn_mount2(fs, mountpoint, &options).with_context(|| {
        format!(
            "cannot mount the device file on {} (is /dev/fuse available?)",
            mountpoint.display()
        )
    })?;
    Ok(Mounted {
        _session: session,
        file: mountpoint.join(FILE_NAME),
    })
}

/// Puts a loop device on `file`: direct I/O (no second page cache) and
/// 4 KiB sectors (no partial blocks), read-only if asked; returns its path.
pub fn loop_attach(file: &Path, read_only: bool) -> anyhow::Result<String> {
    let attempt = |direct: bool| {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show", "--sector-size", "4096"]);
        if read_only {
            cmd.arg("--read-only");
        }
        if direct {
            cmd.arg("--direct-io=on");
        }
        cmd.arg(file).output()
    };
    let mut out = attempt(true).context("cannot run losetup (util-linux)")?;
    if !out.status.success() {
        tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "loop device without direct I/O");
        out = attempt(false).context("cannot run losetup")?;
    }
    if !out.status.success() {
        bail!(
            "losetup {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes a loop device (its backing file is closed, flushing it).
pub fn loop_detach(device: &str) -> anyhow::Result<()> {
    let out = Command::new("losetup")
        .args(["-d", device])
        .output()
        .context("cannot run losetup")?;
    if !out.status.success() {
        bail!(
            "losetup -d {device}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether loop `device` is still backed by `file`: a device number that
/// was freed and taken by another attach since must be left alone.
pub fn loop_backed_by(device: &str, file: &Path) -> bool {
    let name = device.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .is_ok_and(|backing| Path::new(backing.trim_end()) == file)
}

/// Removes loop `device` if it is still the one on `file`; one that is
/// gone (or now someone else's) is left as it is.
pub fn loop_detach_own(device: &str, file: &Path) -> anyhow::Result<()> {
    if !loop_backed_by(device, file) {
        return Ok(());
    }
    loop_detach(device)
}

/// Grows a loop device to its backing file's size (after an expansion).
pub fn loop_resize(device: &str) -> anyhow::Result<()> {
    let out = Command::new("losetup")
        .args(["-c", device])
        .output()
        .context("cannot run losetup")?;
    if !out.status.success() {
        bail!(
            "losetup -c {device}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What a running attach daemon left in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachState {
    pub volume: String,
    pub pid: u32,
    pub device: String,
    pub mountpoint: PathBuf,
    pub epoch: u64,
    pub started: u64,
}

impl AttachState {
    /// The file on the FUSE mount its loop device is put on.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }
}

pub fn state_dir(run_dir: &Path, volume: &str) -> PathBuf {
    run_dir.join(volume)
}

pub fn read_state(run_dir: &Path, volume: &str) -> Option<AttachState> {
    let raw = std::fs::read(state_dir(run_dir, volume).join("state.json")).ok()?;
    serde_json::from_slice(&raw).ok()
}

pub fn write_state(run_dir: &Path, state: &AttachState) -> std::io::Result<()> {
    let dir = state_dir(run_dir, &state.volume);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state).unwrap_or_default())?;
    std::fs::rename(&tmp, dir.join("state.json"))
}

/// Whether process `pid` runs (a zombie, killed but not yet reaped by
/// whatever adopted it, does not).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    pid > 0 && !matches!(state, Some('Z') | Some('X') | None)
}

/// Whether `pid` is a live attach daemon (not a process that got the
/// number of a dead one).
pub fn attach_daemon_alive(pid: u32) -> bool {
    process_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|arg| arg == b"attach-daemon"))
}

/// Clears what a dead attach daemon of `volume` left behind: its loop
/// device, its FUSE mount, its state file.
pub fn clean_stale(run_dir: &Path, volume: &str) {
    let Some(state) = read_state(run_dir, volume) else {
        return;
    };
    if attach_daemon_alive(state.pid) {
        return;
    }
    tracing::info!(volume, pid = state.pid, device = %state.device, "cleaning up after a dead attach process");
    if !state.device.is_empty() {
        let _ = loop_detach_own(&state.device, &state.file());
    }
    unmount(&state.mountpoint);
    let _ = std::fs::remove_file(state_dir(run_dir, volume).join("state.json"));
}

/// Lazily unmounts `path` (a FUSE mount whose server may be gone).
pub fn unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a plain umount2 call with a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
