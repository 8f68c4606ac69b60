//! Contract point G1: a client cannot tell stormwall from Redis.
//!
//! Every test runs against a real `redis-server`. Where a byte-level comparison makes sense the
//! same input goes to Redis directly and through stormwall and the replies must be identical.
//! Stateful exchanges use a [`Twin`]: two identical fresh Redis servers, one of them behind
//! stormwall, so the direct and the proxied run cannot disturb each other and every reply,
//! counters included, must match exactly. Each test would fail if the feature it names broke.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Frame, Raw, Redis, Stormwall, assert_same, encode_cmd, text};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A command of text arguments, as a RESP array of bulk strings.
fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    encode_cmd(&args)
}

/// Several commands concatenated, to be sent in one write.
fn cmds(list: &[&[&str]]) -> Vec<u8> {
    list.iter().flat_map(|c| cmd(c)).collect()
}

fn call(raw: &mut Raw, args: &[&str]) -> Frame {
    raw.send(&cmd(args));
    raw.read_frame()
}

/// The texts of an array's (or push frame's) elements; nested aggregates are debug-printed.
fn strings(frame: &Frame) -> Vec<String> {
    match frame {
        Frame::Array { data, .. } | Frame::Push { data, .. } => data.iter().map(text).collect(),
        other => panic!("expected an array or push frame, got {other:?}"),
    }
}

/// Every scalar in a (nested) reply, depth first, as text.
fn flat(frame: &Frame) -> Vec<String> {
    match frame {
        Frame::Array { data, .. } | Frame::Push { data, .. } => {
            data.iter().flat_map(flat).collect()
        }
        other => vec![text(other)],
    }
}

fn is_push(frame: &Frame) -> bool {
    matches!(frame, Frame::Push { .. })
}

fn bulk(frame: &Frame) -> &[u8] {
    match frame {
        Frame::BlobString { data, .. } => data,
        other => panic!("expected a bulk string, got {other:?}"),
    }
}

/// Two identical fresh Redis servers, `behind` reached through stormwall and `direct` not.
struct Twin {
    direct: Redis,
    behind: Redis,
    sw: Stormwall,
}

impl Twin {
    fn start() -> Twin {
        Twin::start_with(&[], "")
    }

    fn start_with(redis_args: &[&str], toml: &str) -> Twin {
        let direct = Redis::start_with(redis_args);
        let behind = Redis::start_with(redis_args);
        let sw = Stormwall::start(&behind.addr(), toml);
        Twin { direct, behind, sw }
    }

    /// A direct connection to `direct` and a proxied one to `behind`.
    fn conns(&self) -> (Raw, Raw) {
        (self.direct.raw(), self.sw.raw())
    }

    /// Direct connections to both servers, in the same order as [`conns`](Self::conns).
    fn side_conns(&self) -> (Raw, Raw) {
        (self.direct.raw(), self.behind.raw())
    }
}

/// Sends `input` on both connections, reads `frames` replies from each, asserts they are
/// identical and returns them.
fn exchange(direct: &mut Raw, proxied: &mut Raw, input: &[u8], frames: usize) -> Vec<Frame> {
    direct.send(input);
    proxied.send(input);
    (0..frames)
        .map(|i| {
            let a = direct.read_frame();
            let b = proxied.read_frame();
            assert_eq!(
                a,
                b,
                "reply {i} differs (left: direct, right: through stormwall) for input {:?}",
                String::from_utf8_lossy(input)
            );
            a
        })
        .collect()
}

/// A `HELLO` reply without its `id` field (the connection id differs between the direct and
/// the proxied connection); asserts the id was there and was a number.
fn without_id(frame: Frame) -> Frame {
    match frame {
        Frame::Map {
            mut data,
            attributes,
        } => {
            let key = Frame::BlobString {
                data: b"id".to_vec(),
                attributes: None,
            };
            let id = data.remove(&key);
            assert!(
                matches!(id, Some(Frame::Number { .. })),
                "HELLO reply has no numeric id: {id:?}"
            );
            Frame::Map { data, attributes }
        }
        Frame::Array { data, attributes } => {
            let mut out = Vec::new();
            let mut it = data.into_iter();
            let mut saw_id = false;
            while let Some(k) = it.next() {
                let v = it.next();
                if text(&k) == "id" {
                    assert!(matches!(v, Some(Frame::Number { .. })), "id: {v:?}");
                    saw_id = true;
                    continue;
                }
                out.push(k);
                out.extend(v);
            }
            assert!(saw_id, "HELLO reply has no id field");
            Frame::Array {
                data: out,
                attributes,
            }
        }
        other => other,
    }
}

/// Sends a `HELLO` on both connections and compares the replies, ignoring the connection id.
fn hello(direct: &mut Raw, proxied: &mut Raw, args: &[&str]) -> Frame {
    direct.send(&cmd(args));
    proxied.send(&cmd(args));
    let a = without_id(direct.read_frame());
    let b = without_id(proxied.read_frame());
    assert_eq!(a, b, "{args:?} replies differ (left: direct)");
    a
}

