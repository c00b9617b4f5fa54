//! One Tessera member: its database, MVCC store, Raft instance and identity,
//! plus the helpers every service uses (propose, read barrier, headers).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use rocksdb::DB;
use tessera_proto::etcdserverpb::{alarm_request, AlarmRequest, AlarmType, ResponseHeader};
use tessera_proto::tessera::{raft_command::Request, raft_result::Response, RaftCommand};
use tonic::Status;

use crate::alarms::Alarms;
use crate::config::Config;
use crate::db::{self, CF_RAFT_STATE};
use crate::errors::EtcdError;
use crate::lessor::Lessor;
use crate::metrics::{Gauges, Metrics};
use crate::mvcc::{Store, StoreError};
use crate::raft::log_store::LogStore;
use crate::raft::network::NoPeers;
use crate::raft::state_machine::StateMachine;
use crate::raft::{Command, Raft};
use crate::watch_hub::WatchHub;

/// How long a proposal may wait for commit and apply before etcd's timeout error.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(7);
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
    pub member_id: u64,
    pub cluster_id: u64,
    /// Source of [`Node::next_request_id`].
    request_ids: AtomicU64,
}

/// The directory holding RocksDB under a data dir (etcd keeps `member/` too).
pub fn db_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("member").join("db")
}

/// A stable non-zero 64-bit id from `parts`.
fn stable_id(parts: &[&str]) -> u64 {
    let joined = parts.join("\u{0}");
    let hi = crc32c::crc32c(joined.as_bytes()) as u64;
    let lo = crc32c::crc32c_append(0x9E37_79B9, joined.as_bytes()) as u64;
    (hi << 32 | lo).max(1)
}

fn load_or_create_identity(db: &DB, config: &Config) -> anyhow::Result<Identity> {
    let cf = db
        .cf_handle(CF_RAFT_STATE)
        .context("missing raft_state column family")?;
    if let Some(raw) = db.get_cf(cf, IDENTITY_KEY)? {
        return Ok(bincode::deserialize(&raw)?);
    }
    let mut peer_urls = config.advertise_peer_urls();
    peer_urls.sort();
    let mut parts: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    parts.push(&config.initial_cluster_token);
    let member_id = stable_id(&parts);
    let member_hex = format!("{member_id:016x}");
    let cluster_id = stable_id(&[&member_hex, &config.initial_cluster_token]);
    let identity = Identity {
        member_id,
        cluster_id,
    };
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf, IDENTITY_KEY, bincode::serialize(&identity)?);
    db.write_opt(batch, &opts)?;
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
        let identity = load_or_create_identity(&db, &config)?;
        let store = Arc::new(Store::open(db.clone())?);
        let alarms = Arc::new(Alarms::load(&db)?);
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(WatchHub::default());
        let lessor = Arc::new(Lessor::new(
            config.election_timeout,
            config.heartbeat_interval,
        ));
        lessor.reset(&store.read_view().leases()?, Duration::ZERO);
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
            election_timeout_min: config.election_timeout,
            election_timeout_max: config.election_timeout * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count),
            max_in_snapshot_log_to_keep: 5000,
            ..Default::default()
        }
        .validate()
        .context("invalid raft configuration")?;
        let sm = StateMachine::new(
            store.clone(),
            alarms.clone(),
            metrics.clone(),
            hub.clone(),
            lessor.clone(),
        );
        let raft = Raft::new(
            identity.member_id,
            Arc::new(raft_config),
            NoPeers,
            LogStore::new(db.clone()),
            sm,
        )
        .await
        .context("cannot start raft")?;

        if !raft.is_initialized().await? {
            let addr = config
                .advertise_peer_urls()
                .into_iter()
                .next()
                .unwrap_or_default();
            let members = BTreeMap::from([(identity.member_id, BasicNode { addr })]);
            raft.initialize(members)
                .await
                .context("cannot bootstrap the cluster")?;
            tracing::info!("bootstrapped a new single-member cluster");
        }
        raft.wait(Some(Duration::from_millis(config.election_timeout * 10)))
            .current_leader(identity.member_id, "wait for this member to lead")
            .await
            .context("this member did not become leader")?;

        let node = Arc::new(Node {
            config,
            raft,
            store,
            alarms,
            metrics,
            hub,
            lessor,
            member_id: identity.member_id,
            cluster_id: identity.cluster_id,
            request_ids: AtomicU64::new(request_id_base()),
        });
        node.lessor.promote(node.election_timeout());
        node.clone().spawn_leader_watch();
        crate::lease_expiry::spawn(node.clone());
        Ok(node)
    }

    fn spawn_leader_watch(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        tokio::spawn(async move {
            let mut last = rx.borrow().current_leader;
            while rx.changed().await.is_ok() {
                let leader = rx.borrow().current_leader;
                if leader != last {
                    self.metrics.inc(&self.metrics.leader_changes);
                    tracing::info!(?leader, "leader changed");
                    if leader == Some(self.member_id) {
                        // A new leader starts every lease's clock afresh.
                        self.lessor.promote(self.election_timeout());
                    }
                    last = leader;
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

    /// Replicates `request`, waits until it is applied and returns its result.
    pub async fn propose(&self, request: Request) -> Result<Response, Status> {
        let cmd = RaftCommand {
            request: Some(request),
        };
        if prost::Message::encoded_len(&cmd) > self.config.max_request_bytes as usize {
            return Err(EtcdError::RequestTooLarge.into());
        }
        self.metrics.inc(&self.metrics.proposals_pending);
        let result =
            tokio::time::timeout(PROPOSAL_TIMEOUT, self.raft.client_write(Command(cmd))).await;
        self.metrics
            .proposals_pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let written = match result {
            Err(_) => {
                self.metrics.inc(&self.metrics.proposals_failed);
                return Err(EtcdError::Timeout.into());
            }
            Ok(Err(e)) => {
                self.metrics.inc(&self.metrics.proposals_failed);
                return Err(raft_write_error(e));
            }
            Ok(Ok(w)) => w,
        };
        let result = written.data.0;
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

    /// Waits until this member has applied everything committed before the
    /// call: a linearizable read point (Raft read index).
    pub async fn read_barrier(&self) -> Result<(), Status> {
        match tokio::time::timeout(PROPOSAL_TIMEOUT, self.raft.ensure_linearizable()).await {
            Err(_) => Err(EtcdError::Timeout.into()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "read index failed");
                Err(EtcdError::NoLeader.into())
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// etcd's quota check before a write is proposed: past the quota, raise
    /// the NOSPACE alarm and refuse.
    pub async fn check_quota(&self, cost: usize) -> Result<(), Status> {
        let Some(quota) = self.config.quota_bytes() else {
            return Ok(());
        };
        if db::total_size(self.store.db()) + (cost as u64) < quota {
            return Ok(());
        }
        if !self.alarms.is_active(AlarmType::Nospace) {
            tracing::warn!(quota, "database space exceeded; raising NOSPACE alarm");
            let raise = AlarmRequest {
                action: alarm_request::AlarmAction::Activate as i32,
                member_id: self.member_id,
                alarm: AlarmType::Nospace as i32,
            };
            self.propose(Request::Alarm(raise)).await?;
        }
        Err(EtcdError::NoSpace.into())
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

const LOW_48_BITS: u64 = (1 << 48) - 1;

fn request_id_base() -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (now_ms << 8) & LOW_48_BITS
}

fn raft_write_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Status {
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
