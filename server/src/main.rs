//! The `tessera` binary: parse etcd-style flags, open the member, serve.

use std::process::ExitCode;

use anyhow::Context;
use tessera_server::config::{self, Config, Tool, ETCD_VERSION};
use tessera_server::etcd_snapshot;
use tessera_server::node::{open_data_dir, Node};
use tessera_server::raft::state_machine::{META_APPLIED, META_MEMBERSHIP, META_PARTIAL};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let parsed = match config::parse_from(std::env::args_os()) {
        Ok(p) => p,
        Err(e) if e.use_stderr() => {
            // One line, like etcd's flag errors; clap's hints are multi-line.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("tessera: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let cfg = parsed.config;
    if cfg.version {
        println!("tessera Version: {}", env!("CARGO_PKG_VERSION"));
        println!("etcd API Version: {ETCD_VERSION}");
        return ExitCode::SUCCESS;
    }
    let logging = tessera_server::logging::init(&tessera_server::logging::LogOptions {
        logger: &cfg.logger,
        level: &cfg.log_level,
        format: &cfg.log_format,
        outputs: &cfg.log_outputs,
    });
    if let Err(e) = logging {
        // etcd's wording for a bad logging flag.
        eprintln!("tessera: error verifying flags, {e}. See 'tessera --help'.");
        return ExitCode::FAILURE;
    }
    tessera_storage::failpoint::announce();
    for flag in &parsed.ignored_flags {
        tracing::warn!(flag = %format!("--{flag}"), "flag accepted for etcd compatibility but not acted on by Tessera yet");
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    if let Some(Tool::SnapshotRestore { file }) = &cfg.command {
        return restore(&cfg, file);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    tracing::info!(
        etcd_version = ETCD_VERSION,
        tessera_version = env!("CARGO_PKG_VERSION"),
        name = %cfg.name,
        data_dir = %cfg.data_dir().display(),
        "starting an etcd server"
    );
    cfg.make_self_certs()?;
    let (name, data_dir) = (cfg.name.clone(), cfg.data_dir());
    runtime.block_on(async move {
        let node = Node::start(cfg).await?;
        if node.config.experimental_initial_corrupt_check {
            tessera_server::corruption::initial_check(&node).await?;
        }
        let check_every = node.config.experimental_corrupt_check_time;
        if !check_every.is_zero() {
            tessera_server::corruption::spawn_periodic(node.clone(), check_every);
        }
        if let Some(policy) = node.config.auto_compaction()? {
            tessera_server::compactor::spawn(node.clone(), policy);
        }
        tessera_server::server::serve(node.clone(), shutdown_signal()).await?;
        node.raft.shutdown().await.context("raft shutdown")?;
        tracing::info!(name = %name, data_dir = %data_dir.display(), "closed etcd server");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let received = match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => "terminated",
                _ = tokio::signal::ctrl_c() => "interrupt",
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "interrupt"
        }
    };
    tracing::info!(signal = received, "received signal; shutting down");
}

/// `tessera snapshot-restore FILE --data-dir DIR`: a new member whose state is
/// the snapshot's key space (revisions included) and whose Raft log is fresh.
/// `tessera snapshot-restore FILE`: a snapshot saved from etcd (a bbolt
/// database, with or without etcd's SHA-256 trailer) or from Tessera's own
/// earlier format, restored into an empty data directory. The state is
/// built in a staging directory inside it (`.restoring`) and its `member`
/// directory moved into place at the end, so a refused file leaves nothing
/// behind (and a data directory that is a mount point works).
fn restore(cfg: &Config, file: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read;
    let data_dir = cfg.data_dir();
    if data_dir.exists() && std::fs::read_dir(&data_dir)?.next().is_some() {
        anyhow::bail!(
            "data dir {} already exists and is not empty",
            data_dir.display()
        );
    }
    let cannot = || format!("cannot restore {}", file.display());
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let len = f.metadata()?.len();
    let mut head = Vec::with_capacity(64);
    (&mut f).take(64).read_to_end(&mut head)?;
    // Checked before anything is created.
    let db_len = if etcd_snapshot::is_bbolt(&head) {
        let db_len = etcd_snapshot::checked_db_len(&mut f, len).with_context(cannot)?;
        if db_len == len {
            eprintln!(
                "{} has no SHA-256 trailer: its integrity is not checked",
                file.display()
            );
        }
        Some(db_len)
    } else {
        None
    };
    let created = !data_dir.exists();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let staging = data_dir.join(".restoring");
    let restored = (|| -> anyhow::Result<String> {
        let db = open_data_dir(&staging)?;
        let what = if let Some(db_len) = db_len {
            let reader = etcd_snapshot::bbolt::Reader::open(f, db_len)?;
            let s = etcd_snapshot::import(&db, &reader)?;
            format!(
                "etcd snapshot: revision {}, compacted at {}, {} versions, {} leases, {} users, {} roles",
                s.revision, s.compact_revision, s.versions, s.leases, s.users, s.roles
            )
        } else {
            let data = std::fs::read(file)?;
            let dump = tessera_server::snapshot::without_stream_trailer(&data)?;
            tessera_server::snapshot::restore(&db, dump, |k| {
                k == META_APPLIED || k == META_MEMBERSHIP || k == META_PARTIAL
            })?;
            "Tessera snapshot".to_string()
        };
        drop(db);
        std::fs::rename(staging.join("member"), data_dir.join("member"))?;
        std::fs::remove_dir_all(&staging)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        std::fs::File::open(&data_dir)?.sync_all()?;
        Ok(what)
    })();
    match restored {
        Ok(what) => {
            println!(
                "restored {} into {} ({what})",
                file.display(),
                data_dir.display()
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            let _ = std::fs::remove_dir_all(data_dir.join("member"));
            if created {
                let _ = std::fs::remove_dir(&data_dir);
            }
            Err(e).with_context(cannot)
        }
    }
}
