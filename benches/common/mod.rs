//! Helpers shared by the benchmark binaries (`coalescing`, `passthrough`, `memory`, `storm`,
//! `framing`): starting `redis-server` and stormwall on free loopback ports and stopping
//! them again, talking to Redis, describing the machine in a report, registering a font for
//! the charts, and where the reports go.
//!
//! Each bench is its own `harness = false` binary, so they share code by `mod common;`.
//! Cargo does not take `benches/common/mod.rs` for a bench target of its own (it only
//! discovers `benches/*.rs` and `benches/*/main.rs`, and `Cargo.toml` lists the benches
//! explicitly anyway). Not every bench uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Processes

/// A child process stopped (by its pid) and reaped when dropped, so that a bench that
/// panics half-way leaves no `redis-server` or stormwall behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// A free loopback port: bound to port 0 and released again (the small race with other
/// processes is acceptable for a bench).
/// A command as a RESP array of bulk strings.
pub fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to 10 s) until something accepts connections on `port`; panics early if
/// `child` (named `what` in the message) exits first.
pub fn wait_port(port: u16, child: &mut Child, what: &str) {
    for _ in 0..400 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening on {port}: {status}");
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("{what}: nothing listening on {port}");
}

/// A fresh `redis-server` on a free loopback port, without persistence (`--save ""
/// --appendonly no`), plus `extra` arguments; returns once it listens.
pub fn start_redis(extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut child = Proc(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server not found: apt-get install -y redis-server"),
    );
    wait_port(port, &mut child.0, "redis-server");
    (child, port)
}

/// The stormwall built for this bench, listening on a free loopback port in front of
/// Redis at `upstream`, plus `extra` arguments; returns once it listens.
pub fn start_stormwall(upstream: u16, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let mut child = Proc(
        Command::new(env!("CARGO_BIN_EXE_stormwall"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .args(extra)
            .spawn()
            .expect("cannot start stormwall"),
    );
    wait_port(port, &mut child.0, "stormwall");
    (child, port)
}

// ---------------------------------------------------------------------------------------
// Redis

/// A plain `redis` crate connection to `127.0.0.1:port` (no timeouts).
pub fn connect(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Calls of each command since the last `CONFIG RESETSTAT`, from `INFO commandstats`:
/// what actually reached Redis, whatever the client or the proxy sent.
pub fn commandstats(con: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(con).unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

/// One `field:value` line of `INFO section` (e.g. `server`, `redis_version`), or "?".
pub fn info_field(con: &mut redis::Connection, section: &str, field: &str) -> String {
    let info: String = redis::cmd("INFO").arg(section).query(con).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// The machine, for the report headers

/// A command's standard output, trimmed, or `None` if it could not be run (its exit status
/// is not checked).
pub fn stdout_of(program: &str, args: &[&str]) -> Option<String> {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
}

/// A command's standard output, trimmed, or "unknown".
pub fn sh(program: &str, args: &[&str]) -> String {
    stdout_of(program, args).unwrap_or_else(|| "unknown".into())
}

/// The current date and time as the reports print it (`date -u`, to the minute).
pub fn utc_date() -> Option<String> {
    stdout_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

/// The CPU model from `/proc/cpuinfo` (`model name`), if it names one.
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
    })
}

/// True if the environment variable is set to something other than empty or `0` (e.g.
/// `STORMWALL_BENCH_QUICK=1`).
pub fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// "N cores (`nproc`), CPU model": the machine column of a report header.
pub fn cores_and_cpu() -> String {
    format!(
        "{} cores (`nproc`), {}",
        sh("nproc", &[]),
        cpu_model().unwrap_or_else(|| "unknown CPU".into())
    )
}

// ---------------------------------------------------------------------------------------
// Output

/// The start of a markdown report: its title, then a two-column table with the command
/// that produced it and the date; the caller adds its own rows (machine, versions, ...).
pub fn report_header(title: &str, command: &str) -> String {
    format!(
        "# {title}\n\n| | |\n| --- | --- |\n| command | `{command}` |\n| date | {} |\n",
        utc_date().unwrap_or_else(|| "unknown".into())
    )
}

/// `results/` at the root of the package (created if missing): where a full run writes
/// its report, to be committed.
pub fn results_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Registers a TrueType font as plotters' "sans-serif" (the bitmap backend has no system
/// fonts of its own). Tries `STORMWALL_BENCH_FONT` first, then common Debian font paths
/// (fonts-dejavu-core first).
pub fn register_font() -> Result<(), String> {
    let mut paths: Vec<PathBuf> = std::env::var_os("STORMWALL_BENCH_FONT")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    paths.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
            "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
        ]
        .map(PathBuf::from),
    );
    let bytes: &'static [u8] = paths
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .map(|bytes| &*Box::leak(bytes.into_boxed_slice()))
        .ok_or_else(|| {
            "no TrueType font found (apt-get install -y fonts-dejavu-core, or set \
             STORMWALL_BENCH_FONT)"
                .to_string()
        })?;
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| "font file is not a usable TrueType font".to_string())
}
