//! What the proxy costs ordinary traffic: `redis-benchmark` GET and SET against Redis
//! directly, through stormwall, and through twemproxy (`nutcracker`, when installed), in the
//! same run, interleaved, repeated.
//!
//! Run: `cargo bench --bench passthrough` (about 2–3 minutes). Writes
//! `results/passthrough.md` and `results/passthrough.png`.
//!
//! Environment: `STORMWALL_BENCH_QUICK=1` (one round of short runs, for checking that the
//! bench works), `STORMWALL_BENCH_ROUNDS=N`, `STORMWALL_BENCH_SECONDS=S` (target length of
//! one run against Redis directly), `STORMWALL_BENCH_FONT=path.ttf` (font for the chart).
//!
//! Method. One redis-server, one stormwall and one twemproxy (one pool, one server, its
//! defaults: all clients share one upstream connection) for the whole run. Each case — GET
//! or SET, value size, pipeline depth — gets one request count, calibrated on Redis directly
//! so that a direct run lasts about `STORMWALL_BENCH_SECONDS`; every target then does the
//! same work. Within a round the targets run back to back for each case, starting with a
//! different target each round, so slow drifts of the machine hit all of them alike. The
//! report gives medians over rounds (throughput and each latency percentile separately)
//! and the min–max throughput spread.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{
    Proc, connect, cores_and_cpu, env_flag, free_port, register_font, report_header, results_dir,
    sh, start_redis, start_stormwall, wait_port,
};

const CLIENTS: u32 = 50;
const SIZES: [usize; 2] = [16, 1024];
const PIPELINES: [u32; 2] = [1, 16];
/// The key `redis-benchmark -t get/set` uses when `-r` is not given.
const BENCH_KEY: &str = "key:__rand_int__";

// ---------------------------------------------------------------------------------------
// Processes

/// twemproxy with one pool in front of Redis, or `None` (with a note) if it is not installed.
fn start_twemproxy(upstream: u16, dir: &Path) -> Option<(Proc, u16)> {
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

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// First line of a command's output (stdout, else stderr), or "unknown".
fn version_of(program: &str, args: &[&str]) -> String {
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

// ---------------------------------------------------------------------------------------
// redis-benchmark

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Set,
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Set => "SET",
            Op::Get => "GET",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    op: Op,
    size: usize,
    pipeline: u32,
    clients: u32,
}

impl Case {
    fn label(&self) -> String {
        let clients = if self.clients == CLIENTS {
            String::new()
        } else {
            format!(", {} client", self.clients)
        };
        format!(
            "{} {} B, P{}{clients}",
            self.op.name(),
            self.size,
            self.pipeline
        )
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

fn bench_args(case: &Case, port: u16, n: u64) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-c",
        &case.clients.to_string(),
        "-n",
        &n.to_string(),
        "-d",
        &case.size.to_string(),
        "-P",
        &case.pipeline.to_string(),
        "-t",
        &case.op.name().to_lowercase(),
    ]
    .map(String::from)
    .to_vec()
}

fn run_benchmark(case: &Case, port: u16, n: u64) -> Sample {
    let out = Command::new("redis-benchmark")
        .args(bench_args(case, port, n))
        .stdin(Stdio::null())
        .output()
        .expect("redis-benchmark not found: apt-get install -y redis-tools");
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), parse_benchmark(&text)) {
        (true, Some(s)) => s,
        _ => panic!(
            "redis-benchmark {:?} failed ({}):\n{text}\n{}",
            bench_args(case, port, n),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Reads the non-quiet output of redis-benchmark 7: "throughput summary", the "latency
/// summary" table (p50, p99) and, for p99.9, the "Latency by percentile distribution" list
/// (HdrHistogram: the first listed percentile at or above 99.9%, an upper bound).
fn parse_benchmark(text: &str) -> Option<Sample> {
    // Progress lines end in '\r' and share a line with what follows; keep the last part.
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l).trim())
        .collect();
    let rps = lines.iter().find_map(|l| {
        l.strip_prefix("throughput summary:")?
            .trim()
            .strip_suffix("requests per second")?
            .trim()
            .parse::<f64>()
            .ok()
    })?;
    let at = lines
        .iter()
        .position(|l| l.starts_with("latency summary"))?;
    let names: Vec<&str> = lines.get(at + 1)?.split_whitespace().collect();
    let values: Vec<f64> = lines
        .get(at + 2)?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let column = |name: &str| values.get(names.iter().position(|n| *n == name)?).copied();
    let p999 = lines.iter().find_map(|l| {
        let (pct, rest) = l.split_once("% <= ")?;
        let pct: f64 = pct.parse().ok()?;
        let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
        (pct >= 99.9 - 1e-9).then_some(ms)
    })?;
    Some(Sample {
        rps,
        p50: column("p50")?,
        p99: column("p99")?,
        p999,
    })
}

