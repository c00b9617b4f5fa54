//! `volume attach` / `volume detach` and the attach daemon they manage.

use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::attach::{self, AttachState};
use crate::meta::{AttachRecord, Meta};
use crate::volume::{Volume, VolumeOptions};

/// The environment variable naming the pipe the daemon reports on.
const READY_FD: &str = "TESSERA_ATTACH_READY_FD";
/// TTL of the attach record's lease, seconds.
const ATTACH_LEASE_TTL: i64 = 10;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// `volume attach NAME`: starts the attach daemon in a session of its own
/// and waits until it reports the device (or why it could not).
pub async fn attach(
    meta: &Meta,
    endpoints: &[String],
    name: &str,
    run_dir: &Path,
) -> anyhow::Result<String> {
    if meta.volume(name).await?.is_none() {
        bail!("no volume named {name:?}");
    }
    attach::clean_stale(run_dir, name);
    if let Some(state) = attach::read_state(run_dir, name) {
        bail!(
            "volume {name:?} is already attached here as {} (process {}); detach it first",
            state.device,
            state.pid
        );
    }
    let dir = attach::state_dir(run_dir, name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("attach.log"))
        .with_context(|| format!("cannot open {}", dir.join("attach.log").display()))?;
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe(2) into a two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    let mut cmd = Command::new(std::env::current_exe().context("cannot find this program")?);
    cmd.arg("--endpoints")
        .arg(endpoints.join(","))
        .arg("attach-daemon")
        .arg(name)
        .arg("--run-dir")
        .arg(run_dir)
        .env(READY_FD, write_fd.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::close(read_fd);
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the attach daemon")?;
    // SAFETY: we own both ends; the child has its own copy of the write end.
    unsafe { libc::close(write_fd) };
    let mut report = String::new();
    let mut pipe = unsafe { std::fs::File::from_raw_fd(read_fd) };
    let pid = child.id();
    tokio::task::spawn_blocking(move || pipe.read_to_string(&mut report).map(|_| report))
        .await?
        .context("cannot read the attach daemon's report")
        .and_then(|report| match report.trim().split_once(' ') {
            Some(("ok", device)) => Ok(device.to_string()),
            Some(("error", why)) => bail!("{why}"),
            _ => bail!(
                "the attach daemon (process {pid}) stopped without reporting; see {}",
                dir.join("attach.log").display()
            ),
        })
}

/// `volume detach NAME`: removes the loop device, stops the daemon (which
/// flushes) and waits for it.
pub fn detach(run_dir: &Path, name: &str) -> anyhow::Result<()> {
    attach::clean_stale(run_dir, name);
    let Some(state) = attach::read_state(run_dir, name) else {
        bail!("volume {name:?} is not attached on this machine");
    };
    attach::loop_detach(&state.device)?;
    // SAFETY: a plain kill(2).
    unsafe { libc::kill(state.pid as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while attach::process_alive(state.pid) {
        if std::time::Instant::now() > deadline {
            bail!(
                "the attach daemon (process {}) did not stop within 60 s",
                state.pid
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    attach::clean_stale(run_dir, name);
    Ok(())
}

/// Reports to `volume attach` through the inherited pipe.
struct Reporter(Option<std::fs::File>);

impl Reporter {
    fn from_env() -> Reporter {
        let fd = std::env::var(READY_FD)
            .ok()
            .and_then(|v| v.parse::<RawFd>().ok());
        // SAFETY: the fd was inherited for exactly this use.
        Reporter(fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) }))
    }

    fn send(&mut self, line: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The attach daemon: the volume's writer, its FUSE file and loop device,
/// until SIGTERM (or SIGINT).
pub async fn run(
    meta: Meta,
    name: String,
    run_dir: PathBuf,
    options: VolumeOptions,
) -> anyhow::Result<()> {
    let mut reporter = Reporter::from_env();
    match serve(&meta, &name, &run_dir, options, &mut reporter).await {
        Ok(()) => Ok(()),
        Err(e) => {
            reporter.send(&format!("error {e:#}"));
            Err(e)
        }
    }
}

async fn serve(
    meta: &Meta,
    name: &str,
    run_dir: &Path,
    options: VolumeOptions,
    reporter: &mut Reporter,
) -> anyhow::Result<()> {
    let volume = Volume::open(meta, name, options).await?;
    let epoch = volume.epoch();
    let lease = meta.keep_lease(ATTACH_LEASE_TTL).await?;
    let mut record = AttachRecord {
        host: hostname(),
        pid: std::process::id(),
        device: String::new(),
        epoch,
    };
    meta.set_attached(name, &record, lease.id).await?;
    let mountpoint = attach::state_dir(run_dir, name).join("mnt");
    let mounted = attach::mount(Arc::new(volume.clone()), &mountpoint)?;
    let device = match attach::loop_attach(&mounted.file) {
        Ok(d) => d,
        Err(e) => {
            drop(mounted);
            return Err(e);
        }
    };
    let state = AttachState {
        volume: name.to_string(),
        pid: std::process::id(),
        device: device.clone(),
        mountpoint: mountpoint.clone(),
        epoch,
        started: attach::now_secs(),
    };
    attach::write_state(run_dir, &state)?;
    record.device = device.clone();
    meta.set_attached(name, &record, lease.id).await?;
    tracing::info!(volume = name, %device, epoch, "attached");
    reporter.send(&format!("ok {device}"));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(volume = name, "detaching");
    // The loop device first (normally `volume detach` removed it already),
    // so nothing more arrives; then everything written is made durable.
    if Path::new(&format!(
        "/sys/block/{}",
        device.trim_start_matches("/dev/")
    ))
    .exists()
    {
        let _ = attach::loop_detach(&device);
    }
    let flushed = volume.close().await;
    drop(mounted);
    lease.revoke().await;
    let _ = meta.clear_attached(name, epoch).await;
    let _ = std::fs::remove_file(attach::state_dir(run_dir, name).join("state.json"));
    flushed.context("the last flush failed")?;
    tracing::info!(volume = name, "detached");
    Ok(())
}
