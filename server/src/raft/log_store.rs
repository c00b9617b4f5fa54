//! The Raft log on RocksDB (column families `raft_log` and `raft_state`).
//!
//! Every append is one synced `WriteBatch`: entries are durable before
//! openraft is told they are. openraft hands over all entries queued since
//! the last append at once, so concurrent client writes share one fsync.
//! (The io_uring WAL of the cluster issue replaces this store.)

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::Vote;
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::types::{storage_io_error, Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::db::{CF_RAFT_LOG, CF_RAFT_STATE};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        LogStore { db }
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db.cf_handle(name).ok_or_else(|| {
            storage_io_error(
                true,
                std::io::Error::other(format!("missing column family {name}")),
            )
        })
    }

    fn get_state<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let raw = self
            .db
            .get_cf(self.cf(CF_RAFT_STATE)?, key)
            .map_err(|e| storage_io_error(true, e))?;
        raw.map(|v| bincode::deserialize(&v).map_err(|e| storage_io_error(true, e)))
            .transpose()
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        // A synced write blocks on fdatasync: let tokio move other tasks away.
        tokio::task::block_in_place(|| self.db.write_opt(batch, &opts))
            .map_err(|e| storage_io_error(false, e))
    }

    fn put_state<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let bytes = bincode::serialize(value).map_err(|e| storage_io_error(false, e))?;
        batch.put_cf(self.cf(CF_RAFT_STATE)?, key, bytes);
        self.write(batch, sync)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_RAFT_LOG)?);
        it.seek_to_last();
        let found = match it.value() {
            Some(v) => {
                let entry: Entry =
                    bincode::deserialize(v).map_err(|e| storage_io_error(true, e))?;
                Some(entry.log_id)
            }
            None => None,
        };
        it.status().map_err(|e| storage_io_error(true, e))?;
        Ok(found)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut it = self.db.raw_iterator_cf(self.cf(CF_RAFT_LOG)?);
        it.seek(start.to_be_bytes());
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let idx = u64::from_be_bytes(k.try_into().map_err(|_| {
                storage_io_error(true, std::io::Error::other("malformed raft log key"))
            })?);
            if !range.contains(&idx) {
                break;
            }
            out.push(bincode::deserialize(v).map_err(|e| storage_io_error(true, e))?);
            it.next();
        }
        it.status().map_err(|e| storage_io_error(true, e))?;
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_state(KEY_LAST_PURGED)?;
        let last = self.last_entry_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_state(KEY_VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_state(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only delays re-applying committed entries.
        self.put_state(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_state::<Option<LogId>>(KEY_COMMITTED)?.flatten())
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
        let cf = self.cf(CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = bincode::serialize(&entry).map_err(|e| storage_io_error(false, e))?;
            batch.put_cf(cf, entry.log_id.index.to_be_bytes(), bytes);
        }
        let result = self.write(batch, true);
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_RAFT_LOG)?,
            log_id.index.to_be_bytes(),
            u64::MAX.to_be_bytes(),
        );
        batch.delete_cf(self.cf(CF_RAFT_LOG)?, u64::MAX.to_be_bytes());
        self.write(batch, true)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let bytes = bincode::serialize(&log_id).map_err(|e| storage_io_error(false, e))?;
        batch.put_cf(self.cf(CF_RAFT_STATE)?, KEY_LAST_PURGED, bytes);
        batch.delete_range_cf(
            self.cf(CF_RAFT_LOG)?,
            0u64.to_be_bytes(),
            (log_id.index + 1).to_be_bytes(),
        );
        self.write(batch, true)
    }
}
