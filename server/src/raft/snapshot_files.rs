//! This member's Raft snapshot, kept in a file under `member/snap` instead of
//! in memory: a dump of the state machine ([`crate::snapshot`]) built when
//! openraft asks for one, or received from the leader. Only the newest is
//! kept. The directory also holds the scratch files of the Maintenance
//! `Snapshot` RPC, so a dump never has to fit in memory.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use openraft::{BasicNode, SnapshotMeta};

pub type Meta = SnapshotMeta<u64, BasicNode>;

/// The snapshot openraft can send to followers.
const CURRENT: &str = "current.snap";
/// The snapshot being received from the leader.
const RECEIVING: &str = "receiving.tmp";
/// Files being built or used as scratch end in this.
const TEMPORARY: &str = ".tmp";

pub struct SnapshotFiles {
    dir: PathBuf,
    /// The metadata of [`CURRENT`]; also the lock for replacing it.
    current: Mutex<Option<Meta>>,
    next_temporary: AtomicU64,
}

impl SnapshotFiles {
    /// Opens `dir`, creating it. Files an earlier run left are removed: the
    /// metadata of its snapshot was not kept, and openraft builds a new
    /// snapshot at startup when its log has been purged.
    pub fn open(dir: &Path) -> io::Result<SnapshotFiles> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == CURRENT || name.ends_with(TEMPORARY) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(SnapshotFiles {
            dir: dir.to_path_buf(),
            current: Mutex::new(None),
            next_temporary: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Meta>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new file in this directory (so it can be renamed into place).
    pub fn create_temporary(&self) -> io::Result<(PathBuf, File)> {
        let n = self.next_temporary.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n}{TEMPORARY}"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// A file with no name, gone when it is closed: room for a dump that is
    /// read back once.
    pub fn scratch(&self) -> io::Result<File> {
        let (path, file) = self.create_temporary()?;
        std::fs::remove_file(path)?;
        Ok(file)
    }

    /// Makes the built dump at `built` the current snapshot, unless the
    /// current one is newer (installed from the leader while this one was
    /// built); then `built` is removed. Returns whether it became current.
    pub fn publish_built(&self, built: &Path, meta: Meta) -> io::Result<bool> {
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|c| c.last_log_id > meta.last_log_id)
        {
            std::fs::remove_file(built)?;
            return Ok(false);
        }
        self.replace_current(built)?;
        *current = Some(meta);
        Ok(true)
    }

    /// A fresh file for a snapshot sent by the leader. A transfer that was
    /// abandoned (the leader started over) loses its file here.
    pub fn create_receiving(&self) -> io::Result<File> {
        let path = self.dir.join(RECEIVING);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }

    /// Makes the received snapshot (already installed) the current one.
    pub fn publish_received(&self, received: &File, meta: Meta) -> io::Result<()> {
        received.sync_all()?;
        let mut current = self.lock();
        self.replace_current(&self.dir.join(RECEIVING))?;
        *current = Some(meta);
        Ok(())
    }

    fn replace_current(&self, from: &Path) -> io::Result<()> {
        std::fs::rename(from, self.dir.join(CURRENT))?;
        // The rename itself must survive a crash as well.
        File::open(&self.dir)?.sync_all()
    }

    /// The current snapshot's metadata and its file, open at the start.
    pub fn open_current(&self) -> io::Result<Option<(Meta, File)>> {
        let current = self.lock();
        match current.as_ref() {
            Some(meta) => Ok(Some((meta.clone(), File::open(self.dir.join(CURRENT))?))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership};
    use std::io::{Read, Write};

    fn meta(index: u64) -> Meta {
        Meta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s{index}"),
        }
    }

    fn built(files: &SnapshotFiles, content: &[u8]) -> PathBuf {
        let (path, mut file) = files.create_temporary().unwrap();
        file.write_all(content).unwrap();
        path
    }

    fn current(files: &SnapshotFiles) -> Option<(String, Vec<u8>)> {
        files.open_current().unwrap().map(|(m, mut f)| {
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (m.snapshot_id, data)
        })
    }

    #[test]
    fn the_newest_snapshot_wins_and_a_restart_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        assert_eq!(current(&files), None);
        let first = built(&files, b"five");
        assert!(files.publish_built(&first, meta(5)).unwrap());
        assert_eq!(current(&files), Some(("s5".into(), b"five".to_vec())));

        // One received from the leader replaces it...
        let mut received = files.create_receiving().unwrap();
        received.write_all(b"nine").unwrap();
        files.publish_received(&received, meta(9)).unwrap();
        // ...and an older one built meanwhile does not.
        let stale = built(&files, b"seven");
        assert!(!files.publish_built(&stale, meta(7)).unwrap());
        assert!(!stale.exists());
        assert_eq!(current(&files), Some(("s9".into(), b"nine".to_vec())));

        // A reader keeps its file when a newer snapshot replaces it.
        let (_, mut reading) = files.open_current().unwrap().unwrap();
        let newer = built(&files, b"twelve");
        assert!(files.publish_built(&newer, meta(12)).unwrap());
        let mut data = Vec::new();
        reading.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"nine");

        let _scratch = files.scratch().unwrap();
        let _left = built(&files, b"half-built");
        drop(files);
        let files = SnapshotFiles::open(dir.path()).unwrap();
        assert_eq!(current(&files), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
