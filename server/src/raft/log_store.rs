//! The Raft log on Tessera's write-ahead log (`tessera_storage::wal`).
//!
//! Entries, votes and purge points are WAL records; the WAL's writer thread
//! batches every append queued while the previous `fdatasync` ran (group
//! commit), and openraft is told an append is flushed only once it is
//! durable. Like etcd's raft storage, the unpurged log is also kept in
//! memory, so reads never touch the disk.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, Vote};
use serde::{Deserialize, Serialize};
use tessera_storage::wal::{Batch, Wal, WalError, WalOptions};

use super::types::{storage_io_error, Entry, LogId, NodeId, StorageError, TypeConfig};

/// WAL record kinds.
const ENTRY: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
/// Deletes every entry at or after an index.
const TRUNCATE: u8 = 4;
const PURGE: u8 = 5;
/// Vote, committed and purge point together, at the head of every segment.
const CHECKPOINT: u8 = 6;

#[derive(Default, Clone, Serialize, Deserialize)]
struct HardState {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

struct Log {
    entries: BTreeMap<u64, Entry>,
    hard: HardState,
    memory: Arc<LogMemory>,
}

/// How much of the log is held in memory, for the snapshot trigger
/// (`Node::spawn_log_memory_bound`): openraft's policy counts entries,
/// and an entry under load carries hundreds of requests.
#[derive(Default)]
pub struct LogMemory {
    /// Payload bytes of the entries held now.
    held: AtomicU64,
    /// Payload bytes of every entry appended since the process started.
    appended: AtomicU64,
}

impl LogMemory {
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }
}

/// The bytes `entry` takes in memory, about: its payload and its own size.
fn entry_bytes(entry: &Entry) -> u64 {
    let payload = match &entry.payload {
        EntryPayload::Normal(command) => command.0.len(),
        _ => 0,
    };
    (payload + std::mem::size_of::<Entry>()) as u64
}

/// Makes the state machine's applied state durable (see [`LogStore::open`]).
pub type SyncStateMachine = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// The proposals a leader waits on, and whether each one's entry has been
/// appended to this member's log.
///
/// openraft answers `ForwardToLeader` both when it refuses a write because
/// this member does not lead (nothing was proposed: trying again at the
/// leader is safe) and when a newer leader truncated the entry it had
/// appended (another member may still hold it and commit it: trying again
/// could apply the request twice). Only this tells the two apart.
#[derive(Default)]
pub struct ProposalWatch {
    watched: Mutex<HashMap<u64, bool>>,
}

