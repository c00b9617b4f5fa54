//! TLS for client and peer URLs, configured with etcd's flags.
//!
//! One rustls server configuration serves every `https://` URL of a kind
//! (client or peer): etcd's `--cert-file`/`--key-file` identity, client
//! certificates required and verified against `--trusted-ca-file` when it is
//! given or `--client-cert-auth` is on (as etcd's `transport.TLSInfo` does),
//! TLS 1.2 and 1.3, `--cipher-suites` limiting the TLS 1.2 suites. Handshakes
//! run on their own tasks so one slow or hostile client never holds up
//! accepting the next.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CipherSuite, RootCertStore, SupportedCipherSuite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use tessera_proto::coalesce::CoalescedIo;

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} {path}: {error}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {path} holds no certificate")]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {path}: {error}")]
    BadCertificate {
        flag: &'static str,
        path: PathBuf,
        error: rustls::Error,
    },
    #[error("unexpected TLS cipher suite {0:?}")]
    UnknownCipherSuite(String),
    #[error("TLS cipher suite {0:?} is not supported (Tessera offers the ECDHE suites with AES-GCM or ChaCha20-Poly1305)")]
    UnsupportedCipherSuite(String),
    #[error("--cipher-suites leaves no TLS 1.2 cipher suite")]
    NoCipherSuite,
    #[error("{0}")]
    Config(String),
}

/// The TLS files of one side (client or peer), named by their flags.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// `--cert-file` / `--peer-cert-file`.
    pub cert_file: Option<PathBuf>,
    /// `--key-file` / `--peer-key-file`.
    pub key_file: Option<PathBuf>,
    /// `--trusted-ca-file` / `--peer-trusted-ca-file`.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--client-cert-auth` / `--peer-client-cert-auth`.
    pub client_cert_auth: bool,
    /// The flag names, for messages.
    pub flags: TlsFlags,
}

/// The names of one side's TLS flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFlags {
    pub cert: &'static str,
    pub key: &'static str,
    pub ca: &'static str,
    pub client_cert_auth: &'static str,
}

/// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`.
pub const CLIENT_FLAGS: TlsFlags = TlsFlags {
    cert: "--cert-file",
    key: "--key-file",
    ca: "--trusted-ca-file",
    client_cert_auth: "--client-cert-auth",
};

/// The `--peer-*` counterparts.
pub const PEER_FLAGS: TlsFlags = TlsFlags {
    cert: "--peer-cert-file",
    key: "--peer-key-file",
    ca: "--peer-trusted-ca-file",
    client_cert_auth: "--peer-client-cert-auth",
};

impl TlsFiles {
    /// Whether a certificate and key are configured (etcd's `!TLSInfo.Empty()`).
    pub fn has_identity(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    /// Whether connections must present a verified client certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.trusted_ca_file.is_some() || self.client_cert_auth
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let TlsFlags {
            cert: cert_flag,
            key: key_flag,
            ..
        } = self.flags;
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Err(TlsError::Config(format!(
                "{cert_flag} and {key_flag} must both be given"
            )));
        };
        let certs = read_certs(cert_flag, cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Read {
            flag: key_flag,
            path: key.clone(),
            error,
        })?;
        Ok((certs, key))
    }

    fn roots(&self) -> Result<Option<RootCertStore>, TlsError> {
        let flag = self.flags.ca;
        let Some(path) = &self.trusted_ca_file else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        for cert in read_certs(flag, path)? {
            roots.add(cert).map_err(|error| TlsError::BadCertificate {
                flag,
                path: path.clone(),
                error,
            })?;
        }
        Ok(Some(roots))
    }
}

/// etcd's warnings for TLS settings an `http://` URL does not use.
pub fn warn_unused(files: &TlsFiles, url: &str) {
    if files.has_identity() {
        tracing::warn!(%url, "scheme is HTTP while key and cert files are present; ignoring key and cert files");
    }
    if files.client_cert_auth {
        let flag = files.flags.client_cert_auth;
        tracing::warn!(%url, "scheme is HTTP while {flag} is enabled; ignoring client cert auth for this URL");
    }
}

fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |error| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// ring's provider with its TLS 1.2 suites limited to `cipher_suites` (Go's
/// names, in the given order). TLS 1.3 suites are always offered, as in Go,
/// where `CipherSuites` does not apply to TLS 1.3.
pub fn provider(cipher_suites: &[String]) -> Result<Arc<CryptoProvider>, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    if cipher_suites.is_empty() {
        return Ok(Arc::new(provider));
    }
    let all = provider.cipher_suites.clone();
    let tls13: Vec<SupportedCipherSuite> = all
        .iter()
        .copied()
        .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
        .collect();
    let mut chosen = Vec::new();
    for name in cipher_suites {
        match go_cipher_suite(name) {
            GoSuite::Tls13 => {}
            GoSuite::Unknown => return Err(TlsError::UnknownCipherSuite(name.clone())),
            GoSuite::Unsupported => return Err(TlsError::UnsupportedCipherSuite(name.clone())),
            GoSuite::Tls12(wanted) => {
                if let Some(s) = all.iter().find(|s| s.suite() == wanted) {
                    if !chosen.contains(s) {
                        chosen.push(*s);
                    }
                }
            }
        }
    }
    if chosen.is_empty() {
        return Err(TlsError::NoCipherSuite);
    }
    chosen.extend(tls13);
    provider.cipher_suites = chosen;
    Ok(Arc::new(provider))
}

enum GoSuite {
    /// A TLS 1.2 suite rustls offers.
    Tls12(CipherSuite),
    /// A TLS 1.3 suite name: accepted and, as in Go, without effect.
    Tls13,
    /// A suite Go knows and rustls deliberately lacks (CBC, RSA key exchange, RC4, 3DES).
    Unsupported,
    Unknown,
}

/// Go's `crypto/tls` cipher suite names, which `--cipher-suites` takes.
fn go_cipher_suite(name: &str) -> GoSuite {
    match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
            GoSuite::Tls12(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        }
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
            GoSuite::Tls12(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
        }
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
            GoSuite::Tls12(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => {
            GoSuite::Tls12(CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
        }
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => {
            GoSuite::Tls12(CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384)
        }
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            GoSuite::Tls12(CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)
        }
        "TLS_AES_128_GCM_SHA256" | "TLS_AES_256_GCM_SHA384" | "TLS_CHACHA20_POLY1305_SHA256" => {
            GoSuite::Tls13
        }
        "TLS_RSA_WITH_RC4_128_SHA"
        | "TLS_RSA_WITH_3DES_EDE_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA256"
        | "TLS_RSA_WITH_AES_128_GCM_SHA256"
        | "TLS_RSA_WITH_AES_256_GCM_SHA384"
        | "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_RC4_128_SHA"
        | "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256" => GoSuite::Unsupported,
        _ => GoSuite::Unknown,
    }
}

/// The server side of `files`: its certificate, and client certificates
/// required and checked against the trusted CA when configured.
pub fn server_config(
    files: &TlsFiles,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = files.identity()?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if files.requires_client_cert() {
        let Some(roots) = files.roots()? else {
            return Err(TlsError::Config(format!(
                "client certificate authentication needs {} to verify client certificates",
                files.flags.ca
            )));
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::Config(format!("{}: {e}", files.flags.ca)))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let cert_flag = files.flags.cert;
    let mut config =
        builder
            .with_single_cert(certs, key)
            .map_err(|error| TlsError::BadCertificate {
                flag: cert_flag,
                path: files.cert_file.clone().unwrap_or_default(),
                error,
            })?;
    // gRPC needs h2; HTTP/1.1 serves the JSON gateway, /health and /metrics.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side of `files`, for dialling other members' `https://` peer
/// URLs: their certificates are checked against the trusted CA, and ours is
/// presented for `--peer-client-cert-auth`. The files are read (and checked)
/// now, so a bad one stops the start instead of every later connection.
pub fn peer_client_config(files: &TlsFiles) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let ca_flag = files.flags.ca;
    let Some(ca) = &files.trusted_ca_file else {
        return Err(TlsError::Config(format!(
            "https peer URLs need {ca_flag} to verify the other members"
        )));
    };
    read_certs(ca_flag, ca)?;
    let read = |flag: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            flag,
            path: path.to_path_buf(),
            error: rustls::pki_types::pem::Error::Io(e),
        })
    };
    let mut config =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_flag, ca)?));
    if let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) {
        files.identity()?;
        config = config.identity(Identity::from_pem(
            read(files.flags.cert, cert)?,
            read(files.flags.key, key)?,
        ));
    }
    Ok(config)
}