/// Polls Redis until `n` clients are blocked (proof that a blocking command really waits in
/// Redis rather than having been answered or dropped on the way).
fn wait_blocked(redis: &Redis, n: usize) {
    let mut admin = redis.raw();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = text(&call(&mut admin, &["INFO", "clients"]));
        let blocked = info
            .lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        if blocked == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Redis on port {} never showed {n} blocked clients:\n{info}",
            redis.port
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Subscribes both connections and has one message published to each. Fails if stormwall
/// wrongly believes the connection is inside a transaction: it would then count the
/// subscription as one ordinary reply and take the message for a reply nobody asked for.
fn assert_subscribe_works(twin: &Twin, d: &mut Raw, p: &mut Raw) {
    let r = exchange(d, p, &cmd(&["SUBSCRIBE", "probe"]), 1);
    assert_eq!(strings(&r[0]), ["subscribe", "probe", "1"]);
    let (mut pd, mut pb) = twin.side_conns();
    for publisher in [&mut pd, &mut pb] {
        assert_eq!(text(&call(publisher, &["PUBLISH", "probe", "m"])), "1");
    }
    let a = d.read_frame();
    let b = p
        .try_read_frame()
        .expect("stormwall closed the subscribed connection instead of relaying the message");
    assert_eq!(a, b);
    assert_eq!(strings(&b), ["message", "probe", "m"]);
}

fn assert_ok(frame: &Frame) {
    assert_eq!(text(frame), "OK", "expected +OK, got {frame:?}");
}

// ---------------------------------------------------------------------------------------------
// HELLO, AUTH, ACL users, SELECT
// ---------------------------------------------------------------------------------------------

#[test]
fn hello2_replies_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let reply = hello(&mut d, &mut p, &["HELLO", "2"]);
    assert!(matches!(reply, Frame::Array { .. }), "HELLO 2: {reply:?}");
    assert!(strings(&reply).contains(&"proto".to_string()));
    // Still RESP2: a hash is a flat array, a missing key a RESP2 null.
    exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["HSET", "h", "a", "1", "b", "2"],
            &["HGETALL", "h"],
            &["GET", "missing"],
        ]),
        3,
    );
    hello(&mut d, &mut p, &["HELLO", "2", "SETNAME", "hello-two"]);
    let r = exchange(&mut d, &mut p, &cmd(&["CLIENT", "GETNAME"]), 1);
    assert_eq!(text(&r[0]), "hello-two");
    // An unsupported protocol version is Redis's error, unchanged.
    let r = exchange(&mut d, &mut p, &cmd(&["HELLO", "4"]), 1);
    assert!(text(&r[0]).starts_with("NOPROTO"), "{:?}", r[0]);
}

#[test]
fn hello3_switches_to_resp3_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let reply = hello(&mut d, &mut p, &["HELLO", "3"]);
    assert!(matches!(reply, Frame::Map { .. }), "HELLO 3: {reply:?}");
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["HSET", "h", "a", "1", "b", "2"],
            &["HGETALL", "h"],
            &["SADD", "s", "1", "2", "3"],
            &["SMEMBERS", "s"],
            &["ZADD", "z", "1.5", "m"],
            &["ZSCORE", "z", "m"],
            &["GET", "missing"],
            &["CONFIG", "GET", "maxmemory"],
            &["NOSUCHCOMMAND"],
        ]),
        9,
    );
    assert!(matches!(r[1], Frame::Map { .. }), "HGETALL: {:?}", r[1]);
    assert!(matches!(r[3], Frame::Set { .. }), "SMEMBERS: {:?}", r[3]);
    assert!(matches!(r[5], Frame::Double { .. }), "ZSCORE: {:?}", r[5]);
    assert_eq!(r[6], Frame::Null);
    // And back to RESP2 on the same connection.
    hello(&mut d, &mut p, &["HELLO", "2"]);
    let r = exchange(&mut d, &mut p, &cmd(&["HGETALL", "h"]), 1);
    assert!(matches!(r[0], Frame::Array { .. }), "{:?}", r[0]);
}

fn hello_with_auth(proto: &str) {
    let twin = Twin::start_with(&["--requirepass", "s3cret"], "");
    let (mut d, mut p) = twin.conns();
    // Without AUTH on a server that requires it.
    let r = exchange(&mut d, &mut p, &cmd(&["HELLO", proto]), 1);
    assert!(text(&r[0]).starts_with("NOAUTH"), "{:?}", r[0]);
    // Wrong password, then an unknown user.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["HELLO", proto, "AUTH", "default", "wrong"],
            &["HELLO", proto, "AUTH", "nobody", "s3cret"],
            &["GET", "k"],
        ]),
        3,
    );
    assert!(text(&r[0]).starts_with("WRONGPASS"), "{:?}", r[0]);
    assert!(text(&r[1]).starts_with("WRONGPASS"), "{:?}", r[1]);
    assert!(text(&r[2]).starts_with("NOAUTH"), "{:?}", r[2]);
    // The right password authenticates and switches protocol in one step.
    let reply = hello(
        &mut d,
        &mut p,
        &[
            "HELLO", proto, "AUTH", "default", "s3cret", "SETNAME", "authed",
        ],
    );
    let map = proto == "3";
    assert_eq!(matches!(reply, Frame::Map { .. }), map, "{reply:?}");
    assert_eq!(matches!(reply, Frame::Array { .. }), !map, "{reply:?}");
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["SET", "k", "v"],
            &["GET", "k"],
            &["CLIENT", "GETNAME"],
            &["HGETALL", "nohash"],
        ]),
        4,
    );
    assert_eq!(text(&r[1]), "v");
    assert_eq!(text(&r[2]), "authed");
}

#[test]
fn hello2_with_auth_like_redis() {
    hello_with_auth("2");
}

#[test]
fn hello3_with_auth_like_redis() {
    hello_with_auth("3");
}

#[test]
fn auth_with_requirepass_like_redis() {
    let twin = Twin::start_with(&["--requirepass", "s3cret"], "");
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["GET", "k"],
            &["SET", "k", "v"],
            &["AUTH", "wrong"],
            &["PING"],
            &["AUTH", "s3cret"],
            &["SET", "k", "v"],
            &["GET", "k"],
            &["AUTH", "default", "s3cret"],
            &["AUTH", "default", "nope"],
        ]),
        9,
    );
    assert!(text(&r[0]).starts_with("NOAUTH"), "{:?}", r[0]);
    assert!(text(&r[1]).starts_with("NOAUTH"), "{:?}", r[1]);
    assert!(text(&r[2]).starts_with("WRONGPASS"), "{:?}", r[2]);
    assert!(text(&r[3]).starts_with("NOAUTH"), "{:?}", r[3]);
    assert_ok(&r[4]);
    assert_ok(&r[5]);
    assert_eq!(text(&r[6]), "v");
    assert_ok(&r[7]);
    assert!(text(&r[8]).starts_with("WRONGPASS"), "{:?}", r[8]);
    // Authentication belongs to one client's connection: another client through the same
    // stormwall is not authenticated by it.
    let mut other = twin.sw.raw();
    let r = call(&mut other, &["GET", "k"]);
    assert!(text(&r).starts_with("NOAUTH"), "{r:?}");
}

