//! The data plane's metadata, kept in the control plane through the etcd
//! v3 API (the `etcd-client` crate): it works on Tessera and on etcd alike.
//!
//! ```text
//! /tessera/store/nodes/<name>      node record (address, zone, capacity, used)
//! /tessera/store/alive/<name>      the node's instance id, under its lease (heartbeat)
//! /tessera/store/volumes/<name>    volume record (id, size, code, epoch, placement)
//! /tessera/store/attach/<name>     who writes the volume now, under that process's lease
//! /tessera/store/deleted/<id>      a deleted volume: nodes give its space back
//! /tessera/store/retired/<id>      a deleted volume whose data snapshots or clones still read
//! /tessera/store/snapshots/<name>  a snapshot: a volume's stripes up to a cut
//! /tessera/store/snapreq/<volume>/<name>   a snapshot asked of the volume's writer
//! /tessera/store/drain/<name>      a node being drained: its shards move away
//! /tessera/store/repairer          the node running repair, under its lease
//! /tessera/store/repair-status     what the repairer last saw and did
//! /tessera/store/lineage           bumped by every change of who reads whom
//! ```
//!
//! Values are JSON. Every change that must not race is a transaction
//! comparing the key's revision (a volume's epoch bump, its creation and
//! deletion), so two admin commands or two attaching writers never both win.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};

const NODES: &str = "/tessera/store/nodes/";
const ALIVE: &str = "/tessera/store/alive/";
const VOLUMES: &str = "/tessera/store/volumes/";
const ATTACH: &str = "/tessera/store/attach/";
const DELETED: &str = "/tessera/store/deleted/";
const RETIRED: &str = "/tessera/store/retired/";
const SNAPSHOTS: &str = "/tessera/store/snapshots/";
const SNAPREQ: &str = "/tessera/store/snapreq/";
const DRAIN: &str = "/tessera/store/drain/";
const REPAIRER: &str = "/tessera/store/repairer";
const REPAIR_STATUS: &str = "/tessera/store/repair-status";
/// Changed by every transaction that adds or removes a reference between
/// volumes and snapshots (clone, snapshot delete, volume delete, burial):
/// each compares it, so two of them never decide on a stale view.
const LINEAGE: &str = "/tessera/store/lineage";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("control plane ({endpoints}): {source}")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("malformed record under {key}: {why}")]
    Malformed { key: String, why: String },
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("volume {name:?} is attached on {host} (process {pid}); detach it first")]
    Attached {
        name: String,
        host: String,
        pid: u32,
    },
    #[error("node {name:?} is already running (registered from {address}); stop it first or pick another --name")]
    NodeRunning { name: String, address: String },
    #[error("volume {0:?} changed while it was being updated; try again")]
    Conflict(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("no snapshot named {0:?}")]
    NoSuchSnapshot(String),
}

/// See [`Meta::watch_snapshot_requests`].
pub struct SnapshotRequestWatch {
    stream: etcd_client::WatchStream,
}

impl SnapshotRequestWatch {
    /// Waits for the next change; false once the watch has ended (the
    /// caller then relies on polling alone).
    pub async fn changed(&mut self) -> bool {
        matches!(self.stream.message().await, Ok(Some(_)))
    }
}

/// A storage node as it registers itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    /// `host:port` of its gRPC service.
    pub address: String,
    pub zone: String,
    pub capacity: u64,
    pub used: u64,
}

/// A volume: its size, code and the placement of each segment's shards.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    pub name: String,
    /// Shards on the nodes are keyed by this, never by the name, so a
    /// volume created again under a deleted one's name starts empty.
    pub id: u64,
    pub size: u64,
    pub data_shards: u32,
    pub parity_shards: u32,
    /// Shards of a stripe that must be durable before a flush is answered.
    pub write_quorum: u32,
    pub segment_size: u64,
    /// The writer's epoch: bumped by every attach; nodes refuse older ones.
    pub epoch: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The nodes named by `segments`.
    pub nodes: Vec<String>,
    /// For each segment, the node (index into `nodes`) of each shard.
    pub segments: Vec<Vec<u16>>,
    /// What the volume was cloned from, nearest first: its blocks not yet
    /// written read from these (copy-on-write, nothing copied).
    #[serde(default)]
    pub bases: Vec<Base>,
    /// `(segment, shard)`s placed on a new node that repair is filling.
    #[serde(default)]
    pub rebuilding: Vec<(u32, u32)>,
    /// The last epoch whose writer closed the volume cleanly (everything
    /// flushed, nothing more to come). While it is behind `epoch`, a writer
    /// may still be out there: crashed, or cut off from the control plane
    /// with its attach record expired but still writing to the nodes.
    #[serde(default)]
    pub closed_epoch: u64,
}

