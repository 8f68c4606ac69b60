//! Head-of-line blocking: how long do small `GET`s wait when another client on the same
//! proxy asks for something big? On a shared upstream connection (issue 9) replies come
//! back in order, so a small `GET` written behind a 20 MB `GET` or a `KEYS *` waits until
//! that reply has gone past; directly (or with a connection per client) it waits only for
//! Redis's event loop. This bench measures that wait, before and after whatever cure
//! shared mode adopts (spreading by in-flight bytes, streaming large replies, a size
//! threshold that pins).
//!
//! Run: `cargo bench --bench head_of_line` (about 3 minutes). Writes
//! `results/head_of_line.md`. Environment: `STORMWALL_BENCH_QUICK=1` (one short round, to
//! check that the bench works), `STORMWALL_BENCH_ROUNDS=N` (default 3),
//! `STORMWALL_BENCH_SECONDS=S` (length of one run, default 5),
//! `STORMWALL_BENCH_SCENARIOS=baseline,get,keys` (which scenarios to run, default all),
//! `STORMWALL_BENCH_HEAVY_PAUSE_MS=MS` (the heavy client's pause between requests, default
//! 250: the heavy client is busy a fraction of the time, as a real one would be).
//!
//! Method. One Redis holding 200,000 small keys (`DEBUG POPULATE`: `key:N` = `value:N`) and
//! one 20 MiB value. Targets: Redis directly, stormwall `upstream.mode = "shared"` and
//! `"dedicated"` (default config otherwise, so shared mode has its default number of shared
//! connections), and twemproxy (one upstream connection for all clients, when installed).
//! Scenarios, each run against every target in turn (start target rotated per round):
//! * `baseline`: only the small clients;
//! * `GET 20 MiB`: plus one client that `GET`s the 20 MiB value, reads all of it, pauses,
//!   and again;
//! * `KEYS *`: plus one client that runs `KEYS *` (200,000 keys: Redis blocks for tens of ms,
//!   and the reply is ~3 MB), pauses, and again. twemproxy does not support `KEYS`, so it
//!   sits this one out.
//!
//! The small clients: 20 connections, each scheduled to send one `GET key:N` every 2 ms
//! (10,000/s in all, well below what any target sustains, so the latency measured is
//! waiting, not saturation), one at a time: a client sends its next GET when its reply is
//! in and its time has come. Two latencies per GET:
//! * from its *scheduled* time to the last byte of its reply, as in the `storm` bench: a
//!   client held up 50 ms behind someone's big reply has 25 GETs late by up to 50 ms, so
//!   the percentiles say for how much of the time clients were held up, and by how much;
//! * its *service time*, from its write to the last byte of its reply: the longest of these
//!   is the longest a single request waited (the head-of-line wait itself).
//!
//! Every reply is checked against the key asked for, so a reply handed to the wrong client
//! shows up as an error. The first 300 ms of each run are not counted. Each percentile (and
//! the longest) is taken per run, and the report gives its median over rounds, so that one
//! round's stall from elsewhere on the machine does not decide a figure.
//!
//! Everything shares the machine's cores (here two) with Redis and the proxies; read the
//! comparison between targets in the same run, not the absolute values.

mod common;

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Mode, bench_command, connect, cores_and_cpu, env_flag, env_num, median, report_header,
    resp_command, results_dir, start_redis, start_stormwall_mode, start_twemproxy,
    stormwall_revision, version_of,
};

const SMALL_CLIENTS: usize = 20;
const SMALL_INTERVAL: Duration = Duration::from_millis(2);
const BIG_KEY: &str = "big";
const BIG_BYTES: usize = 20 << 20;
const KEY_COUNT: u64 = 200_000;
const WARMUP: Duration = Duration::from_millis(300);
/// No reply, however large, should take this long; past it the run records an error
/// instead of hanging the bench.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Heavy {
    None,
    BigGet,
    Keys,
}

impl Heavy {
    const ALL: [Heavy; 3] = [Heavy::None, Heavy::BigGet, Heavy::Keys];

