//! What stormwall's memory costs per connection: its resident set (`VmRSS` in
//! `/proc/PID/status`) idle, with 10,000 idle client connections, and under pipelined load.
//!
//! Run: `cargo bench --bench memory` (under a minute). Writes `results/memory.md`.
//! `STORMWALL_BENCH_CONNECTIONS=N` changes the number of idle connections.
//!
//! Method.
//! * Idle: a fresh stormwall; its RSS after it settles; then N client connections are
//!   opened, each sends one `PING` and reads `+PONG` (so its session, upstream connection
//!   and buffers exist, as for a pooled connection that has been used), then sits idle.
//!   RSS is read at N/2 and at N connections. KiB per idle connection =
//!   (RSS with N − RSS idle) / N; the marginal figure (N/2 → N) leaves out one-time costs.
//! * Active: a fresh stormwall per load; `redis-benchmark -c 50 -P 16` SET/GET in a loop for
//!   a few seconds while RSS is sampled; KiB per active connection = (peak RSS − idle RSS)
//!   / 50.
//!
//! Each client connection costs stormwall two file descriptors (its own and its upstream
//! connection), and Redis one, so the bench raises its own `RLIMIT_NOFILE` (children inherit
//! it). If the hard limit cannot hold 2 × 10,000 descriptors the connection count is
//! lowered to fit, and the report says so. Socket buffers live in the kernel and are not
//! part of RSS.

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Proc, connect, cores_and_cpu, report_header, results_dir, sh, start_redis};

