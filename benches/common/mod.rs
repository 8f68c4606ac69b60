//! Helpers shared by the benchmark binaries (`coalescing`, `passthrough`, `memory`, `storm`,
//! `framing`, `head_of_line`, `cluster`, ...): starting `redis-server`, a Redis Cluster
//! ([`cluster`]), stormwall (in either upstream mode) and twemproxy on free loopback ports and
//! stopping them again, running `redis-benchmark` ([`redis_benchmark`]), talking to Redis,
//! reading a process's CPU time and memory from `/proc`, describing the machine in a
//! report, registering a font for the charts, and where the reports go.
//!
//! Each bench is its own `harness = false` binary, so they share code by `mod common;`.
//! Cargo does not take `benches/common/mod.rs` for a bench target of its own (it only
//! discovers `benches/*.rs` and `benches/*/main.rs`, and `Cargo.toml` lists the benches
//! explicitly anyway). Not every bench uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod redis_benchmark;

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
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

/// The command that reproduces this run: `cargo bench --bench NAME`, preceded by whichever
/// of `vars` are set in the environment.
pub fn bench_command(name: &str, vars: &[&str]) -> String {
    let settings: String = vars
        .iter()
        .filter_map(|k| Some(format!("{k}={} ", std::env::var(k).ok()?)))
        .collect();
    format!("{settings}cargo bench --bench {name}")
}

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

/// A free loopback port: bound to port 0 and released again (the small race with other
/// processes is acceptable for a bench).
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
    start_stormwall_config(upstream, "", extra)
}

/// Like [`start_stormwall`], with `config` (TOML, as in `deploy/stormwall.example.toml`)
/// as its config file when not empty; flags (`--listen`, `--upstream`, `extra`) override it.
/// Settings that have no flag, such as `upstream.mode`, are set this way.
///
/// The file lives in a temporary directory that is removed once stormwall listens:
/// stormwall has read it by then, and only re-reads it on `SIGHUP` or when
/// `reload.watch_interval` is set, neither of which a bench does.
pub fn start_stormwall_config(upstream: u16, config: &str, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stormwall"));
    if !config.is_empty() {
        let file = dir.path().join("stormwall.toml");
        std::fs::write(&file, config).unwrap();
        cmd.arg("--config").arg(file);
    }
    let mut child = Proc(
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .args(extra)
            .spawn()
            .expect("cannot start stormwall"),
    );
    wait_port(port, &mut child.0, "stormwall");
    (child, port)
}

/// `upstream.mode`: whether stormwall's clients share upstream connections (issue 9) or
/// each has its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Dedicated,
}

impl Mode {
    pub const BOTH: [Mode; 2] = [Mode::Shared, Mode::Dedicated];

    /// The config value, also used as a label (`shared`, `dedicated`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Dedicated => "dedicated",
        }
    }

    /// A target's name in the reports: `stormwall shared`, `stormwall dedicated`.
    pub fn label(self) -> String {
        format!("stormwall {}", self.name())
    }

    /// The config file that selects this mode (everything else at its default).
    pub fn config(self) -> String {
        format!("[upstream]\nmode = \"{}\"\n", self.name())
    }
}

/// stormwall in `mode` (default config otherwise), plus `extra` arguments.
pub fn start_stormwall_mode(upstream: u16, mode: Mode, extra: &[&str]) -> (Proc, u16) {
    start_stormwall_config(upstream, &mode.config(), extra)
}

/// twemproxy (`nutcracker`) with one pool in front of Redis at `upstream`, its config and
/// log in `dir`; or `None`, with a note printed, if it is not installed. One pool
/// (`redis: true`, `hash: fnv1a_64`, `distribution: ketama`, one server) with its defaults,
/// among them `server_connections: 1`: all clients are multiplexed onto one upstream
/// connection.
pub fn start_twemproxy(upstream: u16, dir: &Path) -> Option<(Proc, u16)> {
    if !on_path("nutcracker") {
        println!(
            "note: `nutcracker` (twemproxy) is not on PATH, so its rows are skipped \
             (Debian: apt-get install -y nutcracker)"
        );
        return None;
    }
    let port = free_port();
    let conf = dir.join("nutcracker.yml");
    std::fs::write(
        &conf,
        format!(
            "bench:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  \
             redis: true\n  servers:\n   - 127.0.0.1:{upstream}:1\n"
        ),
    )
    .unwrap();
    let mut child = Proc(
        Command::new("nutcracker")
            .arg("-c")
            .arg(&conf)
            .args(["-s", &free_port().to_string(), "-a", "127.0.0.1"])
            .arg("-o")
            .arg(dir.join("nutcracker.log"))
            .arg("-p")
            .arg(dir.join("nutcracker.pid"))
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start nutcracker"),
    );
    wait_port(port, &mut child.0, "nutcracker");
    Some((child, port))
}

/// True if `program` is an executable file in one of `PATH`'s directories.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

// ---------------------------------------------------------------------------------------
// /proc

/// User plus system CPU time of a process so far (all its threads), in seconds, from
/// `/proc/PID/stat`; 0 if the process is gone. Its resolution is one clock tick (10 ms at
/// the usual `CLK_TCK` of 100), so measure over runs that take seconds of CPU.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the line: indices 11 and 12 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        stdout_of("getconf", &["CLK_TCK"])
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(100.0)
    })
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `RssAnon`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
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

/// A numeric environment variable, or `None` if unset; panics if it is not a number.
pub fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// The median (mean of the middle two for an even count; NaN if empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The commit this bench was built from (short hash, "+ uncommitted changes" if the work
/// tree differs outside `results/`: a report written by an earlier bench of the same run is
/// not a change to what is measured), for the reports.
pub fn stormwall_revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let rev = sh("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    let dirty = !sh(
        "git",
        &[
            "-C",
            dir,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)results",
        ],
    )
    .is_empty();
    if dirty {
        format!("{rev} + uncommitted changes")
    } else {
        rev
    }
}

/// First line of a command's output (stdout, else stderr), or "unknown": versions of the
/// programs a report compares.
pub fn version_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8(text)
                .ok()?
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// True if the environment variable is set to something other than empty or `0` (e.g.
/// `STORMWALL_BENCH_QUICK=1`).
pub fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The machine's 1-minute load average (other work competing for its cores).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
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