#[test]
fn auth_as_acl_user_like_redis() {
    let twin = Twin::start_with(&["--requirepass", "s3cret"], "");
    let (mut sd, mut sb) = twin.side_conns();
    for admin in [&mut sd, &mut sb] {
        assert_ok(&call(admin, &["AUTH", "s3cret"]));
        assert_ok(&call(
            admin,
            &[
                "ACL", "SETUSER", "alice", "on", ">alicepw", "~app:*", "+@all", "-keys",
            ],
        ));
    }
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["GET", "app:k"],
            &["AUTH", "alice", "wrong"],
            &["AUTH", "alice", "alicepw"],
            &["ACL", "WHOAMI"],
            &["SET", "app:k", "v"],
            &["GET", "app:k"],
            &["SET", "other:k", "v"],
            &["KEYS", "*"],
        ]),
        8,
    );
    assert!(text(&r[0]).starts_with("NOAUTH"), "{:?}", r[0]);
    assert!(text(&r[1]).starts_with("WRONGPASS"), "{:?}", r[1]);
    assert_ok(&r[2]);
    assert_eq!(text(&r[3]), "alice");
    assert_ok(&r[4]);
    assert_eq!(text(&r[5]), "v");
    assert!(text(&r[6]).starts_with("NOPERM"), "{:?}", r[6]);
    assert!(text(&r[7]).starts_with("NOPERM"), "{:?}", r[7]);
    // Redis sees the proxied client's own connection authenticated as alice.
    let list = text(&call(&mut sb, &["CLIENT", "LIST"]));
    assert!(list.contains("user=alice"), "{list}");
}

#[test]
fn select_lands_in_the_selected_db() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut p = sw.raw();
    assert_ok(&call(&mut p, &["SELECT", "5"]));
    assert_ok(&call(&mut p, &["SET", "where", "db5"]));
    assert_eq!(text(&call(&mut p, &["GET", "where"])), "db5");
    // Checked directly on Redis: in db 5, not in db 0.
    let mut direct = redis.raw();
    assert_eq!(call(&mut direct, &["GET", "where"]), Frame::Null);
    assert_ok(&call(&mut direct, &["SELECT", "5"]));
    assert_eq!(text(&call(&mut direct, &["GET", "where"])), "db5");
    // Another client through stormwall has its own connection, still on db 0.
    let mut other = sw.raw();
    assert_eq!(call(&mut other, &["GET", "where"]), Frame::Null);
    // Errors are Redis's own.
    assert_same(
        &redis,
        &sw,
        &cmds(&[&["SELECT", "16"], &["SELECT", "x"]]),
        2,
    );
}

// ---------------------------------------------------------------------------------------------
// Pipelining and transactions
// ---------------------------------------------------------------------------------------------

#[test]
fn pipeline_of_10000_commands_in_one_write() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut p = sw.raw();
    let mut input = Vec::new();
    for i in 0..2500 {
        input.extend(cmd(&["SET", &format!("p:{i}"), &format!("v{i}")]));
        input.extend(cmd(&["GET", &format!("p:{i}")]));
        input.extend(cmd(&["INCR", "counter"]));
        input.extend(cmd(&["ECHO", &format!("e{i}")]));
    }
    p.send(&input);
    for i in 0..2500 {
        let set = p.read_frame();
        assert_ok(&set);
        assert_eq!(text(&p.read_frame()), format!("v{i}"), "GET p:{i}");
        assert_eq!(
            p.read_frame(),
            Frame::Number {
                data: i + 1,
                attributes: None
            },
            "INCR number {}",
            i + 1
        );
        assert_eq!(text(&p.read_frame()), format!("e{i}"), "ECHO {i}");
    }
    assert_eq!(text(&call(&mut p, &["PING"])), "PONG");
    assert_eq!(text(&call(&mut redis.raw(), &["GET", "counter"])), "2500");
}

/// A client that writes a whole large pipeline before reading any reply (as `redis-py`'s
/// `Pipeline.execute` does): Redis keeps reading and buffers the replies, so this works
/// directly, and it must work through stormwall too. 1,000 × `ECHO` of 40 kB each way.
#[test]
fn large_pipeline_written_whole_before_reading() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let payload = "x".repeat(40_000);
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend(cmd(&["ECHO", &format!("{i}:{payload}")]));
    }
    for (who, conn) in [("Redis", &mut d), ("stormwall", &mut p)] {
        // Fail rather than hang if the peer stops reading.
        conn.stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if let Err(e) = conn.stream.write_all(&input) {
            panic!("{who} stopped reading a 40 MB pipeline whose replies were not yet read: {e}");
        }
        for i in 0..1000 {
            let r = conn.read_frame();
            assert!(
                bulk(&r).starts_with(format!("{i}:").as_bytes()),
                "reply {i}"
            );
            assert_eq!(bulk(&r).len(), payload.len() + format!("{i}:").len());
        }
    }
}

