//! The incident replay: a large "account settings" cache, steady open-loop reads, and in the
//! middle an invalidation storm — run directly against Redis and through stormwall (default
//! config) in the same run, each run on a freshly started and preloaded `redis-server`.
//!
//! Run: `cargo bench --bench storm` (about 3–4 minutes on 2 cores). Writes `results/storm.md`,
//! `results/storm_latency.png` and `results/storm_curve.png`. Needs `redis-server` (Debian:
//! `redis-server`) and, for the plots, the DejaVu font (Debian: `fonts-dejavu-core`; or a
//! TrueType font named by `STORMWALL_BENCH_FONT`).
//! `STORMWALL_BENCH_QUICK=1`: a short smoke run on a smaller keyspace (its report goes to a
//! temp folder, named at the end; `results/` is left alone).
//! `STORMWALL_BENCH_ONLY=flush,del,curve,direct,async,stormwall` (any subset): run only those
//! parts (`async`: the FLUSHDB storm sent straight to Redis as `FLUSHDB ASYNC`); the report
//! then goes to stdout and a temp folder, and `results/` is left alone.
//! `STORMWALL_BENCH_UPSTREAM_MODE=shared|dedicated`: stormwall's `upstream.mode` in every
//! stormwall run (unset: its default, shared).
//! `STORMWALL_BENCH_CLUSTER=1`: the same replay against a Redis Cluster of 3 masters
//! (`benches/common/cluster.rs`) — directly with cluster-aware clients (per-master connections,
//! `DEL` split by slot, `FLUSHDB` to every master), and through stormwall with `[upstream]
//! kind = "cluster"` — without the tuning curve; writes `results/storm_cluster.md` and
//! `results/storm_cluster_latency.png` (the report says how the clients route).
//! Variants of the workload, for investigating (each named in the report's command line):
//! `STORMWALL_BENCH_SAME_CONN=1` (a reader re-populates a miss on its own connection, between
//! its `GET`s), `STORMWALL_BENCH_CLOSED_LOOP=1` (a reader waits for each reply, and for its
//! miss's `SET`, before the next `GET`: a synchronous app; latency still from the schedule),
//! `STORMWALL_BENCH_LATE_CONNECT=1` (storm clients connect at their first request, in the
//! storm), `STORMWALL_BENCH_HOT_KEYS=N` (reads over `N` keys instead of 10,000),
//! `STORMWALL_BENCH_BIN=path` (another stormwall binary, e.g. an older build),
//! `STORMWALL_BENCH_STORMWALL_TOML='[invalidation]\nadaptive = false'` (appended to every
//! stormwall's config file, a literal `\n` read as a line break).
//!
//! Output: besides the whole-phase figures, the read p50 / p99 / max **of every second** of
//! each path (the report's per-second tables; a transient of a few seconds hides in a
//! storm-window p99), and on stderr, per second, the cores used by Redis's main thread, its
//! background threads, stormwall and the bench, the run-queue wait of Redis's main thread and
//! of stormwall (how much other work on the machine delayed them), and stormwall's counters.
//!
//! Every run:
//! - starts a fresh `redis-server` (`--enable-debug-command local`), preloads it with
//!   `DEBUG POPULATE` (1M string keys `key:N` of 100 B) and 8 hashes `hash:0..7` of 200k fields each
//!   (pipelined `HSET` batches of 1,000 fields), then `CONFIG RESETSTAT`;
//! - for the stormwall path, starts a fresh stormwall in front of it (no config file for the
//!   main runs; a file with only `[flush] min_interval` for the tuning curve; its own admin
//!   port, from which its counters are read);
//! - readers: 8 connections, together 8,000 `GET`/s of the 10,000 hottest keys (uniform), truly
//!   open loop: on each connection one thread writes every `GET` at its scheduled time whatever
//!   is still unanswered, another reads the replies in order, and a read's latency is its reply
//!   time minus its *scheduled* send time — a stall delays and counts every read scheduled
//!   during it. A miss is what a cache-aside app turns into a database query and a `SET`: the
//!   key is re-populated (pipelined `SET`s on a second connection per reader);
//! - the storm, from 32 other connections, during the middle window:
//!   - FLUSHDB storm: together ~20 "account updates"/s; each writes a marker key of its
//!     connection, issues `FLUSHDB` (as django-redis `cache.clear()` does), checks the marker
//!     is gone (on a separate connection straight to Redis, then on its own connection), then
//!     re-populates 5 keys; run three ways: straight to Redis, straight to Redis as
//!     `FLUSHDB ASYNC` (what stormwall sends by default, so the fair comparison of read
//!     latency), and through stormwall;
//!   - DEL storm: together ~100 `DEL`/s, each of one of 30 groups of 10 keys out of the same
//!     300 keys (292 hot string keys, and the 8 big hashes in two groups of 4); before each
//!     `DEL` the client writes a unique marker value into the group's first string key and
//!     after the acknowledgement checks (straight to Redis, then on its own connection) that
//!     the marker is gone, and that the count is within 0..=keys. A rebuilder (its own
//!     connection straight to Redis, in both paths) re-creates a deleted or partial big hash
//!     during the storm, at most one every 250 ms, so later `DEL`s keep having work;
//!   - each storm connection follows a fixed schedule and waits for each acknowledgement;
//!     when one comes back after its next slot, the next request goes out at once (the
//!     achieved rate is reported);
//! - CPU used (and run-queue wait) during the storm window, and in each second, is read from
//!   `/proc` for Redis's main thread, its background threads, stormwall and this process.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::SlotMap;
use common::{
    Proc, commandstats, cpu_model, env_flag, free_port, info_field, load_average, register_font,
    results_dir, start_redis, stdout_of, utc_date, wait_port,
};
use stormwall::cluster::slot::key_slot;

/// Reads go to `key:0` .. `key:{HOT_KEYS - 1}`: the active accounts.
const HOT_KEYS: u64 = 10_000;
/// Bytes in each string value (preloaded and re-populated).
const VALUE_SIZE: usize = 100;
const BIG_HASHES: usize = 8;
const HASH_BATCH: u64 = 1_000;
const READ_CONNS: usize = 8;
const READ_RATE: f64 = 8_000.0;
const STORM_CONNS: usize = 32;
const FLUSH_RATE: f64 = 20.0;
const DEL_RATE: f64 = 100.0;
const DEL_GROUPS: usize = 30;
const GROUP_SIZE: usize = 10;
/// Keys an account update re-populates after its flush.
const REPOPULATE: usize = 5;
const REBUILD_GAP: Duration = Duration::from_millis(250);
/// The tuning curve: `flush.min_interval` values (seconds, as written in the config file).
const CURVE: [(f64, &str); 5] = [
    (0.25, "250ms"),
    (0.5, "500ms"),
    (1.0, "1s"),
    (2.0, "2s"),
    (5.0, "5s"),
];
/// stormwall's counters shown per second of the timeline.
const SECOND_COUNTERS: &[&str] = &[
    "stormwall_commands_total",
    "stormwall_flushes_requested_total",
    "stormwall_flushes_executed_total",
    "stormwall_upstream_connects_total",
    "stormwall_client_connections_total",
    "stormwall_pins_total",
    "stormwall_invalidation_batches_total",
    "stormwall_invalidation_commands_sent_total",
    "stormwall_invalidation_keys_sent_total",
];
/// Width of a time bucket in the latency-over-time plot.
const BUCKET_SECS: f64 = 0.25;

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Clone, Copy)]
struct Timeline {
    before: Duration,
    storm: Duration,
    after: Duration,
}

impl Timeline {
    fn total(&self) -> Duration {
        self.before + self.storm + self.after
    }
    fn storm_from(&self) -> f64 {
        self.before.as_secs_f64()
    }
    fn storm_to(&self) -> f64 {
        (self.before + self.storm).as_secs_f64()
    }
}

struct Settings {
    quick: bool,
    /// `STORMWALL_BENCH_CLUSTER`: every run against a Redis Cluster instead of one Redis.
    cluster: bool,
    /// `STORMWALL_BENCH_UPSTREAM_MODE`: stormwall's `upstream.mode` (unset: its default).
    upstream_mode: Option<String>,
    keys: u64,
    fields: u64,
    main: Timeline,
    curve: Timeline,
}