    fn label(self) -> &'static str {
        match self {
            Heavy::None => "baseline (small GETs only)",
            Heavy::BigGet => "GET 20 MiB",
            Heavy::Keys => "KEYS * (200k keys)",
        }
    }

    /// Its name in `STORMWALL_BENCH_SCENARIOS`.
    fn key(self) -> &'static str {
        match self {
            Heavy::None => "baseline",
            Heavy::BigGet => "get",
            Heavy::Keys => "keys",
        }
    }

    fn command(self) -> Option<Vec<u8>> {
        match self {
            Heavy::None => None,
            Heavy::BigGet => Some(resp_command(&[b"GET", BIG_KEY.as_bytes()])),
            Heavy::Keys => Some(resp_command(&[b"KEYS", b"*"])),
        }
    }
}

// ---------------------------------------------------------------------------------------
// A minimal RESP reader: just enough to find where a reply ends and check small ones.

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A reply's header line: its type byte and the number after it (or 0 for simple types).
fn header(r: &mut impl BufRead) -> io::Result<(u8, i64, Vec<u8>)> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-reply",
        ));
    }
    let body = &line[1..line.len() - 2];
    let n = match line[0] {
        b'$' | b'*' => std::str::from_utf8(body)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad length {:?}", String::from_utf8_lossy(body))))?,
        _ => 0,
    };
    Ok((line[0], n, body.to_vec()))
}

/// Reads one whole reply without keeping it; returns (its elements if an array, else its
/// length in bytes if a bulk string).
fn skip_reply(r: &mut impl BufRead) -> io::Result<u64> {
    let (kind, n, body) = header(r)?;
    match kind {
        b'+' | b':' => Ok(0),
        b'-' => Err(bad(format!(
            "error reply: {}",
            String::from_utf8_lossy(&body)
        ))),
        b'$' if n < 0 => Ok(0),
        b'$' => {
            let want = n as u64 + 2;
            let got = io::copy(&mut r.take(want), &mut io::sink())?;
            if got != want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-reply",
                ));
            }
            Ok(n as u64)
        }
        b'*' => {
            for _ in 0..n.max(0) {
                skip_reply(r)?;
            }
            Ok(n.max(0) as u64)
        }
        other => Err(bad(format!("unexpected reply type {:?}", other as char))),
    }
}

/// Reads a bulk string reply.
fn read_bulk(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let (kind, n, body) = header(r)?;
    if kind != b'$' || n < 0 {
        return Err(bad(format!(
            "expected a bulk string, got {:?}",
            String::from_utf8_lossy(&[&[kind][..], &body].concat())
        )));
    }
    let mut value = vec![0; n as usize + 2];
    r.read_exact(&mut value)?;
    value.truncate(n as usize);
    Ok(value)
}

fn open(port: u16) -> io::Result<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    let r = BufReader::with_capacity(64 * 1024, s.try_clone()?);
    Ok((s, r))
}

// ---------------------------------------------------------------------------------------
// One run

#[derive(Default)]
struct RunResult {
    /// Small GET latencies from the scheduled send time, µs.
    scheduled_us: Vec<u32>,
    /// Small GET service times (write to reply), µs.
    service_us: Vec<u32>,
    /// Heavy request durations, ms (write to last byte of the reply).
    heavy_ms: Vec<f64>,
    errors: Vec<String>,
}

/// One small client: a GET scheduled every SMALL_INTERVAL until `stop`, each reply checked.
/// Returns (latencies from the scheduled time, service times), µs.
fn small_client(
    port: u16,
    seed: u64,
    start: Instant,
    stop: &AtomicBool,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let (mut w, mut r) = open(port).map_err(|e| format!("small client: connect: {e}"))?;
    let (mut scheduled, mut service) = (Vec::new(), Vec::new());
    let us = |d: Duration| d.as_micros().min(u32::MAX as u128) as u32;
    let mut next = Instant::now();
    let mut i = seed;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        // A fixed stride through the keys, different per client.
        i = (i + 7919) % KEY_COUNT;
        let key = format!("key:{i}");
        let sent = Instant::now();
        w.write_all(&resp_command(&[b"GET", key.as_bytes()]))
            .map_err(|e| format!("small client: write: {e}"))?;
        let value = read_bulk(&mut r).map_err(|e| format!("small client: GET {key}: {e}"))?;
        let done = Instant::now();
        if value != format!("value:{i}").as_bytes() {
            return Err(format!(
                "small client: GET {key} answered {:?} (another request's reply?)",
                String::from_utf8_lossy(&value[..value.len().min(40)])
            ));
        }
        if next.duration_since(start) >= WARMUP {
            scheduled.push(us(done.duration_since(next)));
            service.push(us(done.duration_since(sent)));
        }
        // The schedule does not slip: after a stall the late GETs go out back to back,
        // each counted from when it should have been sent.
        next += SMALL_INTERVAL;
    }
    Ok((scheduled, service))
}

