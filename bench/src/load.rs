//! Closed-loop load like etcd's `benchmark`: `--conns` gRPC connections over
//! the endpoints, `--clients` concurrent callers sharing them round-robin,
//! `--total` requests in all, at most `--rate` per second.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

use crate::progress::Progress;
use crate::report::{Results, Stats};

/// Connections and clients, as the global flags of etcd's benchmark set them.
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub conns: usize,
    pub clients: usize,
}

impl Target {
    /// Opens `conns` connections, spread round-robin over the endpoints.
    pub async fn connect(&self) -> anyhow::Result<Vec<Channel>> {
        anyhow::ensure!(!self.endpoints.is_empty(), "no --endpoints given");
        anyhow::ensure!(self.conns > 0, "--conns must be at least 1");
        anyhow::ensure!(self.clients > 0, "--clients must be at least 1");
        let mut channels = Vec::with_capacity(self.conns);
        for i in 0..self.conns {
            let ep = &self.endpoints[i % self.endpoints.len()];
            let url = if ep.contains("://") {
                ep.clone()
            } else {
                format!("http://{ep}")
            };
            let channel = Endpoint::from_shared(url.clone())
                .with_context(|| format!("bad endpoint {ep}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            channels.push(channel);
        }
        Ok(channels)
    }
}

/// Spaces calls at most `rate` per second across all clients (0: no limit).
pub struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            interval: (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64)),
            next: Mutex::new(Instant::now()),
        }
    }

    pub async fn wait(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// A finished call: the index of its kind (see [`run`]'s `kinds`) and its
/// outcome.
pub type Outcome = (usize, Result<(), String>);
pub type CallFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Runs request number `i` on connection `channel`.
pub trait Call: Send + Sync + 'static {
    fn call(&self, channel: Channel, i: u64) -> CallFuture;
}

impl<F> Call for F
where
    F: Fn(Channel, u64) -> CallFuture + Send + Sync + 'static,
{
    fn call(&self, channel: Channel, i: u64) -> CallFuture {
        self(channel, i)
    }
}

/// Issues `total` calls from `clients` concurrent callers (caller `c` uses
/// connection `c % conns`), timing each; returns one [`Stats`] per kind of
/// call in `kinds` (most workloads have one, `txn-mixed` reads and writes).
pub async fn run(
    kinds: &[&str],
    channels: &[Channel],
    clients: usize,
    total: u64,
    rate: u64,
    call: impl Call,
) -> Vec<Stats> {
    drive(kinds, channels, clients, total, rate, Arc::default(), call).await
}

/// Like [`run`] with no request limit: calls until `stop` is set.
pub async fn run_until(
    kind: &str,
    channels: &[Channel],
    clients: usize,
    stop: Arc<AtomicBool>,
    call: impl Call,
) -> Stats {
    let mut stats = drive(&[kind], channels, clients, u64::MAX, 0, stop, call).await;
    stats.remove(0)
}

async fn drive(
    kinds: &[&str],
    channels: &[Channel],
    clients: usize,
    total: u64,
    rate: u64,
    stop: Arc<AtomicBool>,
    call: impl Call,
) -> Vec<Stats> {
    let op = kinds.join("+");
    let nkinds = kinds.len();
    let call = Arc::new(call);
    let issued = Arc::new(AtomicU64::new(0));
    let limiter = Arc::new(RateLimiter::new(rate));
    let progress = Progress::start(&op, total);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let channel = channels[c % channels.len()].clone();
        let (call, issued, limiter, done, stop) = (
            call.clone(),
            issued.clone(),
            limiter.clone(),
            progress.counter(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut results = vec![Results::default(); nkinds];
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= total || stop.load(Ordering::Relaxed) {
                    return results;
                }
                limiter.wait().await;
                let t = Instant::now();
                let (kind, outcome) = call.call(channel.clone(), i).await;
                results[kind.min(nkinds - 1)].record(outcome.map(|()| t.elapsed()));
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut results = vec![Results::default(); nkinds];
    for t in tasks {
        if let Ok(r) = t.await {
            for (all, mine) in results.iter_mut().zip(r) {
                all.merge(mine);
            }
        }
    }
    let elapsed = started.elapsed();
    progress.finish();
    kinds
        .iter()
        .zip(results)
        .map(|(kind, r)| Stats::new(kind, r, elapsed))
        .collect()
}

/// The message of a failed gRPC call, as etcd's report keys its errors.
pub fn error_text(status: tonic::Status) -> String {
    format!(
        "rpc error: code = {:?} desc = {}",
        status.code(),
        status.message()
    )
}
