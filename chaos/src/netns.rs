//! A network of separate hosts on one machine: one network namespace per
//! host, each joined by a veth pair to a bridge that lives in a namespace
//! of its own (the hub). Nothing is added to the caller's namespace, and
//! every address lives inside namespaces this harness created.
//!
//! Faults are nftables rules inside a host's namespace (drop traffic from
//! or to chosen hosts, one way or both) and the host's link set down on
//! the bridge side. Dropping the `Network` removes every namespace (and so
//! the veths and rules inside them).

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Errors of the network harness.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`: {source} (is iproute2/nftables installed?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
    #[error("at most 250 hosts per network, {0} asked")]
    TooManyHosts(usize),
}

/// One host: a network namespace with one interface on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The namespace's name (under /run/netns).
    pub namespace: String,
    pub addr: Ipv4Addr,
    /// The veth end on the bridge (in the hub namespace).
    bridge_port: String,
}

/// The hosts and the hub that joins them.
#[derive(Debug)]
pub struct Network {
    hub: String,
    pub hosts: Vec<Host>,
}

/// Runs a command, failing with its stderr when it fails.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|source| NetError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(text.as_bytes())
            .map_err(|source| NetError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Namespaces whose name starts with `prefix` (left by a run that was
/// killed before it could clean up).
fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

impl Network {
    /// Creates the hub and one host per name, on 10.`subnet`.0.0/24 (host
    /// `i` at .`i+1`). Namespaces are named `<prefix><name>`; any left over
    /// with that prefix from an earlier run are removed first.
    pub fn create(prefix: &str, subnet: u8, names: &[&str]) -> Result<Network, NetError> {
        if names.len() > 250 {
            return Err(NetError::TooManyHosts(names.len()));
        }
        for stale in namespaces_with_prefix(prefix) {
            // Processes a killed run left inside go first.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &stale]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: kill(2) of a process found in our own
                        // namespace; at worst it has exited already.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            let _ = run("ip", &["netns", "del", &stale], None);
        }
        let hub = format!("{prefix}hub");
        run("ip", &["netns", "add", &hub], None)?;
        let mut net = Network {
            hub,
            hosts: Vec::new(),
        };
        // From here on, dropping `net` removes what exists so far.
        run(
            "ip",
            &["-n", &net.hub, "link", "add", "br0", "type", "bridge"],
            None,
        )?;
        run("ip", &["-n", &net.hub, "link", "set", "br0", "up"], None)?;
        for (i, name) in names.iter().enumerate() {
            let namespace = format!("{prefix}{name}");
            let addr = Ipv4Addr::new(10, subnet, 0, i as u8 + 1);
            let bridge_port = format!("p{i}");
            run("ip", &["netns", "add", &namespace], None)?;
            net.hosts.push(Host {
                name: name.to_string(),
                namespace: namespace.clone(),
                addr,
                bridge_port: bridge_port.clone(),
            });
            run(
                "ip",
                &[
                    "-n",
                    &net.hub,
                    "link",
                    "add",
                    &bridge_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &namespace,
                ],
                None,
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &net.hub,
                    "link",
                    "set",
                    &bridge_port,
                    "master",
                    "br0",
                    "up",
                ],
                None,
            )?;
            let cidr = format!("{addr}/24");
            run(
                "ip",
                &["-n", &namespace, "addr", "add", &cidr, "dev", "eth0"],
                None,
            )?;
            run("ip", &["-n", &namespace, "link", "set", "eth0", "up"], None)?;
            run("ip", &["-n", &namespace, "link", "set", "lo", "up"], None)?;
        }
        Ok(net)
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// A command that runs `program` inside `host`'s network namespace
    /// (only the network: it shares this process's mounts, so a FUSE mount
    /// or loop device it makes is everyone's, as on a real host).
    pub fn command(host: &Host, program: &str) -> Result<Command, NetError> {
        use std::os::unix::process::CommandExt;
        let path = format!("/run/netns/{}", host.namespace);
        let file = std::fs::File::open(&path).map_err(|source| NetError::Enter {
            name: host.namespace.clone(),
            source,
        })?;
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec the closure only calls setns(2),
        // sigprocmask(2) and setpgid(2), which are async-signal-safe; `file` (moved in)
        // keeps the descriptor open until the command is dropped (it is
        // close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A caller that blocks signals (to wait for them on a thread)
                // must not pass the mask on: servers need their SIGTERM.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // A process group of its own: Ctrl-C at the terminal reaches
                // the harness, which stops its servers itself.
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Drops traffic between hosts of different groups, both ways (hosts
    /// in no group keep talking to everyone). Replaces earlier rules.
    pub fn partition(&self, groups: &[Vec<usize>]) -> Result<(), NetError> {
        self.heal()?;
        for (g, group) in groups.iter().enumerate() {
            let others: Vec<Ipv4Addr> = groups
                .iter()
                .enumerate()
                .filter(|(o, _)| *o != g)
                .flat_map(|(_, hosts)| hosts.iter().map(|&h| self.hosts[h].addr))
                .collect();
            for &h in group {
                self.drop_traffic(h, &others, &others)?;
            }
        }
        Ok(())
    }

    /// Hosts in `left` and hosts in `right` cannot talk to each other;
    /// everyone else still talks to both (a bridge). Adds to earlier rules.
    pub fn cut(&self, left: &[usize], right: &[usize]) -> Result<(), NetError> {
        let addrs = |hosts: &[usize]| {
            hosts
                .iter()
                .map(|&h| self.hosts[h].addr)
                .collect::<Vec<_>>()
        };
        let (l, r) = (addrs(left), addrs(right));
        for &h in left {
            self.drop_traffic(h, &r, &r)?;
        }
        for &h in right {
            self.drop_traffic(h, &l, &l)?;
        }
        Ok(())
    }

    /// Drops what `to` receives from `from`, leaving the other direction
    /// (replies included, so TCP from `from` stalls while `to`'s packets
    /// still arrive there).
    pub fn drop_one_way(&self, from: usize, to: usize) -> Result<(), NetError> {
        self.drop_traffic(to, &[self.hosts[from].addr], &[])
    }

    /// Makes `host`'s link slow: what it sends and receives over the
    /// bridge beyond `bytes_per_second` each way is dropped, so TCP backs
    /// off to that rate (with the losses of a congested link). This kernel
    /// has no netem to delay packets; a rate limit is what nftables can do.
    pub fn slow(&self, host: usize, bytes_per_second: u64) -> Result<(), NetError> {
        let kib = (bytes_per_second / 1024).max(1);
        let rules = format!(
            "table inet chaos {{
  chain slow_input {{ type filter hook input priority 1; policy accept;
    iifname != \"lo\" limit rate over {kib} kbytes/second drop
  }}
  chain slow_output {{ type filter hook output priority 1; policy accept;
    oifname != \"lo\" limit rate over {kib} kbytes/second drop
  }}
}}
"
        );
        self.nft(host, &rules)
    }

    /// Installs `host`'s rules: drop input from `sources` and output to
    /// `destinations`.
    fn drop_traffic(
        &self,
        host: usize,
        sources: &[Ipv4Addr],
        destinations: &[Ipv4Addr],
    ) -> Result<(), NetError> {
        let set = |addrs: &[Ipv4Addr]| {
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut rules = String::from("table inet chaos {\n");
        rules.push_str("  chain input { type filter hook input priority 0; policy accept;\n");
        if !sources.is_empty() {
            rules.push_str(&format!("    ip saddr {{ {} }} drop\n", set(sources)));
        }
        rules.push_str("  }\n");
        rules.push_str("  chain output { type filter hook output priority 0; policy accept;\n");
        if !destinations.is_empty() {
            rules.push_str(&format!("    ip daddr {{ {} }} drop\n", set(destinations)));
        }
        rules.push_str("  }\n}\n");
        self.nft(host, &rules)
    }

    /// Loads nftables `rules` in `host`'s namespace.
    fn nft(&self, host: usize, rules: &str) -> Result<(), NetError> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.hosts[host].namespace,
                "nft",
                "-f",
                "-",
            ],
            Some(rules),
        )
    }

    /// Removes every drop rule and brings every link up.
    pub fn heal(&self) -> Result<(), NetError> {
        for (i, host) in self.hosts.iter().enumerate() {
            // Absent table: nothing to remove.
            let _ = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &host.namespace,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    "chaos",
                ],
                None,
            );
            self.link(i, true)?;
        }
        Ok(())
    }

    /// Sets `host`'s link on the bridge up or down.
    pub fn link(&self, host: usize, up: bool) -> Result<(), NetError> {
        let state = if up { "up" } else { "down" };
        run(
            "ip",
            &[
                "-n",
                &self.hub,
                "link",
                "set",
                &self.hosts[host].bridge_port,
                state,
            ],
            None,
        )
    }

    /// Moves the calling thread into `host`'s namespace: sockets it opens
    /// from then on are that host's (network namespaces are per thread).
    pub fn enter(host: &Host) -> Result<(), NetError> {
        let path = format!("/run/netns/{}", host.namespace);
        let file = std::fs::File::open(&path).map_err(|source| NetError::Enter {
            name: host.namespace.clone(),
            source,
        })?;
        // SAFETY: setns with a valid namespace file descriptor only changes
        // the calling thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(NetError::Enter {
                name: host.namespace.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run("ip", &["netns", "del", &host.namespace], None);
        }
        let _ = run("ip", &["netns", "del", &self.hub], None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn reachable(net: &Network, from: usize, to: usize, port: u16) -> bool {
        let from = net.hosts[from].clone();
        let addr = (net.hosts[to].addr, port).into();
        std::thread::spawn(move || {
            Network::enter(&from).unwrap();
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        })
        .join()
        .unwrap()
    }

    /// How long sending `bytes` from host `from` to host `to` takes, until
    /// the receiver has them all.
    fn transfer(net: &Network, from: usize, to: usize, bytes: usize) -> Duration {
        use std::io::{Read, Write};
        let (src, dst) = (net.hosts[from].clone(), net.hosts[to].clone());
        let listener = {
            let dst = dst.clone();
            std::thread::spawn(move || {
                Network::enter(&dst).unwrap();
                TcpListener::bind((dst.addr, 7001)).unwrap()
            })
            .join()
            .unwrap()
        };
        let receiver = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            got.len()
        });
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            Network::enter(&src).unwrap();
            let mut conn = TcpStream::connect((dst.addr, 7001)).unwrap();
            conn.write_all(&vec![7u8; bytes]).unwrap();
        })
        .join()
        .unwrap();
        assert_eq!(receiver.join().unwrap(), bytes);
        started.elapsed()
    }

    /// Needs root (namespaces, nftables): run by CI as root.
    #[test]
    fn partitions_one_way_drops_and_links_cut_only_what_they_name() {
        let net = Network::create("tcnt", 231, &["a", "b", "c"]).unwrap();
        // A listener in each host, accepting in the background.
        let mut listeners = Vec::new();
        for h in &net.hosts {
            let h = h.clone();
            listeners.push(
                std::thread::spawn(move || {
                    Network::enter(&h).unwrap();
                    TcpListener::bind((h.addr, 7000)).unwrap()
                })
                .join()
                .unwrap(),
            );
        }
        assert!(reachable(&net, 0, 1, 7000) && reachable(&net, 1, 2, 7000));

        net.partition(&[vec![0], vec![1, 2]]).unwrap();
        assert!(!reachable(&net, 0, 1, 7000) && !reachable(&net, 2, 0, 7000));
        assert!(reachable(&net, 1, 2, 7000));

        net.heal().unwrap();
        net.drop_one_way(0, 1).unwrap();
        assert!(!reachable(&net, 0, 1, 7000));
        assert!(reachable(&net, 0, 2, 7000));

        net.heal().unwrap();
        net.cut(&[0], &[2]).unwrap();
        assert!(!reachable(&net, 0, 2, 7000) && !reachable(&net, 2, 0, 7000));
        assert!(reachable(&net, 0, 1, 7000) && reachable(&net, 1, 2, 7000));

        net.heal().unwrap();
        net.link(2, false).unwrap();
        assert!(!reachable(&net, 0, 2, 7000) && reachable(&net, 0, 1, 7000));
        net.heal().unwrap();
        assert!(reachable(&net, 0, 2, 7000));

        // A slow link: 256 KiB at 64 KiB/s cannot take under a second (it
        // takes about four); healed, it goes at the bridge's speed.
        net.slow(1, 64 << 10).unwrap();
        let slowed = transfer(&net, 0, 1, 256 << 10);
        net.heal().unwrap();
        let healed = transfer(&net, 0, 1, 256 << 10);
        assert!(
            slowed > Duration::from_secs(1) && healed < slowed / 2,
            "slowed {slowed:?}, healed {healed:?}"
        );

        let names: Vec<String> = net.hosts.iter().map(|h| h.namespace.clone()).collect();
        drop(listeners);
        drop(net);
        let left = namespaces_with_prefix("tcnt");
        assert!(left.is_empty(), "namespaces left: {left:?} of {names:?}");
    }
}
