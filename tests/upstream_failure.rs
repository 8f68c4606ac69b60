//! Contract point G6, upstream side: when Redis is unreachable, dies, or stops answering,
//! clients see what they would see from Redis itself — a closed connection, promptly, after
//! every reply that did arrive; never an error reply in place of a command whose fate is
//! unknown, never a hang, never a fake success — and stormwall serves new clients as soon as
//! Redis is back. Also graceful
//! shutdown: in-flight commands finish, new connections are refused, exit code 0.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Frame, Raw, Redis, Stormwall, array, blob, encode_cmd, is_error, number, shared_mode, text,
};

/// A raw connection whose reads give up after `secs` (a hang shows up as a panic).
fn conn(port: u16, secs: u64) -> Raw {
    let c = Raw::connect(port);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(secs)))
        .unwrap();
    c
}

/// Polls `cond` until it holds, failing the test after `within`.
fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// `blocked_clients` from Redis's `INFO clients`.
fn blocked_clients(redis: &Redis) -> i64 {
    let info = text(&redis.raw().call(&[b"INFO", b"clients"]));
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("blocked_clients in INFO")
}

fn wait_blocked(redis: &Redis, n: i64) {
    wait_for(
        Duration::from_secs(5),
        &format!("{n} blocked clients"),
        || blocked_clients(redis) == n,
    );
}

/// Joins threads, failing the test if any is still running at the deadline (a hang).
fn join_within<T>(handles: Vec<thread::JoinHandle<T>>, within: Duration, what: &str) -> Vec<T> {
    let deadline = Instant::now() + within;
    while handles.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "{what}: threads still running after {within:?} (a hang)"
        );
        thread::sleep(Duration::from_millis(10));
    }
    handles
        .into_iter()
        .map(|h| match h.join() {
            Ok(v) => v,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{what}: a thread panicked: {msg}")
            }
        })
        .collect()
}

/// Reads frames until the connection closes; panics if it stays open past the read timeout.
fn frames_until_closed(c: &mut Raw) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = c.try_read_frame() {
        out.push(f);
    }
    out
}

#[test]
fn unreachable_redis_closes_the_client_then_service_resumes() {
    let mut redis = Redis::start();
    let addr = redis.addr();
    redis.kill(); // nothing listens on its port now
    let mut sw = Stormwall::start(&addr, "");

    // A client that waits for the server, and one that speaks first (as libraries do).
    for speaks_first in [false, true, false] {
        let mut c = conn(sw.port, 5);
        if speaks_first {
            c.cmd(&[b"PING"]);
        }
        // Closed with no reply, as a refused connection to Redis would be: an error reply
        // could be taken for the answer to the first command.
        assert_eq!(
            c.try_read_frame(),
            None,
            "a reply from an unreachable Redis"
        );
    }
    assert!(sw.is_running(), "stormwall exited\n{}", sw.log());

    // Redis comes up on that port: new clients are served, no restart of stormwall needed.
    redis.restart();
    let mut c = conn(sw.port, 5);
    assert_eq!(text(&c.call(&[b"SET", b"k", b"v"])), "OK");
    assert_eq!(text(&c.call(&[b"GET", b"k"])), "v");
    assert_eq!(text(&redis.raw().call(&[b"GET", b"k"])), "v");
}

