//! The `stormwall` command line: config checking, flags without a config file, bind errors,
//! and unix sockets on both sides.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Frame, Redis, encode_cmd, free_port, text};

fn stormwall() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stormwall"));
    // The config's log level applies, whatever the test environment says.
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs a command that must exit on its own within 10 seconds, capturing its output.
fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start stormwall");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "stormwall did not exit within 10s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("wait")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A child process killed (by pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn exited(&mut self) -> bool {
        !matches!(self.0.try_wait(), Ok(None))
    }
}

/// Waits until `connect` succeeds (the process is listening), failing if it exits first.
fn wait_listening<T>(p: &mut Proc, what: &str, mut connect: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = connect() {
            return c;
        }
        assert!(!p.exited(), "{what} exited before listening");
        assert!(Instant::now() < deadline, "{what} not listening within 10s");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts stormwall with `args` and no config file (output discarded).
fn serve(args: &[&str]) -> Proc {
    let child = stormwall()
        .args(args)
        // Tests run in parallel: never the fixed default admin port.
        .args(["--admin", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start stormwall");
    Proc(child)
}

/// One RESP request/response over any byte stream.
fn call<S: Read + Write>(s: &mut S, args: &[&[u8]]) -> Frame {
    s.write_all(&encode_cmd(args)).expect("write");
    let mut buf = Vec::new();
    loop {
        if let Some((frame, _)) =
            redis_protocol::resp3::decode::complete::decode(&buf).expect("valid RESP")
        {
            return frame;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed before a reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn tcp(port: u16) -> Option<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Some(s)
}

fn unix(path: &Path) -> Option<UnixStream> {
    let s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Some(s)
}

/// SET then GET through `s`, and the value really is in Redis (checked via `direct`).
fn set_get<S: Read + Write, D: Read + Write>(s: &mut S, direct: &mut D, key: &str) {
    assert_eq!(text(&call(s, &[b"SET", key.as_bytes(), b"v1"])), "OK");
    assert_eq!(text(&call(s, &[b"GET", key.as_bytes()])), "v1");
    assert_eq!(text(&call(direct, &[b"GET", key.as_bytes()])), "v1");
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("stormwall.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[listen]\naddress = \"127.0.0.1:7777\"\nmax_clients = 7\n\
         [upstream]\naddress = \"/run/redis/redis.sock\"\nreply_timeout = \"250ms\"\n",
    );
    let out = run(stormwall().arg("--check-config").arg(&path));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    for want in [
        "address = \"127.0.0.1:7777\"",
        "max_clients = 7",
        "address = \"/run/redis/redis.sock\"",
        "reply_timeout = \"250ms\"",
        // Defaults for everything not in the file.
        "[limits]",
        "drain_timeout = \"10s\"",
        "connect_timeout = \"2s\"",
    ] {
        assert!(printed.contains(want), "missing {want:?} in:\n{printed}");
    }

    // The printed config is itself a valid config file that prints the same.
    let again = write_config(dir.path(), &printed);
    let out = run(stormwall().arg("--check-config").arg(&again));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), printed);

    // Flags override the file.
    let out = run(stormwall().arg("--check-config").arg(&path).args([
        "--max-clients",
        "9",
        "--upstream",
        "10.0.0.1:6379",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("max_clients = 9"), "{printed}");
    assert!(printed.contains("address = \"10.0.0.1:6379\""), "{printed}");
}

#[test]
fn check_config_rejects_unknown_keys_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    for (file, name) in [
        ("[listen]\nmax_clientz = 5\n", "max_clientz"),
        ("[limitz]\nmax_bulk_len = 5\n", "limitz"),
        (
            "[upstream]\naddress = \"127.0.0.1:6379\"\nreply_timout = \"1s\"\n",
            "reply_timout",
        ),
        ("stray = 1\n", "stray"),
    ] {
        let path = write_config(dir.path(), file);
        let out = run(stormwall().arg("--check-config").arg(&path));
        assert!(!out.status.success(), "accepted {file:?}");
        let err = stderr(&out);
        assert!(
            err.contains(name),
            "{file:?}: message does not name {name}: {err}"
        );
        assert!(
            stdout(&out).is_empty(),
            "printed a config for an invalid file"
        );
    }
}

#[test]
fn check_config_rejects_invalid_values_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (file, key) in [
        ("[listen]\nmax_clients = 0\n", "listen.max_clients"),
        (
            "[upstream]\nconnect_timeout = \"soon\"\n",
            "connect_timeout",
        ),
        (
            "[upstream]\nconnect_timeout = \"0s\"\n",
            "upstream.connect_timeout",
        ),
        ("[limits]\nmax_bulk_len = 0\n", "limits.max_bulk_len"),
        ("[limits]\nmax_array_len = -1\n", "max_array_len"),
        (
            "[limits]\nmax_request_bytes = 10\n",
            "limits.max_request_bytes",
        ),
        ("[log]\nlevel = \"[[[\"\n", "log.level"),
        ("[log]\nformat = \"xml\"\n", "format"),
        ("[listen]\naddress = \"nonsense\"\n", "address"),
        ("[shutdown]\ndrain_timeout = 5\n", "drain_timeout"),
    ] {
        let path = write_config(dir.path(), file);
        let out = run(stormwall().arg("--check-config").arg(&path));
        assert!(!out.status.success(), "accepted {file:?}");
        let err = stderr(&out);
        assert!(
            err.contains(key),
            "{file:?}: message does not name {key}: {err}"
        );
    }
    // An invalid value from a flag is named too.
    let path = write_config(dir.path(), "");
    let out = run(stormwall()
        .arg("--check-config")
        .arg(&path)
        .args(["--max-clients", "0"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_clients"), "{}", stderr(&out));
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("stormwall.toml");
    for flag in ["--check-config", "--config"] {
        let out = run(stormwall().arg(flag).arg(&missing));
        assert!(
            !out.status.success(),
            "{flag} with a missing file succeeded"
        );
        let err = stderr(&out);
        assert!(
            err.contains(&*missing.to_string_lossy()),
            "{flag}: message does not name the path: {err}"
        );
    }
}

#[test]
fn help_lists_the_main_flags() {
    let out = run(stormwall().arg("--help"));
    assert!(out.status.success());
    let help = stdout(&out);
    for flag in ["--listen", "--upstream", "--config", "--check-config"] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn flags_alone_are_enough_to_serve() {
    let redis = Redis::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut p = serve(&["--listen", &listen, "--upstream", &redis.addr()]);
    let mut c = wait_listening(&mut p, "stormwall", || tcp(port));
    assert_eq!(text(&call(&mut c, &[b"PING"])), "PONG");
    let mut direct = tcp(redis.port).unwrap();
    set_get(&mut c, &mut direct, "flags");
}

#[test]
fn a_port_in_use_fails_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(stormwall().args(["--listen", &addr, "--upstream", "127.0.0.1:1"]));
    assert!(!out.status.success(), "started on a port already in use");
    let err = stderr(&out);
    assert!(err.contains(&addr), "message does not name {addr}: {err}");
    drop(taken);
}

#[test]
fn unix_socket_listener() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sw.sock");
    let mut p = serve(&[
        "--listen",
        sock.to_str().unwrap(),
        "--upstream",
        &redis.addr(),
    ]);
    let mut c = wait_listening(&mut p, "stormwall", || unix(&sock));
    let mut direct = tcp(redis.port).unwrap();
    set_get(&mut c, &mut direct, "via-unix-listener");

    // `--unix-socket` adds a second listener next to TCP.
    let port = free_port();
    let extra = dir.path().join("extra.sock");
    let mut p2 = serve(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--unix-socket",
        extra.to_str().unwrap(),
        "--upstream",
        &redis.addr(),
    ]);
    let mut t = wait_listening(&mut p2, "stormwall", || tcp(port));
    let mut u = wait_listening(&mut p2, "stormwall", || unix(&extra));
    assert_eq!(text(&call(&mut t, &[b"PING"])), "PONG");
    set_get(&mut u, &mut direct, "via-extra-unix-listener");

    // A clean exit removes the socket files it created.
    drop(c);
    let status = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exited() {
        assert!(Instant::now() < deadline, "no exit within 10s of SIGTERM");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "socket file left behind after exit");
}

/// A `redis-server` listening only on a unix socket (the harness's `Redis` waits on TCP).
fn redis_on_unix_socket(path: &Path) -> (Proc, UnixStream) {
    let child = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(path)
        .args([
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start redis-server");
    let mut p = Proc(child);
    let direct = wait_listening(&mut p, "redis-server", || unix(path));
    (p, direct)
}

#[test]
fn unix_socket_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let redis_sock = dir.path().join("redis.sock");
    let (_redis, mut direct) = redis_on_unix_socket(&redis_sock);

    // TCP clients, unix-socket Redis.
    let port = free_port();
    let mut p = serve(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        redis_sock.to_str().unwrap(),
    ]);
    let mut c = wait_listening(&mut p, "stormwall", || tcp(port));
    set_get(&mut c, &mut direct, "tcp-to-unix");

    // Unix sockets on both sides.
    let sw_sock = dir.path().join("sw.sock");
    let mut p2 = serve(&[
        "--listen",
        sw_sock.to_str().unwrap(),
        "--upstream",
        redis_sock.to_str().unwrap(),
    ]);
    let mut u = wait_listening(&mut p2, "stormwall", || unix(&sw_sock));
    set_get(&mut u, &mut direct, "unix-to-unix");
}