impl Settings {
    /// The report's file name, without `.md` (its latency plot's starts the same).
    fn report_name(&self) -> &'static str {
        if self.cluster {
            "storm_cluster"
        } else {
            "storm"
        }
    }

    fn from_env() -> Settings {
        let quick = env_flag("STORMWALL_BENCH_QUICK");
        let s = Duration::from_secs;
        let upstream_mode = std::env::var("STORMWALL_BENCH_UPSTREAM_MODE")
            .ok()
            .filter(|m| !m.is_empty());
        if let Some(m) = &upstream_mode {
            assert!(
                m == "shared" || m == "dedicated",
                "STORMWALL_BENCH_UPSTREAM_MODE must be shared or dedicated"
            );
        }
        let cluster = env_flag("STORMWALL_BENCH_CLUSTER");
        assert!(
            !(cluster && upstream_mode.as_deref() == Some("dedicated")),
            "a cluster upstream takes shared mode only"
        );
        if quick {
            Settings {
                quick,
                cluster,
                upstream_mode,
                keys: 100_000,
                fields: 20_000,
                main: Timeline {
                    before: s(2),
                    storm: s(4),
                    after: s(2),
                },
                curve: Timeline {
                    before: s(1),
                    storm: s(4),
                    after: s(1),
                },
            }
        } else {
            Settings {
                quick,
                cluster,
                upstream_mode,
                keys: 1_000_000,
                fields: 200_000,
                main: Timeline {
                    before: s(5),
                    storm: s(10),
                    after: s(5),
                },
                curve: Timeline {
                    before: s(2),
                    storm: s(15),
                    after: s(1),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

struct Stormwall {
    proc: Proc,
    port: u16,
    admin: u16,
    log: std::path::PathBuf,
}

fn stormwall(redis: u16, config: Option<&Path>, dir: &Path) -> Stormwall {
    let port = free_port();
    let admin = free_port();
    let log = dir.join("stormwall.log");
    // `STORMWALL_BENCH_BIN`: another stormwall binary (an older build, for comparison).
    let bin = std::env::var("STORMWALL_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_stormwall").to_owned());
    let mut cmd = Command::new(bin);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let child = cmd
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream", &format!("127.0.0.1:{redis}")])
        // Its own admin port (metrics are read from it); the default 9380 may be taken.
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("cannot start stormwall");
    let mut p = Proc(child);
    wait_port(port, &mut p.0, "stormwall");
    wait_port(admin, &mut p.0, "stormwall admin");
    Stormwall {
        proc: p,
        port,
        admin,
        log,
    }
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_connection_with_timeout(Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(c)
}

/// Where a client's commands go: one server (Redis, or stormwall), or, directly to a cluster,
/// each key to its slot's master, as a cluster-aware client routes it.
#[derive(Clone)]
struct Route {
    ports: Vec<u16>,
    /// The cluster's slot map (indexes into `ports`); `None`: one server takes everything.
    map: Option<Arc<SlotMap>>,
}

impl Route {
    fn one(port: u16) -> Route {
        Route {
            ports: vec![port],
            map: None,
        }
    }

    fn cluster(map: SlotMap) -> Route {
        Route {
            ports: map.ports.clone(),
            map: Some(Arc::new(map)),
        }
    }

    fn index_of(&self, key: &str) -> usize {
        self.map.as_ref().map_or(0, |m| m.master_of(key.as_bytes()))
    }

    fn port_of(&self, key: &str) -> u16 {
        self.ports[self.index_of(key)]
    }

    /// A connection to each server.
    fn connect(&self) -> redis::RedisResult<Routed> {
        Ok(Routed {
            cons: self
                .ports
                .iter()
                .map(|&p| connect(p))
                .collect::<redis::RedisResult<_>>()?,
            route: self.clone(),
        })
    }
}

/// A client's connections along a [`Route`].
struct Routed {
    cons: Vec<redis::Connection>,
    route: Route,
}

impl Routed {
    /// The connection for `key`.
    fn to(&mut self, key: &str) -> &mut redis::Connection {
        let i = self.route.index_of(key);
        &mut self.cons[i]
    }

    /// `FLUSHDB` (`ASYNC`) on every server — a cluster-aware client's flush, which is each
    /// master's — true if each said `OK`.
    fn flushdb(&mut self, asynchronous: bool) -> redis::RedisResult<bool> {
        let mut ok = true;
        for con in &mut self.cons {
            let mut cmd = redis::cmd("FLUSHDB");
            if asynchronous {
                cmd.arg("ASYNC");
            }
            ok &= cmd.query::<String>(con)? == "OK";
        }
        Ok(ok)
    }

    /// `DEL keys`: one command to one server; directly to a cluster (which refuses a `DEL`
    /// whose keys span slots) one `DEL` per slot, those of a master pipelined, counts summed,
    /// as cluster clients (redis-py, Lettuce) split a multi-key delete.
    fn del(&mut self, keys: &[String]) -> redis::RedisResult<i64> {
        let Some(map) = self.route.map.clone() else {
            return redis::cmd("DEL").arg(keys).query(&mut self.cons[0]);
        };
        let mut by_master: BTreeMap<usize, BTreeMap<u16, Vec<&String>>> = BTreeMap::new();
        for k in keys {
            by_master
                .entry(map.master_of(k.as_bytes()))
                .or_default()
                .entry(key_slot(k.as_bytes()))
                .or_default()
                .push(k);
        }
        let mut deleted = 0;
        for (master, slots) in by_master {
            let mut p = redis::pipe();
            for slot_keys in slots.values() {
                p.cmd("DEL").arg(slot_keys);
            }
            deleted += p
                .query::<Vec<i64>>(&mut self.cons[master])?
                .iter()
                .sum::<i64>();
        }
        Ok(deleted)
    }

    /// `INFO commandstats` of every server, summed.
    fn commandstats(&mut self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for con in &mut self.cons {
            for (name, calls) in commandstats(con) {
                *out.entry(name).or_insert(0) += calls;
            }
        }
        out
    }
}

/// stormwall's Prometheus counters, summed over labels.
fn stormwall_metrics(admin: u16) -> BTreeMap<String, f64> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let body = agent
        .get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string());
    let mut out = BTreeMap::new();
    let Ok(body) = body else {
        return out;
    };
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name.split('{').next().unwrap_or(name).to_owned();
        if let Ok(v) = value.parse::<f64>() {
            *out.entry(name).or_insert(0.0) += v;
        }
    }
    out
}

/// CPU seconds (user + system) of each thread of `pid`, by thread id.
fn thread_cpu(pid: u32) -> BTreeMap<u32, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state is field 3, utime 14,
        // stime 15, in clock ticks of 1/100 s (USER_HZ).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        out.insert(tid, (ticks(11) + ticks(12)) / 100.0);
    }
    out
}

/// Cores used during the storm window: Redis's main thread, Redis's other threads (lazy
/// free, I/O), stormwall, and this benchmark (readers, storm clients, rebuilder).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    redis_main: f64,
    redis_bg: f64,
    stormwall: f64,
    bench: f64,
}

/// Seconds the threads of `pid` (only the thread `pid` itself if `main_only`) spent runnable
/// but waiting for a CPU (`/proc/…/schedstat`): how much the machine's other work delayed it.
fn run_queue_wait(pid: u32, main_only: bool) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    dir.flatten()
        .filter(|e| !main_only || e.file_name().to_string_lossy() == pid.to_string())
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|t| t.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// CPU seconds (user + system) of process `pid`, its ended threads included.
fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One CPU sample: the threads of every Redis in `redis` (one, or a cluster's masters),
/// stormwall's total and this process's.
fn cpu_sample(redis: &[u32], sw: Option<u32>) -> (BTreeMap<u32, f64>, f64, f64) {
    let r = redis.iter().flat_map(|&p| thread_cpu(p)).collect();
    let s = sw.map_or(0.0, process_cpu);
    // The bench's threads end as the run ends: the process's total keeps their time.
    let b = process_cpu(std::process::id());
    (r, s, b)
}

fn cpu_use(
    redis: &[u32],
    a: &(BTreeMap<u32, f64>, f64, f64),
    b: &(BTreeMap<u32, f64>, f64, f64),
    secs: f64,
) -> CpuUse {
    let main = |m: &BTreeMap<u32, f64>| redis.iter().filter_map(|p| m.get(p)).sum::<f64>();
    let bg = |m: &BTreeMap<u32, f64>| {
        m.iter()
            .filter(|(t, _)| !redis.contains(t))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    CpuUse {
        redis_main: (main(&b.0) - main(&a.0)) / secs,
        redis_bg: (bg(&b.0) - bg(&a.0)) / secs,
        stormwall: (b.1 - a.1) / secs,
        bench: (b.2 - a.2) / secs,
    }
}

// ---------------------------------------------------------------------------------------------
// Workload pieces

/// xorshift64*: deterministic per thread, no dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
}

/// The value of `key:{n}`, as `DEBUG POPULATE … key VALUE_SIZE` writes it: `value:{n}`
/// padded with zero bytes to `VALUE_SIZE`.
fn value(n: u64) -> Vec<u8> {
    let mut v = format!("value:{n}").into_bytes();
    v.resize(VALUE_SIZE.max(v.len()), 0);
    v
}

/// The pipelined `HSET` batches that build big hash `h`.
fn hash_pipeline(h: usize, fields: u64) -> redis::Pipeline {
    let mut p = redis::pipe();
    let mut start = 0;
    while start < fields {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("hash:{h}"));
        for f in start..(start + HASH_BATCH).min(fields) {
            cmd.arg(format!("field:{f}"))
                .arg(format!("setting-value:{f}"));
        }
        p.add_command(cmd).ignore();
        start += HASH_BATCH;
    }
    p
}

fn preload(redis: u16, s: &Settings, hashes: &[redis::Pipeline]) {
    let mut c = connect(redis).unwrap();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(s.keys)
        .arg("key")
        .arg(VALUE_SIZE)
        .query(&mut c)
        .expect("DEBUG POPULATE failed");
    for p in hashes {
        let _: () = p.query(&mut c).expect("building a big hash failed");
    }
    let n: u64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, s.keys + BIG_HASHES as u64, "preload incomplete");
}

/// What a run's storm goes against: one `redis-server` (preloaded with `DEBUG POPULATE`), or a
/// Redis Cluster (`STORMWALL_BENCH_CLUSTER=1`) preloaded with the same keys and values, each
/// on its slot's master.
struct Backend {
    /// Kept for the run: the servers stop (by pid) when it drops.
    servers: Servers,
    route: Route,
    /// Redis's pid, or every master's.
    pids: Vec<u32>,
}

enum Servers {
    /// Held only to stop it when dropped.
    One {
        _redis: Proc,
    },
    Cluster(common::cluster::Cluster),
}

impl Backend {
    fn start(s: &Settings, hashes: &[redis::Pipeline]) -> Backend {
        let loaded = Instant::now();
        let backend = if s.cluster {
            let cluster = common::cluster::start();
            let route = Route::cluster(SlotMap::of(&cluster));
            preload_cluster(&route, s, hashes);
            Backend {
                pids: common::cluster::master_pids(&cluster),
                servers: Servers::Cluster(cluster),
                route,
            }
        } else {
            // `DEBUG POPULATE` preloads the keyspace.
            let (proc, port) = start_redis(&["--enable-debug-command", "local"]);
            preload(port, s, hashes);
            Backend {
                pids: vec![proc.pid()],
                servers: Servers::One { _redis: proc },
                route: Route::one(port),
            }
        };
        eprintln!("   preloaded in {:.1}s", loaded.elapsed().as_secs_f64());
        backend
    }

    /// The hot keys, by master (see [`Ctx::hot`]).
    fn hot(&self, hot_keys: u64) -> Vec<Vec<u64>> {
        let mut hot = vec![Vec::new(); self.route.ports.len()];
        for n in 0..hot_keys {
            hot[self.route.index_of(&format!("key:{n}"))].push(n);
        }
        hot
    }

    /// stormwall's `[upstream]` for a cluster; `None` for one Redis.
    fn cluster_config(&self) -> Option<String> {
        match &self.servers {
            Servers::One { .. } => None,
            Servers::Cluster(c) => Some(common::cluster::stormwall_config(c)),
        }
    }
}

