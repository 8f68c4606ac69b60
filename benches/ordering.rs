//! Cross-connection arrival order: when client A's command is written before client B's
//! (B writes only after A's `write` returned), how often does Redis execute B's first?
//! Redis promises nothing across connections, but applications lean on "sent first,
//! arrives first" (a producer's push and a worker's blocking pop, a test that writes on one
//! connection and checks on another), so a proxy should reorder no more than a plain TCP
//! relay does. Also measures what each path costs unpipelined traffic, because the cure
//! for reordering must not cost throughput.
//!
//! Run: `cargo bench --bench ordering` (about a minute). Writes `results/ordering.md`.
//! `STORMWALL_BENCH_TRIES=N` (default 1000 per path and round), `STORMWALL_BENCH_ROUNDS=R`
//! (default 3), `STORMWALL_BENCH_QUICK=1` (one short round, results/ left alone),
//! `STORMWALL_BENCH_BIN=path` (measure another stormwall build; its label is
//! `STORMWALL_BENCH_LABEL`), `STORMWALL_BENCH_COMPARE=path` (also measure this build in
//! the same run, labelled `STORMWALL_BENCH_COMPARE_LABEL`: before/after comparisons).
//!
//! Method. Per path (Redis directly, `socat` forking one relay process per connection, and
//! stormwall), two connections A and B are opened and each sends one `PING` first, so
//! both are fully set up. Each try then writes `RPUSH order:<i> a` on A and, as soon as
//! that `write` returned, `RPUSH order:<i> b` on B, and reads both replies. Redis's reply
//! to A is the list length after A's push: `:1` if A's command reached Redis first, `:2`
//! if B's overtook it. So what is counted is the order of execution at Redis itself, not
//! the order the replies come back in. Tries are 1 ms apart, so each starts from idle
//! connections (the case of a producer and a waiting worker), where a proxy's event loop
//! is asleep when A's bytes arrive and B's bytes can land in the same wake-up.
//!
//! Throughput: `redis-benchmark -c 50 -P 1 -t get` (16 B values) against each path, as
//! a check that the ordering cure did not cost unpipelined throughput.

mod common;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{
    Proc, cores_and_cpu, cpu_seconds, env_flag, free_port, report_header, results_dir, sh,
    start_redis, wait_port,
};

/// One connection that sends a command and reads its one-line reply.
struct Conn(TcpStream);

impl Conn {
    fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Conn(s);
        c.send(b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(c.line(), "+PONG");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).expect("write");
    }

    /// One reply line without its CRLF (every reply used here is a single line).
    fn line(&mut self) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while !out.ends_with(b"\r\n") {
            self.0.read_exact(&mut b).expect("read reply");
            out.push(b[0]);
        }
        out.truncate(out.len() - 2);
        String::from_utf8(out).unwrap()
    }
}

fn rpush(key: &str, value: &str) -> Vec<u8> {
    format!(
        "*3\r\n$5\r\nRPUSH\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
        key.len(),
        value.len()
    )
    .into_bytes()
}

/// Runs `tries` A-then-B pushes through `port`; returns how many B's reached Redis first.
fn count_reorders(port: u16, tries: u32, tag: &str) -> u32 {
    let mut a = Conn::open(port);
    let mut b = Conn::open(port);
    let mut reordered = 0;
    for i in 0..tries {
        let key = format!("order:{tag}:{i}");
        let (ca, cb) = (rpush(&key, "a"), rpush(&key, "b"));
        a.send(&ca);
        b.send(&cb);
        let (ra, rb) = (a.line(), b.line());
        match (ra.as_str(), rb.as_str()) {
            (":1", ":2") => {}
            (":2", ":1") => reordered += 1,
            other => panic!("unexpected replies {other:?}"),
        }
        thread::sleep(Duration::from_millis(1));
    }
    reordered
}

/// `socat` relaying each accepted connection to Redis in a forked process of its own.
fn start_socat(upstream: u16) -> Option<(Proc, u16)> {
    let port = free_port();
    let child = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("TCP:127.0.0.1:{upstream},nodelay"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        println!("note: `socat` is not installed (apt-get install -y socat); its row is skipped");
        return None;
    };
    let mut child = Proc(child);
    wait_port(port, &mut child.0, "socat");
    Some((child, port))
}

fn stormwall_bin() -> String {
    std::env::var("STORMWALL_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_stormwall").into())
}

fn start_stormwall(bin: &str, upstream: u16) -> (Proc, u16) {
    let port = free_port();
    let mut child = Proc(
        Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("127.0.0.1:{upstream}")])
            .args(["--admin", "127.0.0.1:0", "--log-level", "warn"])
            .spawn()
            .expect("cannot start stormwall"),
    );
    wait_port(port, &mut child.0, "stormwall");
    (child, port)
}

