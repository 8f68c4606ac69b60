//! `redis-benchmark` as the load generator (`passthrough`, `cluster`): the cases it runs, one
//! run with the CPU time the servers (and the proxy) spent meanwhile, its output parsed, and
//! medians over rounds.

use std::process::{Command, Stdio};

use super::{cpu_seconds, median};

/// Clients per run unless a case says otherwise.
pub const CLIENTS: u32 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Set,
    Get,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Set => "SET",
            Op::Get => "GET",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub op: Op,
    pub size: usize,
    pub pipeline: u32,
    pub clients: u32,
    /// A new connection for every request (`redis-benchmark -k 0`): measures connects (and
    /// TLS handshakes) per second.
    pub reconnect: bool,
}

impl Case {
    pub fn label(&self) -> String {
        let clients = if self.clients == CLIENTS {
            String::new()
        } else {
            format!(", {} client", self.clients)
        };
        format!(
            "{} {} B, P{}{clients}{}",
            self.op.name(),
            self.size,
            self.pipeline,
            if self.reconnect {
                ", new connection per request"
            } else {
                ""
            }
        )
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// The servers' user + system CPU time during the run, per request (µs).
    pub redis_cpu_us: f64,
    /// The proxy's, per request (µs); NaN for direct.
    pub proxy_cpu_us: f64,
    /// Error replies redis-benchmark printed (with `-e`; it shows at most one a second, so
    /// this says whether there were any, not how many).
    pub errors_shown: u64,
}

/// redis-benchmark's arguments for `case`: `n` requests against `127.0.0.1:port`, then
/// `extra` (`--tls …`, `--cluster`, `-r …`).
pub fn bench_args(case: &Case, port: u16, n: u64, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
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
    .to_vec();
    if case.reconnect {
        args.extend(["-k", "0"].map(String::from));
    }
    args.extend_from_slice(extra);
    args
}

/// One redis-benchmark run; panics with its output if it fails.
pub fn run_benchmark(case: &Case, port: u16, n: u64, extra: &[String]) -> Sample {
    let args = bench_args(case, port, n, extra);
    let out = Command::new("redis-benchmark")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-benchmark not found: apt-get install -y redis-tools");
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), parse_benchmark(&text)) {
        (true, Some(mut s)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let shown: Vec<&str> = text
                .lines()
                .chain(stderr.lines())
                .filter(|l| l.contains("Error from server"))
                .collect();
            if let Some(first) = shown.first() {
                println!(
                    "note: redis-benchmark {args:?}: {} error lines, first: {first}",
                    shown.len()
                );
            }
            s.errors_shown = shown.len() as u64;
            s
        }
        _ => panic!(
            "redis-benchmark {args:?} failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Reads the non-quiet output of redis-benchmark 7: "throughput summary", the "latency
/// summary" table (p50, p99) and, for p99.9, the "Latency by percentile distribution" list
/// (HdrHistogram: the first listed percentile at or above 99.9%, an upper bound).
pub fn parse_benchmark(text: &str) -> Option<Sample> {
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
        redis_cpu_us: f64::NAN,
        proxy_cpu_us: f64::NAN,
        errors_shown: 0,
    })
}

/// One way to reach the servers: its name in the report, its port, the redis-benchmark
/// arguments it needs beyond the case's (`--tls …`, `--cluster`), the servers behind it (one
/// Redis, or every master of a cluster) and the proxy, if any, whose CPU time is charged to it.
pub struct Target {
    pub name: String,
    pub port: u16,
    pub args: Vec<String>,
    pub server_pids: Vec<u32>,
    pub proxy_pid: Option<u32>,
}

/// One redis-benchmark run of `n` requests against `target`, with the CPU time its servers
/// and its proxy spent meanwhile.
pub fn measure(case: &Case, target: &Target, n: u64) -> Sample {
    let servers = || {
        target
            .server_pids
            .iter()
            .map(|&p| cpu_seconds(p))
            .sum::<f64>()
    };
    let servers_before = servers();
    let proxy_before = target.proxy_pid.map(cpu_seconds);
    let mut s = run_benchmark(case, target.port, n, &target.args);
    let per_request = |seconds: f64| seconds * 1e6 / n as f64;
    s.redis_cpu_us = per_request(servers() - servers_before);
    s.proxy_cpu_us = match (target.proxy_pid, proxy_before) {
        (Some(pid), Some(before)) => per_request(cpu_seconds(pid) - before),
        _ => f64::NAN,
    };
    s
}

