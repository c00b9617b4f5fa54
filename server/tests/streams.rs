//! Concurrent gRPC streams on one client connection, as kube-apiserver opens
//! them (every watch of every resource type on one connection):
//! `--max-concurrent-streams` is etcd's, unlimited by default, and open
//! streams do not hold up a SIGTERM; compared with Debian's etcd.

mod common;

use std::time::Duration;

use common::{Kind, Server};
use tessera_proto::etcdserverpb::watch_client::WatchClient;
use tessera_proto::etcdserverpb::watch_request::RequestUnion;
use tessera_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// One HTTP/2 connection to `server` (a tonic channel is one connection).
async fn one_connection(server: &Server) -> Channel {
    Endpoint::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// A watch stream on `key`: its request sender (kept open) and its replies.
type Watch = (mpsc::Sender<WatchRequest>, tonic::Streaming<WatchResponse>);

/// Opens a watch stream on `channel` and waits up to `wait` for its
/// creation to be confirmed; None when it was not confirmed in time.
async fn open_watch(channel: &Channel, key: &[u8], wait: Duration) -> Option<Watch> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut client = WatchClient::new(channel.clone());
    let opened = async move {
        let mut replies = client
            .watch(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let created = replies.message().await.unwrap().unwrap();
        assert!(created.created);
        replies
    };
    let replies = tokio::time::timeout(wait, opened).await.ok()?;
    Some((tx, replies))
}

/// Opens `n` watches on `key` over one connection; returns how many were
/// confirmed, and, when all were, checks that a put reaches every one.
async fn watches_on_one_connection(server: &Server, n: usize) -> usize {
    let channel = one_connection(server).await;
    let mut watches = Vec::new();
    for _ in 0..n {
        match open_watch(&channel, b"hot", Duration::from_secs(3)).await {
            Some(w) => watches.push(w),
            None => break,
        }
    }
    let opened = watches.len();
    if opened == n {
        let mut kv = server.kv().await;
        kv.put(PutRequest {
            key: b"hot".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        for (_, replies) in &mut watches {
            let event = tokio::time::timeout(Duration::from_secs(10), replies.message())
                .await
                .expect("no event within 10 s")
                .unwrap()
                .unwrap();
            assert_eq!(event.events[0].kv.as_ref().unwrap().value, b"v");
        }
    }
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_follow_max_concurrent_streams_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Etcd, Kind::Tessera] {
        // Unlimited by default: more than hyper's own default of 200.
        let server = Server::start(kind, &dir.path().join(format!("{kind:?}")), &[]).await;
        assert_eq!(
            watches_on_one_connection(&server, 300).await,
            300,
            "{kind:?}: 300 watch streams on one connection"
        );
        drop(server);

        // A limit: the stream past it waits for a free one, on both servers.
        let server = Server::start(
            kind,
            &dir.path().join(format!("{kind:?}-limited")),
            &["--max-concurrent-streams=5"],
        )
        .await;
        assert_eq!(
            watches_on_one_connection(&server, 6).await,
            5,
            "{kind:?}: with --max-concurrent-streams=5"
        );
    }
}

/// A server stopped with SIGTERM while a client keeps a watch open (as
/// kube-apiserver always does) exits promptly, as etcd does, instead of
/// waiting for the client to close its streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_watch_streams_stops_promptly_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Etcd, Kind::Tessera] {
        let mut server = Server::start(kind, &dir.path().join(format!("{kind:?}")), &[]).await;
        let channel = one_connection(&server).await;
        let _watch = open_watch(&channel, b"k", Duration::from_secs(5))
            .await
            .expect("watch created");
        let took = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(15)));
        let took = took.unwrap_or_else(|| panic!("{kind:?} still running 15 s after SIGTERM"));
        assert!(
            took < Duration::from_secs(5),
            "{kind:?} took {took:?} to stop"
        );
    }
}
