//! Every pair of lost nodes, quickly: six storage nodes in this process (the
//! real node code on real files and sockets), a real control plane, and the
//! volume client's API instead of a block device.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{free_port, ControlPlaneKind};
use tessera_store::cli::{create_volume, CreateRequest};
use tessera_store::meta::Meta;
use tessera_store::node::{serve, NodeConfig};
use tessera_store::shardlog::LogOptions;
use tessera_store::volume::{Volume, VolumeOptions};
use tokio::sync::oneshot;

struct InProcessNode {
    config: NodeConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessNode {
    fn start(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        let config = self.config.clone();
        self.task = Some(tokio::spawn(serve(config, async move {
            let _ = rx.await;
        })));
        self.stop = Some(tx);
    }

    /// A node serves only after it has dropped the shards it no longer
    /// holds a placement for: wait until its port answers.
    async fn wait_serving(&self) {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(self.config.listen)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{} does not serve", self.config.name);
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_lost_nodes_is_survivable() {
    // The control plane is a real process; the cluster's own nodes stay unused.
    let c = common::Cluster::start(ControlPlaneKind::Tessera, 0);
    let endpoints = vec![c.endpoints()];
    let mut nodes: Vec<InProcessNode> = (0..6)
        .map(|i| InProcessNode {
            config: NodeConfig {
                name: format!("p{i}"),
                data_dir: c.dir.path().join(format!("p{i}")),
                listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
                advertise: String::new(),
                zone: format!("z{}", i % 3),
                capacity: 1 << 30,
                endpoints: endpoints.clone(),
                metrics_listen: None,
                log: LogOptions::default(),
                repair: tessera_store::repair::RepairOptions::default(),
                scrub_rate: 0,
                scrub_interval: Duration::from_secs(3600),
            },
            stop: None,
            task: None,
        })
        .collect();
    for n in &mut nodes {
        n.config.advertise = n.config.listen.to_string();
        n.start();
    }
    let meta = Meta::connect(&endpoints).await.unwrap();
    for _ in 0..100 {
        if meta
            .nodes()
            .await
            .unwrap()
            .iter()
            .filter(|n| n.alive)
            .count()
            == 6
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Small segments: eight placements over the six nodes.
    create_volume(
        &meta,
        &CreateRequest {
            name: "pairs".into(),
            size: 8 << 20,
            data_shards: 4,
            parity_shards: 2,
            write_quorum: None,
            segment_size: 1 << 20,
        },
    )
    .await
    .unwrap();
    let writer = Volume::open(&meta, "pairs", VolumeOptions::default())
        .await
        .unwrap();
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    // Several writes of different sizes and offsets, then one flush.
    for (offset, len) in [
        (0usize, 3 << 20),
        (3 << 20, 4096 * 3),
        (5 << 20, 3 << 20),
        (3 << 20, 2 << 20),
    ] {
        writer
            .write(offset as u64, &data[offset..offset + len])
            .await
            .unwrap();
    }
    writer.flush().await.unwrap();
    // Every shard on every node before any node is lost.
    for _ in 0..200 {
        if writer.pending_bytes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(writer.pending_bytes(), 0, "shards still being written");
    writer.close().await.unwrap();

    for a in 0..6 {
        for b in a + 1..6 {
            nodes[a].stop().await;
            nodes[b].stop().await;
            let reader = Volume::open_read_only(&meta, "pairs", VolumeOptions::default())
                .await
                .unwrap_or_else(|e| panic!("open with p{a} and p{b} down: {e}"));
            let back = reader
                .read(0, 8 << 20)
                .await
                .unwrap_or_else(|e| panic!("read with p{a} and p{b} down: {e}"));
            assert!(back == data, "wrong bytes with p{a} and p{b} down");
            assert!(
                reader
                    .stats()
                    .degraded_reads
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
            );
            nodes[a].start();
            nodes[b].start();
            nodes[a].wait_serving().await;
            nodes[b].wait_serving().await;
        }
    }
    for n in &mut nodes {
        n.stop().await;
    }
}
