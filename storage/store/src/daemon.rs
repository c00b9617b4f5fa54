//! `volume attach` / `volume detach` and the attach daemon they manage.

use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::attach::{self, AttachState};
use crate::meta::{now_secs, AttachRecord, LeaseGuard, Meta, SnapshotRecord};
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

/// What an attach daemon serves.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A volume, read and written: the daemon is its writer.
    Volume(String),
    /// A snapshot, read-only.
    Snapshot(String),
}

impl Target {
    /// Its name under the run directory (snapshots and volumes may share
    /// names; `:` is in no volume name).
    pub fn key(&self) -> String {
        match self {
            Target::Volume(name) => name.clone(),
            Target::Snapshot(name) => format!("snapshot:{name}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Volume(name) => format!("volume {name:?}"),
            Target::Snapshot(name) => format!("snapshot {name:?}"),
        }
    }
}

/// How attach daemons are started: the program (`tessera-store`), and the
/// name of this machine they record as the volume's host.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub program: PathBuf,
    /// Default: the kernel's host name.
    pub host: Option<String>,
}

impl Launcher {
    /// This very program (`tessera-store` itself).
    pub fn this_program() -> anyhow::Result<Launcher> {
        Ok(Launcher {
            program: std::env::current_exe().context("cannot find this program")?,
            host: None,
        })
    }
}

