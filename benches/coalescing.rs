//! How much of an invalidation storm reaches Redis, measured by Redis's own
//! `INFO commandstats`: the same storm sent directly and through stormwall (default config).
//!
//! Run: `cargo bench --bench coalescing`. Writes `results/coalescing.md`.
//!
//! Storm 1: 200 clients each issuing the same `DEL` of 100 keys in a loop. Storm 2: 100
//! clients issuing `FLUSHDB` concurrently, several rounds.

mod common;

use std::fmt::Write as _;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use common::{commandstats, connect, info_field, results_dir, start_redis, start_stormwall};

const DEL_CLIENTS: usize = 200;
const DEL_LOOPS: usize = 25;
const FLUSH_CLIENTS: usize = 100;
const FLUSH_ROUNDS: usize = 5;

struct Run {
    requests: usize,
    del_like: u64,
    flushes: u64,
    seconds: f64,
}

fn del_storm(target: u16, redis_port: u16) -> Run {
    let keys: Vec<String> = (0..100).map(|i| format!("account:{i}:settings")).collect();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut connect(redis_port))
        .unwrap();
    let barrier = Arc::new(Barrier::new(DEL_CLIENTS));
    let start = Instant::now();
    let handles: Vec<_> = (0..DEL_CLIENTS)
        .map(|_| {
            let keys = keys.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = connect(target);
                barrier.wait();
                for _ in 0..DEL_LOOPS {
                    let _: i64 = redis::cmd("DEL").arg(&keys).query(&mut c).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    let s = commandstats(&mut connect(redis_port));
    let del_like = s.get("del").copied().unwrap_or(0) + s.get("unlink").copied().unwrap_or(0);
    Run {
        requests: DEL_CLIENTS * DEL_LOOPS,
        del_like,
        flushes: 0,
        seconds,
    }
}

fn flush_storm(target: u16, redis_port: u16) -> Run {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut connect(redis_port))
        .unwrap();
    let start = Instant::now();
    for _ in 0..FLUSH_ROUNDS {
        let barrier = Arc::new(Barrier::new(FLUSH_CLIENTS));
        let handles: Vec<_> = (0..FLUSH_CLIENTS)
            .map(|_| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut c = connect(target);
                    barrier.wait();
                    let ok: String = redis::cmd("FLUSHDB").query(&mut c).unwrap();
                    assert_eq!(ok, "OK");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let s = commandstats(&mut connect(redis_port));
    Run {
        requests: FLUSH_CLIENTS * FLUSH_ROUNDS,
        del_like: 0,
        flushes: s.get("flushdb").copied().unwrap_or(0),
        seconds,
    }
}

fn main() {
    let (_redis, redis_port) = start_redis(&[]);
    let (_sw, sw_port) = start_stormwall(redis_port, &["--log-level", "warn"]);
    let mut out = String::new();
    writeln!(out, "# Invalidation storms: what reaches Redis\n").unwrap();
    writeln!(
        out,
        "Command: `cargo bench --bench coalescing` (redis-server {}, default stormwall config).\n",
        info_field(&mut connect(redis_port), "server", "redis_version")
    )
    .unwrap();
    writeln!(out, "| storm | path | client requests | DEL/UNLINK commands at Redis | FLUSHDB at Redis | wall time (s) |").unwrap();
    writeln!(out, "| --- | --- | ---: | ---: | ---: | ---: |").unwrap();
    for (name, port) in [("direct", redis_port), ("stormwall", sw_port)] {
        let r = del_storm(port, redis_port);
        writeln!(out, "| {DEL_CLIENTS} clients x {DEL_LOOPS} x `DEL` of the same 100 keys | {name} | {} | {} | – | {:.2} |", r.requests, r.del_like, r.seconds).unwrap();
    }
    for (name, port) in [("direct", redis_port), ("stormwall", sw_port)] {
        let r = flush_storm(port, redis_port);
        writeln!(out, "| {FLUSH_CLIENTS} concurrent `FLUSHDB` x {FLUSH_ROUNDS} rounds | {name} | {} | – | {} | {:.2} |", r.requests, r.flushes, r.seconds).unwrap();
    }
    print!("{out}");
    std::fs::write(results_dir().join("coalescing.md"), out).unwrap();
}
