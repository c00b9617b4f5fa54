//! `tessera-chaos run`: a control-plane cluster in network namespaces, a
//! workload of clients on every member, a seeded schedule of faults, and
//! the checkers' verdict on what the clients saw. Writes `report.json`
//! (verdicts, faults, the seed to replay) and `history.json` (every
//! operation) into the report directory; exits non-zero on any violation.

mod final_checks;
mod volume;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;
use tessera_chaos::cluster::{Cluster, Spec};
use tessera_chaos::nemesis::{self, DiskFault, Fault, Nemesis, Schedule};
use tessera_chaos::netns::Network;

use crate::workload::Shared;

#[derive(Parser)]
#[command(
    name = "tessera-chaos",
    about = "Fault injection and correctness checks for Tessera"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a workload against a fresh control-plane cluster under a fault
    /// schedule and checks the history.
    Run(RunArgs),
}

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Workload {
    /// Registers, list appends, watches and leases on the control plane;
    /// faults hit its members.
    Control,
    /// A writer on a 4+2 volume over six storage nodes; faults hit the
    /// storage nodes (two in three) and the control plane; at the end a
    /// second writer fences the first (split brain).
    Volume,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The workload, and so which servers the faults hit.
    #[arg(long, value_enum, default_value_t = Workload::Control)]
    workload: Workload,
    /// Faults to inject, comma-separated: partition, pause, kill, disk.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "partition,pause,kill,disk"
    )]
    nemesis: Vec<Nemesis>,
    /// How long the workload and faults run, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Stop earlier once this many operations completed.
    #[arg(long)]
    ops: Option<u64>,
    /// Go on past --seconds (up to three times it) until this many faults
    /// were injected.
    #[arg(long, default_value_t = 0)]
    min_faults: usize,
    /// Seed of the fault schedule and of the clients' choices (default:
    /// from the clock; printed, and written to the report).
    #[arg(long)]
    seed: Option<u64>,
    /// Members of the control plane (1, 3 or 5).
    #[arg(long, default_value_t = 3, value_parser = parse_members)]
    members: usize,
    /// Register clients (spread over the members); list, lease and watch
    /// clients come one per member on top.
    #[arg(long, default_value_t = 6)]
    clients: u64,
    /// Directory for the report, the history and the members' data and
    /// logs (default: ./chaos-<seed>).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The tessera binary (default: next to this one, else on PATH).
    #[arg(long)]
    tessera: Option<PathBuf>,
    /// The tessera-store binary, for the volume workload (default: next to
    /// this one, else on PATH).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Prefix of the network namespaces this run creates.
    #[arg(long, default_value = "tchaos")]
    netns_prefix: String,
    /// Second octet of the run's private subnet (10.N.0.0/24).
    #[arg(long, default_value_t = 77)]
    subnet: u8,
    /// Extra flags for every member.
    #[arg(long, allow_hyphen_values = true)]
    member_flag: Vec<String>,
}

impl RunArgs {
    /// Members' and nodes' data and logs, attach run directories.
    fn data_dir(&self) -> PathBuf {
        self.report.clone().unwrap_or_default().join("data")
    }
}

fn parse_members(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err(format!("members must be 1, 3 or 5, not {s:?}")),
    }
}

/// One fault as the report lists it.
#[derive(Serialize)]
struct FaultRecord {
    started_ms: u64,
    healed_ms: Option<u64>,
    fault: Fault,
    /// Member names, for reading.
    names: String,
}

#[derive(Serialize)]
pub struct Verdict {
    pub checker: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Serialize)]
struct Report {
    seed: u64,
    workload: Workload,
    members: usize,
    nemeses: Vec<Nemesis>,
    seconds: u64,
    replay: String,
    operations_attempted: u64,
    operations_completed: u64,
    faults: Vec<FaultRecord>,
    verdicts: Vec<Verdict>,
    valid: bool,
}

