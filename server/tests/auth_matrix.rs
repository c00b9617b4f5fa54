//! Every RPC of every service, with auth on, called with no token, a bad
//! token and the token of a user without any relevant permission: each must
//! be refused unless the privilege it needs (public, any known user, a
//! per-key permission, or the root role) is held. The levels are etcd's
//! current ones (its auth matrix, after the hardening that followed 3.4):
//! membership changes, MoveLeader, Compact and every maintenance call that
//! changes the cluster are root's only. A coverage check fails when a
//! service in `proto/` gains an RPC without a probe here.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use common::{Kind, Server};
use tessera_proto::authpb::{permission::Type as PermType, Permission, UserAddOptions};
use tessera_proto::etcdserverpb::auth_client::AuthClient;
use tessera_proto::etcdserverpb::cluster_client::ClusterClient;
use tessera_proto::etcdserverpb::kv_client::KvClient;
use tessera_proto::etcdserverpb::lease_client::LeaseClient;
use tessera_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tessera_proto::etcdserverpb::watch_client::WatchClient;
use tessera_proto::etcdserverpb::*;
use tessera_proto::v3electionpb::election_client::ElectionClient;
use tessera_proto::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, ProclaimRequest, ResignRequest,
};
use tessera_proto::v3lockpb::lock_client::LockClient;
use tessera_proto::v3lockpb::{LockRequest, UnlockRequest};
use tonic::transport::Channel;

/// The privilege a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    /// Anyone, even without credentials (Authenticate, AuthStatus).
    Public,
    /// Any known user.
    Authenticated,
    /// A per-key permission the unprivileged user does not hold.
    Rbac,
    /// The root role.
    Admin,
}

const ALLOWED: &str = "/allowed";
/// Writable, not readable, by the unprivileged user.
const WRITE_ONLY: &str = "/writeonly";
const DENIED: &str = "/denied";
const DENIED_NAME: &str = "/denied/name";
const USER: &str = "matrix-user";

/// What the probes need: the server and a lease root attached to `DENIED`.
#[derive(Clone)]
struct Env {
    channel: Channel,
    denied_lease: i64,
}

type Outcome = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

struct Probe {
    method: &'static str,
    name: &'static str,
    level: Level,
    call: Box<dyn Fn(Env, Option<String>) -> Outcome>,
}

fn with_token<T>(msg: T, token: &Option<String>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert("token", t.parse().unwrap());
    }
    req.set_timeout(Duration::from_secs(15));
    req
}

/// A probe of a unary call: `$client::new(channel).$method(request)`.
macro_rules! unary {
    ($method:literal, $name:literal, $level:expr, $client:ident, $call:ident, $req:expr) => {
        Probe {
            method: $method,
            name: $name,
            level: $level,
            call: Box::new(move |env: Env, token: Option<String>| {
                #[allow(clippy::redundant_closure_call)]
                let req = ($req)(&env);
                Box::pin(async move {
                    $client::new(env.channel.clone())
                        .$call(with_token(req, &token))
                        .await
                        .map(|_| ())
                        .map_err(|s| s.message().to_string())
                })
            }),
        }
    };
}

/// A server-streaming probe: its first message or error.
macro_rules! server_stream {
    ($method:literal, $level:expr, $client:ident, $call:ident, $req:expr) => {
        Probe {
            method: $method,
            name: "",
            level: $level,
            call: Box::new(move |env: Env, token: Option<String>| {
                let req = $req;
                Box::pin(async move {
                    let mut stream = $client::new(env.channel.clone())
                        .$call(with_token(req, &token))
                        .await
                        .map_err(|s| s.message().to_string())?
                        .into_inner();
                    match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
                        Ok(Ok(Some(_))) => Ok(()),
                        Ok(Err(s)) => Err(s.message().to_string()),
                        // A stream that ends or stays silent sent nothing.
                        Ok(Ok(None)) | Err(_) => Err(EMPTY_STREAM.to_string()),
                    }
                })
            }),
        }
    };
}

/// A stream that closed, or waited, without sending anything: for Observe,
/// what a refusal looks like (a permitted caller waits for a leader).
const EMPTY_STREAM: &str = "stream sent nothing";

fn put_op(key: &str, prev_kv: bool, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            prev_kv,
            lease,
            ..Default::default()
        })),
    }
}

