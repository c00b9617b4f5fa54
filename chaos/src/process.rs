//! Server processes on the hosts of a [`Network`]: started with their
//! output appended to a log file, and the process faults the nemeses use
//! (SIGKILL and restart, SIGSTOP and SIGCONT).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{NetError, Network};

/// The environment variable Tessera's binaries read failpoints from.
pub const FAILPOINTS_ENV: &str = "TESSERA_FAILPOINTS";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{name} exited on its own ({status}); see {log}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log: String,
    },
}

/// One server: its host, its command line and, while it runs, its process.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    /// Index of its host in the network.
    pub host: usize,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log_path: PathBuf,
    /// Its data directory (the disk faults act on it).
    pub data_dir: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl Proc {
    pub fn new(
        name: &str,
        host: usize,
        program: PathBuf,
        args: Vec<String>,
        log_path: PathBuf,
        data_dir: PathBuf,
    ) -> Proc {
        Proc {
            name: name.to_string(),
            host,
            program,
            args,
            log_path,
            data_dir,
            child: None,
            paused: false,
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold its
            // Child), so the pid is still ours.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }
}

/// A set of servers of one kind (control-plane members, storage nodes).
#[derive(Debug, Default)]
pub struct Processes {
    pub procs: Vec<Proc>,
}

impl Processes {
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Starts server `i` in its host (it may not serve yet).
    pub fn spawn(&mut self, net: &Network, i: usize) -> Result<(), ProcessError> {
        self.spawn_with_failpoints(net, i, None)
    }

    /// Starts server `i` with `TESSERA_FAILPOINTS` set to `failpoints`
    /// (unset when `None`, also when this process has it set).
    pub fn spawn_with_failpoints(
        &mut self,
        net: &Network,
        i: usize,
        failpoints: Option<&str>,
    ) -> Result<(), ProcessError> {
        let p = &self.procs[i];
        if p.child.is_some() {
            return Ok(());
        }
        let io = |what: String| move |source| ProcessError::Io { what, source };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log_path)
            .map_err(io(format!("opening {}", p.log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io(format!("opening {}", p.log_path.display())))?;
        let mut cmd = Network::command(&net.hosts[p.host], &p.program.to_string_lossy())?;
        // etcd's environment variables would change the flags under test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        match failpoints {
            Some(spec) => cmd.env(FAILPOINTS_ENV, spec),
            None => cmd.env_remove(FAILPOINTS_ENV),
        };
        let child = cmd
            .args(&p.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!("starting {} ({})", p.name, p.program.display())))?;
        let p = &mut self.procs[i];
        p.child = Some(child);
        p.paused = false;
        Ok(())
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self, i: usize) {
        let p = &mut self.procs[i];
        if let Some(mut child) = p.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        p.paused = false;
    }

    /// SIGSTOP: the process stays, frozen, with its sockets open.
    pub fn pause(&mut self, i: usize) {
        let p = &mut self.procs[i];
        p.signal(libc::SIGSTOP);
        p.paused = p.child.is_some();
    }

    /// SIGCONT.
    pub fn resume(&mut self, i: usize) {
        let p = &mut self.procs[i];
        p.signal(libc::SIGCONT);
        p.paused = false;
    }

    /// Fails if a server that should be running exited on its own.
    pub fn check_alive(&mut self) -> Result<(), ProcessError> {
        for p in &mut self.procs {
            if let Some(child) = p.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    p.child = None;
                    return Err(ProcessError::Exited {
                        name: p.name.clone(),
                        status,
                        log: p.log_path.display().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Resumes paused servers and restarts stopped ones.
    pub fn heal_all(&mut self, net: &Network) -> Result<(), ProcessError> {
        for i in 0..self.procs.len() {
            if self.procs[i].paused {
                self.resume(i);
            }
            if !self.procs[i].is_running() {
                self.spawn(net, i)?;
            }
        }
        Ok(())
    }

    /// Stops every server gracefully (SIGTERM, `within`), then SIGKILL.
    pub fn stop_all(&mut self, within: Duration) {
        for p in &mut self.procs {
            p.signal(libc::SIGCONT);
            p.signal(libc::SIGTERM);
            p.paused = false;
        }
        let deadline = Instant::now() + within;
        for p in &mut self.procs {
            if let Some(mut child) = p.child.take() {
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.resume(i);
            self.kill(i);
        }
    }
}
