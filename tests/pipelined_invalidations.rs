//! Pipelined governed requests from one connection: admitted together and batched together
//! (a `redis-cli --pipe` of deletes is a few batches, not one per request), while every
//! request still gets its own exact answer (G2) and nothing after an invalidation runs
//! before it (G3) — a non-governed command between two governed ones is a barrier.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Frame, Raw, Redis, Stormwall, as_int, encode_cmd, error_text, metric, text};

/// Sends `commands` in one write and reads one reply each.
fn pipeline(raw: &mut Raw, commands: &[Vec<Vec<u8>>]) -> Vec<Frame> {
    let mut bytes = Vec::new();
    for c in commands {
        let args: Vec<&[u8]> = c.iter().map(|a| a.as_slice()).collect();
        bytes.extend(encode_cmd(&args));
    }
    raw.send(&bytes);
    commands.iter().map(|_| raw.read_frame()).collect()
}

fn cmd(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

fn set_keys(redis: &Redis, keys: impl Iterator<Item = String>) {
    let mut raw = redis.raw();
    let commands: Vec<_> = keys.map(|k| cmd(&["SET", &k, "v"])).collect();
    for chunk in commands.chunks(5000) {
        for reply in pipeline(&mut raw, chunk) {
            assert_eq!(text(&reply), "OK");
        }
    }
}

/// 20,000 pipelined single-key deletes, some repeating an earlier key and some naming keys
/// that never existed: each gets exactly what it would get from Redis in that order, and
/// Redis sees batches, not 20,000 commands.
#[test]
fn a_pipeline_of_deletes_is_batched_and_counted_exactly() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    const N: usize = 20_000;
    set_keys(
        &redis,
        (0..N).filter(|i| i % 7 != 3).map(|i| format!("k{i}")),
    );
    let mut commands = Vec::new();
    for i in 0..N {
        let name = if i % 2 == 0 { "DEL" } else { "UNLINK" };
        commands.push(cmd(&[name, &format!("k{i}")]));
        if i % 10 == 9 {
            // Deleted just before by this very connection: Redis would answer 0.
            commands.push(cmd(&["DEL", &format!("k{}", i - 1), &format!("k{i}")]));
        }
    }
    let mut existing: HashSet<String> = (0..N)
        .filter(|i| i % 7 != 3)
        .map(|i| format!("k{i}"))
        .collect();
    let expected: Vec<i64> = commands
        .iter()
        .map(|c| {
            c[1..]
                .iter()
                .filter(|k| existing.remove(std::str::from_utf8(k).unwrap()))
                .count() as i64
        })
        .collect();
    let mut raw = sw.raw();
    let replies = pipeline(&mut raw, &commands);
    let counts: Vec<i64> = replies.iter().map(as_int).collect();
    assert_eq!(counts, expected);
    let dbsize = redis.raw().call(&[b"DBSIZE"]);
    assert_eq!(as_int(&dbsize), 0);
    let batches = metric(&sw, "stormwall_invalidation_batches_total", &[]);
    let sent = metric(&sw, "stormwall_invalidation_commands_sent_total", &[]);
    let requests = commands.len() as f64;
    assert!(
        batches <= requests / 20.0,
        "{batches} batches for {requests} pipelined requests"
    );
    assert!(
        sent <= requests / 20.0,
        "{sent} commands reached Redis for {requests} pipelined requests"
    );
}

/// G3 within a pipeline: every non-governed command is a barrier between the governed
/// requests around it, and the outcomes show the order Redis ran them in.
#[test]
fn commands_between_pipelined_invalidations_keep_their_order() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut raw = sw.raw();
    let replies = pipeline(
        &mut raw,
        &[
            cmd(&["SET", "a", "1"]),
            cmd(&["DEL", "a"]),
            cmd(&["SET", "a", "2"]),
            cmd(&["GET", "a"]),
            cmd(&["DEL", "a"]),
            cmd(&["UNLINK", "a"]),
            cmd(&["GET", "a"]),
            cmd(&["SET", "b", "1"]),
            cmd(&["SET", "c", "1"]),
            cmd(&["DEL", "b"]),
            cmd(&["FLUSHDB"]),
            cmd(&["FLUSHDB", "ASYNC"]),
            cmd(&["EXISTS", "c"]),
            cmd(&["SET", "d", "1"]),
            cmd(&["DEL", "d", "c"]),
            cmd(&["EXISTS", "d"]),
        ],
    );
    let shown: Vec<String> = replies.iter().map(text).collect();
    assert_eq!(
        shown,
        [
            "OK", "1", "OK", "2", "1", "0", "Null", "OK", "OK", "1", "OK", "OK", "0", "OK", "1",
            "0"
        ]
    );
}

