//! What stormwall costs ordinary traffic in front of a Redis Cluster: `redis-benchmark
//! --cluster` straight at a 3-master cluster (each client connected to a master, its keys
//! hash-tagged to that master's slots: the best a cluster-aware client can do) vs plain
//! `redis-benchmark` through stormwall (`[upstream] kind = "cluster"`, shared mode, default
//! config otherwise), which routes each command to its slot's master. GET and SET of 16 B at
//! pipeline depth 1 and 16, 50 clients, interleaved and repeated as `passthrough` does.
//!
//! Run: `cargo bench --bench cluster` (about 4 minutes); the storm replay against the same
//! kind of cluster is `STORMWALL_BENCH_CLUSTER=1 cargo bench --bench storm` (both in one go:
//! `STORMWALL_BENCH_CLUSTER=1 cargo bench --bench cluster --bench storm`). Writes
//! `results/cluster.md`.
//!
//! Environment: `STORMWALL_BENCH_QUICK=1` (one round of short runs, report to a temp folder,
//! `results/` left alone), `STORMWALL_BENCH_ROUNDS=N`, `STORMWALL_BENCH_SECONDS=S` (target
//! length of one run directly against the cluster).
//!
//! Method. One cluster (`tests/common/cluster.rs`'s, 3 masters, no replicas) and one
//! stormwall in front of it for the whole run; as a control, in the same run, one
//! redis-server directly and through a stormwall in front of it (shared mode, the default),
//! same cases, same keys, so that what the cluster costs stormwall is told apart from what the
//! machine's load costs every path. Keys are random over `-r 10000` everywhere (without `-r`
//! every request through stormwall would name the same key, so one master); `--cluster`
//! prefixes them with a hash tag of the client's master, so direct clients spread over the
//! three masters as stormwall's keys do. Before the measured rounds every target's SET fills
//! its keys, so GETs hit. Each case gets one request count, calibrated so that a run directly
//! against the cluster lasts about `STORMWALL_BENCH_SECONDS`, the same for all four targets;
//! within a round the targets run back to back for each case, starting with a different target
//! each round. Medians over rounds; CPU per request is user + system time (`/proc/PID/stat`)
//! of the servers (all the masters, or the one Redis) and of stormwall during a run, divided by
//! its requests. `-e` makes redis-benchmark show error replies: any seen are counted in the
//! report (none are expected).

mod common;

use std::fmt::Write as _;
use std::time::Instant;

use common::cluster::{MASTERS, SlotMap, master_pids, stormwall_config};
use common::redis_benchmark::{
    CLIENTS, Case, Op, Summary, Target, calibrate, cell, fmt_rps, run_benchmark, run_rounds,
};
use common::{
    Mode, bench_command, cores_and_cpu, env_flag, env_num, load_average, report_header,
    results_dir, start_redis, start_stormwall_config, start_stormwall_mode, stormwall_revision,
    version_of,
};

const SIZE: usize = 16;
const PIPELINES: [u32; 2] = [1, 16];
/// `redis-benchmark -r`: keys `key:000000000000` .. `key:000000009999`.
const KEYSPACE: u64 = 10_000;

