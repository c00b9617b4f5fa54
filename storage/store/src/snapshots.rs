//! The admin verbs of snapshots and clones.
//!
//! A snapshot is a cut of a volume's stripes (see [`crate::volume`]). When
//! a writer has the volume open (it is attached), only that writer knows
//! what it has not yet flushed, so the snapshot is asked of it through the
//! control plane (`snapreq/<volume>/<name>`) and taken between two of its
//! writes; otherwise the volume's stripes are all there is, and the cut is
//! everything up to its last writer's epoch, recorded in one transaction
//! that fails if a writer attaches meanwhile. That last writer must have
//! closed the volume cleanly; if it did not, it is fenced first
//! ([`fence_unclosed_writer`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cli::{check_name, format_size, placement_for, table};
use crate::meta::{now_secs, Base, Meta, MetaError, SnapshotRecord, VolumeRecord};
use crate::volume::{Volume, VolumeError, VolumeOptions};

/// How long `snapshot create` waits for an attached volume's writer.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// `snapshot create VOLUME NAME`.
pub async fn create_snapshot(
    meta: &Meta,
    volume: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<SnapshotRecord> {
    check_name(name).context("invalid snapshot name")?;
    let deadline = Instant::now() + timeout;
    loop {
        let (record, revision) = meta
            .volume(volume)
            .await?
            .with_context(|| format!("no volume named {volume:?}"))?;
        if meta.snapshot(name).await?.is_some() {
            bail!(MetaError::SnapshotExists(name.to_string()));
        }
        if let Some(writer) = meta.attached(volume).await? {
            match ask_writer(meta, volume, name, deadline).await? {
                Some(snap) => return Ok(snap),
                None if Instant::now() < deadline => continue, // It detached.
                None => bail!(
                    "the writer of volume {volume:?} (process {} on {}) did not take snapshot {name:?} within {timeout:?}",
                    writer.pid,
                    writer.host
                ),
            }
        }
        if record.closed_epoch != record.epoch {
            if Instant::now() >= deadline {
                bail!("volume {volume:?} kept changing while its last writer was fenced for snapshot {name:?}");
            }
            fence_unclosed_writer(meta, volume, deadline).await?;
            continue;
        }
        let snap = SnapshotRecord {
            name: name.to_string(),
            volume: volume.to_string(),
            volume_id: record.id,
            // No writer: every stripe there is, of every epoch so far.
            cut: (record.epoch, u64::MAX),
            size: record.size,
            created: now_secs(),
            bases: record.bases.clone(),
            deleted: false,
        };
        match meta.create_detached_snapshot(&snap, revision).await {
            Ok(()) => return Ok(snap),
            Err(MetaError::Conflict(_)) if Instant::now() < deadline => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The volume's last writer did not close it cleanly: it crashed, or its
/// attach record expired while it was cut off from the control plane and
/// it still writes to the nodes. A cut at its epoch would then take in
/// what it writes later, and it would discard stripes the snapshot needs,
/// not knowing of it. So the volume is opened and closed here as a writer
/// of its own (a new epoch, the nodes fenced, unreadable stripes dropped)
/// and that epoch recorded as closed: the cut is then final.
async fn fence_unclosed_writer(meta: &Meta, volume: &str, deadline: Instant) -> anyhow::Result<()> {
    tracing::info!(
        volume,
        "the last writer did not close the volume: fencing it"
    );
    let left = deadline.saturating_duration_since(Instant::now());
    let fence = async {
        let opened = Volume::open_unattached(meta, volume, VolumeOptions::default()).await?;
        opened.close().await?;
        meta.mark_closed(volume, opened.epoch()).await?;
        Ok::<_, VolumeError>(())
    };
    let why = match tokio::time::timeout(left, fence).await {
        Ok(Ok(())) => return Ok(()),
        // A writer attached, or another fencer bumped past this one: the
        // caller looks again, after giving that one time to finish (two
        // fencers bumping at once would cut each other off for good).
        Ok(Err(VolumeError::Fenced(_) | VolumeError::Meta(MetaError::Conflict(_)))) => {
            let pause = Duration::from_millis(500 + rand::random::<u64>() % 1000);
            tokio::time::sleep(pause.min(left)).await;
            return Ok(());
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("not done within {} s", left.as_secs()),
    };
    bail!("volume {volume:?} was not detached cleanly and its last writer cannot be fenced: {why}")
}

/// Asks the attached writer of `volume` for snapshot `name` and waits for
/// it. `None`: the writer went away without answering.
async fn ask_writer(
    meta: &Meta,
    volume: &str,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<Option<SnapshotRecord>> {
    meta.request_snapshot(volume, name).await?;
    // The writer answers within milliseconds (it watches requests): look
    // soon, then back off.
    let mut wait = Duration::from_millis(2);
    let outcome = loop {
        if let Some(snap) = meta.snapshot(name).await? {
            break Ok(Some(snap));
        }
        match meta.snapshot_request(volume, name).await? {
            Some(state) if state.starts_with("error: ") => {
                break Err(anyhow::anyhow!(
                    "the writer of volume {volume:?} could not take snapshot {name:?}: {}",
                    &state["error: ".len()..]
                ))
            }
            _ => {}
        }
        if meta.attached(volume).await?.is_none() || Instant::now() >= deadline {
            break Ok(None);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    };
    meta.clear_snapshot_request(volume, name).await?;
    outcome
}

/// Where a clone's content comes from.
pub enum CloneSource {
    Snapshot(String),
    Volume(String),
}

/// `volume create NAME --from-snapshot SNAP | --from-volume VOL`: a new
/// volume reading through the snapshot (nothing copied); from a volume,
/// through a hidden snapshot taken now.
pub async fn create_clone(
    meta: &Meta,
    name: &str,
    source: CloneSource,
    size: Option<u64>,
) -> anyhow::Result<VolumeRecord> {
    check_name(name)?;
    if meta.volume(name).await?.is_some() {
        bail!(MetaError::VolumeExists(name.to_string()));
    }
    let (snapshot, hidden) = match source {
        CloneSource::Snapshot(s) => {
            if meta.snapshot(&s).await?.is_none_or(|r| r.deleted) {
                bail!(MetaError::NoSuchSnapshot(s));
            }
            (s, false)
        }
        CloneSource::Volume(v) => {
            if meta.volume(&v).await?.is_none() {
                bail!("no volume named {v:?}");
            }
            let hidden = format!("{name}.source-{:08x}", rand::random::<u32>());
            create_snapshot(meta, &v, &hidden, SNAPSHOT_TIMEOUT).await?;
            (hidden, true)
        }
    };
    let created = clone_from(meta, name, &snapshot, size).await;
    if hidden {
        // Kept, out of sight, while the clone reads through it; gone at
        // once if the clone could not be created.
        meta.delete_snapshot(&snapshot).await?;
        crate::cli::collect_garbage(meta).await?;
    }
    created
}

async fn clone_from(
    meta: &Meta,
    name: &str,
    snapshot: &str,
    size: Option<u64>,
) -> anyhow::Result<VolumeRecord> {
    for _ in 0..20 {
        let lineage = meta.lineage_revision().await?;
        let snap = meta
            .snapshot(snapshot)
            .await?
            .filter(|s| !s.deleted)
            .ok_or_else(|| MetaError::NoSuchSnapshot(snapshot.to_string()))?;
        let source = meta
            .volume_by_id(snap.volume_id)
            .await?
            .with_context(|| format!("the volume snapshot {snapshot:?} was taken of is gone"))?;
        let size = match size {
            Some(s) if s < snap.size => bail!(
                "--size {} is smaller than snapshot {snapshot:?} ({})",
                format_size(s),
                format_size(snap.size)
            ),
            Some(s) => s.div_ceil(crate::codec::BLOCK as u64) * crate::codec::BLOCK as u64,
            None => snap.size,
        };
        let id: u64 = rand::random::<u64>() | 1;
        let segments = size.div_ceil(source.segment_size) as usize;
        let k = source.data_shards as usize;
        let m = source.parity_shards as usize;
        let (nodes, placement) = placement_for(meta, id, segments, k, m, size).await?;
        let mut bases = vec![Base {
            volume_id: snap.volume_id,
            cut: snap.cut,
            snapshot: snap.name.clone(),
        }];
        bases.extend(snap.bases.iter().cloned());
        let record = VolumeRecord {
            name: name.to_string(),
            id,
            size,
            data_shards: source.data_shards,
            parity_shards: source.parity_shards,
            write_quorum: source.write_quorum,
            segment_size: source.segment_size,
            epoch: 0,
            created: now_secs(),
            nodes,
            segments: placement,
            bases,
            rebuilding: Vec::new(),
            closed_epoch: 0,
        };
        match meta.create_clone(&record, snapshot, lineage).await {
            Ok(()) => return Ok(record),
            Err(MetaError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!(MetaError::Conflict(name.to_string()))
}

/// `snapshot delete NAME`: gone for its user; the stripes only it kept are
/// given back once no clone reads through it.
pub async fn delete_snapshot(meta: &Meta, name: &str) -> anyhow::Result<bool> {
    let kept = meta.delete_snapshot(name).await?;
    crate::cli::collect_garbage(meta).await?;
    Ok(kept)
}

/// A snapshot as `snapshot list` and `snapshot info` show it.
#[derive(Debug, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The volume it was taken of (its name then).
    pub source: String,
    pub source_id: String,
    pub size: u64,
    pub created: u64,
    pub cut: String,
    /// Whether its source volume still exists (a deleted one's data is
    /// kept for the snapshot).
    pub source_exists: bool,
    /// Volumes and snapshots it reads through, nearest first.
    pub bases: Vec<String>,
}

pub async fn snapshot_infos(
    meta: &Meta,
    volume: Option<&str>,
) -> anyhow::Result<Vec<SnapshotInfo>> {
    let live: std::collections::HashSet<u64> = meta.volumes().await?.iter().map(|v| v.id).collect();
    let mut out: Vec<SnapshotInfo> = meta
        .snapshots()
        .await?
        .into_iter()
        .filter(|s| !s.deleted && volume.is_none_or(|v| s.volume == v))
        .map(|s| SnapshotInfo {
            source_exists: live.contains(&s.volume_id),
            source_id: format!("{:016x}", s.volume_id),
            cut: if s.cut.1 == u64::MAX {
                format!("{}/*", s.cut.0)
            } else {
                format!("{}/{}", s.cut.0, s.cut.1)
            },
            bases: s.bases.iter().map(|b| b.snapshot.clone()).collect(),
            name: s.name,
            source: s.volume,
            size: s.size,
            created: s.created,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn snapshots_table(list: &[SnapshotInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                if s.source_exists {
                    s.source.clone()
                } else {
                    format!("{} (deleted)", s.source)
                },
                format_size(s.size),
                crate::cli::format_time(s.created),
            ]
        })
        .collect();
    table(&["NAME", "SOURCE", "SIZE", "CREATED"], &rows)
}

pub fn snapshot_text(s: &SnapshotInfo) -> String {
    let mut out = String::new();
    for (k, v) in [
        ("Name", s.name.clone()),
        (
            "Source",
            format!(
                "{} ({}){}",
                s.source,
                s.source_id,
                if s.source_exists { "" } else { ", deleted" }
            ),
        ),
        (
            "Size",
            format!("{} ({} bytes)", format_size(s.size), s.size),
        ),
        ("Created", crate::cli::format_time(s.created)),
        ("Cut", s.cut.clone()),
        (
            "Reads via",
            if s.bases.is_empty() {
                "-".into()
            } else {
                s.bases.join(", ")
            },
        ),
    ] {
        out.push_str(&format!("{k:<10} {v}\n"));
    }
    out
}