/// Makes `GET key:__rand_int__` return a value of `size` bytes.
fn preload(redis_port: u16, size: usize) {
    let _: () = redis::cmd("SET")
        .arg(BENCH_KEY)
        .arg(vec![b'x'; size])
        .query(&mut connect(redis_port))
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Statistics and report

fn median(mut v: Vec<f64>) -> f64 {
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

struct Summary {
    rps: f64,
    rps_min: f64,
    rps_max: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

fn summarize(samples: &[Sample]) -> Summary {
    let pick = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let rps = pick(|s| s.rps);
    Summary {
        rps_min: rps.iter().copied().fold(f64::INFINITY, f64::min),
        rps_max: rps.iter().copied().fold(0.0, f64::max),
        rps: median(rps),
        p50: median(pick(|s| s.p50)),
        p99: median(pick(|s| s.p99)),
        p999: median(pick(|s| s.p999)),
    }
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn stormwall_revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let rev = sh("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    let dirty = !sh(
        "git",
        &["-C", dir, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    if dirty {
        format!("{rev} + uncommitted changes")
    } else {
        rev
    }
}

fn fmt_rps(rps: f64) -> String {
    if rps >= 1e6 {
        format!("{:.2} M", rps / 1e6)
    } else {
        format!("{:.0} k", rps / 1e3)
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    let quick = env_flag("STORMWALL_BENCH_QUICK");
    let rounds: usize = env_num("STORMWALL_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 });
    let seconds: f64 = env_num("STORMWALL_BENCH_SECONDS").unwrap_or(if quick { 0.4 } else { 1.5 });
    assert!(rounds >= 1 && seconds > 0.0);
    let started = Instant::now();

    let tmp = tempfile::tempdir().unwrap();
    let (_redis, redis_port) = start_redis(&[]);
    let (_stormwall, sw_port) = start_stormwall(
        redis_port,
        &["--admin", "127.0.0.1:0", "--log-level", "warn"],
    );
    let twemproxy = start_twemproxy(redis_port, tmp.path());
    let mut targets: Vec<(&str, u16)> = vec![("direct", redis_port), ("stormwall", sw_port)];
    if let Some((_, port)) = &twemproxy {
        targets.push(("twemproxy", *port));
    }

    let mut cases = Vec::new();
    for size in SIZES {
        for pipeline in PIPELINES {
            for op in [Op::Set, Op::Get] {
                cases.push(Case {
                    op,
                    size,
                    pipeline,
                    clients: CLIENTS,
                });
            }
        }
    }
    // One client: what a proxy adds to a request when the CPU is not saturated (with 50
    // clients on 2 cores, everything queues for CPU and the added latency is mostly that).
    cases.push(Case {
        op: Op::Get,
        size: 16,
        pipeline: 1,
        clients: 1,
    });

    // Calibrate: one request count per case, so that a direct run takes about `seconds`.
    let counts: Vec<u64> = cases
        .iter()
        .map(|case| {
            if case.op == Op::Get {
                preload(redis_port, case.size);
            }
            let probe = 10_000 * u64::from(case.pipeline);
            let rps = run_benchmark(case, redis_port, probe).rps;
            let n = ((rps * seconds / 1000.0).round() as u64 * 1000).max(10_000);
            println!("calibrated {}: {n} requests", case.label());
            n
        })
        .collect();

    // samples[case][target][round]
    let mut samples = vec![vec![Vec::new(); targets.len()]; cases.len()];
    for round in 0..rounds {
        for (ci, case) in cases.iter().enumerate() {
            if case.op == Op::Get {
                preload(redis_port, case.size);
            }
            for k in 0..targets.len() {
                let ti = (round + k) % targets.len();
                let (name, port) = targets[ti];
                let s = run_benchmark(case, port, counts[ci]);
                println!(
                    "round {}/{rounds} {:<16} {:<9} {:>10.0} rps  p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms",
                    round + 1,
                    case.label(),
                    name,
                    s.rps,
                    s.p50,
                    s.p99,
                    s.p999
                );
                samples[ci][ti].push(s);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    let summaries: Vec<Vec<Summary>> = samples
        .iter()
        .map(|per_target| per_target.iter().map(|s| summarize(s)).collect())
        .collect();

    // Report.
    let names: Vec<&str> = targets.iter().map(|t| t.0).collect();
    let tw = names.iter().position(|n| *n == "twemproxy");
    let settings: String = [
        "STORMWALL_BENCH_QUICK",
        "STORMWALL_BENCH_ROUNDS",
        "STORMWALL_BENCH_SECONDS",
    ]
    .iter()
    .filter_map(|k| Some(format!("{k}={} ", std::env::var(k).ok()?)))
    .collect();
    let command = format!("{settings}cargo bench --bench passthrough");
    let mut md = report_header(
        "Passthrough: direct Redis vs stormwall vs twemproxy",
        &command,
    );
    writeln!(md, "| machine | {} |", cores_and_cpu()).unwrap();
    writeln!(
        md,
        "| redis | {} |",
        version_of("redis-server", &["--version"])
    )
    .unwrap();
    writeln!(
        md,
        "| twemproxy | {} |",
        if tw.is_some() {
            version_of("nutcracker", &["-V"])
        } else {
            "not installed: rows skipped".into()
        }
    )
    .unwrap();
    writeln!(
        md,
        "| stormwall | {} (release build, default config) |",
        stormwall_revision()
    )
    .unwrap();
    writeln!(
        md,
        "| load | `redis-benchmark -c {CLIENTS} -n N -d SIZE -P DEPTH -t get\\|set`, plus one case with `-c 1` (N calibrated per case for ~{seconds} s against Redis directly, same N for every target) |"
    )
    .unwrap();
    writeln!(
        md,
        "| rounds | {rounds}, targets interleaved within each case, start target rotated per round; wall time {elapsed:.0} s |"
    )
    .unwrap();
    writeln!(
        md,
        "\nEverything runs on the same machine: redis-benchmark, Redis and the proxy share its \
         cores, so a proxy also competes with the load generator for CPU. twemproxy runs one \
         pool (`redis: true`, `hash: fnv1a_64`, `distribution: ketama`, one server) with \
         its defaults (`server_connections: 1`: all clients are multiplexed onto one \
         upstream connection); stormwall gives each client its own upstream connection. \
         Values are medians over rounds (each column separately); latency in ms as measured \
         by redis-benchmark (per request, from the write of its pipeline); p99.9 is the first \
         percentile at or above 99.9% in redis-benchmark's HdrHistogram listing.\n"
    )
    .unwrap();

    writeln!(md, "## Throughput and latency\n").unwrap();
    writeln!(
        md,
        "| case | target | requests/s (median) | min–max over rounds | p50 ms | p99 ms | p99.9 ms |"
    )
    .unwrap();
    writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: | ---: |").unwrap();
    for (ci, case) in cases.iter().enumerate() {
        for (ti, name) in names.iter().enumerate() {
            let s = &summaries[ci][ti];
            writeln!(
                md,
                "| {} | {name} | {:.0} | {}–{} | {:.3} | {:.3} | {:.3} |",
                case.label(),
                s.rps,
                fmt_rps(s.rps_min),
                fmt_rps(s.rps_max),
                s.p50,
                s.p99,
                s.p999
            )
            .unwrap();
        }
    }

    writeln!(
        md,
        "\n## stormwall relative to direct Redis and to twemproxy\n"
    )
    .unwrap();
    writeln!(
        md,
        "| case | throughput stormwall / direct | throughput stormwall / twemproxy | p99 added by stormwall vs direct (ms) | p99 added by twemproxy vs direct (ms) |"
    )
    .unwrap();
    writeln!(md, "| --- | ---: | ---: | ---: | ---: |").unwrap();
    for (ci, case) in cases.iter().enumerate() {
        let s = &summaries[ci];
        let (direct, sw) = (&s[0], &s[1]);
        let (vs_tw, tw_p99) = match tw {
            Some(t) => (
                format!("{:.2}", sw.rps / s[t].rps),
                format!("{:+.3}", s[t].p99 - direct.p99),
            ),
            None => ("–".into(), "–".into()),
        };
        writeln!(
            md,
            "| {} | {:.2} | {vs_tw} | {:+.3} | {tw_p99} |",
            case.label(),
            sw.rps / direct.rps,
            sw.p99 - direct.p99
        )
        .unwrap();
    }

    let dir = results_dir();
    let png = dir.join("passthrough.png");
    match chart(&png, &cases, &names, &summaries) {
        Ok(()) => writeln!(md, "\n![throughput and p99 per case](passthrough.png)").unwrap(),
        Err(e) => {
            println!("note: chart not drawn: {e}");
            writeln!(md, "\n(Chart not drawn: {e}.)").unwrap();
        }
    }
    print!("\n{md}");
    std::fs::write(dir.join("passthrough.md"), md).unwrap();
    println!("wrote results/passthrough.md");
    drop(twemproxy);
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
    ];
    let root = BitMapBackend::new(path, (1400, 1350)).into_drawing_area();
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
