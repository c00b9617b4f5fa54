//! Mounts on the node: what is mounted where (the kernel's mount table),
//! mounting, bind mounting and unmounting (util-linux `mount`/`umount`, so
//! mount flags arrive as the user wrote them), and the paths the plugin
//! may touch at all.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match escape {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mountpoint(path: &Path) -> anyhow::Result<bool> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let wanted = path.to_string_lossy();
    Ok(table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mount_point| unescape(mount_point) == wanted)
    }))
}

/// Whether the (topmost) mount at `path` is read-only.
pub fn is_read_only(path: &Path) -> anyhow::Result<bool> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let wanted = path.to_string_lossy();
    let options = table
        .lines()
        .rfind(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|mount_point| unescape(mount_point) == wanted)
        })
        .and_then(|line| line.split(' ').nth(5).map(str::to_string))
        .with_context(|| format!("{} is not a mount point", path.display()))?;
    Ok(options.split(',').any(|o| o == "ro"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Mounts a filesystem, with the user's flags (and `ro` when read-only).
pub fn mount(
    device: &str,
    target: &Path,
    fs_type: &str,
    flags: &[String],
    read_only: bool,
) -> anyhow::Result<()> {
    let mut options: Vec<String> = flags.to_vec();
    if read_only {
        options.push("ro".into());
    }
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs_type);
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    run(cmd.arg(device).arg(target))
}

/// Bind mounts `source` (a directory, or a device file) on `target`;
/// read-only takes a second step, as the kernel ignores `ro` on the bind.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> anyhow::Result<()> {
    run(Command::new("mount").arg("--bind").arg(source).arg(target))?;
    if read_only {
        if let Err(e) = run(Command::new("mount")
            .arg("-o")
            .arg("remount,bind,ro")
            .arg(target))
        {
            let _ = unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target`; busy mounts are an error (nothing is detached
/// lazily under a user still using it).
pub fn unmount(target: &Path) -> anyhow::Result<()> {
    run(Command::new("umount").arg(target))
}

/// Where the device `rdev` (`/dev/loopN`) is mounted: its filesystem
/// (the mount's device number) or the device file itself (a bind mount of
/// devtmpfs's `/loopN`).
pub fn users_of(rdev: u64, device: &str) -> anyhow::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let wanted = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    let node = format!("/{}", device.trim_start_matches("/dev/"));
    Ok(table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?;
            let on_device = fields.get(2) == Some(&wanted.as_str());
            let device_file = fs_type == "devtmpfs" && fields.get(3) == Some(&node.as_str());
            let mount_point = fields.get(4)?;
            (on_device || device_file).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect())
}

/// The paths the plugin creates, mounts and removes: absolute, without
/// `..`, under its managed directory (kubelet's), and without symbolic
/// links in the part that exists. Returned normalized (no `.`, no repeated
/// or trailing `/`), as the mount table spells paths.
pub fn check_managed(root: &Path, path: &str, what: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "{what} {path:?} must be an absolute path without '..'"
        ));
    }
    let normal: PathBuf = p.components().collect();
    if !normal.starts_with(root) || normal == root {
        return Err(format!(
            "{what} {path:?} is outside {}, the directory this plugin manages",
            root.display()
        ));
    }
    // Every existing component below the root must be what it says: a
    // link could lead a mount or a new file anywhere.
    let mut at = root.to_path_buf();
    for part in normal
        .strip_prefix(root)
        .map_err(|e| e.to_string())?
        .components()
    {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{what} {path:?} goes through a symbolic link ({}); refused",
                    at.display()
                ))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/var/lib/a\040b"), "/var/lib/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\"), r"/end\");
    }

    #[test]
    fn only_paths_under_the_managed_directory_are_accepted() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let inside = r.join("pods/x/mount");
        assert!(check_managed(r, inside.to_str().unwrap(), "target_path").is_ok());
        for bad in ["/etc", "relative/path", "/"] {
            assert!(check_managed(r, bad, "target_path").is_err(), "{bad}");
        }
        let dotdot = format!("{}/pods/../../etc", r.display());
        assert!(check_managed(r, &dotdot, "target_path").is_err());
        assert!(check_managed(r, r.to_str().unwrap(), "target_path").is_err());
        std::os::unix::fs::symlink("/etc", r.join("link")).unwrap();
        let through = format!("{}/link/x", r.display());
        assert!(check_managed(r, &through, "target_path").is_err());
        // A dangling link is refused too (creating through it would land
        // outside).
        std::os::unix::fs::symlink("/nonexistent/x", r.join("dangling")).unwrap();
        let dangling = format!("{}/dangling", r.display());
        assert!(check_managed(r, &dangling, "target_path").is_err());
        // Spelling is normalized as the mount table writes paths.
        let spelled = format!("{}/pods//x/./mount/", r.display());
        assert_eq!(
            check_managed(r, &spelled, "target_path").unwrap(),
            r.join("pods/x/mount")
        );
    }
}
