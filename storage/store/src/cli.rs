//! The admin verbs of `tessera-store`: volumes and nodes, as tables for
//! people and JSON (`-o json`) for scripts.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tessera_proto::store::store_client::StoreClient;
use tessera_proto::store::DropVolumeRequest;

use crate::codec::{Codec, BLOCK};
use crate::meta::{now_secs, Meta, NodeRecord, NodeStatus, VolumeRecord};
use crate::placement::place;

/// Default segment size: the unit of placement.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// Parses sizes as people write them: `10GiB`, `512MiB`, `4KiB`, `1G`
/// (binary units either way) or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("invalid size {text:?}: expected a number with an optional unit, such as 10GiB, 512MiB or 1048576"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: the number is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Parses durations as people write them: `500ms`, `30s`, `5m`, `2h`,
/// `1d`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a number with a unit, such as 30s, 5m or 1h")
    })?;
    let millis = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(millis)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {text:?}: too long"))
}

/// `bytes` for people: the largest binary unit that keeps it whole-ish.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Volume names: what Kubernetes names allow (letters, digits, `.-_`).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 253 {
        bail!("invalid volume name {name:?}: 1 to 253 characters");
    }
    // Names are directory names on the nodes that attach them.
    if name == "." || name == ".." {
        bail!("invalid volume name {name:?}");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("invalid volume name {name:?}: only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// What `volume create` asks for.
pub struct CreateRequest {
    pub name: String,
    pub size: u64,
    pub data_shards: u32,
    pub parity_shards: u32,
    pub write_quorum: Option<u32>,
    pub segment_size: u64,
}

/// Creates a volume: placement over the live nodes, then the record.
pub async fn create_volume(meta: &Meta, req: &CreateRequest) -> anyhow::Result<VolumeRecord> {
    check_name(&req.name)?;
    if req.size == 0 {
        bail!("invalid size 0: a volume needs at least one 4 KiB block");
    }
    let (k, m) = (req.data_shards as usize, req.parity_shards as usize);
    Codec::new(k, m).map_err(|e| anyhow::anyhow!("--data-shards/--parity-shards: {e}"))?;
    let quorum = req.write_quorum.unwrap_or(req.data_shards + 1);
    if quorum < req.data_shards || quorum > req.data_shards + req.parity_shards {
        bail!(
            "invalid --write-quorum {quorum}: between {} (k) and {} (k+m)",
            req.data_shards,
            req.data_shards + req.parity_shards
        );
    }
    if req.segment_size == 0
        || !req.segment_size.is_multiple_of(BLOCK as u64)
        || req.segment_size > 1 << 30
    {
        bail!(
            "invalid --segment-size {}: a multiple of 4 KiB, at most 1 GiB",
            req.segment_size
        );
    }
    let size = req.size.div_ceil(BLOCK as u64) * BLOCK as u64;
    let segments = size.div_ceil(req.segment_size) as usize;
    // Placement keeps every segment's node list in the volume's record.
    if segments > 65_536 {
        bail!(
            "a volume of {} in segments of {} has too many segments; use a larger --segment-size",
            format_size(size),
            format_size(req.segment_size)
        );
    }
    if meta.volume(&req.name).await?.is_some() {
        bail!("volume {:?} already exists", req.name);
    }
    let id: u64 = rand::random::<u64>() | 1;
    let (nodes, placement) = placement_for(meta, id, segments, k, m, size).await?;
    let record = VolumeRecord {
        name: req.name.clone(),
        id,
        size,
        data_shards: req.data_shards,
        parity_shards: req.parity_shards,
        write_quorum: quorum,
        segment_size: req.segment_size,
        epoch: 0,
        created: now_secs(),
        nodes,
        segments: placement,
        bases: Vec::new(),
        rebuilding: Vec::new(),
        closed_epoch: 0,
    };
    meta.create_volume(&record).await?;
    Ok(record)
}

/// Raw space a volume of `size` bytes takes with a k+m code, when full.
fn raw_size(size: u64, k: usize, m: usize) -> u64 {
    (u128::from(size) * (k + m) as u128 / k as u128).min(u128::from(u64::MAX)) as u64
}

/// Checks that the live nodes offer room for `size` bytes more of a k+m
/// volume (volumes are thin: this is what it takes once written).
fn check_capacity(
    alive: &[NodeRecord],
    size: u64,
    k: usize,
    m: usize,
    what: &str,
) -> anyhow::Result<()> {
    let raw = raw_size(size, k, m);
    let free: u64 = alive
        .iter()
        .map(|n| n.capacity.saturating_sub(n.used))
        .sum();
    if raw > free {
        bail!(NoRoom(format!(
            "{what} needs {} of raw space with a {k}+{m} code; the live storage nodes have {} free",
            format_size(raw),
            format_size(free)
        )));
    }
    Ok(())
}

/// The live storage nodes lack the room asked for (a typed error, so
/// callers such as the CSI driver can answer it as exhausted resources).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoRoom(pub String);

/// The live nodes, and the placement of `segments` segments of volume
/// `id` over them: the nodes it names, and each segment's shards as
/// indices into them.
pub async fn placement_for(
    meta: &Meta,
    id: u64,
    segments: usize,
    k: usize,
    m: usize,
    size: u64,
) -> anyhow::Result<(Vec<String>, Vec<Vec<u16>>)> {
    let alive: Vec<NodeRecord> = meta
        .nodes()
        .await?
        .into_iter()
        .filter(|n| n.alive && !n.draining)
        .map(|n| n.record)
        .collect();
    check_capacity(
        &alive,
        size,
        k,
        m,
        &format!("a volume of {}", format_size(size)),
    )?;
    let placement = place(&alive, id, segments, k, m)?;
    let mut used: Vec<usize> = placement.iter().flatten().map(|&i| i as usize).collect();
    used.sort_unstable();
    used.dedup();
    let renumber: HashMap<usize, u16> = used
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new as u16))
        .collect();
    Ok((
        used.iter().map(|&i| alive[i].name.clone()).collect(),
        placement
            .iter()
            .map(|seg| seg.iter().map(|i| renumber[&(*i as usize)]).collect())
            .collect(),
    ))
}

