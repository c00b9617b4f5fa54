//! Side-by-side comparison of tessera and Debian's etcd: each is started in
//! turn with identical flags (one member, then three on loopback), the same
//! workloads run against both in the same run, and the results are written
//! as a table of ratios (tessera / etcd) into BENCHMARKS.md.
//!
//! Workloads (8-byte keys, 256-byte values, as the targets in the bench
//! issue): put from `--clients` clients over `--conns` connections to all
//! members; linearizable range of one key; and, on one member, the peak RSS
//! and disk use with `--rss-keys` keys loaded. When etcd's own `benchmark`
//! tool is on PATH, its put throughput is recorded for both servers too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tessera_bench::load::Target;
use tessera_bench::report::Stats;
use tessera_bench::server::BenchServer;
use tessera_bench::workload::kv::{self, RangeArgs, WriteArgs};

#[derive(Parser)]
struct Args {
    /// The tessera binary.
    #[arg(long, default_value = "target/release/tessera")]
    tessera: PathBuf,
    /// The reference etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Cluster sizes to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    members: Vec<usize>,
    /// Requests per throughput workload.
    #[arg(long, default_value_t = 100_000)]
    total: u64,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Runs of each throughput workload; the median (by req/s) is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Keys loaded for the peak-RSS measurement (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    rss_keys: u64,
    /// Rewrite the generated section of this file (BENCHMARKS.md).
    #[arg(long)]
    write: Option<PathBuf>,
}

/// One measured row: a workload on one server.
struct Row {
    workload: String,
    members: usize,
    server: &'static str,
    stats: Option<Stats>,
    /// etcd's `benchmark` tool's requests/sec, when it ran.
    etcd_tool_rps: Option<f64>,
    /// Server CPU time (all members) per request of the workload, in µs.
    cpu_us_per_request: Option<f64>,
    peak_rss_kib: u64,
    disk_bytes: u64,
}

const SERVERS: [&str; 2] = ["etcd", "tessera"];
const KEY_SIZE: usize = 8;
const VAL_SIZE: usize = 256;

fn write_args(total: u64, key_space: u64) -> WriteArgs {
    WriteArgs {
        total,
        rate: 0,
        key_size: KEY_SIZE,
        val_size: VAL_SIZE,
        key_space_size: key_space,
        sequential_keys: true,
    }
}

/// etcd's `benchmark` binary, if installed.
fn etcd_tool() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("benchmark"))
        .find(|p| p.is_file())
}

