//! Does the adaptive invalidation budget (`invalidation.adaptive`) earn its place as the
//! default? The incident replay of issue 10 with several sidecars and static budgets set 10×
//! too high: read latency during a `DEL` storm, and the time the storm takes to drain, with the
//! adaptive budget on and off, in the same run, each on a freshly started and preloaded Redis.
//!
//! Every run:
//! - starts a fresh `redis-server` (`--enable-debug-command local`), preloads it with
//!   `DEBUG POPULATE 2000000 key 100` (string keys `key:N` of 100 B), then `CONFIG RESETSTAT`;
//! - readers: 4 connections **straight to Redis** (stormwall's own proxy overhead is not in the
//!   comparison: the question is what the invalidation load does to Redis), together 4,000
//!   `GET`/s of keys the storm never deletes, truly open loop: one thread per connection
//!   writes each `GET` at its scheduled time whatever is unanswered, another reads the
//!   replies; a read's latency is its reply time minus its *scheduled* send time;
//! - the storm, after 2 s of reads: 3 sidecars (stormwall processes in front of the same
//!   Redis, each with its own admin port), 8 storm connections each, every connection sending
//!   `DEL` requests of 50 distinct keys (`key:0` upwards, each key named once in the whole
//!   storm), up to 16 in flight per connection, refilled as fast as they are acknowledged,
//!   until 1,500,000 keys are deleted. Every reply must be an integer, their sum must be the
//!   number of keys deleted, and Redis's `DBSIZE` must agree. Drain time: from the storm's
//!   start to the acknowledgement of its last `DEL`. Reads go on for 2 s after it;
//! - every 250 ms each sidecar's `/metrics` is scraped
//!   (`stormwall_invalidation_adaptive_ratio`, `stormwall_redis_latency_seconds`,
//!   `stormwall_redis_latency_baseline_seconds`, `stormwall_invalidation_budget_keys_per_second`)
//!   and the CPU time of Redis's main thread read from `/proc`.
//!
//! Variants, in every round:
//! - `no storm`: reads only (for 5 s where the storm would be): the baseline read latency;
//! - `direct`: the same storm clients straight at Redis (24 connections);
//! - `static 10×`: through the sidecars, budgets 10× the defaults (`keys_per_second =
//!   1000000`, `keys_burst = 100000`, `commands_per_second = 20000`, `commands_burst = 2000`),
//!   `adaptive = false`;
//! - `adaptive 10×`: the same maxima, `adaptive = true`;
//! - `static default` and `adaptive default`: the default budgets (100,000 keys/s, burst
//!   10,000; 2,000 commands/s, burst 200), adaptive off and on, for reference.
//!
//! Every sidecar has `max_wait = "60s"`, so no request is refused (one that is fails the run).
//! The variants' order is reversed in every other round, so a drift of the machine's load
//! does not always favour the same one.
//!
//! Run: `cargo bench --bench adaptive` (about 4 minutes on 2 cores). Writes
//! `results/adaptive.md` (and prints it). Needs `redis-server` (Debian: `redis-server`).
//! `STORMWALL_BENCH_ROUNDS=N` (default 3): rounds; the summary shows each variant's median,
//! and every round's row follows. `STORMWALL_BENCH_SIDECARS=N` (default 3): sidecars.
//! `STORMWALL_BENCH_QUICK=1`: a short smoke run (200,000 keys, 150,000 deleted, one round, 1 s
//! before and after); its report goes to a temporary folder (named at the end), and
//! `results/` is left alone.
//! For investigating (the report then also goes to a temporary folder):
//! `STORMWALL_BENCH_ONLY=static10x,adaptive10x` (any subset of `nostorm`, `direct`,
//! `static10x`, `adaptive10x`, `staticdefault`, `adaptivedefault`) runs only those variants;
//! `STORMWALL_BENCH_BIN=path` runs the sidecars from another stormwall binary (e.g. one built
//! with a different controller constant).

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Proc, bench_command, commandstats, connect, cores_and_cpu, cpu_seconds, env_flag, env_num,
    free_port, median, report_header, resp_command, results_dir, start_redis,
    start_stormwall_config, stormwall_revision, version_of, wait_port,
};

/// Bytes in each preloaded value.
const VALUE_SIZE: u64 = 100;
/// Keys in one `DEL` request.
const DEL_KEYS: u64 = 50;
/// Storm connections per sidecar (and, in all, straight to Redis for `direct`).
const CONNS_PER_SIDECAR: usize = 8;
/// Most `DEL` requests in flight on one storm connection.
const DEPTH: usize = 16;
const READ_CONNS: usize = 4;
const READ_RATE: f64 = 4_000.0;
const SCRAPE_EVERY: Duration = Duration::from_millis(250);
/// A storm that has not drained by then fails the run.
const STORM_TIMEOUT: Duration = Duration::from_secs(120);
/// A second of the storm counts for "worst second" with at least this many reads in it (the
/// storm's last, partial second may hold only a few).
const MIN_READS_PER_SECOND: usize = 200;

/// The gauges scraped from each sidecar.
const GAUGES: [&str; 4] = [
    "stormwall_invalidation_adaptive_ratio",
    "stormwall_redis_latency_seconds",
    "stormwall_redis_latency_baseline_seconds",
    "stormwall_invalidation_budget_keys_per_second",
];

