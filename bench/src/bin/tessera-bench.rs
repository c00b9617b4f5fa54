//! `tessera-bench`: a load generator with the subcommands and flags of
//! etcd's `benchmark` tool, for tessera or any etcd v3 endpoint.

use clap::{Parser, Subcommand};
use tessera_bench::load::Target;
use tessera_bench::report::Stats;
use tessera_bench::workload::{kv, lease, watch};

#[derive(Parser)]
#[command(about = "A low-level benchmark tool for etcd v3 APIs (tessera or etcd)")]
struct Cli {
    /// gRPC endpoints, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    endpoints: Vec<String>,
    /// Total number of gRPC connections.
    #[arg(long, default_value_t = 1, global = true)]
    conns: usize,
    /// Total number of gRPC clients.
    #[arg(long, default_value_t = 1, global = true)]
    clients: usize,
    /// Use full floating point precision.
    #[arg(long, global = true)]
    precise: bool,
    /// Output format: text (etcd's report) or json (one object per report).
    #[arg(long, default_value = "text", global = true)]
    output: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark put.
    Put(kv::WriteArgs),
    /// Benchmark range.
    Range(kv::RangeArgs),
    /// Benchmark txn with puts.
    TxnPut(kv::TxnPutArgs),
    /// Benchmark a mixed load of txn-put and txn-range.
    TxnMixed(kv::TxnMixedArgs),
    /// Benchmark watch: creation, puts, and delivery to every watcher.
    Watch(watch::WatchArgs),
    /// Benchmark the latency from a put to its watch events.
    WatchLatency(watch::WatchLatencyArgs),
    /// Benchmark gets while many unsynced watchers catch up.
    WatchGet(watch::WatchGetArgs),
    /// Benchmark lease keep-alives.
    LeaseKeepalive(lease::LeaseArgs),
}

// The load generator allocates per request; glibc's malloc cost it a fifth
// of its CPU, which the server it measures then could not use.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.output == "text" || cli.output == "json",
        "unknown --output {:?} (expected text or json)",
        cli.output
    );
    let target = Target {
        endpoints: cli.endpoints.clone(),
        conns: cli.conns,
        clients: cli.clients,
    };
    let reports: Vec<Stats> = match &cli.command {
        Command::Put(a) => kv::put(&target, a).await?,
        Command::Range(a) => kv::range(&target, a).await?,
        Command::TxnPut(a) => kv::txn_put(&target, a).await?,
        Command::TxnMixed(a) => kv::txn_mixed(&target, a).await?,
        Command::Watch(a) => watch::watch(&target, a).await?,
        Command::WatchLatency(a) => watch::watch_latency(&target, a).await?,
        Command::WatchGet(a) => watch::watch_get(&target, a).await?,
        Command::LeaseKeepalive(a) => lease::keepalive(&target, a).await?,
    };
    for r in &reports {
        if cli.output == "json" {
            println!("{}", r.json());
        } else {
            if reports.len() > 1 {
                println!("\n{} report:", r.op);
            }
            print!("{}", r.text(cli.precise));
        }
    }
    Ok(())
}