const TARGET_IDLE_KIB: f64 = 16.0;
const ACTIVE_CLIENTS: u32 = 50;
const ACTIVE_SECONDS: u64 = 4;
/// Descriptors stormwall needs besides two per client (stdio, epoll, listeners, admin,
/// readiness probe), with room to spare.
const FD_SLACK: u64 = 100;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (and the hard limit too, where
/// permitted). Returns (soft, hard) as they are afterwards.
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

/// stormwall with its own admin port and room for every idle client.
fn start_stormwall(upstream: u16) -> (Proc, u16) {
    common::start_stormwall(
        upstream,
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

/// A `kB` field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
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

/// Opens a connection, round-trips one PING through the proxy, and keeps it open.
fn idle_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to stormwall");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).expect("PING reply");
    assert_eq!(&reply, b"+PONG\r\n", "unexpected reply through stormwall");
    s
}

fn redis_maxclients(port: u16) -> u64 {
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxclients")
        .query(&mut connect(port))
        .unwrap();
    v.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

struct ActiveRun {
    label: String,
    idle: Rss,
    peak: Rss,
    median_total: u64,
}

/// A fresh stormwall under `redis-benchmark -l` for ACTIVE_SECONDS, RSS sampled every 50 ms.
fn active(redis_port: u16, size: usize) -> ActiveRun {
    let (sw, port) = start_stormwall(redis_port);
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
    while start.elapsed() < Duration::from_secs(ACTIVE_SECONDS) {
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
        label: format!("{ACTIVE_CLIENTS} clients, `-P 16`, SET+GET, {size} B values"),
        idle,
        peak,
        median_total: samples[samples.len() / 2],
    }
}

fn per_conn(with: u64, without: u64, n: usize) -> f64 {
    (with as f64 - without as f64) / n as f64
}

fn main() {
    let wanted: usize = std::env::var("STORMWALL_BENCH_CONNECTIONS")
        .ok()
        .map(|v| v.parse().expect("STORMWALL_BENCH_CONNECTIONS is a number"))
        .unwrap_or(10_000);
    let (soft, hard) = raise_nofile(2 * wanted as u64 + FD_SLACK);
    let fits = (soft.saturating_sub(FD_SLACK) / 2) as usize;
    let n = wanted.min(fits);
    let capped = n < wanted;
    if capped {
        println!(
            "note: RLIMIT_NOFILE is {soft} (hard {hard}) and cannot be raised; stormwall needs 2 \
             descriptors per client, so {n} connections are opened instead of {wanted}"
        );
    }

    // Room for every idle client (Redis's default `maxclients` is 10,000).
    let (redis, redis_port) = start_redis(&["--maxclients", "20000"]);
    let redis_max = redis_maxclients(redis_port);
    assert!(
        redis_max >= n as u64 + 10,
        "redis-server accepts only {redis_max} clients; {n} are needed"
    );

    // Idle connections.
    let (sw, port) = start_stormwall(redis_port);
    let pid = sw.pid();
    let idle = rss(pid, Duration::from_secs(1));
    println!("stormwall idle: VmRSS {} KiB", idle.total);
    let start = Instant::now();
    let mut clients: Vec<TcpStream> = Vec::with_capacity(n);
    let mut half = None;
    for i in 0..n {
        clients.push(idle_client(port));
        if i + 1 == n / 2 {
            half = Some(rss(pid, Duration::from_secs(1)));
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    let with = rss(pid, Duration::from_secs(2));
    let half = half.unwrap_or(idle);
    let fds = open_fds(pid);
    println!(
        "stormwall with {n} idle connections: VmRSS {} KiB ({} fds open)",
        with.total, fds
    );
    // Every connection still works after the measurement.
    for c in clients.iter_mut().step_by(97) {
        c.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let mut reply = [0u8; 7];
        c.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"+PONG\r\n");
    }
    drop(clients);
    let after_close = rss(pid, Duration::from_secs(2));
    drop(sw);

    let idle_kib = per_conn(with.total, idle.total, n);
    let idle_anon_kib = per_conn(with.anon, idle.anon, n);
    let marginal_kib = per_conn(with.total, half.total, n - n / 2);
    println!("KiB per idle connection: {idle_kib:.2} (target <= {TARGET_IDLE_KIB})");

    // Active connections.
    let runs: Vec<ActiveRun> = [16, 1024, 16 * 1024]
        .into_iter()
        .map(|size| {
            let r = active(redis_port, size);
            println!(
                "{}: idle {} KiB, peak {} KiB, {:.1} KiB per active connection",
                r.label,
                r.idle.total,
                r.peak.total,
                per_conn(r.peak.total, r.idle.total, ACTIVE_CLIENTS as usize)
            );
            r
        })
        .collect();
    drop(redis);

    let command = match std::env::var("STORMWALL_BENCH_CONNECTIONS") {
        Ok(v) => format!("STORMWALL_BENCH_CONNECTIONS={v} cargo bench --bench memory"),
        Err(_) => "cargo bench --bench memory".into(),
    };
    let mut md = report_header("Memory: stormwall's resident set per connection", &command);
    writeln!(
        md,
        "| machine | {}, {} |",
        cores_and_cpu(),
        sh("uname", &["-sr"])
    )
    .unwrap();
    writeln!(md, "| redis | {} |", sh("redis-server", &["--version"])).unwrap();
    writeln!(
        md,
        "| stormwall | release build, default config, `--max-clients 20000` |"
    )
    .unwrap();
    writeln!(
        md,
        "| descriptors | RLIMIT_NOFILE {soft} (hard {hard}); stormwall had {fds} open with {n} clients |"
    )
    .unwrap();
    if capped {
        writeln!(
            md,
            "| **note** | the hard RLIMIT_NOFILE ({hard}) could not be raised (no CAP_SYS_RESOURCE), \
             and stormwall holds two descriptors per client, so {n} idle connections were opened \
             instead of {wanted} |"
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nRSS is `VmRSS` from `/proc/PID/status` (`RssAnon`, the heap and stacks, in \
         parentheses); kernel socket buffers are not part of it. Each idle connection sent one \
         `PING` through stormwall before idling.\n"
    )
    .unwrap();
    writeln!(md, "## Idle connections\n").unwrap();
    writeln!(md, "| state | VmRSS KiB (RssAnon) |\n| --- | ---: |").unwrap();
    writeln!(md, "| idle, no clients | {} ({}) |", idle.total, idle.anon).unwrap();
    writeln!(
        md,
        "| {} idle connections | {} ({}) |",
        n / 2,
        half.total,
        half.anon
    )
    .unwrap();
    writeln!(
        md,
        "| {n} idle connections (opened in {open_secs:.1} s) | {} ({}) |",
        with.total, with.anon
    )
    .unwrap();
    writeln!(
        md,
        "| after those {n} closed | {} ({}) |\n",
        after_close.total, after_close.anon
    )
    .unwrap();
    writeln!(
        md,
        "| per idle connection | KiB | target |\n| --- | ---: | --- |"
    )
    .unwrap();
    let verdict = if idle_kib <= TARGET_IDLE_KIB {
        "meets"
    } else {
        "**misses**"
    };
    writeln!(
        md,
        "| (RSS with {n} − RSS idle) / {n} | **{idle_kib:.2}** | ≤ {TARGET_IDLE_KIB} KiB: {verdict} |"
    )
    .unwrap();
    writeln!(md, "| same, RssAnon only | {idle_anon_kib:.2} | |").unwrap();
    writeln!(
        md,
        "| marginal: (RSS with {n} − RSS with {}) / {} | {marginal_kib:.2} | |",
        n / 2,
        n - n / 2
    )
    .unwrap();
    writeln!(md, "\n## Active pipelined connections\n").unwrap();
    writeln!(
        md,
        "A fresh stormwall per load; `redis-benchmark -c {ACTIVE_CLIENTS} -P 16 -t set,get -l` \
         for {ACTIVE_SECONDS} s, RSS sampled every 50 ms.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| load | idle VmRSS KiB | median under load | peak under load | per active connection, KiB ((peak − idle) / {ACTIVE_CLIENTS}) |"
    )
    .unwrap();
    writeln!(md, "| --- | ---: | ---: | ---: | ---: |").unwrap();
    for r in &runs {
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} |",
            r.label,
            r.idle.total,
            r.median_total,
            r.peak.total,
            per_conn(r.peak.total, r.idle.total, ACTIVE_CLIENTS as usize)
        )
        .unwrap();
    }
    print!("\n{md}");
    std::fs::write(results_dir().join("memory.md"), md).unwrap();
    println!("wrote results/memory.md");
}
