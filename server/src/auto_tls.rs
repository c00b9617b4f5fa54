//! `--auto-tls` and `--peer-auto-tls`: self-signed certificates generated
//! in the data directory, as etcd's `transport.SelfCert` makes them
//! (`fixtures/client` and `fixtures/peer`, `cert.pem` and `key.pem`, reused
//! when both exist, in directories of mode 0700). Organization "etcd", a
//! random 128-bit serial, the listen URLs' hosts as IP or DNS subject
//! alternative names, digital signature and key encipherment, server auth,
//! not a CA, valid `--self-signed-cert-validity` years from now.
//!
//! Differences: etcd uses an ECDSA P-521 key, which ring (rustls's provider
//! here) cannot sign with, so the key is P-256; and the key file holds it as
//! PKCS#8 (`PRIVATE KEY`) where etcd writes SEC1 (`EC PRIVATE KEY`). Both
//! read either.

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
    #[error("--self-signed-cert-validity {0} is too large (at most {MAX_VALIDITY_YEARS} years)")]
    TooLong(u32),
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

/// Far beyond any sensible certificate, well within the date type's range.
const MAX_VALIDITY_YEARS: u32 = 1000;

/// Refuses validities etcd refuses (0) and ones no date can hold.
pub fn check_validity(years: u32) -> Result<(), AutoTlsError> {
    match years {
        0 => Err(AutoTlsError::ZeroValidity),
        y if y > MAX_VALIDITY_YEARS => Err(AutoTlsError::TooLong(y)),
        _ => Ok(()),
    }
}

/// Where a self-signed certificate and key live in `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Makes (or reuses) the self-signed certificate in `dir` for the hosts of
/// `listen_urls`. Returns the certificate and key paths.
pub fn self_cert(
    dir: &Path,
    listen_urls: &[String],
    validity_years: u32,
) -> Result<(PathBuf, PathBuf), AutoTlsError> {
    check_validity(validity_years)?;
    let (cert_path, key_path) = paths(dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let dir_err = |error| AutoTlsError::Dir {
        path: dir.to_path_buf(),
        error,
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
    }
    // A certificate left without its key goes first: otherwise a crash
    // after the new key is in place would leave a pair that does not match,
    // and every later start would reuse it.
    if cert_path.exists() {
        std::fs::remove_file(&cert_path).map_err(dir_err)?;
        sync_dir(dir).map_err(dir_err)?;
    }

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
        sync_dir(dir).map_err(err)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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
        let (cert_path, key_path) = self_cert(&fixtures, &urls, 2).unwrap();
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
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert_eq!(days, 730);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Both files there: reused as they are.
        let before = std::fs::read(&cert_path).unwrap();
        let again = self_cert(&fixtures, &urls, 1).unwrap();
        assert_eq!(again, (cert_path.clone(), key_path.clone()));
        assert_eq!(std::fs::read(&cert_path).unwrap(), before);
        let dir_mode = std::fs::metadata(&fixtures).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(matches!(
            self_cert(&dir.path().join("other"), &urls, 0),
            Err(AutoTlsError::ZeroValidity)
        ));
        assert!(matches!(
            self_cert(&dir.path().join("other"), &urls, u32::MAX),
            Err(AutoTlsError::TooLong(_))
        ));

        // A certificate without its key: both are made again.
        std::fs::remove_file(&key_path).unwrap();
        self_cert(&fixtures, &urls, 1).unwrap();
        assert_ne!(std::fs::read(&cert_path).unwrap(), before);
    }

    #[test]
    fn hosts_come_from_urls() {
        assert_eq!(url_host("https://127.0.0.1:2380"), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:2380"), Some("::1"));
        assert_eq!(url_host("https://example.com"), Some("example.com"));
        assert_eq!(url_host("https://example.com:2379/"), Some("example.com"));
    }
}
