//! One Tessera member: its database, MVCC store, Raft instance and identity,
//! plus the helpers every service uses (propose, read barrier, headers).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use prost::Message;
use rocksdb::DB;
use tessera_proto::etcdserverpb::{
    alarm_request, AlarmRequest, AlarmType, HashKvResponse, ResponseHeader,
};
use tessera_proto::tessera::{
    raft_command::Request, raft_result::Response, IndexReply, MemberAttributes, MembersRequest,
    ProposeReply, RaftCommand, RaftResult,
};
use tonic::Status;

use crate::alarms::Alarms;
use crate::auth::store::AuthStore;
use crate::auth::{Auth, AuthInfo, Credentials};
use crate::config::Config;
use crate::db::{self, CF_RAFT_STATE};
use crate::errors::EtcdError;
use crate::lessor::Lessor;
use crate::metrics::{Disk, Gauges, Metrics};
use crate::mvcc::{Store, StoreError};
use crate::peer::{self, method, PeerClients};
use crate::proposals::ProposalBatcher;
use crate::raft::log_store::{LogStore, ProposalWatch};
use crate::raft::network::PeerNetwork;
use crate::raft::snapshot_files::SnapshotFiles;
use crate::raft::state_machine::StateMachine;
use crate::raft::{Command, Raft};
use crate::read_index::ReadIndexBatcher;
use crate::watch_hub::WatchHub;

/// How long a proposal may wait for commit and apply before etcd's timeout error.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(7);
/// How long a request waits for the Authenticate entry its token names.
const TOKEN_APPLY_WAIT: Duration = Duration::from_secs(5);
/// How many requests may wait so at once; others are judged at once.
const MAX_TOKEN_WAITERS: usize = 64;
/// How often the Raft log's memory is checked against its limit.
const LOG_MEMORY_CHECK: Duration = Duration::from_millis(500);
/// How long a database size read for the quota check stays current.
const QUOTA_SIZE_REFRESH: Duration = Duration::from_millis(100);
/// `raft_state` key of this member's identity (not part of snapshots).
const IDENTITY_KEY: &[u8] = b"identity";

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy)]
struct Identity {
    member_id: u64,
    cluster_id: u64,
}

pub struct Node {
    pub config: Config,
    pub raft: Raft,
    pub store: Arc<Store>,
    pub alarms: Arc<Alarms>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<WatchHub>,
    pub lessor: Arc<Lessor>,
    pub auth: Arc<Auth>,
    /// The Raft snapshot's file, and room for Maintenance snapshots.
    pub snapshots: Arc<SnapshotFiles>,
    pub member_id: u64,
    pub cluster_id: u64,
    pub peers: PeerClients,
    /// Source of [`Node::next_request_id`].
    request_ids: AtomicU64,
    /// Shares read indexes among concurrent linearizable reads.
    read_indexes: Arc<ReadIndexBatcher>,
    /// Shares Raft entries among concurrent proposals.
    proposals: Arc<ProposalBatcher>,
    /// Source of the ids of the batches this member proposes as leader.
    proposal_ids: AtomicU64,
    /// Whether a proposal's entry reached this member's log.
    appended: Arc<ProposalWatch>,
    /// When the database size was last read, and what it was.
    quota_size: Mutex<Option<(Instant, u64)>>,
    /// Bounds the requests waiting for their token's Authenticate entry
    /// (each is woken on every Raft metrics change while it waits).
    token_waiters: tokio::sync::Semaphore,
    /// The Raft log's counters and fsync latency, for `/metrics`.
    wal_stats: Arc<tessera_storage::wal::WalStats>,
}

/// The directory of the Raft snapshot file under a data dir (as etcd's).
pub fn snap_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("member").join("snap")
}

/// The directory holding RocksDB under a data dir (etcd keeps `member/` too).
pub fn db_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("member").join("db")
}

/// The first 8 bytes of the SHA-1 of `bytes`, big-endian: how etcd turns
/// its inputs into ids.
fn sha1_id(bytes: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    // 0 means "no member" to etcd's clients (and to ours): never an id.
    u64::from_be_bytes(first).max(1)
}

/// A member's id exactly as etcd computes it (`computeMemberId`): SHA-1 of
/// its sorted peer URLs joined, then the cluster token, then, for members
/// added at runtime, the Unix time in seconds. The same flags give the
/// same ids on etcd and Tessera.
pub fn member_id(peer_urls: &[String], token: &str, added_at: Option<u64>) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut bytes = urls.concat().into_bytes();
    bytes.extend_from_slice(token.as_bytes());
    if let Some(t) = added_at {
        bytes.extend_from_slice(t.to_string().as_bytes());
    }
    sha1_id(&bytes)
}

/// The cluster id as etcd computes it (`genID`): SHA-1 of the initial
/// members' ids, sorted, each 8 bytes big-endian.
fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    sha1_id(&bytes)
}

fn read_identity(db: &DB) -> anyhow::Result<Option<Identity>> {
    let cf = db
        .cf_handle(CF_RAFT_STATE)
        .context("missing raft_state column family")?;
    Ok(match db.get_cf(cf, IDENTITY_KEY)? {
        Some(raw) => Some(bincode::deserialize(&raw)?),
        None => None,
    })
}