#[test]
fn redis_killed_mid_traffic_fails_every_client_promptly() {
    let mut redis = Redis::start();
    // Shared mode: a command arriving while Redis is away waits this long for it.
    let sw = Stormwall::start(&redis.addr(), "outage_wait = \"300ms\"\n");

    // A client blocked in BLPOP.
    let mut blocked = conn(sw.port, 5);
    blocked.cmd(&[b"BLPOP", b"q", b"0"]);
    // One with replies owed behind a blocking command.
    let mut behind = conn(sw.port, 5);
    let mut input = encode_cmd(&[b"PING"]);
    input.extend(encode_cmd(&[b"BLPOP", b"q2", b"0"]));
    input.extend(encode_cmd(&[b"PING"]));
    input.extend(encode_cmd(&[b"GET", b"x"]));
    behind.send(&input);
    assert_eq!(text(&behind.read_frame()), "PONG");
    wait_blocked(&redis, 2);
    // An idle client, owed nothing.
    let mut idle = conn(sw.port, 5);
    assert_eq!(text(&idle.call(&[b"PING"])), "PONG");

    // A client streaming a deep INCR pipeline, read by another thread.
    let streamer = conn(sw.port, 5);
    let mut writer = streamer.stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let seen = seen.clone();
        let mut streamer = streamer;
        thread::spawn(move || {
            // Real replies count up from 1 until the connection closes; no error replies.
            let mut ok = 0i64;
            while let Some(f) = streamer.try_read_frame() {
                assert!(
                    !is_error(&f),
                    "an error reply in place of a lost command: {f:?}"
                );
                ok += 1;
                assert_eq!(f, number(ok), "INCR replies out of order");
                seen.store(ok as u64, Ordering::Relaxed);
            }
            ok
        })
    };
    let batch: Vec<u8> = (0..500)
        .flat_map(|_| encode_cmd(&[b"INCR", b"n"]))
        .collect();
    let writing = thread::spawn(move || {
        // Until stormwall closes the connection (or stops reading: the write timeout).
        while writer.write_all(&batch).is_ok() {}
    });
    wait_for(Duration::from_secs(10), "pipeline progress", || {
        seen.load(Ordering::Relaxed) >= 2000
    });

    redis.kill();

    // Owed replies (BLPOP, PING and GET) become a closed connection, as with Redis.
    assert_eq!(frames_until_closed(&mut blocked), vec![]);
    assert_eq!(frames_until_closed(&mut behind), vec![]);
    if shared_mode() {
        // Owed nothing, it keeps its connection and is served once Redis is back (below).
        assert!(idle.try_read_frame_now().is_none());
    } else {
        assert!(idle.closed(), "idle client not closed after Redis died");
    }
    let results = join_within(vec![reader], Duration::from_secs(10), "pipeline reader");
    assert!(results[0] >= 2000);
    join_within(vec![writing], Duration::from_secs(10), "pipeline writer");

    // Redis is back: new connections work.
    redis.restart();
    let mut c = conn(sw.port, 5);
    assert_eq!(text(&c.call(&[b"PING"])), "PONG");
    assert_eq!(c.call(&[b"INCR", b"n"]), number(1), "Redis restarted empty");
    if shared_mode() {
        assert_eq!(idle.call(&[b"INCR", b"n"]), number(2));
    }
}

/// A minimal client whose failures are values, not panics.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

enum Failure {
    /// An error reply or a closed/reset connection: acceptable while Redis is down.
    Error(String),
    /// No answer within the timeout: never acceptable.
    Hang(String),
}

impl Client {
    fn connect(port: u16) -> Result<Client, Failure> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| Failure::Hang(format!("stormwall refused a TCP connection: {e}")))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    fn call(&mut self, args: &[&[u8]]) -> Result<Frame, Failure> {
        let io = |e: std::io::Error, what: &str| {
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                Failure::Hang(format!("{what} timed out"))
            } else {
                Failure::Error(format!("{what}: {e}"))
            }
        };
        self.stream
            .write_all(&encode_cmd(args))
            .map_err(|e| io(e, "write"))?;
        loop {
            // RESP2's null bulk string, which the RESP3 decoder does not read.
            if self.buf.starts_with(b"$-1\r\n") {
                self.buf.drain(..5);
                return Ok(Frame::Null);
            }
            if let Some((frame, len)) =
                redis_protocol::resp3::decode::complete::decode(&self.buf)
                    .map_err(|e| Failure::Hang(format!("invalid RESP: {e:?}")))?
            {
                self.buf.drain(..len);
                return if is_error(&frame) {
                    Err(Failure::Error(text(&frame)))
                } else {
                    Ok(frame)
                };
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Failure::Error("connection closed".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(io(e, "read")),
            }
        }
    }
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    ok_cycles: u64,
    errors: u64,
}