fn probes() -> Vec<Probe> {
    use Level::*;
    let range = |key: &str, end: &[u8], serializable| RangeRequest {
        key: key.into(),
        range_end: end.to_vec(),
        serializable,
        ..Default::default()
    };
    let txn = |success: Vec<RequestOp>| TxnRequest {
        success,
        ..Default::default()
    };
    let leader_key = || LeaderKey {
        name: DENIED_NAME.into(),
        key: format!("{DENIED_NAME}/1").into_bytes(),
        rev: 1,
        lease: 1,
    };
    vec![
        // KV: per-key permissions, checked where etcd checks them.
        unary!(
            "/etcdserverpb.KV/Range",
            "",
            Rbac,
            KvClient,
            range,
            |_: &Env| range(DENIED, b"", false)
        ),
        unary!(
            "/etcdserverpb.KV/Range",
            "serializable",
            Rbac,
            KvClient,
            range,
            |_: &Env| range(DENIED, b"", true)
        ),
        unary!(
            "/etcdserverpb.KV/Range",
            "range-end-escapes-permission",
            Rbac,
            KvClient,
            range,
            |_: &Env| range(ALLOWED, &[0], false)
        ),
        unary!(
            "/etcdserverpb.KV/Put",
            "",
            Rbac,
            KvClient,
            put,
            |_: &Env| PutRequest {
                key: DENIED.into(),
                value: b"v".to_vec(),
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/Put",
            "prev-kv-needs-read",
            Rbac,
            KvClient,
            put,
            |_: &Env| PutRequest {
                key: WRITE_ONLY.into(),
                value: b"v".to_vec(),
                prev_kv: true,
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/Put",
            "lease-holding-denied-key",
            Rbac,
            KvClient,
            put,
            |e: &Env| PutRequest {
                key: ALLOWED.into(),
                value: b"v".to_vec(),
                lease: e.denied_lease,
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/DeleteRange",
            "",
            Rbac,
            KvClient,
            delete_range,
            |_: &Env| DeleteRangeRequest {
                key: DENIED.into(),
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/DeleteRange",
            "range-end-escapes-permission",
            Rbac,
            KvClient,
            delete_range,
            |_: &Env| DeleteRangeRequest {
                key: ALLOWED.into(),
                range_end: vec![0],
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "compare",
            Rbac,
            KvClient,
            txn,
            |_: &Env| TxnRequest {
                compare: vec![Compare {
                    key: DENIED.into(),
                    target: compare::CompareTarget::Version as i32,
                    target_union: Some(compare::TargetUnion::Version(0)),
                    ..Default::default()
                }],
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "success-op",
            Rbac,
            KvClient,
            txn,
            move |_: &Env| txn(vec![put_op(DENIED, false, 0)])
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "failure-op",
            Rbac,
            KvClient,
            txn,
            |_: &Env| TxnRequest {
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestDeleteRange(
                        DeleteRangeRequest {
                            key: DENIED.into(),
                            ..Default::default()
                        }
                    ))
                }],
                ..Default::default()
            }
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "range-op-range-end-escapes-permission",
            Rbac,
            KvClient,
            txn,
            move |_: &Env| txn(vec![RequestOp {
                request: Some(request_op::Request::RequestRange(range(
                    ALLOWED,
                    &[0],
                    false
                )))
            }])
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "put-op-prev-kv-needs-read",
            Rbac,
            KvClient,
            txn,
            move |_: &Env| txn(vec![put_op(WRITE_ONLY, true, 0)])
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "put-op-lease-holding-denied-key",
            Rbac,
            KvClient,
            txn,
            move |e: &Env| txn(vec![put_op(ALLOWED, false, e.denied_lease)])
        ),
        unary!(
            "/etcdserverpb.KV/Txn",
            "nested-txn",
            Rbac,
            KvClient,
            txn,
            move |_: &Env| txn(vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(txn(vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(range(DENIED, b"", false)))
                }])))
            }])
        ),
        unary!(
            "/etcdserverpb.KV/Compact",
            "",
            Admin,
            KvClient,
            compact,
            |_: &Env| CompactionRequest {
                revision: 1,
                physical: false
            }
        ),
        // Watch: refusals arrive in the stream as a canceled watch.
        Probe {
            method: "/etcdserverpb.Watch/Watch",
            name: "",
            level: Rbac,
            call: Box::new(move |env, token| {
                Box::pin(watch(env, token, range(DENIED, b"", false)))
            }),
        },
        Probe {
            method: "/etcdserverpb.Watch/Watch",
            name: "range-end-escapes-permission",
            level: Rbac,
            call: Box::new(move |env, token| {
                Box::pin(watch(env, token, range(ALLOWED, &[0], false)))
            }),
        },
        // Lease.
        unary!(
            "/etcdserverpb.Lease/LeaseGrant",
            "",
            Authenticated,
            LeaseClient,
            lease_grant,
            |_: &Env| LeaseGrantRequest { ttl: 60, id: 0 }
        ),
        unary!(
            "/etcdserverpb.Lease/LeaseRevoke",
            "unknown-lease",
            Authenticated,
            LeaseClient,
            lease_revoke,
            |_: &Env| LeaseRevokeRequest { id: 1 }
        ),
        unary!(
            "/etcdserverpb.Lease/LeaseRevoke",
            "lease-holding-denied-key",
            Rbac,
            LeaseClient,
            lease_revoke,
            |e: &Env| LeaseRevokeRequest { id: e.denied_lease }
        ),
        Probe {
            method: "/etcdserverpb.Lease/LeaseKeepAlive",
            name: "lease-holding-denied-key",
            level: Rbac,
            call: Box::new(|env, token| Box::pin(keep_alive(env, token))),
        },
        unary!(
            "/etcdserverpb.Lease/LeaseTimeToLive",
            "no-keys",
            Authenticated,
            LeaseClient,
            lease_time_to_live,
            |e: &Env| LeaseTimeToLiveRequest {
                id: e.denied_lease,
                keys: false
            }
        ),
        unary!(
            "/etcdserverpb.Lease/LeaseTimeToLive",
            "keys",
            Rbac,
            LeaseClient,
            lease_time_to_live,
            |e: &Env| LeaseTimeToLiveRequest {
                id: e.denied_lease,
                keys: true
            }
        ),
        unary!(
            "/etcdserverpb.Lease/LeaseLeases",
            "",
            Rbac,
            LeaseClient,
            lease_leases,
            |_: &Env| LeaseLeasesRequest {}
        ),
        // Cluster: membership changes are root's; the list, any user's.
        unary!(
            "/etcdserverpb.Cluster/MemberAdd",
            "",
            Admin,
            ClusterClient,
            member_add,
            |_: &Env| MemberAddRequest {
                peer_ur_ls: vec!["http://127.0.0.1:1".into()],
                is_learner: false
            }
        ),
        unary!(
            "/etcdserverpb.Cluster/MemberRemove",
            "",
            Admin,
            ClusterClient,
            member_remove,
            |_: &Env| MemberRemoveRequest { id: 1 }
        ),
        unary!(
            "/etcdserverpb.Cluster/MemberUpdate",
            "",
            Admin,
            ClusterClient,
            member_update,
            |_: &Env| MemberUpdateRequest {
                id: 1,
                peer_ur_ls: vec!["http://127.0.0.1:1".into()]
            }
        ),
        unary!(
            "/etcdserverpb.Cluster/MemberPromote",
            "",
            Admin,
            ClusterClient,
            member_promote,
            |_: &Env| MemberPromoteRequest { id: 1 }
        ),
        unary!(
            "/etcdserverpb.Cluster/MemberList",
            "",
            Authenticated,
            ClusterClient,
            member_list,
            |_: &Env| MemberListRequest {
                linearizable: false
            }
        ),
        // Maintenance.
        unary!(
            "/etcdserverpb.Maintenance/Alarm",
            "get",
            Authenticated,
            MaintenanceClient,
            alarm,
            |_: &Env| AlarmRequest {
                action: alarm_request::AlarmAction::Get as i32,
                member_id: 0,
                alarm: 0
            }
        ),
        unary!(
            "/etcdserverpb.Maintenance/Alarm",
            "activate",
            Admin,
            MaintenanceClient,
            alarm,
            |_: &Env| AlarmRequest {
                action: alarm_request::AlarmAction::Activate as i32,
                member_id: 1,
                alarm: AlarmType::Nospace as i32
            }
        ),
        unary!(
            "/etcdserverpb.Maintenance/Status",
            "",
            Authenticated,
            MaintenanceClient,
            status,
            |_: &Env| StatusRequest {}
        ),
        unary!(
            "/etcdserverpb.Maintenance/Defragment",
            "",
            Admin,
            MaintenanceClient,
            defragment,
            |_: &Env| DefragmentRequest {}
        ),
        unary!(
            "/etcdserverpb.Maintenance/Hash",
            "",
            Admin,
            MaintenanceClient,
            hash,
            |_: &Env| HashRequest {}
        ),
        unary!(
            "/etcdserverpb.Maintenance/HashKV",
            "",
            Admin,
            MaintenanceClient,
            hash_kv,
            |_: &Env| HashKvRequest { revision: 0 }
        ),
        server_stream!(
            "/etcdserverpb.Maintenance/Snapshot",
            Admin,
            MaintenanceClient,
            snapshot,
            SnapshotRequest {}
        ),
        unary!(
            "/etcdserverpb.Maintenance/MoveLeader",
            "",
            Admin,
            MaintenanceClient,
            move_leader,
            |_: &Env| MoveLeaderRequest { target_id: 1 }
        ),
        unary!(
            "/etcdserverpb.Maintenance/Downgrade",
            "",
            Admin,
            MaintenanceClient,
            downgrade,
            |_: &Env| DowngradeRequest {
                action: 0,
                version: "3.5".into()
            }
        ),
        // Auth: management is root's (checked when applied); a user may
        // read itself and its own roles.
        unary!(
            "/etcdserverpb.Auth/AuthEnable",
            "",
            Admin,
            AuthClient,
            auth_enable,
            |_: &Env| AuthEnableRequest {}
        ),
        unary!(
            "/etcdserverpb.Auth/AuthDisable",
            "",
            Admin,
            AuthClient,
            auth_disable,
            |_: &Env| AuthDisableRequest {}
        ),
        unary!(
            "/etcdserverpb.Auth/AuthStatus",
            "",
            Public,
            AuthClient,
            auth_status,
            |_: &Env| AuthStatusRequest {}
        ),
        unary!(
            "/etcdserverpb.Auth/Authenticate",
            "",
            Public,
            AuthClient,
            authenticate,
            |_: &Env| AuthenticateRequest {
                name: USER.into(),
                password: "matrix-pass".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserAdd",
            "",
            Admin,
            AuthClient,
            user_add,
            |_: &Env| AuthUserAddRequest {
                name: "intruder".into(),
                password: "p".into(),
                options: Some(UserAddOptions { no_password: false }),
                hashed_password: String::new()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserDelete",
            "",
            Admin,
            AuthClient,
            user_delete,
            |_: &Env| AuthUserDeleteRequest {
                name: "root".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserChangePassword",
            "",
            Admin,
            AuthClient,
            user_change_password,
            |_: &Env| AuthUserChangePasswordRequest {
                name: "root".into(),
                password: "owned".into(),
                hashed_password: String::new()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserGrantRole",
            "",
            Admin,
            AuthClient,
            user_grant_role,
            |_: &Env| AuthUserGrantRoleRequest {
                user: USER.into(),
                role: "root".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserRevokeRole",
            "",
            Admin,
            AuthClient,
            user_revoke_role,
            |_: &Env| AuthUserRevokeRoleRequest {
                name: "root".into(),
                role: "root".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserList",
            "",
            Admin,
            AuthClient,
            user_list,
            |_: &Env| AuthUserListRequest {}
        ),
        unary!(
            "/etcdserverpb.Auth/UserGet",
            "other-user",
            Admin,
            AuthClient,
            user_get,
            |_: &Env| AuthUserGetRequest {
                name: "root".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/UserGet",
            "self",
            Authenticated,
            AuthClient,
            user_get,
            |_: &Env| AuthUserGetRequest { name: USER.into() }
        ),
        unary!(
            "/etcdserverpb.Auth/RoleAdd",
            "",
            Admin,
            AuthClient,
            role_add,
            |_: &Env| AuthRoleAddRequest {
                name: "intruder-role".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/RoleDelete",
            "",
            Admin,
            AuthClient,
            role_delete,
            |_: &Env| AuthRoleDeleteRequest {
                role: "root".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/RoleList",
            "",
            Admin,
            AuthClient,
            role_list,
            |_: &Env| AuthRoleListRequest {}
        ),
        unary!(
            "/etcdserverpb.Auth/RoleGet",
            "other-role",
            Admin,
            AuthClient,
            role_get,
            |_: &Env| AuthRoleGetRequest {
                role: "root".into()
            }
        ),
        unary!(
            "/etcdserverpb.Auth/RoleGrantPermission",
            "",
            Admin,
            AuthClient,
            role_grant_permission,
            |_: &Env| AuthRoleGrantPermissionRequest {
                name: "matrix-role".into(),
                perm: Some(Permission {
                    perm_type: PermType::Readwrite as i32,
                    key: vec![0],
                    range_end: vec![0]
                }),
            }
        ),
        unary!(
            "/etcdserverpb.Auth/RoleRevokePermission",
            "",
            Admin,
            AuthClient,
            role_revoke_permission,
            |_: &Env| AuthRoleRevokePermissionRequest {
                role: "matrix-role".into(),
                key: ALLOWED.into(),
                range_end: vec![]
            }
        ),
        // Lock and election: their keys are checked as KV requests.
        unary!(
            "/v3lockpb.Lock/Lock",
            "",
            Rbac,
            LockClient,
            lock,
            |_: &Env| LockRequest {
                name: DENIED_NAME.into(),
                lease: 0
            }
        ),
        unary!(
            "/v3lockpb.Lock/Unlock",
            "",
            Rbac,
            LockClient,
            unlock,
            |_: &Env| UnlockRequest {
                key: format!("{DENIED_NAME}/1").into_bytes()
            }
        ),
        unary!(
            "/v3electionpb.Election/Campaign",
            "",
            Rbac,
            ElectionClient,
            campaign,
            |_: &Env| CampaignRequest {
                name: DENIED_NAME.into(),
                lease: 0,
                value: b"v".to_vec()
            }
        ),
        unary!(
            "/v3electionpb.Election/Proclaim",
            "",
            Rbac,
            ElectionClient,
            proclaim,
            move |_: &Env| ProclaimRequest {
                leader: Some(leader_key()),
                value: b"v".to_vec()
            }
        ),
        unary!(
            "/v3electionpb.Election/Leader",
            "",
            Rbac,
            ElectionClient,
            leader,
            |_: &Env| LeaderRequest {
                name: DENIED_NAME.into()
            }
        ),
        unary!(
            "/v3electionpb.Election/Resign",
            "",
            Rbac,
            ElectionClient,
            resign,
            move |_: &Env| ResignRequest {
                leader: Some(leader_key())
            }
        ),
        server_stream!(
            "/v3electionpb.Election/Observe",
            Rbac,
            ElectionClient,
            observe,
            LeaderRequest {
                name: DENIED_NAME.into()
            }
        ),
    ]
}

/// A watch create: its refusal is a canceled watch with a reason.
async fn watch(env: Env, token: Option<String>, r: RangeRequest) -> Result<(), String> {
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: r.key,
                range_end: r.range_end,
                ..Default::default()
            },
        )),
    };
    let outbound = tokio_stream::iter(vec![create]).chain(tokio_stream::pending());
    let mut stream = WatchClient::new(env.channel)
        .watch(with_token(outbound, &token))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| "no watch answer".to_string())?
        .map_err(|s| s.message().to_string())?
        .ok_or_else(|| EMPTY_STREAM.to_string())?;
    if first.canceled {
        Err(first.cancel_reason)
    } else {
        Ok(())
    }
}

/// A keep-alive of the lease root attached to `DENIED`.
async fn keep_alive(env: Env, token: Option<String>) -> Result<(), String> {
    let ask = LeaseKeepAliveRequest {
        id: env.denied_lease,
    };
    let outbound = tokio_stream::iter(vec![ask]).chain(tokio_stream::pending());
    let mut stream = LeaseClient::new(env.channel)
        .lease_keep_alive(with_token(outbound, &token))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Ok(Ok(None)) | Err(_) => Err(EMPTY_STREAM.to_string()),
    }
}

use tokio_stream::StreamExt as _;

/// Whether `message` is a refusal for want of credentials or permission,
/// in etcd's words (translated or, from maintenance calls, not).
fn is_denial(message: &str) -> bool {
    [
        "etcdserver: permission denied",
        "etcdserver: user name is empty",
        "etcdserver: user name not found",
        "etcdserver: invalid auth token",
        "etcdserver: revision of auth store is old",
        "auth: permission denied",
        "auth: user name is empty",
        "auth: user not found",
        "auth: invalid auth token",
    ]
    .iter()
    .any(|d| message.contains(d))
}

/// The RPCs the services in `proto/` declare, as `/package.Service/Method`.
fn declared_methods() -> BTreeSet<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/etcd");
    let mut methods = BTreeSet::new();
    for file in [
        "etcdserverpb/rpc.proto",
        "v3lockpb/v3lock.proto",
        "v3electionpb/v3election.proto",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let package = text
            .lines()
            .find_map(|l| l.strip_prefix("package "))
            .unwrap()
            .trim_end_matches(';')
            .to_string();
        let mut service = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches(" {").trim().to_string();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                methods.insert(format!("/{package}.{service}/{name}"));
            }
        }
    }
    methods
}