#[test]
fn multi_exec_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["MULTI"],
            &["SET", "k", "1"],
            &["INCR", "k"],
            &["LPUSH", "l", "a", "b"],
            &["GET", "k"],
            &["EXEC"],
            &["GET", "k"],
        ]),
        7,
    );
    assert_ok(&r[0]);
    for q in &r[1..5] {
        assert_eq!(text(q), "QUEUED");
    }
    assert_eq!(strings(&r[5]), ["OK", "2", "2", "2"]);
    assert_eq!(text(&r[6]), "2");
    // EXEC ended the transaction for stormwall too.
    assert_subscribe_works(&twin, &mut d, &mut p);
}

#[test]
fn discard_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["MULTI"],
            &["SET", "k", "1"],
            &["DISCARD"],
            &["GET", "k"],
            &["DISCARD"],
            &["EXEC"],
        ]),
        6,
    );
    assert_ok(&r[0]);
    assert_eq!(text(&r[1]), "QUEUED");
    assert_ok(&r[2]);
    assert_eq!(r[3], Frame::Null);
    assert!(text(&r[4]).contains("DISCARD without MULTI"), "{:?}", r[4]);
    assert!(text(&r[5]).contains("EXEC without MULTI"), "{:?}", r[5]);
    assert_subscribe_works(&twin, &mut d, &mut p);
}

#[test]
fn watch_conflict_makes_exec_return_nil() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    // The conflicting writer goes straight to each server; for the proxied side it could
    // equally be another stormwall client.
    let (mut wd, _) = twin.side_conns();
    let mut wp = twin.sw.raw();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["SET", "k", "0"], &["WATCH", "k"], &["GET", "k"]]),
        3,
    );
    assert_eq!(text(&r[2]), "0");
    assert_ok(&call(&mut wd, &["SET", "k", "theirs"]));
    assert_ok(&call(&mut wp, &["SET", "k", "theirs"]));
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["MULTI"], &["SET", "k", "mine"], &["EXEC"], &["GET", "k"]]),
        4,
    );
    assert_eq!(
        r[2],
        Frame::Null,
        "EXEC after a conflicting write: {:?}",
        r[2]
    );
    assert_eq!(text(&r[3]), "theirs");
    // Without a conflict the same transaction commits.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["WATCH", "k"],
            &["MULTI"],
            &["SET", "k", "mine"],
            &["EXEC"],
            &["GET", "k"],
        ]),
        5,
    );
    assert_eq!(strings(&r[3]), ["OK"]);
    assert_eq!(text(&r[4]), "mine");
    assert_subscribe_works(&twin, &mut d, &mut p);
}

#[test]
fn errors_inside_multi_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    // A command rejected while queuing aborts the whole transaction.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["MULTI"],
            &["SET", "k", "1"],
            &["SET", "k"],
            &["NOSUCHCOMMAND", "x"],
            &["EXEC"],
            &["GET", "k"],
        ]),
        6,
    );
    assert_eq!(text(&r[1]), "QUEUED");
    assert!(text(&r[2]).starts_with("ERR wrong number"), "{:?}", r[2]);
    assert!(text(&r[3]).starts_with("ERR unknown command"), "{:?}", r[3]);
    assert!(text(&r[4]).starts_with("EXECABORT"), "{:?}", r[4]);
    assert_eq!(r[5], Frame::Null);
    // A command failing at run time fails alone, inside EXEC's reply.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["MULTI"],
            &["SET", "k", "text"],
            &["INCR", "k"],
            &["SET", "k2", "v"],
            &["EXEC"],
            &["MULTI"],
            &["MULTI"],
            &["WATCH", "k"],
            &["DISCARD"],
        ]),
        9,
    );
    match &r[4] {
        Frame::Array { data, .. } => {
            assert_eq!(data.len(), 3);
            assert!(text(&data[1]).contains("not an integer"), "{:?}", data[1]);
        }
        other => panic!("EXEC: {other:?}"),
    }
    assert!(
        text(&r[6]).contains("MULTI calls can not be nested"),
        "{:?}",
        r[6]
    );
    assert!(text(&r[7]).contains("WATCH inside MULTI"), "{:?}", r[7]);
    assert_ok(&r[8]);
    assert_subscribe_works(&twin, &mut d, &mut p);
}

/// A `MULTI` that Redis rejects (here: wrong arity; equally `-NOAUTH` or `-NOPERM`) does not
/// start a transaction, so a later `SUBSCRIBE` really subscribes and messages must arrive.
#[test]
fn rejected_multi_does_not_start_a_transaction() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(&mut d, &mut p, &cmd(&["MULTI", "extra"]), 1);
    assert!(text(&r[0]).starts_with("ERR wrong number"), "{:?}", r[0]);
    assert_subscribe_works(&twin, &mut d, &mut p);
}

// ---------------------------------------------------------------------------------------------
// Pub/sub
// ---------------------------------------------------------------------------------------------

/// Subscribes the same way directly and through stormwall, publishes one message on each
/// server from another connection, and checks both subscribers see identical frames, a
/// command while subscribed, the unsubscription, and normal commands afterwards.
fn pubsub_round_trip(resp3: bool, sub: &str, target: &str, publish: &str, unsub: &str) {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    if resp3 {
        hello(&mut d, &mut p, &["HELLO", "3"]);
    }
    let r = exchange(&mut d, &mut p, &cmd(&[sub, target]), 1);
    assert_eq!(is_push(&r[0]), resp3, "{:?}", r[0]);
    assert_eq!(strings(&r[0]), [sub.to_lowercase().as_str(), target, "1"]);

    let channel = "news.tech";
    let payload = "hello\r\n\0world";
    let (mut pd, mut pb) = twin.side_conns();
    for publisher in [&mut pd, &mut pb] {
        let n = call(publisher, &[publish, channel, payload]);
        assert_eq!(text(&n), "1", "{publish} found no subscriber");
    }
    let a = d.read_frame();
    let b = p.read_frame();
    assert_eq!(a, b, "published message differs (left: direct)");
    assert_eq!(is_push(&b), resp3, "{b:?}");
    let expected: Vec<&str> = match sub {
        "PSUBSCRIBE" => vec!["pmessage", target, channel, payload],
        "SSUBSCRIBE" => vec!["smessage", channel, payload],
        _ => vec!["message", channel, payload],
    };
    assert_eq!(strings(&b), expected);

    // A command while subscribed (RESP2 answers PING in pub/sub form, RESP3 normally).
    exchange(&mut d, &mut p, &cmd(&["PING"]), 1);

    let r = exchange(&mut d, &mut p, &cmd(&[unsub, target]), 1);
    assert_eq!(is_push(&r[0]), resp3, "{:?}", r[0]);
    assert_eq!(strings(&r[0]), [unsub.to_lowercase().as_str(), target, "0"]);
    for publisher in [&mut pd, &mut pb] {
        assert_eq!(text(&call(publisher, &[publish, channel, "late"])), "0");
    }
    // Back to normal replies on the same connection.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["SET", "after", "1"], &["GET", "after"], &["PING"]]),
        3,
    );
    assert_eq!(text(&r[1]), "1");
    assert_eq!(text(&r[2]), "PONG");
}

