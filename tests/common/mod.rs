//! Test harness: a real `redis-server` and a real `stormwall` process on ephemeral loopback
//! ports, plus a raw RESP connection for byte-level checks. Processes are stopped by pid
//! when their handle drops. [`cluster`] builds a Redis Cluster out of such servers.
#![allow(dead_code)]

pub mod cluster;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis_protocol::resp3::decode::complete::decode;
pub use redis_protocol::resp3::types::OwnedFrame as Frame;

/// A free loopback port (bound and released; the tiny race is acceptable in tests).
/// Whether this run of the suite puts stormwall in shared upstream mode (scripts/test runs
/// the suite once per mode; unset, the default mode, shared, applies), for the few
/// assertions where the modes differ by design.
#[allow(dead_code)]
pub fn shared_mode() -> bool {
    std::env::var("STORMWALL_TEST_UPSTREAM_MODE").map_or(true, |m| m != "dedicated")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free loopback port")
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited before listening on port {port}: {status}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "{what} did not start listening on port {port} within 10s"
    ))
}

/// A `redis-server` child process on its own port.
pub struct Redis {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    /// Its working directory (AOF files, the RDB a replica's sync writes), kept across
    /// restarts and removed with it, so no test leaves files in the checkout.
    dir: tempfile::TempDir,
}

