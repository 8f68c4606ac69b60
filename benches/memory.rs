//! What stormwall's connections cost, in each upstream mode (`upstream.mode = "dedicated"`:
//! one Redis connection per client; `"shared"`: clients multiplexed onto a few, issue 9):
//! its resident set (`VmRSS` in `/proc/PID/status`) idle, with 10,000 idle client
//! connections, and under pipelined load; and how many connections Redis sees from it.
//!
//! Run: `cargo bench --bench memory` (about 2 minutes). Writes `results/memory.md`.
//! `STORMWALL_BENCH_CONNECTIONS=N` changes the number of idle connections;
//! `STORMWALL_BENCH_QUICK=1` opens 2,000 and shortens the load runs (for checking that the
//! bench works; the report is still written).
//!
//! Method, per mode, each with a fresh stormwall (default config but `upstream.mode` and
//! `--max-clients 20000`) in front of one Redis:
//! * Idle: stormwall's RSS after it settles, and the connections Redis counts
//!   (`INFO clients` `connected_clients`, minus the bench's own, counted before stormwall
//!   started); then N client connections are opened, each sends one `GET` and reads its
//!   reply (so its session and whatever upstream state a used client holds exist, as for a
//!   pooled connection that has been used), then sits idle. RSS is read at N/2 and at N
//!   connections, and Redis's count again at N. KiB per idle client = (RSS with N − RSS
//!   idle) / N; the marginal figure (N/2 → N) leaves out one-time costs. A `GET` rather than
//!   a `PING` because a proxy may answer `PING` itself, and the point is a client that
//!   has used Redis.
//! * Active: a fresh stormwall per load; `redis-benchmark -c 50 -P 16` SET/GET in a loop for
//!   a few seconds while RSS is sampled; KiB per active connection = (peak RSS − idle RSS)
//!   / 50.
//!
//! Targets (issue 9, shared mode): ≤ 16 upstream connections and ≤ 8 KiB RSS per idle
//! client with 10,000 clients; printed as PASS/MISS, never failing the bench. Dedicated
//! mode is held to the earlier ≤ 16 KiB per idle client.
//!
//! Descriptors: in dedicated mode each client costs stormwall two file descriptors (its own
//! and its upstream connection) and Redis one; in shared mode one in stormwall. The bench
//! raises its own `RLIMIT_NOFILE` as far as it may before starting Redis and stormwall,
//! which inherit it (Redis also gets `--maxclients 20000`). If the limit cannot hold what a
//! mode needs for N clients, that mode opens fewer and the report says so. If stormwall
//! stops accepting or answering before N (a shared mode that still opens a connection per
//! client runs out of descriptors), the run stops there and the report says where. Socket
//! buffers live in the kernel and are not part of RSS.

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Mode, Proc, bench_command, connect, cores_and_cpu, env_flag, env_num, info_field,
    report_header, results_dir, sh, start_redis, start_stormwall_mode, status_kib,
    stormwall_revision,
};

