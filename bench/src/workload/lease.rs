//! lease-keepalive: each client grants a lease, then renews it over a
//! keep-alive stream as fast as it can; every round trip is one request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tessera_proto::etcdserverpb::lease_client::LeaseClient;
use tessera_proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::load::{error_text, RateLimiter, Target};
use crate::progress::Progress;
use crate::report::{Results, Stats};

#[derive(Clone, Debug, clap::Args)]
pub struct LeaseArgs {
    /// Total number of keep-alive requests.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Maximum keep-alives per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

pub async fn keepalive(target: &Target, l: &LeaseArgs) -> anyhow::Result<Vec<Stats>> {
    let channels = target.connect().await?;
    let issued = Arc::new(AtomicU64::new(0));
    let limiter = Arc::new(RateLimiter::new(l.rate));
    let progress = Progress::start("lease-keepalive", l.total);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..target.clients {
        let mut lease = LeaseClient::new(channels[c % channels.len()].clone());
        let (issued, limiter, done, total) =
            (issued.clone(), limiter.clone(), progress.counter(), l.total);
        tasks.push(tokio::spawn(async move {
            let mut results = Results::default();
            let grant = LeaseGrantRequest { ttl: 100, id: 0 };
            let id = match lease.lease_grant(grant).await {
                Ok(r) => r.into_inner().id,
                Err(e) => {
                    results.record(Err(error_text(e)));
                    return results;
                }
            };
            // The first keep-alive is queued before the stream is opened:
            // etcd sends the response headers only with its first response.
            let (tx, rx) = mpsc::channel(1);
            let mut requests = Some(rx);
            let mut replies = None;
            while issued.fetch_add(1, Ordering::Relaxed) < total {
                limiter.wait().await;
                let t = Instant::now();
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    results.record(Err("keep-alive stream closed".to_string()));
                    break;
                }
                if let Some(rx) = requests.take() {
                    let stream = lease.lease_keep_alive(ReceiverStream::new(rx)).await;
                    match stream {
                        Ok(r) => replies = Some(r.into_inner()),
                        Err(e) => {
                            results.record(Err(error_text(e)));
                            break;
                        }
                    }
                }
                let Some(stream) = replies.as_mut() else {
                    break;
                };
                match stream.message().await {
                    Ok(Some(_)) => results.record(Ok(t.elapsed())),
                    Ok(None) => {
                        results.record(Err("keep-alive stream ended".to_string()));
                        break;
                    }
                    Err(e) => {
                        results.record(Err(error_text(e)));
                        break;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            results
        }));
    }
    let mut results = Results::default();
    for t in tasks {
        if let Ok(r) = t.await {
            results.merge(r);
        }
    }
    let elapsed = started.elapsed();
    progress.finish();
    Ok(vec![Stats::new("lease-keepalive", results, elapsed)])
}
