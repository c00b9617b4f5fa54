//! watch, watch-latency and watch-get: watchers over a few gRPC streams,
//! events timed from the put that caused them to each watcher seeing them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tessera_proto::etcdserverpb::kv_client::KvClient;
use tessera_proto::etcdserverpb::watch_client::WatchClient;
use tessera_proto::etcdserverpb::watch_request::RequestUnion;
use tessera_proto::etcdserverpb::{
    PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{key, value};
use crate::load::{self, error_text, CallFuture, RateLimiter, Target};
use crate::progress::Progress;
use crate::report::{Results, Stats};

/// One watch stream: its request sender and response stream.
struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    rx: tonic::Streaming<WatchResponse>,
}

fn create(key: Vec<u8>, start_revision: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key,
            start_revision,
            ..Default::default()
        })),
    }
}

/// Opens `streams` watch streams over `channels` and creates `per_stream`
/// watchers on each, on the keys `keys(n)` (n counts all watchers), timing
/// each creation.
async fn create_watchers(
    channels: &[Channel],
    streams: usize,
    per_stream: usize,
    start_revision: i64,
    keys: impl Fn(usize) -> Vec<u8>,
) -> anyhow::Result<(Vec<Stream>, Stats)> {
    let total = (streams * per_stream) as u64;
    let progress = Progress::start("watch create", total);
    let done = progress.counter();
    let started = Instant::now();
    let mut results = Results::default();
    let mut opened = Vec::with_capacity(streams);
    let mut n = 0;
    for i in 0..streams {
        let (tx, rx) = mpsc::channel(1024);
        let mut requests = Some(rx);
        let mut stream: Option<Stream> = None;
        for _ in 0..per_stream {
            let t = Instant::now();
            tx.send(create(keys(n), start_revision))
                .await
                .context("watch stream closed")?;
            n += 1;
            // Open the stream after queueing its first request: etcd sends
            // the response headers only with its first response.
            if let Some(rx) = requests.take() {
                let rx = WatchClient::new(channels[i % channels.len()].clone())
                    .watch(ReceiverStream::new(rx))
                    .await
                    .context("cannot open a watch stream")?
                    .into_inner();
                stream = Some(Stream { tx: tx.clone(), rx });
            }
            let Some(s) = stream.as_mut() else { break };
            // The created response; events of unsynced watchers may come first.
            loop {
                let resp = tokio::time::timeout(Duration::from_secs(30), s.rx.message())
                    .await
                    .context("no answer to a watch create in 30 s")??
                    .context("watch stream ended")?;
                if resp.created {
                    results.record(Ok(t.elapsed()));
                    break;
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        opened.extend(stream);
    }
    let elapsed = started.elapsed();
    progress.finish();
    Ok((opened, Stats::new("watch create", results, elapsed)))
}

/// When each put was sent, by the revision it created.
type PutTimes = Arc<Mutex<HashMap<i64, Instant>>>;

/// Reads every stream until `expected` events have arrived in all, timing
/// each event from its put; gives up after `timeout` without progress.
async fn collect_events(
    streams: Vec<Stream>,
    put_times: PutTimes,
    expected: u64,
    progress: &Progress,
) -> Results {
    let seen = Arc::new(AtomicU64::new(0));
    let (all_seen_tx, all_seen) = tokio::sync::watch::channel(false);
    let all_seen_tx = Arc::new(all_seen_tx);
    let done = progress.counter();
    let mut tasks = Vec::new();
    for mut s in streams {
        let (put_times, seen, done) = (put_times.clone(), seen.clone(), done.clone());
        let (all_seen_tx, mut all_seen) = (all_seen_tx.clone(), all_seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut results = Results::default();
            let _keep_open = s.tx;
            loop {
                // Stop when every stream's events are in, not at a timeout.
                let msg = tokio::select! {
                    m = tokio::time::timeout(Duration::from_secs(10), s.rx.message()) => m,
                    _ = all_seen.wait_for(|done| *done) => break,
                };
                let Ok(Ok(Some(resp))) = msg else { break };
                let now = Instant::now();
                for ev in &resp.events {
                    let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    // The put's reply may not be back yet: wait for its time.
                    let sent = loop {
                        if let Some(t) = put_times.lock().ok().and_then(|m| m.get(&rev).copied()) {
                            break Some(t);
                        }
                        if now.elapsed() > Duration::from_secs(10) {
                            break None;
                        }
                        tokio::task::yield_now().await;
                    };
                    match sent {
                        Some(t) => results.record(Ok(now.saturating_duration_since(t))),
                        None => results.record(Err(format!("event of unknown revision {rev}"))),
                    }
                    if seen.fetch_add(1, Ordering::Relaxed) + 1 >= expected {
                        let _ = all_seen_tx.send(true);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            results
        }));
    }
    drop(all_seen);
    let mut all = Results::default();
    for t in tasks {
        if let Ok(r) = t.await {
            all.merge(r);
        }
    }
    let missing = expected.saturating_sub(seen.load(Ordering::Relaxed));
    if missing > 0 {
        all.errors
            .insert("events never received".to_string(), missing);
    }
    all
}

/// Puts `total` values at `rate` per second on the keys `keys(i)`,
/// recording when each revision was sent. Returns the put statistics.
async fn put_values(
    channel: Channel,
    total: u64,
    rate: u64,
    val_size: usize,
    keys: impl Fn(u64) -> Vec<u8>,
    put_times: PutTimes,
) -> Stats {
    let limiter = RateLimiter::new(rate);
    let mut kv = KvClient::new(channel);
    let val = value(val_size);
    let mut results = Results::default();
    let started = Instant::now();
    for i in 0..total {
        limiter.wait().await;
        let t = Instant::now();
        let req = PutRequest {
            key: keys(i),
            value: val.clone(),
            ..Default::default()
        };
        match kv.put(req).await {
            Ok(resp) => {
                let rev = resp.into_inner().header.map_or(0, |h| h.revision);
                if let Ok(mut m) = put_times.lock() {
                    m.insert(rev, t);
                }
                results.record(Ok(t.elapsed()));
            }
            Err(e) => results.record(Err(error_text(e))),
        }
    }
    Stats::new("put", results, started.elapsed())
}

#[derive(Clone, Debug, clap::Args)]
pub struct WatchArgs {
    /// Number of watch streams.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Watchers per stream.
    #[arg(long, default_value_t = 100)]
    pub watch_per_stream: usize,
    /// How many distinct keys the watchers watch.
    #[arg(long, default_value_t = 1)]
    pub watched_key_total: u64,
    /// Puts per second (0 is no limit).
    #[arg(long, default_value_t = 0)]
    pub put_rate: u64,
    /// Number of puts on the watched keys.
    #[arg(long, default_value_t = 1000)]
    pub put_total: u64,
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
}

/// Watchers on `--watched-key-total` keys; reports how fast they are
/// created, the puts, and the delivery of every event to every watcher.
pub async fn watch(target: &Target, w: &WatchArgs) -> anyhow::Result<Vec<Stats>> {
    anyhow::ensure!(
        w.watched_key_total > 0,
        "--watched-key-total must be at least 1"
    );
    let channels = target.connect().await?;
    let keys_total = w.watched_key_total;
    let key_size = w.key_size;
    let (streams, creation) = create_watchers(&channels, w.streams, w.watch_per_stream, 0, |n| {
        key(n as u64 % keys_total, key_size)
    })
    .await?;
    // Watchers per key, to know how many events the puts produce.
    let watchers = (w.streams * w.watch_per_stream) as u64;
    let mut per_key = vec![0u64; keys_total as usize];
    for n in 0..watchers {
        per_key[(n % keys_total) as usize] += 1;
    }
    let expected: u64 = (0..w.put_total)
        .map(|i| per_key[(i % keys_total) as usize])
        .sum();
    let (puts, events) = put_and_collect(
        channels[0].clone(),
        streams,
        w.put_total,
        w.put_rate,
        w.val_size,
        move |i| key(i % keys_total, key_size),
        expected,
    )
    .await;
    Ok(vec![creation, puts, events])
}

/// Runs the puts and the event collection together.
async fn put_and_collect(
    channel: Channel,
    streams: Vec<Stream>,
    put_total: u64,
    put_rate: u64,
    val_size: usize,
    keys: impl Fn(u64) -> Vec<u8> + Send + 'static,
    expected: u64,
) -> (Stats, Stats) {
    let put_times: PutTimes = Arc::default();
    let progress = Progress::start("watch events", expected);
    let started = Instant::now();
    let collector = collect_events(streams, put_times.clone(), expected, &progress);
    let putter = put_values(channel, put_total, put_rate, val_size, keys, put_times);
    let (events, puts) = tokio::join!(collector, putter);
    let elapsed = started.elapsed();
    progress.finish();
    (puts, Stats::new("watch event", events, elapsed))
}

#[derive(Clone, Debug, clap::Args)]
pub struct WatchLatencyArgs {
    /// Number of puts.
    #[arg(long, default_value_t = 10_000)]
    pub put_total: u64,
    /// Puts per second.
    #[arg(long, default_value_t = 100)]
    pub put_rate: u64,
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    #[arg(long, default_value_t = 10)]
    pub watchers_per_stream: usize,
    #[arg(long, default_value_t = 32)]
    pub key_size: usize,
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
}

/// Every watcher watches one key that is put at a steady rate; reports the
/// time from each put to each watcher receiving its event.
pub async fn watch_latency(target: &Target, w: &WatchLatencyArgs) -> anyhow::Result<Vec<Stats>> {
    let channels = target.connect().await?;
    let key_size = w.key_size;
    let (streams, _) = create_watchers(&channels, w.streams, w.watchers_per_stream, 0, |_| {
        key(0, key_size)
    })
    .await?;
    let expected = w.put_total * (w.streams * w.watchers_per_stream) as u64;
    let (puts, events) = put_and_collect(
        channels[0].clone(),
        streams,
        w.put_total,
        w.put_rate,
        w.val_size,
        move |_| key(0, key_size),
        expected,
    )
    .await;
    Ok(vec![puts, events])
}

#[derive(Clone, Debug, clap::Args)]
pub struct WatchGetArgs {
    /// Number of unsynced watchers.
    #[arg(long, default_value_t = 10_000)]
    pub watchers: usize,
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Revisions of the watched key each watcher has to catch up on.
    #[arg(long, default_value_t = 8)]
    pub watch_events: u64,
}

/// Gets while many watchers catch up from old revisions (etcd's test of
/// reads not being starved by unsynced watchers): reports the gets.
pub async fn watch_get(target: &Target, w: &WatchGetArgs) -> anyhow::Result<Vec<Stats>> {
    anyhow::ensure!(w.streams > 0, "--streams must be at least 1");
    let channels = target.connect().await?;
    let mut kv = KvClient::new(channels[0].clone());
    let watch_key = b"watchkey".to_vec();
    let mut first_rev = 0;
    for i in 0..w.watch_events {
        let resp = kv
            .put(PutRequest {
                key: watch_key.clone(),
                value: value(8),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!(error_text(e)))?;
        if i == 0 {
            first_rev = resp.into_inner().header.map_or(1, |h| h.revision);
        }
    }
    // Watchers are created while gets run, as in etcd's benchmark.
    let per_stream = w.watchers.div_ceil(w.streams);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gets = {
        let (channels, clients, stop) = (channels.clone(), target.clients, stop.clone());
        tokio::spawn(async move {
            let call = move |ch: &Channel, _i: u64| -> CallFuture {
                let req = RangeRequest {
                    key: b"abc".to_vec(),
                    ..Default::default()
                };
                let ch = ch.clone();
                Box::pin(async move {
                    (
                        0,
                        KvClient::new(ch)
                            .range(req)
                            .await
                            .map(|_| ())
                            .map_err(error_text),
                    )
                })
            };
            load::run_until("get", &channels, clients, stop, call).await
        })
    };
    let creation = create_watchers(&channels, w.streams, per_stream, first_rev, |_| {
        watch_key.clone()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let gets = gets.await.context("get load failed")?;
    Ok(vec![creation?.1, gets])
}