fn write_identity(db: &DB, identity: &Identity) -> anyhow::Result<()> {
    let cf = db
        .cf_handle(CF_RAFT_STATE)
        .context("missing raft_state column family")?;
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf, IDENTITY_KEY, bincode::serialize(identity)?);
    db.write_opt(batch, &opts)?;
    Ok(())
}

/// `raft_state` key set once this member's WAL exists.
const WAL_CREATED_KEY: &[u8] = b"wal_created";

/// Refuses to start a member whose WAL has gone while its data stayed: a
/// fresh empty log would forget its vote (it could vote twice in a term)
/// and the entries it acknowledged.
fn check_wal_present(db: &DB, wal_dir: &Path) -> anyhow::Result<()> {
    let cf = db
        .cf_handle(CF_RAFT_STATE)
        .context("missing raft_state column family")?;
    let had_wal = db.get_cf(cf, WAL_CREATED_KEY)?.is_some();
    if had_wal && !tessera_storage::wal::Wal::exists(wal_dir)? {
        anyhow::bail!(
            "the WAL directory {} is missing or empty, but this member's data directory has \
             state that needs it; restore the member from a snapshot, or remove it from the \
             cluster and add it again with an empty data directory",
            wal_dir.display()
        );
    }
    Ok(())
}

/// Records that this member's WAL exists (see [`check_wal_present`]).
fn mark_wal_created(db: &DB) -> anyhow::Result<()> {
    let cf = db
        .cf_handle(CF_RAFT_STATE)
        .context("missing raft_state column family")?;
    if db.get_cf(cf, WAL_CREATED_KEY)?.is_none() {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(cf, WAL_CREATED_KEY, [1]);
        db.write_opt(batch, &opts)?;
    }
    Ok(())
}

/// This member's id and the cluster's: stored from the first start; derived
/// from `--initial-cluster` for a new cluster; asked of the running members
/// (which must have added this one) for `--initial-cluster-state=existing`.
async fn load_or_create_identity(
    db: &DB,
    config: &Config,
    clients: &PeerClients,
) -> anyhow::Result<Identity> {
    if let Some(identity) = read_identity(db)? {
        return Ok(identity);
    }
    let members = config.initial_members()?;
    let token = &config.initial_cluster_token;
    let identity = if config.initial_cluster_state == "existing" {
        let others: Vec<String> = members
            .iter()
            .filter(|m| m.name != config.name)
            .flat_map(|m| m.peer_urls.clone())
            .collect();
        let known = peer::fetch_members(clients, &others, Duration::from_secs(60)).await?;
        let mut mine = config.advertise_peer_urls();
        mine.sort();
        let me = known
            .members
            .iter()
            .find(|m| {
                let mut urls = m.peer_urls.clone();
                urls.sort();
                urls == mine
            })
            .with_context(|| {
                format!(
                    "no member of the running cluster has peer URLs {}; add this member first (etcdctl member add)",
                    mine.join(",")
                )
            })?;
        Identity {
            member_id: me.id,
            cluster_id: known.cluster_id,
        }
    } else {
        let ids: Vec<u64> = members
            .iter()
            .map(|m| member_id(&m.peer_urls, token, None))
            .collect();
        let mine = members
            .iter()
            .position(|m| m.name == config.name)
            .context("this member is not in --initial-cluster")?;
        Identity {
            member_id: ids[mine],
            cluster_id: cluster_id(&ids),
        }
    };
    write_identity(db, &identity)?;
    Ok(identity)
}

/// Creates the data directory with etcd's permissions and opens RocksDB.
pub fn open_data_dir(data_dir: &Path) -> anyhow::Result<Arc<DB>> {
    let dir = db_dir(data_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set permissions on {}", data_dir.display()))?;
    }
    db::open(&dir).with_context(|| format!("cannot open database in {}", dir.display()))
}

