//! TLS on client and peer URLs with etcd's flags. Every client-side scenario
//! runs against Debian's etcd and against tessera with the same certificates
//! and the same etcdctl, curl and openssl commands; the outcomes must agree.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::pki::{flag, Pki};
use common::{etcdctl, stderr, stdout, Kind, Server, TESSERA};

/// etcdctl against `server`'s client URL with extra TLS flags.
fn etcdctl_with(server: &Server, tls: &[String], args: &[&str]) -> Output {
    let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    etcdctl(&server.url(), &all, None)
}

/// Waits until etcdctl with `tls` gets a healthy answer (a TLS server is
/// ready to accept before its first request is served).
fn wait_healthy(server: &Server, tls: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl_with(server, tls, &["endpoint", "health"]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{:?} never healthy over TLS: {}\nlog:\n{}",
            server.kind,
            stderr(&out),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a scenario observed, compared between etcd and tessera.
fn outcome(out: &Output) -> String {
    if out.status.success() {
        format!("ok: {}", stdout(out).trim_end())
    } else {
        "refused".to_string()
    }
}

struct Files {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    rogue_client: (PathBuf, PathBuf),
}

fn files(dir: &Path) -> Files {
    let pki = Pki::new(&dir.join("pki"), "tessera test CA");
    let rogue = Pki::new(&dir.join("rogue"), "someone else's CA");
    Files {
        ca: pki.ca_file(),
        server: pki.issue("server", "server"),
        client: pki.issue("client", "kube-apiserver"),
        rogue_client: rogue.issue("client", "kube-apiserver"),
    }
}

/// The scenario run against one server kind with client cert auth on.
fn mtls_scenario(kind: Kind, dir: &Path, f: &Files) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(Server::start_tls(
        kind,
        &dir.join(format!("{kind:?}")),
        &[
            &flag("cert-file", &f.server.0),
            &flag("key-file", &f.server.1),
            &flag("trusted-ca-file", &f.ca),
            "--client-cert-auth",
        ],
    ));
    let with_cert = vec![
        flag("cacert", &f.ca),
        flag("cert", &f.client.0),
        flag("key", &f.client.1),
    ];
    wait_healthy(&server, &with_cert);
    let mut seen = Vec::new();
    let put = etcdctl_with(&server, &with_cert, &["put", "/registry/secret", "s3cr3t"]);
    seen.push(format!("put with client cert: {}", outcome(&put)));
    let get = etcdctl_with(&server, &with_cert, &["get", "/registry/secret"]);
    seen.push(format!("get with client cert: {}", outcome(&get)));

    let no_cert = vec![flag("cacert", &f.ca)];
    let get = etcdctl_with(&server, &no_cert, &["get", "/registry/secret"]);
    seen.push(format!("get without client cert: {}", outcome(&get)));

    let rogue = vec![
        flag("cacert", &f.ca),
        flag("cert", &f.rogue_client.0),
        flag("key", &f.rogue_client.1),
    ];
    let get = etcdctl_with(&server, &rogue, &["get", "/registry/secret"]);
    seen.push(format!(
        "get with a cert from an untrusted CA: {}",
        outcome(&get)
    ));

    let plain = etcdctl(
        &format!("http://127.0.0.1:{}", server.port),
        &["get", "/registry/secret"],
        None,
    );
    seen.push(format!("get in plaintext: {}", outcome(&plain)));

    // The HTTP side of the client port (health, the JSON gateway) is behind
    // the same TLS.
    let curl = |extra: &[String]| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10"])
            .args(extra)
            .arg(format!("{}/health", server.url()))
            .output()
            .unwrap();
        // etcd 3.4 answers {"health":"true"}, 3.5 (which tessera reports
        // being) adds "reason"; what matters here is getting an answer.
        let healthy = stdout(&out).contains(r#""health":"true""#);
        format!(
            "{} healthy={healthy}",
            outcome(&out).split(':').next().unwrap_or("")
        )
    };
    seen.push(format!(
        "curl /health with client cert: {}",
        curl(&[
            "--cacert".into(),
            f.ca.display().to_string(),
            "--cert".into(),
            f.client.0.display().to_string(),
            "--key".into(),
            f.client.1.display().to_string(),
        ])
    ));
    seen.push(format!(
        "curl /health without client cert: {}",
        curl(&["--cacert".into(), f.ca.display().to_string()])
    ));

    // With auth on, a request without a token acts as the user its
    // certificate names (etcd's AuthInfoFromTLS), within that user's roles.
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "kube-apiserver:pw"],
        &["role", "add", "registry"],
        &[
            "role",
            "grant-permission",
            "registry",
            "--prefix=true",
            "readwrite",
            "/registry/",
        ],
        &["user", "grant-role", "kube-apiserver", "registry"],
        &["auth", "enable"],
    ] {
        let out = etcdctl_with(&server, &with_cert, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    for args in [
        &["put", "/registry/pods/a", "x"][..],
        &["get", "/registry/pods/a"],
        &["put", "/elsewhere", "x"],
        &["get", "/elsewhere"],
    ] {
        let out = etcdctl_with(&server, &with_cert, args);
        seen.push(format!(
            "{args:?} as the certificate's user: {}",
            error_or_ok(&out)
        ));
    }
    seen
}

/// "ok: <stdout>", or etcdctl's error message (its last line: the lines
/// before are its client's retry logs).
fn error_or_ok(out: &Output) -> String {
    if out.status.success() {
        outcome(out)
    } else {
        stderr(out).lines().last().unwrap_or("").to_string()
    }
}

#[test]
fn mutual_tls_clients_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let etcd = mtls_scenario(Kind::Etcd, dir.path(), &f);
    let tessera = mtls_scenario(Kind::Tessera, dir.path(), &f);
    assert_eq!(tessera, etcd);
    // The expectations themselves, so that two servers failing alike cannot pass.
    assert_eq!(
        tessera,
        vec![
            "put with client cert: ok: OK",
            "get with client cert: ok: /registry/secret\ns3cr3t",
            "get without client cert: refused",
            "get with a cert from an untrusted CA: refused",
            "get in plaintext: refused",
            "curl /health with client cert: ok healthy=true",
            "curl /health without client cert: refused healthy=false",
            r#"["put", "/registry/pods/a", "x"] as the certificate's user: ok: OK"#,
            r#"["get", "/registry/pods/a"] as the certificate's user: ok: /registry/pods/a
x"#,
            r#"["put", "/elsewhere", "x"] as the certificate's user: Error: etcdserver: permission denied"#,
            r#"["get", "/elsewhere"] as the certificate's user: Error: etcdserver: permission denied"#,
        ]
    );
}

