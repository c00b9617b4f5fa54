//! Filesystems on an attached volume: what a device holds, formatting it
//! only when it was read as blank, growing, usage. Also the device checks
//! the node uses to tell whether a path is this volume.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// How much of the device's start must read as zeros before it may be
/// formatted: every filesystem and partition table we know of keeps its
/// signature there.
const BLANK_PROBE: usize = 1 << 20;

/// What a device holds.
#[derive(Debug, PartialEq)]
pub enum Content {
    /// Read, and all zeros where signatures live, and no signature found.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else (a partition table, raw data, an unknown
    /// signature): never formatted over.
    Unknown(String),
}

/// Reads the device's start (a read error is an error: a device that
/// cannot be read is never taken for blank) and asks `blkid` what it holds.
pub fn probe(device: &str) -> anyhow::Result<Content> {
    let head = read_head(device)?;
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .context("cannot run blkid")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    match out.status.code() {
        // blkid: 2 is "nothing found".
        Some(2) if head.iter().all(|&b| b == 0) => Ok(Content::Blank),
        Some(2) => Ok(Content::Unknown(
            "data without a known signature in its first MiB".into(),
        )),
        Some(0) => match field("TYPE") {
            Some(t) => Ok(Content::Filesystem(t)),
            None => Ok(Content::Unknown(
                field("PTTYPE")
                    .map(|p| format!("a {p} partition table"))
                    .unwrap_or_else(|| format!("a signature blkid reports as {:?}", text.trim())),
            )),
        },
        _ => bail!(
            "blkid cannot tell what {device} holds ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

fn read_head(device: &str) -> anyhow::Result<Vec<u8>> {
    // O_DIRECT: read the volume, not a page cache filled before.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("cannot open {device}"))?;
    let layout = std::alloc::Layout::from_size_align(BLANK_PROBE, 4096)?;
    // SAFETY: a non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        bail!("out of memory");
    }
    // SAFETY: ptr is valid for BLANK_PROBE bytes until dealloc below.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, BLANK_PROBE) };
    let size = device_size(device)?;
    let want = BLANK_PROBE.min(size as usize);
    let mut done = 0;
    let result = loop {
        if done >= want {
            break Ok(buf[..want].to_vec());
        }
        match f.read(&mut buf[done..want]) {
            Ok(0) => break Ok(buf[..done].to_vec()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                break Err(anyhow::Error::new(e).context(format!(
                    "cannot read {device} (not formatting a device that cannot be read)"
                )))
            }
        }
    };
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    result
}

/// Formats a blank device.
pub fn format(device: &str, fs_type: &str) -> anyhow::Result<()> {
    let mut cmd = match fs_type {
        // No discard pass: a new volume reads as zeros already.
        "ext4" => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-q", "-F", "-E", "nodiscard"]);
            c
        }
        "xfs" => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-f", "-K"]);
            c
        }
        other => bail!("cannot format {other}"),
    };
    let out = cmd
        .arg(device)
        .output()
        .with_context(|| format!("cannot run mkfs.{fs_type}"))?;
    if !out.status.success() {
        // The first lines say why; the rest is the usage text.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why: Vec<&str> = stderr.lines().take(2).collect();
        bail!(
            "mkfs.{fs_type} {device} failed ({}): {}",
            out.status,
            why.join(" ")
        );
    }
    Ok(())
}

/// Grows the filesystem mounted at `mount_point` (on `device`) to the
/// device's size, online.
pub fn grow(device: &str, mount_point: &Path, fs_type: &str) -> anyhow::Result<()> {
    let out = match fs_type {
        "ext4" | "ext3" | "ext2" => Command::new("resize2fs").arg(device).output(),
        "xfs" => Command::new("xfs_growfs").arg(mount_point).output(),
        other => bail!("cannot grow a {other} filesystem"),
    }
    .with_context(|| format!("cannot grow the {fs_type} filesystem"))?;
    if !out.status.success() {
        bail!(
            "growing the {fs_type} filesystem on {device} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A block device's size in bytes.
pub fn device_size(device: &str) -> anyhow::Result<u64> {
    let f = File::open(device).with_context(|| format!("cannot open {device}"))?;
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t).
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`.
    let r = unsafe {
        libc::ioctl(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            BLKGETSIZE64,
            &mut size,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read the size of {device}"));
    }
    Ok(size)
}

/// The device number of a block device file.
pub fn rdev(device: &str) -> anyhow::Result<u64> {
    let meta = std::fs::metadata(device).with_context(|| format!("cannot stat {device}"))?;
    if !meta.file_type().is_block_device() {
        bail!("{device} is not a block device");
    }
    Ok(meta.rdev())
}

/// How `path` presents the device `rdev`, if it does: a filesystem on it
/// (the path is on that filesystem) or the device itself (a bind mount of
/// the device file).
#[derive(Debug, PartialEq)]
pub enum Presented {
    Filesystem,
    Block,
}

pub fn presents(path: &Path, rdev: u64) -> Option<Presented> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() && meta.rdev() == rdev {
        Some(Presented::Block)
    } else if meta.dev() == rdev {
        Some(Presented::Filesystem)
    } else {
        None
    }
}

/// Bytes and inodes of the filesystem at `path`: (total, available, used)
/// of each.
pub fn usage(path: &Path) -> anyhow::Result<[(u64, u64, u64); 2]> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs fills the zeroed struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot statvfs {}", path.display()));
    }
    let unit = s.f_frsize;
    Ok([
        (
            s.f_blocks * unit,
            s.f_bavail * unit,
            s.f_blocks.saturating_sub(s.f_bfree) * unit,
        ),
        (s.f_files, s.f_favail, s.f_files.saturating_sub(s.f_ffree)),
    ])
}
