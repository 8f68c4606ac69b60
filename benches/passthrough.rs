//! What the proxy costs ordinary traffic: `redis-benchmark` GET and SET against Redis
//! directly, through stormwall in both upstream modes (`upstream.mode = "shared"`: clients
//! multiplexed onto a few Redis connections, issue 9; `"dedicated"`: one Redis connection
//! per client), and through twemproxy (`nutcracker`, when installed), in the same run,
//! interleaved, repeated; and what each path costs Redis itself in CPU per request.
//!
//! Run: `cargo bench --bench passthrough` (about 5–6 minutes). Writes
//! `results/passthrough.md` and `results/passthrough.png`.
//!
//! Environment: `STORMWALL_BENCH_QUICK=1` (one round of short runs, for checking that the
//! bench works), `STORMWALL_BENCH_ROUNDS=N`, `STORMWALL_BENCH_SECONDS=S` (target length of
//! one run against Redis directly), `STORMWALL_BENCH_FONT=path.ttf` (font for the chart).
//!
//! Method. One redis-server, two stormwalls (one per mode, default config otherwise) and one
//! twemproxy (one pool, one server, its defaults: all clients share one upstream
//! connection) for the whole run. Each case — GET or SET, value size, pipeline depth, client
//! count — gets one request count, calibrated on Redis directly so that a direct run lasts
//! about `STORMWALL_BENCH_SECONDS`; every target then does the same work. Within a round the
//! targets run back to back for each case, starting with a different target each round, so
//! slow drifts of the machine hit all of them alike. The report gives medians over rounds
//! (throughput, each latency percentile and each CPU figure separately) and the min–max
//! throughput spread.
//!
//! CPU per request: user + system time (`/proc/PID/stat`) that Redis, and the proxy, used
//! during one redis-benchmark run, divided by its requests. On a 2-core machine shared by
//! the load generator, Redis and the proxy, CPU per request is steadier than requests/s,
//! and it shows where sharing pays: Redis reading many clients' commands from one
//! connection does one read and one write per batch instead of per command.
//!
//! The issue-9 targets (shared mode) are printed next to the measured values as PASS/MISS;
//! the bench never fails on them.
//!
//! TLS (issue 11), in the same run: a second redis-server with a `--tls-port` (certificates
//! generated for the run with rcgen), `redis-benchmark --tls` against that port directly and
//! through a stormwall with TLS on both hops, beside the same cases in plaintext (that Redis's
//! plain port directly and through a plaintext stormwall), at P1 and P16; and the handshake
//! rate: `-k 0`, a new connection for every request.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use common::redis_benchmark::{
    CLIENTS, Case, Op, Summary, Target, calibrate, cell, fmt_rps, run_rounds,
};
use common::{
    Mode, bench_command, connect, cores_and_cpu, env_flag, env_num, register_font, report_header,
    results_dir, start_redis, start_stormwall_mode, start_twemproxy, stormwall_revision,
    version_of,
};

const SIZES: [usize; 2] = [16, 1024];
const PIPELINES: [u32; 2] = [1, 16];
/// The key `redis-benchmark -t get/set` uses when `-r` is not given.
const BENCH_KEY: &str = "key:__rand_int__";

/// The CA certificate `redis-benchmark --tls` trusts (set once the TLS part starts).
static TLS_CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// redis-benchmark's arguments for TLS.
fn tls_args() -> Vec<String> {
    let ca = TLS_CA.get().expect("TLS CA not generated");
    vec!["--tls".into(), "--cacert".into(), ca.display().to_string()]
}

/// Makes `GET key:__rand_int__` return a value of `size` bytes.
fn preload(redis_port: u16, size: usize) {
    let _: () = redis::cmd("SET")
        .arg(BENCH_KEY)
        .arg(vec![b'x'; size])
        .query(&mut connect(redis_port))
        .unwrap();
}

/// The issue-9 targets for shared mode (see `issues show 9`), checked against medians.
const TARGET_P1_VS_DIRECT: f64 = 1.0;
const TARGET_P16_VS_DIRECT: f64 = 0.8;
const TARGET_ONE_CLIENT_ADDED_P99_MS: f64 = 0.05;
const TARGET_REDIS_CPU_VS_DIRECT: f64 = 0.5;

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "**MISS**" }
}

