//! etcd's JSON gateway on the client port: `POST /v3/...` with the request
//! message as JSON (protobuf's JSON mapping with the original field names:
//! bytes in base64, 64-bit integers as strings), answered by the same
//! services as gRPC. Streaming calls (watch, lease keep-alive, election
//! observe, snapshot) take newline-separated JSON messages and answer with
//! one `{"result": ...}` object per line, as grpc-gateway does.

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Router;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tessera_proto::etcdserverpb::cluster_server::Cluster;
use tessera_proto::etcdserverpb::maintenance_server::Maintenance;
use tessera_proto::v3electionpb::election_server::Election;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Code, Status};

use crate::service::cluster::ClusterService;
use crate::service::election::ElectionService;
use crate::service::kv::KvService;
use crate::service::lease::LeaseService;
use crate::service::lock::LockService;
use crate::service::maintenance::MaintenanceService;
use crate::service::recipes::Recipes;
use crate::service::watch;

/// grpc-gateway's HTTP status for a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// grpc-gateway's error body, fields in its order.
fn error_response(status: &Status) -> Response {
    let msg = serde_json::to_string(status.message()).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        r#"{{"error":{msg},"message":{msg},"code":{}}}"#,
        status.code() as i32
    );
    json_response(http_status(status.code()), body.into_bytes())
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(msg).map_err(|e| Status::internal(format!("cannot encode JSON: {e}")))
}

/// An empty body is the empty message, as in grpc-gateway.
fn decode<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A unary call: JSON request in, JSON response (or error) out.
fn unary<S, Req, Resp, F, Fut>(service: S, call: F) -> MethodRouter
where
    S: Clone + Send + Sync + 'static,
    Req: DeserializeOwned + Default + Send + 'static,
    Resp: Serialize,
    F: Fn(S, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    post(move |body: Bytes| async move {
        let outcome = match decode::<Req>(&body) {
            Ok(req) => call(service, req).await.and_then(|r| encode(&r)),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => error_response(&e),
        }
    })
}

/// One line of a streamed answer.
fn stream_line<T: Serialize>(item: Result<T, Status>) -> Bytes {
    let mut line = match item.and_then(|m| encode(&m)) {
        Ok(json) => [br#"{"result":"#.as_slice(), &json, b"}"].concat(),
        Err(s) => {
            let msg = serde_json::to_string(s.message()).unwrap_or_default();
            format!(
                r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{msg},"http_status":{:?}}}}}"#,
                s.code() as i32,
                http_status(s.code()).as_u16(),
                http_status(s.code()).canonical_reason().unwrap_or(""),
            )
            .into_bytes()
        }
    };
    line.push(b'\n');
    Bytes::from(line)
}

fn streamed<T: Serialize + Send + 'static>(
    messages: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> Response {
    let lines = messages.map(|m| Ok::<_, std::convert::Infallible>(stream_line(m)));
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// A server-streaming call: one JSON request in, a `{"result":...}` line
/// per message out (or the error body if the call fails at once).
fn server_streaming<S, Req, T, F, Fut>(service: S, call: F) -> MethodRouter
where
    S: Clone + Send + Sync + 'static,
    Req: DeserializeOwned + Default + Send + 'static,
    T: Serialize + Send + 'static,
    F: Fn(S, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<BoxStream<T>, Status>> + Send,
{
    post(move |body: Bytes| async move {
        let stream = match decode::<Req>(&body) {
            Ok(req) => call(service, req).await,
            Err(e) => Err(e),
        };
        match stream {
            Ok(messages) => streamed(messages),
            Err(e) => error_response(&e),
        }
    })
}

/// The JSON messages in a streamed request body, decoded as they arrive.
fn json_messages<T: DeserializeOwned + Send + 'static>(
    body: Body,
) -> impl Stream<Item = Result<T, Status>> + Send + Unpin + 'static {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut chunks = body.into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let Ok(chunk) = chunk else { return };
            buf.extend_from_slice(&chunk);
            let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<T>();
            let mut consumed = 0;
            loop {
                match values.next() {
                    Some(Ok(v)) => {
                        consumed = values.byte_offset();
                        if tx.send(Ok(v)).await.is_err() {
                            return;
                        }
                    }
                    // An incomplete message: wait for more of the body.
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                        return;
                    }
                    None => {
                        consumed = buf.len();
                        break;
                    }
                }
            }
            buf.drain(..consumed);
        }
    });
    ReceiverStream::new(rx)
}

fn tonic_req<T>(msg: T) -> tonic::Request<T> {
    tonic::Request::new(msg)
}

/// A [`unary`] call through a service's tonic trait method.
macro_rules! via_trait {
    ($service:ident :: $method:ident) => {
        |s, r| async move {
            $service::$method(&s, tonic_req(r))
                .await
                .map(|r| r.into_inner())
        }
    };
}

fn kv_routes(kv: KvService) -> Router {
    Router::new()
        .route(
            "/v3/kv/range",
            unary(
                kv.clone(),
                |s: KvService, r| async move { s.do_range(r).await },
            ),
        )
        .route(
            "/v3/kv/put",
            unary(
                kv.clone(),
                |s: KvService, r| async move { s.do_put(r).await },
            ),
        )
        .route(
            "/v3/kv/deleterange",
            unary(kv.clone(), |s: KvService, r| async move {
                s.do_delete_range(r).await
            }),
        )
        .route(
            "/v3/kv/txn",
            unary(
                kv.clone(),
                |s: KvService, r| async move { s.do_txn(r).await },
            ),
        )
        .route(
            "/v3/kv/compaction",
            unary(kv, |s: KvService, r| async move { s.do_compact(r).await }),
        )
}

