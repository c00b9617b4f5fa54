//! Command-line flags and `ETCD_*` environment variables, named as etcd names
//! them so existing launch scripts and manifests start Tessera unchanged.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::tls::TlsFiles;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

/// The etcd API version Tessera reports (kube-apiserver gates features on it).
pub const ETCD_VERSION: &str = "3.5.16";

/// The cluster version etcd derives from its server version: major.minor.
pub fn cluster_version() -> &'static str {
    let end = ETCD_VERSION.rfind('.').unwrap_or(ETCD_VERSION.len());
    &ETCD_VERSION[..end]
}
/// The cluster version reported next to it.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tessera",
    about = "An etcd v3-compatible datastore on openraft and RocksDB",
    disable_version_flag = true,
    // Go's flag package: a flag given twice takes its last value (so
    // `scripts/start.sh --listen-client-urls ...` overrides the default).
    args_override_self = true
)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: <name>.etcd).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Comma-separated URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: String,
    /// Comma-separated client URLs advertised to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: String,
    /// Comma-separated URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// Comma-separated peer URLs advertised to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Path to a dedicated WAL directory (default: <data-dir>/member/wal).
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// How the WAL reaches the disk: auto (io_uring when available), uring or syscall.
    #[arg(long, env = "TESSERA_WAL_IO", default_value = "auto",
          value_parser = ["auto", "uring", "syscall"])]
    pub wal_io: String,
    /// Initial cluster configuration for bootstrapping (name=peer-url,...).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new",
          value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// Raise the NOSPACE alarm when the backend exceeds this many bytes (0 = 2 GiB).
    #[arg(
        long,
        env = "ETCD_QUOTA_BACKEND_BYTES",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub quota_backend_bytes: i64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u32,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u32,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Number of committed transactions to trigger a snapshot.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// (Tessera) Take a snapshot, so the Raft log can be purged, when the
    /// log held in memory grows past this many bytes: an entry under load
    /// carries many requests, so `--snapshot-count` alone would let it grow
    /// large. 0 turns this off.
    #[arg(long, env = "TESSERA_MAX_RAFT_LOG_MEMORY_BYTES", default_value_t = 128 << 20)]
    pub max_raft_log_memory_bytes: u64,
    /// Interpret 'auto-compaction-retention' as 'periodic' (duration) or 'revision'.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic",
          value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: String,
    /// Auto compaction retention: a duration ('1h', '30m', or hours as a number) or a revision count; 0 disables.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Duration of periodic watch progress notifications.
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m",
          value_parser = parse_duration_arg)]
    pub experimental_watch_progress_notify_interval: Duration,
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Path to the client server TLS trusted CA cert file (client certificates are then required).
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Enable client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub client_cert_auth: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Enable peer client cert authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub peer_client_cert_auth: bool,
    /// How many old versions a compaction deletes per batch in the background.
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub experimental_compaction_batch_limit: u32,
    /// The pause between two batches of a compaction.
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_SLEEP_INTERVAL", default_value = "10ms",
          value_parser = parse_duration_or_zero)]
    pub experimental_compaction_sleep_interval: Duration,
    /// Compare this member's data with its peers' before serving clients, and refuse to start on a mismatch.
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub experimental_initial_corrupt_check: bool,
    /// How often the leader compares the members' data (0: never); a mismatch raises the CORRUPT alarm.
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0s",
          value_parser = parse_duration_or_zero)]
    pub experimental_corrupt_check_time: Duration,
    /// Client TLS with a generated self-signed certificate (in <data-dir>/fixtures/client).
    #[arg(long, env = "ETCD_AUTO_TLS", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub auto_tls: bool,
    /// Peer TLS with generated self-signed certificates (in <data-dir>/fixtures/peer); peers' certificates are not verified.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub peer_auto_tls: bool,
    /// Validity of the auto-TLS certificates, in years.
    #[arg(long, env = "ETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,
    /// Path to the client certificate revocation list file.
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<PathBuf>,
    /// Path to the peer certificate revocation list file.
    #[arg(long, env = "ETCD_PEER_CRL_FILE")]
    pub peer_crl_file: Option<PathBuf>,
    /// Comma-separated list of supported TLS cipher suites (Go's names; TLS 1.2 only, as in etcd).
    #[arg(long, env = "ETCD_CIPHER_SUITES", default_value = "")]
    pub cipher_suites: String,
    /// Auth token type: 'simple', or 'jwt,pub-key=PATH,priv-key=PATH,sign-method=RS256,ttl=5m'.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Time (in seconds) a simple auth token lives after its last use.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// bcrypt cost for hashing auth passwords (4..31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// Log level: debug, info, warn, error, panic or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info",
          value_parser = ["debug", "info", "warn", "error", "panic", "fatal"])]
    pub log_level: String,
    /// Logger: only 'zap' (structured logging), as in etcd 3.5.
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap")]
    pub logger: String,
    /// Where logs go: 'default' (stderr), 'stderr', 'stdout', or file
    /// paths (appended to); comma-separated.
    #[arg(
        long,
        env = "ETCD_LOG_OUTPUTS",
        default_value = "default",
        value_delimiter = ','
    )]
    pub log_outputs: Vec<String>,
    /// Log format: 'json' (zap's, as etcd) or 'console' (readable).
    #[arg(long, env = "ETCD_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// Print the version and exit.
    #[arg(long, env = "ETCD_VERSION", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub version: bool,
    #[command(subcommand)]
    pub command: Option<Tool>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Tool {
    /// Create a new member's data directory from a file written by `etcdctl snapshot save`
    /// against Tessera (the result is a fresh single-member cluster holding the snapshot's data).
    SnapshotRestore {
        /// The snapshot file.
        file: PathBuf,
    },
}