fn main() {
    let quick = env_flag("STORMWALL_BENCH_QUICK");
    let rounds: usize = env_num("STORMWALL_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 });
    let seconds: f64 = env_num("STORMWALL_BENCH_SECONDS").unwrap_or(if quick { 0.4 } else { 2.0 });
    assert!(rounds >= 1 && seconds > 0.0);
    let started = Instant::now();
    let load_start = load_average();

    let quiet = ["--admin", "127.0.0.1:0", "--log-level", "warn"];
    let cluster = common::cluster::start();
    let map = SlotMap::of(&cluster);
    let masters = master_pids(&cluster);
    let (cluster_sw, cluster_sw_port) =
        start_stormwall_config(map.ports[0], &stormwall_config(&cluster), &quiet);
    // The control: one Redis, directly and through stormwall (shared, its default), as in
    // `passthrough`, measured in the same run and with the same keys.
    let (redis, redis_port) = start_redis(&[]);
    let (one_sw, one_sw_port) = start_stormwall_mode(redis_port, Mode::Shared, &quiet);
    let keys = ["-r".to_string(), KEYSPACE.to_string(), "-e".into()];
    let targets = [
        Target {
            name: "cluster direct".into(),
            port: map.ports[0],
            args: [&["--cluster".to_string()][..], &keys].concat(),
            server_pids: masters.clone(),
            proxy_pid: None,
        },
        Target {
            name: "cluster stormwall".into(),
            port: cluster_sw_port,
            args: keys.to_vec(),
            server_pids: masters,
            proxy_pid: Some(cluster_sw.pid()),
        },
        Target {
            name: "one Redis direct".into(),
            port: redis_port,
            args: keys.to_vec(),
            server_pids: vec![redis.pid()],
            proxy_pid: None,
        },
        Target {
            name: "one Redis stormwall".into(),
            port: one_sw_port,
            args: keys.to_vec(),
            server_pids: vec![redis.pid()],
            proxy_pid: Some(one_sw.pid()),
        },
    ];
    let mut cases = Vec::new();
    for pipeline in PIPELINES {
        for op in [Op::Set, Op::Get] {
            cases.push(Case {
                op,
                size: SIZE,
                pipeline,
                clients: CLIENTS,
                reconnect: false,
            });
        }
    }

    // Every target's keys set once (direct's are hash-tagged, so they are not stormwall's).
    let fill = Case {
        op: Op::Set,
        size: SIZE,
        pipeline: 16,
        clients: CLIENTS,
        reconnect: false,
    };
    for t in &targets {
        run_benchmark(&fill, t.port, 10 * KEYSPACE, &t.args);
    }
    let counts = calibrate(&cases, &targets[0], seconds, 10_000, |_| {});
    let summaries = run_rounds(&cases, &targets, &counts, rounds, |_| {});
    let elapsed = started.elapsed().as_secs_f64();

    let command = bench_command(
        "cluster",
        &[
            "STORMWALL_BENCH_QUICK",
            "STORMWALL_BENCH_ROUNDS",
            "STORMWALL_BENCH_SECONDS",
        ],
    );
    let mut md = report_header(
        "Redis Cluster: `redis-benchmark --cluster` directly vs through stormwall",
        &command,
    );
    let w = &mut md;
    let mut line = |text: String| writeln!(w, "{text}").unwrap();
    line(format!("| machine | {} |", cores_and_cpu()));
    line(format!(
        "| load average (1 min) | {load_start} at the start, {} at the end |",
        load_average()
    ));
    line(format!(
        "| redis | {}; a cluster of {MASTERS} masters, no replicas (`tests/common/cluster.rs`); one more redis-server for the control rows |",
        version_of("redis-server", &["--version"])
    ));
    line(format!(
        "| stormwall | {} (release build; `[upstream] kind = \"cluster\"`, every node a seed, `mode = \"shared\"`, defaults otherwise) |",
        stormwall_revision()
    ));
    line(format!(
        "| load | `redis-benchmark -c {CLIENTS} -n N -d {SIZE} -P DEPTH -t get\\|set -r {KEYSPACE} -e`, plus `--cluster` for direct (N calibrated per case for ~{seconds} s directly, same N for both) |"
    ));
    line(format!(
        "| rounds | {rounds}, targets interleaved within each case, start target rotated per round; wall time {elapsed:.0} s |"
    ));
    if quick {
        line(
            "\n**Quick smoke run** (`STORMWALL_BENCH_QUICK=1`): short runs, one round; not the \
             numbers to quote."
                .into(),
        );
    }
    line(
        "\nEverything shares the machine: redis-benchmark, the servers and stormwall. Directly \
         to the cluster, each redis-benchmark client talks to one master only, with keys \
         hash-tagged to it; through stormwall, every client's commands go to whichever master \
         serves each key, over stormwall's shared connections to the three masters. The \
         control rows are the same cases against one redis-server, directly and through a \
         stormwall in front of it (shared mode, its default), in the same run.\n"
            .into(),
    );
    line("## Throughput and latency\n".into());
    line(
        "Medians over rounds (throughput min–max in brackets). Ratio: stormwall's throughput \
         over direct's on the same servers; p99 added: stormwall's p99 minus direct's.\n"
            .into(),
    );
    line(
        "| case | servers | direct req/s | stormwall req/s | stormwall / direct | p50 ms direct / stormwall | p99 ms direct / stormwall | p99 added (ms) | error replies shown |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            .into(),
    );
    let pairs = [("cluster", 0, 1), ("one Redis (control)", 2, 3)];
    for (ci, case) in cases.iter().enumerate() {
        for (servers, d, s) in pairs {
            let [d, s] = [&summaries[ci][d], &summaries[ci][s]];
            let spread = |x: &Summary| format!("[{}–{}]", fmt_rps(x.rps_min), fmt_rps(x.rps_max));
            line(format!(
                "| {} | {servers} | {} {} | {} {} | **{:.2}×** | {:.3} / {:.3} | {:.3} / {:.3} | {:+.3} | {} / {} |",
                case.label(),
                fmt_rps(d.rps),
                spread(d),
                fmt_rps(s.rps),
                spread(s),
                s.rps / d.rps,
                d.p50,
                s.p50,
                d.p99,
                s.p99,
                s.p99 - d.p99,
                d.errors_shown,
                s.errors_shown,
            ));
        }
    }
    line("\n## CPU per request\n".into());
    line(
        "µs of user + system time per request (medians over rounds): the servers (the three \
         masters together, or the one Redis), and stormwall.\n"
            .into(),
    );
    line(
        "| case | servers | servers: direct | servers: stormwall | servers: stormwall / direct | stormwall itself |\n\
         | --- | --- | ---: | ---: | ---: | ---: |"
            .into(),
    );
    for (ci, case) in cases.iter().enumerate() {
        for (servers, d, s) in pairs {
            let [d, s] = [&summaries[ci][d], &summaries[ci][s]];
            line(format!(
                "| {} | {servers} | {:.2} | {:.2} | {:.2} | {} |",
                case.label(),
                d.redis_cpu_us,
                s.redis_cpu_us,
                s.redis_cpu_us / d.redis_cpu_us,
                cell(s.proxy_cpu_us, 2),
            ));
        }
    }
    drop((cluster_sw, one_sw, redis));
    drop(cluster);

    print!("\n{md}");
    let dir = if quick {
        std::env::temp_dir().join("stormwall-cluster-quick")
    } else {
        results_dir()
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cluster.md"), md).unwrap();
    println!("wrote {}", dir.join("cluster.md").display());
}