// ---------------------------------------------------------------------------------------------
// Settings and variants

struct Settings {
    quick: bool,
    rounds: usize,
    sidecars: usize,
    /// Keys preloaded.
    populate: u64,
    /// Keys the storm deletes (`key:0` .. `key:{total - 1}`); reads go to the others.
    total: u64,
    before: Duration,
    after: Duration,
    /// How long `no storm` reads where the storm would be.
    idle_window: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = env_flag("STORMWALL_BENCH_QUICK");
        let s = Duration::from_secs;
        let (populate, total, before, idle_window) = if quick {
            (200_000, 150_000, s(1), s(2))
        } else {
            (2_000_000, 1_500_000, s(2), s(5))
        };
        Settings {
            quick,
            rounds: env_num("STORMWALL_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 }),
            sidecars: env_num("STORMWALL_BENCH_SIDECARS").unwrap_or(3),
            populate,
            total,
            before,
            after: before,
            idle_window,
        }
    }

    fn requests(&self) -> u64 {
        self.total / DEL_KEYS
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    NoStorm,
    Direct,
    Static10x,
    Adaptive10x,
    StaticDefault,
    AdaptiveDefault,
}

impl Variant {
    const ALL: [Variant; 6] = [
        Variant::NoStorm,
        Variant::Direct,
        Variant::Static10x,
        Variant::Adaptive10x,
        Variant::StaticDefault,
        Variant::AdaptiveDefault,
    ];

    /// The name `STORMWALL_BENCH_ONLY` knows it by.
    fn key(self) -> &'static str {
        match self {
            Variant::NoStorm => "nostorm",
            Variant::Direct => "direct",
            Variant::Static10x => "static10x",
            Variant::Adaptive10x => "adaptive10x",
            Variant::StaticDefault => "staticdefault",
            Variant::AdaptiveDefault => "adaptivedefault",
        }
    }

    /// The variants to run: all, or those `STORMWALL_BENCH_ONLY` names.
    fn selected() -> Vec<Variant> {
        let Some(only) = std::env::var("STORMWALL_BENCH_ONLY")
            .ok()
            .filter(|v| !v.is_empty())
        else {
            return Variant::ALL.to_vec();
        };
        let names: Vec<&str> = only.split(',').map(str::trim).collect();
        for n in &names {
            assert!(
                Variant::ALL.iter().any(|v| v.key() == *n),
                "STORMWALL_BENCH_ONLY: unknown variant {n:?}"
            );
        }
        Variant::ALL
            .into_iter()
            .filter(|v| names.contains(&v.key()))
            .collect()
    }

    fn label(self) -> &'static str {
        match self {
            Variant::NoStorm => "no storm",
            Variant::Direct => "direct",
            Variant::Static10x => "static 10×",
            Variant::Adaptive10x => "adaptive 10×",
            Variant::StaticDefault => "static default",
            Variant::AdaptiveDefault => "adaptive default",
        }
    }

    /// The sidecars' config file, or `None` when the storm does not go through sidecars.
    fn config(self) -> Option<String> {
        let ten_x = "keys_per_second = 1000000\nkeys_burst = 100000\n\
                     commands_per_second = 20000\ncommands_burst = 2000\n";
        let (budgets, adaptive) = match self {
            Variant::NoStorm | Variant::Direct => return None,
            Variant::Static10x => (ten_x, false),
            Variant::Adaptive10x => (ten_x, true),
            Variant::StaticDefault => ("", false),
            Variant::AdaptiveDefault => ("", true),
        };
        Some(format!(
            "[invalidation]\nmax_wait = \"60s\"\nadaptive = {adaptive}\n{budgets}"
        ))
    }

    fn storm(self) -> bool {
        self != Variant::NoStorm
    }
}

// ---------------------------------------------------------------------------------------------
// Small pieces

/// xorshift64*: deterministic per thread, no dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
}

/// CPU seconds (user + system) of the main thread of `pid` (Redis's command thread), from
/// `/proc/PID/task/PID/stat`, in ticks of 1/100 s; 0 if it is gone.
fn main_thread_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The machine's 1-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// One RESP2 reply, as far as this bench needs to tell them apart.
enum Reply {
    Int(i64),
    Bulk(bool),
    Other(String),
}

/// Reads one reply (integer, bulk string, error or status); `Err` when the connection failed
/// or the reply is not one of those.
fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
    let bad = || std::io::Error::other(format!("unexpected reply {text:?}"));
    match line.first() {
        Some(b':') => Ok(Reply::Int(text[1..].parse().map_err(|_| bad())?)),
        Some(b'$') => {
            let len: i64 = text[1..].parse().map_err(|_| bad())?;
            if len < 0 {
                return Ok(Reply::Bulk(false));
            }
            let mut body = vec![0; len as usize + 2];
            r.read_exact(&mut body)?;
            Ok(Reply::Bulk(true))
        }
        Some(b'-') | Some(b'+') => Ok(Reply::Other(text)),
        _ => Err(bad()),
    }
}

/// The `q` quantile (nearest rank) of sorted values.
fn pct<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