/// Runs etcd's `benchmark put` with the same settings; its Requests/sec.
fn run_etcd_tool(tool: &Path, server: &BenchServer, args: &Args) -> Option<f64> {
    let endpoints = server
        .endpoints()
        .iter()
        .map(|u| u.trim_start_matches("http://").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = std::process::Command::new(tool)
        .arg(format!("--endpoints={endpoints}"))
        .arg(format!("--conns={}", args.conns))
        .arg(format!("--clients={}", args.clients))
        .args(["put", "--sequential-keys"])
        .arg(format!("--key-size={KEY_SIZE}"))
        .arg(format!("--val-size={VAL_SIZE}"))
        .arg(format!("--total={}", args.total))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn measure(
    server_name: &'static str,
    binary: &Path,
    members: usize,
    args: &Args,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start_cluster(server_name, binary, dir.path(), members).await?;
    let target = Target {
        endpoints: server.endpoints(),
        conns: args.conns,
        clients: args.clients,
    };
    eprintln!("== {server_name}, {members} member(s)");
    let put_args = write_args(args.total, args.total);
    let (put, put_cpu) = median_run(&server, args, || kv::put(&target, &put_args)).await?;
    let etcd_tool_rps = etcd_tool().and_then(|t| run_etcd_tool(&t, &server, args));
    rows.push(Row {
        workload: "put".into(),
        members,
        server: server_name,
        stats: put,
        etcd_tool_rps,
        cpu_us_per_request: put_cpu,
        peak_rss_kib: server.peak_rss_kib()?,
        disk_bytes: server.disk_bytes(),
    });
    kv::put(&target, &write_args(1, 1)).await?; // the key ranges read
    let range = RangeArgs {
        key: String::from_utf8_lossy(&tessera_bench::workload::key(0, KEY_SIZE)).into_owned(),
        end_range: None,
        total: args.total,
        rate: 0,
        consistency: "l".into(),
        limit: 0,
        count_only: false,
    };
    let (range, range_cpu) = median_run(&server, args, || kv::range(&target, &range)).await?;
    rows.push(Row {
        workload: "range (linearizable)".into(),
        members,
        server: server_name,
        stats: range,
        etcd_tool_rps: None,
        cpu_us_per_request: range_cpu,
        peak_rss_kib: server.peak_rss_kib()?,
        disk_bytes: server.disk_bytes(),
    });
    drop(server);

    if members == 1 && args.rss_keys > 0 {
        let dir = tempfile::tempdir()?;
        let server = BenchServer::start(server_name, binary, dir.path()).await?;
        let target = Target {
            endpoints: server.endpoints(),
            conns: args.conns,
            clients: args.clients,
        };
        kv::put(&target, &write_args(args.rss_keys, args.rss_keys)).await?;
        // Let background work (compaction, flushes) settle before reading.
        tokio::time::sleep(Duration::from_secs(5)).await;
        rows.push(Row {
            workload: format!("load {} keys", args.rss_keys),
            members,
            server: server_name,
            stats: None,
            etcd_tool_rps: None,
            cpu_us_per_request: None,
            peak_rss_kib: server.peak_rss_kib()?,
            disk_bytes: server.disk_bytes(),
        });
    }
    Ok(rows)
}

/// Runs a workload `--repeat` times on `server` and keeps the run with the
/// median throughput, with the server CPU per request it took (runs on a
/// shared 2-core machine vary by 10-20% from one to the next).
async fn median_run<F, Fut>(
    server: &BenchServer,
    args: &Args,
    workload: F,
) -> anyhow::Result<(Option<Stats>, Option<f64>)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Stats>>>,
{
    let mut runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        let before = server.cpu_time()?;
        let stats = workload().await?.into_iter().next();
        let cpu = server.cpu_time()?.saturating_sub(before);
        if let Some(stats) = stats {
            let cpu_us = cpu.as_secs_f64() * 1e6 / stats.requests.max(1) as f64;
            runs.push((stats, cpu_us));
        }
    }
    runs.sort_by(|a, b| a.0.requests_per_sec.total_cmp(&b.0.requests_per_sec));
    let median = runs.len() / 2;
    Ok(match runs.into_iter().nth(median) {
        Some((stats, cpu)) => (Some(stats), Some(cpu)),
        None => (None, None),
    })
}

fn ms(secs: f64) -> String {
    format!("{:.1}", secs * 1000.0)
}

fn ratio(t: f64, e: f64) -> String {
    if e > 0.0 {
        format!("{:.2}", t / e)
    } else {
        "–".into()
    }
}

/// The Markdown tables: one row per workload, etcd and tessera side by side.
fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | members | etcd req/s | tessera req/s | ratio | etcd p50 / p99 ms | tessera p50 / p99 ms | p99 ratio | etcd CPU µs/req | tessera CPU µs/req | CPU ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    let pairs = rows
        .iter()
        .filter(|r| r.server == "etcd" && r.stats.is_some())
        .filter_map(|e| {
            let t = rows.iter().find(|t| {
                t.server == "tessera" && t.workload == e.workload && t.members == e.members
            })?;
            Some((e, t))
        });
    for (e, t) in pairs {
        let (Some(es), Some(ts)) = (&e.stats, &t.stats) else {
            continue;
        };
        let errors = |st: &Stats| {
            let n: u64 = st.errors.values().sum();
            if n > 0 {
                format!(" ({n} errors)")
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0}{} | {:.0}{} | {} | {} / {} | {} / {} | {} | {:.0} | {:.0} | {} |",
            e.workload,
            e.members,
            es.requests_per_sec,
            errors(es),
            ts.requests_per_sec,
            errors(ts),
            ratio(ts.requests_per_sec, es.requests_per_sec),
            ms(es.percentile(50.0)),
            ms(es.percentile(99.0)),
            ms(ts.percentile(50.0)),
            ms(ts.percentile(99.0)),
            ratio(ts.percentile(99.0), es.percentile(99.0)),
            e.cpu_us_per_request.unwrap_or(0.0),
            t.cpu_us_per_request.unwrap_or(0.0),
            ratio(
                t.cpu_us_per_request.unwrap_or(0.0),
                e.cpu_us_per_request.unwrap_or(0.0)
            ),
        );
    }
    let _ = writeln!(
        s,
        "\n| after | members | etcd peak RSS MiB | tessera peak RSS MiB | ratio | etcd disk MiB | tessera disk MiB | ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for e in rows.iter().filter(|r| r.server == "etcd") {
        let Some(t) = rows
            .iter()
            .find(|t| t.server == "tessera" && t.workload == e.workload && t.members == e.members)
        else {
            continue;
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        let dmib = |b: u64| b as f64 / (1 << 20) as f64;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} |",
            e.workload,
            e.members,
            mib(e.peak_rss_kib),
            mib(t.peak_rss_kib),
            ratio(t.peak_rss_kib as f64, e.peak_rss_kib as f64),
            dmib(e.disk_bytes),
            dmib(t.disk_bytes),
            ratio(t.disk_bytes as f64, e.disk_bytes as f64),
        );
    }
    let tool: Vec<&Row> = rows.iter().filter(|r| r.etcd_tool_rps.is_some()).collect();
    if !tool.is_empty() {
        let _ = writeln!(s, "\netcd's own `benchmark put` (same flags):\n");
        for r in tool {
            let _ = writeln!(
                s,
                "- {} member(s), {}: {:.0} req/s",
                r.members,
                r.server,
                r.etcd_tool_rps.unwrap_or(0.0)
            );
        }
    }
    s
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1 << 20) as f64);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

