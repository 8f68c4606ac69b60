//! TLS on both hops (issue 11): a real `redis-server` with `--tls-port`, stormwall's TLS
//! listener, `redis-cli --tls` as the client. Certificates are generated per test (rcgen) in
//! a temp dir, never committed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Redis, Stormwall, eventually, free_port, metric};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A CA and certificates it signs, written as PEM files into a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
    name: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join(format!("{name}-ca.pem")), cert.pem()).unwrap();
        Pki {
            dir,
            ca: Issuer::new(params, key),
            name: name.into(),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.pem", self.name))
    }

    /// Issues a certificate for `names` (server and client use) as `{file}.crt`/`{file}.key`.
    fn issue(&self, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (crt, k) = self.paths(file);
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (crt, k)
    }

    fn paths(&self, file: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join(format!("{file}.crt")),
            self.dir.path().join(format!("{file}.key")),
        )
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Redis with a plain port (for checks) and a TLS port; `auth_clients` as Redis's
/// `tls-auth-clients`.
struct TlsRedis {
    redis: Redis,
    tls_port: u16,
}

fn tls_redis(pki: &Pki, auth_clients: bool) -> TlsRedis {
    let cert = pki.issue("redis", &["localhost", "127.0.0.1"], false);
    tls_redis_serving(pki, cert, auth_clients)
}

/// A TLS-only Redis presenting `(crt, key)`, clients checked against `pki`'s CA.
fn tls_redis_serving(pki: &Pki, (crt, key): (PathBuf, PathBuf), auth_clients: bool) -> TlsRedis {
    let tls_port = free_port();
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &p(&crt),
        "--tls-key-file",
        &p(&key),
        "--tls-ca-cert-file",
        &p(&pki.ca_file()),
        "--tls-auth-clients",
        if auth_clients { "yes" } else { "no" },
    ]);
    TlsRedis { redis, tls_port }
}

/// `[listen.tls]` TOML for a TLS listener on a free port with a certificate from `pki`.
fn listen_tls(pki: &Pki, port: u16, extra: &str) -> String {
    let (crt, key) = pki.issue("stormwall", &["localhost", "127.0.0.1"], false);
    format!(
        "[listen.tls]\naddress = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
        p(&crt),
        p(&key)
    )
}

fn upstream_tls(ca: &Path, extra: &str) -> String {
    format!(
        "[upstream.tls]\nenabled = true\nca_file = \"{}\"\n{extra}",
        p(ca)
    )
}

/// Runs `redis-cli --tls --cacert ca -p port args…`; (success, stdout + stderr).
fn cli_tls(port: u16, ca: &Path, client: Option<(&Path, &Path)>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["--tls", "--cacert"])
        .arg(ca)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some((crt, key)) = client {
        cmd.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    let out = cmd.args(args).output().expect("cannot run redis-cli");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // redis-cli exits 0 even when a command fails to connect in some versions; its output
    // says so.
    let ok = out.status.success() && !text.contains("Could not connect") && !text.contains("Error");
    (ok, text)
}

fn cli_plain(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("cannot run redis-cli");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("Error"), text)
}

/// A few commands whose replies cover the RESP types, run through `run` and compared with
/// Redis's own answers over its plain port.
fn transparency_checks(redis: &Redis, run: impl Fn(&[&str]) -> (bool, String)) {
    let direct = |args: &[&str]| cli_plain(redis.port, args);
    let script: &[&[&str]] = &[
        &["SET", "tls:k", "v1"],
        &["GET", "tls:k"],
        &["RPUSH", "tls:l", "a", "b", "c"],
        &["LRANGE", "tls:l", "0", "-1"],
        &["HSET", "tls:h", "f", "1"],
        &["HGETALL", "tls:h"],
        &["INCRBY", "tls:n", "5"],
        &["GET", "tls:missing"],
        &["LPUSH", "tls:k", "x"],
        &["DEL", "tls:k", "tls:l", "tls:h", "tls:n"],
        &["EXISTS", "tls:k"],
        &["PING"],
        &["ECHO", "héllo"],
    ];
    for args in script {
        let (ok, through) = run(args);
        assert!(
            ok || through.contains("WRONGTYPE"),
            "{args:?} failed: {through}"
        );
        // Same command again, directly, on the state the first one left: compare what a
        // read-only command says; for writes compare the reply type only by re-running
        // reads below.
        if matches!(
            args[0],
            "GET" | "LRANGE" | "HGETALL" | "EXISTS" | "PING" | "ECHO"
        ) {
            assert_eq!(through, direct(args).1, "{args:?}");
        }
    }
}

