//! Authentication and role-based access control against Debian's etcd: the
//! same etcdctl user/role/auth script runs against both servers and every
//! output must be identical (ids masked); the key answers are also asserted
//! literally. Further tests cover watches, leases, maintenance, tokens over
//! the gateway, restarts and client-certificate (CN) users.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pki::{flag, Pki};
use common::{etcdctl, stderr, stdout, Kind, Server};

/// (stdout, stderr without etcdctl's JSON log lines, success), endpoint masked.
fn run(server: &Server, args: &[&str], stdin: Option<&str>) -> (String, String, bool) {
    let out = etcdctl(&server.endpoint(), args, stdin);
    let mask = |s: String| s.replace(&server.endpoint(), "<endpoint>");
    let err: String = stderr(&out)
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(|l| format!("{l}\n"))
        .collect();
    (mask(stdout(&out)), mask(err), out.status.success())
}

const ROOT: &str = "--user=root:rootpw";
const ALICE: &str = "--user=alice:alicepw";

/// The script: (user flag or "", etcdctl arguments, stdin).
fn script() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    vec![
        ("", "auth enable", None),
        ("", "user add root --new-user-password=rootpw", None),
        ("", "user add alice --new-user-password=alicepw", None),
        ("", "user add alice --new-user-password=other", None),
        ("", "role add reader", None),
        ("", "role add reader", None),
        ("", "role grant-permission reader read /app/ --prefix", None),
        ("", "role grant-permission reader readwrite /app/rw", None),
        (
            "",
            "role grant-permission reader write /w/ --from-key",
            None,
        ),
        ("", "role get reader", None),
        ("", "user grant-role alice reader", None),
        ("", "user grant-role alice nosuchrole", None),
        ("", "user get alice", None),
        ("", "user list", None),
        ("", "role list", None),
        ("", "put /app/x before", None),
        // etcdctl answers "root user does not have root role" by creating
        // the root role, granting it, and enabling again.
        ("", "auth enable", None),
        ("", "role list", None),
        ("", "auth enable", None),
        ("", "put /app/x anonymous", None),
        ("", "get /app/x", None),
        (ROOT, "put /app/x 1", None),
        (ROOT, "put /other o", None),
        (ALICE, "get /app/x", None),
        (ALICE, "get /app/ --prefix", None),
        (ALICE, "get / --prefix", None),
        (ALICE, "get /other", None),
        (ALICE, "put /app/x 2", None),
        (ALICE, "put /app/rw 2", None),
        (ALICE, "put /w/anything 3", None),
        (ALICE, "get /w/anything", None),
        (ALICE, "del /app/x", None),
        (ALICE, "del /app/rw --prev-kv", None),
        (ALICE, "put /app/rw 4 --prev-kv", None),
        ("--user=alice:wrong", "get /app/x", None),
        ("--user=nobody:pw", "get /app/x", None),
        (
            ALICE,
            "txn",
            Some("value(\"/other\") = \"o\"\n\nput /app/rw t\n\n\n"),
        ),
        (
            ALICE,
            "txn",
            Some("value(\"/app/x\") = \"1\"\n\nput /app/rw t\n\n\n"),
        ),
        (ALICE, "user list", None),
        (ALICE, "role list", None),
        (ALICE, "user get alice", None),
        (ALICE, "user get root", None),
        (ALICE, "role get reader", None),
        (ALICE, "role get root", None),
        (ALICE, "user add mallory --new-user-password=m", None),
        (ALICE, "auth disable", None),
        (ALICE, "defrag", None),
        (ROOT, "role revoke-permission reader /app/rw", None),
        (ROOT, "role revoke-permission reader /app/rw", None),
        (ALICE, "put /app/rw 5", None),
        (ROOT, "user delete root", None),
        (ROOT, "user revoke-role root root", None),
        (ROOT, "role delete root", None),
        (ROOT, "user delete nobody", None),
        (ROOT, "role get nope", None),
        (ROOT, "user revoke-role alice nope", None),
        (
            ROOT,
            "user passwd alice --interactive=false",
            Some("newpw\n"),
        ),
        (ALICE, "get /app/x", None),
        ("--user=alice:newpw", "get /app/x", None),
        (ROOT, "user revoke-role alice reader", None),
        ("--user=alice:newpw", "get /app/x", None),
        (ROOT, "role delete reader", None),
        (ROOT, "role list", None),
        (ROOT, "user delete alice", None),
        (ROOT, "user list", None),
        (ROOT, "auth disable", None),
        ("", "get /app/x", None),
        ("", "user list", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_auth_flows_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    // etcd's minimum bcrypt cost keeps the script fast on both.
    let flags = ["--bcrypt-cost=4"];
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &flags).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &flags).await;
    let mut transcript = Vec::new();
    for (user, args, stdin) in script() {
        let mut argv: Vec<&str> = Vec::new();
        if !user.is_empty() {
            argv.push(user);
        }
        argv.extend(args.split_whitespace());
        let want = run(&etcd, &argv, stdin);
        let got = run(&tessera, &argv, stdin);
        assert_eq!(
            got, want,
            "etcdctl {argv:?}: tessera (left) and etcd (right) differ"
        );
        transcript.push((argv.join(" "), got));
    }
    // The answers that matter, literally, so two servers failing alike cannot pass.
    let answer = |cmd: &str| {
        transcript
            .iter()
            .find(|(c, _)| c == cmd)
            .map(|(_, out)| out.clone())
            .unwrap_or_else(|| panic!("{cmd} not in the script"))
    };
    assert_eq!(
        answer("auth enable").1,
        "Error: etcdserver: root user does not exist\n"
    );
    let enables: Vec<_> = transcript
        .iter()
        .filter(|(c, _)| c == "auth enable")
        .map(|(_, out)| out.clone())
        .collect();
    assert_eq!(enables[1].0, "Authentication Enabled\n");
    assert_eq!(enables[2].1, "Error: etcdserver: user name is empty\n");
    assert_eq!(
        answer("put /app/x anonymous").1,
        "Error: etcdserver: user name is empty\n"
    );
    assert_eq!(
        answer(&format!("{ALICE} put /app/x 2")).1,
        "Error: etcdserver: permission denied\n"
    );
    assert_eq!(answer(&format!("{ALICE} put /app/rw 2")).0, "OK\n");
    assert_eq!(answer(&format!("{ALICE} get /app/x")).0, "/app/x\n1\n");
    assert_eq!(
        answer("--user=alice:wrong get /app/x").1,
        "Error: etcdserver: authentication failed, invalid user ID or password\n"
    );
    assert_eq!(
        answer(&format!("{ROOT} user delete root")).1,
        "Error: etcdserver: invalid auth management\n"
    );
    let (cmd, after_disable) = &transcript[transcript.len() - 2];
    assert_eq!(cmd, "get /app/x");
    assert_eq!(after_disable.0, "/app/x\n1\n", "after auth disable");
}

