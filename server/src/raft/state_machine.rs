//! The Raft state machine: applies committed etcd requests to the MVCC store.
//!
//! An entry carries a batch of requests (see [`crate::proposals`]). Each
//! request is applied in one RocksDB batch that also records how far the
//! apply got: after the last request of an entry, the entry's log id as the
//! applied index; after an earlier one, the entry and the number of its
//! requests done (`META_PARTIAL`). After a crash the store and the applied
//! position agree: openraft re-applies the entries after the applied index,
//! and the partly applied one resumes after its last applied request.

use std::collections::HashMap;
use std::io::Seek;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use prost::Message;
use rocksdb::WriteBatch;
use tessera_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, AlarmType, CompactionResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeResponse, PutRequest, ResponseHeader,
};
use tessera_proto::mvccpb::Event;
use tessera_proto::tessera::{
    raft_command::Request, raft_result::Response, RaftBatchResult, RaftCommand, RaftResult,
};

use super::types::{
    storage_io_error, Command, CommandResult, Entry, LogId, StorageError, StoredMembership,
    TypeConfig,
};
mod auth_apply;

use super::snapshot_files::SnapshotFiles;
use crate::alarms::Alarms;
use crate::auth::store::AuthView;
use crate::auth::{Auth, AuthInfo};
use crate::db::CF_META;
use crate::errors::EtcdError;
use crate::lessor::{Lessor, MAX_LEASE_TTL};
use crate::metrics::Metrics;
use crate::mvcc::apply::{self, ApplyError};
use crate::mvcc::{Store, StoreError, WriteTxn};
use crate::snapshot::{self, SnapshotError};
use crate::watch_hub::WatchHub;

/// `meta` key of the last applied log id.
pub const META_APPLIED: &[u8] = b"applied";
/// `meta` key of the last applied membership.
pub const META_MEMBERSHIP: &[u8] = b"membership";
/// `meta` key of a partly applied entry: its log id and how many of its
/// requests are applied (absent when none is partly applied).
pub const META_PARTIAL: &[u8] = b"partial";

/// Where the apply stands once a request is applied: in entry `log_id`,
/// `done` of its `total` requests.
#[derive(Clone, Copy, Debug)]
struct Position {
    log_id: LogId,
    done: usize,
    total: usize,
}

impl Position {
    /// An entry applied as a whole (blank, membership, or a one-request batch).
    fn whole(log_id: LogId) -> Self {
        Position {
            log_id,
            done: 1,
            total: 1,
        }
    }
}

/// Consecutive plain puts of one entry, applied in one write transaction
/// and written to RocksDB in one batch. Each still gets its own revision
/// ([`WriteTxn::seal_request`]) and sees the puts before it. A put at a time
/// cost a RocksDB write each plus the revision and position records, about
/// a tenth of a member's CPU under load. Any other request ends the run
/// first, so it sees the run's writes on disk.
struct PutRun<'a> {
    txn: WriteTxn<'a>,
    /// Each put's revision and watch events.
    revisions: Vec<(i64, Vec<Event>)>,
    /// Where the apply stands after the run's last put.
    at: Option<Position>,
}

impl<'a> PutRun<'a> {
    fn new(txn: WriteTxn<'a>) -> Self {
        PutRun {
            txn,
            revisions: Vec::new(),
            at: None,
        }
    }
}

/// A request's outcome as the client's proposal gets it back.
fn raft_result(outcome: Result<Response, EtcdError>) -> RaftResult {
    match outcome {
        Ok(resp) => RaftResult {
            response: Some(resp),
            error: 0,
        },
        Err(e) => RaftResult {
            response: None,
            error: e.code_number(),
        },
    }
}

fn store_err(e: StoreError) -> StorageError {
    storage_io_error(false, e)
}

/// Shared by the state machine and its snapshot builders.
#[derive(Clone)]
pub struct StateMachine {
    store: Arc<Store>,
    alarms: Arc<Alarms>,
    metrics: Arc<Metrics>,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    auth: Arc<Auth>,
    snapshots: Arc<SnapshotFiles>,
}