fn main() {
    let quick = env_flag("STORMWALL_BENCH_QUICK");
    let rounds: usize = env_num("STORMWALL_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 });
    let seconds: f64 = env_num("STORMWALL_BENCH_SECONDS").unwrap_or(if quick { 0.4 } else { 1.5 });
    assert!(rounds >= 1 && seconds > 0.0);
    let started = Instant::now();

    let tmp = tempfile::tempdir().unwrap();
    let (redis, redis_port) = start_redis(&[]);
    let redis_pid = redis.pid();
    let mut targets = vec![Target {
        name: "direct".into(),
        port: redis_port,
        args: Vec::new(),
        server_pids: vec![redis_pid],
        proxy_pid: None,
    }];
    // Both modes side by side, each its own process with its default config otherwise.
    let mut stormwalls = Vec::new();
    for mode in Mode::BOTH {
        let (proc, port) = start_stormwall_mode(
            redis_port,
            mode,
            &["--admin", "127.0.0.1:0", "--log-level", "warn"],
        );
        targets.push(Target {
            name: mode.label(),
            port,
            args: Vec::new(),
            server_pids: vec![redis_pid],
            proxy_pid: Some(proc.pid()),
        });
        stormwalls.push(proc);
    }
    let twemproxy = start_twemproxy(redis_port, tmp.path());
    if let Some((proc, port)) = &twemproxy {
        targets.push(Target {
            name: "twemproxy".into(),
            port: *port,
            args: Vec::new(),
            server_pids: vec![redis_pid],
            proxy_pid: Some(proc.pid()),
        });
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let index = |name: &str| names.iter().position(|n| *n == name);
    let (shared, dedicated, tw) = (
        index(&Mode::Shared.label()).unwrap(),
        index(&Mode::Dedicated.label()).unwrap(),
        index("twemproxy"),
    );

    let mut cases = Vec::new();
    for size in SIZES {
        for pipeline in PIPELINES {
            for op in [Op::Set, Op::Get] {
                cases.push(Case {
                    op,
                    size,
                    pipeline,
                    clients: CLIENTS,
                    reconnect: false,
                });
            }
        }
    }
    // One client: what a proxy adds to a request when the CPU is not saturated (with 50
    // clients on 2 cores, everything queues for CPU and the added latency is mostly that).
    for op in [Op::Set, Op::Get] {
        cases.push(Case {
            op,
            size: 16,
            pipeline: 1,
            clients: 1,
            reconnect: false,
        });
    }

    // Makes `GET key:__rand_int__` return a value of the case's size.
    let before_case = |case: &Case| {
        if case.op == Op::Get {
            preload(redis_port, case.size);
        }
    };
    // Calibrate: one request count per case, so that a direct run takes about `seconds`.
    let counts = calibrate(&cases, &targets[0], seconds, 10_000, before_case);
    let summaries = run_rounds(&cases, &targets, &counts, rounds, before_case);
    let tls_report = tls_part(rounds, seconds);
    let elapsed = started.elapsed().as_secs_f64();

    // Report.
    let command = bench_command(
        "passthrough",
        &[
            "STORMWALL_BENCH_QUICK",
            "STORMWALL_BENCH_ROUNDS",
            "STORMWALL_BENCH_SECONDS",
        ],
    );
    let mut md = report_header(
        "Passthrough: direct Redis vs stormwall (shared and dedicated) vs twemproxy",
        &command,
    );
    let w = &mut md;
    let mut line = |text: String| writeln!(w, "{text}").unwrap();
    line(format!("| machine | {} |", cores_and_cpu()));
    line(format!(
        "| redis | {} |",
        version_of("redis-server", &["--version"])
    ));
    line(format!(
        "| twemproxy | {} |",
        if tw.is_some() {
            version_of("nutcracker", &["-V"])
        } else {
            "not installed: rows skipped".into()
        }
    ));
    line(format!(
        "| stormwall | {} (release build, default config but `upstream.mode`; two processes, one per mode) |",
        stormwall_revision()
    ));
    line(format!(
        "| load | `redis-benchmark -c {CLIENTS} -n N -d SIZE -P DEPTH -t get\\|set`, plus `-c 1 -P 1` GET and SET (N calibrated per case for ~{seconds} s against Redis directly, same N for every target) |"
    ));
    line(format!(
        "| rounds | {rounds}, targets interleaved within each case, start target rotated per round; wall time {elapsed:.0} s |"
    ));
    line(
        "\nEverything runs on the same machine: redis-benchmark, Redis and the proxies share its \
         cores, so a proxy also competes with the load generator for CPU. twemproxy runs one \
         pool (`redis: true`, `hash: fnv1a_64`, `distribution: ketama`, one server) with \
         its defaults (`server_connections: 1`: all clients are multiplexed onto one \
         upstream connection). stormwall shared multiplexes its clients onto \
         `upstream.shared_connections` connections (default: one per runtime worker thread); \
         stormwall dedicated gives each client its own upstream connection. \
         Values are medians over rounds (each column separately); latency in ms as measured \
         by redis-benchmark (per request, from the write of its pipeline); p99.9 is the first \
         percentile at or above 99.9% in redis-benchmark's HdrHistogram listing. CPU per \
         request is user + system time from `/proc/PID/stat` during the run divided by its \
         requests (clock-tick resolution: 10 ms per run).\n"
            .into(),
    );

    // The targets of issue 9 first: the figures the lead is waiting for.
    line("## Issue 9 targets (stormwall shared)\n".into());
    line(
        "| target | case | shared | verdict | dedicated | twemproxy |\n| --- | --- | ---: | --- | ---: | ---: |"
            .into(),
    );
    let tw_cell = |f: &dyn Fn(&[Summary], usize) -> String, s: &[Summary]| match tw {
        Some(t) => f(s, t),
        None => "–".into(),
    };
    let ratio = |s: &[Summary], t: usize| format!("{:.2}×", s[t].rps / s[0].rps);
    let added = |s: &[Summary], t: usize| format!("{:+.3} ms", s[t].p99 - s[0].p99);
    let cpu = |s: &[Summary], t: usize| {
        format!(
            "{:.2} µs ({:.2}×)",
            s[t].redis_cpu_us,
            s[t].redis_cpu_us / s[0].redis_cpu_us
        )
    };
    for (ci, case) in cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.clients == CLIENTS)
    {
        let s = &summaries[ci];
        let want = if case.pipeline == 1 {
            TARGET_P1_VS_DIRECT
        } else {
            TARGET_P16_VS_DIRECT
        };
        line(format!(
            "| throughput ≥ {want:.1}× direct | {} | {} | {} | {} | {} |",
            case.label(),
            ratio(s, shared),
            verdict(s[shared].rps / s[0].rps >= want),
            ratio(s, dedicated),
            tw_cell(&ratio, s),
        ));
    }
    for (ci, case) in cases.iter().enumerate().filter(|(_, c)| c.clients == 1) {
        let s = &summaries[ci];
        line(format!(
            "| added p99 ≤ {TARGET_ONE_CLIENT_ADDED_P99_MS} ms | {} | {} | {} | {} | {} |",
            case.label(),
            added(s, shared),
            verdict(s[shared].p99 - s[0].p99 <= TARGET_ONE_CLIENT_ADDED_P99_MS),
            added(s, dedicated),
            tw_cell(&added, s),
        ));
    }
    // Redis CPU is judged where sharing has something to save: 50 unpipelined clients.
    // With -P 16 Redis already reads 16 commands per read directly, and one client has no
    // one to share a connection with (see the CPU table below for every case).
    for (ci, case) in cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.clients == CLIENTS && c.pipeline == 1)
    {
        let s = &summaries[ci];
        line(format!(
            "| Redis CPU per request ≤ {TARGET_REDIS_CPU_VS_DIRECT}× direct's ({:.2} µs) | {} | {} | {} | {} | {} |",
            s[0].redis_cpu_us,
            case.label(),
            cpu(s, shared),
            verdict(s[shared].redis_cpu_us <= TARGET_REDIS_CPU_VS_DIRECT * s[0].redis_cpu_us),
            cpu(s, dedicated),
            tw_cell(&cpu, s),
        ));
    }

    line("\n## Throughput and latency\n".into());
    line(
        "| case | target | requests/s (median) | min–max over rounds | p50 ms | p99 ms | p99.9 ms | Redis CPU µs/request | proxy CPU µs/request |"
            .into(),
    );
    line("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |".into());
    for (ci, case) in cases.iter().enumerate() {
        for (ti, name) in names.iter().enumerate() {
            let s = &summaries[ci][ti];
            line(format!(
                "| {} | {name} | {:.0} | {}–{} | {:.3} | {:.3} | {:.3} | {:.2} | {} |",
                case.label(),
                s.rps,
                fmt_rps(s.rps_min),
                fmt_rps(s.rps_max),
                s.p50,
                s.p99,
                s.p999,
                s.redis_cpu_us,
                cell(s.proxy_cpu_us, 2),
            ));
        }
    }

    line("\n## Relative to direct Redis and to twemproxy\n".into());
    line("Throughput as a ratio of medians; p99 added = proxy's median p99 − direct's.\n".into());
    line(
        "| case | shared / direct | dedicated / direct | twemproxy / direct | shared / twemproxy | dedicated / twemproxy | p99 added: shared (ms) | dedicated | twemproxy |"
            .into(),
    );
    line("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |".into());
    for (ci, case) in cases.iter().enumerate() {
        let s = &summaries[ci];
        let vs =
            |a: usize, b: Option<usize>| b.map_or("–".into(), |b| cell(s[a].rps / s[b].rps, 2));
        let added =
            |t: Option<usize>| t.map_or("–".into(), |t| format!("{:+.3}", s[t].p99 - s[0].p99));
        line(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            case.label(),
            vs(shared, Some(0)),
            vs(dedicated, Some(0)),
            tw.map_or("–".into(), |t| vs(t, Some(0))),
            vs(shared, tw),
            vs(dedicated, tw),
            added(Some(shared)),
            added(Some(dedicated)),
            added(tw),
        ));
    }

    line("\n## One client: latency\n".into());
    line(
        "What a proxy adds to one request when nothing queues for CPU (`-c 1 -P 1`, 16 B).\n"
            .into(),
    );
    line("| case | target | p50 ms | p99 ms | p99 added vs direct (ms) |\n| --- | --- | ---: | ---: | ---: |".into());
    for (ci, case) in cases.iter().enumerate().filter(|(_, c)| c.clients == 1) {
        let s = &summaries[ci];
        for (ti, name) in names.iter().enumerate() {
            line(format!(
                "| {} | {name} | {:.3} | {:.3} | {} |",
                case.label(),
                s[ti].p50,
                s[ti].p99,
                if ti == 0 {
                    "–".into()
                } else {
                    format!("{:+.3}", s[ti].p99 - s[0].p99)
                }
            ));
        }
    }

    line("\n## CPU per request\n".into());
    line(
        "µs of user + system time per request (medians over rounds). Redis's column is the \
         cost the proxy passes on to the server; the proxy's is its own.\n"
            .into(),
    );
    let mut head = String::from("| case |");
    let mut rule = String::from("| --- |");
    for name in &names {
        write!(head, " Redis: {name} |").unwrap();
        rule.push_str(" ---: |");
    }
    head.push_str(" Redis: shared / direct |");
    rule.push_str(" ---: |");
    for name in names.iter().skip(1) {
        write!(head, " proxy: {name} |").unwrap();
        rule.push_str(" ---: |");
    }
    line(head);
    line(rule);
    for (ci, case) in cases.iter().enumerate() {
        let s = &summaries[ci];
        let mut row = format!("| {} |", case.label());
        for t in s {
            write!(row, " {:.2} |", t.redis_cpu_us).unwrap();
        }
        write!(row, " {:.2} |", s[shared].redis_cpu_us / s[0].redis_cpu_us).unwrap();
        for t in s.iter().skip(1) {
            write!(row, " {} |", cell(t.proxy_cpu_us, 2)).unwrap();
        }
        line(row);
    }

    line(tls_report);

    let dir = results_dir();
    let png = dir.join("passthrough.png");
    match chart(&png, &cases, &names, &summaries) {
        Ok(()) => line("\n![throughput, p99 and Redis CPU per case](passthrough.png)".into()),
        Err(e) => {
            println!("note: chart not drawn: {e}");
            line(format!("\n(Chart not drawn: {e}.)"));
        }
    }
    print!("\n{md}");
    std::fs::write(dir.join("passthrough.md"), md).unwrap();
    println!("wrote results/passthrough.md");
    drop(twemproxy);
    drop(stormwalls);
}

