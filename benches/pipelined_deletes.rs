//! Mass deletes from one connection, as a new user would send them: `redis-cli --pipe` of
//! 100,000 single-key `DEL`s (and a mixed pipe: 100,000 `SET`s with 10,000 `DEL`s among
//! them), directly to Redis and through stormwall with its default config in each upstream
//! mode, in the same run. (No twemproxy row: `redis-cli --pipe` ends with an `ECHO`, and
//! sends inline commands, neither of which twemproxy supports.) Each run starts from the same preloaded
//! keys, and every reply is checked: every `DEL` of an existing key must answer 1.
//!
//! Target (issue 10): through stormwall within 3× of the larger of direct and the key
//! budget's floor (keys ÷ `invalidation.keys_per_second`; the first `keys_burst` keys go at
//! once, so the floor is (keys − burst) ÷ rate).
//!
//! Run: `cargo bench --bench pipelined_deletes` (about a minute). Writes
//! `results/pipelined_deletes.md`. Needs `redis-server` and `redis-cli` (Debian:
//! `redis-server`, `redis-tools`).
//! `STORMWALL_BENCH_ROUNDS=N` (default 3): runs per target; the median is reported.

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{
    Mode, bench_command, connect, cores_and_cpu, env_num, free_port, median, report_header,
    results_dir, start_redis, start_stormwall_mode, version_of,
};

const KEYS: usize = 100_000;
const MIXED_DELS: usize = 10_000;

/// Default budget, as in `deploy/stormwall.example.toml`.
const KEYS_PER_SECOND: f64 = 100_000.0;
const KEYS_BURST: f64 = 10_000.0;

/// Inline commands, as `redis-cli --pipe` users write them.
fn pipe_file(lines: impl Iterator<Item = String>) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for line in lines {
        file.write_all(line.as_bytes()).unwrap();
        file.write_all(b"\r\n").unwrap();
    }
    file
}

/// Runs `redis-cli --pipe` against `port` with `file`; returns seconds and checks that
/// every reply arrived without errors.
fn pipe(port: u16, file: &tempfile::NamedTempFile, replies: usize) -> f64 {
    let start = Instant::now();
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::from(std::fs::File::open(file.path()).unwrap()))
        .output()
        .expect("redis-cli not found: apt-get install -y redis-tools");
    let seconds = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("errors: 0, replies: {replies}")),
        "redis-cli --pipe: {} {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    seconds
}

/// Fills Redis with the `KEYS` keys the deletes name.
fn preload(redis: u16, sets: &tempfile::NamedTempFile) {
    let _: () = redis::cmd("FLUSHALL").query(&mut connect(redis)).unwrap();
    pipe(redis, sets, KEYS);
}

/// Every `DEL` removed its key: nothing named is left.
fn all_deleted(redis: u16) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(
            (0..KEYS)
                .step_by(997)
                .map(|i| format!("key:{i}"))
                .collect::<Vec<_>>(),
        )
        .query(&mut connect(redis))
        .unwrap();
    n == 0
}

struct Row {
    target: String,
    dels: f64,
    mixed: f64,
}

fn main() {
    let rounds: usize = env_num("STORMWALL_BENCH_ROUNDS").unwrap_or(3);
    let sets = pipe_file((0..KEYS).map(|i| format!("SET key:{i} v")));
    let dels = pipe_file((0..KEYS).map(|i| format!("DEL key:{i}")));
    let step = KEYS / MIXED_DELS;
    let mixed = pipe_file((0..KEYS).flat_map(|i| {
        let set = format!("SET new:{i} v");
        if i % step == 0 {
            vec![set, format!("DEL key:{i}")]
        } else {
            vec![set]
        }
    }));
    let (_redis, redis) = start_redis(&[]);
    let mut targets: Vec<(String, u16, Option<common::Proc>)> =
        vec![("direct".into(), redis, None)];
    for mode in Mode::BOTH {
        let admin = format!("127.0.0.1:{}", free_port());
        let args = ["--log-level", "warn", "--admin", &admin];
        let (proc, port) = start_stormwall_mode(redis, mode, &args);
        targets.push((mode.label(), port, Some(proc)));
    }
    let mut rows = Vec::new();
    for (target, port, _proc) in &targets {
        let mut del_times = Vec::new();
        let mut mixed_times = Vec::new();
        for _ in 0..rounds {
            preload(redis, &sets);
            del_times.push(pipe(*port, &dels, KEYS));
            assert!(all_deleted(redis), "{target}: a DEL left its key");
            preload(redis, &sets);
            mixed_times.push(pipe(*port, &mixed, KEYS + MIXED_DELS));
        }
        let row = Row {
            target: target.clone(),
            dels: median(del_times),
            mixed: median(mixed_times),
        };
        println!(
            "{:<20} 100k DEL pipe {:>7.3} s   mixed pipe {:>7.3} s",
            row.target, row.dels, row.mixed
        );
        rows.push(row);
    }
    let direct = &rows[0];
    let floor = (KEYS as f64 - KEYS_BURST) / KEYS_PER_SECOND;
    let mixed_floor = (MIXED_DELS as f64 - KEYS_BURST).max(0.0) / KEYS_PER_SECOND;
    let mut md = report_header(
        "Mass deletes from one connection (redis-cli --pipe)",
        &bench_command("pipelined_deletes", &["STORMWALL_BENCH_ROUNDS"]),
    );
    let _ = writeln!(md, "| machine | {} |", cores_and_cpu());
    let _ = writeln!(
        md,
        "| redis | {} |",
        version_of("redis-server", &["--version"])
    );
    let _ = writeln!(md, "| rounds | {rounds} (median) |\n");
    let _ = writeln!(
        md,
        "Key budget floor (default `keys_per_second = 100000`, `keys_burst = 10000`): \
         {floor:.2} s for 100,000 keys, {mixed_floor:.2} s for 10,000. Target: stormwall \
         within 3× of the larger of direct and the floor.\n"
    );
    md.push_str(
        "| target | 100k `DEL` pipe | × direct | × max(direct, floor) | mixed pipe (100k `SET` + 10k `DEL`) | × direct | × max(direct, floor) |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for row in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.3} s | {:.2} | {:.2} | {:.3} s | {:.2} | {:.2} |",
            row.target,
            row.dels,
            row.dels / direct.dels,
            row.dels / direct.dels.max(floor),
            row.mixed,
            row.mixed / direct.mixed,
            row.mixed / direct.mixed.max(mixed_floor),
        );
    }
    md.push_str(
        "\nBefore issue 10 (one batch per request, one governed request outstanding per \
         connection): 49.9 s for the 100k `DEL` pipe (2,000 commands/s), 4.9 s for the mixed \
         pipe.\n",
    );
    let path = results_dir().join("pipelined_deletes.md");
    std::fs::write(&path, &md).unwrap();
    println!("\n{md}\nwritten to {}", path.display());
}