/// Medians over rounds of one case on one target.
pub struct Summary {
    pub rps: f64,
    pub rps_min: f64,
    pub rps_max: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub redis_cpu_us: f64,
    pub proxy_cpu_us: f64,
    /// Error lines shown, over all rounds.
    pub errors_shown: u64,
}

pub fn summarize(samples: &[Sample]) -> Summary {
    let pick = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let rps = pick(|s| s.rps);
    Summary {
        rps_min: rps.iter().copied().fold(f64::INFINITY, f64::min),
        rps_max: rps.iter().copied().fold(0.0, f64::max),
        rps: median(rps),
        p50: median(pick(|s| s.p50)),
        p99: median(pick(|s| s.p99)),
        p999: median(pick(|s| s.p999)),
        redis_cpu_us: median(pick(|s| s.redis_cpu_us)),
        proxy_cpu_us: median(pick(|s| s.proxy_cpu_us)),
        errors_shown: samples.iter().map(|s| s.errors_shown).sum(),
    }
}

/// Requests per second as the reports print them: `8123`, `81 k`, `1.23 M`.
pub fn fmt_rps(rps: f64) -> String {
    if rps < 1e4 {
        format!("{rps:.0}")
    } else if rps >= 1e6 {
        format!("{:.2} M", rps / 1e6)
    } else {
        format!("{:.0} k", rps / 1e3)
    }
}

/// A figure for a table cell: "–" where there is none (NaN: direct has no proxy).
pub fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "–".into()
    }
}

/// One request count per case, so that a run against `target` takes about `seconds`
/// (rounded to thousands, at least `floor`); `before_case` runs before each case's probe (a
/// preload, say).
pub fn calibrate(
    cases: &[Case],
    target: &Target,
    seconds: f64,
    floor: u64,
    mut before_case: impl FnMut(&Case),
) -> Vec<u64> {
    cases
        .iter()
        .map(|case| {
            before_case(case);
            let probe = if case.reconnect {
                2_000
            } else {
                10_000 * u64::from(case.pipeline)
            };
            let rps = run_benchmark(case, target.port, probe, &target.args).rps;
            let n = ((rps * seconds / 1000.0).round() as u64 * 1000).max(floor);
            println!(
                "calibrated {} on {}: {n} requests",
                case.label(),
                target.name
            );
            n
        })
        .collect()
}

/// `rounds` rounds; in each, every case (`counts[case]` requests) on every target back to
/// back, starting with a different target each round, so that slow drifts of the machine hit
/// all of them alike; `before_case` runs before each case. Returns the medians over rounds,
/// `[case][target]`.
pub fn run_rounds(
    cases: &[Case],
    targets: &[Target],
    counts: &[u64],
    rounds: usize,
    mut before_case: impl FnMut(&Case),
) -> Vec<Vec<Summary>> {
    // samples[case][target][round]
    let mut samples = vec![vec![Vec::new(); targets.len()]; cases.len()];
    for round in 0..rounds {
        for (ci, case) in cases.iter().enumerate() {
            before_case(case);
            for k in 0..targets.len() {
                let ti = (round + k) % targets.len();
                let s = measure(case, &targets[ti], counts[ci]);
                println!(
                    "round {}/{rounds} {:<40} {:<22} {:>10.0} rps  p50 {:.3}  p99 {:.3}  p99.9 {:.3} ms  CPU/req servers {:.2} proxy {} µs",
                    round + 1,
                    case.label(),
                    targets[ti].name,
                    s.rps,
                    s.p50,
                    s.p99,
                    s.p999,
                    s.redis_cpu_us,
                    cell(s.proxy_cpu_us, 2),
                );
                samples[ci][ti].push(s);
            }
        }
    }
    samples
        .iter()
        .map(|per_target| per_target.iter().map(|s| summarize(s)).collect())
        .collect()
}
