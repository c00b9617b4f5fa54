//! Closed-loop load like etcd's `benchmark`: `--conns` gRPC connections over
//! the endpoints, `--clients` concurrent callers sharing them round-robin,
//! `--total` requests in all, at most `--rate` per second.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::connect::{coalesced_tcp, within_timeout};
use crate::progress::Progress;
use crate::report::{Results, Stats};
use crate::unary::UnaryConn;

/// Connections and clients, as the global flags of etcd's benchmark set them.
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub conns: usize,
    pub clients: usize,
}

impl Target {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.endpoints.is_empty(), "no --endpoints given");
        anyhow::ensure!(self.conns > 0, "--conns must be at least 1");
        anyhow::ensure!(self.clients > 0, "--clients must be at least 1");
        if let Some(ep) = self.endpoints.iter().find(|e| e.starts_with("https://")) {
            anyhow::bail!("TLS endpoints are not supported by the load generator: {ep}");
        }
        Ok(())
    }

    /// The endpoint connection `i` goes to: round-robin over them.
    fn endpoint(&self, i: usize) -> &str {
        &self.endpoints[i % self.endpoints.len()]
    }

    /// Opens `conns` lean connections for unary calls (see [`UnaryConn`]).
    pub async fn connect_unary(&self) -> anyhow::Result<Vec<UnaryConn>> {
        self.check()?;
        let mut conns = Vec::with_capacity(self.conns);
        for i in 0..self.conns {
            conns.push(UnaryConn::connect(self.endpoint(i)).await?);
        }
        Ok(conns)
    }

    /// Opens `conns` tonic channels, for the streaming workloads.
    pub async fn connect(&self) -> anyhow::Result<Vec<Channel>> {
        self.check()?;
        let mut channels = Vec::with_capacity(self.conns);
        for i in 0..self.conns {
            let ep = self.endpoint(i);
            let url = if ep.contains("://") {
                ep.to_string()
            } else {
                format!("http://{ep}")
            };
            let endpoint =
                Endpoint::from_shared(url.clone()).with_context(|| format!("bad endpoint {ep}"))?;
            let connector = tower::service_fn(|uri: tonic::transport::Uri| async move {
                let host = uri.host().unwrap_or("127.0.0.1");
                let tcp = coalesced_tcp(host, uri.port_u16().unwrap_or(2379)).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tcp))
            });
            let channel = within_timeout(&url, endpoint.connect_with_connector(connector)).await?;
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

/// Runs request number `i` on connection `conn` (a tonic [`Channel`] for
/// the streaming workloads, a [`UnaryConn`] for the unary ones).
pub trait Call<C>: Send + Sync + 'static {
    fn call(&self, conn: &C, i: u64) -> CallFuture;
}

impl<C, F> Call<C> for F
where
    F: Fn(&C, u64) -> CallFuture + Send + Sync + 'static,
{
    fn call(&self, conn: &C, i: u64) -> CallFuture {
        self(conn, i)
    }
}

/// Issues `total` calls from `clients` concurrent callers (caller `c` uses
/// connection `c % conns`), timing each; returns one [`Stats`] per kind of
/// call in `kinds` (most workloads have one, `txn-mixed` reads and writes).
pub async fn run<C: Clone + Send + 'static>(
    kinds: &[&str],
    conns: &[C],
    clients: usize,
    total: u64,
    rate: u64,
    call: impl Call<C>,
) -> Vec<Stats> {
    drive(kinds, conns, clients, total, rate, Arc::default(), call).await
}

/// Like [`run`] with no request limit: calls until `stop` is set.
pub async fn run_until<C: Clone + Send + 'static>(
    kind: &str,
    conns: &[C],
    clients: usize,
    stop: Arc<AtomicBool>,
    call: impl Call<C>,
) -> Stats {
    let mut stats = drive(&[kind], conns, clients, u64::MAX, 0, stop, call).await;
    stats.remove(0)
}

async fn drive<C: Clone + Send + 'static>(
    kinds: &[&str],
    conns: &[C],
    clients: usize,
    total: u64,
    rate: u64,
    stop: Arc<AtomicBool>,
    call: impl Call<C>,
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
        let conn = conns[c % conns.len()].clone();
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
                let (kind, outcome) = call.call(&conn, i).await;
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