/// [`preload`] for a cluster: the same keys and values (`SET`s pipelined 10,000 at a time,
/// each master's from a thread of its own) and the same big hashes, each on its master.
fn preload_cluster(route: &Route, s: &Settings, hashes: &[redis::Pipeline]) {
    let mut by_master = vec![Vec::new(); route.ports.len()];
    for n in 0..s.keys {
        by_master[route.index_of(&format!("key:{n}"))].push(n);
    }
    thread::scope(|scope| {
        for (&port, keys) in route.ports.iter().zip(&by_master) {
            scope.spawn(move || {
                let mut c = connect(port).unwrap();
                for chunk in keys.chunks(10_000) {
                    let mut p = redis::pipe();
                    for &n in chunk {
                        p.cmd("SET").arg(format!("key:{n}")).arg(value(n)).ignore();
                    }
                    let _: () = p.query(&mut c).expect("preloading a master failed");
                }
            });
        }
    });
    let mut con = route.connect().unwrap();
    for (h, p) in hashes.iter().enumerate() {
        let _: () = p
            .query(con.to(&format!("hash:{h}")))
            .expect("building a big hash failed");
    }
    let n: u64 = con
        .cons
        .iter_mut()
        .map(|c| redis::cmd("DBSIZE").query::<u64>(c).unwrap())
        .sum();
    assert_eq!(n, s.keys + BIG_HASHES as u64, "preload incomplete");
}

