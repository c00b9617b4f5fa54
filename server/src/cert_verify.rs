//! Certificate checks as etcd makes them with Go's `crypto/tls`, where they
//! differ from webpki's (rustls's verifier):
//!
//! - Go trusts a certificate that is itself in the trusted pool, whatever
//!   its basic constraints: a self-signed certificate with `CA:TRUE` given
//!   both as `--trusted-ca-file` and as a member's or client's certificate
//!   is accepted (webpki refuses it as `CaUsedAsEndEntity`). Its validity
//!   dates, extended key usage and (for a server) name are still checked.
//! - `--peer-auto-tls` peers skip verification of each other's certificate
//!   (etcd sets `InsecureSkipVerify` for its self-signed certificates); the
//!   handshake signatures are still verified.
//! - `--client-crl-file` / `--peer-crl-file`: after the handshake, a
//!   connection whose certificate chain holds a serial number the CRL file
//!   revokes is refused. The file is read at every connection, as etcd's
//!   `checkCRL` does, so a new CRL applies without a restart.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// Which side a certificate authenticates, for its extended key usage.
#[derive(Debug, Clone, Copy)]
enum Role {
    Server,
    Client,
}

/// The checks Go still makes on a certificate it trusts because it is in
/// the pool itself: validity dates and extended key usage.
fn check_pooled_leaf(cert: &CertificateDer<'_>, now: UnixTime, role: Role) -> Result<(), Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = parsed.validity();
    if now < validity.not_before.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > validity.not_after.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    if let Ok(Some(eku)) = parsed.extended_key_usage() {
        let eku = eku.value;
        let allowed = eku.any
            || match role {
                Role::Server => eku.server_auth,
                Role::Client => eku.client_auth,
            };
        if !allowed {
            return Err(Error::InvalidCertificate(CertificateError::InvalidPurpose));
        }
    }
    Ok(())
}

/// How a member checks the certificates of the peers it dials.
#[derive(Debug)]
pub enum PeerServerVerifier {
    /// `--peer-auto-tls`: any certificate (etcd's `InsecureSkipVerify`).
    SelfSigned { provider: Arc<CryptoProvider> },
    /// `--peer-trusted-ca-file`, with Go's acceptance of pooled leaves.
    Trusted {
        pool: Vec<CertificateDer<'static>>,
        webpki: Arc<WebPkiServerVerifier>,
        provider: Arc<CryptoProvider>,
    },
}