fn ms(us: Option<u32>) -> f64 {
    us.map_or(f64::NAN, |u| f64::from(u) / 1e3)
}

/// A number of milliseconds (or seconds, ...) with as many decimals as are meaningful.
fn f2(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

// ---------------------------------------------------------------------------------------------
// Readers

#[derive(Clone, Copy)]
struct Read {
    /// Scheduled send time, seconds since the run's start.
    at: f64,
    /// Reply time minus scheduled send time, microseconds.
    lat_us: u32,
}

#[derive(Default)]
struct ReaderOut {
    reads: Vec<Read>,
    /// Replies that were not a value (every key read exists throughout).
    misses: u64,
    errors: u64,
    first_error: Option<String>,
}

/// One reader connection straight to Redis, open loop: a sender thread writes each `GET` at
/// its scheduled time until `stop`, whatever is still unanswered; this thread reads the
/// replies in order.
fn reader(
    redis: u16,
    id: usize,
    t0: Instant,
    stop: Arc<AtomicBool>,
    keys: (u64, u64),
) -> ReaderOut {
    let rate = READ_RATE / READ_CONNS as f64;
    // Spread the connections' schedules evenly.
    let offset = id as f64 / READ_RATE;
    let stream = TcpStream::connect(("127.0.0.1", redis)).expect("reader: cannot connect");
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut write_half = stream.try_clone().unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, f64)>();
    let sender = thread::spawn(move || {
        let mut rng = Rng::new(id as u64 + 1);
        for i in 0u64.. {
            let at = offset + i as f64 / rate;
            let sched = t0 + Duration::from_secs_f64(at);
            sleep_until(sched);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let key = format!("key:{}", keys.0 + rng.below(keys.1 - keys.0));
            let cmd = resp_command(&[b"GET", key.as_bytes()]);
            // Queued before it is sent, so the reply side always finds it.
            if tx.send((sched, at)).is_err() || write_half.write_all(&cmd).is_err() {
                break;
            }
        }
    });
    let mut out = ReaderOut::default();
    let mut replies = BufReader::with_capacity(1 << 16, stream);
    for (sched, at) in rx {
        match read_reply(&mut replies) {
            Ok(Reply::Bulk(true)) => {}
            Ok(Reply::Bulk(false)) => out.misses += 1,
            Ok(Reply::Int(_)) | Ok(Reply::Other(_)) | Err(_) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| "bad GET reply".into());
                // The stream may be out of step: stop reading it.
                let _ = replies.get_ref().shutdown(std::net::Shutdown::Both);
                break;
            }
        }
        out.reads.push(Read {
            at,
            lat_us: sched.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
        });
    }
    let _ = sender.join();
    out
}

// ---------------------------------------------------------------------------------------------
// Storm clients

#[derive(Default)]
struct StormOut {
    /// Per acknowledged request: acknowledgement time (seconds since the run's start) and
    /// latency from its send, microseconds.
    acks: Vec<(f64, u32)>,
    /// Sum of the integer replies: keys removed.
    removed: u64,
    /// Replies that were not an integer (a refusal) or a failed connection.
    errors: u64,
    first_error: Option<String>,
}

