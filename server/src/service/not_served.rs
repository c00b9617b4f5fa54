//! Services of the etcd API that Tessera does not serve yet. They are
//! registered so every RPC answers gRPC `Unimplemented` (tonic's default
//! stubs) instead of an HTTP-level error.

use tessera_proto::etcdserverpb::auth_server::Auth;

pub struct NotServed;

#[tonic::async_trait]
impl Auth for NotServed {}