/// What the server knows of a client connection: its address and, for a
/// TLS connection with a verified client certificate, the certificate's
/// common name (the user name under `--client-cert-auth`). Handlers find it
/// in the request extensions as `axum::extract::ConnectInfo<ClientConn>`.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub remote: std::net::SocketAddr,
    pub common_name: Option<String>,
}

/// The subject common name of a DER certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A plaintext listener with the same connection info as [`TlsListener`].
pub struct PlainListener(pub TcpListener);

impl axum::serve::Listener for PlainListener {
    type Io = CoalescedIo<TcpStream>;
    type Addr = ClientConn;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((tcp, remote)) => {
                    let _ = tcp.set_nodelay(true);
                    return (
                        CoalescedIo::new(tcp),
                        ClientConn {
                            remote,
                            common_name: None,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ClientConn {
            remote: self.0.local_addr()?,
            common_name: None,
        })
    }
}

/// A listener whose connections have completed a TLS handshake. Handshakes
/// run concurrently on their own tasks, each bounded by a timeout; failed
/// ones are logged (like etcd's "rejected connection") and dropped.
pub struct TlsListener {
    local_addr: std::net::SocketAddr,
    ready: mpsc::Receiver<(CoalescedIo<TlsStream<TcpStream>>, ClientConn)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(ACCEPT_BACKLOG);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(TlsListener { local_addr, ready })
    }

    /// The handshaken connections as a stream, for tonic's `serve_with_incoming`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = std::io::Result<CoalescedIo<TlsStream<TcpStream>>>> + Send + 'static
    {
        tokio_stream::wrappers::ReceiverStream::new(self.ready).map(|(conn, _)| Ok(conn))
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(CoalescedIo<TlsStream<TcpStream>>, ClientConn)>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if ready.is_closed() {
            return;
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(conn)) => {
                    let common_name = conn
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(common_name);
                    let info = ClientConn {
                        remote,
                        common_name,
                    };
                    // Coalesced above TLS: a handshake's own writes (such as
                    // the alert refusing a client) must not wait for a flush.
                    let _ = ready.send((CoalescedIo::new(conn), info)).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "rejected connection: TLS handshake failed")
                }
                Err(_) => tracing::warn!(%remote, "rejected connection: TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = CoalescedIo<TlsStream<TcpStream>>;
    type Addr = ClientConn;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ClientConn {
            remote: self.local_addr,
            common_name: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_suites_follow_go_names() {
        let p = provider(&["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()]).unwrap();
        let tls12: Vec<_> = p
            .cipher_suites
            .iter()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
            .collect();
        assert_eq!(tls12.len(), 1);
        assert_eq!(
            tls12[0].suite(),
            CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        );
        assert!(p
            .cipher_suites
            .iter()
            .any(|s| matches!(s, SupportedCipherSuite::Tls13(_))));

        assert_eq!(
            provider(&["TLS_BOGUS".into()]).unwrap_err().to_string(),
            "unexpected TLS cipher suite \"TLS_BOGUS\""
        );
        assert!(matches!(
            provider(&["TLS_RSA_WITH_AES_128_CBC_SHA".into()]),
            Err(TlsError::UnsupportedCipherSuite(_))
        ));
        assert!(matches!(
            provider(&["TLS_AES_128_GCM_SHA256".into()]),
            Err(TlsError::NoCipherSuite)
        ));
        // Every TLS 1.2 name maps onto a suite ring really offers.
        let all = provider(&[]).unwrap();
        for name in [
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        ] {
            let GoSuite::Tls12(wanted) = go_cipher_suite(name) else {
                panic!("{name} is a TLS 1.2 suite");
            };
            assert!(
                all.cipher_suites.iter().any(|s| s.suite() == wanted),
                "{name}"
            );
        }
    }

    #[test]
    fn missing_files_are_named_in_the_error() {
        let files = TlsFiles {
            cert_file: Some("/nonexistent/server.crt".into()),
            key_file: Some("/nonexistent/server.key".into()),
            flags: CLIENT_FLAGS,
            ..Default::default()
        };
        let err = server_config(&files, provider(&[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read --cert-file /nonexistent/server.crt"),
            "{err}"
        );
    }
}
