//! Server processes under test: spawned with their output in a log file,
//! killed with SIGKILL, and watched so that a hung test fails with a
//! diagnosis instead of stalling CI until its global time limit.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How long a test binary may keep server processes alive before the watchdog
/// declares it hung. Generous: the slowest binary needs a few minutes on 2
/// loaded cores.
const WATCHDOG_DEFAULT_SECS: u64 = 15 * 60;
/// How long a SIGKILLed process may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(60);

/// Live server processes of this test binary: pid → log file.
static LIVE: Mutex<Option<HashMap<u32, PathBuf>>> = Mutex::new(None);
static WATCHDOG: Once = Once::new();

/// A spawned server process, SIGKILLed when dropped.
pub struct Process {
    name: String,
    child: Child,
    reaped: bool,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Process {
        start_watchdog();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        live()
            .get_or_insert_with(HashMap::new)
            .insert(child.id(), log_path.to_path_buf());
        Process {
            name: name.to_string(),
            child,
            reaped: false,
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends `signal` (a name such as `STOP` or `CONT`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} failed");
    }

    /// SIGTERM; returns how long the process took to exit, or None when it
    /// was still running after `within` (it is then left to `kill`).
    pub fn terminate(&mut self, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        while start.elapsed() < within {
            if self.child.try_wait().ok().flatten().is_some() {
                self.reaped = true;
                if let Some(live) = live().as_mut() {
                    live.remove(&self.child.id());
                }
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGKILL, then reap; a process that does not go away within a minute
    /// (stuck in the kernel) fails the test with its kernel state.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let pid = self.child.id();
        let _ = self.child.kill();
        let deadline = Instant::now() + REAP_TIMEOUT;
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let msg = format!(
                    "{} (pid {pid}) still alive {REAP_TIMEOUT:?} after SIGKILL\n{}",
                    self.name,
                    kernel_state(pid)
                );
                if std::thread::panicking() {
                    let _ = std::io::stderr().write_all(msg.as_bytes());
                    return;
                }
                panic!("{msg}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reaped = true;
        if let Some(live) = live().as_mut() {
            live.remove(&pid);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn live() -> std::sync::MutexGuard<'static, Option<HashMap<u32, PathBuf>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the kernel says a process is doing: its state line and, when
/// readable, its kernel stack.
fn kernel_state(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let state = status
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or("State: gone");
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
    format!("{state} wchan={wchan}\n{stack}")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts, once per test binary, a thread that aborts the binary if it still
/// runs servers after `TESSERA_TEST_WATCHDOG_SECS` (default 15 minutes),
/// printing each live server's kernel state and log tail first.
fn start_watchdog() {
    WATCHDOG.call_once(|| {
        let secs = std::env::var("TESSERA_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(WATCHDOG_DEFAULT_SECS);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            let live = live().take().unwrap_or_default();
            // Straight to fd 2: libtest captures `eprintln!` of test threads
            // and their children, and would drop it on exit.
            let mut report = format!(
                "test hung: still running {} server(s) after {secs} s\n",
                live.len()
            );
            for (pid, log) in &live {
                report += &format!("--- pid {pid}: {}", kernel_state(*pid));
                report += &format!("--- last lines of {}:\n{}\n", log.display(), tail(log, 40));
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = std::io::stderr().write_all(report.as_bytes());
            std::process::exit(101);
        });
    });
}
