//! Serving: gRPC services and HTTP endpoints on every client URL.

use std::sync::Arc;

use anyhow::Context;
use tessera_proto::etcdserverpb::auth_server::AuthServer;
use tessera_proto::etcdserverpb::cluster_server::ClusterServer;
use tessera_proto::etcdserverpb::kv_server::KvServer;
use tessera_proto::etcdserverpb::lease_server::LeaseServer;
use tessera_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use tessera_proto::etcdserverpb::watch_server::WatchServer;
use tessera_proto::v3electionpb::election_server::ElectionServer;
use tessera_proto::v3lockpb::lock_server::LockServer;
use tonic::service::Routes;

use crate::h2_authority::AuthorityRepair;
use crate::node::Node;
use crate::service::auth::AuthService;
use crate::service::election::ElectionService;
use crate::service::kv_unary::{KvUnary, Method};
use crate::service::lease::LeaseService;
use crate::service::lock::LockService;
use crate::service::recipes::Recipes;
use crate::service::watch::WatchService;
use crate::service::{cluster::ClusterService, kv::KvService, maintenance::MaintenanceService};
use crate::tls::ClientConn;

/// How long a stopping server lets client connections finish their streams.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// etcd's allowance for gRPC framing on top of `--max-request-bytes`.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// What the client URLs serve: the KV unary calls on their own path, then
/// axum's routes for everything else.
#[derive(Clone)]
pub struct App {
    node: Arc<Node>,
    kv: KvUnary,
    routes: axum::Router,
}

pub fn app(node: Arc<Node>) -> App {
    let max_recv = node.config.max_request_bytes as usize + GRPC_OVERHEAD_BYTES;
    let recipes = Recipes::new(node.clone());
    let kv = KvService::new(node.clone());
    let grpc = Routes::new(KvServer::new(kv.clone()).max_decoding_message_size(max_recv))
        .add_service(
            MaintenanceServer::new(MaintenanceService::new(node.clone()))
                .max_decoding_message_size(max_recv),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(node.clone()))
                .max_decoding_message_size(max_recv),
        )
        .add_service(WatchServer::new(WatchService::new(node.clone())))
        .add_service(LeaseServer::new(LeaseService::new(node.clone())))
        .add_service(AuthServer::new(AuthService::new(node.clone())))
        .add_service(LockServer::new(LockService::new(recipes.clone())))
        .add_service(ElectionServer::new(ElectionService::new(recipes.clone())))
        .prepare()
        .into_axum_router();
    // The KV unary calls take their own path (`kv_unary`), which hands
    // tonic's KV service whatever it does not serve itself.
    let routes = grpc
        .merge(crate::http::router(node.clone()))
        .merge(crate::gateway::router(recipes))
        .fallback(unknown_path);
    App {
        node: node.clone(),
        kv: KvUnary::new(kv, max_recv),
        routes,
    }
}

/// gRPC clients calling a service that does not exist get Unimplemented;
/// anything else gets HTTP 404, as from etcd.
async fn unknown_path(req: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    let is_grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        tonic::Status::unimplemented("unknown service")
            .into_http::<axum::body::Body>()
            .into_response()
    } else {
        (axum::http::StatusCode::NOT_FOUND, "Not Found\n").into_response()
    }
}

/// Serves `app` on `listener` until `stopped`, with each connection's
/// [`ClientConn`] in the request extensions (as axum's `ConnectInfo`).
///
/// hyper-util's connection builder is used directly, not `axum::serve`,
/// because the HTTP/2 settings must follow etcd's flags: hyper's default of
/// 200 concurrent streams per connection would hold back a client such as
/// kube-apiserver, which multiplexes every watch on one connection (etcd's
/// `--max-concurrent-streams` defaults to 2^32 - 1).
fn serve_on<L>(
    mut listener: L,
    app: App,
    max_concurrent_streams: u32,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener<Addr = ClientConn>,
{
    use futures::future::Either;
    use futures::FutureExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(max_concurrent_streams);
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut stopped = std::pin::pin!(stopped);
        loop {
            let (io, conn) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stopped => break,
            };
            let app = app.clone();
            let service = hyper::service::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    let token_entry = app.node.unapplied_token_index(req.headers());
                    let node = token_entry.map(|_| app.node.clone());
                    let handler = match Method::of_path(req.uri().path()) {
                        // Given the connection directly: an extension costs
                        // the request a map allocation (1.5% of a member's
                        // CPU under a put load).
                        Some(method) => {
                            Either::Left(app.kv.call(method, req, conn.clone()).map(Ok))
                        }
                        None => {
                            req.extensions_mut()
                                .insert(axum::extract::ConnectInfo(conn.clone()));
                            Either::Right(
                                app.routes.clone().oneshot(req.map(axum::body::Body::new)),
                            )
                        }
                    };
                    async move {
                        if let (Some(index), Some(node)) = (token_entry, node) {
                            node.wait_token_entry(index).await;
                        }
                        handler.await
                    }
                },
            );
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(AuthorityRepair::new(io)), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::trace!(error = %e, "client connection ended");
                }
            });
        }
        drop(listener);
        // Every connection is told to finish its streams (GOAWAY), and
        // requests in flight get their answers. Watch and keep-alive streams
        // never finish on their own, so serving ends after a short grace
        // period even with such streams open: etcd stops at once on SIGTERM,
        // and a client such as kube-apiserver keeps its watches open forever.
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!(
                grace = ?SHUTDOWN_GRACE,
                "closing client connections whose streams are still open"
            );
        }
        Ok(())
    })
}

/// Binds every `--listen-client-urls` address and serves until `shutdown`:
/// `https://` URLs over TLS with the `--cert-file` identity, `http://` ones
/// in plaintext (h2c and HTTP/1.1 on one port, as etcd).
pub async fn serve(
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addrs = node.config.client_listen_addrs()?;
    let tls_files = node.config.client_tls();
    let tls = if addrs.iter().any(|a| a.tls) {
        let provider = crate::tls::provider(&node.config.cipher_suite_names())?;
        Some(crate::tls::server_config(&tls_files, provider)?)
    } else {
        None
    };
    let app = app(node.clone());
    let max_streams = node.config.max_concurrent_streams;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for listen in addrs {
        let addr = listen.addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let app = app.clone();
        let task = match (&tls, listen.tls) {
            (Some(config), true) => {
                tracing::info!(address = %addr, client_cert_auth = tls_files.requires_client_cert(), "serving client traffic securely");
                let listener = crate::tls::TlsListener::new(
                    listener,
                    config.clone(),
                    tls_files.crl_file.clone(),
                )?;
                serve_on(listener, app, max_streams, stopped)
            }
            _ => {
                crate::tls::warn_unused(&tls_files, &listen.url);
                tracing::info!(address = %addr, "serving client traffic insecurely; this is strongly discouraged!");
                serve_on(
                    crate::tls::PlainListener(listener),
                    app,
                    max_streams,
                    stopped,
                )
            }
        };
        tasks.push(task);
    }
    tracing::info!("ready to serve client requests");
    shutdown.await;
    tracing::info!(name = %node.config.name, "closing etcd server");
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await
            .context("server task panicked")?
            .context("server failed")?;
    }
    Ok(())
}