/// The 30 groups of 10 keys the DEL storm deletes: the 8 big hashes in groups 0 and 15
/// (4 each, with 6 string keys), every other group 10 hot string keys.
fn del_groups() -> Vec<Vec<String>> {
    let mut strings = (0..).map(|i: u64| format!("key:{}", i * (HOT_KEYS / 292)));
    (0..DEL_GROUPS)
        .map(|g| {
            let mut keys = Vec::with_capacity(GROUP_SIZE);
            if g % (DEL_GROUPS / 2) == 0 {
                let first = if g == 0 { 0 } else { 4 };
                keys.extend((first..first + 4).map(|h| format!("hash:{h}")));
            }
            while keys.len() < GROUP_SIZE {
                keys.push(strings.next().unwrap());
            }
            keys
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Hit,
    Miss,
    Error,
}

#[derive(Clone, Copy)]
struct Read {
    /// Scheduled send time, seconds since the run's start.
    at: f32,
    /// Reply time minus scheduled send time, microseconds.
    lat_us: u32,
    outcome: Outcome,
}

/// Everything a run's threads share.
struct Ctx {
    /// Where clients send their commands: Redis or the cluster directly, or stormwall.
    target: Route,
    /// Redis or the cluster directly (checks, the rebuilder).
    redis: Route,
    /// The hot keys' numbers, one list per master serving them (one list for one Redis):
    /// reader `id` reads from list `id % len`, so that directly a reader needs one connection
    /// (to that master), and through stormwall reads the same keys.
    hot: Vec<Vec<u64>>,
    t0: Instant,
    tl: Timeline,
    fields: u64,
    nonce: u64,
    /// Storm clients send `FLUSHDB ASYNC` instead of `FLUSHDB`.
    flush_async: bool,
    /// Readers re-populate a miss on their own connection.
    same_conn: bool,
    /// Readers wait for each reply before the next command (a synchronous app).
    closed_loop: bool,
    /// Storm clients connect at their first request.
    late_connect: bool,
    /// Reads (and re-populates) go to `key:0` .. `key:{hot_keys - 1}`.
    hot_keys: u64,
}

impl Ctx {
    /// Reader `id`'s keys, and the port its connection goes to.
    fn reader_keys(&self, id: usize) -> (&[u64], u16) {
        let keys = &self.hot[id % self.hot.len()];
        (keys, self.target.port_of(&format!("key:{}", keys[0])))
    }
    fn storm_start(&self) -> Instant {
        self.t0 + self.tl.before
    }
    fn storm_end(&self) -> Instant {
        self.t0 + self.tl.before + self.tl.storm
    }
}

/// What one reader connection saw.
struct ReaderOut {
    reads: Vec<Read>,
    /// Re-populate `SET` pipelines that failed.
    populate_errors: u64,
    first_error: Option<String>,
}

impl ReaderOut {
    /// Records a read scheduled at `sched` (`at` seconds from the start).
    fn read(&mut self, sched: Instant, at: f32, outcome: Outcome) {
        self.reads.push(Read {
            at,
            lat_us: sched.elapsed().as_micros().min(u32::MAX as u128) as u32,
            outcome,
        });
    }

    /// Remembers the first failure: an error reply's text, or a lost connection.
    fn failed(&mut self, error: Option<String>) {
        if self.first_error.is_none() {
            self.first_error =
                Some(error.unwrap_or_else(|| "connection lost or unreadable reply".into()));
        }
    }

    /// Reads of the `n` scheduled (`rate` per second from `offset`) that the sender never got
    /// to send (its connection failed) are errors too.
    fn unsent(&mut self, n: u64, offset: f64, rate: f64) {
        for i in self.reads.len() as u64..n {
            self.reads.push(Read {
                at: (offset + i as f64 / rate) as f32,
                lat_us: 0,
                outcome: Outcome::Error,
            });
        }
    }
}

/// Reads one `GET` reply: `Ok(true)` a value, `Ok(false)` nil, `Err(Some(text))` an error
/// reply (the connection is still usable), `Err(None)` the connection failed.
/// Reads the reply to the `GET` scheduled at `sched` (`at` seconds in) and records it; a miss
/// is re-populated by `on_miss`. Once the connection is `broken`, every later read counts as an
/// error, and the connection is shut down so the sender's writes fail from then on.
fn read_one(
    replies: &mut std::io::BufReader<std::net::TcpStream>,
    out: &mut ReaderOut,
    broken: &mut bool,
    sched: Instant,
    at: f32,
    on_miss: impl FnOnce(),
) {
    let outcome = if *broken {
        Outcome::Error
    } else {
        match read_get_reply(replies) {
            Ok(true) => Outcome::Hit,
            Ok(false) => {
                on_miss();
                Outcome::Miss
            }
            Err(e) => {
                *broken = e.is_none();
                out.failed(e);
                Outcome::Error
            }
        }
    };
    out.read(sched, at, outcome);
    if *broken {
        let _ = replies.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

fn read_get_reply(r: &mut impl BufRead) -> Result<bool, Option<String>> {
    let mut line = Vec::new();
    match r.read_until(b'\n', &mut line) {
        Ok(0) => return Err(None),
        Ok(_) => {}
        Err(_) => return Err(None),
    }
    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
    match line.first() {
        Some(b'$') => match text[1..].parse::<i64>() {
            Ok(-1) => Ok(false),
            Ok(len) if len >= 0 => {
                let mut body = vec![0; len as usize + 2];
                r.read_exact(&mut body).map_err(|_| None)?;
                Ok(true)
            }
            _ => Err(None),
        },
        Some(b'-') => Err(Some(text)),
        _ => Err(None),
    }
}

/// A reader connection's schedule: its share of the read rate, how many reads it makes, and
/// where in the schedule it starts (the readers' schedules are spread evenly).
struct ReaderPlan {
    rate: f64,
    n: u64,
    offset: f64,
}

/// Reader `id`'s schedule, and its output, empty so far.
fn plan(ctx: &Ctx, id: usize) -> (ReaderPlan, ReaderOut) {
    let rate = READ_RATE / READ_CONNS as f64;
    let n = (ctx.tl.total().as_secs_f64() * rate) as u64;
    let offset = id as f64 / READ_CONNS as f64 / rate;
    let out = ReaderOut {
        reads: Vec::with_capacity(n as usize),
        populate_errors: 0,
        first_error: None,
    };
    (ReaderPlan { rate, n, offset }, out)
}

/// A raw connection to `port` for a reader that writes its own RESP.
fn raw_connection(port: u16) -> Result<std::net::TcpStream, String> {
    let stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    Ok(stream)
}

/// One reader connection, truly open loop: a sender thread writes each `GET` at its scheduled
/// time whatever is still unanswered (a slow reply never delays the next send), and this
/// thread reads the replies in order; latency is reply time minus scheduled time. A miss goes
/// to a re-populate thread (its own connection, pipelined `SET`s), as a cache-aside app's
/// database query and `SET` would.
fn reader(ctx: &Arc<Ctx>, id: usize) -> ReaderOut {
    if ctx.closed_loop {
        return reader_closed_loop(ctx, id);
    }
    if ctx.same_conn {
        return reader_same_conn(ctx, id);
    }
    let (ReaderPlan { rate, n, offset }, mut out) = plan(ctx, id);
    let port = ctx.reader_keys(id).1;
    let stream = match raw_connection(port) {
        Ok(s) => s,
        Err(e) => {
            out.first_error = Some(e);
            return out;
        }
    };
    let mut write_half = stream.try_clone().unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, f32, u64)>();
    let sender = {
        let ctx = ctx.clone();
        thread::spawn(move || {
            let mut rng = Rng::new(ctx.nonce ^ ((id as u64 + 1) * 7919));
            let keys = ctx.reader_keys(id).0;
            for i in 0..n {
                let at = offset + i as f64 / rate;
                let sched = ctx.t0 + Duration::from_secs_f64(at);
                sleep_until(sched);
                let key = keys[rng.below(keys.len() as u64) as usize];
                let k = format!("key:{key}");
                let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
                // Queued before it is sent, so the reply side always finds it.
                if tx.send((sched, at as f32, key)).is_err()
                    || write_half.write_all(cmd.as_bytes()).is_err()
                {
                    break;
                }
            }
        })
    };
    let (ptx, prx) = mpsc::channel::<u64>();
    let populater = thread::spawn(move || populate(port, prx));
    let mut replies = std::io::BufReader::with_capacity(1 << 16, stream);
    let mut broken = false;
    for (sched, at, key) in rx {
        read_one(&mut replies, &mut out, &mut broken, sched, at, || {
            let _ = ptx.send(key);
        });
    }
    out.unsent(n, offset, rate);
    drop(ptx);
    let _ = sender.join();
    out.populate_errors = populater.join().unwrap_or(0);
    out
}

/// What a reader connection expects next: a `GET`'s reply (scheduled at, seconds since the
/// start, key) or a re-populating `SET`'s.
enum Expect {
    Get(Instant, f32, u64),
    Set,
}

/// Like [`reader`], but a miss is re-populated on the reader's own connection: its `SET` is
/// written as soon as the miss is seen, between the `GET`s still scheduled (a cache-aside app
/// sharing one connection for its reads and writes).
fn reader_same_conn(ctx: &Arc<Ctx>, id: usize) -> ReaderOut {
    let (ReaderPlan { rate, n, offset }, mut out) = plan(ctx, id);
    let port = ctx.reader_keys(id).1;
    let stream = match raw_connection(port) {
        Ok(s) => s,
        Err(e) => {
            out.first_error = Some(e);
            return out;
        }
    };
    let (tx, rx) = mpsc::channel::<Expect>();
    // The expectation is queued and the command written under one lock, so the queue's
    // order is the connection's.
    let writer = Arc::new(std::sync::Mutex::new(Some((
        tx,
        stream.try_clone().unwrap(),
    ))));
    let send = |w: &std::sync::Mutex<Option<(mpsc::Sender<Expect>, std::net::TcpStream)>>,
                e: Expect,
                cmd: &[u8]| {
        let mut g = w.lock().unwrap();
        let ok = match g.as_mut() {
            Some((tx, s)) => tx.send(e).is_ok() && s.write_all(cmd).is_ok(),
            None => false,
        };
        if !ok {
            *g = None;
        }
        ok
    };
    let sender = {
        let (ctx, writer) = (ctx.clone(), writer.clone());
        thread::spawn(move || {
            let mut rng = Rng::new(ctx.nonce ^ ((id as u64 + 1) * 7919));
            let keys = ctx.reader_keys(id).0;
            for i in 0..n {
                let at = offset + i as f64 / rate;
                let sched = ctx.t0 + Duration::from_secs_f64(at);
                sleep_until(sched);
                let key = keys[rng.below(keys.len() as u64) as usize];
                let k = format!("key:{key}");
                let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
                if !send(&writer, Expect::Get(sched, at as f32, key), cmd.as_bytes()) {
                    break;
                }
            }
            // No more expectations after the last `GET`'s (and its `SET`'s, if any).
            writer.lock().unwrap().take();
        })
    };
    let mut replies = std::io::BufReader::with_capacity(1 << 16, stream);
    let mut broken = false;
    let mut line = Vec::new();
    for e in rx {
        let (sched, at, key) = match e {
            Expect::Set => {
                line.clear();
                if broken
                    || replies.read_until(b'\n', &mut line).is_err()
                    || !line.starts_with(b"+OK")
                {
                    out.populate_errors += 1;
                }
                continue;
            }
            Expect::Get(sched, at, key) => (sched, at, key),
        };
        read_one(&mut replies, &mut out, &mut broken, sched, at, || {
            let k = format!("key:{key}");
            let v = value(key);
            let mut cmd =
                format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n", k.len(), v.len()).into_bytes();
            cmd.extend_from_slice(&v);
            cmd.extend_from_slice(b"\r\n");
            send(&writer, Expect::Set, &cmd);
        });
    }
    out.unsent(n, offset, rate);
    let _ = sender.join();
    out
}

/// A reader connection as a synchronous cache-aside app uses it: at each scheduled time (or at
/// once, if late) a `GET`, its reply awaited; a miss is followed by a `SET` on the same
/// connection, awaited too, before the next `GET`. Latency is still from the scheduled time.
fn reader_closed_loop(ctx: &Arc<Ctx>, id: usize) -> ReaderOut {
    let (ReaderPlan { rate, n, offset }, mut out) = plan(ctx, id);
    let (keys, port) = ctx.reader_keys(id);
    let mut con = match connect(port) {
        Ok(c) => c,
        Err(e) => {
            out.first_error = Some(format!("connect: {e}"));
            return out;
        }
    };
    let mut rng = Rng::new(ctx.nonce ^ ((id as u64 + 1) * 7919));
    for i in 0..n {
        let at = offset + i as f64 / rate;
        let sched = ctx.t0 + Duration::from_secs_f64(at);
        sleep_until(sched);
        let key = keys[rng.below(keys.len() as u64) as usize];
        let k = format!("key:{key}");
        let outcome = match redis::cmd("GET").arg(&k).query::<Option<Vec<u8>>>(&mut con) {
            Ok(Some(_)) => Outcome::Hit,
            Ok(None) => Outcome::Miss,
            Err(e) => {
                out.first_error.get_or_insert_with(|| e.to_string());
                Outcome::Error
            }
        };
        out.read(sched, at as f32, outcome);
        if outcome == Outcome::Miss
            && redis::cmd("SET")
                .arg(&k)
                .arg(value(key))
                .query::<()>(&mut con)
                .is_err()
        {
            out.populate_errors += 1;
        }
    }
    out
}

/// Re-populates missed keys (`SET key:N value:N`), pipelining whatever has queued up.
fn populate(target: u16, rx: mpsc::Receiver<u64>) -> u64 {
    let mut con = connect(target).ok();
    let mut errors = 0;
    while let Ok(first) = rx.recv() {
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(format!("key:{first}"))
            .arg(value(first))
            .ignore();
        for k in rx.try_iter().take(511) {
            p.cmd("SET").arg(format!("key:{k}")).arg(value(k)).ignore();
        }
        let ok = con.as_mut().is_some_and(|c| p.query::<()>(c).is_ok());
        if !ok {
            errors += 1;
            con = connect(target).ok();
        }
    }
    errors
}

#[derive(Default)]
struct Tally {
    /// Invalidation requests sent, and keys named in them.
    sent: u64,
    keys: u64,
    /// Storm requests (invalidations, marker writes, checks, re-populates) that failed.
    failed: u64,
    first_error: Option<String>,
    /// Acknowledged invalidations whose marker was checked, and markers that survived.
    checked: u64,
    violations: u64,
    /// Invalidation acknowledgement latencies, ms.
    acks: Vec<f64>,
}

impl Tally {
    fn fail(&mut self, what: &str, e: impl std::fmt::Display) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }
    fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.keys += o.keys;
        self.failed += o.failed;
        self.first_error = self.first_error.take().or(o.first_error);
        self.checked += o.checked;
        self.violations += o.violations;
        self.acks.extend(o.acks);
    }
}

/// True if `key` still holds `marker` on `con` (a failed read counts as a failure, not a
/// violation).
fn survives(con: &mut redis::Connection, key: &str, marker: &str, t: &mut Tally) -> bool {
    match redis::cmd("GET").arg(key).query::<Option<String>>(con) {
        Ok(v) => v.as_deref() == Some(marker),
        Err(e) => {
            t.fail("GET (check)", e);
            false
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Storm {
    Flush,
    Del,
}

impl Storm {
    fn name(self) -> &'static str {
        match self {
            Storm::Flush => "FLUSHDB storm",
            Storm::Del => "DEL storm",
        }
    }
}

/// One storm connection: its schedule of "account updates" during the storm window.
fn storm_client(ctx: &Ctx, storm: Storm, c: usize, groups: &[Vec<String>]) -> Tally {
    let mut t = Tally::default();
    let rate = match storm {
        Storm::Flush => FLUSH_RATE,
        Storm::Del => DEL_RATE,
    } / STORM_CONNS as f64;
    let period = 1.0 / rate;
    let mut rng = Rng::new(ctx.nonce ^ ((1000 + c as u64) * 104_729));
    let phase = rng.unit() * period;
    if ctx.late_connect {
        sleep_until(ctx.storm_start() + Duration::from_secs_f64(phase));
    }
    let (mut con, mut direct) = match (ctx.target.connect(), ctx.redis.connect()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            t.fail("connect", e);
            return t;
        }
    };
    let end = ctx.storm_end();
    for k in 0.. {
        let sched = ctx.storm_start() + Duration::from_secs_f64(phase + k as f64 * period);
        if sched >= end || Instant::now() >= end {
            break;
        }
        sleep_until(sched);
        let marker = format!("m:{}:{c}:{k}", ctx.nonce);
        let (marker_key, keys) = match storm {
            Storm::Flush => (format!("marker:flush:{c}"), Vec::new()),
            Storm::Del => {
                let g = &groups[rng.below(DEL_GROUPS as u64) as usize];
                let first = g.iter().find(|k| k.starts_with("key:")).unwrap();
                (first.clone(), g.clone())
            }
        };
        if let Err(e) = redis::cmd("SET")
            .arg(&marker_key)
            .arg(&marker)
            .query::<()>(con.to(&marker_key))
        {
            t.fail("SET (marker)", e);
            con = match ctx.target.connect() {
                Ok(c) => c,
                Err(_) => continue,
            };
            continue;
        }
        let sent = Instant::now();
        t.sent += 1;
        t.keys += keys.len() as u64;
        let acked = match storm {
            Storm::Flush => con.flushdb(ctx.flush_async),
            Storm::Del => con.del(&keys).map(|n| (0..=keys.len() as i64).contains(&n)),
        };
        let ack_ms = sent.elapsed().as_secs_f64() * 1e3;
        match acked {
            Ok(sane) => {
                t.acks.push(ack_ms);
                t.checked += 1;
                // Straight to Redis first: the ack must mean "applied", not just "queued
                // ahead of this connection's next command".
                let gone = !survives(direct.to(&marker_key), &marker_key, &marker, &mut t)
                    && !survives(con.to(&marker_key), &marker_key, &marker, &mut t);
                if !gone || !sane {
                    t.violations += 1;
                }
            }
            Err(e) => {
                t.fail(
                    if storm == Storm::Flush {
                        "FLUSHDB"
                    } else {
                        "DEL"
                    },
                    e,
                );
                if let Ok(c) = ctx.target.connect() {
                    con = c;
                }
                continue;
            }
        }
        if storm == Storm::Flush {
            // The account update re-populates its settings.
            for _ in 0..REPOPULATE {
                let n = rng.below(ctx.hot_keys);
                let key = format!("key:{n}");
                if let Err(e) = redis::cmd("SET")
                    .arg(&key)
                    .arg(value(n))
                    .query::<()>(con.to(&key))
                {
                    t.fail("SET (re-populate)", e);
                }
            }
        }
    }
    t
}

/// Re-creates deleted or partial big hashes during the DEL storm (straight to Redis, in both
/// paths), one at a time, at most one per `REBUILD_GAP`. Returns how many it rebuilt.
fn rebuilder(ctx: &Ctx, hashes: &[redis::Pipeline]) -> u64 {
    let mut con = ctx.redis.connect().unwrap();
    let mut rebuilt = 0;
    sleep_until(ctx.storm_start());
    'outer: loop {
        let mut any = false;
        for (h, p) in hashes.iter().enumerate() {
            if Instant::now() >= ctx.storm_end() {
                break 'outer;
            }
            let key = format!("hash:{h}");
            let len: u64 = redis::cmd("HLEN")
                .arg(&key)
                .query(con.to(&key))
                .unwrap_or(0);
            if len < ctx.fields {
                let started = Instant::now();
                let _: redis::RedisResult<()> = p.query(con.to(&key));
                rebuilt += 1;
                any = true;
                sleep_until(started + REBUILD_GAP);
            }
        }
        if !any {
            thread::sleep(Duration::from_millis(10));
        }
    }
    rebuilt
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Clone)]
enum Via {
    Direct,
    /// Straight to Redis, each flush sent as `FLUSHDB ASYNC` (what stormwall sends by
    /// default): the fair comparison for stormwall's flushes, which Redis frees in the
    /// background either way.
    DirectAsync,
    /// stormwall; `Some(min_interval)`: with a config file setting only `flush.min_interval`.
    Stormwall(Option<&'static str>),
}

impl Via {
    fn name(&self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::DirectAsync => "direct, FLUSHDB ASYNC".into(),
            Via::Stormwall(None) => "stormwall".into(),
            Via::Stormwall(Some(m)) => format!("stormwall (flush.min_interval = {m})"),
        }
    }