/// etcd 3.5 server flags Tessera accepts but does not act on yet, and whether
/// each is a boolean switch. Passing one logs a warning naming it.
pub const ACCEPTED_NOT_ACTED_ON: &[(&str, bool)] = &[
    ("backend-batch-interval", false),
    ("backend-batch-limit", false),
    ("backend-bbolt-freelist-type", false),
    ("client-cert-allowed-hostname", false),
    ("client-cert-file", false),
    ("client-key-file", false),
    ("config-file", false),
    ("cors", false),
    ("debug", true),
    ("discovery", false),
    ("discovery-fallback", false),
    ("discovery-proxy", false),
    ("discovery-srv", false),
    ("discovery-srv-name", false),
    ("enable-grpc-gateway", true),
    ("enable-log-rotation", true),
    ("enable-pprof", true),
    ("enable-v2", true),
    ("experimental-backend-bbolt-freelist-type", false),
    ("experimental-bootstrap-defrag-threshold-megabytes", false),
    ("experimental-compact-hash-check-enabled", true),
    ("experimental-compact-hash-check-time", false),
    ("experimental-distributed-tracing-address", false),
    ("experimental-distributed-tracing-instance-id", false),
    ("experimental-distributed-tracing-sampling-rate", false),
    ("experimental-distributed-tracing-service-name", false),
    ("experimental-downgrade-check-time", false),
    ("experimental-enable-distributed-tracing", true),
    ("experimental-enable-lease-checkpoint", true),
    ("experimental-enable-lease-checkpoint-persist", true),
    ("experimental-enable-v2v3", false),
    ("experimental-max-learners", false),
    ("experimental-memory-mlock", true),
    ("experimental-peer-skip-client-san-verification", true),
    ("experimental-snapshot-catchup-entries", false),
    ("experimental-stop-grpc-service-on-defrag", true),
    ("experimental-txn-mode-write-with-shared-buffer", true),
    ("experimental-wait-cluster-ready-timeout", false),
    ("experimental-warning-apply-duration", false),
    ("experimental-warning-unary-request-duration", false),
    ("force-new-cluster", true),
    ("grpc-keepalive-interval", false),
    ("grpc-keepalive-min-time", false),
    ("grpc-keepalive-timeout", false),
    ("host-whitelist", false),
    ("initial-election-tick-advance", true),
    ("listen-client-http-urls", false),
    ("listen-metrics-urls", false),
    ("log-rotation-config-json", false),
    ("max-snapshots", false),
    ("max-wals", false),
    ("metrics", false),
    ("peer-cert-allowed-cn", false),
    ("peer-cert-allowed-hostname", false),
    ("pre-vote", true),
    ("proxy", false),
    ("proxy-dial-timeout", false),
    ("proxy-failure-wait", false),
    ("proxy-read-timeout", false),
    ("proxy-refresh-interval", false),
    ("proxy-write-timeout", false),
    ("socket-reuse-address", true),
    ("socket-reuse-port", true),
    ("strict-reconfig-check", true),
    ("tls-max-version", false),
    ("tls-min-version", false),
    ("unsafe-no-fsync", true),
    ("v2-deprecation", false),
];