#[test]
fn subscribe_resp2() {
    pubsub_round_trip(false, "SUBSCRIBE", "news.tech", "PUBLISH", "UNSUBSCRIBE");
}

#[test]
fn psubscribe_resp2() {
    pubsub_round_trip(false, "PSUBSCRIBE", "news.*", "PUBLISH", "PUNSUBSCRIBE");
}

#[test]
fn ssubscribe_resp2() {
    pubsub_round_trip(false, "SSUBSCRIBE", "news.tech", "SPUBLISH", "SUNSUBSCRIBE");
}

#[test]
fn subscribe_resp3_push_frames() {
    pubsub_round_trip(true, "SUBSCRIBE", "news.tech", "PUBLISH", "UNSUBSCRIBE");
}

#[test]
fn psubscribe_resp3_push_frames() {
    pubsub_round_trip(true, "PSUBSCRIBE", "news.*", "PUBLISH", "PUNSUBSCRIBE");
}

#[test]
fn ssubscribe_resp3_push_frames() {
    pubsub_round_trip(true, "SSUBSCRIBE", "news.tech", "SPUBLISH", "SUNSUBSCRIBE");
}

// ---------------------------------------------------------------------------------------------
// Blocking commands
// ---------------------------------------------------------------------------------------------

/// A reply timeout far shorter than the blocking waits below: blocking commands must be
/// exempt from it.
const SHORT_REPLY_TIMEOUT: &str = "reply_timeout = \"200ms\"\n";

#[test]
fn blpop_unblocked_by_lpush_from_another_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), SHORT_REPLY_TIMEOUT);
    let mut p = sw.raw();
    // A command pipelined behind the blocking one must wait for it and come after it.
    p.send(&cmds(&[&["BLPOP", "queue", "5"], &["PING"]]));
    wait_blocked(&redis, 1);
    let mut pusher = sw.raw();
    let pushed = thread::spawn(move || {
        thread::sleep(Duration::from_millis(500));
        call(&mut pusher, &["LPUSH", "queue", "job-1"])
    });
    let r = p.read_frame();
    assert_eq!(strings(&r), ["queue", "job-1"]);
    assert_eq!(text(&p.read_frame()), "PONG");
    assert_eq!(text(&pushed.join().unwrap()), "1");
    // A timed-out BLPOP answers like Redis (a null array).
    assert_same(&redis, &sw, &cmd(&["BLPOP", "empty", "0.01"]), 1);
}

/// A client that disconnects while blocked: Redis drops its BLPOP at once, so an element
/// pushed afterwards stays in the list for the next consumer. Through stormwall the
/// client's upstream connection must go too, or Redis hands the element to a dead client.
#[test]
fn blpop_of_a_disconnected_client_does_not_consume_later_pushes() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    d.send(&cmd(&["BLPOP", "queue", "0"]));
    p.send(&cmd(&["BLPOP", "queue", "0"]));
    wait_blocked(&twin.direct, 1);
    wait_blocked(&twin.behind, 1);
    drop(d);
    drop(p);
    wait_blocked(&twin.direct, 0);
    wait_blocked(&twin.behind, 0);
    let (mut wd, mut wb) = twin.side_conns();
    for w in [&mut wd, &mut wb] {
        assert_eq!(text(&call(w, &["LPUSH", "queue", "job"])), "1");
        assert_eq!(
            text(&call(w, &["LLEN", "queue"])),
            "1",
            "the element was consumed"
        );
    }
}

#[test]
fn xread_block_unblocked_by_xadd() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), SHORT_REPLY_TIMEOUT);
    let mut p = sw.raw();
    p.send(&cmd(&["XREAD", "BLOCK", "5000", "STREAMS", "events", "$"]));
    wait_blocked(&redis, 1);
    thread::sleep(Duration::from_millis(500));
    let id = text(&call(
        &mut redis.raw(),
        &["XADD", "events", "*", "field", "value"],
    ));
    // [[events, [[id, [field, value]]]]]
    assert_eq!(flat(&p.read_frame()), ["events", &id, "field", "value"]);
    // Same bytes as Redis for a read of the existing entry and an XREAD that times out.
    assert_same(
        &redis,
        &sw,
        &cmds(&[
            &["XREAD", "STREAMS", "events", "0"],
            &["XREAD", "BLOCK", "10", "STREAMS", "events", "$"],
        ]),
        2,
    );
}

#[test]
fn wait_0_0_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["SET", "k", "v"], &["WAIT", "0", "0"], &["GET", "k"]]),
        3,
    );
    assert_eq!(text(&r[1]), "0");
    assert_eq!(text(&r[2]), "v");
}

// ---------------------------------------------------------------------------------------------
// CLIENT commands, tracking, MONITOR
// ---------------------------------------------------------------------------------------------