/// `volume expand NAME --size SIZE`: new segments placed for the added
/// space; an attached volume's writer picks them up and grows its device.
/// Returns the old and new record.
pub async fn expand_volume(
    meta: &Meta,
    name: &str,
    size: u64,
) -> anyhow::Result<(u64, VolumeRecord)> {
    for _ in 0..20 {
        let (mut record, revision) = meta
            .volume(name)
            .await?
            .with_context(|| format!("no volume named {name:?}"))?;
        let old = record.size;
        let new = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if new < old {
            bail!(
                "cannot shrink volume {name:?} from {} to {}: volumes only grow",
                format_size(old),
                format_size(new)
            );
        }
        if new == old {
            return Ok((old, record));
        }
        let segments = new.div_ceil(record.segment_size) as usize;
        if segments > 65_536 {
            bail!(
                "cannot expand volume {name:?} to {}: too many segments of {}",
                format_size(new),
                format_size(record.segment_size)
            );
        }
        let (k, m) = (record.data_shards as usize, record.parity_shards as usize);
        let alive: Vec<NodeRecord> = meta
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.alive && !n.draining)
            .map(|n| n.record)
            .collect();
        check_capacity(
            &alive,
            new - old,
            k,
            m,
            &format!("expanding volume {name:?} by {}", format_size(new - old)),
        )?;
        // Segments already placed keep their nodes; the new ones are placed
        // as creation would have.
        let placement = place(&alive, record.id, segments, k, m)?;
        for seg in &placement[record.segments.len()..] {
            let mut shards = Vec::with_capacity(seg.len());
            for &i in seg {
                let node = &alive[i as usize].name;
                let index = match record.nodes.iter().position(|n| n == node) {
                    Some(at) => at,
                    None => {
                        record.nodes.push(node.clone());
                        record.nodes.len() - 1
                    }
                };
                shards.push(index as u16);
            }
            record.segments.push(shards);
        }
        record.size = new;
        match meta.update_volume(&record, revision).await {
            Ok(()) => return Ok((old, record)),
            Err(crate::meta::MetaError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("volume {name:?} kept changing while it was being expanded; try again")
}

/// After an expansion of an attached volume: waits until its writer has
/// grown the device; returns the device (`None` when not attached).
pub async fn wait_for_device_size(
    meta: &Meta,
    name: &str,
    size: u64,
) -> anyhow::Result<Option<String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let Some(attached) = meta.attached(name).await? else {
            return Ok(None);
        };
        if attached.size >= size {
            return Ok(Some(attached.device));
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "volume {name:?} grew, but its writer (process {} on {}) has not grown {} within 30 s; see its attach.log",
                attached.pid,
                attached.host,
                attached.device
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `node drain NAME`: refused when the nodes left could not hold every
/// shard of a volume on it (fewer than its k+m live, undrained nodes).
pub async fn drain_node(meta: &Meta, name: &str) -> anyhow::Result<()> {
    let nodes = meta.nodes().await?;
    let Some(node) = nodes.iter().find(|n| n.record.name == name) else {
        bail!("no node named {name:?}");
    };
    if node.draining {
        return Ok(());
    }
    let left = nodes
        .iter()
        .filter(|n| n.alive && !n.draining && n.record.name != name)
        .count();
    for (record, _, _) in meta.volume_records().await? {
        let on_it = (0..record.segments.len()).any(|s| record.placement(s).contains(&name));
        if on_it && left < record.shards() {
            bail!(
                "volume {:?} ({}+{}) has shards on {name:?}, and only {left} other live, undrained nodes would be left for its {} shards per segment",
                record.name,
                record.data_shards,
                record.parity_shards,
                record.shards()
            );
        }
    }
    meta.set_draining(name).await?;
    Ok(())
}

/// `node scrub NAME`: a scrub pass on the node, now.
pub async fn scrub_node(
    meta: &Meta,
    name: &str,
) -> anyhow::Result<tessera_proto::store::ScrubReply> {
    let node = meta
        .node(name)
        .await?
        .with_context(|| format!("no node named {name:?}"))?;
    if !node.alive {
        bail!("node {name:?} is not running");
    }
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", node.record.address))?
            .connect_timeout(Duration::from_secs(3));
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach node {name:?} at {}", node.record.address))?;
    let reply = StoreClient::new(channel)
        .scrub(tessera_proto::store::ScrubRequest {})
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    Ok(reply.into_inner())
}

/// How repair stands, for `repair status`.
#[derive(Debug, Serialize)]
pub struct RepairReport {
    /// `healthy`, `degraded` (a node is gone, its shards not yet moved) or
    /// `repairing`.
    pub state: String,
    pub segments_healthy: usize,
    pub segments_degraded: usize,
    pub segments_in_repair: usize,
    pub bytes_left: u64,
    /// Bytes a second.
    pub rate: u64,
    pub eta_seconds: Option<u64>,
    pub repairer: Option<String>,
    /// Seconds since the repairer last reported.
    pub reported_ago: Option<u64>,
}

pub async fn repair_status(meta: &Meta) -> anyhow::Result<RepairReport> {
    let nodes = meta.nodes().await?;
    let usable: HashSet<&str> = nodes
        .iter()
        .filter(|n| n.alive && !n.draining)
        .map(|n| n.record.name.as_str())
        .collect();
    let (mut healthy, mut degraded, mut in_repair) = (0, 0, 0);
    for (record, _, _) in meta.volume_records().await? {
        for s in 0..record.segments.len() {
            if record.rebuilding.iter().any(|&(rs, _)| rs as usize == s) {
                in_repair += 1;
            } else if record.placement(s).iter().all(|n| usable.contains(n)) {
                healthy += 1;
            } else {
                degraded += 1;
            }
        }
    }
    let status = meta.repair_status().await?;
    let (bytes_left, rate) = status.as_ref().map_or((0, 0), |s| (s.bytes_left, s.rate));
    let state = if in_repair > 0 {
        "repairing"
    } else if degraded > 0 {
        "degraded"
    } else {
        "healthy"
    };
    Ok(RepairReport {
        state: state.into(),
        segments_healthy: healthy,
        segments_degraded: degraded,
        segments_in_repair: in_repair,
        bytes_left: if in_repair > 0 { bytes_left } else { 0 },
        rate,
        eta_seconds: (in_repair > 0 && rate > 0).then(|| bytes_left / rate),
        repairer: status.as_ref().map(|s| s.repairer.clone()),
        reported_ago: status.map(|s| now_secs().saturating_sub(s.updated)),
    })
}

pub fn repair_text(r: &RepairReport) -> String {
    let mut out = String::new();
    for (k, v) in [
        ("State", r.state.clone()),
        (
            "Segments",
            format!(
                "{} healthy, {} degraded, {} in repair",
                r.segments_healthy, r.segments_degraded, r.segments_in_repair
            ),
        ),
        ("Left", format_size(r.bytes_left)),
        ("Rate", format!("{}/s", format_size(r.rate))),
        (
            "ETA",
            r.eta_seconds
                .map_or_else(|| "-".into(), |s| format!("{s} s")),
        ),
        (
            "Repairer",
            match (&r.repairer, r.reported_ago) {
                (Some(name), Some(ago)) => format!("{name} (reported {ago} s ago)"),
                _ => "none yet".into(),
            },
        ),
    ] {
        out.push_str(&format!("{k:<9} {v}\n"));
    }
    out
}

/// Seconds since the Unix epoch as `YYYY-MM-DD hh:mm:ss` UTC.
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Deletes a volume (refused while attached) and asks its nodes to give
/// the space back now; nodes that are down do it when they see the
/// control plane's tombstone. While snapshots read it, its data stays.
pub async fn delete_volume(meta: &Meta, name: &str) -> anyhow::Result<VolumeRecord> {
    let (record, retired) = meta.delete_volume(name).await?;
    if !retired {
        give_back(meta, &record).await?;
    }
    collect_garbage(meta).await?;
    Ok(record)
}

/// Removes what nothing reads any more (see [`Meta::collect_garbage`])
/// and has the nodes give its space back.
pub async fn collect_garbage(meta: &Meta) -> anyhow::Result<()> {
    for record in meta.collect_garbage().await? {
        give_back(meta, &record).await?;
    }
    Ok(())
}

/// Asks the nodes of a deleted volume to drop its shards now.
async fn give_back(meta: &Meta, record: &VolumeRecord) -> anyhow::Result<()> {
    let addresses: HashMap<String, String> = meta
        .nodes()
        .await?
        .into_iter()
        .map(|n| (n.record.name, n.record.address))
        .collect();
    for node in &record.nodes {
        let Some(address) = addresses.get(node) else {
            continue;
        };
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        else {
            continue;
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10));
        if let Ok(channel) = endpoint.connect().await {
            let _ = StoreClient::new(channel)
                .drop_volume(DropVolumeRequest { volume: record.id })
                .await;
        }
    }
    Ok(())
}

/// A volume's state for `volume info`.
#[derive(Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub data_shards: u32,
    pub parity_shards: u32,
    pub write_quorum: u32,
    pub segment_size: u64,
    pub epoch: u64,
    pub created: u64,
    pub health: String,
    pub attached: Option<crate::meta::AttachRecord>,
    pub segments: Vec<SegmentInfo>,
}

#[derive(Debug, Serialize)]
pub struct SegmentInfo {
    pub index: usize,
    pub nodes: Vec<String>,
    pub alive: usize,
    pub health: String,
}

/// How a segment stands with `alive` of its `n` nodes up.
fn segment_health(alive: usize, k: usize, quorum: usize, n: usize) -> &'static str {
    if alive == n {
        "healthy"
    } else if alive >= quorum {
        "degraded"
    } else if alive >= k {
        "read-only"
    } else {
        "unavailable"
    }
}

