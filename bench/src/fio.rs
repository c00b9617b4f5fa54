//! The volume benchmark's jobs, `fio`'s JSON output, and the report.
//!
//! `bench/volume-fio.sh` builds the block devices; `fio-volume run` runs
//! [`JOBS`] on each (Debian's `fio`, libaio, direct I/O) and measures the
//! CPU time of the processes serving the device around every job;
//! `fio-volume report` turns the results directory into the tables of
//! `BENCHMARKS.md`, with the ratios the data-plane issue asks for.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// One fio job of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Job {
    pub name: &'static str,
    pub describe: &'static str,
    pub rw: &'static str,
    pub block_size: &'static str,
    pub iodepth: u32,
    /// `fsync` after every write (the sync-latency job).
    pub fsync_each: bool,
}

/// In order: the writes come before the reads of the same pattern, so
/// reads find written data (an unwritten block of a Tessera volume is
/// answered without touching a node).
pub const JOBS: [Job; 5] = [
    Job {
        name: "seq-write",
        describe: "sequential write 1 MiB, QD16",
        rw: "write",
        block_size: "1M",
        iodepth: 16,
        fsync_each: false,
    },
    Job {
        name: "seq-read",
        describe: "sequential read 1 MiB, QD16",
        rw: "read",
        block_size: "1M",
        iodepth: 16,
        fsync_each: false,
    },
    Job {
        name: "rand-write",
        describe: "random write 4 KiB, QD32",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 32,
        fsync_each: false,
    },
    Job {
        name: "rand-read",
        describe: "random read 4 KiB, QD32",
        rw: "randread",
        block_size: "4k",
        iodepth: 32,
        fsync_each: false,
    },
    Job {
        name: "sync-write",
        describe: "random write 4 KiB + fsync, QD1",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 1,
        fsync_each: true,
    },
];

pub fn job(name: &str) -> Option<&'static Job> {
    JOBS.iter().find(|j| j.name == name)
}

impl Job {
    /// fio's arguments for this job on `device`: `runtime_s` seconds after
    /// a `ramp_s` warm-up, over the first `size` of the device.
    pub fn fio_args(&self, device: &Path, size: &str, runtime_s: u32, ramp_s: u32) -> Vec<String> {
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--filename={}", device.display()),
            "--ioengine=libaio".into(),
            "--direct=1".into(),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.block_size),
            format!("--iodepth={}", self.iodepth),
            format!("--size={size}"),
            "--time_based".into(),
            format!("--runtime={runtime_s}"),
            format!("--ramp_time={ramp_s}"),
            "--randrepeat=0".into(),
            "--output-format=json".into(),
        ];
        if self.fsync_each {
            args.push("--fsync=1".into());
        }
        if self.rw.contains("write") {
            // What a write job buffered is made durable inside the job, so
            // its cost is not charged to the next one.
            args.push("--end_fsync=1".into());
        }
        args
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FioError {
    #[error("not fio JSON output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("fio output has {0}")]
    Shape(String),
    #[error("fio reported error {0} for the job")]
    JobFailed(i64),
}

/// What one job measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub bytes: u64,
    pub mib_s: f64,
    pub iops: f64,
    /// Completion latency percentiles, µs; for the sync job, the write's
    /// plus the `fsync`'s at the same percentile.
    pub p50_us: f64,
    pub p99_us: f64,
}

fn percentile(section: &Value, p: &str) -> Option<f64> {
    section.get("percentile")?.get(p)?.as_f64()
}