#[test]
fn client_setname_getname_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["CLIENT", "GETNAME"],
            &["CLIENT", "SETNAME", "billing-worker"],
            &["CLIENT", "GETNAME"],
            &["CLIENT", "SETNAME", "has space"],
        ]),
        4,
    );
    assert_eq!(r[0], Frame::Null);
    assert_ok(&r[1]);
    assert_eq!(text(&r[2]), "billing-worker");
    assert!(text(&r[3]).starts_with("ERR"), "{:?}", r[3]);
    // The name is on the client's own upstream connection, visible to Redis.
    let list = text(&call(&mut twin.behind.raw(), &["CLIENT", "LIST"]));
    assert!(list.contains("name=billing-worker"), "{list}");
}

#[test]
fn client_tracking_resp3_invalidation_push() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let (mut wd, mut wb) = twin.side_conns();
    for w in [&mut wd, &mut wb] {
        assert_ok(&call(w, &["SET", "tracked", "v1"]));
    }
    hello(&mut d, &mut p, &["HELLO", "3"]);
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["CLIENT", "TRACKING", "ON"], &["GET", "tracked"]]),
        2,
    );
    assert_ok(&r[0]);
    assert_eq!(text(&r[1]), "v1");
    // Another connection modifies the tracked key.
    for w in [&mut wd, &mut wb] {
        assert_ok(&call(w, &["SET", "tracked", "v2"]));
    }
    // The invalidation push arrives on its own, with no request outstanding.
    let a = d.read_frame();
    let b = p.read_frame();
    assert_eq!(a, b, "invalidation push differs (left: direct)");
    match &b {
        Frame::Push { data, .. } => {
            assert_eq!(text(&data[0]), "invalidate");
            assert_eq!(strings(&data[1]), ["tracked"]);
        }
        other => panic!("expected an invalidation push, got {other:?}"),
    }
    // Re-read (tracked again), invalidated again, then a push between replies.
    let r = exchange(&mut d, &mut p, &cmd(&["GET", "tracked"]), 1);
    assert_eq!(text(&r[0]), "v2");
    for w in [&mut wd, &mut wb] {
        assert_ok(&call(w, &["SET", "tracked", "v2b"]));
    }
    let r = exchange(&mut d, &mut p, &cmds(&[&["PING"], &["GET", "tracked"]]), 3);
    assert!(
        is_push(&r[0]),
        "expected the invalidation push first: {:?}",
        r[0]
    );
    assert_eq!(text(&r[1]), "PONG");
    assert_eq!(text(&r[2]), "v2b");
    // The client modifying its own tracked key: push and reply in Redis's order.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["SET", "tracked", "v3"], &["GET", "tracked"], &["PING"]]),
        4,
    );
    assert_eq!(r.iter().filter(|f| is_push(f)).count(), 1, "{r:?}");
}

#[test]
fn client_tracking_push_arrives_while_a_blocking_command_waits() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut p = sw.raw();
    let mut writer = redis.raw();
    assert_ok(&call(&mut writer, &["SET", "tracked", "v1"]));
    assert!(matches!(call(&mut p, &["HELLO", "3"]), Frame::Map { .. }));
    assert_ok(&call(&mut p, &["CLIENT", "TRACKING", "ON"]));
    assert_eq!(text(&call(&mut p, &["GET", "tracked"])), "v1");
    p.send(&cmd(&["BLPOP", "queue", "5"]));
    wait_blocked(&redis, 1);
    assert_ok(&call(&mut writer, &["SET", "tracked", "v2"]));
    // The push comes while BLPOP is still owed its reply...
    let push = p.read_frame();
    assert!(
        is_push(&push),
        "expected an invalidation push, got {push:?}"
    );
    assert_eq!(text(&call(&mut writer, &["LPUSH", "queue", "x"])), "1");
    // ...and the reply still arrives, after it, then normal service continues.
    assert_eq!(strings(&p.read_frame()), ["queue", "x"]);
    assert_eq!(text(&call(&mut p, &["GET", "tracked"])), "v2");
}

#[test]
fn monitor_sees_commands_from_another_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut m = sw.raw();
    assert_ok(&call(&mut m, &["MONITOR"]));
    let mut other = sw.raw();
    assert_ok(&call(&mut other, &["SET", "mon:key", "through-stormwall"]));
    let mut direct = redis.raw();
    assert_eq!(
        text(&call(&mut direct, &["GET", "mon:key"])),
        "through-stormwall"
    );
    // stormwall's own readiness probe PINGs Redis now and then, and in shared mode each new
    // client is preceded by a RESET and a PING on a spare (does Redis admit it without a
    // password?); MONITOR shows those too.
    let mut next_line = || loop {
        let line = text(&m.read_frame());
        if !line.contains(r#""PING""#) && !line.contains(r#""RESET""#) {
            return line;
        }
    };
    let first = next_line();
    assert!(
        first.contains(r#""SET" "mon:key" "through-stormwall""#),
        "MONITOR line: {first}"
    );
    let second = next_line();
    assert!(
        second.contains(r#""GET" "mon:key""#),
        "MONITOR line: {second}"
    );
}

#[test]
fn client_reply_off_skip_on_like_redis() {
    // A short reply timeout: had stormwall kept waiting for the suppressed replies, it
    // would declare Redis unresponsive and close the connection during the pause below.
    let twin = Twin::start_with(&[], SHORT_REPLY_TIMEOUT);
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["CLIENT", "REPLY", "OFF"],
            &["SET", "a", "1"],
            &["GET", "a"],
            &["CLIENT", "REPLY", "ON"],
            &["GET", "a"],
            &["CLIENT", "REPLY", "SKIP"],
            &["SET", "b", "2"],
            &["GET", "b"],
        ]),
        3,
    );
    assert_ok(&r[0]);
    assert_eq!(text(&r[1]), "1");
    assert_eq!(text(&r[2]), "2");
    thread::sleep(Duration::from_millis(600));
    // Nothing else was owed: the next reply is the next command's.
    let r = exchange(&mut d, &mut p, &cmd(&["ECHO", "last"]), 1);
    assert_eq!(text(&r[0]), "last");
}