/// Issue 9: what shared mode may cost per idle client, and hold open towards Redis.
const TARGET_SHARED_KIB: f64 = 8.0;
const TARGET_SHARED_UPSTREAM: i64 = 16;
/// The earlier target for one connection per client.
const TARGET_DEDICATED_KIB: f64 = 16.0;
const ACTIVE_CLIENTS: u32 = 50;
/// Descriptors stormwall needs besides those per client (stdio, epoll, listeners, admin,
/// readiness probe, spares, shared connections), with room to spare.
const FD_SLACK: u64 = 100;
/// The key every idle client reads once, and its value.
const IDLE_KEY: &str = "idle:key";
const IDLE_GET: &[u8] = b"*2\r\n$3\r\nGET\r\n$8\r\nidle:key\r\n";
const IDLE_REPLY: &[u8] = b"$1\r\nv\r\n";

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (and the hard limit too, where
/// permitted: it takes `CAP_SYS_RESOURCE`). Returns (soft, hard) as they are afterwards.
fn raise_nofile(wanted: u64) -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_max < wanted {
            let higher = libc::rlimit {
                rlim_cur: wanted,
                rlim_max: wanted,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &higher) == 0 {
                lim = higher;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// Descriptors stormwall holds per client in `mode`, as designed.
fn fds_per_client(mode: Mode) -> u64 {
    match mode {
        Mode::Dedicated => 2,
        Mode::Shared => 1,
    }
}

/// stormwall in `mode` with its own admin port and room for every idle client.
fn start_stormwall(upstream: u16, mode: Mode) -> (Proc, u16) {
    start_stormwall_mode(
        upstream,
        mode,
        &[
            "--admin",
            "127.0.0.1:0",
            "--log-level",
            "warn",
            "--max-clients",
            "20000",
        ],
    )
}

#[derive(Clone, Copy)]
struct Rss {
    total: u64,
    anon: u64,
}

/// RSS after the process has had `settle` to finish what it was doing.
fn rss(pid: u32, settle: Duration) -> Rss {
    thread::sleep(settle);
    Rss {
        total: status_kib(pid, "VmRSS"),
        anon: status_kib(pid, "RssAnon"),
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Opens a connection, round-trips one GET through the proxy, and keeps it open; or says
/// why it could not.
fn idle_client(port: u16) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(IDLE_GET).map_err(|e| format!("write: {e}"))?;
    let mut reply = [0u8; IDLE_REPLY.len()];
    s.read_exact(&mut reply)
        .map_err(|e| format!("reading the GET reply: {e}"))?;
    if reply != IDLE_REPLY {
        return Err(format!(
            "unexpected reply {:?}",
            String::from_utf8_lossy(&reply)
        ));
    }
    Ok(s)
}

fn redis_maxclients(port: u16) -> u64 {
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query(&mut connect(port))
        .unwrap();
    v.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Redis's `connected_clients`.
fn connected_clients(admin: &mut redis::Connection) -> i64 {
    info_field(admin, "clients", "connected_clients")
        .parse()
        .unwrap_or(-1)
}

/// Redis's client count once it has stopped falling (connections of an earlier run are
/// closed asynchronously), waiting up to 5 s.
fn settled_clients(admin: &mut redis::Connection) -> i64 {
    let mut last = connected_clients(admin);
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(250));
        let now = connected_clients(admin);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

struct IdleRun {
    mode: Mode,
    /// Connections asked for (what the descriptor limit allows) and actually opened.
    wanted: usize,
    opened: usize,
    /// Why opening stopped early, if it did.
    stopped: Option<String>,
    idle: Rss,
    half: Rss,
    with: Rss,
    after_close: Rss,
    open_secs: f64,
    fds: usize,
    /// Connections Redis counts from stormwall: at rest, with the clients, after they left.
    upstream_rest: i64,
    upstream_with: i64,
    upstream_after: i64,
    /// Of every 97th client, how many still got their GET answered after the measurement.
    rechecked: (usize, usize),
}

impl IdleRun {
    fn kib(&self) -> f64 {
        per_conn(self.with.total, self.idle.total, self.opened)
    }
}

fn idle(mode: Mode, redis_port: u16, admin: &mut redis::Connection, n: usize) -> IdleRun {
    let baseline = settled_clients(admin);
    let (sw, port) = start_stormwall(redis_port, mode);
    let pid = sw.pid();
    let idle = rss(pid, Duration::from_secs(1));
    let upstream_rest = connected_clients(admin) - baseline;
    println!(
        "{}: idle VmRSS {} KiB, {upstream_rest} upstream connections",
        mode.label(),
        idle.total
    );
    let start = Instant::now();
    let mut clients: Vec<TcpStream> = Vec::with_capacity(n);
    let mut half = None;
    let mut stopped = None;
    for i in 0..n {
        match idle_client(port) {
            Ok(c) => clients.push(c),
            Err(e) => {
                println!("{}: client {} of {n} failed: {e}", mode.label(), i + 1);
                stopped = Some(format!("client {} of {n}: {e}", i + 1));
                break;
            }
        }
        if i + 1 == n / 2 {
            half = Some(rss(pid, Duration::from_secs(1)));
        }
    }
    let opened = clients.len();
    let open_secs = start.elapsed().as_secs_f64();
    let with = rss(pid, Duration::from_secs(2));
    let upstream_with = connected_clients(admin) - baseline;
    let half = half.unwrap_or(idle);
    let fds = open_fds(pid);
    println!(
        "{}: {opened} idle clients: VmRSS {} KiB ({fds} fds open), {upstream_with} upstream connections",
        mode.label(),
        with.total,
    );
    // The connections still work after the measurement (a sample of them).
    let mut rechecked = (0, 0);
    for c in clients.iter_mut().step_by(97) {
        rechecked.1 += 1;
        let mut reply = [0u8; IDLE_REPLY.len()];
        if c.write_all(IDLE_GET).is_ok() && c.read_exact(&mut reply).is_ok() && reply == IDLE_REPLY
        {
            rechecked.0 += 1;
        }
    }
    drop(clients);
    let after_close = rss(pid, Duration::from_secs(2));
    let upstream_after = connected_clients(admin) - baseline;
    drop(sw);
    IdleRun {
        mode,
        wanted: n,
        opened,
        stopped,
        idle,
        half,
        with,
        after_close,
        open_secs,
        fds,
        upstream_rest,
        upstream_with,
        upstream_after,
        rechecked,
    }
}

struct ActiveRun {
    mode: Mode,
    label: String,
    idle: Rss,
    peak: Rss,
    median_total: u64,
}

/// A fresh stormwall under `redis-benchmark -l` for `seconds`, RSS sampled every 50 ms.
fn active(redis_port: u16, mode: Mode, size: usize, seconds: u64) -> ActiveRun {
    let (sw, port) = start_stormwall(redis_port, mode);
    let idle = rss(sw.pid(), Duration::from_millis(500));
    let load = Proc(
        Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-c", &ACTIVE_CLIENTS.to_string(), "-P", "16"])
            .args(["-d", &size.to_string(), "-t", "set,get", "-l", "-q"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-benchmark not found: apt-get install -y redis-tools"),
    );
    let mut samples = Vec::new();
    let mut peak = idle;
    let start = Instant::now();
    thread::sleep(Duration::from_millis(500)); // connections open, load ramps up
    while start.elapsed() < Duration::from_secs(seconds) {
        let r = rss(sw.pid(), Duration::from_millis(50));
        if r.total > peak.total {
            peak = r;
        }
        samples.push(r.total);
    }
    drop(load);
    drop(sw);
    samples.sort_unstable();
    ActiveRun {
        mode,
        label: format!("{ACTIVE_CLIENTS} clients, `-P 16`, SET+GET, {size} B values"),
        idle,
        peak,
        median_total: samples[samples.len() / 2],
    }
}

fn per_conn(with: u64, without: u64, n: usize) -> f64 {
    (with as f64 - without as f64) / n.max(1) as f64
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "**MISS**" }
}

fn main() {
    let quick = env_flag("STORMWALL_BENCH_QUICK");
    let wanted: usize =
        env_num("STORMWALL_BENCH_CONNECTIONS").unwrap_or(if quick { 2_000 } else { 10_000 });
    let active_seconds = if quick { 2 } else { 4 };
    let (soft, hard) = raise_nofile(2 * wanted as u64 + FD_SLACK);
    // What each mode can open within the limit (the bench itself needs one per client).
    let fits = |mode: Mode| (soft.saturating_sub(FD_SLACK) / fds_per_client(mode)) as usize;

    // Room for every idle client (Redis's default `maxclients` is 10,000).
    let (redis, redis_port) = start_redis(&["--maxclients", "20000"]);
    let redis_max = redis_maxclients(redis_port);
    let mut admin = connect(redis_port);
    let _: () = redis::cmd("SET")
        .arg(IDLE_KEY)
        .arg("v")
        .query(&mut admin)
        .unwrap();

    let mut runs = Vec::new();
    for mode in [Mode::Dedicated, Mode::Shared] {
        let mut n = wanted.min(fits(mode));
        if mode == Mode::Dedicated {
            // Dedicated mode also needs a Redis connection per client.
            n = n.min(redis_max.saturating_sub(10) as usize);
        }
        if n < wanted {
            println!(
                "note: {}: RLIMIT_NOFILE is {soft} (hard {hard}) and cannot be raised; {n} \
                 connections are opened instead of {wanted}",
                mode.label()
            );
        }
        let run = idle(mode, redis_port, &mut admin, n);
        println!("{}: KiB per idle client: {:.2}", mode.label(), run.kib());
        runs.push(run);
    }

    // Active connections.
    let mut active_runs = Vec::new();
    for mode in [Mode::Dedicated, Mode::Shared] {
        for size in [16, 1024, 16 * 1024] {
            let r = active(redis_port, mode, size, active_seconds);
            println!(
                "{} {}: idle {} KiB, peak {} KiB, {:.1} KiB per active connection",
                mode.label(),
                r.label,
                r.idle.total,
                r.peak.total,
                per_conn(r.peak.total, r.idle.total, ACTIVE_CLIENTS as usize)
            );
            active_runs.push(r);
        }
    }
    drop(admin);
    drop(redis);

    let command = bench_command(
        "memory",
        &["STORMWALL_BENCH_QUICK", "STORMWALL_BENCH_CONNECTIONS"],
    );
    let mut md = report_header(
        "Memory: stormwall's resident set and upstream connections per client",
        &command,
    );
    let w = &mut md;
    let mut line = |text: String| writeln!(w, "{text}").unwrap();
    line(format!(
        "| machine | {}, {} |",
        cores_and_cpu(),
        sh("uname", &["-sr"])
    ));
    line(format!(
        "| redis | {} |",
        sh("redis-server", &["--version"])
    ));
    line(format!(
        "| stormwall | {} (release build, default config but `upstream.mode`, `--max-clients 20000`) |",
        stormwall_revision()
    ));
    line(format!(
        "| descriptors | RLIMIT_NOFILE {soft} (hard {hard}) for the bench, Redis and stormwall; Redis `maxclients` {redis_max} |"
    ));
    for r in runs.iter().filter(|r| r.wanted < wanted) {
        line(format!(
            "| **note** | {}: the hard RLIMIT_NOFILE ({hard}) could not be raised (no \
             CAP_SYS_RESOURCE) and this mode needs {} descriptors per client, so {} idle \
             connections were asked for instead of {wanted} |",
            r.mode.label(),
            fds_per_client(r.mode),
            r.wanted
        ));
    }
    for r in &runs {
        if let Some(why) = &r.stopped {
            line(format!(
                "| **note** | {}: opening stopped after {} clients: {why} |",
                r.mode.label(),
                r.opened
            ));
        }
    }
    line(
        "\nRSS is `VmRSS` from `/proc/PID/status` (`RssAnon`, the heap and stacks, in \
         parentheses); kernel socket buffers are not part of it. Each idle client sent one \
         `GET` through stormwall before idling. Upstream connections = Redis's \
         `connected_clients` minus the bench's own connection (counted before stormwall \
         started): stormwall's readiness probe, spares and shield connections included.\n"
            .into(),
    );

    line("## Idle clients\n".into());
    let mut head = String::from("| | ");
    let mut rule = String::from("| --- |");
    for r in &runs {
        write!(head, "{} | ", r.mode.label()).unwrap();
        rule.push_str(" ---: |");
    }
    line(head.trim_end().into());
    line(rule);
    let row = |label: &str, f: &dyn Fn(&IdleRun) -> String| {
        let mut s = format!("| {label} |");
        for r in &runs {
            write!(s, " {} |", f(r)).unwrap();
        }
        s
    };
    let rss_cell = |r: Rss| format!("{} ({})", r.total, r.anon);
    line(row("clients opened", &|r| {
        format!("{} in {:.1} s", r.opened, r.open_secs)
    }));
    line(row("VmRSS KiB, no clients", &|r| rss_cell(r.idle)));
    line(row("VmRSS KiB, half the clients", &|r| rss_cell(r.half)));
    line(row("VmRSS KiB, all clients", &|r| rss_cell(r.with)));
    line(row("VmRSS KiB, after they closed", &|r| {
        rss_cell(r.after_close)
    }));
    line(row(
        "**KiB per idle client** ((all − none) / clients)",
        &|r| format!("**{:.2}**", r.kib()),
    ));
    line(row("same, RssAnon only", &|r| {
        format!("{:.2}", per_conn(r.with.anon, r.idle.anon, r.opened))
    }));
    line(row("marginal KiB (half → all)", &|r| {
        format!(
            "{:.2}",
            per_conn(r.with.total, r.half.total, r.opened - r.opened / 2)
        )
    }));
    line(row("upstream connections at rest", &|r| {
        r.upstream_rest.to_string()
    }));
    line(row("**upstream connections with the clients**", &|r| {
        format!("**{}**", r.upstream_with)
    }));
    line(row("upstream connections after they closed", &|r| {
        r.upstream_after.to_string()
    }));
    line(row("descriptors open in stormwall", &|r| r.fds.to_string()));
    line(row("clients answering after the measurement", &|r| {
        format!("{} of {}", r.rechecked.0, r.rechecked.1)
    }));

    line("\n| target | measured | verdict |\n| --- | ---: | --- |".into());
    for r in &runs {
        match r.mode {
            Mode::Shared => {
                line(format!(
                    "| shared (issue 9): ≤ {TARGET_SHARED_KIB} KiB per idle client | {:.2} | {} |",
                    r.kib(),
                    verdict(r.kib() <= TARGET_SHARED_KIB)
                ));
                line(format!(
                    "| shared (issue 9): ≤ {TARGET_SHARED_UPSTREAM} upstream connections with {} clients | {} | {} |",
                    r.opened,
                    r.upstream_with,
                    verdict(r.upstream_with <= TARGET_SHARED_UPSTREAM && r.stopped.is_none())
                ));
            }
            Mode::Dedicated => line(format!(
                "| dedicated: ≤ {TARGET_DEDICATED_KIB} KiB per idle client | {:.2} | {} |",
                r.kib(),
                verdict(r.kib() <= TARGET_DEDICATED_KIB)
            )),
        }
    }

    line("\n## Active pipelined connections\n".into());
    line(format!(
        "A fresh stormwall per load; `redis-benchmark -c {ACTIVE_CLIENTS} -P 16 -t set,get -l` \
         for {active_seconds} s, RSS sampled every 50 ms.\n"
    ));
    line(format!(
        "| mode | load | idle VmRSS KiB | median under load | peak under load | per active connection, KiB ((peak − idle) / {ACTIVE_CLIENTS}) |"
    ));
    line("| --- | --- | ---: | ---: | ---: | ---: |".into());
    for r in &active_runs {
        line(format!(
            "| {} | {} | {} | {} | {} | {:.1} |",
            r.mode.name(),
            r.label,
            r.idle.total,
            r.median_total,
            r.peak.total,
            per_conn(r.peak.total, r.idle.total, ACTIVE_CLIENTS as usize)
        ));
    }
    print!("\n{md}");
    std::fs::write(results_dir().join("memory.md"), md).unwrap();
    println!("wrote results/memory.md");
}