impl Node {
    pub async fn start(config: Config) -> anyhow::Result<Arc<Node>> {
        let data_dir = config.data_dir();
        let db = open_data_dir(&data_dir)?;
        let peer_tls = if config.uses_peer_tls()? {
            let provider = crate::tls::provider(&config.cipher_suite_names())?;
            Some(crate::tls::peer_client_config(
                &config.peer_tls(),
                provider,
            )?)
        } else {
            None
        };
        let peers = PeerClients::new(peer_tls);
        let identity = load_or_create_identity(&db, &config, &peers).await?;
        let store = Arc::new(Store::open(db.clone())?);
        crate::background_compaction::spawn(
            store.clone(),
            crate::background_compaction::Pace {
                batch_limit: config.experimental_compaction_batch_limit as usize,
                pause: config.experimental_compaction_sleep_interval,
            },
        );
        let alarms = Arc::new(Alarms::load(&db)?);
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(WatchHub::default());
        let lessor = Arc::new(Lessor::new(
            config.election_timeout,
            config.heartbeat_interval,
        ));
        lessor.reset(&store.read_view().leases()?, Duration::ZERO);
        let auth = Arc::new(Auth {
            store: AuthStore::load(&db)?,
            tokens: crate::auth::token_provider(
                &config.auth_token,
                Duration::from_secs(config.auth_token_ttl),
            )
            .map_err(|e| anyhow::anyhow!(e))?,
            bcrypt_cost: config.bcrypt_cost(),
            client_cert_auth: config.uses_client_cert_auth(),
        });
        tracing::info!(
            name = %config.name,
            data_dir = %data_dir.display(),
            member_id = %format!("{:x}", identity.member_id),
            cluster_id = %format!("{:x}", identity.cluster_id),
            revision = store.current_rev(),
            "opened backend"
        );

        let raft_config = openraft::Config {
            cluster_name: config.initial_cluster_token.clone(),
            heartbeat_interval: config.heartbeat_interval,
            // openraft waits a leader lease (election_timeout_max) plus a
            // random election timeout before campaigning after the leader
            // goes quiet; these bounds elect a new leader within about two
            // of etcd's election timeouts.
            election_timeout_min: config.election_timeout * 3 / 5,
            election_timeout_max: config.election_timeout,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count),
            // etcd keeps 5000 entries behind a snapshot for slow followers.
            max_in_snapshot_log_to_keep: config.snapshot_count.min(5000),
            // Entries carry batches of up to 1 MiB of requests (see
            // `proposals`): bound how many one AppendEntries message holds.
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .context("invalid raft configuration")?;
        let snap_dir = snap_dir(&data_dir);
        let snapshots = Arc::new(
            SnapshotFiles::open(&snap_dir)
                .with_context(|| format!("cannot open {}", snap_dir.display()))?,
        );
        let sm = StateMachine::new(
            store.clone(),
            alarms.clone(),
            metrics.clone(),
            hub.clone(),
            lessor.clone(),
            auth.clone(),
            snapshots.clone(),
        );
        let wal_options = tessera_storage::wal::WalOptions {
            io_mode: config
                .wal_io
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--wal-io: {e}"))?,
            ..Default::default()
        };
        check_wal_present(&db, &config.wal_dir())?;
        let sync_store = store.clone();
        let sync_state_machine = Box::new(move || sync_store.sync().map_err(std::io::Error::other));
        let log_store = LogStore::open(&config.wal_dir(), wal_options, sync_state_machine)
            .with_context(|| format!("cannot open the WAL in {}", config.wal_dir().display()))?;
        mark_wal_created(&db)?;
        let log = log_store.clone();
        let raft = Raft::new(
            identity.member_id,
            Arc::new(raft_config),
            PeerNetwork::new(peers.clone()),
            log_store,
            sm,
        )
        .await
        .context("cannot start raft")?;

        let node = Arc::new_cyclic(|node| Node {
            config,
            raft,
            store,
            alarms,
            metrics,
            hub,
            lessor,
            auth,
            snapshots,
            member_id: identity.member_id,
            cluster_id: identity.cluster_id,
            peers,
            request_ids: AtomicU64::new(request_id_base()),
            read_indexes: Arc::default(),
            proposals: ProposalBatcher::new(node.clone()),
            proposal_ids: AtomicU64::new(rand::random()),
            appended: log.proposals(),
            quota_size: Mutex::new(None),
            token_waiters: tokio::sync::Semaphore::new(MAX_TOKEN_WAITERS),
            wal_stats: log.wal_stats(),
        });

        let initial = node.config.initial_members()?;
        if !node.raft.is_initialized().await? && node.config.initial_cluster_state == "new" {
            let token = &node.config.initial_cluster_token;
            let members: BTreeMap<u64, BasicNode> = initial
                .iter()
                .map(|m| {
                    let addr = m.peer_urls.join(",");
                    (member_id(&m.peer_urls, token, None), BasicNode { addr })
                })
                .collect();
            // Every member initializes with the same membership; openraft
            // accepts that, and the first election settles the leader. This
            // runs before the peer service listens, so no vote request from
            // a faster member can get in first.
            node.raft
                .initialize(members)
                .await
                .context("cannot bootstrap the cluster")?;
            tracing::info!(members = initial.len(), "bootstrapped a new cluster");
        }
        peer::serve(node.clone()).await?;
        // A lone member elects itself at once: wait for it, so it serves
        // requests from its first moment. A member of a larger cluster serves
        // right away (serializable reads work without a leader).
        if initial.len() == 1 && node.membership().len() <= 1 {
            node.raft
                .wait(Some(Duration::from_millis(
                    node.config.election_timeout * 10,
                )))
                .current_leader(identity.member_id, "wait for this member to lead")
                .await
                .context("this member did not become leader")?;
        }
        node.clone().spawn_leader_watch();
        node.clone().spawn_publish_attributes();
        node.clone().spawn_log_memory_bound(log);
        crate::lease_expiry::spawn(node.clone());
        Ok(node)
    }