/// A layer a clone reads through: a volume's stripes up to a cut.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Base {
    pub volume_id: u64,
    /// `(epoch, seq)`: the stripes up to and including this one.
    pub cut: (u64, u64),
    /// The snapshot that holds the cut (kept while clones read from it).
    pub snapshot: String,
}

/// A point-in-time copy of a volume: its stripes up to a cut (what a
/// flush had made durable), plus the volume's own bases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotRecord {
    pub name: String,
    /// The volume it was taken of (its name then).
    pub volume: String,
    pub volume_id: u64,
    pub cut: (u64, u64),
    pub size: u64,
    pub created: u64,
    pub bases: Vec<Base>,
    /// Deleted by its user but kept while clones read from it.
    #[serde(default)]
    pub deleted: bool,
}

impl VolumeRecord {
    pub fn shards(&self) -> usize {
        (self.data_shards + self.parity_shards) as usize
    }

    /// The node names holding segment `s`, shard by shard.
    pub fn placement(&self, s: usize) -> Vec<&str> {
        self.segments[s]
            .iter()
            .map(|&i| self.nodes[i as usize].as_str())
            .collect()
    }
}

/// Who writes a volume now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachRecord {
    pub host: String,
    pub pid: u32,
    pub device: String,
    pub epoch: u64,
    /// The device's size, once the writer has it.
    #[serde(default)]
    pub size: u64,
}

/// What the repairer last saw and did, for `repair status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RepairStatus {
    /// The node running repair.
    pub repairer: String,
    /// Seconds since the Unix epoch.
    pub updated: u64,
    /// Shard bytes still to rebuild, as the last pass counted them.
    pub bytes_left: u64,
    /// Shard bytes rebuilt a second, lately.
    pub rate: u64,
    /// Shard bytes rebuilt since this repairer started.
    pub bytes_repaired: u64,
}

/// A node as `node list` shows it.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub record: NodeRecord,
    pub alive: bool,
    /// Being drained: no new placements, its shards move away.
    pub draining: bool,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The control plane, as the data plane uses it.