/// G5 with pipelining: a request for a key its ACL user may not touch gets Redis's own
/// refusal, word for word, and the requests around it in the same pipeline their counts.
#[test]
fn a_refused_request_in_a_pipeline_gets_redis_own_error() {
    let redis = Redis::start();
    let mut admin = redis.raw();
    admin.call(&[b"ACL", b"SETUSER", b"alice", b"on", b">p", b"~a*", b"+@all"]);
    // bob may not run scripts: his batches go without the script, with the same answers.
    admin.call(&[
        b"ACL",
        b"SETUSER",
        b"bob",
        b"on",
        b">p",
        b"~*",
        b"+@all",
        b"-@scripting",
    ]);
    set_keys(
        &redis,
        ["a1", "a2", "b1", "x1", "x2"].map(String::from).into_iter(),
    );
    let mut direct = redis.raw();
    direct.call(&[b"AUTH", b"alice", b"p"]);
    let expected = error_text(&direct.call(&[b"DEL", b"b1"]));
    let sw = Stormwall::start(&redis.addr(), "");
    let mut raw = sw.raw();
    assert_eq!(text(&raw.call(&[b"AUTH", b"alice", b"p"])), "OK");
    let replies = pipeline(
        &mut raw,
        &[
            cmd(&["DEL", "a1"]),
            cmd(&["DEL", "b1"]),
            cmd(&["UNLINK", "a2", "a1"]),
        ],
    );
    assert_eq!(as_int(&replies[0]), 1);
    assert_eq!(error_text(&replies[1]), expected);
    assert_eq!(as_int(&replies[2]), 1);
    let mut bob = sw.raw();
    assert_eq!(text(&bob.call(&[b"AUTH", b"bob", b"p"])), "OK");
    let replies = pipeline(
        &mut bob,
        &[
            cmd(&["DEL", "x1"]),
            cmd(&["DEL", "x1", "x2"]),
            cmd(&["UNLINK", "b1"]),
            cmd(&["DEL", "b1"]),
        ],
    );
    let counts: Vec<i64> = replies.iter().map(as_int).collect();
    assert_eq!(counts, [1, 1, 1, 0]);
    let dbsize = redis.raw().call(&[b"DBSIZE"]);
    assert_eq!(as_int(&dbsize), 0);
}

/// Pipelines from many connections at once, over the same keys: every request's count is
/// what it removed, so the counts add up to the keys that existed.
#[test]
fn concurrent_pipelines_count_every_key_once() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    const KEYS: usize = 2000;
    const CLIENTS: usize = 16;
    for round in 0..3 {
        set_keys(&redis, (0..KEYS).map(|i| format!("k{i}")));
        let port = sw.port;
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut raw = Raw::connect(port);
                    let commands: Vec<_> = (0..KEYS / 4)
                        .map(|i| {
                            let k = (c * 131 + i * 7 + round) % KEYS;
                            cmd(&["DEL", &format!("k{k}"), &format!("k{}", (k + 1) % KEYS)])
                        })
                        .collect();
                    pipeline(&mut raw, &commands)
                        .iter()
                        .map(as_int)
                        .sum::<i64>()
                })
            })
            .collect();
        let total: i64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let left = as_int(&redis.raw().call(&[b"DBSIZE"]));
        assert_eq!(total + left, KEYS as i64, "round {round}");
    }
}

/// The adaptive budget: while Redis is made slow (`DEBUG SLEEP` from another client) during
/// a stream of deletes through stormwall, the budget is cut — toward, never below, the
/// floor — and said so once in the log; when Redis is quick again it grows back to the
/// configured budget.
#[test]
fn the_adaptive_budget_follows_redis_latency() {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let sw = Stormwall::start(&redis.addr(), "[invalidation]\nadaptive_floor = 0.1\n");
    let ratio = |sw: &Stormwall| metric(sw, "stormwall_invalidation_adaptive_ratio", &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deleter = {
        let stop = stop.clone();
        let port = sw.port;
        std::thread::spawn(move || {
            let mut raw = Raw::connect(port);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = raw.call(&[b"DEL", format!("k{i}").as_bytes()]);
                assert_eq!(as_int(&reply), 0);
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let slow = {
        let stop = stop.clone();
        let mut raw = redis.raw();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Stalls far longer than a busy test machine's own noise (several tests run
                // at once on two cores): the controller must see them whatever its baseline.
                assert_eq!(text(&raw.call(&[b"DEBUG", b"SLEEP", b"0.2"])), "OK");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    // Near the floor (a healthy window now and then grows it a little), never below it.
    let mut lowest = 1.0f64;
    common::eventually(
        "the budget is cut to near its floor",
        Duration::from_secs(20),
        || {
            lowest = lowest.min(ratio(&sw));
            lowest <= 0.2
        },
    );
    assert!(lowest >= 0.1 - 1e-9, "never below the floor: {lowest}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().unwrap();
    // Deletes keep flowing, so the controller keeps sampling, on a quick Redis.
    stop.store(false, std::sync::atomic::Ordering::Relaxed);
    let deleter2 = {
        let stop = stop.clone();
        let port = sw.port;
        std::thread::spawn(move || {
            let mut raw = Raw::connect(port);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(as_int(&raw.call(&[b"DEL", b"x"])), 0);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    // Back to the full budget: the controller says so once, in the log (the gauge may dip
    // again for a moment at any noise on a busy machine).
    common::eventually("the budget grows back", Duration::from_secs(30), || {
        sw.log().contains("grown back to the full budget")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    deleter.join().unwrap();
    deleter2.join().unwrap();
    let log = sw.log();
    assert!(log.contains("cutting"), "{log}");
    assert!(log.contains("grown back to the full budget"), "{log}");
    assert!(
        log.matches("cutting").count() <= 10,
        "logged once per episode, not per window: {log}"
    );
}
