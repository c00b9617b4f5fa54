//! A progress bar on stderr for long runs: redrawn in place on a terminal,
//! one line every few seconds otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts reporting progress of `total` steps of `what`.
    pub fn start(what: &str, total: u64) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        let quiet = std::env::var_os("TESSERA_BENCH_QUIET").is_some();
        let thread = (!quiet).then(|| {
            let (done, stop, what) = (done.clone(), stop.clone(), what.to_string());
            std::thread::spawn(move || {
                let started = Instant::now();
                let every = if tty {
                    Duration::from_millis(200)
                } else {
                    Duration::from_secs(5)
                };
                let mut last_print = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last_print.elapsed() < every {
                        continue;
                    }
                    last_print = Instant::now();
                    let line = bar(&what, done.load(Ordering::Relaxed), total, started);
                    let mut err = std::io::stderr().lock();
                    let _ = if tty {
                        write!(err, "\r{line}")
                    } else {
                        writeln!(err, "{line}")
                    };
                }
                let line = bar(&what, done.load(Ordering::Relaxed), total, started);
                let _ = if tty {
                    writeln!(std::io::stderr(), "\r{line}")
                } else {
                    writeln!(std::io::stderr(), "{line}")
                };
            })
        });
        Progress { done, stop, thread }
    }

    /// The counter callers bump after each step.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bar(what: &str, done: u64, total: u64, started: Instant) -> String {
    const WIDTH: u64 = 40;
    if total == u64::MAX {
        // Runs until stopped: a count, no bar.
        return format!("{what} {done} {:.1}s", started.elapsed().as_secs_f64());
    }
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    let secs = started.elapsed().as_secs_f64();
    format!(
        "{what} {done} / {total} [{}{}] {:.0}% {:.1}s",
        "=".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize),
        (done.min(total) * 100).checked_div(total).unwrap_or(100),
        secs
    )
}