pub async fn volume_info(meta: &Meta, name: &str) -> anyhow::Result<VolumeInfo> {
    let (record, _) = meta
        .volume(name)
        .await?
        .with_context(|| format!("no volume named {name:?}"))?;
    let alive: HashSet<String> = meta
        .nodes()
        .await?
        .into_iter()
        .filter(|n| n.alive)
        .map(|n| n.record.name)
        .collect();
    let k = record.data_shards as usize;
    let n = record.shards();
    let quorum = record.write_quorum as usize;
    let segments: Vec<SegmentInfo> = (0..record.segments.len())
        .map(|s| {
            let nodes: Vec<String> = record.placement(s).into_iter().map(String::from).collect();
            let up = nodes.iter().filter(|n| alive.contains(*n)).count();
            SegmentInfo {
                index: s,
                alive: up,
                health: segment_health(up, k, quorum, n).into(),
                nodes,
            }
        })
        .collect();
    let worst = ["unavailable", "read-only", "degraded", "healthy"]
        .into_iter()
        .find(|h| segments.iter().any(|s| s.health == *h))
        .unwrap_or("healthy");
    Ok(VolumeInfo {
        name: record.name.clone(),
        id: format!("{:016x}", record.id),
        size: record.size,
        data_shards: record.data_shards,
        parity_shards: record.parity_shards,
        write_quorum: record.write_quorum,
        segment_size: record.segment_size,
        epoch: record.epoch,
        created: record.created,
        health: worst.into(),
        attached: meta.attached(name).await?,
        segments,
    })
}