    /// Publishes this member's name and client URLs through the log once
    /// there is a leader (and again after they change), as etcd does.
    fn spawn_publish_attributes(self: Arc<Self>) {
        tokio::spawn(async move {
            let attrs = MemberAttributes {
                member_id: self.member_id,
                name: self.config.name.clone(),
                client_urls: self.config.advertise_client_urls(),
            };
            loop {
                let published = crate::members::load_all(self.store.db())
                    .ok()
                    .and_then(|all| all.get(&self.member_id).cloned());
                if published.as_ref() == Some(&attrs) {
                    return;
                }
                match self
                    .propose_internal(Request::MemberAttributes(attrs.clone()))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(
                            local_member_id = %format!("{:x}", self.member_id),
                            local_member_attributes = %format!("{{Name:{} ClientURLs:[{}]}}", attrs.name, attrs.client_urls.join(" ")),
                            "published local member to cluster through raft"
                        );
                        // Tessera's cluster version is fixed (one binary
                        // version): it is in force once the member is in.
                        let version = crate::config::cluster_version();
                        tracing::info!(
                            local_member_id = %format!("{:x}", self.member_id),
                            cluster_version = %version,
                            "set initial cluster version"
                        );
                        tracing::info!(cluster_version = %version, "enabled capabilities for version");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot publish member attributes yet");
                        tokio::time::sleep(self.election_timeout()).await;
                    }
                }
            }
        });
    }

    /// Keeps the Raft log held in memory under `--max-raft-log-memory-bytes`.
    /// openraft snapshots every `--snapshot-count` entries and then keeps
    /// 5000 entries for slow followers; an entry under load carries many
    /// requests, so both can hold far more than etcd's log would. Above the
    /// limit this asks for a snapshot (at most once per half the limit
    /// appended), and purges what the newest snapshot covers except the
    /// newest entries worth a quarter of the limit.
    fn spawn_log_memory_bound(self: Arc<Self>, log: LogStore) {
        let limit = self.config.max_raft_log_memory_bytes;
        if limit == 0 {
            return;
        }
        tokio::spawn(async move {
            let Ok(memory) = log.memory() else { return };
            let mut interval = tokio::time::interval(LOG_MEMORY_CHECK);
            let mut appended_at_last_snapshot = 0;
            let mut purged_upto = 0;
            loop {
                interval.tick().await;
                let held = memory.held();
                if held < limit {
                    continue;
                }
                let snapshot = self.raft.metrics().borrow().snapshot.map(|l| l.index);
                let keep_from = log.purge_point_keeping(limit / 4).ok().flatten();
                if let (Some(snapshot), Some(keep_from)) = (snapshot, keep_from) {
                    let upto = snapshot.min(keep_from);
                    if upto > purged_upto {
                        purged_upto = upto;
                        tracing::info!(
                            held_bytes = held,
                            upto,
                            "purging the raft log to its memory limit"
                        );
                        if self.raft.trigger().purge_log(upto).await.is_err() {
                            return; // Raft has shut down.
                        }
                        continue;
                    }
                }
                let appended = memory.appended();
                if appended - appended_at_last_snapshot < limit / 2 {
                    continue;
                }
                appended_at_last_snapshot = appended;
                tracing::info!(
                    held_bytes = held,
                    limit,
                    "raft log in memory above its limit: taking a snapshot to purge it"
                );
                if self.raft.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Follows leadership: counts and logs leader changes, promotes the
    /// lessor when this member starts to lead (in any new term, even one
    /// whose intermediate states the metrics coalesced) and demotes it when
    /// it stops. Starts from the state at the time of the call, so a
    /// leadership won before it is acted on too.
    fn spawn_leader_watch(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        tokio::spawn(async move {
            let mut last: Option<(Option<u64>, u64)> = None;
            loop {
                let now = {
                    let m = rx.borrow_and_update();
                    (m.current_leader, m.current_term)
                };
                if Some(now) != last {
                    let (leader, term) = now;
                    let before = last.and_then(|(before, _)| before);
                    match leader {
                        Some(l) if before != Some(l) => {
                            self.metrics.inc(&self.metrics.leader_changes);
                            // etcd's raft logger's words.
                            tracing::info!(
                                "raft.node: {:x} elected leader {l:x} at term {term}",
                                self.member_id
                            );
                        }
                        None => {
                            if let Some(b) = before {
                                tracing::info!(
                                    "raft.node: {:x} lost leader {b:x} at term {term}",
                                    self.member_id
                                );
                            }
                        }
                        _ => {}
                    }
                    if leader == Some(self.member_id) {
                        if let Some(delay) =
                            tessera_storage::failpoint::delay("lessor-promote-delay-ms")
                        {
                            tokio::time::sleep(delay).await;
                        }
                        // A new leader starts every lease's clock afresh.
                        self.lessor.promote(self.election_timeout());
                    } else {
                        self.lessor.demote();
                    }
                    last = Some(now);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// A positive id unique across members and restarts (etcd's generator:
    /// 16 bits of member id, then milliseconds at start and a counter), used
    /// for leases the client did not number.
    pub fn next_request_id(&self) -> i64 {
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let id = (self.member_id << 48) | (n & LOW_48_BITS);
        (id & i64::MAX as u64) as i64
    }

    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.config.election_timeout)
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.member_id)
    }

    pub fn raft_term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// etcd's response header: ids, term, and the current revision unless the
    /// response set one.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision: if revision == 0 {
                self.store.current_rev()
            } else {
                revision
            },
            raft_term: self.raft_term(),
        })
    }

    /// Who `req` comes from: its auth token, or with `--client-cert-auth`
    /// its client certificate's common name (etcd's `AuthInfoFromCtx`).
    pub fn caller<T>(&self, req: &tonic::Request<T>) -> Result<Option<AuthInfo>, Status> {
        Ok(self.auth.identify(&Credentials::of(req))?)
    }

    /// etcd's admin check at the API layer (membership changes, compaction):
    /// with auth on, the caller must hold the root role.
    pub fn require_admin<T>(&self, req: &tonic::Request<T>) -> Result<(), Status> {
        let who = self.caller(req)?;
        Ok(self.auth.store.view().check_admin(who.as_ref())?)
    }

    /// etcd's `requireAuthInfo`: with auth on, the caller must be a known
    /// user; no permission is checked.
    pub fn require_authenticated<T>(&self, req: &tonic::Request<T>) -> Result<(), Status> {
        let who = self.caller(req)?;
        Ok(self.auth.store.view().check_authenticated(who.as_ref())?)
    }

    /// Replicates `request` for the server itself (lease expiry, member
    /// attributes), which etcd runs with root's rights.
    pub async fn propose_internal(&self, request: Request) -> Result<Response, Status> {
        let root = AuthInfo {
            username: crate::auth::store::ROOT_USER.to_string(),
            revision: self.auth.store.view().state.revision,
        };
        self.propose_as(Some(&root), request).await
    }

    /// Replicates `request` on behalf of `who` (through the leader, wherever
    /// it is), waits until this member has applied it and returns its
    /// result. Permissions are checked when it is applied, as in etcd.
    pub async fn propose_as(
        &self,
        who: Option<&AuthInfo>,
        request: Request,
    ) -> Result<Response, Status> {
        let cmd = RaftCommand {
            request: Some(request),
            auth: AuthInfo::to_command(who),
        }
        .encode_to_vec();
        if cmd.len() > self.config.max_request_bytes as usize {
            return Err(EtcdError::RequestTooLarge.into());
        }
        let cmd = bytes::Bytes::from(cmd);
        let deadline = tokio::time::Instant::now() + PROPOSAL_TIMEOUT;
        self.metrics.inc(&self.metrics.proposals_pending);
        let result = self.replicate(cmd, deadline).await;
        self.metrics
            .proposals_pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let result = result.inspect_err(|_| self.metrics.inc(&self.metrics.proposals_failed))?;
        if result.error != 0 {
            return Err(EtcdError::from_code_number(result.error)
                .map(Status::from)
                .unwrap_or_else(|| {
                    Status::internal(format!("unknown apply error {}", result.error))
                }));
        }
        result
            .response
            .ok_or_else(|| Status::internal("apply produced no response"))
    }

    /// `cmd` is an encoded `tessera.RaftCommand`; etcd's timeout error is
    /// returned at `deadline`.
    async fn replicate(
        &self,
        cmd: bytes::Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<RaftResult, Status> {
        loop {
            match self.proposals.propose(cmd.clone(), deadline).await {
                // Leadership moved, or the leader could not be reached, before
                // the proposal was accepted: nothing was proposed, so trying
                // again (at the new leader) is safe.
                Err(e) if is_not_leader(&e) || e.message().starts_with(LEADER_UNREACHABLE) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(EtcdError::Timeout.into());
                    }
                    self.pause().await
                }
                other => return other,
            }
        }
    }

    /// Replicates `commands` (each an encoded `tessera.RaftCommand`) as one
    /// Raft entry through the leader, wherever it is, and returns the entry's
    /// index and its results once this member has applied it.
    pub async fn write_batch(
        &self,
        commands: &[bytes::Bytes],
    ) -> Result<(u64, Vec<RaftResult>), Status> {
        // Bounded, so a batch whose callers all gave up does not wait forever
        // (its requests are retried by `replicate` while they still wait).
        let leader = tokio::time::timeout(self.election_timeout(), self.wait_for_leader())
            .await
            .map_err(|_| Status::from(EtcdError::NotLeader))?;
        let (index, results) = if leader == self.member_id {
            self.propose_on_leader(commands).await?
        } else {
            let batch = Command::of_encoded(commands, 0);
            let reply: ProposeReply = self
                .forward_encoded(leader, method::PROPOSE, batch.0.to_vec())
                .await?;
            let results = reply.results.unwrap_or_default().results;
            (reply.index, results)
        };
        // Answer once this member has applied it too, as etcd does, so a read
        // here right after sees the write (on the leader it already has).
        self.wait_applied(index).await?;
        Ok((index, results))
    }

    /// A batch a follower forwarded: proposed with this member's own queued
    /// requests in its next entry, so the cluster's requests share entries.
    /// Refused unless this member leads (the follower then tries the new
    /// leader).
    pub async fn propose_forwarded(
        &self,
        batch: Command,
    ) -> Result<(u64, Vec<RaftResult>), Status> {
        if self.leader() != Some(self.member_id) {
            return Err(EtcdError::NotLeader.into());
        }
        // A batch whose framing is broken cannot be told apart into its
        // requests: all of it is refused.
        let commands = batch
            .split()
            .map_err(|e| Status::invalid_argument(format!("malformed forwarded batch: {e}")))?;
        // Each request is checked as the proposing member should have (a
        // follower of another version may not have): one that would not
        // decode when applied fails alone, the others are proposed.
        let mut refused: Vec<Option<RaftResult>> = Vec::with_capacity(commands.len());
        let mut accepted = Vec::with_capacity(commands.len());
        for c in commands {
            match check_forwarded(&c) {
                Ok(()) => {
                    refused.push(None);
                    accepted.push(c);
                }
                Err(e) => refused.push(Some(RaftResult {
                    response: None,
                    error: e.code_number(),
                })),
            }
        }
        if accepted.is_empty() {
            return Ok((0, refused.into_iter().flatten().collect()));
        }
        let deadline = tokio::time::Instant::now() + PROPOSAL_TIMEOUT;
        let (index, results) = self.proposals.propose_group(accepted, deadline).await?;
        let mut results = results.into_iter();
        let merged = refused
            .into_iter()
            .map(|r| r.or_else(|| results.next()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Status::internal("apply returned too few results"))?;
        Ok((index, merged))
    }

    /// Proposes `commands` as one entry on this member, which must lead;
    /// returns the entry's log index with the results.
    ///
    /// When openraft answers that this member does not lead, the caller
    /// retries at the leader; that is safe only if the entry never reached
    /// this member's log. If it did, a newer leader truncated it, and a
    /// member that holds it may still commit it: the outcome is unknown, and
    /// the answer is etcd's for a proposal lost in a leader change, which
    /// is not retried.
    async fn propose_on_leader(
        &self,
        commands: &[bytes::Bytes],
    ) -> Result<(u64, Vec<RaftResult>), Status> {
        let id = self.proposal_ids.fetch_add(1, Ordering::Relaxed).max(1);
        let watched = self.appended.watch(id);
        let mut written = self
            .raft
            .client_write(Command::of_encoded(commands, id))
            .await;
        if written.is_ok() && tessera_storage::failpoint::is_on("proposal-lost-after-append") {
            // What openraft answers for an entry a newer leader truncated.
            written = Err(RaftError::APIError(ClientWriteError::ForwardToLeader(
                openraft::error::ForwardToLeader {
                    leader_id: Some(self.member_id),
                    leader_node: None,
                },
            )));
        }
        match written {
            Ok(written) => Ok((written.log_id.index, written.data.0.results)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))
                if watched.was_appended() =>
            {
                Err(EtcdError::TimeoutDueToLeaderFail.into())
            }
            Err(e) => Err(raft_write_error(e)),
        }
    }

    /// Waits until this member has applied everything committed before the
    /// call: a linearizable read point (Raft read index, asked of the leader
    /// when this member is a follower, and shared by concurrent reads).
    pub async fn read_barrier(self: &Arc<Self>) -> Result<(), Status> {
        let barrier = async {
            let node = self.clone();
            let index = self
                .read_indexes
                .read_index(
                    Duration::from_millis(self.config.heartbeat_interval),
                    move || {
                        let node = node.clone();
                        async move { node.fetch_read_index().await }
                    },
                )
                .await?;
            self.wait_applied(index).await
        };
        tokio::time::timeout(PROPOSAL_TIMEOUT, barrier)
            .await
            .unwrap_or_else(|_| Err(EtcdError::Timeout.into()))
    }

    /// One attempt at a read index: the leader's own, or asked of the leader.
    async fn fetch_read_index(&self) -> Result<u64, Status> {
        // Bounded, so a batch whose readers all gave up is dropped.
        let leader = tokio::time::timeout(self.election_timeout(), self.wait_for_leader())
            .await
            .map_err(|_| Status::unavailable("no leader"))?;
        if leader == self.member_id {
            self.read_index_on_leader().await
        } else {
            self.forward::<_, IndexReply>(leader, method::READ_INDEX, &MembersRequest {})
                .await
                .map(|r| r.index)
        }
    }

    /// The leader's read index: confirms leadership with a quorum and
    /// returns the commit index a linearizable read must wait for.
    pub async fn read_index_on_leader(&self) -> Result<u64, Status> {
        match self.raft.get_read_log_id().await {
            Ok((read_log_id, _)) => Ok(read_log_id.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(EtcdError::NotLeader.into())
            }
            Err(e) => Err(Status::unavailable(format!("read index: {e}"))),
        }
    }

    /// etcd's `isValidSimpleToken`: a simple token names the log index of
    /// the Authenticate entry that made it, and a member that has not
    /// applied that entry yet waits for it before judging the token. So a
    /// client that authenticated through another member, or re-authenticated
    /// after this one restarted, is not told `invalid auth token` while this
    /// member catches up. This returns that index when it is not applied
    /// yet; [`Node::wait_token_entry`] waits for it.
    pub fn unapplied_token_index(&self, headers: &axum::http::HeaderMap) -> Option<u64> {
        let token = headers
            .get("token")
            .or_else(|| headers.get("authorization"))?
            .to_str()
            .ok()?;
        // Not gated on auth being enabled here: a member that has not yet
        // applied `auth enable` either would judge the token once it has,
        // and a token minted after that entry would then be refused.
        let index = self.auth.simple_token_index(token)?;
        let applied = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        (index > applied).then_some(index)
    }

    /// Waits for a token's Authenticate entry (see
    /// [`Node::unapplied_token_index`]), for [`TOKEN_APPLY_WAIT`] at most
    /// and only while fewer than [`MAX_TOKEN_WAITERS`] requests wait: the
    /// token is judged afterwards either way.
    pub async fn wait_token_entry(&self, index: u64) {
        let Ok(_permit) = self.token_waiters.try_acquire() else {
            return;
        };
        let _ = tokio::time::timeout(TOKEN_APPLY_WAIT, self.wait_applied(index)).await;
    }

    /// Waits until this member's state machine has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Status> {
        self.raft
            .wait(None)
            .applied_index_at_least(Some(index), "wait for apply")
            .await
            .map(|_| ())
            .map_err(|_| EtcdError::Stopped.into())
    }

    /// The current leader, waiting for one if there is none.
    pub async fn wait_for_leader(&self) -> u64 {
        let mut rx = self.raft.metrics();
        loop {
            if let Some(leader) = rx.borrow_and_update().current_leader {
                return leader;
            }
            if rx.changed().await.is_err() {
                // Raft stopped: nothing will change any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs `local` on this member if it leads, otherwise forwards the
    /// request to the leader under `method`.
    pub async fn on_leader<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        req: Req,
        local: F,
    ) -> Result<Resp, Status>
    where
        Req: Message,
        Resp: Message + Default,
        F: FnOnce(Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, Status>>,
    {
        let find = tokio::time::timeout(PROPOSAL_TIMEOUT, self.wait_for_leader());
        let leader = find.await.map_err(|_| Status::from(EtcdError::Timeout))?;
        if leader == self.member_id {
            local(req).await
        } else {
            self.forward(leader, method, &req).await
        }
    }

    /// Sends a request to member `to` over the peer transport.
    pub async fn forward<Req: Message, Resp: Message + Default>(
        &self,
        to: u64,
        method: &str,
        req: &Req,
    ) -> Result<Resp, Status> {
        self.forward_encoded(to, method, req.encode_to_vec()).await
    }

    /// [`Node::forward`] of a request already encoded as `body`.
    pub async fn forward_encoded<Resp: Message + Default>(
        &self,
        to: u64,
        method: &str,
        body: Vec<u8>,
    ) -> Result<Resp, Status> {
        let addr = self
            .membership()
            .into_iter()
            .find(|m| m.id == to)
            .map(|m| m.peer_urls.join(","))
            .ok_or_else(|| Status::from(EtcdError::NotLeader))?;
        let mut client = self
            .peers
            .client(&addr)
            .map_err(|e| Status::unavailable(format!("bad peer address {addr}: {e}")))?;
        let mut request = tonic::Request::new(tessera_proto::tessera::ForwardRequest {
            method: method.to_string(),
            body,
        });
        request.set_timeout(PROPOSAL_TIMEOUT);
        let reply = client.forward(request).await.map_err(|e| {
            // A leader that cannot be connected to never saw the request, so
            // the caller may safely try again (at a new leader).
            if crate::peer::never_reached_peer(&e) {
                Status::unavailable(format!("{LEADER_UNREACHABLE}: {}", e.message()))
            } else {
                e
            }
        })?;
        Resp::decode(reply.into_inner().data.as_slice())
            .map_err(|e| Status::internal(format!("malformed reply from the leader: {e}")))
    }

    /// Starts an election on this member now (the target of MoveLeader) and
    /// keeps trying until it leads or three election timeouts pass.
    pub async fn campaign_now(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + self.election_timeout() * 3;
        while tokio::time::Instant::now() < deadline {
            if self.is_leader() {
                return Ok(());
            }
            self.raft
                .trigger()
                .elect()
                .await
                .map_err(|_| Status::from(EtcdError::Stopped))?;
            tokio::time::sleep(Duration::from_millis(self.config.heartbeat_interval)).await;
        }
        Err(EtcdError::LeadershipTransferTimeout.into())
    }

    /// The members in the Raft membership this member knows, by id.
    pub fn membership(&self) -> Vec<MemberInfo> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: *id,
                peer_urls: node.addr.split(',').map(str::to_string).collect(),
                is_learner: !voters.contains(id),
            })
            .collect()
    }

    /// A short wait before retrying something that needs a (new) leader.
    async fn pause(&self) {
        tokio::time::sleep(Duration::from_millis(self.config.heartbeat_interval)).await;
    }

    /// The database size the quota is checked against. Summing RocksDB's
    /// size properties costs more than a put, so it is read at most every
    /// [`QUOTA_SIZE_REFRESH`]; writes in between are not counted yet, as in
    /// etcd, where concurrent proposals may all pass the same check.
    fn db_size_for_quota(&self) -> u64 {
        let mut cached = self.quota_size.lock().unwrap_or_else(|p| p.into_inner());
        match *cached {
            Some((at, size)) if at.elapsed() < QUOTA_SIZE_REFRESH => size,
            _ => {
                let size = db::total_size(self.store.db());
                *cached = Some((Instant::now(), size));
                size
            }
        }
    }

    /// This member's HashKV at `revision` (0: the current one), as the
    /// Maintenance service and the corruption checks ask it.
    pub async fn local_hash_kv(&self, revision: i64) -> Result<HashKvResponse, Status> {
        let store = self.store.clone();
        let (hash, current, compact_revision) =
            tokio::task::spawn_blocking(move || store.hash_kv(revision))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))??;
        Ok(HashKvResponse {
            header: self.header(current),
            hash,
            compact_revision,
        })
    }

    /// Proposes raising `alarm` for `member` (unless it is already raised).
    pub async fn raise_alarm(&self, member: u64, alarm: AlarmType) -> Result<(), Status> {
        if self
            .alarms
            .list(alarm)
            .iter()
            .any(|a| a.member_id == member)
        {
            return Ok(());
        }
        let raise = AlarmRequest {
            action: alarm_request::AlarmAction::Activate as i32,
            member_id: member,
            alarm: alarm as i32,
        };
        self.propose_internal(Request::Alarm(raise)).await?;
        Ok(())
    }

    /// etcd's quota check before a write is proposed: past the quota, raise
    /// the NOSPACE alarm and refuse.
    pub async fn check_quota(&self, cost: usize) -> Result<(), Status> {
        let Some(quota) = self.config.quota_bytes() else {
            return Ok(());
        };
        if self.db_size_for_quota() + (cost as u64) < quota {
            return Ok(());
        }
        if !self.alarms.is_active(AlarmType::Nospace) {
            tracing::warn!(quota, "database space exceeded; raising NOSPACE alarm");
            self.raise_alarm(self.member_id, AlarmType::Nospace).await?;
        }
        Err(EtcdError::NoSpace.into())
    }

    /// This member's metrics in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let disk = Disk {
            wal: &self.wal_stats,
            backend_commit: &self.store.commit_seconds,
        };
        self.metrics.render(&self.gauges(), &disk)
    }

    pub fn gauges(&self) -> Gauges {
        let m = self.raft.metrics().borrow().clone();
        Gauges {
            has_leader: m.current_leader.is_some(),
            is_leader: m.current_leader == Some(self.member_id),
            committed_index: m.last_log_index.unwrap_or(0),
            db_size: db::total_size(self.store.db()),
            db_size_in_use: db::live_size(self.store.db()),
            quota_bytes: self.config.quota_bytes(),
            current_revision: self.store.current_rev(),
            compact_revision: self.store.compact_rev(),
        }
    }
}