/// Set by SIGINT or SIGTERM: the schedule ends early, and the run heals,
/// checks and cleans up as at its normal end.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Blocks SIGINT and SIGTERM in every thread (called before any other
/// thread starts) and waits for them on a thread of their own.
fn catch_interrupts() {
    // SAFETY: plain signal-mask calls on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || loop {
            let mut signal = 0;
            if libc::sigwait(&set, &mut signal) == 0 {
                if INTERRUPTED.swap(true, Ordering::Relaxed) {
                    eprintln!("tessera-chaos: interrupted again; exiting without cleaning up");
                    std::process::exit(130);
                }
                eprintln!("tessera-chaos: interrupted; healing, checking and cleaning up (again to quit now)");
            }
        });
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    catch_interrupts();
    let Command::Run(args) = cli.command;
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tessera-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `name` next to this binary if it is there, else `name` (from PATH).
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs one schedule; `Ok(valid)`.
fn run(mut args: RunArgs) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let report_dir = args
        .report
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("chaos-{seed}")));
    args.report = Some(report_dir.clone());
    let data_dir = args.data_dir();
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .with_context(|| format!("removing {}", data_dir.display()))?;
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let tessera = args.tessera.clone().unwrap_or_else(|| sibling("tessera"));
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| sibling("tessera-store"));
    let volume_mode = args.workload == Workload::Volume;
    let nemeses: Vec<String> = args
        .nemesis
        .iter()
        .map(|n| format!("{n:?}").to_lowercase())
        .collect();
    let mut replay = format!(
        "tessera-chaos run --workload {} --seed {seed} --seconds {} --members {} --clients {} --nemesis '{}'",
        format!("{:?}", args.workload).to_lowercase(),
        args.seconds,
        args.members,
        args.clients,
        nemeses.join(",")
    );
    if let Some(ops) = args.ops {
        replay.push_str(&format!(" --ops {ops}"));
    }
    if args.min_faults > 0 {
        replay.push_str(&format!(" --min-faults {}", args.min_faults));
    }
    for flag in &args.member_flag {
        replay.push_str(&format!(" --member-flag='{flag}'"));
    }
    eprintln!("seed {seed}; replay with: {replay}");
    eprintln!(
        "report, history and member logs in {}",
        report_dir.display()
    );

    let cluster = Cluster::start(&Spec {
        tessera: &tessera,
        store: Some(&store),
        dir: &data_dir,
        netns_prefix: &args.netns_prefix,
        subnet: args.subnet,
        members: args.members,
        stores: if volume_mode { 6 } else { 0 },
        member_flags: &args.member_flag,
    })
    .context("starting the cluster")?;
    let client_host = cluster.net.hosts[cluster.client_host].clone();
    let cluster = Arc::new(Mutex::new(cluster));

    // The workload runs on one thread inside the client host's namespace
    // (namespaces are per thread): its sockets are that host's.
    let outcome = {
        let cluster = cluster.clone();
        let args = args.clone();
        std::thread::spawn(move || -> anyhow::Result<(Report, workload::History)> {
            Network::enter(&client_host)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_start(move || {
                    if let Err(e) = Network::enter(&client_host) {
                        eprintln!(
                            "tessera-chaos: a runtime thread stayed outside the client host: {e}"
                        );
                    }
                })
                .build()?;
            let outcome = runtime.block_on(drive(args, seed, replay, cluster));
            // A writer still blocked in the kernel must not hold the run.
            runtime.shutdown_timeout(Duration::from_secs(30));
            outcome
        })
        .join()
    };
    // Faults end, the volume is detached (its loop device and FUSE mount
    // removed) and the servers stopped before the report is written, even
    // when the run failed.
    if let Err(e) = lock(&cluster).heal_all() {
        eprintln!("tessera-chaos: healing: {e}");
    }
    if volume_mode {
        // Still attached when the run failed before the final checks
        // detached it.
        let run_dir = volume::run_dir(&data_dir);
        let cli = volume::StoreCli::new(&lock(&cluster), &store);
        volume::detach_or_force(&cli, &run_dir);
        volume::detach_or_force(&cli, &volume::second_run_dir(&run_dir));
    }
    lock(&cluster).stop_all();
    let (report, history) =
        outcome.map_err(|_| anyhow::anyhow!("the workload thread panicked"))??;
    write_json(&report_dir.join("report.json"), &report)?;
    write_json(&report_dir.join("history.json"), &history)?;
    println!(
        "{} operations ({} completed), {} faults",
        report.operations_attempted,
        report.operations_completed,
        report.faults.len()
    );
    for v in &report.verdicts {
        println!(
            "{:<28} {}{}",
            v.checker,
            if v.ok { "ok" } else { "VIOLATION" },
            if v.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", v.detail)
            }
        );
    }
    println!(
        "{} (seed {seed}); report: {}",
        if report.valid { "valid" } else { "INVALID" },
        report_dir.join("report.json").display()
    );
    Ok(report.valid)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(file), value)
        .with_context(|| format!("writing {}", path.display()))
}