impl Redis {
    /// `calls` of `cmd` in this Redis's `INFO commandstats` (0 if it never ran).
    pub fn calls(&self, cmd: &str) -> u64 {
        let info = text(&self.raw().call(&[b"INFO", b"commandstats"]));
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts Redis with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            dir: tempfile::tempdir().expect("cannot create a temp dir for Redis"),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts the process; an error if it exited before listening (a port of its was
    /// taken meanwhile) or another Redis answers on its port.
    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server not found on PATH: the tests need a real Redis. \
                 Install it with `apt-get install -y redis-server` (or run .ci/run)."
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        if let Err(e) = wait_for_port(self.port, "redis-server", &mut child) {
            // Stopped by pid here, or it would outlive the test.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        // The port was free when picked; make sure the server answering is this child.
        // (A password-protected Redis answers NOAUTH; then there is nothing to compare.)
        let info = text(&Raw::connect(self.port).call(&[b"INFO", b"server"]));
        let ours = format!("process_id:{}\r\n", child.id());
        if info.contains("process_id:") && !info.contains(&ours) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "port {} was taken by another Redis before ours started",
                self.port
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The redis-server process id (for `kill -STOP`/`-CONT`).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("redis-server is not running")
    }

    /// Kills Redis abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts Redis again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A direct connection to Redis (bypassing stormwall), for checks and comparisons.
    pub fn raw(&self) -> Raw {
        Raw::connect(self.port)
    }

    pub fn client(&self) -> redis::Connection {
        client(self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `stormwall` child process.
pub struct Stormwall {
    pub port: u16,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/config`).
    pub admin_port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

impl Stormwall {
    /// Starts stormwall in front of `upstream` with extra TOML appended to its config file.
    pub fn start(upstream: &str, extra_toml: &str) -> Stormwall {
        Stormwall::start_with_listen(upstream, "", extra_toml)
    }

    /// Like [`start`](Self::start), with `listen_toml` (e.g. `max_clients = 2\n`) placed in
    /// the `[listen]` section, which `extra_toml` cannot reopen.
    pub fn start_with_listen(upstream: &str, listen_toml: &str, extra_toml: &str) -> Stormwall {
        // Ports are picked free and released, so another process can take one in between;
        // stormwall then exits at once, and a fresh pair of ports is tried.
        for _ in 0..4 {
            let mut s = Stormwall::configure(upstream, listen_toml, extra_toml);
            if s.spawn() {
                return s;
            }
        }
        panic!("stormwall failed to start four times; see its log above");
    }

    fn configure(upstream: &str, listen_toml: &str, extra_toml: &str) -> Stormwall {
        let dir = tempfile::tempdir().expect("cannot create a temp dir");
        let port = free_port();
        let config_path = dir.path().join("stormwall.toml");
        let admin_port = free_port();
        // `extra_toml` continues the [upstream] section (bare keys land there) and may open
        // any section; the listener addresses are filled in unless it sets them.
        let mut config: toml::Table = format!("[upstream]\naddress = \"{upstream}\"\n{extra_toml}")
            .parse()
            .expect("invalid TOML in test config");
        let listen_extra: toml::Table = listen_toml
            .parse()
            .expect("invalid listen TOML in test config");
        let section = |config: &mut toml::Table, name: &str| -> toml::Table {
            match config.remove(name) {
                Some(toml::Value::Table(t)) => t,
                _ => toml::Table::new(),
            }
        };
        // The whole suite runs once per upstream mode (scripts/test sets this); a test that
        // is about one mode names it itself.
        if let Ok(mode) = std::env::var("STORMWALL_TEST_UPSTREAM_MODE") {
            let mut upstream = section(&mut config, "upstream");
            upstream.entry("mode").or_insert(mode.into());
            config.insert("upstream".into(), upstream.into());
        }
        let mut listen = section(&mut config, "listen");
        listen.extend(listen_extra);
        listen
            .entry("address")
            .or_insert(format!("127.0.0.1:{port}").into());
        config.insert("listen".into(), listen.into());
        let mut admin = section(&mut config, "admin");
        admin
            .entry("address")
            .or_insert(format!("127.0.0.1:{admin_port}").into());
        config.insert("admin".into(), admin.into());
        let config = toml::to_string(&config).expect("cannot render test config");
        std::fs::write(&config_path, config).expect("cannot write config");
        let log_path = dir.path().join("stormwall.log");
        Stormwall {
            port,
            admin_port,
            child: None,
            _dir: dir,
            config_path,
            log_path,
        }
    }

    /// Starts the process and waits until it says it is listening. False if it exited first
    /// (its log is printed, for the case where that was not a port race).
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(&self.log_path).expect("cannot create log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_stormwall"))
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "stormwall=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start stormwall");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("stormwall exited at start ({status}):\n{}", self.log());
                return false;
            }
            // The admin endpoint is bound after the client listener; once it is announced,
            // both ports are this process's.
            if self.log().contains("admin endpoint listening") {
                self.child = Some(child);
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "stormwall did not start within 10s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("stormwall is not running")
    }

    /// True while the process has not exited (a crash makes this false).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends a signal (e.g. "TERM") to the stormwall process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("stormwall is not running");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("stormwall did not exit within {within:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(self.port)
    }

    pub fn client(&self) -> redis::Connection {
        client(self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn config_dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for Stormwall {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `redis` crate connection to `port`.
pub fn client(port: u16) -> redis::Connection {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("bad url");
    c.get_connection_with_timeout(Duration::from_secs(5))
        .expect("cannot connect")
}

/// A raw TCP connection that speaks RESP byte for byte.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("cannot connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write failed");
    }

    /// Sends a command as a RESP array of bulk strings.
    pub fn cmd(&mut self, args: &[&[u8]]) {
        self.send(&encode_cmd(args));
    }

    /// Reads one complete frame (RESP2 or RESP3), panicking after the read timeout.
    pub fn read_frame(&mut self) -> Frame {
        self.try_read_frame()
            .expect("connection closed before a frame arrived")
    }

    /// Reads one frame; `None` if the connection closed first.
    pub fn try_read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, len)) = decode_any(&self.buf) {
                self.buf.drain(..len);
                return Some(frame);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// A frame already received or readable without waiting; `None` if there is none yet.
    pub fn try_read_frame_now(&mut self) -> Option<Frame> {
        self.stream.set_nonblocking(true).expect("nonblocking");
        let frame = loop {
            if let Some((frame, len)) = decode_any(&self.buf) {
                self.buf.drain(..len);
                break Some(frame);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => break None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) => panic!("read failed: {e}"),
            }
        };
        self.stream.set_nonblocking(false).expect("blocking");
        frame
    }

    /// Sends a command and returns its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> Frame {
        self.cmd(args);
        self.read_frame()
    }

    /// Reads exactly `n` raw bytes (for byte-for-byte comparisons).
    pub fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let mut chunk = [0u8; 65536];
            let got = self.stream.read(&mut chunk).expect("read failed");
            assert!(
                got > 0,
                "connection closed after {} of {n} bytes",
                self.buf.len()
            );
            self.buf.extend_from_slice(&chunk[..got]);
        }
        self.buf.drain(..n).collect()
    }

    /// True if the peer closes the connection (after any remaining frames) within the read
    /// timeout.
    pub fn closed(&mut self) -> bool {
        loop {
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Decodes one RESP3 or RESP2 frame. redis-protocol's RESP3 decoder reads RESP2's `$-1` and
/// `*-1` nulls as the start of a streamed frame, so RESP2 input is decoded as RESP2 and
/// converted.
fn decode_any(buf: &[u8]) -> Option<(Frame, usize)> {
    use redis_protocol::resp2::types::OwnedFrame as F2;
    fn convert(f: F2) -> Frame {
        match f {
            F2::SimpleString(data) => Frame::SimpleString {
                data,
                attributes: None,
            },
            F2::Error(data) => Frame::SimpleError {
                data,
                attributes: None,
            },
            F2::Integer(data) => Frame::Number {
                data,
                attributes: None,
            },
            F2::BulkString(data) => Frame::BlobString {
                data,
                attributes: None,
            },
            F2::Array(data) => Frame::Array {
                data: data.into_iter().map(convert).collect(),
                attributes: None,
            },
            F2::Null => Frame::Null,
        }
    }
    match decode(buf) {
        Ok(found) => found,
        Err(_) => redis_protocol::resp2::decode::decode(buf)
            .expect("invalid RESP from server")
            .map(|(f, len)| (convert(f), len)),
    }
}

pub fn encode_cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Sends the same bytes directly to Redis and through stormwall, reads `frames` replies
/// from each, and asserts they are identical.
pub fn assert_same(redis: &Redis, sw: &Stormwall, input: &[u8], frames: usize) -> Vec<Frame> {
    let mut direct = redis.raw();
    let mut proxied = sw.raw();
    direct.send(input);
    proxied.send(input);
    let mut out = Vec::new();
    for i in 0..frames {
        let a = direct.read_frame();
        let b = proxied.read_frame();
        assert_eq!(
            a,
            b,
            "reply {i} differs for input {:?}",
            String::from_utf8_lossy(input)
        );
        out.push(a);
    }
    out
}

/// Shorthand for a bulk/blob string frame's bytes or a simple string's text.
pub fn text(frame: &Frame) -> String {
    match frame {
        Frame::BlobString { data, .. } => String::from_utf8_lossy(data).into_owned(),
        Frame::SimpleString { data, .. } => String::from_utf8_lossy(data).into_owned(),
        Frame::SimpleError { data, .. } => data.to_string(),
        Frame::BlobError { data, .. } => String::from_utf8_lossy(data).into_owned(),
        Frame::Number { data, .. } => data.to_string(),
        other => format!("{other:?}"),
    }
}

pub fn is_error(f: &Frame) -> bool {
    matches!(f, Frame::SimpleError { .. } | Frame::BlobError { .. })
}

/// The text of an error reply (panics on anything else).
pub fn error_text(f: &Frame) -> String {
    assert!(is_error(f), "expected an error reply, got {f:?}");
    text(f)
}

/// An integer reply's value (panics on anything else).
pub fn as_int(f: &Frame) -> i64 {
    match f {
        Frame::Number { data, .. } => *data,
        other => panic!("expected an integer reply, got {other:?}"),
    }
}

pub fn number(n: i64) -> Frame {
    Frame::Number {
        data: n,
        attributes: None,
    }
}

pub fn blob(b: &[u8]) -> Frame {
    Frame::BlobString {
        data: b.to_vec(),
        attributes: None,
    }
}

pub fn array(items: &[Frame]) -> Frame {
    Frame::Array {
        data: items.to_vec(),
        attributes: None,
    }
}

/// What a server sent back on one connection: every byte until it closed (or until
/// `quiet` passed without a byte, if it did not close), and whether it closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    pub bytes: Vec<u8>,
    pub closed: bool,
}

/// Sends `input` on a fresh connection to `port`, optionally half-closes (as a client that
/// has nothing more to say), and collects the reply bytes. Write errors are ignored: a server
/// may close early after a protocol error.
pub fn exchange(port: u16, input: &[u8], half_close: bool, quiet: Duration) -> Transcript {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("cannot connect");
    s.set_nodelay(true).expect("nodelay");
    let _ = s.write_all(input);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    read_transcript(&mut s, quiet)
}

/// Reads until the peer closes (EOF or reset) or `quiet` passes without a byte.
pub fn read_transcript(s: &mut TcpStream, quiet: Duration) -> Transcript {
    s.set_read_timeout(Some(quiet)).expect("set timeout");
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => {
                return Transcript {
                    bytes,
                    closed: true,
                };
            }
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Transcript {
                    bytes,
                    closed: true,
                };
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Transcript {
                    bytes,
                    closed: false,
                };
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Shows bytes for a failure message: printable ASCII as is, the rest escaped, cut short.
pub fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(120)];
    let s: String = cut
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > cut.len() {
        format!("{s}… ({} bytes)", bytes.len())
    } else {
        s
    }
}

/// GETs `path` from stormwall's admin endpoint: (status, body).
pub fn admin_get(sw: &Stormwall, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut resp = agent
        .get(&format!("http://127.0.0.1:{}{path}", sw.admin_port))
        .call()
        .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

/// Parses `/metrics`.
pub fn scrape(sw: &Stormwall) -> prometheus_parse::Scrape {
    let (status, body) = admin_get(sw, "/metrics");
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("invalid Prometheus text")
}

/// The sum of a counter's or gauge's samples with the given labels (0 if absent).
pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a counter or gauge: {other:?}"),
        })
        .sum()
}

/// [`value`] from a fresh scrape.
pub fn metric(sw: &Stormwall, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(&scrape(sw), name, labels)
}

/// Polls `check` every 50 ms until it holds, panicking after `within`.
pub fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tiny deterministic PRNG (xorshift64*), so a failing generated case can be replayed from
/// its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}
