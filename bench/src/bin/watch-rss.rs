//! Memory held by idle watchers and by one stalled watch stream, measured for
//! tessera and etcd in the same run:
//! 1. open `--watchers` watches on keys nobody writes, spread over
//!    `--streams` gRPC streams, and read RSS;
//! 2. open one more stream watching `hot/` and never read it, write
//!    `--writes` values of `--value-size` bytes under `hot/`, read RSS again.
//!
//! Prints a Markdown table with both servers and tessera/etcd ratios.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tessera_bench::server::BenchServer;
use tessera_proto::etcdserverpb::kv_client::KvClient;
use tessera_proto::etcdserverpb::watch_client::WatchClient;
use tessera_proto::etcdserverpb::watch_request::RequestUnion;
use tessera_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    /// The tessera binary.
    #[arg(long, default_value = "target/release/tessera")]
    tessera: PathBuf,
    /// The reference etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    watchers: usize,
    #[arg(long, default_value_t = 100)]
    streams: usize,
    #[arg(long, default_value_t = 5_000)]
    writes: usize,
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
}

struct Sample {
    base: u64,
    idle: u64,
    stalled: u64,
}

fn watch_create(key: &[u8], prefix: bool) -> WatchRequest {
    let range_end = if prefix {
        let mut end = key.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    } else {
        Vec::new()
    };
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.to_vec(),
            range_end,
            ..Default::default()
        })),
    }
}

async fn measure(server: &BenchServer, args: &Args) -> anyhow::Result<Sample> {
    let base = server.rss_kib()?;
    let per_stream = args.watchers.div_ceil(args.streams);
    let mut held = Vec::new();
    let started = Instant::now();
    for s in 0..args.streams {
        let (tx, rx) = mpsc::channel(per_stream + 1);
        for w in 0..per_stream {
            tx.send(watch_create(format!("idle/{s}/{w}").as_bytes(), false))
                .await?;
        }
        let mut client = WatchClient::connect(server.url.clone()).await?;
        let mut responses = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        for _ in 0..per_stream {
            responses.message().await?.context("watch stream ended")?;
        }
        held.push((tx, responses));
        if s % 10 == 9 {
            eprintln!(
                "{}: {} watchers open ({:.1?})",
                server.name,
                (s + 1) * per_stream,
                started.elapsed()
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = server.rss_kib()?;

    // The stalled stream: created, then never read again.
    let (tx, rx) = mpsc::channel(2);
    tx.send(watch_create(b"hot/", true)).await?;
    let mut client = WatchClient::connect(server.url.clone()).await?;
    let stalled = client.watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut kv = KvClient::connect(server.url.clone()).await?;
    let value = vec![b'x'; args.value_size];
    for i in 0..args.writes {
        kv.put(PutRequest {
            key: format!("hot/{}", i % 1000).into_bytes(),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
        if i % 1000 == 999 {
            eprintln!("{}: {} writes", server.name, i + 1);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_rss = server.rss_kib()?;
    drop((stalled, tx, held));
    Ok(Sample {
        base,
        idle,
        stalled: stalled_rss,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut samples = Vec::new();
    for (name, binary) in [("tessera", &args.tessera), ("etcd", &args.etcd)] {
        let server = BenchServer::start(name, binary, dir.path()).await?;
        samples.push((name, measure(&server, &args).await?));
    }
    println!(
        "{} idle watchers on {} streams; one stalled stream over {} writes of {} B\n",
        args.watchers, args.streams, args.writes, args.value_size
    );
    println!("| server | RSS at start (MiB) | + idle watchers (MiB) | + stalled stream (MiB) |");
    println!("|---|---|---|---|");
    for (name, s) in &samples {
        println!(
            "| {name} | {} | {} | {} |",
            mib(s.base),
            mib(s.idle),
            mib(s.stalled)
        );
    }
    let (t, e) = (&samples[0].1, &samples[1].1);
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    println!(
        "| tessera / etcd | {:.2} | {:.2} | {:.2} |",
        ratio(t.base, e.base),
        ratio(t.idle, e.idle),
        ratio(t.stalled, e.stalled)
    );
    Ok(())
}