/// One storm connection (to a sidecar or to Redis): takes the next request number from
/// `next` while fewer than [`DEPTH`] are in flight and any are left, sends request `n` as
/// `DEL key:{50n} … key:{50n + 49}`, and reads acknowledgements; ends when every request is
/// taken and its own are answered.
fn storm_client(
    port: u16,
    next: &AtomicU64,
    requests: u64,
    start: Instant,
    t0: Instant,
) -> StormOut {
    let mut out = StormOut::default();
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("storm: cannot connect");
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(STORM_TIMEOUT));
    let mut w = stream.try_clone().unwrap();
    let mut replies = BufReader::with_capacity(1 << 16, stream);
    let mut in_flight = std::collections::VecDeque::with_capacity(DEPTH);
    let mut exhausted = false;
    sleep_until(start);
    loop {
        let mut buf = Vec::new();
        while !exhausted && in_flight.len() < DEPTH {
            let n = next.fetch_add(1, Ordering::Relaxed);
            if n >= requests {
                exhausted = true;
                break;
            }
            let keys: Vec<String> = (n * DEL_KEYS..(n + 1) * DEL_KEYS)
                .map(|k| format!("key:{k}"))
                .collect();
            let mut args: Vec<&[u8]> = vec![b"DEL"];
            args.extend(keys.iter().map(|k| k.as_bytes()));
            buf.extend_from_slice(&resp_command(&args));
            in_flight.push_back(Instant::now());
        }
        if !buf.is_empty() && w.write_all(&buf).is_err() {
            out.errors += in_flight.len() as u64;
            out.first_error.get_or_insert_with(|| "write failed".into());
            return out;
        }
        if in_flight.is_empty() {
            return out;
        }
        // One acknowledgement, then every one already received, before refilling.
        loop {
            let reply = read_reply(&mut replies);
            let sent = in_flight.pop_front().unwrap();
            let now = Instant::now();
            match reply {
                Ok(Reply::Int(n)) if (0..=DEL_KEYS as i64).contains(&n) => {
                    out.removed += n as u64;
                    out.acks.push((
                        now.duration_since(t0).as_secs_f64(),
                        now.duration_since(sent)
                            .as_micros()
                            .min(u128::from(u32::MAX)) as u32,
                    ));
                }
                Ok(Reply::Int(n)) => {
                    out.errors += 1;
                    out.first_error
                        .get_or_insert_with(|| format!("DEL answered {n}"));
                }
                Ok(Reply::Bulk(_)) | Ok(Reply::Other(_)) => {
                    out.errors += 1;
                    let text = match reply {
                        Ok(Reply::Other(t)) => t,
                        _ => "a bulk string".into(),
                    };
                    out.first_error.get_or_insert(text);
                }
                Err(e) => {
                    out.errors += in_flight.len() as u64 + 1;
                    out.first_error.get_or_insert_with(|| format!("read: {e}"));
                    return out;
                }
            }
            if in_flight.is_empty() || !replies.buffer().contains(&b'\n') {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scraper

/// One scrape: when (seconds since the run's start), Redis's main-thread CPU seconds so far,
/// and each sidecar's gauges (in [`GAUGES`] order; NaN where missing).
struct Scrape {
    at: f64,
    redis_cpu: f64,
    sidecars: Vec<[f64; 4]>,
}

fn gauges(agent: &ureq::Agent, admin: u16) -> [f64; 4] {
    let mut out = [f64::NAN; 4];
    let Ok(body) = agent
        .get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
    else {
        return out;
    };
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(i) = GAUGES.iter().position(|g| *g == name) {
            out[i] = value.parse().unwrap_or(f64::NAN);
        }
    }
    out
}

fn scraper(redis_pid: u32, admins: Vec<u16>, t0: Instant, stop: Arc<AtomicBool>) -> Vec<Scrape> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .into();
    let mut out = Vec::new();
    let mut next = t0;
    while !stop.load(Ordering::Relaxed) {
        sleep_until(next);
        next += SCRAPE_EVERY;
        let at = t0.elapsed().as_secs_f64();
        let redis_cpu = main_thread_cpu(redis_pid);
        let sidecars = admins.iter().map(|a| gauges(&agent, *a)).collect();
        out.push(Scrape {
            at,
            redis_cpu,
            sidecars,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// One run

/// A sidecar: stormwall with `config` and its admin endpoint at `admin`, from
/// `STORMWALL_BENCH_BIN` if set (else the one built with this bench).
fn start_sidecar(redis: u16, config: &str, admin: &str) -> (Proc, u16) {
    let args = ["--admin", admin, "--log-level", "warn"];
    let Some(bin) = std::env::var_os("STORMWALL_BENCH_BIN").filter(|b| !b.is_empty()) else {
        return start_stormwall_config(redis, config, &args);
    };
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stormwall.toml");
    std::fs::write(&file, config).unwrap();
    let mut child = Proc(
        std::process::Command::new(bin)
            .arg("--config")
            .arg(&file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{redis}")])
            .args(args)
            .spawn()
            .expect("cannot start STORMWALL_BENCH_BIN"),
    );
    wait_port(port, &mut child.0, "stormwall");
    (child, port)
}

struct RunResult {
    variant: Variant,
    round: usize,
    /// Seconds since the run's start when the storm started and when its last `DEL` was
    /// acknowledged (for `no storm`, the end of its idle window).
    storm_from: f64,
    storm_to: f64,
    reads: Vec<Read>,
    read_misses: u64,
    acks: Vec<(f64, u32)>,
    removed: u64,
    storm_errors: u64,
    /// Redis's main thread, and all sidecars together, in cores during the storm.
    redis_cores: f64,
    sidecar_cores: f64,
    /// Invalidation commands that reached Redis (`DEL`, `UNLINK`, `EVAL`, `EVALSHA` calls).
    redis_commands: u64,
    scrapes: Vec<Scrape>,
}

fn run(s: &Settings, variant: Variant, round: usize) -> RunResult {
    eprintln!("== round {round}: {} ...", variant.label());
    let (redis_proc, redis) = start_redis(&["--enable-debug-command", "local"]);
    let loaded = Instant::now();
    let mut con = connect(redis);
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(s.populate)
        .arg("key")
        .arg(VALUE_SIZE)
        .query(&mut con)
        .expect("DEBUG POPULATE failed");
    let n: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(n, s.populate, "preload incomplete");
    eprintln!("   preloaded in {:.1}s", loaded.elapsed().as_secs_f64());

    let mut sidecars: Vec<(Proc, u16, u16)> = Vec::new();
    if let Some(config) = variant.config() {
        for _ in 0..s.sidecars {
            let admin = free_port();
            let addr = format!("127.0.0.1:{admin}");
            let (mut proc, port) = start_sidecar(redis, &config, &addr);
            wait_port(admin, &mut proc.0, "stormwall admin");
            sidecars.push((proc, port, admin));
        }
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut con)
        .unwrap();

    let redis_pid = redis_proc.pid();
    let t0 = Instant::now() + Duration::from_millis(500);
    let start = t0 + s.before;
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READ_CONNS)
        .map(|id| {
            let stop = stop.clone();
            let keys = (s.total, s.populate);
            thread::spawn(move || reader(redis, id, t0, stop, keys))
        })
        .collect();
    let scrape = {
        let admins = sidecars.iter().map(|(_, _, a)| *a).collect();
        let stop = stop.clone();
        thread::spawn(move || scraper(redis_pid, admins, t0, stop))
    };
    let next = Arc::new(AtomicU64::new(0));
    let requests = s.requests();
    let ports: Vec<u16> = if sidecars.is_empty() {
        vec![redis; s.sidecars * CONNS_PER_SIDECAR]
    } else {
        sidecars
            .iter()
            .flat_map(|(_, port, _)| [*port; CONNS_PER_SIDECAR])
            .collect()
    };
    let clients: Vec<_> = if variant.storm() {
        ports
            .into_iter()
            .map(|port| {
                let next = next.clone();
                thread::spawn(move || storm_client(port, &next, requests, start, t0))
            })
            .collect()
    } else {
        Vec::new()
    };

    let cpu_now = |sidecars: &[(Proc, u16, u16)]| {
        (
            main_thread_cpu(redis_pid),
            sidecars
                .iter()
                .map(|(p, _, _)| cpu_seconds(p.pid()))
                .sum::<f64>(),
        )
    };
    sleep_until(start);
    let cpu_from = cpu_now(&sidecars);
    let storm_from = start.duration_since(t0).as_secs_f64();
    let mut out = StormOut::default();
    for h in clients {
        let o = h.join().unwrap();
        out.acks.extend(o.acks);
        out.removed += o.removed;
        out.errors += o.errors;
        if out.first_error.is_none() {
            out.first_error = o.first_error;
        }
    }
    let storm_to = if variant.storm() {
        out.acks.iter().map(|a| a.0).fold(storm_from, f64::max)
    } else {
        sleep_until(start + s.idle_window);
        storm_from + s.idle_window.as_secs_f64()
    };
    let cpu_to = cpu_now(&sidecars);
    let span = (t0.elapsed().as_secs_f64() - storm_from).max(1e-3);
    sleep_until(t0 + Duration::from_secs_f64(storm_to) + s.after);
    stop.store(true, Ordering::Relaxed);
    let mut reads = Vec::new();
    let mut read_misses = 0;
    for h in readers {
        let o = h.join().unwrap();
        assert!(
            o.errors == 0,
            "{}: a reader failed: {:?}",
            variant.label(),
            o.first_error
        );
        reads.extend(o.reads);
        read_misses += o.misses;
    }
    let scrapes = scrape.join().unwrap();
    let stats = commandstats(&mut con);
    let redis_commands = ["del", "unlink", "eval", "evalsha"]
        .iter()
        .filter_map(|c| stats.get(*c))
        .sum();
    let left: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    if variant.storm() {
        assert!(
            out.errors == 0,
            "{}: {} storm requests failed, first: {:?}",
            variant.label(),
            out.errors,
            out.first_error
        );
        assert_eq!(out.acks.len() as u64, requests, "every DEL acknowledged");
        assert_eq!(
            out.removed, s.total,
            "the DEL counts add up to the keys deleted"
        );
        assert_eq!(
            left,
            s.populate - s.total,
            "Redis holds the keys not deleted"
        );
    }
    drop(sidecars);
    drop(redis_proc);
    reads.sort_by(|a, b| a.at.total_cmp(&b.at));
    let r = RunResult {
        variant,
        round,
        storm_from,
        storm_to,
        reads,
        read_misses,
        acks: out.acks,
        removed: out.removed,
        storm_errors: out.errors,
        redis_cores: (cpu_to.0 - cpu_from.0) / span,
        sidecar_cores: (cpu_to.1 - cpu_from.1) / span,
        redis_commands,
        scrapes,
    };
    let st = r.summary();
    eprintln!(
        "   read during storm p50 {} p99 {} max {} ms, worst second p99 {} ms; drain {:.2} s \
         ({:.0} keys/s); redis main {:.2} cores, sidecars {:.2} cores; {} invalidation \
         commands at Redis",
        f2(st.p50),
        f2(st.p99),
        f2(st.max),
        f2(st.worst_p99),
        st.drain,
        st.keys_per_second,
        r.redis_cores,
        r.sidecar_cores,
        r.redis_commands,
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
    worst_p99: f64,
    /// Read p99 before the storm, for comparison.
    before_p99: f64,
    drain: f64,
    keys_per_second: f64,
    ack_p50: f64,
    ack_p99: f64,
    /// Lowest adaptive ratio any sidecar reported during the storm (with `adaptive = false`
    /// the controller still computes it from batch timings, but it is not applied).
    min_ratio: f64,
    /// The controller's view during the storm: the median over scrapes of the worst
    /// sidecar's `stormwall_redis_latency_seconds`, and its healthy bound (`2 × baseline +
    /// 5 ms`, from the lowest baseline), in ms.
    seen_ms: f64,
    bound_ms: f64,
}

/// Latencies (µs, sorted) of the reads scheduled in `from..to` (seconds since the start).
fn lat_between(reads: &[Read], from: f64, to: f64) -> Vec<u32> {
    let mut v: Vec<u32> = reads
        .iter()
        .filter(|r| r.at >= from && r.at < to)
        .map(|r| r.lat_us)
        .collect();
    v.sort_unstable();
    v
}

impl RunResult {
    fn drain(&self) -> f64 {
        self.storm_to - self.storm_from
    }

    fn summary(&self) -> Summary {
        let during = lat_between(&self.reads, self.storm_from, self.storm_to);
        let worst_p99 = (0..self.drain().ceil() as usize)
            .map(|i| {
                let from = self.storm_from + i as f64;
                lat_between(&self.reads, from, (from + 1.0).min(self.storm_to))
            })
            .filter(|v| v.len() >= MIN_READS_PER_SECOND)
            .map(|v| ms(pct(&v, 0.99)))
            .fold(f64::NAN, f64::max);
        let mut acks: Vec<u32> = self.acks.iter().map(|a| a.1).collect();
        acks.sort_unstable();
        let min_ratio = self
            .scrapes
            .iter()
            .filter(|sc| sc.at >= self.storm_from && sc.at <= self.storm_to + 0.25)
            .flat_map(|sc| sc.sidecars.iter().map(|g| g[0]))
            .filter(|v| !v.is_nan())
            .fold(f64::NAN, f64::min);
        let storm_scrapes = || {
            self.scrapes
                .iter()
                .filter(|sc| sc.at >= self.storm_from && sc.at <= self.storm_to)
        };
        let seen_ms = median(
            storm_scrapes()
                .map(|sc| sc.sidecars.iter().map(|g| g[1]).fold(f64::NAN, f64::max))
                .filter(|v| !v.is_nan())
                .map(|v| v * 1e3)
                .collect(),
        );
        let baseline = storm_scrapes()
            .flat_map(|sc| sc.sidecars.iter().map(|g| g[2]))
            .filter(|v| !v.is_nan())
            .fold(f64::NAN, f64::min);
        Summary {
            p50: ms(pct(&during, 0.5)),
            p99: ms(pct(&during, 0.99)),
            max: ms(during.last().copied()),
            worst_p99,
            before_p99: ms(pct(&lat_between(&self.reads, 0.0, self.storm_from), 0.99)),
            drain: if self.variant.storm() {
                self.drain()
            } else {
                f64::NAN
            },
            keys_per_second: if self.variant.storm() {
                self.removed as f64 / self.drain()
            } else {
                f64::NAN
            },
            ack_p50: ms(pct(&acks, 0.5)),
            ack_p99: ms(pct(&acks, 0.99)),
            min_ratio,
            seen_ms,
            bound_ms: (2.0 * baseline + 0.005) * 1e3,
        }
    }

    /// The per-second table: read latency, keys acknowledged, Redis's main-thread CPU, and
    /// each sidecar's adaptive ratio (lowest scrape in the second) and the latency it saw.
    fn per_second(&self, md: &mut String) {
        let n = self.scrapes.first().map_or(0, |s| s.sidecars.len());
        let _ = writeln!(
            md,
            "\n**{}, round {}** (second 0 starts the storm; drained at {:.2} s)\n",
            self.variant.label(),
            self.round,
            self.drain()
        );
        md.push_str(
            "| s | read p50 ms | read p99 ms | read max ms | keys deleted | Redis main CPU | \
             adaptive ratio (lowest, per sidecar) | Redis latency seen, ms (worst sidecar) | \
             baseline ms | key budget /s (sum) |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        let first = -1i64;
        let last = (self.drain() + self.storm_from.min(2.0)).ceil() as i64;
        for i in first..last {
            let from = self.storm_from + i as f64;
            let to = from + 1.0;
            let lat = lat_between(&self.reads, from, to);
            if lat.is_empty() {
                continue;
            }
            let keys =
                self.acks.iter().filter(|a| a.0 >= from && a.0 < to).count() as u64 * DEL_KEYS;
            let in_second: Vec<&Scrape> = self
                .scrapes
                .iter()
                .filter(|sc| sc.at >= from && sc.at < to)
                .collect();
            let cpu = match (in_second.first(), in_second.last()) {
                (Some(a), Some(b)) if b.at > a.at => {
                    format!("{:.2}", (b.redis_cpu - a.redis_cpu) / (b.at - a.at))
                }
                _ => "–".into(),
            };
            let per_sidecar = |g: usize, fold: fn(f64, f64) -> f64, init: f64| {
                (0..n)
                    .map(|c| {
                        in_second
                            .iter()
                            .map(|sc| sc.sidecars[c][g])
                            .filter(|v| !v.is_nan())
                            .fold(init, fold)
                    })
                    .collect::<Vec<f64>>()
            };
            let ratios = per_sidecar(0, f64::min, f64::INFINITY)
                .iter()
                .map(|r| {
                    if r.is_finite() {
                        format!("{r:.2}")
                    } else {
                        "–".into()
                    }
                })
                .collect::<Vec<_>>()
                .join(" / ");
            let worst = per_sidecar(1, f64::max, f64::NAN)
                .into_iter()
                .fold(f64::NAN, f64::max);
            let baseline = per_sidecar(2, f64::min, f64::NAN)
                .into_iter()
                .fold(f64::NAN, f64::min);
            let budget: f64 = in_second
                .last()
                .map_or(f64::NAN, |sc| sc.sidecars.iter().map(|g| g[3]).sum());
            let _ = writeln!(
                md,
                "| {i} | {} | {} | {} | {keys} | {cpu} | {ratios} | {} | {} | {} |",
                f2(ms(pct(&lat, 0.5))),
                f2(ms(pct(&lat, 0.99))),
                f2(ms(lat.last().copied())),
                f2(worst * 1e3),
                f2(baseline * 1e3),
                if budget.is_nan() {
                    "–".into()
                } else {
                    format!("{budget:.0}")
                },
            );
        }
    }
}

fn summary_row(md: &mut String, label: &str, round: &str, st: &Summary, r: &RunResult) {
    let ratio = if st.min_ratio.is_nan() {
        "–".into()
    } else {
        format!("{:.2}", st.min_ratio)
    };
    let _ = writeln!(
        md,
        "| {label} | {round} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {ratio} | {} / {} |",
        f2(st.before_p99),
        f2(st.p50),
        f2(st.p99),
        f2(st.max),
        f2(st.worst_p99),
        if st.drain.is_nan() {
            "–".into()
        } else {
            format!("{:.2}", st.drain)
        },
        if st.keys_per_second.is_nan() {
            "–".into()
        } else {
            format!("{:.0}", st.keys_per_second)
        },
        f2(st.ack_p50),
        f2(st.ack_p99),
        r.redis_cores,
        r.sidecar_cores,
        r.redis_commands,
        f2(st.seen_ms),
        f2(st.bound_ms),
    );
}

const SUMMARY_HEAD: &str = "| variant | round | read p99 before storm ms | read p50 ms | read p99 ms | \
    read max ms | worst second's p99 ms | drain s | keys/s | DEL ack p50 ms | DEL ack p99 ms | \
    Redis main CPU (cores) | sidecars CPU (cores) | invalidation cmds at Redis | lowest adaptive ratio (static: computed, not applied) | \
    controller's Redis latency (median) / healthy bound ms |\n\
    | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";

fn report(s: &Settings, runs: &[RunResult], minutes: f64, load_before: &str) -> String {
    let vars = [
        "STORMWALL_BENCH_QUICK",
        "STORMWALL_BENCH_ROUNDS",
        "STORMWALL_BENCH_SIDECARS",
        "STORMWALL_BENCH_ONLY",
        "STORMWALL_BENCH_BIN",
    ];
    let mut md = report_header(
        "Adaptive invalidation budget: incident replay with static budgets 10× too high",
        &bench_command("adaptive", &vars),
    );
    let _ = writeln!(md, "| machine | {} |", cores_and_cpu());
    let _ = writeln!(
        md,
        "| load average (1 min) | {load_before} before, {} after |",
        load_average()
    );
    let _ = writeln!(
        md,
        "| redis | {} |",
        version_of("redis-server", &["--version"])
    );
    let _ = writeln!(md, "| stormwall | {} |", stormwall_revision());
    let _ = writeln!(
        md,
        "| run | {} rounds × {} variants, {:.1} min{} |\n",
        s.rounds,
        Variant::selected().len(),
        minutes,
        if s.quick { ", QUICK (smoke run)" } else { "" }
    );
    let _ = writeln!(
        md,
        "Workload: Redis preloaded with {} keys of {VALUE_SIZE} B; readers straight to Redis, {} \
         connections, {READ_RATE:.0} `GET`/s open loop (latency from the scheduled send time) of \
         keys never deleted; the storm deletes {} keys as `DEL`s of {DEL_KEYS} distinct keys, \
         {} connections ({CONNS_PER_SIDECAR} per sidecar, {} sidecars; straight to Redis for \
         `direct`), up to {DEPTH} in flight per connection, refilled as acknowledged. Sidecars: \
         `max_wait = \"60s\"`, `delete_command = \"unlink\"` (default); `static/adaptive 10×`: \
         `keys_per_second = 1000000`, `keys_burst = 100000`, `commands_per_second = 20000`, \
         `commands_burst = 2000` per sidecar; `default`: the default budgets (100,000 keys/s, \
         burst 10,000; 2,000 commands/s, burst 200). \"During the storm\" is from its start to \
         the acknowledgement of its last `DEL` (for `no storm`, {} s where it would be). \
         Every reply was checked: each `DEL` answered an integer, their sum is the keys \
         deleted, and `DBSIZE` agrees.\n",
        s.populate,
        READ_CONNS,
        s.total,
        s.sidecars * CONNS_PER_SIDECAR,
        s.sidecars,
        s.idle_window.as_secs(),
    );
    md.push_str(
        "The machine is shared (other builds run on the same 2 cores), so absolute numbers are \
         noisy: compare variants within this run, and rounds with each other.\n\n",
    );

    md.push_str("## Summary (median over rounds)\n\n");
    md.push_str(SUMMARY_HEAD);
    let med = |v: Variant, f: fn(&Summary) -> f64| {
        median(
            runs.iter()
                .filter(|r| r.variant == v)
                .map(|r| f(&r.summary()))
                .filter(|x| !x.is_nan())
                .collect(),
        )
    };
    for v in Variant::ALL {
        let mine: Vec<&RunResult> = runs.iter().filter(|r| r.variant == v).collect();
        if mine.is_empty() {
            continue;
        }
        let st = Summary {
            p50: med(v, |s| s.p50),
            p99: med(v, |s| s.p99),
            max: med(v, |s| s.max),
            worst_p99: med(v, |s| s.worst_p99),
            before_p99: med(v, |s| s.before_p99),
            drain: med(v, |s| s.drain),
            keys_per_second: med(v, |s| s.keys_per_second),
            ack_p50: med(v, |s| s.ack_p50),
            ack_p99: med(v, |s| s.ack_p99),
            min_ratio: med(v, |s| s.min_ratio),
            seen_ms: med(v, |s| s.seen_ms),
            bound_ms: med(v, |s| s.bound_ms),
        };
        let cores = |f: fn(&RunResult) -> f64| median(mine.iter().map(|r| f(r)).collect());
        let fake = RunResult {
            variant: v,
            round: 0,
            storm_from: 0.0,
            storm_to: 0.0,
            reads: Vec::new(),
            read_misses: 0,
            acks: Vec::new(),
            removed: 0,
            storm_errors: 0,
            redis_cores: cores(|r| r.redis_cores),
            sidecar_cores: cores(|r| r.sidecar_cores),
            redis_commands: median(mine.iter().map(|r| r.redis_commands as f64).collect()) as u64,
            scrapes: Vec::new(),
        };
        summary_row(&mut md, v.label(), "median", &st, &fake);
    }

    // The comparison the issue asks for, round by round.
    md.push_str("\n## Adaptive vs static, same maxima, round by round\n\n");
    md.push_str(
        "| round | budgets | read p99 static → adaptive ms | worst second's p99 static → \
         adaptive ms | drain static → adaptive s |\n| --- | --- | --- | --- | --- |\n",
    );
    for round in 1..=s.rounds {
        for (st, ad, name) in [
            (Variant::Static10x, Variant::Adaptive10x, "10×"),
            (Variant::StaticDefault, Variant::AdaptiveDefault, "default"),
        ] {
            let find = |v| runs.iter().find(|r| r.variant == v && r.round == round);
            if let (Some(a), Some(b)) = (find(st), find(ad)) {
                let (a, b) = (a.summary(), b.summary());
                let _ = writeln!(
                    md,
                    "| {round} | {name} | {} → {} ({:.2}×) | {} → {} ({:.2}×) | {:.2} → {:.2} ({:.2}×) |",
                    f2(a.p99),
                    f2(b.p99),
                    b.p99 / a.p99,
                    f2(a.worst_p99),
                    f2(b.worst_p99),
                    b.worst_p99 / a.worst_p99,
                    a.drain,
                    b.drain,
                    b.drain / a.drain,
                );
            }
        }
    }

    md.push_str("\n## Every run\n\n");
    md.push_str(SUMMARY_HEAD);
    for r in runs {
        summary_row(
            &mut md,
            r.variant.label(),
            &r.round.to_string(),
            &r.summary(),
            r,
        );
    }
    let misses: u64 = runs.iter().map(|r| r.read_misses).sum();
    let errors: u64 = runs.iter().map(|r| r.storm_errors).sum();
    let _ = writeln!(
        md,
        "\nReads that found no value: {misses} (every key read exists throughout); storm \
         requests refused or failed: {errors}."
    );

    md.push_str(
        "\n## Per second\n\nFor each maximum (10×, then default): the adaptive runs, every \
         round, then the static run of the first round for comparison. Ratio and latency are \
         the sidecars' own gauges (`stormwall_invalidation_adaptive_ratio`, \
         `stormwall_redis_latency_seconds`: the controller's last window's latency, its worst \
         `PING` or quickest batch; `stormwall_redis_latency_baseline_seconds`), scraped every \
         250 ms; with `adaptive = false` the controller still runs on batch timings (and the \
         readiness probe's `PING`) and sets the gauges, but its ratio is not applied, so the \
         key budget column stays at the maximum.\n",
    );
    for (adaptive, fixed) in [
        (Variant::Adaptive10x, Variant::Static10x),
        (Variant::AdaptiveDefault, Variant::StaticDefault),
    ] {
        for r in runs.iter().filter(|r| r.variant == adaptive) {
            r.per_second(&mut md);
        }
        if let Some(r) = runs.iter().find(|r| r.variant == fixed && r.round == 1) {
            r.per_second(&mut md);
        }
    }
    md
}

fn main() {
    let s = Settings::from_env();
    let load_before = load_average();
    let started = Instant::now();
    let mut runs = Vec::new();
    for round in 1..=s.rounds {
        let mut order = Variant::selected();
        if round % 2 == 0 {
            order.reverse();
        }
        for v in order {
            runs.push(run(&s, v, round));
        }
    }
    let md = report(
        &s,
        &runs,
        started.elapsed().as_secs_f64() / 60.0,
        &load_before,
    );
    let investigating = ["STORMWALL_BENCH_ONLY", "STORMWALL_BENCH_BIN"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    let dir: PathBuf = if s.quick || investigating {
        let d = std::env::temp_dir().join(format!("stormwall-adaptive-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    } else {
        results_dir()
    };
    let path = dir.join("adaptive.md");
    std::fs::write(&path, &md).unwrap();
    println!("{md}\nwritten to {}", path.display());
}
