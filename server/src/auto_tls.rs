//! `--auto-tls` and `--peer-auto-tls`: self-signed certificates generated
//! in the data directory, as etcd's `transport.SelfCert` makes them
//! (`fixtures/client` and `fixtures/peer`, `cert.pem` and `key.pem`, reused
//! when both exist). Organization "etcd", a random 128-bit serial, the
//! listen URLs' hosts as IP or DNS subject alternative names, digital
//! signature and key encipherment, server (and, for peers, client) auth,
//! not a CA, valid `--self-signed-cert-validity` years from now.
//!
//! One difference: etcd uses an ECDSA P-521 key; ring (rustls's provider
//! here) cannot sign with P-521, so the key is P-256.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

#[derive(Debug, thiserror::Error)]
pub enum AutoTlsError {
    #[error("selfSignedCertValidity is invalid,it should be greater than 0")]
    ZeroValidity,
    #[error("cannot create cert directory {path}: {error}")]
    Dir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot generate self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Where a self-signed certificate and key live in `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Makes (or reuses) the self-signed certificate in `dir` for the hosts of
/// `listen_urls`; `peer` adds client auth to its key usages. Returns the
/// certificate and key paths.
pub fn self_cert(
    dir: &Path,
    listen_urls: &[String],
    validity_years: u32,
    peer: bool,
) -> Result<(PathBuf, PathBuf), AutoTlsError> {
    if validity_years == 0 {
        return Err(AutoTlsError::ZeroValidity);
    }
    let (cert_path, key_path) = paths(dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).map_err(|error| AutoTlsError::Dir {
        path: dir.to_path_buf(),
        error,
    })?;

    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "etcd");
    params.distinguished_name = name;
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(365 * i64::from(validity_years));
    params.key_usages = vec![
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if peer {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    for host in listen_urls.iter().filter_map(|u| url_host(u)) {
        let san = match host.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.to_string().try_into()?),
        };
        if !params.subject_alt_names.contains(&san) {
            params.subject_alt_names.push(san);
        }
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    // The key first: a certificate without its key is never left behind
    // (a later start would find only one of them and make both again).
    write_durably(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_durably(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), "created cert file");
    tracing::info!(path = %key_path.display(), "created key file");
    Ok((cert_path, key_path))
}

/// The host of `scheme://host:port[/...]`, without IPv6 brackets.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename,
/// so a crash leaves the old file, the new one, or none.
fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AutoTlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |error| AutoTlsError::Write {
        path: path.to_path_buf(),
        error,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_shaped_like_etcds_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = dir.path().join("fixtures/peer");
        let urls = [
            "https://127.0.0.1:2380".to_string(),
            "https://node1.example:2381".to_string(),
            "https://[::1]:2380".to_string(),
        ];
        let (cert_path, key_path) = self_cert(&fixtures, &urls, 2, true).unwrap();
        let pem = std::fs::read(&cert_path).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.subject().to_string(), "O=etcd");
        assert_eq!(cert.issuer(), cert.subject());
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names.iter().any(|n| n.contains("node1.example")),
            "{names:?}"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 730);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Both files there: reused as they are.
        let before = std::fs::read(&cert_path).unwrap();
        let again = self_cert(&fixtures, &urls, 1, true).unwrap();
        assert_eq!(again, (cert_path.clone(), key_path));
        assert_eq!(std::fs::read(&cert_path).unwrap(), before);
        assert!(matches!(
            self_cert(&dir.path().join("other"), &urls, 0, false),
            Err(AutoTlsError::ZeroValidity)
        ));
    }

    #[test]
    fn hosts_come_from_urls() {
        assert_eq!(url_host("https://127.0.0.1:2380"), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:2380"), Some("::1"));
        assert_eq!(url_host("https://example.com"), Some("example.com"));
        assert_eq!(url_host("https://example.com:2379/"), Some("example.com"));
    }
}