fn lease_routes(lease: LeaseService) -> Router {
    let grant = unary(lease.clone(), |s: LeaseService, r| async move {
        s.grant(r).await
    });
    let revoke = unary(lease.clone(), |s: LeaseService, r| async move {
        s.revoke(r).await
    });
    let ttl = unary(lease.clone(), |s: LeaseService, r| async move {
        s.time_to_live(r).await
    });
    let leases = unary(
        lease.clone(),
        |s: LeaseService, _: tessera_proto::etcdserverpb::LeaseLeasesRequest| async move {
            s.leases().await
        },
    );
    let keep_alive = post(move |body: Body| async move {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(lease.serve_keep_alive(json_messages(body), tx));
        streamed(ReceiverStream::new(rx))
    });
    Router::new()
        .route("/v3/lease/grant", grant)
        .route("/v3/lease/revoke", revoke.clone())
        .route("/v3/kv/lease/revoke", revoke)
        .route("/v3/lease/keepalive", keep_alive)
        .route("/v3/lease/timetolive", ttl.clone())
        .route("/v3/kv/lease/timetolive", ttl)
        .route("/v3/lease/leases", leases.clone())
        .route("/v3/kv/lease/leases", leases)
}

fn maintenance_routes(m: MaintenanceService) -> Router {
    let snapshot = server_streaming(m.clone(), via_trait!(Maintenance::snapshot));
    Router::new()
        .route(
            "/v3/maintenance/alarm",
            unary(m.clone(), via_trait!(Maintenance::alarm)),
        )
        .route(
            "/v3/maintenance/status",
            unary(m.clone(), via_trait!(Maintenance::status)),
        )
        .route(
            "/v3/maintenance/defragment",
            unary(m.clone(), via_trait!(Maintenance::defragment)),
        )
        // etcd maps both Hash and HashKV here; the gateway answers Hash.
        .route(
            "/v3/maintenance/hash",
            unary(m.clone(), via_trait!(Maintenance::hash)),
        )
        .route(
            "/v3/maintenance/transfer-leadership",
            unary(m, via_trait!(Maintenance::move_leader)),
        )
        .route("/v3/maintenance/snapshot", snapshot)
}

fn cluster_routes(c: ClusterService) -> Router {
    Router::new()
        .route(
            "/v3/cluster/member/add",
            unary(c.clone(), via_trait!(Cluster::member_add)),
        )
        .route(
            "/v3/cluster/member/remove",
            unary(c.clone(), via_trait!(Cluster::member_remove)),
        )
        .route(
            "/v3/cluster/member/update",
            unary(c.clone(), via_trait!(Cluster::member_update)),
        )
        .route(
            "/v3/cluster/member/list",
            unary(c.clone(), via_trait!(Cluster::member_list)),
        )
        .route(
            "/v3/cluster/member/promote",
            unary(c, via_trait!(Cluster::member_promote)),
        )
}

fn recipe_routes(recipes: Recipes) -> Router {
    let lock = LockService::new(recipes.clone());
    let election = ElectionService::new(recipes);
    type E = ElectionService;
    let observe = server_streaming(election.clone(), via_trait!(Election::observe));
    Router::new()
        .route(
            "/v3/lock/lock",
            unary(
                lock.clone(),
                |s: LockService, r| async move { s.lock(r).await },
            ),
        )
        .route(
            "/v3/lock/unlock",
            unary(lock, |s: LockService, r| async move { s.unlock(r).await }),
        )
        .route(
            "/v3/election/campaign",
            unary(
                election.clone(),
                |s: E, r| async move { s.campaign(r).await },
            ),
        )
        .route(
            "/v3/election/proclaim",
            unary(
                election.clone(),
                |s: E, r| async move { s.proclaim(r).await },
            ),
        )
        .route(
            "/v3/election/leader",
            unary(election.clone(), |s: E, r| async move { s.leader(r).await }),
        )
        .route(
            "/v3/election/resign",
            unary(election, |s: E, r| async move { s.resign(r).await }),
        )
        .route("/v3/election/observe", observe)
}

/// Every gateway route. Auth is not served yet: its paths answer gRPC's
/// Unimplemented, like the gRPC service does.
pub fn router(recipes: Recipes) -> Router {
    let node = recipes.node.clone();
    let watch = {
        let node = node.clone();
        post(move |body: Body| async move {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(watch::serve_stream(node, json_messages(body), tx));
            streamed(ReceiverStream::new(rx))
        })
    };
    let auth = post(|| async { error_response(&Status::unimplemented("Not yet implemented")) });
    Router::new()
        .merge(kv_routes(recipes.kv.clone()))
        .merge(lease_routes(LeaseService::new(node.clone())))
        .merge(maintenance_routes(MaintenanceService::new(node.clone())))
        .merge(cluster_routes(ClusterService::new(node)))
        .merge(recipe_routes(recipes))
        .route("/v3/watch", watch)
        .route("/v3/auth/{*rest}", auth)
}