impl PeerServerVerifier {
    fn provider(&self) -> &CryptoProvider {
        match self {
            PeerServerVerifier::SelfSigned { provider }
            | PeerServerVerifier::Trusted { provider, .. } => provider,
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self {
            PeerServerVerifier::SelfSigned { .. } => Ok(ServerCertVerified::assertion()),
            PeerServerVerifier::Trusted { pool, webpki, .. } => {
                if pool.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
                    check_pooled_leaf(end_entity, now, Role::Server)?;
                    let parsed = ParsedCertificate::try_from(end_entity)?;
                    rustls::client::verify_server_name(&parsed, server_name)?;
                    return Ok(ServerCertVerified::assertion());
                }
                webpki.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// webpki's client certificate verifier, plus Go's acceptance of a client
/// certificate that is itself in the trusted pool.
#[derive(Debug)]
pub struct GoClientVerifier {
    pool: Vec<CertificateDer<'static>>,
    webpki: Arc<dyn ClientCertVerifier>,
}

impl GoClientVerifier {
    pub fn new(pool: Vec<CertificateDer<'static>>, webpki: Arc<dyn ClientCertVerifier>) -> Self {
        GoClientVerifier { pool, webpki }
    }
}

impl ClientCertVerifier for GoClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if self.pool.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            check_pooled_leaf(end_entity, now, Role::Client)?;
            return Ok(ClientCertVerified::assertion());
        }
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("cannot read CRL file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("CRL file {0} holds no readable certificate revocation list")]
    Parse(String),
    #[error("transport: certificate serial {0} revoked")]
    Revoked(String),
    #[error("a certificate of the chain cannot be parsed to check it against the CRL")]
    BadCertificate,
}

/// The revoked serial numbers (big-endian bytes, no leading zeros) of
/// every CRL in the PEM or DER file at `path`.
pub fn revoked_serials(path: &Path) -> Result<HashSet<Vec<u8>>, CrlError> {
    let bytes = std::fs::read(path).map_err(|error| CrlError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let bad = || CrlError::Parse(path.display().to_string());
    let mut ders = Vec::new();
    if bytes.starts_with(b"-----") {
        for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
            let pem = pem.map_err(|_| bad())?;
            if pem.label == "X509 CRL" {
                ders.push(pem.contents);
            }
        }
    } else {
        ders.push(bytes);
    }
    if ders.is_empty() {
        return Err(bad());
    }
    let mut serials = HashSet::new();
    for der in &ders {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|_| bad())?;
        for revoked in crl.iter_revoked_certificates() {
            serials.insert(trimmed(revoked.raw_serial()));
        }
    }
    Ok(serials)
}

/// etcd's `checkCRL`: refuses a chain holding a revoked serial number.
pub fn check_crl(path: &Path, chain: &[CertificateDer<'_>]) -> Result<(), CrlError> {
    let revoked = revoked_serials(path)?;
    for cert in chain {
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
            return Err(CrlError::BadCertificate);
        };
        let serial = trimmed(parsed.raw_serial());
        if revoked.contains(&serial) {
            let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
            return Err(CrlError::Revoked(hex));
        }
    }
    Ok(())
}

/// A serial number without DER's leading zero bytes (Go compares
/// `big.Int.Bytes()`).
fn trimmed(serial: &[u8]) -> Vec<u8> {
    let start = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    serial[start..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, KeyIdMethod,
        KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };

    fn self_signed_ca(serial: u8) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.serial_number = Some(SerialNumber::from_slice(&[serial]));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (p.self_signed(&key).unwrap(), key)
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn a_pooled_self_signed_ca_is_accepted_as_a_leaf_as_go_does() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (ca, _) = self_signed_ca(1);
        let (other, _) = self_signed_ca(2);
        let der = ca.der().clone();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der.clone()).unwrap();
        let roots = Arc::new(roots);
        let webpki_client = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        // webpki alone refuses it ...
        assert!(webpki_client.verify_client_cert(&der, &[], now()).is_err());
        // ... Go (and so Tessera) accepts it, and still refuses a stranger.
        let go = GoClientVerifier::new(vec![der.clone()], webpki_client);
        assert!(go.verify_client_cert(&der, &[], now()).is_ok());
        assert!(go.verify_client_cert(other.der(), &[], now()).is_err());

        let webpki_server = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
        let verifier = PeerServerVerifier::Trusted {
            pool: vec![der.clone()],
            webpki: webpki_server,
            provider,
        };
        let name = ServerName::try_from("localhost").unwrap();
        assert!(verifier
            .verify_server_cert(&der, &[], &name, &[], now())
            .is_ok());
        let wrong = ServerName::try_from("elsewhere.example").unwrap();
        assert!(verifier
            .verify_server_cert(&der, &[], &wrong, &[], now())
            .is_err());
        assert!(verifier
            .verify_server_cert(other.der(), &[], &name, &[], now())
            .is_err());
        // Expired: refused even from the pool.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1 << 40));
        assert!(go.verify_client_cert(&der, &[], later).is_err());
    }

    #[test]
    fn crl_serials_refuse_their_certificates() {
        let (ca, ca_key) = self_signed_ca(1);
        let leaf_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["client".to_string()]).unwrap();
        p.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x9a, 0x01]));
        let leaf = p.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let crl = CertificateRevocationListParams {
            this_update: time::OffsetDateTime::now_utc(),
            next_update: time::OffsetDateTime::now_utc() + time::Duration::days(1),
            crl_number: SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from_slice(&[0x9a, 0x01]),
                revocation_time: time::OffsetDateTime::now_utc(),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca, &ca_key)
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        let err = check_crl(&path, &[leaf.der().clone()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "transport: certificate serial 9a01 revoked"
        );
        assert!(check_crl(&path, &[ca.der().clone()]).is_ok());
        std::fs::write(&path, crl.der()).unwrap();
        assert!(check_crl(&path, &[leaf.der().clone()]).is_err());
        std::fs::write(&path, "not a crl").unwrap();
        assert!(matches!(
            check_crl(&path, &[leaf.der().clone()]),
            Err(CrlError::Parse(_))
        ));
    }
}