// ---------------------------------------------------------------------------------------------
// QUIT, RESET
// ---------------------------------------------------------------------------------------------

#[test]
fn quit_replies_ok_then_closes() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    // Commands after QUIT in the same write are never executed.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["PING"], &["QUIT"], &["SET", "after-quit", "1"]]),
        2,
    );
    assert_eq!(text(&r[0]), "PONG");
    assert_ok(&r[1]);
    // Then the connection closes, with nothing more sent.
    assert_eq!(d.try_read_frame(), None, "Redis sent more after QUIT");
    assert_eq!(p.try_read_frame(), None, "stormwall sent more after QUIT");
    assert_eq!(
        call(&mut twin.behind.raw(), &["EXISTS", "after-quit"]),
        Frame::Number {
            data: 0,
            attributes: None
        }
    );
}

#[test]
fn reset_leaves_multi_and_keeps_working() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["SELECT", "2"],
            &["CLIENT", "SETNAME", "before-reset"],
            &["MULTI"],
            &["SET", "k", "queued"],
            &["RESET"],
            &["GET", "k"],
            &["EXEC"],
            &["CLIENT", "GETNAME"],
            &["SET", "k", "db0"],
            &["PING"],
        ]),
        10,
    );
    assert_eq!(text(&r[3]), "QUEUED");
    assert_eq!(text(&r[4]), "RESET");
    assert_eq!(r[5], Frame::Null, "the queued SET must not have run");
    assert!(text(&r[6]).contains("EXEC without MULTI"), "{:?}", r[6]);
    assert_eq!(r[7], Frame::Null, "RESET clears the name");
    assert_eq!(text(&r[9]), "PONG");
    // RESET also returned the connection to db 0.
    assert_eq!(text(&call(&mut twin.behind.raw(), &["GET", "k"])), "db0");
    // RESET after HELLO 3 goes back to RESP2, and the connection keeps working.
    hello(&mut d, &mut p, &["HELLO", "3"]);
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[
            &["HSET", "h", "f", "v"],
            &["RESET"],
            &["HGETALL", "h"],
            &["MULTI"],
            &["INCR", "n"],
            &["EXEC"],
        ]),
        6,
    );
    assert_eq!(text(&r[1]), "RESET");
    assert!(matches!(r[2], Frame::Array { .. }), "{:?}", r[2]);
    assert_eq!(strings(&r[5]), ["1"]);
    // RESET inside MULTI left the transaction for stormwall too.
    let r = exchange(
        &mut d,
        &mut p,
        &cmds(&[&["MULTI"], &["RESET"], &["PING"]]),
        3,
    );
    assert_eq!(text(&r[1]), "RESET");
    assert_eq!(text(&r[2]), "PONG");
    assert_subscribe_works(&twin, &mut d, &mut p);
}

// ---------------------------------------------------------------------------------------------
// Payloads and request forms
// ---------------------------------------------------------------------------------------------

#[test]
fn large_value_30mb_round_trip() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    // Pseudo-random bytes (every byte value, CR/LF/NUL included) with a prime period, so
    // lost, duplicated or reordered chunks cannot line up by accident.
    let period: Vec<u8> = (0..65_521u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let len = 30 * 1024 * 1024;
    let value: Vec<u8> = period.iter().copied().cycle().take(len).collect();
    let mut p = sw.raw();
    p.cmd(&[b"SET".as_slice(), b"big", &value]);
    assert_ok(&p.read_frame());
    p.cmd(&[b"GET".as_slice(), b"big"]);
    let got = p.read_frame();
    assert!(
        bulk(&got) == value.as_slice(),
        "30 MB value came back altered"
    );
    // Stored intact in Redis, and the connection still works after it.
    let mut direct = redis.raw();
    direct.cmd(&[b"GET".as_slice(), b"big"]);
    assert!(bulk(&direct.read_frame()) == value.as_slice());
    assert_eq!(text(&call(&mut p, &["STRLEN", "big"])), "31457280");
}

#[test]
fn binary_keys_and_values() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let k1: &[u8] = b"bin\r\nkey\0\xff";
    let v1: &[u8] = b"\r\n\0*1\r\n$4\r\nPING\r\n\xfe\x00";
    let k2: &[u8] = b"\0";
    let v2: &[u8] = b"";
    let input: Vec<u8> = [
        encode_cmd(&[b"SET", k1, v1]),
        encode_cmd(&[b"GET", k1]),
        encode_cmd(&[b"MSET", k2, v2, b"\r\n", b"\n\r"]),
        encode_cmd(&[b"MGET", k1, k2, b"\r\n", b"absent\0"]),
        encode_cmd(&[b"APPEND", k1, b"\0\r\n"]),
        encode_cmd(&[b"GETRANGE", k1, b"-4", b"-1"]),
        encode_cmd(&[b"HSET", b"h\0", b"f\r\n", v1]),
        encode_cmd(&[b"HGET", b"h\0", b"f\r\n"]),
        encode_cmd(&[b"STRLEN", k1]),
    ]
    .concat();
    let r = exchange(&mut d, &mut p, &input, 9);
    assert_eq!(bulk(&r[1]), v1);
    assert_eq!(bulk(&r[5]), b"\x00\0\r\n");
    assert_eq!(bulk(&r[7]), v1);
    // Stored byte for byte in Redis.
    let mut direct = twin.behind.raw();
    direct.cmd(&[b"GET", k1]);
    assert_eq!(bulk(&direct.read_frame()), [v1, b"\0\r\n"].concat());
}