// ---------------------------------------------------------------------------------------
// TLS (issue 11)

/// Writes a CA and a server certificate for 127.0.0.1 into `dir`: (ca, cert, key).
fn tls_material(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (redis-benchmark) takes a leaf whose issuer name is its own
    // subject for self-signed, and fails to verify it.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "passthrough bench CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "passthrough bench server");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// The TLS cases: direct and through stormwall (shared mode), each in plaintext and with
/// TLS on both hops, against one Redis that has both ports. Returns the report section.
fn tls_part(rounds: usize, seconds: f64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = tls_material(dir.path());
    TLS_CA.set(ca.clone()).ok();
    let redis_tls_port = common::free_port();
    let (redis, redis_port) = start_redis(&[
        "--tls-port",
        &redis_tls_port.to_string(),
        "--tls-cert-file",
        &crt.display().to_string(),
        "--tls-key-file",
        &key.display().to_string(),
        "--tls-ca-cert-file",
        &ca.display().to_string(),
        "--tls-auth-clients",
        "no",
    ]);
    let redis_pid = redis.pid();
    let quiet = ["--admin", "127.0.0.1:0", "--log-level", "warn"];
    let (plain_sw, plain_sw_port) = start_stormwall_mode(redis_port, Mode::Shared, &quiet);
    let sw_tls_port = common::free_port();
    let config = format!(
        "[listen.tls]\naddress = \"127.0.0.1:{sw_tls_port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [upstream]\nmode = \"shared\"\n[upstream.tls]\nenabled = true\nca_file = \"{}\"\n",
        crt.display(),
        key.display(),
        ca.display()
    );
    let (tls_sw, _) = common::start_stormwall_config(redis_tls_port, &config, &quiet);
    let targets = [
        Target {
            name: "direct".into(),
            port: redis_port,
            args: Vec::new(),
            server_pids: vec![redis_pid],
            proxy_pid: None,
        },
        Target {
            name: "stormwall".into(),
            port: plain_sw_port,
            args: Vec::new(),
            server_pids: vec![redis_pid],
            proxy_pid: Some(plain_sw.pid()),
        },
        Target {
            name: "direct TLS".into(),
            port: redis_tls_port,
            args: tls_args(),
            server_pids: vec![redis_pid],
            proxy_pid: None,
        },
        Target {
            name: "stormwall TLS".into(),
            port: sw_tls_port,
            args: tls_args(),
            server_pids: vec![redis_pid],
            proxy_pid: Some(tls_sw.pid()),
        },
    ];
    let mut cases = Vec::new();
    for pipeline in PIPELINES {
        for op in [Op::Set, Op::Get] {
            cases.push(Case {
                op,
                size: 16,
                pipeline,
                clients: CLIENTS,
                reconnect: false,
            });
        }
    }
    cases.push(Case {
        op: Op::Set,
        size: 16,
        pipeline: 1,
        clients: CLIENTS,
        reconnect: true,
    });
    let before_case = |case: &Case| {
        if case.op == Op::Get {
            preload(redis_port, case.size);
        }
    };
    // Calibrated on direct TLS, the slower of the two direct paths.
    let counts = calibrate(&cases, &targets[2], seconds, 2_000, before_case);
    let summaries = run_rounds(&cases, &targets, &counts, rounds, before_case);
    let mut md = String::new();
    let w = &mut md;
    let mut line = |text: String| writeln!(w, "{text}").unwrap();
    line("\n## TLS (issue 11)\n".into());
    line(format!(
        "A second redis-server with a TLS port (`--tls-port`, `--tls-auth-clients no`, \
         certificates generated for the run), {CLIENTS} clients, 16 B values. `direct`/`stormwall`: \
         its plain port, directly and through a plaintext stormwall (shared); `direct TLS`/\
         `stormwall TLS`: `redis-benchmark --tls` against its TLS port directly and through a \
         stormwall with TLS on both hops (shared). The last case opens a new connection for \
         every request (`-k 0`): requests per second there are connections (TLS: full \
         handshakes, both hops for stormwall) per second. Target: the TLS ratio (stormwall TLS \
         / direct TLS) at least the plaintext ratio (stormwall / direct) of the same run, \
         within 5%. Medians over {rounds} rounds.\n"
    ));
    line(
        "| case | direct | stormwall | ratio | direct TLS | stormwall TLS | TLS ratio | verdict | p99 ms: direct TLS / stormwall TLS |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
            .into(),
    );
    for (ci, case) in cases.iter().enumerate() {
        let s = &summaries[ci];
        let plain = s[1].rps / s[0].rps;
        let tls = s[3].rps / s[2].rps;
        line(format!(
            "| {} | {} | {} | {plain:.2}× | {} | {} | {tls:.2}× | {} | {:.3} / {:.3} |",
            case.label(),
            fmt_rps(s[0].rps),
            fmt_rps(s[1].rps),
            fmt_rps(s[2].rps),
            fmt_rps(s[3].rps),
            verdict(tls >= plain * 0.95),
            s[2].p99,
            s[3].p99,
        ));
    }
    drop((plain_sw, tls_sw, redis));
    md
}

// ---------------------------------------------------------------------------------------
// Chart

/// One chart panel: title, y-axis unit, value per (case, target).
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    value: Box<dyn Fn(usize, usize) -> f64 + 'a>,
}