/// The heavy client: `heavy`'s command, read to the end, a pause, again, until `stop`.
fn heavy_client(
    port: u16,
    heavy: Heavy,
    pause: Duration,
    stop: &AtomicBool,
) -> Result<Vec<f64>, String> {
    let cmd = heavy.command().expect("a heavy command");
    let (mut w, mut r) = open(port).map_err(|e| format!("heavy client: connect: {e}"))?;
    let mut durations = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        w.write_all(&cmd)
            .map_err(|e| format!("heavy client: write: {e}"))?;
        let size =
            skip_reply(&mut r).map_err(|e| format!("heavy client: {}: {e}", heavy.label()))?;
        durations.push(sent.elapsed().as_secs_f64() * 1e3);
        let expected = match heavy {
            Heavy::BigGet => size == BIG_BYTES as u64,
            Heavy::Keys => size >= KEY_COUNT,
            Heavy::None => true,
        };
        if !expected {
            return Err(format!(
                "heavy client: {} returned {size} (bytes or elements)",
                heavy.label()
            ));
        }
        thread::sleep(pause);
    }
    Ok(durations)
}

fn run(port: u16, heavy: Heavy, seconds: f64, pause: Duration) -> RunResult {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let heavy_thread = (heavy != Heavy::None).then(|| {
        let stop = stop.clone();
        thread::spawn(move || heavy_client(port, heavy, pause, &stop))
    });
    let small: Vec<_> = (0..SMALL_CLIENTS as u64)
        .map(|c| {
            let stop = stop.clone();
            thread::spawn(move || small_client(port, c * 10_007, start, &stop))
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut out = RunResult::default();
    for t in small {
        match t.join().expect("small client panicked") {
            Ok((scheduled, service)) => {
                out.scheduled_us.extend(scheduled);
                out.service_us.extend(service);
            }
            Err(e) => out.errors.push(e),
        }
    }
    if let Some(t) = heavy_thread {
        match t.join().expect("heavy client panicked") {
            Ok(d) => out.heavy_ms = d,
            Err(e) => out.errors.push(e),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Report

#[derive(Clone, Copy)]
struct Stats {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Percentiles (nearest rank) of latencies in µs, reported in ms.
fn stats(mut us: Vec<u32>) -> Option<Stats> {
    if us.is_empty() {
        return None;
    }
    us.sort_unstable();
    let at =
        |q: f64| us[((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1] as f64 / 1e3;
    Some(Stats {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: *us.last().unwrap() as f64 / 1e3,
    })
}

/// Each figure's median over rounds: one round's stall (the machine is shared) moves it less
/// than it moves percentiles of the pooled samples.
fn over_rounds(rounds: &[Stats]) -> Option<Stats> {
    let m = |f: fn(&Stats) -> f64| median(rounds.iter().map(f).collect());
    (!rounds.is_empty()).then(|| Stats {
        p50: m(|s| s.p50),
        p99: m(|s| s.p99),
        p999: m(|s| s.p999),
        max: m(|s| s.max),
    })
}

/// One (scenario, target) over all rounds.
#[derive(Default)]
struct Acc {
    /// Small GETs counted.
    count: usize,
    /// Per round: latency from schedule, and service time.
    scheduled: Vec<Stats>,
    service: Vec<Stats>,
    heavy_ms: Vec<f64>,
    errors: Vec<String>,
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn main() {
    let quick = env_flag("STORMWALL_BENCH_QUICK");
    let rounds: usize = env_num("STORMWALL_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 });
    let seconds: f64 = env_num("STORMWALL_BENCH_SECONDS").unwrap_or(if quick { 2.0 } else { 5.0 });
    let pause = Duration::from_millis(env_num("STORMWALL_BENCH_HEAVY_PAUSE_MS").unwrap_or(250));
    let scenarios: Vec<Heavy> = match std::env::var("STORMWALL_BENCH_SCENARIOS") {
        Ok(list) => {
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                assert!(
                    Heavy::ALL.iter().any(|h| h.key() == *w),
                    "STORMWALL_BENCH_SCENARIOS: unknown scenario {w:?} (baseline, get, keys)"
                );
            }
            Heavy::ALL
                .into_iter()
                .filter(|h| wanted.contains(&h.key()))
                .collect()
        }
        Err(_) => Heavy::ALL.to_vec(),
    };
    let started = Instant::now();

    let tmp = tempfile::tempdir().unwrap();
    let (_redis, redis_port) = start_redis(&["--enable-debug-command", "local"]);
    {
        let mut con = connect(redis_port);
        let _: () = redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(KEY_COUNT)
            .arg("key")
            .query(&mut con)
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(BIG_KEY)
            .arg(vec![b'x'; BIG_BYTES])
            .query(&mut con)
            .unwrap();
    }

    // (name, port); the processes live until the end of main.
    let mut targets: Vec<(String, u16)> = vec![("direct".into(), redis_port)];
    let mut procs = Vec::new();
    for mode in Mode::BOTH {
        let (p, port) = start_stormwall_mode(
            redis_port,
            mode,
            &["--admin", "127.0.0.1:0", "--log-level", "warn"],
        );
        targets.push((mode.label(), port));
        procs.push(p);
    }
    if let Some((p, port)) = start_twemproxy(redis_port, tmp.path()) {
        targets.push(("twemproxy".into(), port));
        procs.push(p);
    }
    let runs_for = |heavy: Heavy| -> Vec<usize> {
        (0..targets.len())
            // twemproxy refuses KEYS (and closes the connection).
            .filter(|&t| !(heavy == Heavy::Keys && targets[t].0 == "twemproxy"))
            .collect()
    };

    // results[scenario][target], over rounds
    let mut results: Vec<Vec<Acc>> = scenarios
        .iter()
        .map(|_| targets.iter().map(|_| Acc::default()).collect())
        .collect();
    for round in 0..rounds {
        for (hi, &heavy) in scenarios.iter().enumerate() {
            let which = runs_for(heavy);
            for k in 0..which.len() {
                let ti = which[(round + k) % which.len()];
                let r = run(targets[ti].1, heavy, seconds, pause);
                let s = stats(r.scheduled_us.clone());
                let service = stats(r.service_us.clone());
                println!(
                    "round {}/{rounds} {:<26} {:<19} small GETs: {:>6}  from schedule p50 {} p99 {} p99.9 {}  longest {} ms  heavy: {} × {} ms{}",
                    round + 1,
                    heavy.label(),
                    targets[ti].0,
                    r.scheduled_us.len(),
                    ms(s.as_ref().map(|s| s.p50)),
                    ms(s.as_ref().map(|s| s.p99)),
                    ms(s.as_ref().map(|s| s.p999)),
                    ms(service.as_ref().map(|s| s.max)),
                    r.heavy_ms.len(),
                    ms((!r.heavy_ms.is_empty()).then(|| median(r.heavy_ms.clone()))),
                    if r.errors.is_empty() {
                        String::new()
                    } else {
                        format!("  ERRORS: {}", r.errors.join("; "))
                    }
                );
                let acc = &mut results[hi][ti];
                acc.count += r.scheduled_us.len();
                acc.scheduled.extend(s);
                acc.service.extend(service);
                acc.heavy_ms.extend(r.heavy_ms);
                acc.errors.extend(r.errors);
                // Let the machine calm down (the proxies release buffers, Redis frees
                // the output buffers of the heavy client) before the next run.
                thread::sleep(Duration::from_millis(500));
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(procs);

    let command = bench_command(
        "head_of_line",
        &[
            "STORMWALL_BENCH_QUICK",
            "STORMWALL_BENCH_ROUNDS",
            "STORMWALL_BENCH_SECONDS",
            "STORMWALL_BENCH_HEAVY_PAUSE_MS",
            "STORMWALL_BENCH_SCENARIOS",
        ],
    );
    let mut md = report_header(
        "Head-of-line: small GETs next to a client with large replies",
        &command,
    );
    let names: Vec<&str> = targets.iter().map(|t| t.0.as_str()).collect();
    let w = &mut md;
    let mut line = |text: String| writeln!(w, "{text}").unwrap();
    line(format!("| machine | {} |", cores_and_cpu()));
    line(format!(
        "| redis | {} |",
        version_of("redis-server", &["--version"])
    ));
    if names.contains(&"twemproxy") {
        line(format!(
            "| twemproxy | {} |",
            version_of("nutcracker", &["-V"])
        ));
    }
    line(format!(
        "| stormwall | {} (release build, default config but `upstream.mode`) |",
        stormwall_revision()
    ));
    line(format!(
        "| load | {SMALL_CLIENTS} clients × one `GET key:N` (~7 B values) every {} ms, paced closed loop; heavy client: `GET` of a {} MiB value or `KEYS *` over {KEY_COUNT} keys, {} ms pause between requests |",
        SMALL_INTERVAL.as_millis(),
        BIG_BYTES >> 20,
        pause.as_millis()
    ));
    line(format!(
        "| runs | {rounds} round(s) × {seconds} s per (scenario, target), targets rotated per round, first {} ms of each run not counted; wall time {elapsed:.0} s |",
        WARMUP.as_millis()
    ));
    line(
        "\nLatency of the small GETs in ms, each figure per run and then its median over \
         rounds: *from schedule* = from the time the \
         GET was due to the last byte of its reply (how long, and for how much of the time, \
         clients were held up); *longest GET* = the longest service time (write to reply) of \
         any single small GET: the head-of-line wait itself. Heavy = the heavy client's own \
         requests (count and median duration): roughly the time to produce and move its \
         reply. twemproxy does not support `KEYS`.\n"
            .into(),
    );

    // (scenario, target) → stats of one of the two latency series.
    let stat = |hi: usize, ti: usize, service: bool| -> Option<Stats> {
        if !runs_for(scenarios[hi]).contains(&ti) {
            return None;
        }
        let r = &results[hi][ti];
        over_rounds(if service { &r.service } else { &r.scheduled })
    };
    // (title, service times rather than from schedule, the figure)
    type Figure = fn(&Stats) -> f64;
    let matrices: [(&str, bool, Figure); 3] = [
        ("p99 from schedule (ms)", false, |s| s.p99),
        ("p99.9 from schedule (ms)", false, |s| s.p999),
        ("Longest single small GET (ms)", true, |s| s.max),
    ];
    for (title, service, f) in matrices {
        line(format!("## {title}\n"));
        line(format!("| scenario | {} |", names.join(" | ")));
        line(format!("| --- |{}", " ---: |".repeat(names.len())));
        for (hi, heavy) in scenarios.iter().enumerate() {
            let cells: Vec<String> = (0..names.len())
                .map(|ti| ms(stat(hi, ti, service).map(|s| f(&s))))
                .collect();
            line(format!("| {} | {} |", heavy.label(), cells.join(" | ")));
        }
        line(String::new());
    }

    line("## All figures\n".into());
    line(
        "| scenario | target | small GETs | from schedule: p50 | p99 | p99.9 | max | service time: p99 | p99.9 | max | heavy requests (median ms) | errors |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
            .into(),
    );
    for (hi, heavy) in scenarios.iter().enumerate() {
        for ti in runs_for(*heavy) {
            let r = &results[hi][ti];
            let s = stat(hi, ti, false);
            let v = stat(hi, ti, true);
            let heavy_cell = if *heavy == Heavy::None {
                "–".to_string()
            } else if r.heavy_ms.is_empty() {
                "0".to_string()
            } else {
                format!("{} ({:.1})", r.heavy_ms.len(), median(r.heavy_ms.clone()))
            };
            let mut errors = r.errors.join("; ").replace('|', "\\|");
            if errors.is_empty() {
                errors = "none".into();
            }
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {heavy_cell} | {errors} |",
                heavy.label(),
                names[ti],
                r.count,
                ms(s.as_ref().map(|s| s.p50)),
                ms(s.as_ref().map(|s| s.p99)),
                ms(s.as_ref().map(|s| s.p999)),
                ms(s.as_ref().map(|s| s.max)),
                ms(v.as_ref().map(|s| s.p99)),
                ms(v.as_ref().map(|s| s.p999)),
                ms(v.as_ref().map(|s| s.max)),
            ));
        }
    }
    print!("\n{md}");
    std::fs::write(results_dir().join("head_of_line.md"), md).unwrap();
    println!("wrote results/head_of_line.md");
}
