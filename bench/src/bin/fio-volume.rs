//! `fio-volume`: the volume benchmark's measuring half (the devices are
//! built by `bench/volume-fio.sh`).
//!
//! - `fio-volume run --device DEV --label L --results DIR [--pid P]...`:
//!   every job of the benchmark on DEV, one after the other; fio's JSON in
//!   `DIR/L.JOB.json`, and the CPU seconds the given server processes used
//!   during the job in `DIR/L.JOB.cpu`;
//! - `fio-volume report --results DIR [--write BENCHMARKS.md]`: the tables.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tessera_bench::fio::{self, JOBS};

#[derive(Parser)]
#[command(
    name = "fio-volume",
    about = "fio jobs on block devices, and their report"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every job on a device.
    Run {
        #[arg(long)]
        device: PathBuf,
        /// The device's name in the report: loop, attach, tessera, gluster.
        #[arg(long)]
        label: String,
        #[arg(long)]
        results: PathBuf,
        /// Processes serving the device, whose CPU time is counted.
        #[arg(long)]
        pid: Vec<u32>,
        /// Seconds measured per job (after the warm-up).
        #[arg(long, default_value_t = 15)]
        runtime: u32,
        /// Seconds of warm-up per job, not measured.
        #[arg(long, default_value_t = 2)]
        ramp: u32,
        /// How much of the device the jobs cover (fio's --size).
        #[arg(long, default_value = "1G")]
        size: String,
        /// Only these jobs (default: all).
        #[arg(long)]
        job: Vec<String>,
    },
    /// Print (and optionally write into a file) the report's tables.
    Report {
        #[arg(long)]
        results: PathBuf,
        /// Replace the generated section of this file (BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
        /// The heading's text above the tables (the command and date).
        #[arg(long, default_value = "")]
        preamble: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            device,
            label,
            results,
            pid,
            runtime,
            ramp,
            size,
            job,
        } => {
            for name in &job {
                if fio::job(name).is_none() {
                    bail!("no job named {name:?}");
                }
            }
            std::fs::create_dir_all(&results)?;
            for j in JOBS
                .iter()
                .filter(|j| job.is_empty() || job.contains(&j.name.to_string()))
            {
                eprintln!(
                    "fio-volume: {label}: {} ({} s)...",
                    j.describe,
                    runtime + ramp
                );
                let fio = Command::new("fio")
                    .args(j.fio_args(&device, &size, runtime, ramp))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .context("cannot run fio (apt-get install fio)")?;
                // fio counts bytes after its warm-up only: so does the CPU.
                std::thread::sleep(std::time::Duration::from_secs(ramp.into()));
                let cpu_before = cpu_of(&pid)?;
                let out = fio.wait_with_output().context("fio")?;
                let cpu_used = cpu_of(&pid)? - cpu_before;
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    bail!(
                        "fio {} on {}: {}{}",
                        j.name,
                        device.display(),
                        String::from_utf8_lossy(&out.stderr).trim(),
                        text.trim()
                    );
                }
                let measured = fio::parse(&text)?;
                eprintln!(
                    "fio-volume: {label}: {}: {:.1} MiB/s, {:.0} IOPS, p99 {:.0} µs",
                    j.name, measured.mib_s, measured.iops, measured.p99_us
                );
                let file = |ext: &str| results.join(format!("{label}.{}.{ext}", j.name));
                std::fs::write(file("json"), text.as_bytes())?;
                if !pid.is_empty() {
                    std::fs::write(file("cpu"), format!("{cpu_used:.3}\n"))?;
                }
            }
            Ok(())
        }
        Cmd::Report {
            results,
            write,
            preamble,
        } => {
            let loaded = fio::load(&results)?;
            if loaded.is_empty() {
                bail!("no fio results in {}", results.display());
            }
            let section = format!("{preamble}{}", fio::render(&loaded));
            print!("{section}");
            if let Some(path) = write {
                write_section(&path, &section)?;
            }
            Ok(())
        }
    }
}

/// CPU seconds the processes have used so far; all must be alive.
fn cpu_of(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter()
        .map(|&p| fio::cpu_seconds(p).with_context(|| format!("process {p} is gone")))
        .sum()
}

const START: &str = "<!-- fio-volume:start -->";
const END: &str = "<!-- fio-volume:end -->";

fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    tessera_bench::sections::replace(path, START, END, section)
}
