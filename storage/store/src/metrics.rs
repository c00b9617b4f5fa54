//! `/metrics` (Prometheus text) and `/health` of a storage node.

use std::fmt::Write;
use std::net::SocketAddr;

use anyhow::Context;
use axum::routing::get;
use axum::Router;

use crate::node::{log_counters, NodeConfig, NodeStats};
use crate::shardlog::ShardLog;

fn render(log: &ShardLog, config: &NodeConfig, stats: &NodeStats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let (scrub, repair) = (&stats.scrub, &stats.repair);
    let mut counters = log_counters(log);
    counters.extend([
        (
            "tessera_store_scrub_passes_total",
            "Scrub passes finished.",
            scrub.passes.load(Relaxed),
        ),
        (
            "tessera_store_scrub_blocks_checked_total",
            "4 KiB blocks read and verified by the scrubber.",
            scrub.blocks_checked.load(Relaxed),
        ),
        (
            "tessera_store_scrub_blocks_bad_total",
            "Blocks the scrubber found rotten.",
            scrub.blocks_bad.load(Relaxed),
        ),
        (
            "tessera_store_scrub_blocks_repaired_total",
            "Rotten blocks whose shards were rebuilt from the other shards.",
            scrub.blocks_repaired.load(Relaxed),
        ),
        (
            "tessera_store_scrub_blocks_unrepaired_total",
            "Rotten blocks whose shards could not be rebuilt.",
            scrub.blocks_unrepaired.load(Relaxed),
        ),
        (
            "tessera_store_repair_bytes_total",
            "Shard bytes rebuilt onto new nodes by this node as repairer.",
            repair.bytes.load(Relaxed),
        ),
        (
            "tessera_store_repair_shards_total",
            "Shards rebuilt onto new nodes by this node as repairer.",
            repair.shards.load(Relaxed),
        ),
    ]);
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let gauges = [
        (
            "tessera_store_used_bytes",
            "Bytes the node's shard log occupies on disk.",
            log.used_bytes(),
        ),
        (
            "tessera_store_capacity_bytes",
            "The node's advertised capacity.",
            config.capacity,
        ),
        (
            "tessera_store_volumes",
            "Volumes with shards on this node.",
            log.volumes().len() as u64,
        ),
        (
            "tessera_store_repairer",
            "1 if this node runs repair now.",
            u64::from(repair.leading.load(Relaxed)),
        ),
        (
            "tessera_store_repair_segments_degraded",
            "Segments with a shard on a lost node, not yet moved (as the repairer sees them).",
            repair.segments_degraded.load(Relaxed),
        ),
        (
            "tessera_store_repair_segments_in_repair",
            "Segments with a shard being rebuilt on a new node.",
            repair.segments_in_repair.load(Relaxed),
        ),
        (
            "tessera_store_repair_bytes_left",
            "Shard bytes still to rebuild, as the last repair pass counted them.",
            repair.bytes_left.load(Relaxed),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    log.stats().sync_seconds.render(
        &mut out,
        "tessera_store_sync_duration_seconds",
        "The latency distributions of the shard log's group commits (write and fdatasync).",
    );
    out
}

/// Serves `/metrics` and `/health` on `addr` until `stop` flips.
pub async fn serve(
    addr: SocketAddr,
    log: ShardLog,
    config: NodeConfig,
    stats: NodeStats,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let (log, config, stats) = (log.clone(), config.clone(), stats.clone());
                async move { render(&log, &config, &stats) }
            }),
        )
        .route("/health", get(|| async { "{\"health\":\"true\"}" }));
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        });
        if let Err(e) = served.await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