impl ProposalWatch {
    /// Starts watching for proposal `id`'s entry until the guard is dropped.
    pub fn watch(self: &Arc<Self>, id: u64) -> WatchedProposal {
        self.lock().insert(id, false);
        WatchedProposal {
            watch: self.clone(),
            id,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, bool>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn appended(&self, id: u64) {
        if let Some(seen) = self.lock().get_mut(&id) {
            *seen = true;
        }
    }
}

/// One watched proposal (see [`ProposalWatch`]).
pub struct WatchedProposal {
    watch: Arc<ProposalWatch>,
    id: u64,
}

impl WatchedProposal {
    /// Whether the proposal's entry was appended to this member's log.
    pub fn was_appended(&self) -> bool {
        self.watch.lock().get(&self.id).copied().unwrap_or(false)
    }
}

impl Drop for WatchedProposal {
    fn drop(&mut self) {
        self.watch.lock().remove(&self.id);
    }
}

struct Inner {
    wal: Wal,
    log: Mutex<Log>,
    /// Run before entries are purged: see [`LogStore::open`].
    sync_state_machine: SyncStateMachine,
    proposals: Arc<ProposalWatch>,
}

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

fn wal_err(e: WalError) -> StorageError {
    storage_io_error(false, e)
}

fn corrupt(what: &str) -> StorageError {
    storage_io_error(
        true,
        std::io::Error::other(format!("corrupt WAL record: {what}")),
    )
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(value).map_err(|e| storage_io_error(false, e))
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, StorageError> {
    bincode::deserialize(bytes).map_err(|_| corrupt(what))
}

/// An entry record: its index (the WAL tag, so purge can find it) then the
/// entry itself.
fn entry_payload(entry: &Entry) -> Result<Vec<u8>, StorageError> {
    let mut out = entry.log_id.index.to_le_bytes().to_vec();
    bincode::serialize_into(&mut out, entry).map_err(|e| storage_io_error(false, e))?;
    Ok(out)
}

fn entry_tag(kind: u8, payload: &[u8]) -> u64 {
    match (kind, payload.get(..8)) {
        (ENTRY, Some(index)) => u64::from_le_bytes(index.try_into().unwrap_or([0; 8])),
        _ => 0,
    }
}

impl LogStore {
    /// Opens (recovering) the log in `dir`. `sync_state_machine` makes the
    /// state machine's writes durable; it runs before every purge, because
    /// openraft purges entries it has applied, and a state machine that
    /// writes without syncing (RocksDB's WAL is synced lazily) could
    /// otherwise come back from a power loss behind the purged log, with
    /// the entries it needs to catch up gone.
    pub fn open(
        dir: &Path,
        options: WalOptions,
        sync_state_machine: SyncStateMachine,
    ) -> anyhow::Result<LogStore> {
        let opened = Wal::open(dir, options, entry_tag)?;
        if let Some(cut) = &opened.truncation {
            tracing::warn!(
                segment = cut.seq,
                offset = cut.offset,
                "raft log: cut a torn or corrupt tail"
            );
        }
        let mut log = Log {
            entries: BTreeMap::new(),
            hard: HardState::default(),
            memory: Arc::default(),
        };
        for record in &opened.records {
            log.replay(record.kind, &record.payload)?;
        }
        tracing::info!(
            entries = log.entries.len(),
            last = ?log.entries.last_key_value().map(|(i, _)| i),
            purged = ?log.hard.last_purged.map(|l| l.index),
            io = opened.wal.backend(),
            "raft log recovered"
        );
        let store = LogStore {
            inner: Arc::new(Inner {
                wal: opened.wal,
                log: Mutex::new(log),
                sync_state_machine,
                proposals: Arc::default(),
            }),
        };
        store.refresh_checkpoint(&store.lock()?.hard)?;
        Ok(store)
    }

    /// Which proposals this member's leader has appended (shared).
    pub fn proposals(&self) -> Arc<ProposalWatch> {
        self.inner.proposals.clone()
    }

    /// How much of the log is in memory (shared, kept current).
    pub fn memory(&self) -> Result<Arc<LogMemory>, StorageError> {
        Ok(self.lock()?.memory.clone())
    }

    /// The last index to purge so that the entries after it hold at most
    /// `bytes` (None when all of them do).
    pub fn purge_point_keeping(&self, bytes: u64) -> Result<Option<u64>, StorageError> {
        let log = self.lock()?;
        let mut kept = 0;
        for (index, entry) in log.entries.iter().rev() {
            kept += entry_bytes(entry);
            if kept > bytes {
                return Ok(Some(*index));
            }
        }
        Ok(None)
    }

    /// The WAL's counters and its write + `fdatasync` latency.
    pub fn wal_stats(&self) -> Arc<tessera_storage::wal::WalStats> {
        self.inner.wal.stats().clone()
    }

    /// The backend the WAL writes through (`io_uring` or `syscall`).
    pub fn wal_backend(&self) -> &'static str {
        self.inner.wal.backend()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Log>, StorageError> {
        self.inner
            .log
            .lock()
            .map_err(|_| storage_io_error(false, std::io::Error::other("raft log lock poisoned")))
    }

    fn refresh_checkpoint(&self, hard: &HardState) -> Result<(), StorageError> {
        self.inner.wal.set_checkpoint(CHECKPOINT, encode(hard)?);
        Ok(())
    }

    /// Appends one record and waits until it is durable.
    fn write_durably(&self, kind: u8, payload: &[u8]) -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.push(kind, 0, payload);
        tokio::task::block_in_place(|| self.inner.wal.append(batch)).map_err(wal_err)
    }
}

impl Log {
    fn replay(&mut self, kind: u8, payload: &[u8]) -> Result<(), StorageError> {
        match kind {
            ENTRY => {
                let entry: Entry = decode(payload.get(8..).unwrap_or_default(), "entry")?;
                let index = entry.log_id.index;
                if self.hard.last_purged.is_none_or(|p| index > p.index) {
                    self.insert(entry);
                }
            }
            VOTE => self.hard.vote = Some(decode(payload, "vote")?),
            COMMITTED => self.hard.committed = decode(payload, "committed")?,
            TRUNCATE => {
                let from: u64 = decode(payload, "truncate")?;
                self.remove_from(from);
            }
            PURGE => self.purge(decode(payload, "purge")?),
            CHECKPOINT => {
                let hard: HardState = decode(payload, "checkpoint")?;
                if let Some(upto) = hard.last_purged {
                    self.purge(upto);
                }
                self.hard = hard;
            }
            other => return Err(corrupt(&format!("unknown kind {other}"))),
        }
        Ok(())
    }

    fn insert(&mut self, entry: Entry) {
        let bytes = entry_bytes(&entry);
        self.memory.appended.fetch_add(bytes, Ordering::Relaxed);
        self.memory.held.fetch_add(bytes, Ordering::Relaxed);
        if let Some(replaced) = self.entries.insert(entry.log_id.index, entry) {
            self.forget(std::iter::once(&replaced));
        }
    }

    /// Drops every entry at or after `from`.
    fn remove_from(&mut self, from: u64) {
        let removed = self.entries.split_off(&from);
        self.forget(removed.values());
    }

    fn purge(&mut self, upto: LogId) {
        let kept = self.entries.split_off(&(upto.index + 1));
        let purged = std::mem::replace(&mut self.entries, kept);
        self.forget(purged.values());
        self.hard.last_purged = Some(upto);
    }

    fn forget<'a>(&self, entries: impl Iterator<Item = &'a Entry>) {
        let bytes: u64 = entries.map(entry_bytes).sum();
        self.memory.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        if let (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) =
            (start, end)
        {
            if s > e {
                return Ok(Vec::new());
            }
        }
        let log = self.lock()?;
        Ok(log
            .entries
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let log = self.lock()?;
        let last_purged = log.hard.last_purged;
        let last = log
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        {
            let mut log = self.lock()?;
            log.hard.vote = Some(*vote);
            self.refresh_checkpoint(&log.hard)?;
        }
        self.write_durably(VOTE, &encode(vote)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.lock()?.hard.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let payload = encode(&committed)?;
        {
            let mut log = self.lock()?;
            log.hard.committed = committed;
            self.refresh_checkpoint(&log.hard)?;
        }
        // Not waited for: losing it only delays re-applying committed entries.
        let mut batch = Batch::default();
        batch.push(COMMITTED, 0, &payload);
        self.inner.wal.submit(batch, Box::new(|_| {}));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock()?.hard.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = Batch::default();
        {
            let mut log = self.lock()?;
            for entry in entries {
                let index = entry.log_id.index;
                batch.push(ENTRY, index, &entry_payload(&entry)?);
                if let EntryPayload::Normal(command) = &entry.payload {
                    if let Some(id) = command.proposal() {
                        self.inner.proposals.appended(id);
                    }
                }
                // Readable at once; durable when the callback fires.
                log.insert(entry);
            }
        }
        self.inner.wal.submit(
            batch,
            Box::new(move |result| {
                callback.log_io_completed(result.map_err(std::io::Error::other));
            }),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()?.remove_from(log_id.index);
        self.write_durably(TRUNCATE, &encode(&log_id.index)?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Everything up to `log_id` is applied; it must be durable in the
        // state machine before the log forgets it.
        let sync = &self.inner.sync_state_machine;
        tokio::task::block_in_place(sync).map_err(|e| storage_io_error(false, e))?;
        {
            let mut log = self.lock()?;
            log.purge(log_id);
            self.refresh_checkpoint(&log.hard)?;
        }
        self.write_durably(PURGE, &encode(&log_id)?)?;
        let wal = &self.inner.wal;
        tokio::task::block_in_place(|| wal.purge(log_id.index)).map_err(wal_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn entry(index: u64, payload: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::raft::Command(vec![7u8; payload].into())),
        }
    }

    #[test]
    fn the_memory_held_follows_appends_truncations_and_purges() {
        let mut log = Log {
            entries: BTreeMap::new(),
            hard: HardState::default(),
            memory: Arc::default(),
        };
        let per_entry = std::mem::size_of::<Entry>() as u64;
        for i in 1..=10 {
            log.insert(entry(i, 1000));
        }
        assert_eq!(log.memory.held(), 10 * (1000 + per_entry));
        // A new leader's entry replaces the one at its index.
        log.insert(entry(10, 10));
        assert_eq!(log.memory.held(), 9 * (1000 + per_entry) + 10 + per_entry);
        log.remove_from(9);
        assert_eq!(log.memory.held(), 8 * (1000 + per_entry));
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 5));
        assert_eq!(log.memory.held(), 3 * (1000 + per_entry));
        assert_eq!(log.entries.len(), 3);
        // Appended counts everything ever added.
        assert_eq!(
            log.memory.appended(),
            10 * (1000 + per_entry) + 10 + per_entry
        );
    }
}
