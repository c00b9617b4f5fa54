//! `csi-latency`: how long a pod waits for its volume, as kubelet and the
//! external-provisioner see it: CreateVolume, NodeStageVolume (attach,
//! mkfs, mount) and NodePublishVolume (bind mount), one volume after the
//! other, against a running CSI plugin (`tessera-csi --mode all`). Each
//! volume is unpublished, unstaged and deleted after it is measured.
//!
//! `bench/csi-latency.sh` starts the plugin and the cluster under it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hyper_util::rt::TokioIo;
use tessera_proto::csi::controller_client::ControllerClient;
use tessera_proto::csi::node_client::NodeClient;
use tessera_proto::csi::volume_capability::access_mode::Mode;
use tessera_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use tessera_proto::csi::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability,
};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser)]
#[command(
    name = "csi-latency",
    about = "CreateVolume → NodePublishVolume latency"
)]
struct Args {
    /// The plugin's unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// The plugin's --managed-dir: staging and target paths go under it.
    #[arg(long)]
    managed_dir: PathBuf,
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Volume size, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: i64,
    #[arg(long, default_value = "ext4")]
    fs_type: String,
}

async fn channel(socket: PathBuf) -> anyhow::Result<Channel> {
    Ok(Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?)
}

/// Milliseconds of each phase of one volume's way to a pod.
struct Timing {
    create: f64,
    stage: f64,
    publish: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let ch = channel(args.socket.clone())
        .await
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    let mut controller = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);
    let capability = VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: args.fs_type.clone(),
            ..Default::default()
        })),
    };
    let mut timings = Vec::new();
    for run in 0..args.runs {
        let name = format!("pvc-latency-{}-{run}", std::process::id());
        let staging = args.managed_dir.join("staging").join(&name);
        let target = args.managed_dir.join("pods").join(&name);
        // kubelet makes both parents (and the staging directory) first.
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(args.managed_dir.join("pods"))?;
        let start = Instant::now();
        let created = controller
            .create_volume(CreateVolumeRequest {
                name: name.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: args.size_mib << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability.clone()],
                parameters: HashMap::from([
                    ("dataShards".to_string(), "4".to_string()),
                    ("parityShards".to_string(), "2".to_string()),
                ]),
                ..Default::default()
            })
            .await
            .context("CreateVolume")?
            .into_inner();
        let create = ms(start);
        let id = created
            .volume
            .map(|v| v.volume_id)
            .context("CreateVolume answered no volume")?;
        let t = Instant::now();
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
            volume_capability: Some(capability.clone()),
            ..Default::default()
        })
        .await
        .context("NodeStageVolume")?;
        let stage = ms(t);
        let t = Instant::now();
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(capability.clone()),
            ..Default::default()
        })
        .await
        .context("NodePublishVolume")?;
        let publish = ms(t);
        eprintln!(
            "csi-latency: run {}: create {create:.0} ms, stage {stage:.0} ms, publish {publish:.0} ms, total {:.0} ms",
            run + 1,
            ms(start)
        );
        timings.push(Timing {
            create,
            stage,
            publish,
        });
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.to_string_lossy().into_owned(),
        })
        .await
        .context("NodeUnpublishVolume")?;
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
        })
        .await
        .context("NodeUnstageVolume")?;
        controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
            .context("DeleteVolume")?;
        // A pod does not come back for the same volume at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let column = |f: fn(&Timing) -> f64| timings.iter().map(f).collect::<Vec<f64>>();
    println!(
        "| phase ({} runs, {} MiB {}) | median ms | worst ms |\n|---|---|---|",
        args.runs, args.size_mib, args.fs_type
    );
    for (phase, values) in [
        ("CreateVolume", column(|t| t.create)),
        ("NodeStageVolume (attach, mkfs, mount)", column(|t| t.stage)),
        ("NodePublishVolume (bind mount)", column(|t| t.publish)),
        (
            "CreateVolume → NodePublishVolume",
            column(|t| t.create + t.stage + t.publish),
        ),
    ] {
        println!(
            "| {phase} | {:.0} | {:.0} |",
            median(values.clone()),
            worst(&values)
        );
    }
    Ok(())
}