/// A member as the Raft membership records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub peer_urls: Vec<String>,
    pub is_learner: bool,
}

/// Whether a forwarded command may be proposed: it must decode as the
/// state machine will decode it, and pass the checks that keep anything
/// that would not out of the log (see [`crate::validate::MAX_TXN_DEPTH`]).
fn check_forwarded(command: &bytes::Bytes) -> Result<(), EtcdError> {
    let decoded = RaftCommand::decode(command.clone()).map_err(|_| EtcdError::Undecodable)?;
    match &decoded.request {
        Some(Request::Txn(t)) if crate::validate::txn_depth(t) > crate::validate::MAX_TXN_DEPTH => {
            Err(EtcdError::TooManyOps)
        }
        _ => Ok(()),
    }
}

/// Prefix of the error for a leader this member could not connect to.
const LEADER_UNREACHABLE: &str = "leader unreachable";

fn is_not_leader(status: &Status) -> bool {
    status.message() == EtcdError::NotLeader.message()
}

const LOW_48_BITS: u64 = (1 << 48) - 1;

fn request_id_base() -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (now_ms << 8) & LOW_48_BITS
}

pub fn raft_write_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) if f.leader_id.is_none() => {
            EtcdError::NoLeader.into()
        }
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => EtcdError::NotLeader.into(),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Status::failed_precondition(e.to_string())
        }
        RaftError::Fatal(e) => {
            tracing::error!(error = %e, "raft stopped");
            EtcdError::Stopped.into()
        }
    }
}

/// Maps a storage failure on a request path to an internal error.
pub fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage failure");
    Status::internal(e.to_string())
}

#[cfg(test)]
mod id_tests {
    use super::*;

    /// Ids Debian's etcd 3.4.23 logged for one member on
    /// http://127.0.0.1:23800 with the default token.
    #[test]
    fn ids_are_derived_as_etcd_derives_them() {
        let id = member_id(&["http://127.0.0.1:23800".into()], "etcd-cluster", None);
        assert_eq!(id, 0x2e12_59d4_15f2_a040);
        assert_eq!(cluster_id(&[id]), 0x0482_76a8_f75b_6a87);
        // URL order does not matter; the token and a runtime salt do.
        let two = ["http://b:2".to_string(), "http://a:1".to_string()];
        let mut sorted = two.clone();
        sorted.sort();
        assert_eq!(member_id(&two, "t", None), member_id(&sorted, "t", None));
        assert_ne!(member_id(&two, "t", None), member_id(&two, "u", None));
        assert_ne!(member_id(&two, "t", None), member_id(&two, "t", Some(1)));
        assert_eq!(cluster_id(&[3, 1, 2]), cluster_id(&[1, 2, 3]));
    }
}
