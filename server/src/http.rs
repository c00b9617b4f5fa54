//! Plain HTTP endpoints on the client port: `/health`, `/version`, `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tessera_proto::etcdserverpb::AlarmType;

use crate::config::{ETCD_CLUSTER_VERSION, ETCD_VERSION};
use crate::node::Node;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .with_state(node)
}

fn json(status: StatusCode, body: String) -> impl IntoResponse {
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

/// etcd's health check: a leader, no alarm, and a linearizable read works.
async fn health(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let reason = if node.leader().is_none() {
        Some("RAFT NO LEADER".to_string())
    } else if let Some(a) = node.alarms.list(AlarmType::None).first() {
        Some(format!(
            "ALARM {}",
            AlarmType::try_from(a.alarm).map_or("UNKNOWN", |t| t.as_str_name())
        ))
    } else if node.read_barrier().await.is_err() {
        Some("QGET ERROR".to_string())
    } else {
        None
    };
    match reason {
        None => json(
            StatusCode::OK,
            r#"{"health":"true","reason":""}"#.to_string(),
        ),
        Some(r) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(r#"{{"health":"false","reason":"{r}"}}"#),
        ),
    }
}

async fn version() -> impl IntoResponse {
    json(
        StatusCode::OK,
        format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{ETCD_CLUSTER_VERSION}"}}"#),
    )
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.render_metrics(),
    )
}