/// The member that leads, by asking each member's Status.
async fn leader(endpoints: &[String]) -> Option<usize> {
    let mut ids = Vec::new();
    let mut leaders = Vec::new();
    for endpoint in endpoints {
        let status = async {
            let mut client = workload::connect(endpoint).await.ok()?;
            client.status().await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(1), status).await {
            Ok(Some(s)) => {
                ids.push(s.header().map(|h| h.member_id()));
                leaders.push(s.leader());
            }
            _ => ids.push(None),
        }
    }
    ids.iter()
        .position(|id| id.is_some_and(|id| id != 0 && leaders.contains(&id)))
}

/// The workload, the fault schedule and the checks, inside the client host.
async fn drive(
    args: RunArgs,
    seed: u64,
    replay: String,
    cluster: Arc<Mutex<Cluster>>,
) -> anyhow::Result<(Report, workload::History)> {
    let volume_mode = args.workload == Workload::Volume;
    let (endpoints, member_names, store_names, store_world) = {
        let c = lock(&cluster);
        let names = |p: &tessera_chaos::process::Processes| {
            p.procs.iter().map(|m| m.name.clone()).collect::<Vec<_>>()
        };
        // Storage nodes cut off by a partition lose the client and the
        // control plane too; members keep the client and the storage nodes
        // (they reach an isolated leader, as clients of a real cluster do).
        let store_world: Vec<usize> = c
            .members
            .procs
            .iter()
            .map(|m| m.host)
            .chain([c.client_host])
            .collect();
        (
            c.endpoints(),
            names(&c.members),
            names(&c.stores),
            store_world,
        )
    };
    final_checks::wait_serving(&endpoints, Duration::from_secs(60))
        .await
        .context("the cluster did not start serving")?;
    eprintln!("{} members serving", endpoints.len());

    let shared = Shared::new();
    // Whatever way this returns, clients and the writer stop.
    let mut _stop_on_return = vec![StopOnDrop(shared.stop.clone())];
    let mut tasks = Vec::new();
    let mut watchers = Vec::new();
    let mut volume_run: Option<(volume::Writer, String, volume::StoreCli)> = None;
    if volume_mode {
        let store = args
            .store
            .clone()
            .unwrap_or_else(|| sibling("tessera-store"));
        lock(&cluster).start_stores()?;
        let cli = volume::StoreCli::new(&lock(&cluster), &store);
        let (writer, device) = {
            let run_dir = volume::run_dir(&args.data_dir());
            let cli = cli.clone();
            let stores = store_names.len();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                cli.wait_nodes(stores)?;
                cli.create()?;
                let device = cli.attach(&run_dir)?;
                Ok((volume::Writer::new(Instant::now()), device))
            })
            .await??
        };
        eprintln!(
            "volume {} attached as {device}; writer starts",
            volume::VOLUME
        );
        _stop_on_return.push(StopOnDrop(writer.stop.clone()));
        let w = writer.clone();
        let d = device.clone();
        // Not one of `tasks`: it writes on through the final checks.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = w.run(&d, seed) {
                eprintln!("tessera-chaos: writer: {e:#}");
            }
        });
        volume_run = Some((writer, device, cli));
    } else {
        eprintln!("workload starts");
        for id in 0..args.clients {
            let endpoint = endpoints[id as usize % endpoints.len()].clone();
            tasks.push(tokio::spawn(workload::register_client(
                id + 1,
                endpoint,
                seed,
                shared.clone(),
            )));
        }
        for (i, endpoint) in endpoints.iter().enumerate() {
            let id = 1000 + i as u64;
            tasks.push(tokio::spawn(workload::list_client(
                id,
                endpoint.clone(),
                seed,
                shared.clone(),
            )));
            tasks.push(tokio::spawn(workload::lease_client(
                id,
                endpoint.clone(),
                seed,
                shared.clone(),
            )));
            watchers.push(tokio::spawn(workload::watcher(
                i,
                endpoint.clone(),
                shared.clone(),
            )));
        }
    }

    // The fault schedule, until the time or the operation count is reached.
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut schedule = Schedule::new(seed, &args.nemesis);
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut crashed: Option<String> = None;
    let mut readback_failure: Option<String> = None;
    let mut readbacks = 0;
    let mut last_progress = Instant::now();
    let completed = |shared: &Shared| match &volume_run {
        Some((writer, _, _)) => writer.flushes_ok.load(Ordering::Relaxed),
        None => shared.completed.load(Ordering::Relaxed),
    };
    // Past the time (or operation count) with at least --min-faults made;
    // the schedule goes on for the missing faults up to three times the
    // time asked.
    let hard_deadline = Instant::now() + Duration::from_secs(args.seconds * 3);
    let done = |shared: &Shared, faults: usize| {
        let reached =
            Instant::now() >= deadline || args.ops.is_some_and(|n| completed(shared) >= n);
        (reached && faults >= args.min_faults)
            || Instant::now() >= hard_deadline
            || INTERRUPTED.load(Ordering::Relaxed)
    };
    let progress = |shared: &Shared, faults: usize| match &volume_run {
        Some((writer, _, _)) => format!(
            "{} flushes acknowledged, {} failed, {faults} faults so far",
            writer.flushes_ok.load(Ordering::Relaxed),
            writer.flushes_failed.load(Ordering::Relaxed)
        ),
        None => format!(
            "{} operations completed of {} attempted, {faults} faults so far",
            shared.completed.load(Ordering::Relaxed),
            shared.attempted.load(Ordering::Relaxed)
        ),
    };
    while !done(&shared, faults.len()) && crashed.is_none() {
        sleep_checking(
            &cluster,
            &shared,
            schedule.quiet(),
            &mut crashed,
            &mut last_progress,
            &|s| progress(s, faults.len()),
        )
        .await;
        if done(&shared, faults.len()) || crashed.is_some() {
            break;
        }
        // In the volume workload, faults hit the storage nodes or the
        // control plane under them.
        let stores = volume_mode && schedule.hits_stores();
        let (leader_now, names, world) = if stores {
            (None, &store_names, store_world.clone())
        } else {
            (leader(&endpoints).await, &member_names, Vec::new())
        };
        let Some(fault) = schedule.next(names.len(), leader_now, stores) else {
            continue;
        };
        let hold = schedule.hold();
        let described = describe(&fault, names, leader_now);
        eprintln!(
            "[{:>5.1}s] fault: {described}",
            shared.epoch.elapsed().as_secs_f64()
        );
        // Faults run ip/nft and signal processes: off the clients' thread.
        {
            let (cluster, fault) = (cluster.clone(), fault.clone());
            tokio::task::spawn_blocking(move || {
                let mut cluster = lock(&cluster);
                let (net, targets) = cluster.faultable(stores);
                nemesis::apply(net, targets, &world, &fault)
            })
            .await??;
        }
        faults.push(FaultRecord {
            started_ms: shared.epoch.elapsed().as_millis() as u64,
            healed_ms: None,
            fault: fault.clone(),
            names: described,
        });
        let n = faults.len();
        let failing_reads = matches!(
            fault,
            Fault::Disk {
                fault: DiskFault::ReadEio,
                ..
            }
        );
        if let (true, Some((writer, device, _))) = (failing_reads, &volume_run) {
            // While a node's reads fail, everything must still read back
            // (rebuilt from the other shards), once it serves again.
            tokio::time::sleep(Duration::from_secs(1)).await;
            readbacks += 1;
            if let Err(e) = readback_in_time(writer, device).await? {
                eprintln!(
                    "[{:>5.1}s] readback: {e}",
                    shared.epoch.elapsed().as_secs_f64()
                );
                // Healed below; the run stops then.
                readback_failure.get_or_insert(format!("during fault {n}: {e}"));
            }
        }
        sleep_checking(
            &cluster,
            &shared,
            hold,
            &mut crashed,
            &mut last_progress,
            &|s| progress(s, n),
        )
        .await;
        {
            let (cluster, fault) = (cluster.clone(), fault.clone());
            tokio::task::spawn_blocking(move || {
                let mut cluster = lock(&cluster);
                let (net, targets) = cluster.faultable(stores);
                nemesis::heal(net, targets, &fault)
            })
            .await??;
        }
        if let Some(last) = faults.last_mut() {
            last.healed_ms = Some(shared.epoch.elapsed().as_millis() as u64);
        }
        eprintln!("[{:>5.1}s] healed", shared.epoch.elapsed().as_secs_f64());
        if readback_failure.is_some() {
            break;
        }
        if let Some((writer, device, _)) = &volume_run {
            // Every acknowledged flush must read back once the fault is over.
            readbacks += 1;
            if let Err(e) = readback_in_time(writer, device).await? {
                eprintln!(
                    "[{:>5.1}s] readback: {e}",
                    shared.epoch.elapsed().as_secs_f64()
                );
                readback_failure.get_or_insert(format!("after fault {n}: {e}"));
                break;
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || lock(&cluster).heal_all()).await??;
    }
    eprintln!("workload stopping; faults healed");
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }

    let mut verdicts = vec![Verdict {
        checker: "servers stay up".into(),
        ok: crashed.is_none(),
        detail: crashed.unwrap_or_default(),
    }];
    let attempted;
    let completed_ops;
    if let Some((writer, device, cli)) = volume_run {
        verdicts.push(Verdict {
            checker: "readback after each fault".into(),
            ok: readback_failure.is_none(),
            detail: readback_failure.unwrap_or_else(|| format!("{readbacks} readbacks")),
        });
        let run_dir = volume::run_dir(&args.data_dir());
        let (w, c) = (writer.clone(), cluster.clone());
        let give_up = Arc::new(AtomicBool::new(false));
        let g = give_up.clone();
        let mut checks = tokio::task::spawn_blocking(move || {
            volume::final_checks(&c, &cli, &run_dir, &w, &device, &g)
        });
        match tokio::time::timeout(Duration::from_secs(600), &mut checks).await {
            Ok(joined) => verdicts.extend(joined?),
            Err(_) => {
                verdicts.push(Verdict {
                    checker: "final volume checks".into(),
                    ok: false,
                    detail: "did not finish within 600 s (the writer's I/O stuck?)".into(),
                });
                // They stop at their next step; cleaning up while they
                // still start nodes and attach would leave some behind.
                give_up.store(true, Ordering::Relaxed);
                if tokio::time::timeout(Duration::from_secs(300), checks)
                    .await
                    .is_err()
                {
                    eprintln!("tessera-chaos: the final volume checks are still stuck; cleaning up regardless");
                }
            }
        }
        let (written, acked) = volume::counts(&writer);
        attempted = written as u64;
        completed_ops = acked as u64;
        let writes = std::mem::take(&mut *lock(&writer.writes));
        lock(&shared.history).volume_writes = writes;
    } else {
        verdicts.extend(final_checks::check_everything(&endpoints, &shared, watchers).await);
        attempted = shared.attempted.load(Ordering::Relaxed);
        completed_ops = shared.completed.load(Ordering::Relaxed);
    }
    let history = std::mem::take(&mut *lock(&shared.history));
    let valid = verdicts.iter().all(|v| v.ok);
    let report = Report {
        seed,
        workload: args.workload,
        members: args.members,
        nemeses: args.nemesis.clone(),
        seconds: args.seconds,
        replay,
        operations_attempted: attempted,
        operations_completed: completed_ops,
        faults,
        verdicts,
        valid,
    };
    Ok((report, history))
}