/// Requests per second of `redis-benchmark -c 50 -P 1 -t get -d 16 -n n`.
fn get_rps(port: u16, n: u64) -> f64 {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "50", "-P", "1", "-t", "get", "-d", "16", "-q"])
        .args(["-n", &n.to_string()])
        .output()
        .expect("redis-benchmark not found: apt-get install -y redis-tools");
    let text = String::from_utf8_lossy(&out.stdout);
    // "GET: 61349.69 requests per second, p50=0.415 msec" (after \r progress lines)
    text.rsplit('\r')
        .flat_map(|s| s.lines())
        .find_map(|l| {
            l.strip_prefix("GET: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("cannot parse redis-benchmark output: {text}"))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = env_flag("STORMWALL_BENCH_QUICK");
    let tries = env_num("STORMWALL_BENCH_TRIES", if quick { 200 } else { 1000 }) as u32;
    let rounds = env_num("STORMWALL_BENCH_ROUNDS", if quick { 1 } else { 3 });
    let requests = if quick { 20_000 } else { 100_000 };
    let label = std::env::var("STORMWALL_BENCH_LABEL").unwrap_or_else(|_| "stormwall".into());

    let (redis, redis_port) = start_redis(&[]);
    let socat = start_socat(redis_port);
    let (sw, sw_port) = start_stormwall(&stormwall_bin(), redis_port);
    // (label, port, the process whose CPU time a request costs: Redis or the proxy)
    let mut paths: Vec<(String, u16, Option<u32>)> =
        vec![("direct".into(), redis_port, Some(redis.pid()))];
    if let Some((_, p)) = &socat {
        // socat forks a process per connection; their CPU time is not tracked.
        paths.push(("socat".into(), *p, None));
    }
    paths.push((label, sw_port, Some(sw.pid())));
    // Another build measured in the same run, e.g. the last release before a change.
    let compare = std::env::var("STORMWALL_BENCH_COMPARE").ok();
    let _other = compare.as_ref().map(|bin| {
        let (proc, port) = start_stormwall(bin, redis_port);
        let label = std::env::var("STORMWALL_BENCH_COMPARE_LABEL").unwrap_or_else(|_| bin.clone());
        paths.push((label, port, Some(proc.pid())));
        proc
    });

    // reorders[path][round], rps[path][round]
    let mut reorders = vec![Vec::new(); paths.len()];
    let mut rps = vec![Vec::new(); paths.len()];
    let mut cpu = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        // A different path goes first each round, so drifts of the machine hit all alike.
        // Orders are counted before any throughput run of the round, so that no path's
        // count is taken while relay processes or connections of a load run wind down.
        let order: Vec<usize> = (0..paths.len())
            .map(|k| (k + round as usize) % paths.len())
            .collect();
        for &p in &order {
            let (name, port, _) = &paths[p];
            let r = count_reorders(*port, tries, &format!("{round}:{name}"));
            println!("round {round} {name:>10}: {r:>4} of {tries} reordered");
            reorders[p].push(r);
        }
        for &p in &order {
            let (name, port, pid) = &paths[p];
            let before = pid.map(cpu_seconds);
            let t = get_rps(*port, requests);
            let us = pid
                .zip(before)
                .map(|(pid, b)| (cpu_seconds(pid) - b) * 1e6 / requests as f64);
            println!(
                "round {round} {name:>10}: GET -c 50 -P 1 {t:>9.0} req/s, {} µs CPU/request",
                us.map_or("?".into(), |u| format!("{u:.1}"))
            );
            rps[p].push(t);
            cpu[p].extend(us);
            thread::sleep(Duration::from_secs(1));
        }
    }

    // The command as run, with the settings that change what is measured.
    let settings: Vec<String> = [
        "STORMWALL_BENCH_BIN",
        "STORMWALL_BENCH_COMPARE",
        "STORMWALL_BENCH_ROUNDS",
        "STORMWALL_BENCH_TRIES",
    ]
    .iter()
    .filter_map(|k| Some(format!("{k}={}", std::env::var(k).ok()?)))
    .collect();
    let command = format!("{} cargo bench --bench ordering", settings.join(" "));
    let mut md = report_header("Cross-connection arrival order", command.trim());
    let _ = writeln!(md, "| machine | {} |", cores_and_cpu());
    let _ = writeln!(md, "| redis | {} |", sh("redis-server", &["--version"]));
    let _ = writeln!(md, "| stormwall | `{}` |", stormwall_bin());
    if let Some(bin) = &compare {
        let _ = writeln!(md, "| compared with | `{bin}` |");
    }
    let _ = writeln!(
        md,
        "| method | {rounds} rounds × {tries} tries per path: `RPUSH k a` on connection A, \
         then (after A's write returned) `RPUSH k b` on connection B; reordered = Redis \
         answered A `:2` (B's push ran first); tries 1 ms apart. Throughput: \
         `redis-benchmark -c 50 -P 1 -t get -d 16 -n {requests}`, median of rounds (and \
         its min–max); CPU per request = user + system time of the process serving the path \
         (Redis directly, or the proxy) during that run, from `/proc/PID/stat`, median — \
         steadier than req/s when other processes share the cores |"
    );
    let _ = writeln!(
        md,
        "\n| path | reordered (of {}) | per round | GET -c 50 -P 1 req/s (min–max) | CPU µs per request |\n| --- | ---: | --- | ---: | ---: |",
        tries as u64 * rounds
    );
    for (p, (name, _, _)) in paths.iter().enumerate() {
        let total: u32 = reorders[p].iter().sum();
        let per: Vec<String> = reorders[p].iter().map(u32::to_string).collect();
        let _ = writeln!(
            md,
            "| {name} | {total} ({:.1}%) | {} | {:.0} ({:.0}–{:.0}) | {} |",
            100.0 * total as f64 / (tries as f64 * rounds as f64),
            per.join(", "),
            median(rps[p].clone()),
            rps[p].iter().copied().fold(f64::INFINITY, f64::min),
            rps[p].iter().copied().fold(0.0, f64::max),
            if cpu[p].is_empty() {
                "–".to_string()
            } else {
                format!("{:.1}", median(cpu[p].clone()))
            }
        );
    }
    println!("\n{md}");
    if quick {
        println!("(quick run: results/ left alone)");
    } else {
        let path = results_dir().join("ordering.md");
        std::fs::write(&path, &md).unwrap();
        println!("wrote {}", path.display());
    }
}