fn env_name(flag: &str) -> String {
    format!("ETCD_{}", flag.to_uppercase().replace('-', "_"))
}

/// The full command: Tessera's own flags plus every accepted-but-ignored one.
pub fn command() -> clap::Command {
    let mut cmd = Config::command();
    for &(flag, is_bool) in ACCEPTED_NOT_ACTED_ON {
        let mut arg = Arg::new(flag).long(flag).env(env_name(flag)).hide(true);
        arg = if is_bool {
            arg.num_args(0..=1)
                .default_missing_value("true")
                .value_parser(clap::builder::BoolishValueParser::new())
                .action(ArgAction::Set)
        } else {
            arg.num_args(1).action(ArgAction::Set)
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Parsed configuration plus the names of ignored flags that were given.
pub struct Parsed {
    pub config: Config,
    pub ignored_flags: Vec<&'static str>,
}

/// Parses `args`; errors are clap errors (help and version included).
pub fn parse_from<I, T>(args: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches: ArgMatches = command().try_get_matches_from(args)?;
    let ignored_flags = ACCEPTED_NOT_ACTED_ON
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| {
            matches!(
                matches.value_source(f),
                Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
            )
        })
        .collect();
    let config = Config::from_arg_matches(&matches)?;
    Ok(Parsed {
        config,
        ignored_flags,
    })
}

/// A configuration error, phrased for a one-line message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)))
    }

    /// The backend quota in bytes: etcd's 2 GiB default for 0, none if negative.
    pub fn quota_bytes(&self) -> Option<u64> {
        match self.quota_backend_bytes {
            0 => Some(2 << 30),
            q if q < 0 => None,
            q => Some(q as u64),
        }
    }

    /// Socket addresses for `--listen-client-urls`.
    pub fn client_listen_addrs(&self) -> Result<Vec<ListenAddr>, ConfigError> {
        split_urls(&self.listen_client_urls)
            .map(|u| ListenAddr::resolve("--listen-client-urls", u))
            .collect()
    }

    /// The client-side TLS files (`--cert-file`, `--key-file`,
    /// `--trusted-ca-file`), or with `--auto-tls` and no certificate given,
    /// the generated ones (see [`Config::make_self_certs`]).
    pub fn client_tls(&self) -> TlsFiles {
        let files = TlsFiles {
            cert_file: given(&self.cert_file),
            key_file: given(&self.key_file),
            trusted_ca_file: given(&self.trusted_ca_file),
            client_cert_auth: self.client_cert_auth,
            self_cert: false,
            crl_file: given(&self.client_crl_file),
            flags: crate::tls::CLIENT_FLAGS,
        };
        self.with_self_cert(files, self.auto_tls, "client")
    }

    /// The peer-side TLS files (`--peer-cert-file`, ...), or the generated
    /// ones for `--peer-auto-tls`.
    pub fn peer_tls(&self) -> TlsFiles {
        let files = TlsFiles {
            cert_file: given(&self.peer_cert_file),
            key_file: given(&self.peer_key_file),
            trusted_ca_file: given(&self.peer_trusted_ca_file),
            client_cert_auth: self.peer_client_cert_auth,
            self_cert: false,
            crl_file: given(&self.peer_crl_file),
            flags: crate::tls::PEER_FLAGS,
        };
        self.with_self_cert(files, self.peer_auto_tls, "peer")
    }

    /// etcd uses the self-signed certificate only when no certificate or
    /// key file is given ("ignoring ... auto TLS since certs given"), and
    /// then replaces that side's TLS settings wholesale: no trusted CA, no
    /// client certificate authentication, no CRL.
    fn with_self_cert(&self, files: TlsFiles, auto: bool, side: &str) -> TlsFiles {
        if !auto || files.cert_file.is_some() || files.key_file.is_some() {
            return files;
        }
        let (cert, key) = crate::auto_tls::paths(&self.self_cert_dir(side));
        TlsFiles {
            cert_file: Some(cert),
            key_file: Some(key),
            self_cert: true,
            flags: files.flags,
            ..TlsFiles::default()
        }
    }

    /// `--client-cert-auth` as it applies: etcd drops it under `--auto-tls`.
    pub fn uses_client_cert_auth(&self) -> bool {
        self.client_tls().client_cert_auth
    }

    fn self_cert_dir(&self, side: &str) -> PathBuf {
        self.data_dir().join("fixtures").join(side)
    }

    /// Generates (or finds) the `--auto-tls` and `--peer-auto-tls`
    /// certificates in the data directory, as etcd does at start.
    pub fn make_self_certs(&self) -> Result<(), crate::auto_tls::AutoTlsError> {
        let sides = [
            (
                self.auto_tls,
                "client",
                self.client_tls(),
                &self.listen_client_urls,
            ),
            (
                self.peer_auto_tls,
                "peer",
                self.peer_tls(),
                &self.listen_peer_urls,
            ),
        ];
        for (auto, side, files, listen) in sides {
            if !auto {
                continue;
            }
            if !files.self_cert {
                tracing::warn!("ignoring {side} auto TLS since certs given");
                continue;
            }
            let urls: Vec<String> = split_urls(listen).map(str::to_string).collect();
            crate::auto_tls::self_cert(
                &self.self_cert_dir(side),
                &urls,
                self.self_signed_cert_validity,
            )?;
        }
        Ok(())
    }

    /// `--cipher-suites`, split.
    pub fn cipher_suite_names(&self) -> Vec<String> {
        split_urls(&self.cipher_suites)
            .map(str::to_string)
            .collect()
    }

    pub fn advertise_client_urls(&self) -> Vec<String> {
        split_urls(&self.advertise_client_urls)
            .map(str::to_string)
            .collect()
    }

    pub fn advertise_peer_urls(&self) -> Vec<String> {
        split_urls(&self.initial_advertise_peer_urls)
            .map(str::to_string)
            .collect()
    }

    /// The members named by `--initial-cluster` (by default just this one,
    /// at its advertised peer URLs), in flag order, each with sorted URLs.
    pub fn initial_members(&self) -> Result<Vec<InitialMember>, ConfigError> {
        let Some(cluster) = self
            .initial_cluster
            .as_deref()
            .filter(|c| !c.trim().is_empty())
        else {
            let mut peer_urls = self.advertise_peer_urls();
            peer_urls.sort();
            return Ok(vec![InitialMember {
                name: self.name.clone(),
                peer_urls,
            }]);
        };
        let mut members: Vec<InitialMember> = Vec::new();
        for m in split_urls(cluster) {
            let Some((name, url)) = m.split_once('=') else {
                return Err(ConfigError(format!(
                    "--initial-cluster: invalid member {m:?}, expected name=peer-url"
                )));
            };
            parse_url("--initial-cluster", url)?;
            // A name may appear several times, once per peer URL (as in etcd).
            match members.iter_mut().find(|x| x.name == name) {
                Some(existing) => existing.peer_urls.push(url.to_string()),
                None => members.push(InitialMember {
                    name: name.to_string(),
                    peer_urls: vec![url.to_string()],
                }),
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &mut members {
            m.peer_urls.sort();
            for u in &m.peer_urls {
                if !seen.insert(u.clone()) {
                    return Err(ConfigError(format!(
                        "--initial-cluster: peer URL {u} appears more than once"
                    )));
                }
            }
        }
        Ok(members)
    }

    /// The WAL directory: `--wal-dir`, or `member/wal` in the data dir.
    pub fn wal_dir(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("member").join("wal"))
    }

    /// Addresses for `--listen-peer-urls`.
    pub fn peer_listen_addrs(&self) -> Result<Vec<ListenAddr>, ConfigError> {
        split_urls(&self.listen_peer_urls)
            .map(|u| ListenAddr::resolve("--listen-peer-urls", u))
            .collect()
    }

    /// Whether this member talks to peers over TLS: it listens on an
    /// `https://` peer URL or one of the initial members advertises one.
    pub fn uses_peer_tls(&self) -> Result<bool, ConfigError> {
        let listens = self.peer_listen_addrs()?.iter().any(|a| a.tls);
        let dials = self
            .initial_members()?
            .iter()
            .flat_map(|m| &m.peer_urls)
            .any(|u| u.starts_with("https://"));
        Ok(listens || dials)
    }

    /// The TLS problems etcd refuses to start with, in etcd's words where it has them.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let client = self.client_tls();
        for a in self.client_listen_addrs()? {
            if a.tls && !client.has_identity() {
                return Err(ConfigError(format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme",
                    a.url
                )));
            }
        }
        let peer = self.peer_tls();
        for a in self.peer_listen_addrs()? {
            if a.tls && !peer.has_identity() {
                return Err(ConfigError(format!(
                    "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url {} with HTTPS scheme",
                    a.url
                )));
            }
        }
        if self.uses_peer_tls()? && peer.trusted_ca_file.is_none() && !peer.self_cert {
            return Err(ConfigError(
                "https peer URLs need --peer-trusted-ca-file (or --peer-auto-tls) to verify the other members".into(),
            ));
        }
        if self.auto_tls || self.peer_auto_tls {
            crate::auto_tls::check_validity(self.self_signed_cert_validity)
                .map_err(|e| ConfigError(e.to_string()))?;
        }
        for (files, flags) in [
            (&client, "--cert-file and --key-file"),
            (&peer, "--peer-cert-file and --peer-key-file"),
        ] {
            if files.cert_file.is_some() != files.key_file.is_some() {
                return Err(ConfigError(format!("{flags} must both be given")));
            }
        }
        let provider = crate::tls::provider(&self.cipher_suite_names())
            .map_err(|e| ConfigError(format!("--cipher-suites: {e}")))?;
        // Read and check the files now, before anything touches the disk
        // (generated certificates do not exist yet: they are made, and
        // read, at start).
        let tls_err = |e: crate::tls::TlsError| ConfigError(e.to_string());
        if self.client_listen_addrs()?.iter().any(|a| a.tls) && !client.self_cert {
            crate::tls::server_config(&client, provider.clone()).map_err(tls_err)?;
        }
        if !peer.self_cert {
            if self.peer_listen_addrs()?.iter().any(|a| a.tls) {
                crate::tls::server_config(&peer, provider.clone()).map_err(tls_err)?;
            }
            if self.uses_peer_tls()? {
                crate::tls::peer_client_config(&peer, provider).map_err(tls_err)?;
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked before touching the disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client_listen_addrs()?;
        for (flag, urls) in [
            ("--advertise-client-urls", &self.advertise_client_urls),
            ("--listen-peer-urls", &self.listen_peer_urls),
            (
                "--initial-advertise-peer-urls",
                &self.initial_advertise_peer_urls,
            ),
        ] {
            for u in split_urls(urls) {
                parse_url(flag, u)?;
            }
        }
        let members = self.initial_members()?;
        let mine = members
            .iter()
            .find(|m| m.name == self.name)
            .ok_or_else(|| {
                ConfigError(format!(
                    "couldn't find local name {:?} in the initial cluster configuration",
                    self.name
                ))
            })?;
        let mut advertised = self.advertise_peer_urls();
        advertised.sort();
        if mine.peer_urls != advertised {
            return Err(ConfigError(format!(
                "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
                self.name,
                mine.peer_urls.join(","),
                advertised.join(",")
            )));
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError("--max-txn-ops must be greater than 0".into()));
        }
        if self.max_request_bytes == 0 {
            return Err(ConfigError(
                "--max-request-bytes must be greater than 0".into(),
            ));
        }
        if self.heartbeat_interval == 0 || self.election_timeout < 5 * self.heartbeat_interval {
            return Err(ConfigError(format!(
                "--election-timeout[{}ms] should be at least 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            )));
        }
        self.auto_compaction()?;
        crate::auth::token_provider(&self.auth_token, Duration::from_secs(self.auth_token_ttl))
            .map_err(ConfigError)?;
        self.validate_tls()
    }

    /// `--bcrypt-cost`, or etcd's default (10) when out of bcrypt's range,
    /// as etcd does (with a warning).
    pub fn bcrypt_cost(&self) -> u32 {
        use crate::auth::{MAX_BCRYPT_COST, MIN_BCRYPT_COST};
        if (MIN_BCRYPT_COST..=MAX_BCRYPT_COST).contains(&self.bcrypt_cost) {
            self.bcrypt_cost
        } else {
            tracing::warn!(
                given = self.bcrypt_cost,
                "invalid --bcrypt-cost; using the default 10"
            );
            10
        }
    }

    /// The auto-compaction policy, or None when disabled.
    pub fn auto_compaction(&self) -> Result<Option<AutoCompaction>, ConfigError> {
        let r = self.auto_compaction_retention.trim();
        let bad = || {
            ConfigError(format!(
                "--auto-compaction-retention: invalid value {r:?} for mode {}",
                self.auto_compaction_mode
            ))
        };
        if self.auto_compaction_mode == "revision" {
            let n: i64 = r.parse().map_err(|_| bad())?;
            return Ok((n > 0).then_some(AutoCompaction::Revision(n)));
        }
        // periodic: a bare number means hours, as in etcd
        let d = if let Ok(hours) = r.parse::<u64>() {
            Duration::from_secs(hours * 3600)
        } else {
            parse_duration(r).ok_or_else(bad)?
        };
        Ok((!d.is_zero()).then_some(AutoCompaction::Periodic(d)))
    }
}

/// One member of `--initial-cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// How history is compacted automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this much wall-clock time of history.
    Periodic(Duration),
    /// Keep this many revisions of history.
    Revision(i64),
}

/// Parses Go-style durations such as `90s`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ns" => value / 1e9,
            "us" | "µs" => value / 1e6,
            "ms" => value / 1e3,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(secs);
        rest = tail;
    }
    Some(total)
}