/// A user limited to `/app/`; returns a client for it and one for root.
async fn limited_user(server: &Server) -> (etcd_client::Client, etcd_client::Client) {
    for args in [
        "user add root --new-user-password=rootpw",
        "user grant-role root root",
        "user add alice --new-user-password=alicepw",
        "role add app",
        "role grant-permission app readwrite /app/ --prefix",
        "user grant-role alice app",
        "auth enable",
    ] {
        let out = server.etcdctl(&args.split_whitespace().collect::<Vec<_>>());
        assert!(out.status.success(), "{args}: {}", stderr(&out));
    }
    let connect = |user: &str, pw: &str| {
        let opts = etcd_client::ConnectOptions::new()
            .with_user(user, pw)
            .with_timeout(Duration::from_secs(10));
        etcd_client::Client::connect([server.url()], Some(opts))
    };
    (
        connect("alice", "alicepw").await.unwrap(),
        connect("root", "rootpw").await.unwrap(),
    )
}

/// What alice may and may not do beyond KV, as the crate sees it.
async fn beyond_kv(server: &Server) -> Vec<String> {
    let (mut alice, mut root) = limited_user(server).await;
    let mut seen = Vec::new();
    let text = |r: Result<String, etcd_client::Error>| match r {
        Ok(s) => s,
        Err(e) => common::status_text(e),
    };
    // Watches: permitted ranges are created, others canceled with etcd's reason.
    for key in ["/app/k", "/secret"] {
        let mut stream = alice.watch(key, None).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no watch response within 10 s")
            .unwrap()
            .unwrap();
        seen.push(format!(
            "watch {key}: created={} canceled={} reason={:?}",
            first.created(),
            first.canceled(),
            first.cancel_reason()
        ));
    }
    // A lease holding a key alice may not write cannot be revoked by her.
    let lease = root.lease_grant(60, None).await.unwrap().id();
    let put = etcd_client::PutOptions::new().with_lease(lease);
    root.put("/secret", "s", Some(put)).await.unwrap();
    seen.push(format!(
        "alice revokes root's lease: {}",
        text(alice.lease_revoke(lease).await.map(|_| "ok".into()))
    ));
    let own = alice.lease_grant(60, None).await.unwrap().id();
    let put = etcd_client::PutOptions::new().with_lease(own);
    alice.put("/app/leased", "v", Some(put)).await.unwrap();
    seen.push(format!(
        "alice attaches root's lease to her key: {}",
        text(
            alice
                .put(
                    "/app/k",
                    "v",
                    Some(etcd_client::PutOptions::new().with_lease(lease))
                )
                .await
                .map(|_| "ok".into())
        )
    ));
    seen.push(format!(
        "alice revokes her lease: {}",
        text(alice.lease_revoke(own).await.map(|_| "ok".into()))
    ));
    // Maintenance for root only.
    seen.push(format!(
        "alice hash_kv: {}",
        text(alice.hash_kv(0).await.map(|_| "ok".into()))
    ));
    seen.push(format!(
        "root hash_kv: {}",
        text(root.hash_kv(0).await.map(|_| "ok".into()))
    ));
    seen.push(format!(
        "alice status: {}",
        text(alice.status().await.map(|_| "ok".into()))
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_leases_and_maintenance_are_checked_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--bcrypt-cost=4"];
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &flags).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &flags).await;
    let want = beyond_kv(&etcd).await;
    let got = beyond_kv(&tessera).await;
    assert_eq!(got, want);
    assert_eq!(
        got,
        vec![
            "watch /app/k: created=true canceled=false reason=\"\"",
            "watch /secret: created=true canceled=true reason=\"rpc error: code = PermissionDenied desc = etcdserver: permission denied\"",
            "alice revokes root's lease: PermissionDenied: etcdserver: permission denied",
            "alice attaches root's lease to her key: PermissionDenied: etcdserver: permission denied",
            "alice revokes her lease: ok",
            // etcd's maintenance admin check answers the auth package's error untranslated.
            "alice hash_kv: Unknown: auth: permission denied",
            "root hash_kv: ok",
            "alice status: ok",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_survives_restart_and_tokens_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Kind::Tessera, dir.path(), &["--bcrypt-cost=4"]).await;
    let (mut alice, _root) = limited_user(&server).await;
    alice.put("/app/a", "1", None).await.unwrap();
    // A token from the gateway's /v3/auth/authenticate.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-d",
            r#"{"name":"alice","password":"alicepw"}"#,
        ])
        .arg(format!("{}/v3/auth/authenticate", server.url()))
        .output()
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = body["token"].as_str().expect("a token").to_string();
    // The gateway takes the token in the Authorization header.
    let url = server.url();
    let gateway = |token: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-X", "POST", "-H"])
            .arg(format!("Authorization: {token}"))
            .args(["-d", r#"{"key":"L2FwcC9h"}"#])
            .arg(format!("{url}/v3/kv/range"))
            .output()
            .unwrap();
        stdout(&out)
    };
    assert!(
        gateway(&token).contains(r#""value":"MQ==""#),
        "{}",
        gateway(&token)
    );
    server.restart().await;
    // Users and roles are durable; simple tokens are not (as in etcd).
    let out = server.etcdctl(&[
        "--user=alice:alicepw",
        "get",
        "/app/a",
        "--print-value-only",
    ]);
    assert_eq!(stdout(&out), "1\n", "{}", stderr(&out));
    let stale = gateway(&token);
    assert!(stale.contains("etcdserver: invalid auth token"), "{stale}");
    let out = server.etcdctl(&["get", "/app/a"]);
    assert!(stderr(&out).contains("etcdserver: user name is empty"));
}

/// With `--client-cert-auth`, a verified client certificate's common name
/// is the user when no token is given.
fn cn_scenario(kind: Kind, dir: &Path, pki: &Pki) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (server_crt, server_key) = pki.issue("server", "server");
    let (admin_crt, admin_key) = pki.issue("admin", "root");
    let (app_crt, app_key) = pki.issue("app", "app-user");
    let server = rt.block_on(Server::start_tls(
        kind,
        &dir.join(format!("{kind:?}")),
        &[
            &flag("cert-file", &server_crt),
            &flag("key-file", &server_key),
            &flag("trusted-ca-file", &pki.ca_file()),
            "--client-cert-auth",
            "--bcrypt-cost=4",
        ],
    ));
    let as_cert = |crt: &Path, key: &Path, args: &str| {
        let mut argv = vec![
            flag("cacert", &pki.ca_file()),
            flag("cert", crt),
            flag("key", key),
        ];
        argv.extend(args.split_whitespace().map(String::from));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut out = etcdctl(&server.url(), &argv, None);
        // The first request may race the server's start.
        for _ in 0..50 {
            if out.status.success() || !stderr(&out).contains("deadline") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            out = etcdctl(&server.url(), &argv, None);
        }
        if out.status.success() {
            stdout(&out).trim_end().to_string()
        } else {
            stderr(&out)
                .lines()
                .filter(|l| !l.starts_with('{'))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    let mut seen = Vec::new();
    for args in [
        "user add root --new-user-password=rootpw",
        "user grant-role root root",
        "user add app-user --new-user-password=pw",
        "role add app",
        "role grant-permission app readwrite /app/ --prefix",
        "user grant-role app-user app",
        "auth enable",
    ] {
        seen.push(format!("{args}: {}", as_cert(&admin_crt, &admin_key, args)));
    }
    for args in [
        "put /app/x 1",
        "put /other 1",
        "get /app/x --print-value-only",
        "user list",
    ] {
        seen.push(format!(
            "app cert, {args}: {}",
            as_cert(&app_crt, &app_key, args)
        ));
    }
    seen.push(format!(
        "admin cert, user list: {}",
        as_cert(&admin_crt, &admin_key, "user list")
    ));
    seen
}

#[test]
fn client_certificate_common_name_is_the_user_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "tessera test CA");
    let etcd = cn_scenario(Kind::Etcd, dir.path(), &pki);
    let tessera = cn_scenario(Kind::Tessera, dir.path(), &pki);
    assert_eq!(tessera, etcd);
    assert!(tessera.contains(&"app cert, put /app/x 1: OK".to_string()));
    assert!(tessera
        .contains(&"app cert, put /other 1: Error: etcdserver: permission denied".to_string()));
    assert!(tessera.contains(&"admin cert, user list: app-user\nroot".to_string()));
}