#[test]
fn inline_commands_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let input: &[u8] = b"PING\r\n\
        SET k \"a b\"\r\n\
        GET k\r\n\
        ECHO 'it\\'s'\r\n\
        \r\n   \r\n\
        SET k2 \"\\x41\\r\\n\\t\"\r\n\
        GET k2\n\
        *2\r\n$3\r\nGET\r\n$1\r\nk\r\n\
        exists   k\tk2 missing\r\n\
        NOSUCHCOMMAND arg\r\n\
        get\r\n";
    let r = exchange(&mut d, &mut p, input, 10);
    assert_eq!(text(&r[0]), "PONG");
    assert_eq!(text(&r[2]), "a b");
    assert_eq!(text(&r[3]), "it's");
    assert_eq!(bulk(&r[5]), b"A\r\n\t");
    assert_eq!(text(&r[6]), "a b");
    assert_eq!(text(&r[7]), "2");
    assert!(text(&r[8]).starts_with("ERR unknown command"), "{:?}", r[8]);
    assert!(text(&r[9]).starts_with("ERR wrong number"), "{:?}", r[9]);
}

#[test]
fn inline_unbalanced_quotes_like_redis() {
    let twin = Twin::start();
    let (mut d, mut p) = twin.conns();
    let r = exchange(&mut d, &mut p, b"PING\r\nSET k \"oops\r\nPING\r\n", 2);
    assert_eq!(text(&r[0]), "PONG");
    assert!(text(&r[1]).contains("unbalanced quotes"), "{:?}", r[1]);
    assert!(d.closed(), "Redis keeps the connection open");
    assert!(p.closed(), "stormwall keeps the connection open");
}

#[test]
fn resp3_every_reply_type_like_redis() {
    let twin = Twin::start_with(&["--enable-debug-command", "yes"], "");
    let (mut d, mut p) = twin.conns();
    let types = [
        "string", "integer", "double", "bignum", "null", "array", "set", "map", "attrib", "push",
        "verbatim", "true", "false",
    ];
    let input: Vec<u8> = types
        .iter()
        .flat_map(|t| cmd(&["DEBUG", "PROTOCOL", t]))
        .chain(cmd(&["PING"]))
        .collect();
    // RESP2: every type degrades to a RESP2 reply (push is an error).
    let r = exchange(&mut d, &mut p, &input, types.len() + 1);
    assert_eq!(text(&r[types.len()]), "PONG");
    // RESP3: `push` sends a push frame then a real reply, so one frame more.
    hello(&mut d, &mut p, &["HELLO", "3"]);
    let r = exchange(&mut d, &mut p, &input, types.len() + 2);
    assert_eq!(r.iter().filter(|f| is_push(f)).count(), 1, "{r:?}");
    assert_eq!(text(&r[types.len() + 1]), "PONG");
    assert!(matches!(r[3], Frame::BigNumber { .. }), "{:?}", r[3]);
    assert!(matches!(r[9], Frame::Push { .. }), "{:?}", r[9]);
}

// ---------------------------------------------------------------------------------------------
// redis-cli
// ---------------------------------------------------------------------------------------------

/// Runs `redis-cli -p port args…` with `stdin`, returning (exit code, stdout, stderr).
fn redis_cli(port: u16, args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run redis-cli");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    let out = child.wait_with_output().expect("redis-cli failed");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn redis_cli_same_output() {
    let twin = Twin::start();
    let runs: &[(&[&str], &[u8])] = &[
        (&["SET", "k", "hello world"], b""),
        (&["GET", "k"], b""),
        (&["--no-raw", "GET", "k"], b""),
        (&["HSET", "h", "a", "1", "b", "2"], b""),
        (&["--no-raw", "HGETALL", "h"], b""),
        (&["-3", "--no-raw", "HGETALL", "h"], b""),
        (&["-3", "HELLO", "3"], b""),
        (&["-n", "3", "SET", "db3", "x"], b""),
        (&["-n", "3", "--no-raw", "GET", "db3"], b""),
        (&["--no-raw", "GET", "db3"], b""),
        (&["--no-raw", "INCRBY", "n", "41"], b""),
        (&["NOSUCHCOMMAND"], b""),
        (&["--no-raw", "NOSUCHCOMMAND"], b""),
        (
            &["--no-raw"],
            b"SET a 1\nINCR a\nLPUSH l x y z\nLRANGE l 0 -1\nGET missing\nMULTI\nINCR a\nEXEC\n",
        ),
    ];
    for (args, stdin) in runs {
        let direct = redis_cli(twin.direct.port, args, stdin);
        let proxied = redis_cli(twin.sw.port, args, stdin);
        if args.contains(&"HELLO") {
            // The connection id differs; everything else must match.
            let strip = |s: &str| {
                s.lines()
                    .filter(|l| !l.starts_with("id "))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(&direct.1), strip(&proxied.1), "redis-cli {args:?}");
            assert_eq!((direct.0, &direct.2), (proxied.0, &proxied.2));
            continue;
        }
        assert_eq!(direct, proxied, "redis-cli {args:?} (left: direct)");
    }
}

#[test]
fn redis_cli_pipe_mode_same_output() {
    let twin = Twin::start();
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend(cmd(&["SET", &format!("pipe:{i}"), &format!("{i}")]));
        input.extend(cmd(&["INCR", "pipe:count"]));
    }
    input.extend(cmd(&["NOSUCHCOMMAND"]));
    let direct = redis_cli(twin.direct.port, &["--pipe"], &input);
    let proxied = redis_cli(twin.sw.port, &["--pipe"], &input);
    assert_eq!(direct, proxied, "redis-cli --pipe (left: direct)");
    assert!(
        proxied.1.contains("errors: 1, replies: 2001"),
        "{proxied:?}"
    );
    assert_eq!(
        text(&call(&mut twin.behind.raw(), &["GET", "pipe:count"])),
        "1000"
    );
}