impl StateMachine {
    pub fn new(
        store: Arc<Store>,
        alarms: Arc<Alarms>,
        metrics: Arc<Metrics>,
        hub: Arc<WatchHub>,
        lessor: Arc<Lessor>,
        auth: Arc<Auth>,
        snapshots: Arc<SnapshotFiles>,
    ) -> Self {
        StateMachine {
            store,
            alarms,
            metrics,
            hub,
            lessor,
            auth,
            snapshots,
        }
    }

    fn stage_applied(
        &self,
        batch: &mut WriteBatch,
        at: Position,
        membership: Option<&StoredMembership>,
    ) -> Result<(), StoreError> {
        let meta = self
            .store
            .db()
            .cf_handle(CF_META)
            .ok_or(StoreError::MissingColumnFamily(CF_META))?;
        let corrupt = |e: bincode::Error| StoreError::Corrupt(e.to_string());
        if at.done < at.total {
            batch.put_cf(
                meta,
                META_PARTIAL,
                bincode::serialize(&(at.log_id, at.done as u64)).map_err(corrupt)?,
            );
        } else {
            batch.put_cf(
                meta,
                META_APPLIED,
                bincode::serialize(&Some(at.log_id)).map_err(corrupt)?,
            );
            if at.total > 1 {
                batch.delete_cf(meta, META_PARTIAL);
            }
        }
        if let Some(m) = membership {
            batch.put_cf(
                meta,
                META_MEMBERSHIP,
                bincode::serialize(m).map_err(corrupt)?,
            );
        }
        Ok(())
    }

    fn apply_noop(
        &self,
        at: Position,
        membership: Option<&StoredMembership>,
    ) -> Result<(), StorageError> {
        let txn = self.store.write_txn();
        self.store
            .commit(txn, |b| self.stage_applied(b, at, membership))
            .map_err(store_err)?;
        Ok(())
    }

    /// Runs `op` in a write transaction; commits it with the applied index on
    /// success, records only the applied index when etcd would reject it.
    fn run_txn(
        &self,
        at: Position,
        op: impl FnOnce(&mut WriteTxn<'_>) -> Result<Response, ApplyError>,
    ) -> Result<Result<Response, EtcdError>, StorageError> {
        let mut txn = self.store.write_txn();
        match op(&mut txn) {
            Ok(resp) => {
                let events = self
                    .store
                    .commit(txn, |b| self.stage_applied(b, at, None))
                    .map_err(store_err)?;
                self.hub.publish(self.store.current_rev(), events);
                Ok(Ok(resp))
            }
            Err(ApplyError::Etcd(e)) => {
                drop(txn);
                self.apply_noop(at, None)?;
                Ok(Err(e))
            }
            Err(ApplyError::Store(e)) => Err(store_err(e)),
        }
    }

    /// Applies a normal entry: its batch of commands, each decoded on its
    /// own. Validation keeps what cannot be decoded out of the log, so a
    /// command that does not decode here is a bug; it must not stop the
    /// state machine (openraft would stop for good, on every member, and
    /// again at every restart, since the entry is committed). It is skipped
    /// instead, with an error result, and so is an entry that is not a
    /// batch at all: the outcome depends only on the entry's bytes, so it
    /// is the same on every member.
    fn execute_entry(
        &self,
        log_id: LogId,
        entry: &Command,
    ) -> Result<RaftBatchResult, StorageError> {
        let encoded = match entry.split() {
            Ok(encoded) => encoded,
            Err(e) => {
                self.metrics.inc(&self.metrics.undecodable_commands);
                tracing::error!(
                    index = log_id.index,
                    error = %e,
                    "BUG: a committed Raft entry is not a batch of commands; skipped"
                );
                self.apply_noop(Position::whole(log_id), None)?;
                return Ok(RaftBatchResult::default());
            }
        };
        let commands = encoded
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| {
                RaftCommand::decode(bytes)
                    .inspect_err(|e| {
                        self.metrics.inc(&self.metrics.undecodable_commands);
                        tracing::error!(
                            index = log_id.index,
                            command = i,
                            error = %e,
                            "BUG: a committed command does not decode; skipped"
                        );
                    })
                    .ok()
            })
            .collect();
        self.execute_batch(log_id, commands)
    }