/// Server-only TLS (no client certificates asked), and `--cipher-suites`
/// limiting what a TLS 1.2 client may negotiate.
fn server_tls_scenario(kind: Kind, dir: &Path, f: &Files) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(Server::start_tls(
        kind,
        &dir.join(format!("{kind:?}-server-only")),
        &[
            &flag("cert-file", &f.server.0),
            &flag("key-file", &f.server.1),
            "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        ],
    ));
    let ca_only = vec![flag("cacert", &f.ca)];
    wait_healthy(&server, &ca_only);
    let mut seen = Vec::new();
    let put = etcdctl_with(&server, &ca_only, &["put", "k", "v"]);
    seen.push(format!("put with the CA only: {}", outcome(&put)));
    let insecure = etcdctl_with(
        &server,
        &[
            "--insecure-transport=false".into(),
            "--insecure-skip-tls-verify".into(),
        ],
        &["get", "k"],
    );
    seen.push(format!("get skipping verification: {}", outcome(&insecure)));
    let unverified = etcdctl(
        &server.url(),
        &["--insecure-transport=false", "get", "k"],
        None,
    );
    seen.push(format!(
        "get without the CA (server cert unverifiable): {}",
        outcome(&unverified)
    ));
    for cipher in [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
    ] {
        let out = Command::new("openssl")
            .args(["s_client", "-tls1_2", "-cipher", cipher, "-connect"])
            .arg(format!("127.0.0.1:{}", server.port))
            .arg("-CAfile")
            .arg(&f.ca)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let agreed = stdout(&out).contains(&format!("Cipher is {cipher}"));
        seen.push(format!("TLS 1.2 with {cipher}: agreed={agreed}"));
    }
    seen
}

#[test]
fn server_tls_and_cipher_suites_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let etcd = server_tls_scenario(Kind::Etcd, dir.path(), &f);
    let tessera = server_tls_scenario(Kind::Tessera, dir.path(), &f);
    assert_eq!(tessera, etcd);
    assert_eq!(
        tessera,
        vec![
            "put with the CA only: ok: OK",
            "get skipping verification: ok: k\nv",
            "get without the CA (server cert unverifiable): refused",
            "TLS 1.2 with ECDHE-ECDSA-AES128-GCM-SHA256: agreed=true",
            "TLS 1.2 with ECDHE-ECDSA-AES256-GCM-SHA384: agreed=false",
        ]
    );
}

