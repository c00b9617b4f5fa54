//! etcd's JSON gateway on the client port: `POST /v3/...` with the request
//! message as JSON (protobuf's JSON mapping with the original field names:
//! bytes in base64, 64-bit integers as strings), answered by the same
//! services as gRPC. Streaming calls (watch, lease keep-alive, election
//! observe, snapshot) take newline-separated JSON messages and answer with
//! one `{"result": ...}` object per line, as grpc-gateway does.

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Router;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tessera_proto::etcdserverpb::auth_server::Auth;
use tessera_proto::etcdserverpb::cluster_server::Cluster;
use tessera_proto::etcdserverpb::kv_server::Kv;
use tessera_proto::etcdserverpb::lease_server::Lease;
use tessera_proto::etcdserverpb::maintenance_server::Maintenance;
use tessera_proto::v3electionpb::election_server::Election;
use tessera_proto::v3lockpb::lock_server::Lock;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Code, Status};

use crate::auth::Credentials;
use crate::service::auth::AuthService;
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

/// The gRPC request the gateway makes of `msg`: grpc-gateway passes the
/// `Authorization` header on as `authorization` metadata, where the auth
/// token is looked for. (A client certificate's CN is not used for gateway
/// requests, as in etcd, whose gateway dials the server with its own.)
fn grpc_request<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok())
    {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// The credentials of a gateway request (see [`grpc_request`]).
fn credentials(headers: &HeaderMap) -> Credentials {
    Credentials::of(&grpc_request(headers, ()))
}

/// A unary call: JSON request in, JSON response (or error) out.
fn unary<S, Req, Resp, F, Fut>(service: S, call: F) -> MethodRouter
where
    S: Clone + Send + Sync + 'static,
    Req: DeserializeOwned + Default + Send + 'static,
    Resp: Serialize,
    F: Fn(S, tonic::Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send,
{
    post(move |headers: HeaderMap, body: Bytes| async move {
        let outcome = match decode::<Req>(&body) {
            Ok(req) => call(service, grpc_request(&headers, req))
                .await
                .and_then(|r| encode(&r)),
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
    F: Fn(S, tonic::Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<BoxStream<T>, Status>> + Send,
{
    post(move |headers: HeaderMap, body: Bytes| async move {
        let stream = match decode::<Req>(&body) {
            Ok(req) => call(service, grpc_request(&headers, req)).await,
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

/// A [`unary`] call through a service's tonic trait method.
macro_rules! via_trait {
    ($service:ident :: $method:ident) => {
        |s, r| async move { $service::$method(&s, r).await.map(|r| r.into_inner()) }
    };
}

fn kv_routes(kv: KvService) -> Router {
    Router::new()
        .route("/v3/kv/range", unary(kv.clone(), via_trait!(Kv::range)))
        .route("/v3/kv/put", unary(kv.clone(), via_trait!(Kv::put)))
        .route(
            "/v3/kv/deleterange",
            unary(kv.clone(), via_trait!(Kv::delete_range)),
        )
        .route("/v3/kv/txn", unary(kv.clone(), via_trait!(Kv::txn)))
        .route("/v3/kv/compaction", unary(kv, via_trait!(Kv::compact)))
}

fn lease_routes(lease: LeaseService) -> Router {
    let grant = unary(lease.clone(), via_trait!(Lease::lease_grant));
    let revoke = unary(lease.clone(), via_trait!(Lease::lease_revoke));
    let ttl = unary(lease.clone(), via_trait!(Lease::lease_time_to_live));
    let leases = unary(lease.clone(), via_trait!(Lease::lease_leases));
    let keep_alive = post(move |headers: HeaderMap, body: Body| async move {
        let (tx, rx) = mpsc::channel(16);
        let creds = credentials(&headers);
        tokio::spawn(lease.serve_keep_alive(creds, json_messages(body), tx));
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

fn auth_routes(a: AuthService) -> Router {
    Router::new()
        .route(
            "/v3/auth/enable",
            unary(a.clone(), via_trait!(Auth::auth_enable)),
        )
        .route(
            "/v3/auth/disable",
            unary(a.clone(), via_trait!(Auth::auth_disable)),
        )
        .route(
            "/v3/auth/status",
            unary(a.clone(), via_trait!(Auth::auth_status)),
        )
        .route(
            "/v3/auth/authenticate",
            unary(a.clone(), via_trait!(Auth::authenticate)),
        )
        .route(
            "/v3/auth/user/add",
            unary(a.clone(), via_trait!(Auth::user_add)),
        )
        .route(
            "/v3/auth/user/get",
            unary(a.clone(), via_trait!(Auth::user_get)),
        )
        .route(
            "/v3/auth/user/list",
            unary(a.clone(), via_trait!(Auth::user_list)),
        )
        .route(
            "/v3/auth/user/delete",
            unary(a.clone(), via_trait!(Auth::user_delete)),
        )
        .route(
            "/v3/auth/user/changepw",
            unary(a.clone(), via_trait!(Auth::user_change_password)),
        )
        .route(
            "/v3/auth/user/grant",
            unary(a.clone(), via_trait!(Auth::user_grant_role)),
        )
        .route(
            "/v3/auth/user/revoke",
            unary(a.clone(), via_trait!(Auth::user_revoke_role)),
        )
        .route(
            "/v3/auth/role/add",
            unary(a.clone(), via_trait!(Auth::role_add)),
        )
        .route(
            "/v3/auth/role/get",
            unary(a.clone(), via_trait!(Auth::role_get)),
        )
        .route(
            "/v3/auth/role/list",
            unary(a.clone(), via_trait!(Auth::role_list)),
        )
        .route(
            "/v3/auth/role/delete",
            unary(a.clone(), via_trait!(Auth::role_delete)),
        )
        .route(
            "/v3/auth/role/grant",
            unary(a.clone(), via_trait!(Auth::role_grant_permission)),
        )
        .route(
            "/v3/auth/role/revoke",
            unary(a, via_trait!(Auth::role_revoke_permission)),
        )
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
    Router::new()
        .route("/v3/lock/lock", unary(lock.clone(), via_trait!(Lock::lock)))
        .route("/v3/lock/unlock", unary(lock, via_trait!(Lock::unlock)))
        .route(
            "/v3/election/campaign",
            unary(election.clone(), via_trait!(Election::campaign)),
        )
        .route(
            "/v3/election/proclaim",
            unary(election.clone(), via_trait!(Election::proclaim)),
        )
        .route(
            "/v3/election/leader",
            unary(election.clone(), via_trait!(Election::leader)),
        )
        .route(
            "/v3/election/resign",
            unary(election.clone(), via_trait!(Election::resign)),
        )
        .route(
            "/v3/election/observe",
            server_streaming(election, via_trait!(Election::observe)),
        )
}

/// Every gateway route.
pub fn router(recipes: Recipes) -> Router {
    let node = recipes.node.clone();
    let watch = {
        let node = node.clone();
        post(move |headers: HeaderMap, body: Body| async move {
            let (tx, rx) = mpsc::channel(64);
            let creds = credentials(&headers);
            tokio::spawn(watch::serve_stream(node, creds, json_messages(body), tx));
            streamed(ReceiverStream::new(rx))
        })
    };
    Router::new()
        .merge(kv_routes(recipes.kv.clone()))
        .merge(lease_routes(LeaseService::new(node.clone())))
        .merge(auth_routes(AuthService::new(node.clone())))
        .merge(maintenance_routes(MaintenanceService::new(node.clone())))
        .merge(cluster_routes(ClusterService::new(node)))
        .merge(recipe_routes(recipes))
        .route("/v3/watch", watch)
}