    /// Applies the requests of entry `log_id` in order (`None` for one that
    /// did not decode), resuming after the ones a crash interrupted it after
    /// (their results are gone, and so are the clients that waited for them).
    fn execute_batch(
        &self,
        log_id: LogId,
        commands: Vec<Option<RaftCommand>>,
    ) -> Result<RaftBatchResult, StorageError> {
        let total = commands.len();
        // Only batches of several requests ever leave a partial marker, so
        // the common one-request entry skips the lookup.
        let resume_after = if total > 1 {
            match self.read_meta::<(LogId, u64)>(META_PARTIAL)? {
                Some((partial, done)) if partial == log_id => done as usize,
                _ => 0,
            }
        } else {
            0
        };
        let mut results = vec![RaftResult::default(); resume_after.min(total)];
        let mut run_keys = self.put_run_keys(&commands, resume_after);
        // Consecutive plain puts share one RocksDB write (see `PutRun`).
        let mut run: Option<PutRun<'_>> = None;
        for (i, cmd) in commands.into_iter().enumerate().skip(resume_after) {
            let at = Position {
                log_id,
                done: i + 1,
                total,
            };
            let Some(cmd) = cmd else {
                self.finish_put_run(run.take())?;
                self.apply_noop(at, None)?;
                results.push(raft_result(Err(EtcdError::Undecodable)));
                continue;
            };
            let result = match &cmd.request {
                Some(Request::Put(p)) if self.joins_put_run(p) => {
                    let run = match run.take() {
                        Some(going) => run.insert(going),
                        None => {
                            let mut txn = self.store.write_txn();
                            if let Some(keys) = run_keys.remove(&i) {
                                txn.prefetch_current(keys).map_err(store_err)?;
                            }
                            run.insert(PutRun::new(txn))
                        }
                    };
                    self.apply_put_in_run(run, at, cmd.auth.as_ref(), p)?
                }
                _ => {
                    self.finish_put_run(run.take())?;
                    self.execute(at, cmd)?
                }
            };
            results.push(result);
            self.metrics.inc(&self.metrics.proposals_applied);
        }
        self.finish_put_run(run.take())?;
        if total == 0 {
            self.apply_noop(Position::whole(log_id), None)?;
        }
        Ok(RaftBatchResult { results })
    }

    /// The keys of each put run in `commands` (from `from` on), by the index
    /// of the run's first put, so that a run can read their current
    /// versions in one lookup. (A run that starts elsewhere, because a
    /// request in between changed who may join, just reads them one by one.)
    fn put_run_keys(
        &self,
        commands: &[Option<RaftCommand>],
        from: usize,
    ) -> HashMap<usize, Vec<Vec<u8>>> {
        let mut runs: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
        if commands.len() < from + 2 {
            return runs; // No run of two puts to read ahead for.
        }
        let mut start = None;
        for (i, cmd) in commands.iter().enumerate().skip(from) {
            match cmd.as_ref().and_then(|c| c.request.as_ref()) {
                Some(Request::Put(p)) if self.joins_put_run(p) => {
                    let first = *start.get_or_insert(i);
                    runs.entry(first).or_default().push(p.key.clone());
                }
                _ => start = None,
            }
        }
        runs
    }

    /// Whether put `p` may be applied in a put run. Not with auth on when it
    /// carries a lease: its permission check reads the lease's keys from
    /// disk, where the run's own attachments are not yet.
    fn joins_put_run(&self, p: &PutRequest) -> bool {
        p.lease == 0 || !self.auth.store.view().enabled()
    }

    /// Authorizes put `p` as [`Self::execute`] does, then applies it in `run`.
    fn apply_put_in_run(
        &self,
        run: &mut PutRun<'_>,
        at: Position,
        auth: Option<&tessera_proto::tessera::RequestAuth>,
        p: &PutRequest,
    ) -> Result<RaftResult, StorageError> {
        let who = AuthInfo::from_command(auth);
        let outcome = match self.authorize_put(&self.auth.store.view(), who.as_ref(), p)? {
            Ok(()) => self.put_in_run(run, at, p)?,
            Err(e) => {
                run.at = Some(at);
                Err(e)
            }
        };
        Ok(raft_result(outcome))
    }