/// Sets its flag when dropped.
pub struct StopOnDrop(pub Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads the volume back (the writer held meanwhile); if its I/O never
/// resumes, the readback never starts: that is a failure too.
async fn readback_in_time(
    writer: &volume::Writer,
    device: &str,
) -> anyhow::Result<Result<(), String>> {
    let (w, d) = (writer.clone(), device.to_string());
    let read = tokio::task::spawn_blocking(move || volume::readback(&w, &d));
    Ok(match tokio::time::timeout(READBACK_TIMEOUT, read).await {
        Ok(joined) => joined??,
        Err(_) => Err(format!(
            "I/O did not resume within {} s",
            READBACK_TIMEOUT.as_secs()
        )),
    })
}

/// How long the readback after a fault may wait for the writer's I/O.
const READBACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Locks `m`, also after a thread panicked holding it (the data is a
/// record or the cluster, still worth reporting and cleaning up).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Sleeps `how_long`, printing progress every 5 s and watching for a server
/// that exits on its own (a crash is a violation: the run then stops).
async fn sleep_checking(
    cluster: &Mutex<Cluster>,
    shared: &Shared,
    how_long: Duration,
    crashed: &mut Option<String>,
    last_progress: &mut Instant,
    progress: &dyn Fn(&Shared) -> String,
) {
    let until = Instant::now() + how_long;
    while Instant::now() < until && crashed.is_none() && !INTERRUPTED.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        if let Err(e) = lock(cluster).check_alive() {
            *crashed = Some(e.to_string());
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            *last_progress = Instant::now();
            eprintln!(
                "[{:>5.1}s] {}",
                shared.epoch.elapsed().as_secs_f64(),
                progress(shared)
            );
        }
    }
}

/// A fault in words, with member names.
fn describe(fault: &Fault, names: &[String], leader: Option<usize>) -> String {
    let name = |m: &usize| {
        let mut n = names[*m].clone();
        if Some(*m) == leader {
            n.push_str(" (leader)");
        }
        n
    };
    let list = |ms: &[usize]| ms.iter().map(name).collect::<Vec<_>>().join(" ");
    match fault {
        Fault::Partition { groups } => format!(
            "partition {}",
            groups
                .iter()
                .map(|g| format!("[{}]", list(g)))
                .collect::<Vec<_>>()
                .join(" | ")
        ),
        Fault::Bridge {
            left,
            right,
            bridge,
        } => format!(
            "bridge [{}] - {} - [{}]",
            list(left),
            name(bridge),
            list(right)
        ),
        Fault::OneWay { from, to } => format!("{} drops everything from {}", name(to), name(from)),
        Fault::LinkDown { member } => format!("link of {} down", name(member)),
        Fault::SlowLink {
            member,
            bytes_per_second,
        } => format!(
            "link of {} slowed to {} KiB/s",
            name(member),
            bytes_per_second >> 10
        ),
        Fault::Pause { member } => format!("SIGSTOP {}", name(member)),
        Fault::Kill { member } => format!("SIGKILL {}", name(member)),
        Fault::Disk { member, fault } => {
            format!("disk of {}: {}", name(member), fault.failpoints())
        }
    }
}