/// A Go duration where zero (`0`, `0s`) is allowed and means "off".
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s).ok_or_else(|| format!("invalid duration {s:?} (expected e.g. 5m, 30s, 0s)"))
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("invalid duration {s:?} (expected e.g. 10m, 30s, 500ms)"))
}

/// An empty path (as from `ETCD_CERT_FILE=`) means "not given", as in etcd.
fn given(path: &Option<PathBuf>) -> Option<PathBuf> {
    path.clone().filter(|p| !p.as_os_str().is_empty())
}

fn split_urls(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// Splits `http://host:port` into (host, port).
fn parse_url<'a>(flag: &str, url: &'a str) -> Result<(&'a str, u16), ConfigError> {
    let bad = |why: &str| ConfigError(format!("{flag}: invalid URL {url:?}: {why}"));
    let rest = if let Some(r) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    {
        r
    } else {
        return Err(bad("expected http://host:port or https://host:port"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
    let port: u16 = port.parse().map_err(|_| bad("invalid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok((host, port))
}

/// One `--listen-*-urls` entry: where to bind, and whether it is `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    pub tls: bool,
    pub url: String,
}

impl ListenAddr {
    fn resolve(flag: &str, url: &str) -> Result<ListenAddr, ConfigError> {
        let (host, port) = parse_url(flag, url)?;
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| ConfigError(format!("{flag}: cannot resolve {url:?}: {e}")))?
            .next()
            .ok_or_else(|| ConfigError(format!("{flag}: {url:?} resolves to no address")))?;
        Ok(ListenAddr {
            addr,
            tls: url.starts_with("https://"),
            url: url.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, clap::Error> {
        parse_from(std::iter::once("tessera").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_etcd() {
        let p = parse(&[]).unwrap();
        let c = p.config;
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir(), PathBuf::from("default.etcd"));
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.quota_bytes(), Some(2 << 30));
        assert_eq!(
            c.client_listen_addrs().unwrap(),
            vec![ListenAddr {
                addr: "127.0.0.1:2379".parse().unwrap(),
                tls: false,
                url: "http://localhost:2379".into()
            }]
        );
        assert!(c.validate().is_ok());
        assert!(p.ignored_flags.is_empty());
    }

    #[test]
    fn ignored_flags_are_accepted_and_reported() {
        let p = parse(&["--enable-pprof", "--max-wals=3", "--auto-tls=true"]).unwrap();
        assert_eq!(p.ignored_flags, vec!["enable-pprof", "max-wals"]);
        assert!(p.config.auto_tls);
    }

    #[test]
    fn initial_cluster_is_parsed_and_checked_like_etcd() {
        let three =
            "--initial-cluster=a=http://127.0.0.1:1,b=http://127.0.0.1:2,c=http://127.0.0.1:3";
        let c = parse(&[
            "--name=b",
            three,
            "--initial-advertise-peer-urls=http://127.0.0.1:2",
        ])
        .unwrap()
        .config;
        c.validate().unwrap();
        let members = c.initial_members().unwrap();
        assert_eq!(members.len(), 3);
        assert_eq!(members[1].peer_urls, vec!["http://127.0.0.1:2".to_string()]);

        let c = parse(&["--name=d", three]).unwrap().config;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("couldn't find local name"));
        let c = parse(&["--name=a", three]).unwrap().config;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("missing from --initial-advertise-peer-urls"));
        let dup = "--initial-cluster=a=http://127.0.0.1:1,b=http://127.0.0.1:1";
        let c = parse(&["--name=a", dup]).unwrap().config;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value_as_in_go() {
        let c = parse(&[
            "--listen-client-urls=http://127.0.0.1:1",
            "--listen-client-urls=https://127.0.0.1:2",
        ])
        .unwrap()
        .config;
        assert_eq!(c.listen_client_urls, "https://127.0.0.1:2");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["--max-txn-ops=abc"]).is_err());
        assert!(parse(&["--no-such-flag"]).is_err());
        assert!(parse(&["--auto-compaction-mode=weekly"]).is_err());
        let c = parse(&["--listen-client-urls=localhost:2379"])
            .unwrap()
            .config;
        assert!(c.validate().is_err());
        let c = parse(&["--auto-compaction-retention=xyz"]).unwrap().config;
        assert!(c.validate().is_err());
    }

    #[test]
    fn auto_compaction_policies() {
        let c = parse(&["--auto-compaction-retention=1"]).unwrap().config;
        assert_eq!(
            c.auto_compaction().unwrap(),
            Some(AutoCompaction::Periodic(Duration::from_secs(3600)))
        );
        let c = parse(&["--auto-compaction-retention=90s"]).unwrap().config;
        assert_eq!(
            c.auto_compaction().unwrap(),
            Some(AutoCompaction::Periodic(Duration::from_secs(90)))
        );
        let c = parse(&[
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=1000",
        ])
        .unwrap()
        .config;
        assert_eq!(
            c.auto_compaction().unwrap(),
            Some(AutoCompaction::Revision(1000))
        );
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    }
}
