//! Crash test: SIGKILL tessera while clients are writing, restart it, and
//! check that every acknowledged put survived with the revision it was
//! acknowledged with, and that revisions continue from there.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{current_rev, Kind, Server};
use tessera_proto::etcdserverpb::{PutRequest, RangeRequest};

const WRITERS: usize = 8;
const ROUNDS: usize = 3;

#[derive(Clone, Debug)]
struct Acked {
    key: Vec<u8>,
    value: Vec<u8>,
    revision: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &[]).await;
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();

    for round in 0..ROUNDS {
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut kv = server.kv().await;
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("crash/{round}/{w}/{i}").into_bytes();
                    let value = format!("value-{round}-{w}-{i}").into_bytes();
                    let put = PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..Default::default()
                    };
                    match kv.put(put).await {
                        Ok(resp) => {
                            let revision = resp.into_inner().header.unwrap().revision;
                            acked.lock().unwrap().push(Acked {
                                key,
                                value,
                                revision,
                            });
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.kill();
        for w in writers {
            w.await.unwrap();
        }
        server.restart().await;

        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > WRITERS * (round + 1),
            "round {round}: too few writes acknowledged"
        );
        let mut kv = server.kv().await;
        for a in &acked {
            let got = kv
                .range(RangeRequest {
                    key: a.key.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let kv0 = got.kvs.first().unwrap_or_else(|| {
                panic!(
                    "round {round}: acknowledged put of {:?} lost",
                    String::from_utf8_lossy(&a.key)
                )
            });
            assert_eq!(kv0.value, a.value);
            assert_eq!(
                kv0.mod_revision,
                a.revision,
                "revision of {:?}",
                String::from_utf8_lossy(&a.key)
            );
        }
        let max_acked = acked.iter().map(|a| a.revision).max().unwrap_or(0);
        let cur = current_rev(&mut kv).await;
        assert!(
            cur >= max_acked,
            "round {round}: store revision {cur} below acknowledged {max_acked}"
        );
        let next = kv
            .put(PutRequest {
                key: b"after-restart".to_vec(),
                value: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            next.header.unwrap().revision,
            cur + 1,
            "round {round}: revisions must continue"
        );
    }
}
