//! `/metrics` (Prometheus text) and `/health` of a storage node.

use std::fmt::Write;
use std::net::SocketAddr;

use anyhow::Context;
use axum::routing::get;
use axum::Router;

use crate::node::{log_counters, NodeConfig};
use crate::shardlog::ShardLog;

fn render(log: &ShardLog, config: &NodeConfig) -> String {
    let mut out = String::new();
    for (name, help, value) in log_counters(log) {
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
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    out
}

/// Serves `/metrics` and `/health` on `addr` until `stop` flips.
pub async fn serve(
    addr: SocketAddr,
    log: ShardLog,
    config: NodeConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let (log, config) = (log.clone(), config.clone());
                async move { render(&log, &config) }
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
