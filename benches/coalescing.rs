//! How much of an invalidation storm reaches Redis, measured by Redis's own
//! `INFO commandstats`: the same storm sent directly and through stormwall (default config).
//!
//! Run: `cargo bench --bench coalescing`. Writes `results/coalescing.md`.
//!
//! Storm 1: 200 clients each issuing the same `DEL` of 100 keys in a loop. Storm 2: 100
//! clients issuing `FLUSHDB` concurrently, several rounds.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const DEL_CLIENTS: usize = 200;
const DEL_LOOPS: usize = 25;
const FLUSH_CLIENTS: usize = 100;
const FLUSH_ROUNDS: usize = 5;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listening on {port}");
}

fn redis() -> (Proc, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server not found: apt-get install -y redis-server");
    wait_port(port);
    (Proc(child), port)
}

fn stormwall(upstream: u16) -> (Proc, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_stormwall"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("127.0.0.1:{upstream}"),
        ])
        .args(["--log-level", "warn"])
        .spawn()
        .expect("cannot start stormwall");
    wait_port(port);
    (Proc(child), port)
}

fn con(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Calls of each command since the last `CONFIG RESETSTAT`.
fn stats(redis_port: u16) -> std::collections::BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con(redis_port))
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

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
        .query(&mut con(redis_port))
        .unwrap();
    let barrier = Arc::new(Barrier::new(DEL_CLIENTS));
    let start = Instant::now();
    let handles: Vec<_> = (0..DEL_CLIENTS)
        .map(|_| {
            let keys = keys.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut c = con(target);
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
    let s = stats(redis_port);
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
        .query(&mut con(redis_port))
        .unwrap();
    let start = Instant::now();
    for _ in 0..FLUSH_ROUNDS {
        let barrier = Arc::new(Barrier::new(FLUSH_CLIENTS));
        let handles: Vec<_> = (0..FLUSH_CLIENTS)
            .map(|_| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    let mut c = con(target);
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
    let s = stats(redis_port);
    Run {
        requests: FLUSH_CLIENTS * FLUSH_ROUNDS,
        del_like: 0,
        flushes: s.get("flushdb").copied().unwrap_or(0),
        seconds,
    }
}

fn main() {
    let (_redis, redis_port) = redis();
    let (_sw, sw_port) = stormwall(redis_port);
    let mut out = String::new();
    writeln!(out, "# Invalidation storms: what reaches Redis\n").unwrap();
    writeln!(
        out,
        "Command: `cargo bench --bench coalescing` (redis-server {}, default stormwall config).\n",
        redis_version(redis_port)
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
    std::fs::create_dir_all("results").unwrap();
    std::fs::write("results/coalescing.md", out).unwrap();
}

fn redis_version(port: u16) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut con(port))
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned()
}