#[test]
fn every_rpc_has_a_probe() {
    let declared = declared_methods();
    assert!(declared.len() > 40, "{declared:?}");
    let probed: BTreeSet<String> = probes().iter().map(|p| p.method.to_string()).collect();
    let missing: Vec<_> = declared.difference(&probed).collect();
    assert!(missing.is_empty(), "RPCs without a probe: {missing:?}");
    let unknown: Vec<_> = probed.difference(&declared).collect();
    assert!(unknown.is_empty(), "probes of unknown RPCs: {unknown:?}");
}

/// Sets up etcd's matrix scenario: a user with read-write on `ALLOWED` and
/// write on `WRITE_ONLY`, root, a value in `WRITE_ONLY` for `prev_kv` to
/// leak, and a lease attached to `DENIED`; then enables auth. Returns the
/// environment and the user's token.
async fn setup(server: &Server) -> (Env, String) {
    let mut c = server.client().await;
    use etcd_client::{Permission as P, PermissionType as T};
    c.user_add("root", "root-pass", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.user_add(USER, "matrix-pass", None).await.unwrap();
    c.role_add("matrix-role").await.unwrap();
    c.role_grant_permission("matrix-role", P::new(T::Readwrite, ALLOWED))
        .await
        .unwrap();
    c.role_grant_permission("matrix-role", P::new(T::Write, WRITE_ONLY))
        .await
        .unwrap();
    c.user_grant_role(USER, "matrix-role").await.unwrap();
    c.put(WRITE_ONLY, "secret", None).await.unwrap();
    let lease = c.lease_grant(3600, None).await.unwrap().id();
    let leased = etcd_client::PutOptions::new().with_lease(lease);
    c.put(DENIED, "secret", Some(leased)).await.unwrap();
    c.auth_enable().await.unwrap();
    let token = c
        .auth_client()
        .authenticate(USER.into(), "matrix-pass".into())
        .await
        .unwrap()
        .token()
        .to_string();
    let env = Env {
        channel: common::channel(&server.url()),
        denied_lease: lease,
    };
    // The prev_kv probes mean something only if the user may write the
    // write-only key but not read it.
    let mut kv = KvClient::new(env.channel.clone());
    let tok = Some(token.clone());
    let put = PutRequest {
        key: WRITE_ONLY.into(),
        value: b"secret".to_vec(),
        ..Default::default()
    };
    kv.put(with_token(put, &tok)).await.unwrap();
    let read = kv.range(with_token(range_of(WRITE_ONLY), &tok)).await;
    assert!(is_denial(read.unwrap_err().message()));
    (env, token)
}

fn range_of(key: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_callers_without_the_privilege_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &["--bcrypt-cost=4"]).await;
    let (env, user_token) = setup(&server).await;
    let callers: [(&str, Option<String>, Level); 3] = [
        ("no token", None, Level::Public),
        (
            "invalid token",
            Some("not-a-real-token".into()),
            Level::Public,
        ),
        ("unprivileged user", Some(user_token), Level::Authenticated),
    ];
    let mut failures = Vec::new();
    for probe in probes() {
        for (caller, token, grants) in &callers {
            let outcome = (probe.call)(env.clone(), token.clone()).await;
            let denied = match &outcome {
                Err(msg) => {
                    is_denial(msg) || (msg == EMPTY_STREAM && probe.method.ends_with("/Observe"))
                }
                Ok(()) => false,
            };
            let id = format!("{}#{} as {caller}", probe.method, probe.name);
            if probe.level > *grants && !denied {
                failures.push(format!(
                    "{id} must be refused ({:?}), got {outcome:?}",
                    probe.level
                ));
            }
            // The user clears the bar: whatever else happens, not an auth error.
            if *caller == "unprivileged user" && probe.level <= *grants && denied {
                failures.push(format!(
                    "{id} was refused though it needs only {:?}: {outcome:?}",
                    probe.level
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing above got through: the secrets and the cluster are as they were.
    let root = {
        let opts = etcd_client::ConnectOptions::new().with_user("root", "root-pass");
        etcd_client::Client::connect([server.url()], Some(opts))
            .await
            .unwrap()
    };
    let mut root = root;
    let denied = root.get(DENIED, None).await.unwrap();
    assert_eq!(denied.kvs()[0].value(), b"secret");
    let members = root.member_list().await.unwrap();
    assert_eq!(members.members().len(), 1);
    assert!(root.user_get(USER).await.unwrap().roles() == ["matrix-role"]);
}