/// A TLS-only Redis, and stormwall in front of it over TLS with a TLS listener of its own;
/// and that listener's port.
fn tls_both_hops(pki: &Pki) -> (TlsRedis, Stormwall, u16) {
    let r = tls_redis(pki, false);
    let tls_port = free_port();
    let hops = format!(
        "{}{}",
        upstream_tls(&pki.ca_file(), ""),
        listen_tls(pki, tls_port, "")
    );
    let sw = Stormwall::start_with_listen(&format!("127.0.0.1:{}", r.tls_port), "", &hops);
    (r, sw, tls_port)
}

#[test]
fn tls_on_both_hops_with_redis_cli() {
    let pki = Pki::new("both");
    let (r, sw, tls_port) = tls_both_hops(&pki);
    transparency_checks(&r.redis, |args| {
        cli_tls(tls_port, &pki.ca_file(), None, args)
    });
    // The plaintext listener beside it serves too, over the same TLS upstream.
    let (ok, out) = cli_plain(sw.port, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    assert!(
        metric(
            &sw,
            "stormwall_tls_handshakes_total",
            &[("side", "client"), ("result", "ok")]
        ) >= 1.0
    );
    assert!(
        metric(
            &sw,
            "stormwall_tls_handshakes_total",
            &[("side", "upstream"), ("result", "ok")]
        ) >= 1.0
    );
    let expiry = metric(
        &sw,
        "stormwall_tls_certificate_expiry_seconds",
        &[("side", "client"), ("file", &p(&pki.paths("stormwall").0))],
    );
    assert!(expiry > 86_400.0, "{expiry}");
}

#[test]
fn tls_client_to_plain_redis() {
    let pki = Pki::new("mix1");
    let redis = Redis::start();
    let tls_port = free_port();
    let _sw = Stormwall::start_with_listen(&redis.addr(), "", &listen_tls(&pki, tls_port, ""));
    transparency_checks(&redis, |args| cli_tls(tls_port, &pki.ca_file(), None, args));
}

#[test]
fn plain_client_to_tls_redis() {
    let pki = Pki::new("mix2");
    let r = tls_redis(&pki, false);
    let sw = Stormwall::start(
        &format!("127.0.0.1:{}", r.tls_port),
        &upstream_tls(&pki.ca_file(), ""),
    );
    transparency_checks(&r.redis, |args| cli_plain(sw.port, args));
}

#[test]
fn upstream_mutual_tls() {
    let pki = Pki::new("umtls");
    let r = tls_redis(&pki, true);
    let upstream = format!("127.0.0.1:{}", r.tls_port);
    // With a client certificate Redis accepts.
    let (crt, key) = pki.issue("sw-client", &["stormwall"], false);
    let sw = Stormwall::start(
        &upstream,
        &upstream_tls(
            &pki.ca_file(),
            &format!("cert_file = \"{}\"\nkey_file = \"{}\"\n", p(&crt), p(&key)),
        ),
    );
    let (ok, out) = cli_plain(sw.port, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    drop(sw);
    // Without one: Redis refuses, and the client sees a failed Redis (a closed connection),
    // never a fake reply.
    let sw = Stormwall::start(&upstream, &upstream_tls(&pki.ca_file(), ""));
    let (_, out) = cli_plain(sw.port, &["PING"]);
    assert!(!out.contains("PONG"), "{out}");
    // From another CA: the same.
    let other = Pki::new("umtls-other");
    let (crt, key) = other.issue("sw-client", &["stormwall"], false);
    let sw = Stormwall::start(
        &upstream,
        &upstream_tls(
            &pki.ca_file(),
            &format!("cert_file = \"{}\"\nkey_file = \"{}\"\n", p(&crt), p(&key)),
        ),
    );
    let (_, out) = cli_plain(sw.port, &["PING"]);
    assert!(!out.contains("PONG"), "{out}");
}

/// Starts stormwall against `r` with `[upstream.tls]` `extra`, and returns the reason label
/// of its failed upstream handshakes once one is counted.
fn upstream_failure(r: &TlsRedis, ca: &Path, extra: &str, reason: &str) {
    let sw = Stormwall::start(
        &format!("127.0.0.1:{}", r.tls_port),
        &upstream_tls(ca, extra),
    );
    let (_, out) = cli_plain(sw.port, &["PING"]);
    assert!(!out.contains("PONG"), "{out}");
    eventually(
        &format!("an upstream handshake failure counted as {reason}"),
        Duration::from_secs(5),
        || {
            metric(
                &sw,
                "stormwall_tls_handshakes_total",
                &[
                    ("side", "upstream"),
                    ("result", "failed"),
                    ("reason", reason),
                ],
            ) >= 1.0
        },
    );
    assert!(
        sw.log().contains("TLS handshake with Redis failed"),
        "{}",
        sw.log()
    );
}

#[test]
fn upstream_verification_failures_are_named() {
    let pki = Pki::new("uverify");
    let r = tls_redis(&pki, false);
    // Untrusted: a CA that did not sign Redis's certificate.
    let other = Pki::new("uverify-other");
    upstream_failure(&r, &other.ca_file(), "", "untrusted");
    // Wrong name.
    upstream_failure(
        &r,
        &pki.ca_file(),
        "server_name = \"redis.example.com\"\n",
        "name_mismatch",
    );
    // Expired: a Redis whose certificate expired.
    let cert = pki.issue("redis-expired", &["127.0.0.1"], true);
    let r2 = tls_redis_serving(&pki, cert, false);
    upstream_failure(&r2, &pki.ca_file(), "", "expired");
}

/// A Redis, and stormwall in front of it with a TLS listener whose `client_auth` is `mode`,
/// client certificates checked against `pki`'s CA; and the listener's port.
fn with_client_auth(pki: &Pki, mode: &str) -> (Redis, Stormwall, u16) {
    let redis = Redis::start();
    let tls_port = free_port();
    let client_auth = format!(
        "client_auth = \"{mode}\"\nclient_ca_file = \"{}\"\n",
        p(&pki.ca_file())
    );
    let sw =
        Stormwall::start_with_listen(&redis.addr(), "", &listen_tls(pki, tls_port, &client_auth));
    (redis, sw, tls_port)
}

#[test]
fn client_certificates_on_the_listener() {
    let pki = Pki::new("lmtls");
    let (_redis, sw, tls_port) = with_client_auth(&pki, "required");
    let ca = pki.ca_file();
    let (crt, key) = pki.issue("app", &["app"], false);
    let (ok, out) = cli_tls(tls_port, &ca, Some((&crt, &key)), &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    // Missing.
    let (ok, out) = cli_tls(tls_port, &ca, None, &["PING"]);
    assert!(!ok && !out.contains("PONG"), "{out}");
    // From another CA.
    let other = Pki::new("lmtls-other");
    let (ocrt, okey) = other.issue("app", &["app"], false);
    let (ok, out) = cli_tls(tls_port, &ca, Some((&ocrt, &okey)), &["PING"]);
    assert!(!ok && !out.contains("PONG"), "{out}");
    // Expired.
    let (ecrt, ekey) = pki.issue("app-expired", &["app"], true);
    let (ok, out) = cli_tls(tls_port, &ca, Some((&ecrt, &ekey)), &["PING"]);
    assert!(!ok && !out.contains("PONG"), "{out}");
    let failed = |reason: &str| {
        metric(
            &sw,
            "stormwall_tls_handshakes_total",
            &[("side", "client"), ("result", "failed"), ("reason", reason)],
        )
    };
    eventually(
        "client handshake failures counted",
        Duration::from_secs(5),
        || {
            failed("no_client_certificate") >= 1.0
                && failed("untrusted") >= 1.0
                && failed("expired") >= 1.0
        },
    );
}

#[test]
fn client_certificates_optional() {
    let pki = Pki::new("lopt");
    let (_redis, _sw, tls_port) = with_client_auth(&pki, "optional");
    let ca = pki.ca_file();
    let (ok, out) = cli_tls(tls_port, &ca, None, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    let other = Pki::new("lopt-other");
    let (ocrt, okey) = other.issue("app", &["app"], false);
    let (ok, out) = cli_tls(tls_port, &ca, Some((&ocrt, &okey)), &["PING"]);
    assert!(!ok && !out.contains("PONG"), "{out}");
}

/// Whether the server closed `s` within `within` (reading until the end of the stream).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if started.elapsed() > within {
            return false;
        }
    }
}

#[test]
fn bad_input_on_the_tls_port() {
    let pki = Pki::new("bad");
    let redis = Redis::start();
    let tls_port = free_port();
    let sw = Stormwall::start_with_listen(
        &redis.addr(),
        "max_clients = 4\n",
        &listen_tls(&pki, tls_port, "handshake_timeout = \"500ms\"\n"),
    );
    // A plaintext PING.
    let mut s = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    // Garbage.
    let mut s = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    let mut rng = common::Rng(7);
    let _ = s.write_all(&rng.bytes(3000));
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    // Stalled handshakes (more than max_clients of them): each is closed after the
    // handshake timeout, and the slots come back.
    let mut stalled: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(("127.0.0.1", tls_port)).unwrap())
        .collect();
    for s in &mut stalled {
        let _ = s.write_all(&[0x16, 0x03, 0x01]);
    }
    for s in &mut stalled {
        assert!(closed_within(s, Duration::from_secs(3)));
    }
    let (ok, out) = cli_tls(tls_port, &pki.ca_file(), None, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    let failed = |reason: &str| {
        metric(
            &sw,
            "stormwall_tls_handshakes_total",
            &[("side", "client"), ("result", "failed"), ("reason", reason)],
        )
    };
    assert!(failed("not_tls") >= 2.0, "{}", sw.log());
    assert!(failed("timeout") >= 1.0, "{}", sw.log());
    assert!(sw.log().contains("TLS handshake with a client failed"));
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS client connection to `port` trusting `ca`.
fn tls_client(port: u16, ca: &Path) -> TlsClient {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// A TLS connection to `port` trusting `ca`; returns the certificate the server presented.
fn presented_certificate(port: u16, ca: &Path) -> Vec<u8> {
    let mut tls = tls_client(port, ca);
    tls.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0u8; 7];
    tls.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn large_replies_and_pipelines_over_tls_both_hops() {
    let pki = Pki::new("large");
    let (_redis, _sw, tls_port) = tls_both_hops(&pki);
    let value = vec![b'v'; 4 << 20];
    let mut tls = tls_client(tls_port, &pki.ca_file());
    let set = common::encode_cmd(&[b"SET", b"tls:big", &value]);
    tls.write_all(&set).unwrap();
    let mut ok = [0u8; 5];
    tls.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    // 40 GETs of 4 MiB in one pipeline, read only after all were written: replies pile up
    // in every buffer on the way and must all arrive, in order, intact.
    let get = common::encode_cmd(&[b"GET", b"tls:big"]);
    let reply_len = format!("${}\r\n", value.len()).len() + value.len() + 2;
    let writer = {
        let mut pipeline = Vec::new();
        for _ in 0..40 {
            pipeline.extend_from_slice(&get);
        }
        pipeline
    };
    tls.write_all(&writer).unwrap();
    let mut got = vec![0u8; reply_len];
    for i in 0..40 {
        tls.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("reply {i}: {e}"));
        assert!(
            got.starts_with(b"$4194304\r\n") && got.ends_with(b"v\r\n"),
            "reply {i}"
        );
    }
}

#[test]
fn over_max_clients_a_tls_client_gets_redis_error_over_tls() {
    let pki = Pki::new("maxc");
    let redis = Redis::start();
    let tls_port = free_port();
    let _sw = Stormwall::start_with_listen(
        &redis.addr(),
        "max_clients = 1\n",
        &listen_tls(&pki, tls_port, ""),
    );
    let _first = presented_certificate(tls_port, &pki.ca_file());
    let mut held = tls_client(tls_port, &pki.ca_file());
    held.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0u8; 7];
    held.read_exact(&mut buf).unwrap();
    let mut second = tls_client(tls_port, &pki.ca_file());
    let mut text = Vec::new();
    let _ = second.read_to_end(&mut text);
    assert_eq!(
        String::from_utf8_lossy(&text),
        "-ERR max number of clients reached\r\n"
    );
}

#[test]
fn certificate_rotation_under_load() {
    let pki = Pki::new("rot");
    let redis = Redis::start();
    let tls_port = free_port();
    let sw = Stormwall::start_with_listen(&redis.addr(), "", &listen_tls(&pki, tls_port, ""));
    let ca = pki.ca_file();
    let before = presented_certificate(tls_port, &ca);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (stop, done, ca) = (stop.clone(), done.clone(), ca.clone());
            std::thread::spawn(move || {
                let (ok, out) = cli_tls(tls_port, &ca, None, &["PING"]);
                assert!(ok, "{out}");
                // One long-lived TLS connection each, busy through the rotation.
                let mut child = Command::new("redis-cli")
                    .args(["--tls", "--cacert"])
                    .arg(&ca)
                    .args(["-h", "127.0.0.1", "-p", &tls_port.to_string()])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    writeln!(stdin, "SET rot:{i} {n}").unwrap();
                    writeln!(stdin, "GET rot:{i}").unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                drop(stdin);
                let out = child.wait_with_output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(!text.contains("ERR") && !text.contains("rror"), "{text}");
                assert_eq!(
                    text.lines().filter(|l| *l == "OK").count() as u64,
                    n,
                    "client {i}"
                );
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Replace the certificate and key files, then SIGHUP.
    let (crt, key) = pki.paths("stormwall");
    let (ncrt, nkey) = pki.issue("stormwall-next", &["localhost", "127.0.0.1"], false);
    std::fs::copy(&ncrt, &crt).unwrap();
    std::fs::copy(&nkey, &key).unwrap();
    sw.signal("HUP");
    eventually(
        "the new certificate is presented",
        Duration::from_secs(5),
        || presented_certificate(tls_port, &ca) != before,
    );
    // A broken file is rejected; the running certificate stays.
    let after = presented_certificate(tls_port, &ca);
    std::fs::write(&key, "not a key").unwrap();
    sw.signal("HUP");
    eventually(
        "the broken reload is rejected",
        Duration::from_secs(5),
        || sw.log().contains("config reload rejected"),
    );
    assert!(sw.log().contains(&p(&key)), "the log names the file");
    assert_eq!(presented_certificate(tls_port, &ca), after);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 0);
}

#[test]
fn check_config_names_the_wrong_file() {
    let pki = Pki::new("check");
    let (crt, key) = pki.issue("stormwall", &["127.0.0.1"], false);
    let (_, other_key) = pki.issue("other", &["127.0.0.1"], false);
    let dir = tempfile::tempdir().unwrap();
    let run = |toml: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_stormwall"))
            .arg("--check-config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let listen = |cert: &Path, key: &Path| {
        format!(
            "[listen.tls]\naddress = \"127.0.0.1:7000\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            p(cert),
            p(key)
        )
    };
    assert!(run(&listen(&crt, &key)).0);
    let missing = dir.path().join("missing.crt");
    let (ok, err) = run(&listen(&missing, &key));
    assert!(
        !ok && err.contains("listen.tls.cert_file") && err.contains(&p(&missing)),
        "{err}"
    );
    let (ok, err) = run(&listen(&crt, &other_key));
    assert!(
        !ok && err.contains("does not match") && err.contains(&p(&other_key)),
        "{err}"
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let (ok, err) = run(&listen(&garbage, &key));
    assert!(!ok && err.contains(&p(&garbage)), "{err}");
    let (ok, err) = run(&format!(
        "[upstream.tls]\nenabled = true\nca_file = \"{}\"\n",
        p(&garbage)
    ));
    assert!(
        !ok && err.contains("upstream.tls.ca_file") && err.contains(&p(&garbage)),
        "{err}"
    );
    // Check that the PEM key file really parses (a certificate is not a key).
    let (ok, err) = run(&listen(&crt, &crt));
    assert!(!ok && err.contains("listen.tls.key_file"), "{err}");
    let _ = PrivateKeyDer::from_pem_file(&key).unwrap();
}

#[test]
fn certificates_replaced_on_disk_are_picked_up_by_the_file_watch() {
    let pki = Pki::new("watch");
    let redis = Redis::start();
    let tls_port = free_port();
    let _sw = Stormwall::start_with_listen(
        &redis.addr(),
        "",
        &format!(
            "{}[reload]\nwatch_interval = \"200ms\"\n",
            listen_tls(&pki, tls_port, "")
        ),
    );
    let ca = pki.ca_file();
    let mut open = tls_client(tls_port, &ca);
    let before = presented_certificate(tls_port, &ca);
    // The config file is untouched; only the certificate and key change (as a Secret's
    // renewal does).
    let (crt, key) = pki.paths("stormwall");
    let (ncrt, nkey) = pki.issue("stormwall-next", &["localhost", "127.0.0.1"], false);
    std::fs::copy(&nkey, &key).unwrap();
    std::fs::copy(&ncrt, &crt).unwrap();
    eventually(
        "the new certificate is presented",
        Duration::from_secs(5),
        || presented_certificate(tls_port, &ca) != before,
    );
    // A connection opened before the rotation still works.
    open.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0u8; 7];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
}

#[test]
fn verification_can_be_turned_off_by_name_only_with_a_warning() {
    let pki = Pki::new("insecure");
    let r = tls_redis(&pki, false);
    let other = Pki::new("insecure-other");
    // Trusting the wrong CA fails (upstream_verification_failures_are_named); with
    // insecure_skip_verify the same setup connects, and the log says why that is dangerous.
    let sw = Stormwall::start(
        &format!("127.0.0.1:{}", r.tls_port),
        &upstream_tls(&other.ca_file(), "insecure_skip_verify = true\n"),
    );
    let (ok, out) = cli_plain(sw.port, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    assert!(
        sw.log().contains("upstream.tls.insecure_skip_verify is on"),
        "{}",
        sw.log()
    );
}

#[test]
fn a_reload_that_drops_tls_keeps_it_until_restart() {
    let pki = Pki::new("drop");
    let (_redis, sw, tls_port) = tls_both_hops(&pki);
    let (ok, out) = cli_tls(tls_port, &pki.ca_file(), None, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
    // The same file without any TLS: both are restart-only, so both stay as they run.
    let text = std::fs::read_to_string(&sw.config_path).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let mut table = table;
    for section in ["listen", "upstream"] {
        if let Some(toml::Value::Table(t)) = table.get_mut(section) {
            t.remove("tls");
        }
    }
    std::fs::write(&sw.config_path, toml::to_string(&table).unwrap()).unwrap();
    sw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sw.log().contains("config reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", sw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sw.log().contains("listen.tls.address"), "{}", sw.log());
    let (ok, out) = cli_tls(tls_port, &pki.ca_file(), None, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}\n{}", sw.log());
    let (ok, out) = cli_plain(sw.port, &["PING"]);
    assert!(ok && out.contains("PONG"), "{out}");
}