fn chart(
    path: &Path,
    cases: &[Case],
    targets: &[&str],
    summaries: &[Vec<Summary>],
) -> Result<(), String> {
    use plotters::prelude::*;

    register_font()?;
    let colors = [
        RGBColor(90, 90, 90),
        RGBColor(214, 39, 40),
        RGBColor(255, 152, 150),
        RGBColor(31, 119, 180),
    ];
    // One slot per bar, plus one empty slot between cases.
    let per = targets.len() + 1;
    let slots = cases.len() * per;
    let panels = [
        Panel {
            title: "Throughput (thousand requests/s, median; higher is better)",
            unit: "k requests/s",
            value: Box::new(|c, t| summaries[c][t].rps / 1e3),
        },
        Panel {
            title: "Throughput relative to direct Redis (direct = 1)",
            unit: "× direct",
            value: Box::new(|c, t| summaries[c][t].rps / summaries[c][0].rps),
        },
        Panel {
            title: "p99 latency (ms, median; lower is better)",
            unit: "ms",
            value: Box::new(|c, t| summaries[c][t].p99),
        },
        Panel {
            title: "Redis CPU per request (µs, median; lower is better)",
            unit: "µs",
            value: Box::new(|c, t| summaries[c][t].redis_cpu_us),
        },
    ];
    let root = BitMapBackend::new(path, (1500, 1800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, panel) in areas.iter().zip(&panels) {
        let top = (0..cases.len())
            .flat_map(|c| (0..targets.len()).map(move |t| (c, t)))
            .map(|(c, t)| (panel.value)(c, t))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.4; // headroom for the legend
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(70)
            .build_cartesian_2d((0..slots).into_segmented(), 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(slots + 1)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if i % per == targets.len() / 2 => cases[i / per].label(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| {
                if top < 10.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            })
            .y_desc(panel.unit)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        for (ti, name) in targets.iter().enumerate() {
            let color = colors[ti % colors.len()];
            chart
                .draw_series((0..cases.len()).map(|ci| {
                    let slot = ci * per + ti;
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(slot), 0.0),
                            (SegmentValue::Exact(slot + 1), (panel.value)(ci, ti)),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 1, 1);
                    bar
                }))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