/// `volume attach NAME` / `snapshot attach NAME`: starts the attach daemon
/// in a session of its own and waits until it reports the device (or why
/// it could not).
pub async fn attach(
    meta: &Meta,
    endpoints: &[String],
    target: &Target,
    run_dir: &Path,
    launcher: &Launcher,
) -> anyhow::Result<String> {
    match target {
        Target::Volume(name) => {
            if meta.volume(name).await?.is_none() {
                bail!("no volume named {name:?}");
            }
        }
        Target::Snapshot(name) => {
            if meta.snapshot(name).await?.is_none_or(|s| s.deleted) {
                bail!("no snapshot named {name:?}");
            }
        }
    }
    let key = target.key();
    let name = key.as_str();
    attach::clean_stale(run_dir, name);
    if let Some(state) = attach::read_state(run_dir, name) {
        bail!(
            "{} is already attached here as {} (process {}); detach it first",
            target.describe(),
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
    let mut cmd = Command::new(&launcher.program);
    cmd.arg("--endpoints")
        .arg(endpoints.join(","))
        .arg("attach-daemon");
    if let Some(host) = &launcher.host {
        cmd.arg("--host").arg(host);
    }
    match target {
        Target::Volume(volume) => cmd.arg(volume),
        Target::Snapshot(snapshot) => cmd.arg(snapshot).arg("--snapshot"),
    };
    cmd.arg("--run-dir")
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

/// `volume detach NAME` / `snapshot detach NAME`: removes the loop device,
/// stops the daemon (which flushes) and waits for it.
pub fn detach(run_dir: &Path, target: &Target) -> anyhow::Result<()> {
    let key = target.key();
    let name = key.as_str();
    attach::clean_stale(run_dir, name);
    let Some(state) = attach::read_state(run_dir, name) else {
        bail!("{} is not attached on this machine", target.describe());
    };
    // SIGTERM goes to an attach daemon only, never to a process that
    // reused a dead one's number (clean_stale above handled those).
    attach::loop_detach_own(&state.device, &state.file())?;
    // SAFETY: a plain kill(2).
    unsafe { libc::kill(state.pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while attach::attach_daemon_alive(state.pid) {
        if Instant::now() > deadline {
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

/// The attach daemon: the volume's writer (or a snapshot's reader), its
/// FUSE file and loop device, until SIGTERM (or SIGINT).
pub async fn run(
    meta: Meta,
    target: Target,
    run_dir: PathBuf,
    host: Option<String>,
    options: VolumeOptions,
) -> anyhow::Result<()> {
    let mut reporter = Reporter::from_env();
    let host = host.unwrap_or_else(hostname);
    match serve(&meta, &target, &run_dir, host, options, &mut reporter).await {
        Ok(()) => Ok(()),
        Err(e) => {
            reporter.send(&format!("error {e:#}"));
            Err(e)
        }
    }
}

/// How often a writer whose attach lease expired tries to record itself
/// again.
const RENEWAL_INTERVAL: Duration = Duration::from_secs(2);

/// How often the daemon looks at the control plane for new placements,
/// a larger size, deleted snapshots and snapshot requests.
const CONTROL_INTERVAL: Duration = Duration::from_millis(500);

async fn serve(
    meta: &Meta,
    target: &Target,
    run_dir: &Path,
    host: String,
    options: VolumeOptions,
    reporter: &mut Reporter,
) -> anyhow::Result<()> {
    let key = target.key();
    // A volume's writer is recorded before it opens (and bumps the epoch):
    // a snapshot taken without a writer either sees it or is seen by it.
    let mut lease = None;
    let mut record = AttachRecord {
        host,
        pid: std::process::id(),
        device: String::new(),
        epoch: 0,
        size: 0,
    };
    if let Target::Volume(name) = target {
        let guard = meta.keep_lease(ATTACH_LEASE_TTL).await?;
        meta.set_attached(name, &record, guard.id).await?;
        lease = Some(guard);
    }
    let opened = match target {
        Target::Volume(name) => Volume::open(meta, name, options).await,
        Target::Snapshot(name) => Volume::open_snapshot(meta, name, options).await,
    };
    let volume = match opened {
        Ok(v) => v,
        Err(e) => {
            if let (Target::Volume(name), Some(lease)) = (target, lease) {
                lease.revoke().await;
                let _ = meta.clear_attached(name, 0).await;
            }
            return Err(e.into());
        }
    };
    let epoch = volume.epoch();
    record.epoch = epoch;
    record.size = volume.size();
    if let (Target::Volume(name), Some(lease)) = (target, &lease) {
        meta.set_attached(name, &record, lease.id).await?;
    }
    let mountpoint = attach::state_dir(run_dir, &key).join("mnt");
    let mounted = attach::mount(Arc::new(volume.clone()), &mountpoint)?;
    let device = match attach::loop_attach(&mounted.file, !volume.writable()) {
        Ok(d) => d,
        Err(e) => {
            drop(mounted);
            return Err(e);
        }
    };
    let state = AttachState {
        volume: key.clone(),
        pid: std::process::id(),
        device: device.clone(),
        mountpoint: mountpoint.clone(),
        epoch,
        started: attach::now_secs(),
    };
    attach::write_state(run_dir, &state)?;
    record.device = device.clone();
    if let (Target::Volume(name), Some(lease)) = (target, &lease) {
        meta.set_attached(name, &record, lease.id).await?;
    }
    tracing::info!(target = %key, %device, epoch, "attached");
    reporter.send(&format!("ok {device}"));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut control = tokio::time::interval(CONTROL_INTERVAL);
    control.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Snapshot requests are answered as they arrive (the poll above is
    // the fallback should the watch end).
    let mut requests = match target {
        Target::Volume(name) => meta.watch_snapshot_requests(name).await.ok(),
        Target::Snapshot(_) => None,
    };
    let attached = Attached {
        meta,
        volume: &volume,
        target,
        device: &device,
        file: &mounted.file,
    };
    let mut next_renewal = Instant::now();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = next_request(&mut requests) => {
                if !changed {
                    tracing::warn!("the snapshot request watch ended; polling only");
                    requests = None;
                    continue;
                }
                attached.serve_snapshot_requests().await;
            }
            _ = control.tick() => {
                if let Some(size) = attached.follow_control_plane().await {
                    record.size = size;
                    if let (Target::Volume(name), Some(lease)) = (target, &lease) {
                        let _ = meta.update_attached(name, &record, lease.id).await;
                    }
                }
                if let (Target::Volume(name), Some(old)) = (target, &lease) {
                    if old.expired() && volume.fenced().is_none() && Instant::now() >= next_renewal {
                        next_renewal = Instant::now() + RENEWAL_INTERVAL;
                        match renew_record(meta, name, &record).await {
                            Renewal::Renewed(renewed) => lease = Some(*renewed),
                            Renewal::MovedOn => lease = None,
                            Renewal::NotYet => {}
                        }
                    }
                }
            }
        }
    }
    tracing::info!(target = %key, "detaching");
    // The loop device first (normally `volume detach` removed it already),
    // so nothing more arrives; then everything written is made durable.
    let _ = attach::loop_detach_own(&device, &mounted.file);
    let flushed = volume.close().await;
    drop(mounted);
    if let (Target::Volume(name), Some(lease)) = (target, lease) {
        // Closed cleanly: a snapshot taken without a writer need not fence
        // this epoch first (see `snapshots::create_snapshot`).
        if flushed.is_ok() && volume.fenced().is_none() {
            if let Err(e) = meta.mark_closed(name, epoch).await {
                tracing::warn!(target = %key, error = %e, "cannot record the clean close");
            }
        }
        lease.revoke().await;
        let _ = meta.clear_attached(name, epoch).await;
    }
    let _ = std::fs::remove_file(attach::state_dir(run_dir, &key).join("state.json"));
    flushed.context("the last flush failed")?;
    tracing::info!(target = %key, "detached");
    Ok(())
}

enum Renewal {
    Renewed(Box<LeaseGuard>),
    /// A newer writer attached or a snapshot fenced this one: the record
    /// is not this writer's to keep any more.
    MovedOn,
    NotYet,
}

/// The writer's attach lease expired while it was cut off from the
/// control plane, and with it the record: records it again under a new
/// lease, unless a newer writer attached or a snapshot fenced this one
/// meanwhile (then the nodes refuse its writes and it says so).
async fn renew_record(meta: &Meta, name: &str, record: &AttachRecord) -> Renewal {
    let lease = match meta.keep_lease(ATTACH_LEASE_TTL).await {
        Ok(lease) => lease,
        Err(e) => {
            tracing::warn!(volume = name, error = %e, "cannot take a new attach lease yet");
            return Renewal::NotYet;
        }
    };
    match meta.reattach(name, record, lease.id).await {
        Ok(true) => {
            tracing::warn!(
                volume = name,
                "the attach lease had expired: recorded again under a new one"
            );
            Renewal::Renewed(Box::new(lease))
        }
        Ok(false) => {
            tracing::error!(
                volume = name,
                "the attach lease expired and the volume moved on: not recorded again"
            );
            lease.revoke().await;
            Renewal::MovedOn
        }
        Err(e) => {
            tracing::warn!(volume = name, error = %e, "cannot record the writer again yet");
            lease.revoke().await;
            Renewal::NotYet
        }
    }
}

/// `attach-local`: a local file behind the attach path (FUSE file and
/// loop device), until SIGTERM or SIGINT; prints the device on stdout.
/// What this costs against a bare loop device is the attach path's own
/// overhead.
pub async fn serve_local(file: &Path, size: u64, mountpoint: &Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a SIGTERM during start-up must still clean up.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let backend = attach::LocalFile::open(file, size)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let mounted = attach::mount(Arc::new(backend), mountpoint)?;
    let device = attach::loop_attach(&mounted.file, false)?;
    let mut out = std::io::stdout();
    let reported = writeln!(out, "{device}").and_then(|()| out.flush());
    if reported.is_ok() {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    // The loop device goes on every path, or the mount could not go.
    let detached = attach::loop_detach_own(&device, &mounted.file);
    drop(mounted);
    reported.context("cannot report the device")?;
    detached
}

/// The next change to the snapshot requests; never, without a watch.
async fn next_request(watch: &mut Option<crate::meta::SnapshotRequestWatch>) -> bool {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// An attached volume as the control loop sees it.
struct Attached<'a> {
    meta: &'a Meta,
    volume: &'a Volume,
    target: &'a Target,
    device: &'a str,
    file: &'a Path,
}

impl Attached<'_> {
    /// One round of the control loop: catches up with placements, size
    /// and snapshots; takes the snapshots asked of this writer. Returns
    /// the device's new size when it grew.
    async fn follow_control_plane(&self) -> Option<u64> {
        let mut grown = None;
        match self.volume.refresh(self.meta).await {
            Ok(changes) => {
                if changes.moved > 0 {
                    tracing::info!(shards = changes.moved, "shards placed on other nodes");
                }
                if let Some(size) = changes.grown {
                    match self.grow_device() {
                        Ok(()) => {
                            tracing::info!(device = %self.device, size, "the device grew");
                            grown = Some(size);
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot grow the device")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot refresh from the control plane"),
        }
        self.serve_snapshot_requests().await;
        grown
    }

    /// Takes the snapshots asked of this writer.
    async fn serve_snapshot_requests(&self) {
        if let Target::Volume(name) = self.target {
            match self.meta.snapshot_requests(name).await {
                Ok(asked) => {
                    for snapshot in asked {
                        self.take_snapshot(name, &snapshot).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read snapshot requests"),
            }
        }
    }

    /// The FUSE file reports the new size at once (its attributes are not
    /// cached); the loop device is told to re-read it.
    fn grow_device(&self) -> anyhow::Result<()> {
        std::fs::metadata(self.file).context("cannot stat the device file")?;
        attach::loop_resize(self.device)
    }

    async fn take_snapshot(&self, volume: &str, name: &str) {
        let meta = self.meta;
        // No refresh may drop the cut before its record exists.
        let _admin = self.volume.admin_lock().await;
        let outcome = async {
            let (record, _) = meta
                .volume(volume)
                .await?
                .ok_or_else(|| anyhow::anyhow!("volume {volume:?} is gone"))?;
            let cut = self.volume.snapshot_point()?;
            let snap = SnapshotRecord {
                name: name.to_string(),
                volume: volume.to_string(),
                volume_id: self.volume.id(),
                cut,
                size: self.volume.size(),
                created: now_secs(),
                bases: record.bases,
                deleted: false,
            };
            match meta
                .create_writer_snapshot(&snap, self.volume.epoch())
                .await
            {
                Ok(true) => anyhow::Ok(Some(cut)),
                Ok(false) => {
                    self.volume.release_cut(cut);
                    Ok(None)
                }
                Err(e) => {
                    self.volume.release_cut(cut);
                    Err(e.into())
                }
            }
        }
        .await;
        match outcome {
            Ok(Some(cut)) => {
                tracing::info!(
                    snapshot = name,
                    epoch = cut.0,
                    seq = cut.1,
                    "snapshot taken"
                );
                let _ = meta.clear_snapshot_request(volume, name).await;
            }
            // This writer is not the recorded one (superseded, or its
            // lease lapsed): the request is left to whoever writes now.
            Ok(None) => {
                tracing::debug!(
                    snapshot = name,
                    "not the recorded writer: snapshot request left alone"
                )
            }
            Err(e) => {
                tracing::warn!(snapshot = name, error = %format!("{e:#}"), "cannot take a snapshot");
                let _ = meta
                    .fail_snapshot_request(volume, name, &format!("{e:#}"))
                    .await;
            }
        }
    }
}
