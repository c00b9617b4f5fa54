//! `tessera-store`: a storage node (`serve`), and the admin verbs for
//! volumes and nodes, against the control plane named by `--endpoints`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::time::Duration;

use tessera_store::cli::{self, parse_duration, parse_size, CreateRequest, DEFAULT_SEGMENT_SIZE};
use tessera_store::daemon::Target;
use tessera_store::meta::Meta;
use tessera_store::node::{self, NodeConfig};
use tessera_store::repair::RepairOptions;
use tessera_store::shardlog::LogOptions;
use tessera_store::snapshots::{self, CloneSource};
use tessera_store::volume::VolumeOptions;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tessera-store",
    version,
    about = "Erasure-coded storage nodes and the volumes on them"
)]
struct Cli {
    /// The control plane (etcd v3 API), comma-separated.
    #[arg(
        long,
        global = true,
        env = "TESSERA_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, Default, PartialEq)]
enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a storage node.
    Serve(ServeArgs),
    /// Create, list, inspect, delete, attach and detach volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Point-in-time snapshots of volumes.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Inspect, drain and scrub storage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Self-healing: how far repair is.
    #[command(subcommand)]
    Repair(RepairCommand),
    /// The I/O process of an attached volume (started by `volume attach`).
    #[command(hide = true)]
    AttachDaemon {
        name: String,
        /// NAME is a snapshot, served read-only.
        #[arg(long)]
        snapshot: bool,
        #[arg(long, default_value = "/run/tessera-store")]
        run_dir: PathBuf,
        /// The name recorded as the volume's host (default: the host name;
        /// tessera-csi gives its node id).
        #[arg(long)]
        host: Option<String>,
    },
    /// The attach path without the store: a local file served through the
    /// same FUSE file and loop device (for benchmarks). Prints the device,
    /// then serves until SIGTERM or SIGINT.
    #[command(hide = true)]
    AttachLocal {
        /// The backing file (created, and sized to --size).
        #[arg(long)]
        file: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Where the FUSE file is mounted (created).
        #[arg(long)]
        mountpoint: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// This node's name (unique in the cluster).
    #[arg(long)]
    name: String,
    /// Where shards are kept.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the node's gRPC service.
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Address clients reach the service at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Failure domain: shards of a segment spread over zones.
    #[arg(long, default_value = "default")]
    zone: String,
    /// Space offered, e.g. 100GiB.
    #[arg(long, default_value = "100GiB", value_parser = parse_size)]
    capacity: u64,
    /// Address of `/metrics` and `/health` (off when not given).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// How the shard log reaches the disk: auto, uring or syscall.
    #[arg(long, env = "TESSERA_WAL_IO", default_value = "auto")]
    io: String,
    /// Size of each shard log file.
    #[arg(long, default_value = "256MiB", value_parser = parse_size, hide = true)]
    log_file_size: u64,
    /// How long a node may be gone before its shards are rebuilt on other
    /// nodes (e.g. 30s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    repair_delay: Duration,
    /// Shard bytes repair rebuilds a second, at most (e.g. 64MiB; 0: no
    /// limit), so foreground I/O goes on.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    repair_bandwidth: u64,
    /// Bytes a second the background scrubber reads (0: no background
    /// scrubbing; `node scrub` still runs a pass).
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    scrub_rate: u64,
    /// Rest between background scrub passes.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    scrub_interval: Duration,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume: empty, or a copy-on-write clone of a snapshot or
    /// of a volume (nothing is copied).
    Create {
        name: String,
        /// Size, e.g. 10GiB, 512MiB or bytes (a clone's defaults to its
        /// source's).
        #[arg(long, value_parser = parse_size, required_unless_present_any = ["from_snapshot", "from_volume"])]
        size: Option<u64>,
        /// Clone this snapshot (its code and segment size are the clone's).
        #[arg(long, conflicts_with_all = ["from_volume", "data_shards", "parity_shards", "write_quorum", "segment_size"])]
        from_snapshot: Option<String>,
        /// Clone this volume as it last flushed it (attached or not).
        #[arg(long, conflicts_with_all = ["data_shards", "parity_shards", "write_quorum", "segment_size"])]
        from_volume: Option<String>,
        #[arg(long, default_value_t = 4)]
        data_shards: u32,
        #[arg(long, default_value_t = 2)]
        parity_shards: u32,
        /// Shards that must be durable before a flush is answered (default k+1).
        #[arg(long)]
        write_quorum: Option<u32>,
        /// Unit of placement.
        #[arg(long, default_value_t = DEFAULT_SEGMENT_SIZE, value_parser = parse_size)]
        segment_size: u64,
    },
    /// List volumes.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Placement, epoch, health and attachment of a volume.
    Info {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a volume (not while attached); its space is given back once
    /// no snapshot or clone reads it.
    Delete { name: String },
    /// Grow a volume, attached or not (never shrink).
    Expand {
        name: String,
        /// The new size, e.g. 20GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Make a volume a block device on this machine; prints its path.
    Attach {
        name: String,
        #[arg(long, default_value = "/run/tessera-store")]
        run_dir: PathBuf,
    },
    /// Flush and remove the block device of an attached volume.
    Detach {
        name: String,
        #[arg(long, default_value = "/run/tessera-store")]
        run_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a volume, attached or not.
    Create { volume: String, name: String },
    /// List snapshots, of one volume or all.
    List {
        volume: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Size, creation time and source of a snapshot.
    Info {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a snapshot; its space is given back once no clone reads it.
    Delete { name: String },
    /// Make a snapshot a read-only block device on this machine.
    Attach {
        name: String,
        #[arg(long, default_value = "/run/tessera-store")]
        run_dir: PathBuf,
    },
    /// Remove the block device of an attached snapshot.
    Detach {
        name: String,
        #[arg(long, default_value = "/run/tessera-store")]
        run_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Every registered node: address, zone, alive, draining, capacity, used.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Move every shard off a node before it is retired (repair does it,
    /// at once; `repair status` shows progress).
    Drain { name: String },
    /// Run a scrub pass on a node now: every block read and verified,
    /// rotten ones rebuilt from the other shards.
    Scrub {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum RepairCommand {
    /// Segments healthy, degraded and in repair; bytes left, rate, ETA.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},h2=warn,tower=warn"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("tessera-store: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    init_logging(&cli.log_level);
    tessera_storage::failpoint::announce();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tessera-store: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-store: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let endpoints = cli.endpoints;
    match cli.command {
        Command::Serve(a) => {
            let io_mode =
                a.io.parse()
                    .map_err(|e: String| anyhow::anyhow!("--io: {e}"))?;
            let config = NodeConfig {
                advertise: a.advertise.unwrap_or_else(|| a.listen.to_string()),
                name: a.name,
                data_dir: a.data_dir,
                listen: a.listen,
                zone: a.zone,
                capacity: a.capacity,
                endpoints,
                metrics_listen: a.metrics_listen,
                log: LogOptions {
                    file_size: a.log_file_size,
                    io_mode,
                },
                repair: RepairOptions {
                    delay: a.repair_delay,
                    bandwidth: a.repair_bandwidth,
                    ..RepairOptions::default()
                },
                scrub_rate: a.scrub_rate,
                scrub_interval: a.scrub_interval,
            };
            node::serve(config, shutdown()).await
        }
        Command::AttachDaemon {
            name,
            snapshot,
            run_dir,
            host,
        } => {
            let meta = Meta::connect(&endpoints).await?;
            let target = if snapshot {
                Target::Snapshot(name)
            } else {
                Target::Volume(name)
            };
            tessera_store::daemon::run(meta, target, run_dir, host, VolumeOptions::default()).await
        }
        Command::AttachLocal {
            file,
            size,
            mountpoint,
        } => tessera_store::daemon::serve_local(&file, size, &mountpoint).await,
        Command::Volume(v) => volume(&endpoints, v).await,
        Command::Snapshot(s) => snapshot(&endpoints, s).await,
        Command::Node(n) => node_command(&endpoints, n).await,
        Command::Repair(RepairCommand::Status { output }) => {
            let meta = Meta::connect(&endpoints).await?;
            let report = cli::repair_status(&meta).await?;
            match output {
                Output::Table => print!("{}", cli::repair_text(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
    }
}

async fn volume(endpoints: &[String], command: VolumeCommand) -> anyhow::Result<()> {
    if let VolumeCommand::Detach { name, run_dir } = &command {
        return tessera_store::daemon::detach(run_dir, &Target::Volume(name.clone()));
    }
    let meta = Meta::connect(endpoints).await?;
    match command {
        VolumeCommand::Create {
            name,
            size,
            from_snapshot,
            from_volume,
            data_shards,
            parity_shards,
            write_quorum,
            segment_size,
        } => {
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(CloneSource::Snapshot(s)),
                (None, Some(v)) => Some(CloneSource::Volume(v)),
                (None, None) => None,
            };
            let record = match source {
                Some(source) => snapshots::create_clone(&meta, &name, source, size)
                    .await
                    .with_context(|| format!("cannot create clone {name:?}"))?,
                None => {
                    cli::create_volume(
                        &meta,
                        &CreateRequest {
                            name,
                            size: size.unwrap_or(0),
                            data_shards,
                            parity_shards,
                            write_quorum,
                            segment_size,
                        },
                    )
                    .await?
                }
            };
            println!(
                "created volume {} ({}, {}+{}, {} segments)",
                record.name,
                cli::format_size(record.size),
                record.data_shards,
                record.parity_shards,
                record.segments.len()
            );
        }
        VolumeCommand::List { output } => {
            let mut rows = Vec::new();
            for v in meta.volumes().await? {
                let attached = meta.attached(&v.name).await?;
                rows.push((v, attached));
            }
            match output {
                Output::Table => print!("{}", cli::volumes_table(&rows)),
                Output::Json => {
                    let list: Vec<&tessera_store::meta::VolumeRecord> =
                        rows.iter().map(|(v, _)| v).collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                }
            }
        }
        VolumeCommand::Info { name, output } => {
            let info = cli::volume_info(&meta, &name).await?;
            match output {
                Output::Table => print!("{}", cli::info_text(&info)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
            }
        }
        VolumeCommand::Delete { name } => {
            let record = cli::delete_volume(&meta, &name)
                .await
                .with_context(|| format!("cannot delete volume {name:?}"))?;
            println!(
                "deleted volume {} ({})",
                record.name,
                cli::format_size(record.size)
            );
        }
        VolumeCommand::Expand { name, size } => {
            let (old, record) = cli::expand_volume(&meta, &name, size).await?;
            if old == record.size {
                println!("volume {name} is already {}", cli::format_size(old));
                return Ok(());
            }
            println!(
                "expanded volume {name} from {} to {}",
                cli::format_size(old),
                cli::format_size(record.size)
            );
            if let Some(device) = cli::wait_for_device_size(&meta, &name, record.size).await? {
                println!("device {device} is now {}", cli::format_size(record.size));
            }
        }
        VolumeCommand::Attach { name, run_dir } => {
            let target = Target::Volume(name);
            let device = tessera_store::daemon::attach(
                &meta,
                endpoints,
                &target,
                &run_dir,
                &tessera_store::daemon::Launcher::this_program()?,
            )
            .await?;
            println!("{device}");
        }
        VolumeCommand::Detach { .. } => {}
    }
    Ok(())
}

async fn snapshot(endpoints: &[String], command: SnapshotCommand) -> anyhow::Result<()> {
    if let SnapshotCommand::Detach { name, run_dir } = &command {
        return tessera_store::daemon::detach(run_dir, &Target::Snapshot(name.clone()));
    }
    let meta = Meta::connect(endpoints).await?;
    match command {
        SnapshotCommand::Create { volume, name } => {
            let started = std::time::Instant::now();
            let snap =
                snapshots::create_snapshot(&meta, &volume, &name, snapshots::SNAPSHOT_TIMEOUT)
                    .await
                    .with_context(|| format!("cannot snapshot volume {volume:?}"))?;
            println!(
                "created snapshot {} of volume {} ({}) in {:.3} s",
                snap.name,
                snap.volume,
                cli::format_size(snap.size),
                started.elapsed().as_secs_f64()
            );
        }
        SnapshotCommand::List { volume, output } => {
            let list = snapshots::snapshot_infos(&meta, volume.as_deref()).await?;
            match output {
                Output::Table => print!("{}", snapshots::snapshots_table(&list)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
            }
        }
        SnapshotCommand::Info { name, output } => {
            let info = snapshots::snapshot_infos(&meta, None)
                .await?
                .into_iter()
                .find(|s| s.name == name)
                .with_context(|| format!("no snapshot named {name:?}"))?;
            match output {
                Output::Table => print!("{}", snapshots::snapshot_text(&info)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
            }
        }
        SnapshotCommand::Delete { name } => {
            let kept = snapshots::delete_snapshot(&meta, &name)
                .await
                .with_context(|| format!("cannot delete snapshot {name:?}"))?;
            if kept {
                println!("deleted snapshot {name} (its data stays while clones read it)");
            } else {
                println!("deleted snapshot {name}");
            }
        }
        SnapshotCommand::Attach { name, run_dir } => {
            let target = Target::Snapshot(name);
            let device = tessera_store::daemon::attach(
                &meta,
                endpoints,
                &target,
                &run_dir,
                &tessera_store::daemon::Launcher::this_program()?,
            )
            .await?;
            println!("{device}");
        }
        SnapshotCommand::Detach { .. } => {}
    }
    Ok(())
}

async fn node_command(endpoints: &[String], command: NodeCommand) -> anyhow::Result<()> {
    let meta = Meta::connect(endpoints).await?;
    match command {
        NodeCommand::List { output } => {
            let nodes = meta.nodes().await?;
            match output {
                Output::Table => print!("{}", cli::nodes_table(&nodes)),
                Output::Json => println!("{}", cli::nodes_json(&nodes)),
            }
        }
        NodeCommand::Drain { name } => {
            cli::drain_node(&meta, &name)
                .await
                .with_context(|| format!("cannot drain node {name:?}"))?;
            println!("draining node {name}: its shards move to other nodes (see `repair status`)");
        }
        NodeCommand::Scrub { name, output } => {
            let report = cli::scrub_node(&meta, &name)
                .await
                .with_context(|| format!("cannot scrub node {name:?}"))?;
            match output {
                Output::Table => println!(
                    "node {name}: {} blocks checked, {} bad, {} repaired, {} not repairable",
                    report.checked_blocks,
                    report.bad_blocks,
                    report.repaired_blocks,
                    report.unrepaired_blocks
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "node": name,
                        "checked_blocks": report.checked_blocks,
                        "bad_blocks": report.bad_blocks,
                        "repaired_blocks": report.repaired_blocks,
                        "unrepaired_blocks": report.unrepaired_blocks,
                    })
                ),
            }
        }
    }
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