/// A write inside a nested Txn is checked like any other (etcd 3.4 skips
/// nested operations, so there alice could write outside her range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_txn_writes_are_checked() {
    use etcd_client::{Txn, TxnOp};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Kind::Tessera, dir.path(), &["--bcrypt-cost=4"]).await;
    let (mut alice, mut root) = limited_user(&server).await;
    let inner = Txn::new().and_then([TxnOp::put("/secret", "stolen", None)]);
    let outer = Txn::new().and_then([TxnOp::put("/app/ok", "v", None), TxnOp::txn(inner)]);
    let err = alice
        .txn(outer)
        .await
        .expect_err("the nested put is outside /app/");
    assert_eq!(
        common::status_text(err),
        "PermissionDenied: etcdserver: permission denied"
    );
    let resp = root.get("/secret", None).await.unwrap();
    assert!(resp.kvs().is_empty(), "nothing was written");
    let resp = root.get("/app/ok", None).await.unwrap();
    assert!(resp.kvs().is_empty(), "the txn is refused as a whole");
}

/// `--auth-token jwt,...`: etcdctl's flows work the same on both servers,
/// and the token is a signed JWT that the server checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_work_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = (dir.path().join("jwt.key"), dir.path().join("jwt.pub"));
    let ok = std::process::Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&private)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success()
        && std::process::Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap()
            .status
            .success();
    assert!(ok, "openssl could not make an RSA key pair");
    let token_flag = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=RS256,ttl=10m",
        public.display(),
        private.display()
    );
    let flags = [token_flag.as_str(), "--bcrypt-cost=4"];
    let etcd = Server::start(Kind::Etcd, &dir.path().join("etcd"), &flags).await;
    let tessera = Server::start(Kind::Tessera, &dir.path().join("tessera"), &flags).await;
    let steps: [&[&str]; 8] = [
        &["user", "add", "root", "--new-user-password=rootpw"],
        &["auth", "enable"],
        &[ROOT, "put", "k", "v"],
        &[ROOT, "get", "k"],
        &["--user=root:wrong", "get", "k"],
        &["get", "k"],
        &[ROOT, "auth", "disable"],
        &["get", "k", "--print-value-only"],
    ];
    for args in steps {
        let want = run(&etcd, args, None);
        let got = run(&tessera, args, None);
        assert_eq!(got, want, "etcdctl {args:?}");
    }
    // A JWT: header.claims.signature; a forged one is refused.
    let out = tessera.etcdctl(&["user", "add", "u", "--new-user-password=pw"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tessera.etcdctl(&["auth", "enable"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c = tessera.client().await;
    let token = c
        .auth_client()
        .authenticate("root".into(), "rootpw".into())
        .await
        .unwrap()
        .token()
        .to_string();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let mut kv = tessera.kv().await;
    let range = |t: &str| {
        let mut req = tonic::Request::new(tessera_proto::etcdserverpb::RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        });
        req.metadata_mut().insert("token", t.parse().unwrap());
        req
    };
    assert!(kv.range(range(&token)).await.is_ok());
    let last = if token.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    let err = kv.range(range(&forged)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(err.message(), "etcdserver: invalid auth token");
}