    /// Applies put `p`, already authorized, in `run`; nothing is written
    /// until the run is finished.
    fn put_in_run(
        &self,
        run: &mut PutRun<'_>,
        at: Position,
        p: &PutRequest,
    ) -> Result<Result<Response, EtcdError>, StorageError> {
        self.metrics.inc(&self.metrics.puts);
        let outcome = if self.alarms.is_active(AlarmType::Corrupt) {
            Err(EtcdError::Corrupt)
        } else if self.alarms.is_active(AlarmType::Nospace) {
            Err(EtcdError::NoSpace)
        } else {
            // A put fails only before it writes anything, so a refused one
            // leaves the run as it was.
            match apply::put(&mut run.txn, p, true) {
                Ok(resp) => Ok(Response::Put(resp)),
                Err(ApplyError::Etcd(e)) => Err(e),
                Err(ApplyError::Store(e)) => return Err(store_err(e)),
            }
        };
        run.revisions.push(run.txn.seal_request());
        run.at = Some(at);
        Ok(outcome)
    }

    /// Writes a put run with the position after its last request, then
    /// publishes its events, a revision at a time.
    fn finish_put_run(&self, run: Option<PutRun<'_>>) -> Result<(), StorageError> {
        let Some(PutRun {
            txn,
            revisions,
            at: Some(at),
        }) = run
        else {
            return Ok(());
        };
        self.store
            .commit(txn, |b| self.stage_applied(b, at, None))
            .map_err(store_err)?;
        for (revision, events) in revisions {
            self.hub.publish(revision, events);
        }
        Ok(())
    }

    fn execute(&self, at: Position, cmd: RaftCommand) -> Result<RaftResult, StorageError> {
        let who = AuthInfo::from_command(cmd.auth.as_ref());
        let view = self.auth.store.view();
        let outcome = match cmd.request {
            None => {
                self.apply_noop(at, None)?;
                Err(EtcdError::KeyNotFound)
            }
            Some(request) => match self.authorize(&view, who.as_ref(), &request)? {
                Err(e) => {
                    self.apply_noop(at, None)?;
                    Err(e)
                }
                Ok(()) => self.apply_request(at, &view, request)?,
            },
        };
        Ok(raft_result(outcome))
    }

    /// Applies `request`, already authorized, with etcd's semantics.
    fn apply_request(
        &self,
        at: Position,
        view: &AuthView,
        request: Request,
    ) -> Result<Result<Response, EtcdError>, StorageError> {
        let nospace = || self.alarms.is_active(AlarmType::Nospace);
        // etcd's applierV3Corrupt: with the CORRUPT alarm raised, every
        // write is refused (reads are served).
        if self.alarms.is_active(AlarmType::Corrupt) && refused_when_corrupt(&request) {
            self.apply_noop(at, None)?;
            return Ok(Err(EtcdError::Corrupt));
        }
        Ok(match request {
            // A put outside a run (a leased one with auth on) is a run of one.
            Request::Put(p) => {
                let mut run = PutRun::new(self.store.write_txn());
                let outcome = self.put_in_run(&mut run, at, &p)?;
                self.finish_put_run(Some(run))?;
                outcome
            }
            Request::DeleteRange(d) => {
                self.metrics.inc(&self.metrics.deletes);
                self.run_txn(at, |t| {
                    apply::delete_range(t, &d).map(Response::DeleteRange)
                })?
            }
            Request::Txn(t) => {
                self.metrics.inc(&self.metrics.txns);
                if nospace() && !apply::is_txn_read_only(&t) {
                    self.apply_noop(at, None)?;
                    Err(EtcdError::NoSpace)
                } else {
                    self.run_txn(at, |w| apply::txn(w, &t).map(Response::Txn))?
                }
            }
            Request::Compaction(c) => match self.store.check_compact(c.revision) {
                Err(e) => {
                    self.apply_noop(at, None)?;
                    Err(e)
                }
                Ok(()) => {
                    self.store
                        .schedule_compact(c.revision, |b| self.stage_applied(b, at, None))
                        .map_err(store_err)?;
                    tracing::info!(revision = c.revision, "scheduled compaction");
                    Ok(Response::Compaction(CompactionResponse {
                        header: header(self.store.current_rev()),
                    }))
                }
            },
            Request::Alarm(a) => Ok(Response::Alarm(self.apply_alarm(at, &a)?)),
            Request::LeaseGrant(g) => {
                if nospace() {
                    self.apply_noop(at, None)?;
                    Err(EtcdError::NoSpace)
                } else {
                    self.apply_lease_grant(at, &g)?
                }
            }
            Request::LeaseRevoke(r) => {
                let revoked = self.run_txn(at, |t| {
                    if !t.lease_exists(r.id)? {
                        return Err(EtcdError::LeaseNotFound.into());
                    }
                    t.revoke_lease(r.id)?;
                    Ok(Response::LeaseRevoke(LeaseRevokeResponse {
                        header: header(t.read_rev()),
                    }))
                })?;
                if revoked.is_ok() {
                    self.lessor.revoked(r.id);
                }
                revoked
            }
            Request::MemberAttributes(a) => {
                let txn = self.store.write_txn();
                let db = self.store.db().clone();
                self.store
                    .commit(txn, |b| {
                        crate::members::stage(&db, b, &a)?;
                        self.stage_applied(b, at, None)
                    })
                    .map_err(store_err)?;
                Ok(Response::MemberAttributes(a))
            }
            other => match self.apply_auth(at, view, &other) {
                Some(result) => result?,
                // Every request kind is handled above or by apply_auth.
                None => {
                    self.apply_noop(at, None)?;
                    Err(EtcdError::KeyNotFound)
                }
            },
        })
    }