/// Loops SET/GET/INCR on its own keys until `stop`, reconnecting after errors. Within one
/// client connection (one upstream connection, hence one Redis lifetime) nothing acknowledged
/// may be lost: GET returns what SET stored, INCR counts up by one. After `final_phase` is set
/// (Redis up for good), a fresh connection must succeed every time.
fn worker(
    port: u16,
    id: usize,
    final_phase: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<Tally, String> {
    let key = format!("k{id}");
    let counter = format!("n{id}");
    let mut tally = Tally::default();
    let mut conn: Option<(Client, bool)> = None;
    // Last acknowledged INCR value, and INCRs sent since without an answer (they may or may
    // not have been applied).
    let mut last_incr: i64 = 0;
    let mut unacked: i64 = 0;
    let mut fresh = true; // the next INCR is the first on its connection
    let mut final_ok = 0;
    for i in 0u64.. {
        if stop.load(Ordering::Relaxed) || final_ok >= 20 {
            return Ok(tally);
        }
        if conn.is_none() {
            let after_final = final_phase.load(Ordering::Relaxed);
            match Client::connect(port) {
                Ok(c) => conn = Some((c, after_final)),
                Err(Failure::Hang(e) | Failure::Error(e)) => return Err(e),
            }
            fresh = true;
        }
        let (c, strict) = conn.as_mut().unwrap();
        let strict = *strict;
        let value = format!("{id}-{i}");
        let cycle = (|| -> Result<(), Failure> {
            let r = c.call(&[b"SET", key.as_bytes(), value.as_bytes()])?;
            if text(&r) != "OK" {
                return Err(Failure::Hang(format!("SET answered {r:?}")));
            }
            let r = c.call(&[b"GET", key.as_bytes()])?;
            // A shared client owed nothing keeps its connection across a restart, so its
            // GET may find a restarted, empty Redis.
            let restarted = shared_mode() && r == Frame::Null;
            if r != blob(value.as_bytes()) && !restarted {
                return Err(Failure::Hang(format!(
                    "GET after an acknowledged SET {value} answered {r:?}"
                )));
            }
            unacked += 1;
            let r = c.call(&[b"INCR", counter.as_bytes()])?;
            let Frame::Number { data: v, .. } = r else {
                return Err(Failure::Hang(format!("INCR answered {r:?}")));
            };
            unacked -= 1;
            // Likewise for its INCR.
            let plausible = if fresh || shared_mode() {
                // Same Redis (continuing, maybe with unanswered INCRs applied) or a restarted,
                // empty one.
                (last_incr + 1..=last_incr + 1 + unacked).contains(&v)
                    || (1..=1 + unacked).contains(&v)
            } else {
                v == last_incr + 1
            };
            if !plausible {
                return Err(Failure::Hang(format!(
                    "INCR {counter} answered {v} after {last_incr} (fresh connection: {fresh}, \
                     unanswered INCRs: {unacked})"
                )));
            }
            last_incr = v;
            unacked = 0;
            fresh = false;
            Ok(())
        })();
        match cycle {
            Ok(()) => {
                tally.ok_cycles += 1;
                if final_phase.load(Ordering::Relaxed) {
                    final_ok += 1;
                }
            }
            // "Hang" here also covers wrong answers: both fail the test.
            Err(Failure::Hang(e)) => return Err(format!("worker {id}: {e}")),
            Err(Failure::Error(e)) => {
                if strict {
                    return Err(format!(
                        "worker {id}: error on a connection made after Redis was back: {e}"
                    ));
                }
                tally.errors += 1;
                conn = None;
            }
        }
    }
    unreachable!()
}

#[test]
fn many_clients_survive_redis_restarting_twice() {
    let mut redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let port = sw.port;
    let final_phase = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..32)
        .map(|id| {
            let (f, s) = (final_phase.clone(), stop.clone());
            thread::spawn(move || worker(port, id, f, s))
        })
        .collect();
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(400));
        redis.kill();
        thread::sleep(Duration::from_millis(300));
        redis.restart();
    }
    final_phase.store(true, Ordering::Relaxed);
    let results = join_within(workers, Duration::from_secs(30), "workers");
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for r in results {
        let t = r.unwrap_or_else(|e| panic!("{e}\n{}", sw.log()));
        assert!(t.ok_cycles >= 20);
        errors += t.errors;
    }
    // Shared clients owed nothing when Redis died keep their connections; one with a
    // command in flight may see its connection close, or, by luck of timing, none does.
    assert!(
        errors > 0 || shared_mode(),
        "no client saw an error although Redis was killed twice under load"
    );
}