#[test]
fn tls_misconfiguration_is_refused_with_etcds_message() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let run = |args: &[String]| {
        let out = Command::new(TESSERA)
            .arg(format!("--data-dir={}", dir.path().join("never").display()))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        err
    };
    let https = "--listen-client-urls=https://127.0.0.1:2379".to_string();
    assert!(run(std::slice::from_ref(&https)).contains(
        "TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:2379 with HTTPS scheme"
    ));
    assert!(run(&[
        https.clone(),
        flag("cert-file", &f.server.0),
        flag("key-file", &f.server.1),
        "--cipher-suites=TLS_BOGUS".into(),
    ])
    .contains("unexpected TLS cipher suite \"TLS_BOGUS\""));
    assert!(run(&[
        https.clone(),
        flag("cert-file", &dir.path().join("missing.crt")),
        flag("key-file", &f.server.1),
    ])
    .contains("cannot read --cert-file"));
    assert!(run(&[
        "--listen-peer-urls=https://127.0.0.1:2380".into(),
        "--initial-advertise-peer-urls=https://127.0.0.1:2380".into(),
        "--initial-cluster=default=https://127.0.0.1:2380".into(),
    ])
    .contains("TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url https://127.0.0.1:2380 with HTTPS scheme"));
    // Nothing was created for a refused start.
    assert!(!dir.path().join("never").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_over_peer_tls() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path());
    let (member_crt, member_key) = (f.server.0.clone(), f.server.1.clone());
    let cluster = Cluster::start_peer_tls(
        3,
        dir.path(),
        &[
            &flag("peer-cert-file", &member_crt),
            &flag("peer-key-file", &member_key),
            &flag("peer-trusted-ca-file", &f.ca),
            "--peer-client-cert-auth",
        ],
    )
    .await;
    for m in &cluster.members {
        assert!(
            m.log().contains("serving peer traffic over TLS"),
            "{}",
            m.log()
        );
    }
    // A write through each member (forwarded to the leader over peer TLS)
    // reaches every member (replicated over peer TLS).
    replicates(&cluster).await;
    // The peer port serves a client with a certificate from the CA and
    // refuses one without. TLS 1.2, where the refusal ends the handshake
    // itself (in TLS 1.3 it arrives after the client may have hung up).
    let peer = format!("127.0.0.1:{}", cluster.members[0].peer_port);
    let s_client = |cert: Option<&(PathBuf, PathBuf)>| {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-tls1_2", "-connect", &peer, "-CAfile"])
            .arg(&f.ca);
        if let Some((crt, key)) = cert {
            cmd.arg("-cert").arg(crt).arg("-key").arg(key);
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    };
    let (ok, text) = s_client(Some(&f.client));
    assert!(ok && text.contains("Verify return code: 0 (ok)"), "{text}");
    let (ok, text) = s_client(None);
    assert!(
        !ok && text.contains("alert"),
        "accepted without a certificate: {text}"
    );
    let plain = Command::new("curl")
        .args(["-s", "--max-time", "5", "--http2-prior-knowledge"])
        .arg(format!("http://{peer}/"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "peer port answered plaintext");
}

/// Certificates Go accepts and webpki alone would not, and CRLs: the same
/// etcdctl commands against etcd and tessera.
fn go_rules_scenario(kind: Kind, dir: &Path) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut seen = Vec::new();

    // A self-signed certificate that is its own CA, given as the trusted CA
    // and as both the server's and the client's certificate.
    let (own, own_key) = common::pki::self_signed_ca_leaf(&dir.join("own"), "member");
    let server = rt.block_on(Server::start_tls(
        kind,
        &dir.join(format!("{kind:?}-own-ca")),
        &[
            &flag("cert-file", &own),
            &flag("key-file", &own_key),
            &flag("trusted-ca-file", &own),
            "--client-cert-auth",
        ],
    ));
    let as_own = vec![
        flag("cacert", &own),
        flag("cert", &own),
        flag("key", &own_key),
    ];
    wait_healthy(&server, &as_own);
    let put = etcdctl_with(&server, &as_own, &["put", "k", "v"]);
    seen.push(format!("self-signed CA as leaf: {}", outcome(&put)));
    drop(server);

    // A CRL revoking one of two client certificates of the CA.
    let pki = Pki::new(&dir.join(format!("{kind:?}-crl-pki")), "crl test CA");
    let server_cert = pki.issue("server", "server");
    let good = pki.issue("good", "good-client");
    let revoked = pki.issue("revoked", "revoked-client");
    let crl = pki.revoke(&revoked.0, "crl.pem");
    let server = rt.block_on(Server::start_tls(
        kind,
        &dir.join(format!("{kind:?}-crl")),
        &[
            &flag("cert-file", &server_cert.0),
            &flag("key-file", &server_cert.1),
            &flag("trusted-ca-file", &pki.ca_file()),
            "--client-cert-auth",
            &flag("client-crl-file", &crl),
        ],
    ));
    let client = |(crt, key): &(PathBuf, PathBuf)| {
        vec![
            flag("cacert", &pki.ca_file()),
            flag("cert", crt),
            flag("key", key),
        ]
    };
    wait_healthy(&server, &client(&good));
    let put = etcdctl_with(&server, &client(&good), &["put", "k", "v"]);
    seen.push(format!("client not in the CRL: {}", outcome(&put)));
    let put = etcdctl_with(
        &server,
        &client(&revoked),
        &["--dial-timeout=2s", "--command-timeout=3s", "put", "k", "v"],
    );
    seen.push(format!("client in the CRL: {}", outcome(&put)));

    // --auto-tls: a generated certificate in the data directory; clients
    // that skip verification get in, others are refused.
    let server = rt.block_on(Server::start_tls(
        kind,
        &dir.join(format!("{kind:?}-auto")),
        &["--auto-tls"],
    ));
    let skip = vec![
        "--insecure-transport=false".to_string(),
        "--insecure-skip-tls-verify".to_string(),
    ];
    wait_healthy(&server, &skip);
    let put = etcdctl_with(&server, &skip, &["put", "k", "v"]);
    seen.push(format!(
        "auto TLS, skipping verification: {}",
        outcome(&put)
    ));
    let get = etcdctl_with(
        &server,
        &["--insecure-transport=false".to_string()],
        &["--dial-timeout=2s", "--command-timeout=3s", "get", "k"],
    );
    seen.push(format!("auto TLS, verifying: {}", outcome(&get)));
    let fixtures = server.data_dir.join("fixtures/client");
    seen.push(format!(
        "auto TLS files: cert={} key={}",
        fixtures.join("cert.pem").exists(),
        fixtures.join("key.pem").exists()
    ));
    seen
}

