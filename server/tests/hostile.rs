//! Hostile input on the client port: malformed protobuf, absurdly nested
//! transactions and a flood of watch creates get errors (or answers), never
//! a crash, and the server keeps serving afterwards.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::{current_rev, Kind, Server};
use tessera_proto::etcdserverpb::{request_op, RequestOp, TxnRequest};

/// One gRPC call with a hand-made body, through curl: the HTTP status and
/// the `grpc-status` the server answered with.
fn raw_grpc(server: &Server, path: &str, message: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    std::fs::File::create(&body)
        .unwrap()
        .write_all(&frame)
        .unwrap();
    let out = Command::new("curl")
        .args(["-s", "-i", "--http2-prior-knowledge", "--max-time", "10"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("{}{path}", server.url()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nested_txn(depth: usize) -> TxnRequest {
    let mut t = TxnRequest::default();
    for _ in 0..depth {
        t = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(t)),
            }],
            ..Default::default()
        };
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_errors_and_the_server_keeps_serving() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let mut kv = server.kv().await;
    let before = current_rev(&mut kv).await;

    // Bytes that are no protobuf message at all.
    let answer = raw_grpc(&server, "/etcdserverpb.KV/Put", &[0xff; 64]);
    assert!(answer.contains("grpc-status: 13"), "{answer}");
    // A message that claims a field longer than itself.
    let answer = raw_grpc(&server, "/etcdserverpb.KV/Range", &[0x0a, 0xff, 0x01, b'k']);
    assert!(answer.contains("grpc-status: 13"), "{answer}");
    // A txn nested far beyond any real use: refused while decoding.
    let deep = nested_txn(1_000).encode_to_vec();
    let answer = raw_grpc(&server, "/etcdserverpb.KV/Txn", &deep);
    assert!(answer.contains("grpc-status: 13"), "{answer}");
    // A nested txn of a depth real clients use still works.
    let resp = kv.txn(nested_txn(20)).await.unwrap().into_inner();
    assert!(resp.succeeded);

    // A flood of watch creates on one stream: every one answered. (Sent in
    // bursts of 100, read between bursts: the client library's own queue is
    // bounded.)
    let mut c = server.client().await;
    let mut stream = c.watch("flood/0", None).await.unwrap();
    let mut created = 0;
    for burst in 0..20 {
        let first = if burst == 0 { 1 } else { 0 };
        for i in first..100 {
            let key = format!("flood/{}", burst * 100 + i);
            stream.watch(key, None).await.unwrap();
        }
        for _ in 0..100 {
            let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("watch answers stopped")
                .unwrap()
                .expect("stream ended");
            assert!(resp.created() && !resp.canceled(), "{resp:?}");
            created += 1;
        }
    }
    assert_eq!(created, 2_000);

    // Nothing above changed the store, and it still serves.
    assert_eq!(current_rev(&mut kv).await, before);
    c.put("after", "ok", None).await.unwrap();
    assert_eq!(current_rev(&mut kv).await, before + 1);
}