    fn apply_lease_grant(
        &self,
        at: Position,
        g: &LeaseGrantRequest,
    ) -> Result<Result<Response, EtcdError>, StorageError> {
        let ttl = self.lessor.granted_ttl(g.ttl);
        let granted = self.run_txn(at, |t| {
            if g.id == 0 {
                return Err(EtcdError::LeaseNotFound.into());
            }
            if g.ttl > MAX_LEASE_TTL {
                return Err(EtcdError::LeaseTtlTooLarge.into());
            }
            if t.lease_exists(g.id)? {
                return Err(EtcdError::LeaseExists.into());
            }
            t.grant_lease(g.id, ttl)?;
            Ok(Response::LeaseGrant(LeaseGrantResponse {
                header: header(t.read_rev()),
                id: g.id,
                ttl,
                error: String::new(),
            }))
        })?;
        if granted.is_ok() {
            self.lessor.granted(g.id, ttl);
        }
        Ok(granted)
    }

    fn apply_alarm(&self, at: Position, a: &AlarmRequest) -> Result<AlarmResponse, StorageError> {
        let alarm = AlarmType::try_from(a.alarm).unwrap_or(AlarmType::None);
        let action = AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get);
        let mut resp = AlarmResponse::default();
        let change = match action {
            AlarmAction::Get => {
                resp.alarms = self.alarms.list(alarm);
                None
            }
            AlarmAction::Activate => self.alarms.plan_change(a.member_id, alarm, true),
            AlarmAction::Deactivate => self.alarms.plan_change(a.member_id, alarm, false),
        };
        match change {
            None => self.apply_noop(at, None)?,
            Some((changed, list)) => {
                let txn = self.store.write_txn();
                let db = self.store.db().clone();
                self.store
                    .commit(txn, |b| {
                        Alarms::stage(&db, b, &list)?;
                        self.stage_applied(b, at, None)
                    })
                    .map_err(store_err)?;
                self.alarms.publish(list);
                tracing::warn!(member = changed.member_id, alarm = ?alarm, ?action, "alarm changed");
                resp.alarms.push(changed);
            }
        }
        Ok(resp)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let db = self.store.db();
        let cf = db
            .cf_handle(CF_META)
            .ok_or_else(|| store_err(StoreError::MissingColumnFamily(CF_META)))?;
        match db.get_cf(cf, key).map_err(|e| storage_io_error(true, e))? {
            Some(raw) => Ok(Some(
                bincode::deserialize(&raw).map_err(|e| storage_io_error(true, e))?,
            )),
            None => Ok(None),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied: Option<LogId> = self.read_meta::<Option<LogId>>(META_APPLIED)?.flatten();
        let membership: StoredMembership = self.read_meta(META_MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let result = match entry.payload {
                EntryPayload::Blank => {
                    self.apply_noop(Position::whole(log_id), None)?;
                    RaftBatchResult::default()
                }
                EntryPayload::Membership(m) => {
                    let membership = StoredMembership::new(Some(log_id), m);
                    self.apply_noop(Position::whole(log_id), Some(&membership))?;
                    RaftBatchResult::default()
                }
                EntryPayload::Normal(cmd) => self.execute_entry(log_id, &cmd)?,
            };
            results.push(CommandResult(result));
        }
        // Before openraft learns these are applied (and may snapshot and
        // purge the log behind them), their writes must outlive the process.
        self.store.flush_wal().map_err(store_err)?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let file = self
            .snapshots
            .create_receiving()
            .map_err(|e| storage_io_error(false, e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let mut file = snapshot.into_std().await;
        let bytes = tokio::task::block_in_place(|| -> Result<u64, SnapshotError> {
            file.rewind()?;
            let batch = snapshot::restore_batch(self.store.db(), &file, |_| false)?;
            // One step for readers, and durable before openraft purges the
            // log the snapshot replaces.
            self.store.install(batch)?;
            Ok(file.metadata()?.len())
        })
        .map_err(|e| storage_io_error(false, e))?;
        self.alarms.reload(self.store.db()).map_err(store_err)?;
        self.auth.store.reload(self.store.db()).map_err(store_err)?;
        let leases = self.store.read_view().leases().map_err(store_err)?;
        self.lessor.reset(&leases, std::time::Duration::ZERO);
        tracing::info!(
            bytes,
            id = %meta.snapshot_id,
            revision = self.store.current_rev(),
            "installed a snapshot from the leader"
        );
        // The received file is the snapshot this member sends on, if asked.
        self.snapshots
            .publish_received(&file, meta.clone())
            .map_err(|e| storage_io_error(false, e))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self
            .snapshots
            .open_current()
            .map_err(|e| storage_io_error(true, e))?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let db = self.store.db().clone();
        let snapshots = self.snapshots.clone();
        // Written straight to a file from one RocksDB snapshot, while
        // entries go on being applied: nothing of it is held in memory.
        let built = tokio::task::spawn_blocking(move || -> Result<_, SnapshotError> {
            let (path, file) = snapshots.create_temporary()?;
            let info = snapshot::dump_to_file(&db, &file)?;
            // Synced before it is renamed into place as the current one.
            file.sync_all()?;
            Ok((path, info))
        })
        .await
        .map_err(|e| storage_io_error(true, e))?
        .map_err(|e| storage_io_error(true, e))?;
        let (path, info) = built;
        let applied: Option<LogId> =
            decode_meta::<Option<LogId>>(&info.meta, META_APPLIED)?.flatten();
        let membership: StoredMembership =
            decode_meta(&info.meta, META_MEMBERSHIP)?.unwrap_or_default();
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, info.bytes),
            None => format!("empty-{}", info.bytes),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let published = self
            .snapshots
            .publish_built(&path, meta.clone())
            .map_err(|e| storage_io_error(true, e))?;
        tracing::info!(bytes = info.bytes, id = %meta.snapshot_id, published, "built state machine snapshot");
        // openraft keeps only the metadata of the snapshot it is handed;
        // the data is read back when a follower needs it.
        let (meta, file) = match self
            .snapshots
            .open_current()
            .map_err(|e| storage_io_error(true, e))?
        {
            Some(current) => current,
            None => {
                let gone = std::io::Error::other("the built snapshot vanished");
                return Err(storage_io_error(true, gone));
            }
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

/// A response header carrying only the revision; the service fills the rest.
fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn decode_meta<T: serde::de::DeserializeOwned>(
    meta: &std::collections::HashMap<Vec<u8>, Vec<u8>>,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    meta.get(key)
        .map(|raw| bincode::deserialize(raw))
        .transpose()
        .map_err(|e| storage_io_error(true, e))
}

/// The requests etcd's `applierV3Corrupt` refuses: every write to the
/// keys, leases or compaction; alarms, auth and membership go on.
fn refused_when_corrupt(request: &Request) -> bool {
    match request {
        Request::Put(_)
        | Request::DeleteRange(_)
        | Request::Compaction(_)
        | Request::LeaseGrant(_)
        | Request::LeaseRevoke(_) => true,
        Request::Txn(t) => !apply::is_txn_read_only(t),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry as RaftEntry};
    use tessera_proto::etcdserverpb::PutRequest;
    use tessera_proto::tessera::RaftBatch;

    fn state_machine(dir: &std::path::Path) -> StateMachine {
        let db = crate::db::open(dir).unwrap();
        StateMachine::new(
            Arc::new(Store::open(db.clone()).unwrap()),
            Arc::new(Alarms::load(&db).unwrap()),
            Arc::new(Metrics::default()),
            Arc::new(WatchHub::default()),
            Arc::new(Lessor::new(1000, 100)),
            Arc::new(crate::auth::Auth {
                store: crate::auth::store::AuthStore::load(&db).unwrap(),
                tokens: crate::auth::TokenProvider::Simple(crate::auth::tokens::SimpleTokens::new(
                    std::time::Duration::from_secs(300),
                )),
                bcrypt_cost: crate::auth::MIN_BCRYPT_COST,
                client_cert_auth: false,
            }),
            Arc::new(SnapshotFiles::open(&dir.join("snap")).unwrap()),
        )
    }

    fn put(key: &str) -> RaftCommand {
        RaftCommand {
            request: Some(Request::Put(PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
            auth: None,
        }
    }

    fn batch_entry(index: u64, keys: &[&str]) -> Entry {
        RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(crate::raft::Command::encode(&RaftBatch {
                commands: keys.iter().map(|k| put(k)).collect(),
                proposal: 0,
            })),
        }
    }

    #[tokio::test]
    async fn a_batch_interrupted_by_a_crash_resumes_after_its_last_applied_request() {
        let dir = tempfile::tempdir().unwrap();
        let entry = batch_entry(1, &["a", "b", "c"]);
        {
            // The process dies after the first request of the batch.
            let sm = state_machine(dir.path());
            let at = Position {
                log_id: entry.log_id,
                done: 1,
                total: 3,
            };
            sm.execute(at, put("a")).unwrap();
            sm.store.flush_wal().unwrap();
        }
        let mut sm = state_machine(dir.path());
        // The entry is not applied, so openraft hands it over again...
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, None);
        let results = sm.apply([entry]).await.unwrap();
        // ...and only "b" and "c" are applied now: one revision each.
        assert_eq!(results[0].0.results.len(), 3);
        let revision_of = |r: &RaftResult| match &r.response {
            Some(Response::Put(p)) => p.header.as_ref().map(|h| h.revision),
            _ => None,
        };
        assert_eq!(revision_of(&results[0].0.results[1]), Some(3));
        assert_eq!(revision_of(&results[0].0.results[2]), Some(4));
        assert_eq!(sm.store.current_rev(), 4);
        let a = sm.store.read_view().get(b"a", 4).unwrap().unwrap();
        assert_eq!((a.version, a.mod_revision), (1, 2));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(1));
        assert_eq!(sm.read_meta::<(LogId, u64)>(META_PARTIAL).unwrap(), None);
        // A later batch starts from its first request.
        let results = sm.apply([batch_entry(2, &["d", "e"])]).await.unwrap();
        assert_eq!(revision_of(&results[0].0.results[0]), Some(5));
    }

    /// A put run reads its keys' current versions in one lookup ahead of
    /// the puts: those versions must be the ones each put builds on.
    #[tokio::test]
    async fn a_put_run_builds_on_the_versions_it_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = state_machine(dir.path());
        sm.apply([batch_entry(1, &["a", "b", "c"])]).await.unwrap();
        sm.apply([batch_entry(2, &["b", "a", "b", "new"])])
            .await
            .unwrap();
        let view = sm.store.read_view();
        let get = |k: &str| {
            let kv = view.get(k.as_bytes(), view.rev).unwrap().unwrap();
            (kv.create_revision, kv.version, kv.mod_revision)
        };
        // Entry 1 wrote a, b, c at revisions 2, 3, 4; entry 2 writes 5..=8.
        assert_eq!(get("a"), (2, 2, 6));
        assert_eq!(get("b"), (3, 3, 7));
        assert_eq!(get("c"), (4, 1, 4));
        assert_eq!(get("new"), (8, 1, 8));
    }

    /// A txn `depth` levels deep, a range on every level.
    fn nested_txn(depth: usize) -> tessera_proto::etcdserverpb::TxnRequest {
        use tessera_proto::etcdserverpb::{request_op, RangeRequest, RequestOp, TxnRequest};
        let range = RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })),
        };
        let mut t = TxnRequest {
            success: vec![range.clone()],
            ..Default::default()
        };
        for _ in 1..depth {
            t = TxnRequest {
                success: vec![
                    range.clone(),
                    RequestOp {
                        request: Some(request_op::Request::RequestTxn(t)),
                    },
                ],
                ..Default::default()
            };
        }
        t
    }

    /// A committed command that does not decode (here a txn nested past
    /// protobuf's limit, which validation refuses) is skipped with an error
    /// result, the others of its entry are applied, and so is a later entry:
    /// the state machine never stops on it. So is an entry that is not a
    /// batch at all.
    #[tokio::test]
    async fn commands_that_do_not_decode_are_skipped_and_the_rest_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = state_machine(dir.path());
        let too_deep = RaftCommand {
            request: Some(Request::Txn(nested_txn(60))),
            auth: None,
        };
        assert!(RaftCommand::decode(too_deep.encode_to_vec().as_slice()).is_err());
        let encoded: Vec<bytes::Bytes> = [put("a"), too_deep, put("b")]
            .iter()
            .map(|c| c.encode_to_vec().into())
            .collect();
        let entry = RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(crate::raft::Command::of_encoded(&encoded, 0)),
        };
        let results = sm.apply([entry]).await.unwrap();
        let errors: Vec<u32> = results[0].0.results.iter().map(|r| r.error).collect();
        assert_eq!(errors, [0, EtcdError::Undecodable.code_number(), 0]);
        let view = sm.store.read_view();
        assert!(view.get(b"a", view.rev).unwrap().is_some());
        assert!(view.get(b"b", view.rev).unwrap().is_some());
        drop(view);

        let not_a_batch = RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
            payload: EntryPayload::Normal(crate::raft::Command(bytes::Bytes::from_static(&[
                0x12, 0,
            ]))),
        };
        let results = sm
            .apply([not_a_batch, batch_entry(3, &["c"])])
            .await
            .unwrap();
        assert!(results[0].0.results.is_empty());
        assert_eq!(results[1].0.results[0].error, 0);
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        assert_eq!(
            sm.metrics
                .undecodable_commands
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[tokio::test]
    async fn puts_in_one_entry_get_a_revision_each_and_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = state_machine(dir.path());
        let mut events = sm.hub.subscribe();
        let delete_a = RaftCommand {
            request: Some(Request::DeleteRange(
                tessera_proto::etcdserverpb::DeleteRangeRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                },
            )),
            auth: None,
        };
        // Puts, a delete that ends the put run, and puts again.
        let mut commands: Vec<RaftCommand> = ["a", "a", "b"].iter().map(|k| put(k)).collect();
        commands.push(delete_a);
        commands.push(put("a"));
        let entry = RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(crate::raft::Command::encode(&RaftBatch {
                commands,
                proposal: 0,
            })),
        };
        let results = sm.apply([entry]).await.unwrap();
        let revisions: Vec<i64> = results[0]
            .0
            .results
            .iter()
            .map(|r| match &r.response {
                Some(Response::Put(p)) => p.header.as_ref().unwrap().revision,
                Some(Response::DeleteRange(d)) => d.header.as_ref().unwrap().revision,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(revisions, [2, 3, 4, 5, 6]);
        assert_eq!(sm.store.current_rev(), 6);
        let view = sm.store.read_view();
        // The second put of "a" saw the first: version 2, created at 2.
        let a3 = view.get(b"a", 3).unwrap().unwrap();
        assert_eq!((a3.version, a3.create_revision, a3.mod_revision), (2, 2, 3));
        assert!(view.get(b"a", 5).unwrap().is_none());
        let a6 = view.get(b"a", 6).unwrap().unwrap();
        assert_eq!((a6.version, a6.create_revision), (1, 6));
        drop(view);
        // One published revision per request, in order, each with its event.
        for (rev, kind) in [(2, 0), (3, 0), (4, 0), (5, 1), (6, 0)] {
            let got = events.try_recv().unwrap();
            assert_eq!(got.revision, rev);
            assert_eq!(got.events.len(), 1);
            assert_eq!(got.events[0].r#type, kind);
        }
        // The entry is applied as a whole: no partial marker is left.
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(1));
        assert_eq!(sm.read_meta::<(LogId, u64)>(META_PARTIAL).unwrap(), None);
    }
}