/// Parses fio's `--output-format=json` for one job (fio may print notes
/// before the JSON; they are skipped).
pub fn parse(output: &str) -> Result<Measured, FioError> {
    let start = output
        .find('{')
        .ok_or_else(|| FioError::Shape("no JSON object".into()))?;
    // The first JSON value; whatever fio prints after it is not ours.
    let doc: Value = serde_json::Deserializer::from_str(&output[start..])
        .into_iter::<Value>()
        .next()
        .ok_or_else(|| FioError::Shape("no JSON object".into()))??;
    let job = doc
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| FioError::Shape("no jobs".into()))?;
    let error = job.get("error").and_then(Value::as_i64).unwrap_or(0);
    if error != 0 {
        return Err(FioError::JobFailed(error));
    }
    let moved = |dir: &str| {
        job.get(dir)
            .and_then(|d| d.get("io_bytes"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let dir = if moved("write") >= moved("read") {
        "write"
    } else {
        "read"
    };
    let section = &job[dir];
    let bytes = moved(dir);
    if bytes == 0 {
        return Err(FioError::Shape("no I/O done".into()));
    }
    let number = |key: &str| {
        section
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| FioError::Shape(format!("no {dir}.{key}")))
    };
    let clat = &section["clat_ns"];
    let lat = |p: &str| {
        let write = percentile(clat, p)
            .ok_or_else(|| FioError::Shape(format!("no {dir} clat percentile {p}")))?;
        // With --fsync=1 each op waits for its fsync too: fio reports
        // those apart, under "sync" (a job that synced must have them).
        let synced = job
            .get("sync")
            .and_then(|s| s.get("total_ios"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let sync = match job
            .get("sync")
            .and_then(|s| s.get("lat_ns"))
            .and_then(|l| percentile(l, p))
        {
            Some(ns) => ns,
            None if synced == 0 => 0.0,
            None => return Err(FioError::Shape(format!("no sync latency percentile {p}"))),
        };
        Ok::<f64, FioError>((write + sync) / 1000.0)
    };
    Ok(Measured {
        bytes,
        mib_s: number("bw_bytes")? / (1 << 20) as f64,
        iops: number("iops")?,
        p50_us: lat("50.000000")?,
        p99_us: lat("99.000000")?,
    })
}

/// CPU seconds (user + system) a process has used, from `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parens.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// The devices of the report, in order, with the names the table shows.
pub const DEVICES: [(&str, &str); 4] = [
    ("loop", "(a) loop device on a local file"),
    ("attach", "(b) attach path alone (FUSE + loop, local file)"),
    ("tessera", "(c) Tessera 4+2, six local nodes"),
    ("gluster", "(d) GlusterFS dispersed 4+2 + loop"),
];

/// One device's result for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub measured: Measured,
    /// Server CPU seconds per GiB moved; None where no process serves it.
    pub cpu_s_per_gib: Option<f64>,
}

/// Results by job name, then device label.
pub type Results = BTreeMap<String, BTreeMap<String, Row>>;

/// Reads `DIR/LABEL.JOB.json` (and `.cpu`, the CPU seconds of the
/// device's servers during the job, when there are servers).
pub fn load(dir: &Path) -> anyhow::Result<Results> {
    use anyhow::Context;
    let mut results = Results::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".json") else {
            continue;
        };
        let Some((label, job_name)) = stem.split_once('.') else {
            continue;
        };
        if job(job_name).is_none() {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let measured = parse(&text).with_context(|| format!("{}", path.display()))?;
        let cpu = std::fs::read_to_string(dir.join(format!("{stem}.cpu")))
            .ok()
            .and_then(|c| c.trim().parse::<f64>().ok());
        let gib = measured.bytes as f64 / (1u64 << 30) as f64;
        results.entry(job_name.to_string()).or_default().insert(
            label.to_string(),
            Row {
                cpu_s_per_gib: cpu.map(|c| c / gib),
                measured,
            },
        );
    }
    Ok(results)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

/// The markdown tables: one per job (every device), then the ratios of
/// Tessera (c) to the attach path (b), the local disk (a) and GlusterFS
/// (d), in throughput and in p99 latency.
pub fn render(results: &Results) -> String {
    let mut out = String::new();
    for job in &JOBS {
        let Some(rows) = results.get(job.name) else {
            continue;
        };
        out.push_str(&format!(
            "\n**{}** (`{}`)\n\n| device | MiB/s | IOPS | p50 µs | p99 µs | server CPU s/GiB |\n|---|---|---|---|---|---|\n",
            job.describe, job.name
        ));
        for (label, name) in DEVICES {
            let Some(row) = rows.get(label) else { continue };
            let m = &row.measured;
            out.push_str(&format!(
                "| {name} | {:.1} | {:.0} | {:.0} | {:.0} | {} |\n",
                m.mib_s,
                m.iops,
                m.p50_us,
                m.p99_us,
                row.cpu_s_per_gib.map_or("–".into(), |c| format!("{c:.2}"))
            ));
        }
    }
    out.push_str(
        "\n**Ratios** (Tessera 4+2 = c; throughput: higher is better; p99: c's over the other's, lower is better)\n\n\
         | job | c/b | c/a | c/d | p99 c/b | p99 c/d |\n|---|---|---|---|---|---|\n",
    );
    for job in &JOBS {
        let Some(rows) = results.get(job.name) else {
            continue;
        };
        let bw = |l: &str| rows.get(l).map(|r| r.measured.mib_s);
        let p99 = |l: &str| rows.get(l).map(|r| r.measured.p99_us);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            job.name,
            ratio(bw("tessera"), bw("attach")),
            ratio(bw("tessera"), bw("loop")),
            ratio(bw("tessera"), bw("gluster")),
            ratio(p99("tessera"), p99("attach")),
            ratio(p99("tessera"), p99("gluster")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from a real fio 3.33 run of the sync job (--fsync=1).
    const SYNC_JOB: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "sync-write", "error" : 0,
      "read" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0,
                 "clat_ns" : { "N" : 0 } },
      "write" : { "io_bytes" : 11837440, "bw_bytes" : 11825614, "iops" : 2887.112887,
                  "clat_ns" : { "N" : 2890, "percentile" : { "50.000000" : 60000, "99.000000" : 150000 } } },
      "sync" : { "total_ios" : 2889,
                 "lat_ns" : { "N" : 2889, "percentile" : { "50.000000" : 250000, "99.000000" : 900000 } } }
    }
  ]
}"#;

    #[test]
    fn the_sync_job_adds_the_fsync_to_each_write() {
        let m = parse(SYNC_JOB).unwrap();
        assert_eq!(m.bytes, 11837440);
        assert!((m.mib_s - 11825614.0 / 1048576.0).abs() < 1e-9);
        assert!((m.iops - 2887.112887).abs() < 1e-9);
        assert_eq!((m.p50_us, m.p99_us), (310.0, 1050.0));
    }

    #[test]
    fn a_read_job_reports_its_reads() {
        let text = r#"{"jobs":[{"error":0,
            "read":{"io_bytes":2097152,"bw_bytes":1048576,"iops":256.0,
                    "clat_ns":{"percentile":{"50.000000":1000,"99.000000":5000}}},
            "write":{"io_bytes":0,"bw_bytes":0,"iops":0.0,"clat_ns":{"N":0}}}]}"#;
        let m = parse(text).unwrap();
        assert_eq!((m.bytes, m.mib_s, m.iops), (2097152, 1.0, 256.0));
        assert_eq!((m.p50_us, m.p99_us), (1.0, 5.0));
    }

    #[test]
    fn failed_or_empty_jobs_and_garbage_are_errors() {
        assert!(matches!(
            parse(r#"{"jobs":[{"error":5}]}"#),
            Err(FioError::JobFailed(5))
        ));
        assert!(matches!(
            parse(r#"{"jobs":[{"error":0,"read":{"io_bytes":0},"write":{"io_bytes":0}}]}"#),
            Err(FioError::Shape(_))
        ));
        assert!(parse("fio: pid=0, err=2/file:filesetup.c").is_err());
        assert!(parse(r#"{"jobs":[]}"#).is_err());
        // A job that synced without sync latencies: an error, not a zero.
        let no_sync_lat = SYNC_JOB.replace(
            r#""percentile" : { "50.000000" : 250000, "99.000000" : 900000 }"#,
            r#""N" : 0"#,
        );
        assert!(
            matches!(parse(&no_sync_lat), Err(FioError::Shape(_))),
            "{no_sync_lat}"
        );
        // Trailing output after the JSON is ignored.
        assert_eq!(
            parse(&format!("{SYNC_JOB}\nfio: trailing note")).unwrap(),
            parse(SYNC_JOB).unwrap()
        );
        // Latency percentiles missing: an error, not a zero.
        assert!(
            parse(r#"{"jobs":[{"error":0,"write":{"io_bytes":1,"bw_bytes":1,"iops":1}}]}"#)
                .is_err()
        );
    }

    fn row(mib_s: f64, p99_us: f64) -> Row {
        Row {
            measured: Measured {
                bytes: 1 << 30,
                mib_s,
                iops: mib_s * 256.0,
                p50_us: p99_us / 2.0,
                p99_us,
            },
            cpu_s_per_gib: Some(1.5),
        }
    }

    #[test]
    fn the_report_has_every_device_and_the_ratios() {
        let mut results = Results::new();
        let rows = results.entry("seq-write".into()).or_default();
        rows.insert("loop".into(), row(1000.0, 100.0));
        rows.insert("attach".into(), row(500.0, 200.0));
        rows.insert("tessera".into(), row(250.0, 400.0));
        rows.insert("gluster".into(), row(100.0, 800.0));
        let text = render(&results);
        assert!(
            text.contains(
                "| (c) Tessera 4+2, six local nodes | 250.0 | 64000 | 200 | 400 | 1.50 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| seq-write | 0.50 | 0.25 | 2.50 | 2.00 | 0.50 |"),
            "{text}"
        );
        // A device that did not run shows as a dash, not as a number.
        results.get_mut("seq-write").unwrap().remove("gluster");
        let text = render(&results);
        assert!(
            text.contains("| seq-write | 0.50 | 0.25 | – | 2.00 | – |"),
            "{text}"
        );
        assert!(!text.contains("GlusterFS"), "{text}");
    }

    #[test]
    fn cpu_seconds_of_this_process_grow_with_work() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_seconds(pid).unwrap() > before);
        assert!(cpu_seconds(u32::MAX).is_none());
    }
}
