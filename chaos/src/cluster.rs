//! A cluster under test on a [`Network`]: `tessera` control-plane members
//! started with etcd's clustering flags, optionally `tessera-store` nodes
//! (started by `start_stores`), and a client host for the workload. Hosts are m1..mN, s1..sK, client.
//! Dropping it kills every process, then removes the network.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::Network;
use crate::process::{Proc, ProcessError, Processes};

/// The port storage nodes serve on, in their hosts.
pub const STORE_PORT: u16 = 7100;

/// What to start.
pub struct Spec<'a> {
    pub tessera: &'a Path,
    /// The `tessera-store` binary, when `stores > 0`.
    pub store: Option<&'a Path>,
    /// Data directories and logs.
    pub dir: &'a Path,
    pub netns_prefix: &'a str,
    pub subnet: u8,
    pub members: usize,
    pub stores: usize,
    pub member_flags: &'a [String],
}

pub struct Cluster {
    // Processes are declared (and so dropped) before the network.
    pub members: Processes,
    pub stores: Processes,
    pub net: Network,
    /// Index of the host the workload runs in.
    pub client_host: usize,
}

impl Cluster {
    pub fn start(spec: &Spec) -> Result<Cluster, ProcessError> {
        let mut names: Vec<String> = (1..=spec.members).map(|i| format!("m{i}")).collect();
        names.extend((1..=spec.stores).map(|i| format!("s{i}")));
        names.push("client".into());
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let net = Network::create(spec.netns_prefix, spec.subnet, &name_refs)?;
        let initial_cluster = (0..spec.members)
            .map(|i| format!("m{}=http://{}:2380", i + 1, net.hosts[i].addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Processes::default();
        for i in 0..spec.members {
            let name = format!("m{}", i + 1);
            let addr = net.hosts[i].addr;
            let client_url = format!("http://{addr}:2379");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", spec.dir.join(&name).display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls=http://{addr}:2380"),
                format!("--initial-advertise-peer-urls=http://{addr}:2380"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=tessera-chaos".into(),
                // The watch checker treats a canceled watch as a violation:
                // nothing may compact the history under the watchers.
                "--auto-compaction-retention=0".into(),
            ];
            args.extend(spec.member_flags.iter().cloned());
            members.procs.push(Proc::new(
                &name,
                i,
                spec.tessera.to_path_buf(),
                args,
                spec.dir.join(format!("{name}.log")),
                spec.dir.join(&name),
            ));
        }
        let endpoints = (0..spec.members)
            .map(|i| format!("http://{}:2379", net.hosts[i].addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut stores = Processes::default();
        for j in 0..spec.stores {
            let host = spec.members + j;
            let name = format!("s{}", j + 1);
            let addr = net.hosts[host].addr;
            let program: PathBuf = spec
                .store
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("tessera-store"));
            let args = vec![
                format!("--endpoints={endpoints}"),
                "serve".into(),
                format!("--name={name}"),
                format!("--data-dir={}", spec.dir.join(&name).display()),
                format!("--listen={addr}:{STORE_PORT}"),
                format!("--zone=z{}", j % 3),
                format!("--metrics-listen={addr}:7200"),
            ];
            stores.procs.push(Proc::new(
                &name,
                host,
                program,
                args,
                spec.dir.join(format!("{name}.log")),
                spec.dir.join(&name),
            ));
        }
        let mut cluster = Cluster {
            members,
            stores,
            client_host: names.len() - 1,
            net,
        };
        for i in 0..cluster.members.len() {
            cluster.members.spawn(&cluster.net, i)?;
        }
        Ok(cluster)
    }

    /// Starts the storage nodes (once the control plane serves: a node
    /// that cannot reach it at start exits).
    pub fn start_stores(&mut self) -> Result<(), ProcessError> {
        for j in 0..self.stores.len() {
            self.stores.spawn(&self.net, j)?;
        }
        Ok(())
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .procs
            .iter()
            .map(|m| format!("http://{}:2379", self.net.hosts[m.host].addr))
            .collect()
    }

    /// The network and the servers faults hit: the storage nodes, or the
    /// members.
    pub fn faultable(&mut self, stores: bool) -> (&Network, &mut Processes) {
        let targets = if stores {
            &mut self.stores
        } else {
            &mut self.members
        };
        (&self.net, targets)
    }

    /// Fails if any server exited on its own.
    pub fn check_alive(&mut self) -> Result<(), ProcessError> {
        self.members.check_alive()?;
        self.stores.check_alive()
    }

    /// Ends every fault: heals the network, resumes paused servers and
    /// restarts stopped ones.
    pub fn heal_all(&mut self) -> Result<(), ProcessError> {
        self.net.heal()?;
        self.members.heal_all(&self.net)?;
        self.stores.heal_all(&self.net)
    }

    /// Stops the storage nodes, then the members.
    pub fn stop_all(&mut self) {
        self.stores.stop_all(Duration::from_secs(20));
        self.members.stop_all(Duration::from_secs(20));
    }
}