#[derive(Clone)]
pub struct Meta {
    client: Client,
    endpoints: String,
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(value).map_err(|e| MetaError::Malformed {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

impl Meta {
    /// Connects to the control plane at `endpoints` (`http://host:port` or
    /// `host:port`, as etcdctl takes them).
    pub async fn connect(endpoints: &[String]) -> Result<Meta, MetaError> {
        let joined = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| MetaError::Etcd {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Meta {
            client,
            endpoints: joined,
        })
    }

    fn err(&self, source: etcd_client::Error) -> MetaError {
        MetaError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Registers a node: its record, and its liveness under `lease`. Refused
    /// while another live instance holds the name; `previous` is this data
    /// directory's last instance, whose liveness (left by a crash, until its
    /// lease expires) is taken over.
    pub async fn register_node(
        &self,
        record: &NodeRecord,
        instance: u64,
        previous: Option<u64>,
        lease: i64,
    ) -> Result<(), MetaError> {
        let alive = format!("{ALIVE}{}", record.name);
        let info = format!("{NODES}{}", record.name);
        let ops = [
            TxnOp::put(info.clone(), encode(record), None),
            TxnOp::put(
                alive.clone(),
                instance.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        ];
        // Free; or already ours (a retry after a commit whose reply was
        // lost); or left by this data directory's last instance.
        let mut conditions = vec![
            Compare::version(alive.clone(), CompareOp::Equal, 0),
            Compare::value(alive.clone(), CompareOp::Equal, instance.to_string()),
        ];
        if let Some(previous) = previous {
            conditions.push(Compare::value(
                alive.clone(),
                CompareOp::Equal,
                previous.to_string(),
            ));
        }
        for condition in conditions {
            let txn = Txn::new().when([condition]).and_then(ops.clone());
            let resp = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(|e| self.err(e))?;
            if resp.succeeded() {
                return Ok(());
            }
        }
        let known = self.node(&record.name).await?;
        Err(MetaError::NodeRunning {
            name: record.name.clone(),
            address: known.map_or_else(|| "?".into(), |n| n.record.address),
        })
    }

    /// Ends a node's liveness now (a clean stop), if `instance` holds it.
    pub async fn unregister_node(&self, name: &str, instance: u64) -> Result<(), MetaError> {
        let alive = format!("{ALIVE}{name}");
        let txn = Txn::new()
            .when([Compare::value(
                alive.clone(),
                CompareOp::Equal,
                instance.to_string(),
            )])
            .and_then([TxnOp::delete(alive, None)]);
        self.client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Updates a registered node's record (its use).
    pub async fn update_node(&self, record: &NodeRecord) -> Result<(), MetaError> {
        self.client
            .clone()
            .put(format!("{NODES}{}", record.name), encode(record), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Whether the node's liveness key is still there, held by `instance`.
    pub async fn node_alive_as(&self, name: &str, instance: u64) -> Result<bool, MetaError> {
        let resp = self
            .client
            .clone()
            .get(format!("{ALIVE}{name}"), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == instance.to_string().as_bytes()))
    }

    pub async fn node(&self, name: &str) -> Result<Option<NodeStatus>, MetaError> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .find(|n| n.record.name == name))
    }

    /// Every node ever registered, with whether it is alive now.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>, MetaError> {
        let mut client = self.client.clone();
        let prefix = Some(GetOptions::new().with_prefix());
        let alive = client
            .get(ALIVE, prefix.clone())
            .await
            .map_err(|e| self.err(e))?;
        let alive: std::collections::HashSet<Vec<u8>> = alive
            .kvs()
            .iter()
            .map(|kv| kv.key()[ALIVE.len()..].to_vec())
            .collect();
        let draining = client
            .get(DRAIN, prefix.clone())
            .await
            .map_err(|e| self.err(e))?;
        let draining: std::collections::HashSet<Vec<u8>> = draining
            .kvs()
            .iter()
            .map(|kv| kv.key()[DRAIN.len()..].to_vec())
            .collect();
        let resp = client.get(NODES, prefix).await.map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let record: NodeRecord = decode(kv.key(), kv.value())?;
            let alive = alive.contains(record.name.as_bytes());
            let draining = draining.contains(record.name.as_bytes());
            out.push(NodeStatus {
                record,
                alive,
                draining,
            });
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    /// Marks a node as drained: placements avoid it, repair moves its
    /// shards away.
    pub async fn set_draining(&self, name: &str) -> Result<(), MetaError> {
        self.client
            .clone()
            .put(format!("{DRAIN}{name}"), "", None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Creates a volume; refused if the name is taken.
    pub async fn create_volume(&self, record: &VolumeRecord) -> Result<(), MetaError> {
        let key = format!("{VOLUMES}{}", record.name);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, encode(record), None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(MetaError::VolumeExists(record.name.clone()))
        }
    }

    /// The volume and the revision its record was last changed at.
    pub async fn volume(&self, name: &str) -> Result<Option<(VolumeRecord, i64)>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(format!("{VOLUMES}{name}"), None)
            .await
            .map_err(|e| self.err(e))?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some((decode(kv.key(), kv.value())?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(VOLUMES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// Raises the volume's epoch by one, atomically: two writers attaching
    /// at once get different epochs. Returns the record with the new epoch.
    pub async fn bump_epoch(&self, name: &str) -> Result<VolumeRecord, MetaError> {
        self.bump_epoch_when(name, None).await
    }

    /// [`Meta::bump_epoch`] only while no writer is recorded (`Conflict`
    /// otherwise): for fencing a writer that is gone without racing one
    /// that is attaching.
    pub async fn bump_epoch_unattached(&self, name: &str) -> Result<VolumeRecord, MetaError> {
        let unattached = Compare::version(format!("{ATTACH}{name}"), CompareOp::Equal, 0);
        self.bump_epoch_when(name, Some(unattached)).await
    }

    async fn bump_epoch_when(
        &self,
        name: &str,
        also: Option<Compare>,
    ) -> Result<VolumeRecord, MetaError> {
        for _ in 0..20 {
            let (mut record, revision) = self
                .volume(name)
                .await?
                .ok_or_else(|| MetaError::NoSuchVolume(name.to_string()))?;
            record.epoch += 1;
            let key = format!("{VOLUMES}{name}");
            let mut when = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )];
            when.extend(also.clone());
            let txn = Txn::new()
                .when(when)
                .and_then([TxnOp::put(key, encode(&record), None)]);
            let resp = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(|e| self.err(e))?;
            if resp.succeeded() {
                return Ok(record);
            }
            if also.is_some() && self.attached_at(name).await?.is_some() {
                break; // That compare cannot succeed while a writer is recorded.
            }
        }
        Err(MetaError::Conflict(name.to_string()))
    }

    /// Records that the writer of `epoch` closed the volume cleanly; a
    /// no-op if a newer writer has attached since.
    pub async fn mark_closed(&self, name: &str, epoch: u64) -> Result<(), MetaError> {
        for _ in 0..20 {
            let Some((mut record, revision)) = self.volume(name).await? else {
                return Ok(());
            };
            if record.epoch != epoch || record.closed_epoch == epoch {
                return Ok(());
            }
            record.closed_epoch = epoch;
            match self.update_volume(&record, revision).await {
                Err(MetaError::Conflict(_)) => continue,
                done => return done,
            }
        }
        Err(MetaError::Conflict(name.to_string()))
    }

    /// Records who writes the volume, under `lease` (the writer's process).
    pub async fn set_attached(
        &self,
        name: &str,
        record: &AttachRecord,
        lease: i64,
    ) -> Result<(), MetaError> {
        self.client
            .clone()
            .put(
                format!("{ATTACH}{name}"),
                encode(record),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Rewrites the record of the writer of `record.epoch` (a larger size):
    /// only while the record there is still that writer's, so a fenced
    /// writer never overwrites its successor's. Whether it did.
    pub async fn update_attached(
        &self,
        name: &str,
        record: &AttachRecord,
        lease: i64,
    ) -> Result<bool, MetaError> {
        let key = format!("{ATTACH}{name}");
        let Some((current, revision)) = self.attached_at(name).await? else {
            return Ok(false);
        };
        if current.epoch != record.epoch {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(
                key,
                encode(record),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        self.txn(txn).await
    }

    /// Records the writer of `record.epoch` again under a new `lease`
    /// after its old one expired (it was cut off from the control plane):
    /// only while no record is there and the volume's epoch is still the
    /// writer's (no newer writer attached, no snapshot fenced it). Whether
    /// it did; `Conflict` if the volume kept changing otherwise (repair,
    /// expansion), to be tried again.
    pub async fn reattach(
        &self,
        name: &str,
        record: &AttachRecord,
        lease: i64,
    ) -> Result<bool, MetaError> {
        let key = format!("{ATTACH}{name}");
        for _ in 0..20 {
            let Some((volume, revision)) = self.volume(name).await? else {
                return Ok(false);
            };
            if volume.epoch != record.epoch || self.attached_at(name).await?.is_some() {
                return Ok(false);
            }
            let txn = Txn::new()
                .when([
                    Compare::version(key.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(format!("{VOLUMES}{name}"), CompareOp::Equal, revision),
                ])
                .and_then([TxnOp::put(
                    key.clone(),
                    encode(record),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            if self.txn(txn).await? {
                return Ok(true);
            }
        }
        Err(MetaError::Conflict(name.to_string()))
    }

    /// Forgets the writer of epoch `epoch` (not a newer one).
    pub async fn clear_attached(&self, name: &str, epoch: u64) -> Result<(), MetaError> {
        let key = format!("{ATTACH}{name}");
        if let Some((current, revision)) = self.attached_at(name).await? {
            if current.epoch == epoch {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    )])
                    .and_then([TxnOp::delete(key, None)]);
                self.txn(txn).await?;
            }
        }
        Ok(())
    }

    pub async fn attached(&self, name: &str) -> Result<Option<AttachRecord>, MetaError> {
        Ok(self.attached_at(name).await?.map(|(record, _)| record))
    }

    /// The attach record of `name` and the revision it was last written at.
    async fn attached_at(&self, name: &str) -> Result<Option<(AttachRecord, i64)>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(format!("{ATTACH}{name}"), None)
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .first()
            .map(|kv| Ok((decode(kv.key(), kv.value())?, kv.mod_revision())))
            .transpose()
    }

    /// Every snapshot, hidden (deleted but still read) ones included.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(SNAPSHOTS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    pub async fn snapshot(&self, name: &str) -> Result<Option<SnapshotRecord>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(format!("{SNAPSHOTS}{name}"), None)
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Records a snapshot the writer of `epoch` took, only while the
    /// volume's attach record is that writer's: a fencing open needs no
    /// record there, so it either sees this snapshot's cut or never
    /// starts before it. `Ok(false)`: the record is not this writer's
    /// (superseded, or lapsed with its lease). Refused if the name is
    /// taken.
    pub async fn create_writer_snapshot(
        &self,
        record: &SnapshotRecord,
        epoch: u64,
    ) -> Result<bool, MetaError> {
        let key = format!("{SNAPSHOTS}{}", record.name);
        let Some((writer, revision)) = self.attached_at(&record.volume).await? else {
            return Ok(false);
        };
        if writer.epoch != epoch {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(
                    format!("{ATTACH}{}", record.volume),
                    CompareOp::Equal,
                    revision,
                ),
            ])
            .and_then([TxnOp::put(key, encode(record), None)]);
        if self.txn(txn).await? {
            return Ok(true);
        }
        if self.snapshot(&record.name).await?.is_some() {
            return Err(MetaError::SnapshotExists(record.name.clone()));
        }
        Ok(false)
    }

    /// The cuts that snapshots (hidden ones included) hold on volume `id`:
    /// its writer keeps every stripe they need.
    pub async fn snapshot_cuts(&self, id: u64) -> Result<Vec<(u64, u64)>, MetaError> {
        Ok(self
            .snapshots()
            .await?
            .into_iter()
            .filter(|s| s.volume_id == id)
            .map(|s| s.cut)
            .collect())
    }

    /// Asks the writer of `volume` for snapshot `name`; refused when the
    /// name is taken or asked for already.
    pub async fn request_snapshot(&self, volume: &str, name: &str) -> Result<(), MetaError> {
        let request = format!("{SNAPREQ}{volume}/{name}");
        let snapshot = format!("{SNAPSHOTS}{name}");
        let txn = Txn::new()
            .when([
                Compare::version(snapshot, CompareOp::Equal, 0),
                Compare::version(request.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(request, "pending", None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(MetaError::SnapshotExists(name.to_string()))
        }
    }

    /// The snapshots asked of `volume`'s writer and not yet taken.
    pub async fn snapshot_requests(&self, volume: &str) -> Result<Vec<String>, MetaError> {
        let prefix = format!("{SNAPREQ}{volume}/");
        let resp = self
            .client
            .clone()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .iter()
            .filter(|kv| kv.value() == b"pending")
            .filter_map(|kv| {
                std::str::from_utf8(&kv.key()[prefix.len()..])
                    .ok()
                    .map(String::from)
            })
            .collect())
    }

    /// A wake-up whenever a snapshot request of `volume` changes, so its
    /// writer answers at once instead of at its next poll.
    pub async fn watch_snapshot_requests(
        &self,
        volume: &str,
    ) -> Result<SnapshotRequestWatch, MetaError> {
        let stream = self
            .client
            .clone()
            .watch(
                format!("{SNAPREQ}{volume}/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(SnapshotRequestWatch { stream })
    }

    pub async fn clear_snapshot_request(&self, volume: &str, name: &str) -> Result<(), MetaError> {
        self.client
            .clone()
            .delete(format!("{SNAPREQ}{volume}/{name}"), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The record of volume `id`: a live volume, or a deleted one whose data
    /// is still read (retired).
    pub async fn volume_by_id(&self, id: u64) -> Result<Option<VolumeRecord>, MetaError> {
        if let Some(v) = self.volumes().await?.into_iter().find(|v| v.id == id) {
            return Ok(Some(v));
        }
        let resp = self
            .client
            .clone()
            .get(format!("{RETIRED}{id:016x}"), None)
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Deleted volumes whose data is still read.
    pub async fn retired(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(RETIRED, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }

    /// Updates a volume's record if it has not changed since `revision`.
    pub async fn update_volume(
        &self,
        record: &VolumeRecord,
        revision: i64,
    ) -> Result<(), MetaError> {
        let key = format!("{VOLUMES}{}", record.name);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, encode(record), None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(MetaError::Conflict(record.name.clone()))
        }
    }

    /// Deletes a volume that is not attached, and leaves a tombstone that
    /// tells nodes to give its space back (or, while snapshots hold cuts of
    /// it, keeps its record as retired for them to read through).
    pub async fn delete_volume(&self, name: &str) -> Result<(VolumeRecord, bool), MetaError> {
        let (record, revision) = self
            .volume(name)
            .await?
            .ok_or_else(|| MetaError::NoSuchVolume(name.to_string()))?;
        if let Some(a) = self.attached(name).await? {
            return Err(MetaError::Attached {
                name: name.to_string(),
                host: a.host,
                pid: a.pid,
            });
        }
        let key = format!("{VOLUMES}{name}");
        let attach = format!("{ATTACH}{name}");
        let lineage = self.lineage().await?;
        let held = !self.snapshot_cuts(record.id).await?.is_empty();
        let keep = if held {
            TxnOp::put(
                format!("{RETIRED}{:016x}", record.id),
                encode(&record),
                None,
            )
        } else {
            TxnOp::put(format!("{DELETED}{:016x}", record.id), name, None)
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
                Compare::version(attach, CompareOp::Equal, 0),
                Compare::mod_revision(LINEAGE, CompareOp::Equal, lineage),
            ])
            .and_then([TxnOp::delete(key, None), keep, bump_lineage()]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        if resp.succeeded() {
            Ok((record, held))
        } else {
            Err(MetaError::Conflict(name.to_string()))
        }
    }

    /// The lineage key's revision, for [`LINEAGE`]'s compare.
    async fn lineage(&self) -> Result<i64, MetaError> {
        let resp = self
            .client
            .clone()
            .get(LINEAGE, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.kvs().first().map_or(0, |kv| kv.mod_revision()))
    }

    async fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.succeeded())
    }

    /// Records a snapshot of a volume that no writer has open: its stripes
    /// are all there is, so the cut is everything up to its epoch. Refused
    /// (`Conflict`) if the volume changed or a writer attached meanwhile.
    pub async fn create_detached_snapshot(
        &self,
        record: &SnapshotRecord,
        volume_revision: i64,
    ) -> Result<(), MetaError> {
        let key = format!("{SNAPSHOTS}{}", record.name);
        let volume = format!("{VOLUMES}{}", record.volume);
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(volume, CompareOp::Equal, volume_revision),
                Compare::version(format!("{ATTACH}{}", record.volume), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key, encode(record), None)]);
        if self.txn(txn).await? {
            return Ok(());
        }
        if self.snapshot(&record.name).await?.is_some() {
            return Err(MetaError::SnapshotExists(record.name.clone()));
        }
        Err(MetaError::Conflict(record.volume.clone()))
    }

    /// Creates a clone's record, reading through snapshot `snapshot`:
    /// refused if the snapshot went away or anything of the lineage changed
    /// since `lineage` was read.
    pub async fn create_clone(
        &self,
        record: &VolumeRecord,
        snapshot: &str,
        lineage: i64,
    ) -> Result<(), MetaError> {
        let key = format!("{VOLUMES}{}", record.name);
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Equal, 0),
                Compare::version(format!("{SNAPSHOTS}{snapshot}"), CompareOp::Greater, 0),
                Compare::mod_revision(LINEAGE, CompareOp::Equal, lineage),
            ])
            .and_then([TxnOp::put(key, encode(record), None), bump_lineage()]);
        if self.txn(txn).await? {
            return Ok(());
        }
        if self.volume(&record.name).await?.is_some() {
            return Err(MetaError::VolumeExists(record.name.clone()));
        }
        if self.snapshot(snapshot).await?.is_none_or(|s| s.deleted) {
            return Err(MetaError::NoSuchSnapshot(snapshot.to_string()));
        }
        Err(MetaError::Conflict(record.name.clone()))
    }

    /// The lineage's revision now: read it before deciding on a clone.
    pub async fn lineage_revision(&self) -> Result<i64, MetaError> {
        self.lineage().await
    }

    /// Everything that reads through snapshots or retired volumes: volume
    /// records (live and retired) and snapshot records.
    async fn lineage_view(
        &self,
    ) -> Result<
        (
            i64,
            Vec<VolumeRecord>,
            Vec<VolumeRecord>,
            Vec<SnapshotRecord>,
        ),
        MetaError,
    > {
        let lineage = self.lineage().await?;
        Ok((
            lineage,
            self.volumes().await?,
            self.retired().await?,
            self.snapshots().await?,
        ))
    }

    /// Deletes snapshot `name` as its user sees it: gone from lists; its
    /// record kept hidden while clones read through it. Returns whether it
    /// was kept.
    pub async fn delete_snapshot(&self, name: &str) -> Result<bool, MetaError> {
        for _ in 0..20 {
            let (lineage, volumes, retired, snapshots) = self.lineage_view().await?;
            let Some(mut snap) = snapshots
                .iter()
                .find(|s| s.name == name && !s.deleted)
                .cloned()
            else {
                return Err(MetaError::NoSuchSnapshot(name.to_string()));
            };
            let read = referenced_snapshots(&volumes, &retired, &snapshots).contains(name);
            let key = format!("{SNAPSHOTS}{name}");
            let change = if read {
                snap.deleted = true;
                TxnOp::put(key, encode(&snap), None)
            } else {
                TxnOp::delete(key, None)
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(LINEAGE, CompareOp::Equal, lineage)])
                .and_then([change, bump_lineage()]);
            if self.txn(txn).await? {
                return Ok(read);
            }
        }
        Err(MetaError::Conflict(name.to_string()))
    }

    /// Removes what nothing reads any more: hidden snapshots no clone reads
    /// through, then retired volumes no snapshot holds a cut of (tombstoned:
    /// their nodes give the space back). Returns the volumes buried.
    pub async fn collect_garbage(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let mut buried = Vec::new();
        for _ in 0..100 {
            let (lineage, volumes, retired, snapshots) = self.lineage_view().await?;
            let read = referenced_snapshots(&volumes, &retired, &snapshots);
            let mut ops: Vec<TxnOp> = snapshots
                .iter()
                .filter(|s| s.deleted && !read.contains(&s.name))
                .map(|s| TxnOp::delete(format!("{SNAPSHOTS}{}", s.name), None))
                .collect();
            let mut burying = Vec::new();
            if ops.is_empty() {
                for v in &retired {
                    if !snapshots.iter().any(|s| s.volume_id == v.id) {
                        ops.push(TxnOp::delete(format!("{RETIRED}{:016x}", v.id), None));
                        ops.push(TxnOp::put(format!("{DELETED}{:016x}", v.id), "", None));
                        burying.push(v.clone());
                    }
                }
            }
            if ops.is_empty() {
                return Ok(buried);
            }
            ops.push(bump_lineage());
            let txn = Txn::new()
                .when([Compare::mod_revision(LINEAGE, CompareOp::Equal, lineage)])
                .and_then(ops);
            if self.txn(txn).await? {
                buried.extend(burying);
            }
        }
        Err(MetaError::Conflict("lineage".into()))
    }

    /// Records the outcome of a snapshot asked of a writer that failed.
    pub async fn fail_snapshot_request(
        &self,
        volume: &str,
        name: &str,
        why: &str,
    ) -> Result<(), MetaError> {
        let key = format!("{SNAPREQ}{volume}/{name}");
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(key, format!("error: {why}"), None)]);
        self.txn(txn).await?;
        Ok(())
    }

    /// The state of a snapshot request: `None` once gone, else its value
    /// (`pending`, or `error: ...`).
    pub async fn snapshot_request(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<Option<String>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(format!("{SNAPREQ}{volume}/{name}"), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Every volume record that nodes hold shards for: live ones, and
    /// retired ones (`true`), with the revision each was last changed at.
    pub async fn volume_records(&self) -> Result<Vec<(VolumeRecord, i64, bool)>, MetaError> {
        let mut out = Vec::new();
        for (prefix, retired) in [(VOLUMES, false), (RETIRED, true)] {
            let resp = self
                .client
                .clone()
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| self.err(e))?;
            for kv in resp.kvs() {
                out.push((decode(kv.key(), kv.value())?, kv.mod_revision(), retired));
            }
        }
        Ok(out)
    }

    /// Replaces a live or retired volume record if it has not changed since
    /// `revision` (repair's new placements).
    pub async fn update_record(
        &self,
        record: &VolumeRecord,
        revision: i64,
        retired: bool,
    ) -> Result<(), MetaError> {
        if !retired {
            return self.update_volume(record, revision).await;
        }
        let key = format!("{RETIRED}{:016x}", record.id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, encode(record), None)]);
        if self.txn(txn).await? {
            Ok(())
        } else {
            Err(MetaError::Conflict(record.name.clone()))
        }
    }

    /// Becomes (or stays) the repairer under `lease`; whether this node is.
    pub async fn campaign_repairer(&self, me: &str, lease: i64) -> Result<bool, MetaError> {
        let txn = Txn::new()
            .when([Compare::version(REPAIRER, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                REPAIRER,
                me,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if self.txn(txn).await? {
            return Ok(true);
        }
        let resp = self
            .client
            .clone()
            .get(REPAIRER, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == me.as_bytes() && kv.lease() == lease))
    }

    pub async fn put_repair_status(&self, status: &RepairStatus) -> Result<(), MetaError> {
        self.client
            .clone()
            .put(REPAIR_STATUS, encode(status), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn repair_status(&self) -> Result<Option<RepairStatus>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(REPAIR_STATUS, None)
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Ids of deleted volumes.
    pub async fn deleted_volumes(&self) -> Result<Vec<u64>, MetaError> {
        let resp = self
            .client
            .clone()
            .get(
                DELETED,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| std::str::from_utf8(&kv.key()[DELETED.len()..]).ok())
            .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
            .collect())
    }

    /// A lease of `ttl` seconds, kept alive by a task until the returned
    /// guard is dropped (or the process dies, when it expires).
    pub async fn keep_lease(&self, ttl: i64) -> Result<LeaseGuard, MetaError> {
        let mut client = self.client.clone();
        let id = client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.err(e))?
            .id();
        let task = tokio::spawn(async move {
            let every = Duration::from_secs((ttl as u64 / 3).max(1));
            loop {
                match client.lease_keep_alive(id).await {
                    Ok((mut keeper, mut stream)) => loop {
                        if keeper.keep_alive().await.is_err() {
                            break;
                        }
                        match tokio::time::timeout(every, stream.message()).await {
                            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                            Ok(Ok(Some(_))) => {
                                tracing::error!(lease = id, "lease expired");
                                return;
                            }
                            _ => break,
                        }
                        tokio::time::sleep(every).await;
                    },
                    Err(etcd_client::Error::LeaseKeepAliveError(why)) => {
                        // Gone (it expired while the control plane was
                        // out of reach): it never comes back, and
                        // `LeaseGuard::expired` tells the holder to take
                        // a new one.
                        tracing::error!(lease = id, %why, "lease expired");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "lease keep-alive failed; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(LeaseGuard {
            id,
            task,
            client: self.client.clone(),
        })
    }
}

/// A lease kept alive until dropped; [`LeaseGuard::revoke`] ends it at once.
pub struct LeaseGuard {
    pub id: i64,
    task: tokio::task::JoinHandle<()>,
    client: Client,
}

impl LeaseGuard {
    /// Whether the keep-alive task gave up (the lease expired).
    pub fn expired(&self) -> bool {
        self.task.is_finished()
    }

    /// Revokes the lease (its keys vanish now, not at expiry).
    pub async fn revoke(mut self) {
        self.task.abort();
        let _ = self.client.lease_revoke(self.id).await;
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bump_lineage() -> TxnOp {
    TxnOp::put(LINEAGE, "", None)
}

/// Names of the snapshots some volume or snapshot reads through.
fn referenced_snapshots(
    volumes: &[VolumeRecord],
    retired: &[VolumeRecord],
    snapshots: &[SnapshotRecord],
) -> std::collections::HashSet<String> {
    volumes
        .iter()
        .chain(retired)
        .flat_map(|v| &v.bases)
        .chain(snapshots.iter().flat_map(|s| &s.bases))
        .map(|b| b.snapshot.clone())
        .collect()
}