    fn is_direct(&self) -> bool {
        !matches!(self, Via::Stormwall(_))
    }
}

struct RunResult {
    storm: Storm,
    via: Via,
    tl: Timeline,
    reads: Vec<Read>,
    tally: Tally,
    /// Redis's `INFO commandstats` once the storm's last request was answered.
    stats: BTreeMap<String, u64>,
    metrics: BTreeMap<String, f64>,
    rebuilt: u64,
    /// Cores used during the storm window.
    cpu: CpuUse,
    /// Cores used in each second of the timeline.
    cpu_per_second: Vec<CpuUse>,
    /// stormwall's counters' increase in each second of the timeline.
    counters_per_second: Vec<BTreeMap<String, f64>>,
    /// Run-queue wait (s) in each second: Redis's main thread, stormwall's threads.
    waits_per_second: Vec<(f64, f64)>,
    /// Readers' failed re-populate pipelines, and their first error.
    populate_errors: u64,
    reader_error: Option<String>,
    /// stormwall's log lines at warn and above.
    log_lines: Vec<String>,
    redis_version: String,
}

/// stormwall's config file for a run (empty: none, the defaults): `flush.min_interval` for the
/// tuning curve, `upstream.mode` when `STORMWALL_BENCH_UPSTREAM_MODE` is set, the cluster's
/// `[upstream]` (`cluster`) in front of a cluster, and last `STORMWALL_BENCH_STORMWALL_TOML`
/// (sections of its own, for investigating: e.g. `[invalidation]` with `adaptive = false`).
fn config_text(
    min_interval: Option<&str>,
    upstream_mode: Option<&str>,
    cluster: Option<&str>,
) -> String {
    let mut s = String::new();
    if let Some(upstream) = cluster {
        s.push_str(upstream);
        s.push('\n');
    } else if let Some(mode) = upstream_mode {
        s.push_str(&format!("[upstream]\nmode = \"{mode}\"\n\n"));
    }
    if let Some(min_interval) = min_interval {
        s.push_str(&format!("[flush]\nmin_interval = \"{min_interval}\"\n"));
        // flush.min_interval must stay below invalidation.max_wait (default 5s).
        if humantime::parse_duration(min_interval).unwrap() >= Duration::from_secs(5) {
            s.push_str("\n[invalidation]\nmax_wait = \"10s\"\n");
        }
    }
    if let Ok(extra) = std::env::var("STORMWALL_BENCH_STORMWALL_TOML") {
        s.push('\n');
        // A literal `\n` stands for a line break, so the variable fits the report's one-line
        // command.
        s.push_str(&extra.replace("\\n", "\n"));
        s.push('\n');
    }
    s
}