/// Sends SIGSTOP/SIGCONT to a process; continues it again when dropped.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("cannot run kill");
    assert!(status.success());
}

#[test]
fn reply_timeout_fails_stuck_commands_but_not_blocking_ones() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "reply_timeout = \"500ms\"\n");
    let mut blocked = conn(sw.port, 10);
    blocked.cmd(&[b"BLPOP", b"q", b"0"]);
    wait_blocked(&redis, 1);
    let mut slow = conn(sw.port, 10);
    assert_eq!(text(&slow.call(&[b"PING"])), "PONG");

    {
        // Redis stops answering until we let it continue: the timeout must fire first.
        let _paused = Stopped::stop(redis.pid());
        // Its fate is unknown: the connection closes, with no error reply.
        slow.cmd(&[b"GET", b"k"]);
        assert_eq!(frames_until_closed(&mut slow), vec![]);
        // A client connecting during the pause gets the same treatment.
        let mut late = conn(sw.port, 10);
        late.cmd(&[b"PING"]);
        assert_eq!(frames_until_closed(&mut late), vec![]);
    }

    // The BLPOP client waited through the whole pause, unaffected.
    let mut direct = redis.raw();
    assert_eq!(direct.call(&[b"LPUSH", b"q", b"v"]), number(1));
    assert_eq!(blocked.read_frame(), array(&[blob(b"q"), blob(b"v")]));
    assert_eq!(text(&blocked.call(&[b"PING"])), "PONG");
    assert_eq!(text(&conn(sw.port, 5).call(&[b"PING"])), "PONG");
}

#[test]
fn sigterm_drains_in_flight_commands_and_refuses_new_connections() {
    let redis = Redis::start();
    let mut sw = Stormwall::start(&redis.addr(), "");
    let mut blocked = conn(sw.port, 10);
    blocked.cmd(&[b"BLPOP", b"q", b"0"]);
    wait_blocked(&redis, 1);
    let mut idle = conn(sw.port, 10);
    assert_eq!(text(&idle.call(&[b"PING"])), "PONG");

    sw.signal("TERM");
    wait_for(
        Duration::from_secs(5),
        "new connections to be refused after SIGTERM",
        || TcpStream::connect(("127.0.0.1", sw.port)).is_err(),
    );
    // An idle client has nothing in flight: it is let go.
    assert!(idle.closed());

    // The BLPOP is served within the drain window, and its reply delivered.
    assert_eq!(redis.raw().call(&[b"LPUSH", b"q", b"v"]), number(1));
    assert_eq!(blocked.read_frame(), array(&[blob(b"q"), blob(b"v")]));
    assert_eq!(sw.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(blocked.closed());
}

#[test]
fn sigterm_exits_after_drain_timeout_when_a_command_never_finishes() {
    let redis = Redis::start();
    let mut sw = Stormwall::start(&redis.addr(), "[shutdown]\ndrain_timeout = \"300ms\"\n");
    let mut blocked = conn(sw.port, 10);
    blocked.cmd(&[b"BLPOP", b"q", b"0"]);
    wait_blocked(&redis, 1);
    sw.signal("TERM");
    assert_eq!(sw.wait_exit(Duration::from_secs(5)), Some(0));
    let rest = frames_until_closed(&mut blocked);
    assert!(rest.iter().all(is_error), "{rest:?}");
    assert!(sw.log().contains("drain timeout reached"), "{}", sw.log());
}