#[test]
fn go_certificate_rules_crls_and_auto_tls_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = go_rules_scenario(Kind::Etcd, dir.path());
    let tessera = go_rules_scenario(Kind::Tessera, dir.path());
    assert_eq!(tessera, etcd);
    assert_eq!(
        tessera,
        vec![
            "self-signed CA as leaf: ok: OK",
            "client not in the CRL: ok: OK",
            "client in the CRL: refused",
            "auto TLS, skipping verification: ok: OK",
            "auto TLS, verifying: refused",
            "auto TLS files: cert=true key=true",
        ]
    );
}

/// Writes through every member reach every member.
async fn replicates(cluster: &Cluster) {
    for (i, m) in cluster.members.iter().enumerate() {
        let mut c = m.client().await;
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    for m in &cluster.members {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = m.client().await;
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_serializable();
            let n = c.get("k", Some(opts)).await.unwrap().kvs().len();
            if n == cluster.members.len() {
                break;
            }
            assert!(Instant::now() < deadline, "{} has {n} keys", m.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// etcd's own flags for peer auto TLS (`--peer-auto-tls`, https peer URLs,
/// no certificate files) form a cluster: each member makes its certificate
/// in its data directory and accepts the others' without a CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_forms_with_peer_auto_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_peer_tls(3, dir.path(), &["--peer-auto-tls"]).await;
    replicates(&cluster).await;
    for m in &cluster.members {
        let cert = dir.path().join(&m.name).join("fixtures/peer/cert.pem");
        assert!(cert.exists(), "{} has no {}", m.name, cert.display());
        assert!(
            m.log().contains("serving peer traffic over TLS"),
            "{}",
            m.log()
        );
    }
    // The peer port speaks TLS with the generated certificate.
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", cluster.members[0].peer_port))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(stdout(&out).contains("O = etcd"), "{}", stdout(&out));
}

/// A cluster whose members share one self-signed certificate that is its
/// own CA, given as peer certificate and peer trusted CA, with peer client
/// certificate authentication: Go's rules accept it, so does Tessera.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_forms_with_a_self_signed_ca_as_member_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (own, own_key) = common::pki::self_signed_ca_leaf(&dir.path().join("own"), "member");
    let cluster = Cluster::start_peer_tls(
        3,
        dir.path(),
        &[
            &flag("peer-cert-file", &own),
            &flag("peer-key-file", &own_key),
            &flag("peer-trusted-ca-file", &own),
            "--peer-client-cert-auth",
        ],
    )
    .await;
    replicates(&cluster).await;
}