fn run(
    s: &Settings,
    storm: Storm,
    via: Via,
    tl: Timeline,
    hashes: &Arc<Vec<redis::Pipeline>>,
) -> RunResult {
    eprintln!("== {} via {} ...", storm.name(), via.name());
    let backend = Backend::start(s, hashes);
    let redis = backend.route.ports[0];
    let dir = tempfile::tempdir().unwrap();
    let sw = match via {
        Via::Direct | Via::DirectAsync => None,
        Via::Stormwall(mi) => {
            let text = config_text(
                mi,
                s.upstream_mode.as_deref(),
                backend.cluster_config().as_deref(),
            );
            let file = (!text.is_empty()).then(|| {
                let f = dir.path().join("stormwall.toml");
                std::fs::write(&f, text).unwrap();
                f
            });
            Some(stormwall(redis, file.as_deref(), dir.path()))
        }
    };
    for con in &mut backend.route.connect().unwrap().cons {
        let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(con).unwrap();
    }
    let hot_keys = std::env::var("STORMWALL_BENCH_HOT_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HOT_KEYS);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let ctx = Arc::new(Ctx {
        target: sw
            .as_ref()
            .map_or(backend.route.clone(), |w| Route::one(w.port)),
        redis: backend.route.clone(),
        hot: backend.hot(hot_keys),
        t0: Instant::now() + Duration::from_secs(1),
        tl,
        fields: s.fields,
        nonce,
        flush_async: matches!(via, Via::DirectAsync),
        same_conn: env_flag("STORMWALL_BENCH_SAME_CONN"),
        closed_loop: env_flag("STORMWALL_BENCH_CLOSED_LOOP"),
        late_connect: env_flag("STORMWALL_BENCH_LATE_CONNECT"),
        hot_keys,
    });
    let groups = Arc::new(del_groups());
    let readers: Vec<_> = (0..READ_CONNS)
        .map(|id| {
            let ctx = ctx.clone();
            thread::spawn(move || reader(&ctx, id))
        })
        .collect();
    let clients: Vec<_> = (0..STORM_CONNS)
        .map(|c| {
            let (ctx, groups) = (ctx.clone(), groups.clone());
            thread::spawn(move || storm_client(&ctx, storm, c, &groups))
        })
        .collect();
    let rebuild = (storm == Storm::Del).then(|| {
        let (ctx, hashes) = (ctx.clone(), hashes.clone());
        thread::spawn(move || rebuilder(&ctx, &hashes))
    });
    let cpu = {
        let ctx = ctx.clone();
        let redis_pids = backend.pids.clone();
        let sw_pid = sw.as_ref().map(|w| w.proc.0.id());
        let admin = sw.as_ref().map(|w| w.admin);
        thread::spawn(move || {
            // One sample per second of the timeline (the storm's edges are whole seconds),
            // and stormwall's counters.
            let mut counters = Vec::new();
            let mut waits = Vec::new();
            let samples: Vec<_> = (0..=ctx.tl.total().as_secs())
                .map(|i| {
                    sleep_until(ctx.t0 + Duration::from_secs(i));
                    let cpu = cpu_sample(&redis_pids, sw_pid);
                    waits.push((
                        redis_pids
                            .iter()
                            .map(|&p| run_queue_wait(p, true))
                            .sum::<f64>(),
                        sw_pid.map_or(0.0, |p| run_queue_wait(p, false)),
                    ));
                    counters.push(admin.map(stormwall_metrics).unwrap_or_default());
                    cpu
                })
                .collect();
            let (from, to) = (ctx.tl.before.as_secs() as usize, ctx.tl.storm_to() as usize);
            let storm = cpu_use(
                &redis_pids,
                &samples[from],
                &samples[to],
                ctx.tl.storm.as_secs_f64(),
            );
            let per_second = samples
                .windows(2)
                .map(|w| cpu_use(&redis_pids, &w[0], &w[1], 1.0))
                .collect::<Vec<_>>();
            let counters_per_second = counters
                .windows(2)
                .map(|w| {
                    w[1].iter()
                        .map(|(k, v)| (k.clone(), v - w[0].get(k).copied().unwrap_or(0.0)))
                        .collect()
                })
                .collect::<Vec<BTreeMap<String, f64>>>();
            let waits_per_second = waits
                .windows(2)
                .map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1))
                .collect::<Vec<_>>();
            (storm, per_second, counters_per_second, waits_per_second)
        })
    };
    let mut tally = Tally::default();
    for h in clients {
        tally.merge(h.join().unwrap());
    }
    let stats = backend.route.connect().unwrap().commandstats();
    let metrics = sw
        .as_ref()
        .map(|w| stormwall_metrics(w.admin))
        .unwrap_or_default();
    let rebuilt = rebuild.map_or(0, |h| h.join().unwrap());
    let (cpu, cpu_per_second, counters_per_second, waits_per_second) = cpu.join().unwrap();
    let mut reads = Vec::new();
    let mut populate_errors = 0;
    let mut reader_error = None;
    for h in readers {
        let o = h.join().unwrap();
        reads.extend(o.reads);
        populate_errors += o.populate_errors;
        reader_error = reader_error.or(o.first_error);
    }
    let log_lines = sw
        .as_ref()
        .map(|w| {
            std::fs::read_to_string(&w.log)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let redis_version = info_field(&mut connect(redis).unwrap(), "server", "redis_version");
    drop(sw);
    drop(backend);
    let r = RunResult {
        storm,
        via,
        tl,
        reads,
        tally,
        stats,
        metrics,
        rebuilt,
        cpu,
        cpu_per_second,
        counters_per_second,
        waits_per_second,
        populate_errors,
        reader_error,
        log_lines,
        redis_version,
    };
    let during = r.phase(1);
    eprintln!(
        "   storm: read p99 {:.2} ms, hit ratio {:.1}%, {} requests ({} failed), ack p50 {:.1} ms p99 {:.1} ms, violations {}",
        during.p99,
        during.hit_ratio() * 100.0,
        r.tally.sent,
        r.tally.failed,
        pct_f(&r.tally.acks, 0.5),
        pct_f(&r.tally.acks, 0.99),
        r.tally.violations
    );
    eprintln!(
        "   storm CPU (cores): redis main {:.2}, redis background {:.2}, stormwall {:.2}, bench {:.2}",
        r.cpu.redis_main, r.cpu.redis_bg, r.cpu.stormwall, r.cpu.bench
    );
    let seconds: Vec<String> = r.per_second().iter().map(|(_, st)| f2(st.p99)).collect();
    eprintln!("   read p99 per second (ms): {}", seconds.join(" "));
    let cores = |f: fn(&CpuUse) -> f64| {
        r.cpu_per_second
            .iter()
            .map(|c| format!("{:.2}", f(c)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "   cores per second, redis main: {}",
        cores(|c| c.redis_main)
    );
    eprintln!(
        "   cores per second, redis background: {}",
        cores(|c| c.redis_bg)
    );
    eprintln!("   cores per second, stormwall: {}", cores(|c| c.stormwall));
    eprintln!("   cores per second, bench: {}", cores(|c| c.bench));
    let waits = |f: fn(&(f64, f64)) -> f64| {
        r.waits_per_second
            .iter()
            .map(|w| format!("{:.0}", f(w) * 1e3))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "   run-queue wait per second (ms), redis main: {}",
        waits(|w| w.0)
    );
    eprintln!(
        "   run-queue wait per second (ms), stormwall: {}",
        waits(|w| w.1)
    );
    // The shield's own account at the end of the run (counters and gauges, summed over labels).
    for (name, v) in r
        .metrics
        .iter()
        .filter(|(n, _)| n.starts_with("stormwall_invalidation") || n.contains("cluster"))
    {
        eprintln!("   at the end: {name} {v}");
    }
    if r.counters_per_second.iter().any(|c| !c.is_empty()) {
        for name in SECOND_COUNTERS {
            let v: Vec<String> = r
                .counters_per_second
                .iter()
                .map(|c| format!("{:.0}", c.get(*name).copied().unwrap_or(0.0)))
                .collect();
            eprintln!("   {name} per second: {}", v.join(" "));
        }
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Statistics

#[derive(Default)]
struct PhaseStats {
    reads: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    hits: usize,
    misses: usize,
    errors: usize,
}

impl PhaseStats {
    fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn pct_sorted<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn pct_f(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    pct_sorted(&v, q).unwrap_or(f64::NAN)
}

fn stats_of(reads: impl Iterator<Item = Read>) -> PhaseStats {
    let mut lat = Vec::new();
    let mut st = PhaseStats::default();
    for r in reads {
        st.reads += 1;
        match r.outcome {
            Outcome::Hit => st.hits += 1,
            Outcome::Miss => st.misses += 1,
            Outcome::Error => {
                st.errors += 1;
                continue;
            }
        }
        lat.push(r.lat_us);
    }
    lat.sort_unstable();
    let ms = |q: f64| pct_sorted(&lat, q).map_or(f64::NAN, |us| us as f64 / 1e3);
    st.p50 = ms(0.5);
    st.p99 = ms(0.99);
    st.p999 = ms(0.999);
    st.max = ms(1.0);
    st
}

impl RunResult {
    /// Phase 0: before the storm, 1: during, 2: after.
    fn phase(&self, phase: usize) -> PhaseStats {
        let edges = [0.0, self.tl.storm_from(), self.tl.storm_to(), f64::INFINITY];
        let (from, to) = (edges[phase], edges[phase + 1]);
        stats_of(
            self.reads
                .iter()
                .copied()
                .filter(|r| (r.at as f64) >= from && (r.at as f64) < to),
        )
    }

    /// Reads scheduled in each whole second of the timeline: (second, stats).
    fn per_second(&self) -> Vec<(usize, PhaseStats)> {
        let secs = self.tl.total().as_secs_f64().ceil() as usize;
        let mut buckets: Vec<Vec<Read>> = vec![Vec::new(); secs];
        for r in &self.reads {
            buckets[(r.at.max(0.0) as usize).min(secs - 1)].push(*r);
        }
        buckets
            .into_iter()
            .enumerate()
            .map(|(i, b)| (i, stats_of(b.into_iter())))
            .collect()
    }

    /// The storm window's worst one-second read p99: (second, ms).
    fn worst_storm_second(&self) -> (usize, f64) {
        self.per_second()
            .into_iter()
            .filter(|(i, _)| {
                (*i as f64) >= self.tl.storm_from() && (*i as f64) < self.tl.storm_to()
            })
            .map(|(i, st)| (i, st.p99))
            .filter(|(_, p)| !p.is_nan())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, f64::NAN))
    }

    fn stat(&self, name: &str) -> u64 {
        self.stats.get(name).copied().unwrap_or(0)
    }

    fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).copied()
    }

    fn achieved_rate(&self) -> f64 {
        self.tally.sent as f64 / self.tl.storm.as_secs_f64()
    }

    /// p99 read latency per time bucket: (bucket middle, ms).
    fn timeline(&self) -> Vec<(f64, f64)> {
        let n = (self.tl.total().as_secs_f64() / BUCKET_SECS).ceil() as usize;
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); n];
        for r in &self.reads {
            if r.outcome != Outcome::Error {
                let b = ((r.at as f64 / BUCKET_SECS) as usize).min(n - 1);
                buckets[b].push(r.lat_us);
            }
        }
        buckets
            .into_iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(i, mut b)| {
                b.sort_unstable();
                let p = pct_sorted(&b, 0.99).unwrap() as f64 / 1e3;
                ((i as f64 + 0.5) * BUCKET_SECS, p)
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Report

/// A command's output, trimmed, or empty if it could not be run.
fn sh(cmd: &str, args: &[&str]) -> String {
    stdout_of(cmd, args).unwrap_or_default()
}

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

fn report(
    s: &Settings,
    main: &[RunResult],
    curve: &[(f64, RunResult)],
    started: Instant,
    load_start: &str,
) -> String {
    let mut o = String::new();
    let w = &mut o;
    let version = main.first().map_or("?", |r| r.redis_version.as_str());
    let commit = sh("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !sh("git", &["status", "--porcelain", "--", "src"]).is_empty();
    writeln!(
        w,
        "# Incident replay: an invalidation storm under steady reads{}\n",
        if s.cluster {
            ", in front of a Redis Cluster"
        } else {
            ""
        }
    )
    .unwrap();
    writeln!(
        w,
        "Command: `{}` — run {} ({:.0} s), stormwall {}{}, redis-server {version}.  ",
        common::bench_command(
            "storm",
            &[
                "STORMWALL_BENCH_CLUSTER",
                "STORMWALL_BENCH_QUICK",
                "STORMWALL_BENCH_ONLY",
                "STORMWALL_BENCH_UPSTREAM_MODE",
                "STORMWALL_BENCH_SAME_CONN",
                "STORMWALL_BENCH_CLOSED_LOOP",
                "STORMWALL_BENCH_LATE_CONNECT",
                "STORMWALL_BENCH_HOT_KEYS",
                "STORMWALL_BENCH_BIN",
                "STORMWALL_BENCH_STORMWALL_TOML",
            ]
        ),
        utc_date().unwrap_or_default(),
        started.elapsed().as_secs_f64(),
        commit,
        if dirty {
            " (with uncommitted changes in src/)"
        } else {
            ""
        },
    )
    .unwrap();
    writeln!(
        w,
        "Machine: {} cores ({}), {}, {}; load average (1 min) {} at the start, {} at the end of the run.\n",
        sh("nproc", &[]),
        cpu_model().unwrap_or_else(|| "?".into()),
        sh(
            "sh",
            &[
                "-c",
                "awk '/MemTotal/ {printf \"%.0f GiB RAM\", $2/1048576}' /proc/meminfo"
            ]
        ),
        sh("uname", &["-sr"]),
        load_start,
        load_average(),
    )
    .unwrap();
    if s.quick {
        writeln!(w, "**Quick smoke run** (STORMWALL_BENCH_QUICK=1): smaller keyspace and shorter phases; not the numbers to quote.\n").unwrap();
    }
    let tl = s.main;
    writeln!(
        w,
        "Scenario (same for both paths, each run on a freshly started and preloaded {}, \
         stormwall started fresh with its default config): {} string keys of {VALUE_SIZE} B{} plus \
         {BIG_HASHES} hashes of {} fields; {READ_CONNS} reader connections doing {READ_RATE:.0} `GET`/s \
         open loop over the {HOT_KEYS} hottest keys, latency from each read's scheduled send time (truly open loop: sends never wait for replies), a miss \
         re-populated with `SET` (cache-aside, pipelined on a second connection per reader); timeline {}s before, {}s storm, {}s after. \
         Storms from {STORM_CONNS} connections: **FLUSHDB storm** ~{FLUSH_RATE:.0} account updates/s, each \
         `SET` marker, `FLUSHDB`, check, re-populate {REPOPULATE} keys; **DEL storm** ~{DEL_RATE:.0} `DEL`/s, each of \
         one of {DEL_GROUPS} groups of {GROUP_SIZE} keys out of the same 300 (the {BIG_HASHES} big hashes in two groups of 4), \
         with the big hashes re-created in the background during the storm (straight to Redis, in both paths, \
         at most one per {} ms). Details: the doc comment of `benches/storm.rs`.\n",
        if s.cluster {
            "cluster"
        } else {
            "`redis-server`"
        },
        s.keys,
        if s.cluster { "" } else { " (`DEBUG POPULATE`)" },
        s.fields,
        tl.before.as_secs(),
        tl.storm.as_secs(),
        tl.after.as_secs(),
        REBUILD_GAP.as_millis(),
    )
    .unwrap();
    if s.cluster {
        writeln!(
            w,
            "**In front of a Redis Cluster** (`STORMWALL_BENCH_CLUSTER=1`): each run starts a fresh \
             cluster of {} masters, no replicas (`tests/common/cluster.rs`, through \
             `benches/common/cluster.rs`), preloaded with the same keys and values, each on its slot's master \
             (pipelined `SET`s: `DEBUG POPULATE` ignores slots); stormwall in front of it with \
             `[upstream] kind = \"cluster\"` (every node a seed, shared mode, defaults otherwise). \
             Directly, the clients are cluster-aware: a reader reads only keys of one master, on \
             one connection to it (reader i: master i mod {0}, so {READ_CONNS} readers load the \
             masters 3:3:2; through stormwall the readers read the very same keys); a storm \
             client has a connection to every master and sends each key's command to its master, \
             a flush as `FLUSHDB` to every master in turn (acknowledged once all have answered), \
             a `DEL` of a group as one `DEL` per slot (Redis Cluster refuses a `DEL` whose keys \
             span slots), those of one master pipelined, as redis-py's and Lettuce's cluster \
             clients split it. Redis figures (commands, CPU) are the masters' together. \
             No tuning curve.\n",
            common::cluster::MASTERS,
        )
        .unwrap();
    }

    writeln!(w, "## Summary\n").unwrap();
    writeln!(w, "| storm | path | read p99 before (ms) | read p99 during (ms) | worst second's read p99 during (ms) | during / before | hit ratio during | ack p50 / p99 (ms) | invalidations sent → at Redis | failed storm requests | violations |").unwrap();
    writeln!(
        w,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    .unwrap();
    for r in main {
        let (b, d) = (r.phase(0), r.phase(1));
        let at_redis = r.stat("del") + r.stat("unlink") + r.stat("flushdb") + r.stat("flushall");
        let (worst_at, worst) = r.worst_storm_second();
        writeln!(
            w,
            "| {} | {} | {} | **{}** | {} (s {worst_at}) | {:.1}× | {:.1}% | {} / {} | {} → {} | {} | **{}** |",
            r.storm.name(),
            r.via.name(),
            f2(b.p99),
            f2(d.p99),
            f2(worst),
            d.p99 / b.p99,
            d.hit_ratio() * 100.0,
            f2(pct_f(&r.tally.acks, 0.5)),
            f2(pct_f(&r.tally.acks, 0.99)),
            r.tally.sent,
            at_redis,
            r.tally.failed,
            r.tally.violations,
        )
        .unwrap();
    }
    writeln!(w).unwrap();
    writeln!(
        w,
        "![read latency over time]({}_latency.png)\n",
        s.report_name()
    )
    .unwrap();

    writeln!(
        w,
        "## Read latency (ms, from the scheduled send time) and cache hit ratio\n"
    )
    .unwrap();
    writeln!(
        w,
        "| storm | path | phase | reads | p50 | p99 | p99.9 | max | hit ratio | read errors |"
    )
    .unwrap();
    writeln!(
        w,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    .unwrap();
    for r in main {
        for (i, phase) in ["before", "**during**", "after"].iter().enumerate() {
            let p = r.phase(i);
            writeln!(
                w,
                "| {} | {} | {phase} | {} | {} | {} | {} | {} | {:.1}% | {} |",
                r.storm.name(),
                r.via.name(),
                p.reads,
                f2(p.p50),
                f2(p.p99),
                f2(p.p999),
                f2(p.max),
                p.hit_ratio() * 100.0,
                p.errors
            )
            .unwrap();
        }
    }

    per_second_tables(w, main);

    for r in main.iter().chain(curve.iter().map(|(_, r)| r)) {
        if r.populate_errors > 0 || r.reader_error.is_some() {
            writeln!(
                w,
                "\n{} via {}: {} failed re-populate pipelines; first reader error: {}",
                r.storm.name(),
                r.via.name(),
                r.populate_errors,
                r.reader_error.as_deref().unwrap_or("–")
            )
            .unwrap();
        }
    }
    writeln!(w, "\nCPU used during the storm window (cores; the machine has {}): Redis's main thread, Redis's background threads (lazy free), stormwall, and this benchmark's clients; and how long Redis's main thread and stormwall waited for a CPU while runnable (per second of the storm: other work on the machine, this run's included).\n", sh("nproc", &[])).unwrap();
    writeln!(
        w,
        "| storm | path | Redis main | Redis background | stormwall | bench clients | run-queue wait, Redis main (ms/s) | run-queue wait, stormwall (ms/s) |"
    )
    .unwrap();
    writeln!(w, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |").unwrap();
    for r in main {
        let c = r.cpu;
        let (from, to) = (r.tl.storm_from() as usize, r.tl.storm_to() as usize);
        let storm_waits = r.waits_per_second.get(from..to).unwrap_or(&[]);
        let wait = |f: fn(&(f64, f64)) -> f64| {
            storm_waits.iter().map(f).sum::<f64>() / storm_waits.len().max(1) as f64 * 1e3
        };
        writeln!(
            w,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
            r.storm.name(),
            r.via.name(),
            c.redis_main,
            c.redis_bg,
            c.stormwall,
            c.bench,
            wait(|w| w.0),
            if r.via.is_direct() {
                "–".to_owned()
            } else {
                format!("{:.0}", wait(|w| w.1))
            },
        )
        .unwrap();
    }
    writeln!(
        w,
        "\n## Storm requests: acknowledgement latency, failures, verification\n"
    )
    .unwrap();
    writeln!(w, "Ack latency is what an account update waits for its `FLUSHDB`/`DEL`. A violation is an acknowledged invalidation after which the marker written (and acknowledged) before it was still readable — straight from Redis or on the client's own connection — or a `DEL` count outside 0..=keys.\n").unwrap();
    writeln!(w, "| storm | path | requests | achieved rate (/s) | failed | ack p50 (ms) | ack p99 (ms) | ack max (ms) | checked | violations | first error |").unwrap();
    writeln!(
        w,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    .unwrap();
    for r in main {
        let t = &r.tally;
        writeln!(
            w,
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | **{}** | {} |",
            r.storm.name(),
            r.via.name(),
            t.sent,
            r.achieved_rate(),
            t.failed,
            f2(pct_f(&t.acks, 0.5)),
            f2(pct_f(&t.acks, 0.99)),
            f2(pct_f(&t.acks, 1.0)),
            t.checked,
            t.violations,
            t.first_error.as_deref().unwrap_or("–").replace('|', "\\|"),
        )
        .unwrap();
    }

    writeln!(
        w,
        "\n## Invalidations: sent by clients vs received by Redis\n"
    )
    .unwrap();
    writeln!(w, "Commands at Redis are from its own `INFO commandstats` (reset after the preload). Keys in delete commands at Redis: direct, every client `DEL` reaches Redis as sent; through stormwall, its `stormwall_invalidation_keys_sent_total`.\n").unwrap();
    writeln!(w, "| storm | path | client requests | keys named by clients | `DEL` at Redis | `UNLINK` at Redis | `FLUSHDB` at Redis | `MULTI`/`EXEC` at Redis | keys in deletes at Redis | big hashes re-created |").unwrap();
    writeln!(
        w,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    .unwrap();
    for r in main {
        let keys_at_redis = match (r.storm, &r.via) {
            (Storm::Flush, _) => "–".to_owned(),
            (Storm::Del, Via::Direct | Via::DirectAsync) => r.tally.keys.to_string(),
            (Storm::Del, Via::Stormwall(_)) => r
                .metric("stormwall_invalidation_keys_sent_total")
                .map_or("?".into(), |v| format!("{v:.0}")),
        };
        writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} |",
            r.storm.name(),
            r.via.name(),
            r.tally.sent,
            if r.storm == Storm::Del {
                r.tally.keys.to_string()
            } else {
                "–".into()
            },
            r.stat("del"),
            r.stat("unlink"),
            r.stat("flushdb"),
            r.stat("multi"),
            r.stat("exec"),
            keys_at_redis,
            if r.storm == Storm::Del {
                r.rebuilt.to_string()
            } else {
                "–".into()
            },
        )
        .unwrap();
    }

    if curve.is_empty() {
        return tail(o, main, curve);
    }
    writeln!(
        w,
        "\n## Tuning curve: `flush.min_interval` under the FLUSHDB storm\n"
    )
    .unwrap();
    writeln!(
        w,
        "Each point: a fresh Redis and a fresh stormwall with a config file holding only `[flush] min_interval` \
         (and, for 5s, `[invalidation] max_wait = \"10s\"`, as min_interval must stay below max_wait); timeline {}s \
         before, {}s FLUSHDB storm, {}s after. Hit ratio and read p99 are over the storm window. The direct row is \
         the main run above (its storm window is {}s). Each of the 32 storm connections waits for its flush before its \
         next account update, so once the flush wait exceeds the 1.6 s between a connection's updates the offered \
         rate falls below 20/s (the achieved rate column).\n",
        s.curve.before.as_secs(),
        s.curve.storm.as_secs(),
        s.curve.after.as_secs(),
        s.main.storm.as_secs(),
    )
    .unwrap();
    writeln!(w, "![tuning curve](storm_curve.png)\n").unwrap();
    writeln!(w, "| flush.min_interval | FLUSHDB sent | achieved rate (/s) | FLUSHDB at Redis | hit ratio during storm | flush ack p50 (ms) | flush ack p99 (ms) | read p99 during storm (ms) | failed | violations |").unwrap();
    writeln!(
        w,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    .unwrap();
    let direct = main
        .iter()
        .find(|r| r.storm == Storm::Flush && matches!(r.via, Via::Direct));
    let rows = direct
        .map(|r| ("direct (no stormwall)".to_owned(), r))
        .into_iter()
        .chain(curve.iter().map(|(_, r)| {
            let Via::Stormwall(Some(m)) = r.via else {
                unreachable!()
            };
            (
                format!("{m}{}", if m == "1s" { " (default)" } else { "" }),
                r,
            )
        }));
    for (name, r) in rows {
        let d = r.phase(1);
        writeln!(
            w,
            "| {name} | {} | {:.1} | {} | {:.1}% | {} | {} | {} | {} | {} |",
            r.tally.sent,
            r.achieved_rate(),
            r.stat("flushdb"),
            d.hit_ratio() * 100.0,
            f2(pct_f(&r.tally.acks, 0.5)),
            f2(pct_f(&r.tally.acks, 0.99)),
            f2(d.p99),
            r.tally.failed,
            r.tally.violations,
        )
        .unwrap();
    }

    tail(o, main, curve)
}

/// The end of the report: stormwall's warnings, if any.
fn tail(mut o: String, main: &[RunResult], curve: &[(f64, RunResult)]) -> String {
    let w = &mut o;
    let logs: Vec<_> = main
        .iter()
        .chain(curve.iter().map(|(_, r)| r))
        .filter(|r| !r.log_lines.is_empty())
        .collect();
    if !logs.is_empty() {
        writeln!(w, "\n## stormwall warnings during the runs\n").unwrap();
        for r in logs {
            writeln!(
                w,
                "- {} via {}: {} lines, first: `{}`",
                r.storm.name(),
                r.via.name(),
                r.log_lines.len(),
                r.log_lines[0].replace('`', "'")
            )
            .unwrap();
        }
    }
    o
}

/// Per storm, one row per second of the timeline: each path's read p50 / p99 / max and hit
/// ratio, so that a transient a whole-window p99 would average away shows.
fn per_second_tables(w: &mut String, main: &[RunResult]) {
    writeln!(
        w,
        "\n## Read latency per second (ms, from the scheduled send time)\n"
    )
    .unwrap();
    writeln!(w, "Each cell: p50 / **p99** / max of the reads scheduled in that second, and the hit ratio. Seconds in the storm window are marked ⚡. The last column (FLUSHDB storm) is stormwall's p99 over that of `FLUSHDB ASYNC` sent straight to Redis at the same rate, in the same run.\n").unwrap();
    for storm in [Storm::Flush, Storm::Del] {
        let runs: Vec<_> = main.iter().filter(|r| r.storm == storm).collect();
        let Some(first) = runs.first() else { continue };
        let tl = first.tl;
        let sw = runs.iter().position(|r| !r.via.is_direct());
        let asy = runs.iter().position(|r| matches!(r.via, Via::DirectAsync));
        let ratio = sw.zip(asy);
        writeln!(w, "### {}\n", storm.name()).unwrap();
        let mut head = "| s |".to_owned();
        let mut rule = "| ---: |".to_owned();
        for r in &runs {
            head.push_str(&format!(" {} |", r.via.name()));
            rule.push_str(" ---: |");
        }
        if ratio.is_some() {
            head.push_str(" stormwall p99 / direct ASYNC p99 |");
            rule.push_str(" ---: |");
        }
        writeln!(w, "{head}\n{rule}").unwrap();
        let columns: Vec<_> = runs.iter().map(|r| r.per_second()).collect();
        for i in 0..tl.total().as_secs() as usize {
            let storming = (i as f64) >= tl.storm_from() && (i as f64) < tl.storm_to();
            let mut row = format!("| {i}{} |", if storming { " ⚡" } else { "" });
            for c in &columns {
                match c.get(i) {
                    Some((_, st)) if st.reads > 0 => row.push_str(&format!(
                        " {} / **{}** / {} · {:.0}% |",
                        f2(st.p50),
                        f2(st.p99),
                        f2(st.max),
                        st.hit_ratio() * 100.0
                    )),
                    _ => row.push_str(" – |"),
                }
            }
            if let Some((s, a)) = ratio {
                let (p, q) = (
                    columns[s].get(i).map_or(f64::NAN, |c| c.1.p99),
                    columns[a].get(i).map_or(f64::NAN, |c| c.1.p99),
                );
                row.push_str(&format!(" {:.2}× |", p / q));
            }
            writeln!(w, "{row}").unwrap();
        }
        writeln!(w).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Plots

mod plot {
    use super::*;
    use plotters::prelude::*;

    type Res = Result<(), Box<dyn std::error::Error>>;

    const DIRECT: RGBColor = RGBColor(214, 39, 40);
    const SW: RGBColor = RGBColor(31, 119, 180);
    const DIRECT_ASYNC: RGBColor = RGBColor(255, 127, 14);

    pub fn latency(main: &[RunResult], path: &Path) -> Res {
        let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let storms: Vec<Storm> = [Storm::Flush, Storm::Del]
            .into_iter()
            .filter(|s| main.iter().any(|r| r.storm == *s))
            .collect();
        let panels = root.split_evenly((storms.len().max(1), 1));
        for (panel, storm) in panels.iter().zip(storms) {
            let runs: Vec<_> = main.iter().filter(|r| r.storm == storm).collect();
            let Some(first) = runs.first() else { continue };
            let tl = first.tl;
            let series: Vec<_> = runs.iter().map(|r| (r, r.timeline())).collect();
            let ymax = series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|p| p.1))
                .fold(1.0f64, f64::max)
                * 2.0;
            let ymin = series
                .iter()
                .flat_map(|(_, s)| s.iter().map(|p| p.1))
                .fold(f64::INFINITY, f64::min)
                .clamp(0.01, 0.1)
                / 2.0;
            let total = tl.total().as_secs_f64();
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!(
                        "{}: read latency p99 per {} ms (from scheduled send), log scale",
                        storm.name(),
                        (BUCKET_SECS * 1e3) as u32
                    ),
                    ("sans-serif", 22),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..total, (ymin..ymax).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("time (s)")
                .y_desc("read p99 (ms)")
                .y_label_formatter(&|v| {
                    if *v >= 1.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.2}")
                    }
                })
                .label_style(("sans-serif", 15))
                .axis_desc_style(("sans-serif", 17))
                .draw()?;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(tl.storm_from(), ymin), (tl.storm_to(), ymax)],
                    RGBColor(255, 200, 0).mix(0.18).filled(),
                )))?
                .label("storm window")
                .legend(|(x, y)| {
                    Rectangle::new(
                        [(x, y - 6), (x + 20, y + 6)],
                        RGBColor(255, 200, 0).mix(0.3).filled(),
                    )
                });
            for (r, s) in &series {
                let color = match r.via {
                    Via::Direct => DIRECT,
                    Via::DirectAsync => DIRECT_ASYNC,
                    Via::Stormwall(_) => SW,
                };
                let p99 = r.phase(1).p99;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        s.clone(),
                        color.stroke_width(2),
                    )))?
                    .label(format!("{} (storm p99 {} ms)", r.via.name(), f2(p99)))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    pub fn curve(curve: &[(f64, RunResult)], direct: Option<&RunResult>, path: &Path) -> Res {
        let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
        root.fill(&WHITE)?;
        let pts: Vec<(f64, f64, f64, f64)> = curve
            .iter()
            .map(|(x, r)| {
                (
                    *x,
                    r.phase(1).hit_ratio() * 100.0,
                    pct_f(&r.tally.acks, 0.5) / 1e3,
                    pct_f(&r.tally.acks, 0.99) / 1e3,
                )
            })
            .collect();
        let ack_max = pts
            .iter()
            .map(|p| p.3)
            .filter(|v| v.is_finite())
            .fold(1.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "FLUSHDB storm through stormwall: hit ratio and flush ack latency vs flush.min_interval",
                ("sans-serif", 21),
            )
            .margin(14)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(
                (0.2f64..6.5)
                    .log_scale()
                    .with_key_points(CURVE.iter().map(|c| c.0).collect()),
                0f64..100.0,
            )?
            .set_secondary_coord((0.2f64..6.5).log_scale(), 0f64..ack_max);
        chart
            .configure_mesh()
            .x_desc("flush.min_interval (s, log scale)")
            .y_desc("hit ratio during storm (%)")
            .x_label_formatter(&|v| format!("{v}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("flush ack latency (s)")
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 17))
            .draw()?;
        let green = RGBColor(44, 160, 44);
        let hits: Vec<_> = pts.iter().map(|p| (p.0, p.1)).collect();
        chart
            .draw_series(std::iter::once(PathElement::new(
                hits.clone(),
                green.stroke_width(3),
            )))?
            .label("hit ratio (%, left)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(3))
            });
        chart.draw_series(hits.iter().map(|&p| Circle::new(p, 5, green.filled())))?;
        if let Some(d) = direct {
            let h = d.phase(1).hit_ratio() * 100.0;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.2, h), (6.5, h)],
                    DIRECT.stroke_width(1),
                )))?
                .label(format!("direct hit ratio ({h:.1}%)"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], DIRECT));
        }
        for (i, (name, color)) in [
            ("flush ack p50 (s, right)", SW),
            ("flush ack p99 (s, right)", RGBColor(148, 103, 189)),
        ]
        .into_iter()
        .enumerate()
        {
            let line: Vec<_> = pts
                .iter()
                .map(|p| (p.0, if i == 0 { p.2 } else { p.3 }))
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_secondary_series(std::iter::once(PathElement::new(
                    line.clone(),
                    color.stroke_width(2),
                )))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_secondary_series(
                line.into_iter()
                    .map(move |p| TriangleMarker::new(p, 6, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let started = Instant::now();
    let load_start = load_average();
    let s = Settings::from_env();
    let hashes: Arc<Vec<redis::Pipeline>> = Arc::new(
        (0..BIG_HASHES)
            .map(|h| hash_pipeline(h, s.fields))
            .collect(),
    );
    // STORMWALL_BENCH_ONLY: run a part only (e.g. "del,stormwall" or "curve"), for
    // investigating; the report then goes to stdout only and results/ is left alone.
    let only: Option<Vec<String>> = std::env::var("STORMWALL_BENCH_ONLY")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.split(',').map(|t| t.trim().to_lowercase()).collect());
    let wants = |t: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == t));
    let wants_path = |t: &str| {
        only.as_ref().is_none_or(|o| {
            o.iter().any(|x| x == t)
                || !o
                    .iter()
                    .any(|x| x == "direct" || x == "async" || x == "stormwall")
        })
    };
    let mut main_runs = Vec::new();
    for (storm, token) in [(Storm::Flush, "flush"), (Storm::Del, "del")] {
        for (via, path) in [
            (Via::Direct, "direct"),
            (Via::DirectAsync, "async"),
            (Via::Stormwall(None), "stormwall"),
        ] {
            // `FLUSHDB ASYNC` is a FLUSHDB storm's path only.
            let applies = storm == Storm::Flush || !matches!(via, Via::DirectAsync);
            if applies && wants(token) && wants_path(path) {
                main_runs.push(run(&s, storm, via, s.main, &hashes));
            }
        }
    }
    // The tuning curve is one Redis's (a cluster's flushes are spaced per master alike).
    let curve: Vec<(f64, RunResult)> = CURVE
        .iter()
        .filter(|_| wants("curve") && !s.cluster)
        .map(|&(x, m)| {
            (
                x,
                run(&s, Storm::Flush, Via::Stormwall(Some(m)), s.curve, &hashes),
            )
        })
        .collect();
    // A partial or quick run leaves results/ alone.
    let out = if only.is_some() || s.quick {
        std::env::temp_dir().join("stormwall-storm-partial")
    } else {
        results_dir()
    };
    std::fs::create_dir_all(&out).unwrap();
    let md = report(&s, &main_runs, &curve, started, &load_start);
    let name = s.report_name();
    std::fs::write(out.join(format!("{name}.md")), &md).unwrap();
    print!("{md}");
    match register_font() {
        Ok(()) => {
            let latency = format!("{name}_latency.png");
            if let Err(e) = plot::latency(&main_runs, &out.join(&latency)) {
                eprintln!("{latency}: {e}");
            }
            let direct = main_runs
                .iter()
                .find(|r| r.storm == Storm::Flush && matches!(r.via, Via::Direct));
            if !curve.is_empty()
                && let Err(e) = plot::curve(&curve, direct, &out.join("storm_curve.png"))
            {
                eprintln!("storm_curve.png: {e}");
            }
        }
        Err(e) => eprintln!("no plots: {e}"),
    }
    eprintln!(
        "wrote {}/{name}.md and plots in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
}