const START: &str = "<!-- bench-compare:start -->";
const END: &str = "<!-- bench-compare:end -->";

/// Replaces the generated section of `path` (appends it the first time).
fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    tessera_bench::sections::replace(path, START, END, section)
}

// The load runs in this process: the same allocator as tessera-bench.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let etcd_version = std::process::Command::new(&args.etcd)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .with_context(|| format!("cannot run {}", args.etcd.display()))?;
    let mut rows = Vec::new();
    for &members in &args.members {
        for server in SERVERS {
            let binary = if server == "etcd" {
                &args.etcd
            } else {
                &args.tessera
            };
            rows.extend(measure(server, binary, members, &args).await?);
        }
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let section = format!(
        "## etcd vs tessera, side by side\n\n\
         Generated by `bench/compare.sh` (`{command}`) on {}.\n\
         Machine: {}. Reference: {etcd_version}.\n\
         put: {} requests, {} clients over {} connections to all members, \
         {KEY_SIZE}-byte sequential keys, {VAL_SIZE}-byte values; range: the same \
         number of linearizable reads of one key. Each is run {} times per \
         server; the table shows the run with the median req/s. Ratios are tessera / etcd \
         (above 1 is better for req/s, below 1 is better for latency, CPU, memory and disk). \
         The load generator runs on the same machine, so req/s is bounded by \
         server and client together; server CPU per request (user + system, \
         all members) compares the servers' own cost.\n\n{}\n",
        utc_date(),
        machine(),
        args.total,
        args.clients,
        args.conns,
        args.repeat.max(1),
        table(&rows)
    );
    print!("{section}");
    if let Some(path) = &args.write {
        write_section(path, &section)?;
    }
    Ok(())
}

/// Today's date (UTC) from `date`, to stamp the measurement.
fn utc_date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