/// Renders rows as a table with a header, columns padded to fit.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn nodes_table(nodes: &[NodeStatus]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.record.name.clone(),
                n.record.address.clone(),
                n.record.zone.clone(),
                if n.alive { "yes".into() } else { "no".into() },
                if n.draining {
                    "yes".into()
                } else {
                    "no".into()
                },
                format_size(n.record.capacity),
                format_size(n.record.used),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ADDRESS", "ZONE", "ALIVE", "DRAINING", "CAPACITY", "USED",
        ],
        &rows,
    )
}

#[derive(Serialize)]
pub struct NodeJson<'a> {
    name: &'a str,
    address: &'a str,
    zone: &'a str,
    alive: bool,
    draining: bool,
    capacity: u64,
    used: u64,
}

pub fn nodes_json(nodes: &[NodeStatus]) -> String {
    let list: Vec<NodeJson<'_>> = nodes
        .iter()
        .map(|n| NodeJson {
            name: &n.record.name,
            address: &n.record.address,
            zone: &n.record.zone,
            alive: n.alive,
            draining: n.draining,
            capacity: n.record.capacity,
            used: n.record.used,
        })
        .collect();
    serde_json::to_string_pretty(&list).unwrap_or_default()
}

pub fn info_text(info: &VolumeInfo) -> String {
    let mut out = String::new();
    let attached = match &info.attached {
        Some(a) => format!(
            "{} on {} (process {}, epoch {})",
            if a.device.is_empty() {
                "(starting)"
            } else {
                &a.device
            },
            a.host,
            a.pid,
            a.epoch
        ),
        None => "no".into(),
    };
    for (k, v) in [
        ("Name", info.name.clone()),
        ("ID", info.id.clone()),
        (
            "Size",
            format!("{} ({} bytes)", format_size(info.size), info.size),
        ),
        (
            "Code",
            format!(
                "{}+{} (write quorum {})",
                info.data_shards, info.parity_shards, info.write_quorum
            ),
        ),
        (
            "Segments",
            format!(
                "{} of {}",
                info.segments.len(),
                format_size(info.segment_size)
            ),
        ),
        ("Epoch", info.epoch.to_string()),
        ("Health", info.health.clone()),
        ("Attached", attached),
    ] {
        out.push_str(&format!("{k:<9} {v}\n"));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = info
        .segments
        .iter()
        .map(|s| {
            vec![
                s.index.to_string(),
                s.health.clone(),
                format!("{}/{}", s.alive, s.nodes.len()),
                s.nodes.join(" "),
            ]
        })
        .collect();
    out.push_str(&table(
        &["SEGMENT", "HEALTH", "ALIVE", "NODES (shard 0..)"],
        &rows,
    ));
    out
}

pub fn volumes_table(volumes: &[(VolumeRecord, Option<crate::meta::AttachRecord>)]) -> String {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|(v, a)| {
            vec![
                v.name.clone(),
                format_size(v.size),
                format!("{}+{}", v.data_shards, v.parity_shards),
                v.segments.len().to_string(),
                v.epoch.to_string(),
                a.as_ref()
                    .map_or_else(|| "-".into(), |a| format!("{}:{}", a.host, a.device)),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "CODE", "SEGMENTS", "EPOCH", "ATTACHED"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_people_write_them() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size(" 3 KiB "), Ok(3 << 10));
        assert!(parse_size("garbage").unwrap_err().contains("invalid size"));
        assert!(parse_size("12XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }

    #[test]
    fn durations_parse_like_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5 fortnights")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("soon")
            .unwrap_err()
            .contains("invalid duration"));
    }

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_796_458_440), "2026-12-05 08:14:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("pvc-1234.a_b").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(".").is_err() && check_name("..").is_err());
    }
}
