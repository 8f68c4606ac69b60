//! Issue 9, shared upstream connections: many clients share a few Redis connections, a client
//! moves to a private one only when its commands need a connection of their own, and a Redis
//! restart looks to clients like a failure of Redis itself (or, for an idle shared client,
//! like nothing at all).
//!
//! What this file proves, against a real `redis-server` and real clients:
//!
//! - **Pinning.** Every kind of command that needs a connection of its own (blocking commands,
//!   `MULTI`/`WATCH`, the `SUBSCRIBE` family in RESP2 and RESP3, `CLIENT ID/LIST/KILL`,
//!   `MONITOR`, `READONLY`, `DEBUG`, `RESET`, unknown commands, …) behaves exactly as on a
//!   direct connection while another client keeps the shared connection busy — and that
//!   client never waits behind it. The state held for a shared client (user, database,
//!   protocol, name) is the state its private connection has after the pin.
//! - **Order.** 100 clients pipelining at once each get their own replies, in their order.
//! - **Identity.** A refused password changes nothing; ACL users, databases and protocol
//!   versions never mix on one connection; Redis's own refusals come back unchanged.
//! - **Scale.** 1,000 clients reach Redis over `shared_connections + spare_connections`
//!   connections, plus one per pinned client, as Redis itself counts them.
//! - **Redis restarts.** An idle shared client keeps its connection and gets correct answers;
//!   a command in flight ends in a closed connection, never an error reply; a BRPOP worker
//!   (the Celery broker pattern) loses no job it acknowledged; a client connecting during the
//!   outage is served later or closed, never sent an error reply.
//!
//! Most tests name `mode = "shared"` themselves. Their behavioural assertions hold in both
//! modes (a client cannot tell); the few that only shared mode can meet (connection counts,
//! pin metrics, an idle client surviving a restart) say so where they are made. The order test
//! takes the mode from `STORMWALL_TEST_UPSTREAM_MODE`, like the rest of the suite; the tests
//! of a command in flight when Redis dies and of a client connecting while it is down run
//! both modes themselves.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    Frame, Raw, Redis, Rng, Stormwall, array, as_int, blob, encode_cmd, error_text, eventually,
    is_error, metric, number, read_transcript, scrape, shown, text,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Upstream TOML for shared mode with one shared connection per identity, so every shared
/// client of an identity is on the *same* Redis connection.
fn shared(extra: &str) -> String {
    format!("mode = \"shared\"\nshared_connections = 1\n{extra}")
}

/// The pin counter and connection gauge named in issue 9 (one place to rename them).
const PINS: &str = "stormwall_pins_total";
const UPSTREAM_CONNECTIONS: &str = "stormwall_upstream_connections";

fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    encode_cmd(&args)
}

fn call(c: &mut Raw, args: &[&str]) -> Frame {
    c.send(&cmd(args));
    c.read_frame()
}

fn ok(f: &Frame) {
    assert_eq!(txt(f), "OK", "expected +OK, got {f:?}");
}

/// A reply's text: like [`text`], and also a RESP3 verbatim string's (`CLIENT INFO`, `INFO`
/// and `CLIENT LIST` send those to RESP3 clients).
fn txt(f: &Frame) -> String {
    match f {
        Frame::VerbatimString { data, .. } => String::from_utf8_lossy(data).into_owned(),
        other => text(other),
    }
}

fn nil() -> Frame {
    Frame::Null
}

/// The texts of an array's or push frame's elements.
fn strings(f: &Frame) -> Vec<String> {
    match f {
        Frame::Array { data, .. } | Frame::Push { data, .. } => data.iter().map(text).collect(),
        other => panic!("expected an array or push frame, got {other:?}"),
    }
}

/// A numeric field of Redis's `INFO` (e.g. `connected_clients`).
fn info_field(direct: &mut Raw, field: &str) -> i64 {
    let info = text(&call(direct, &["INFO", "clients"]));
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO clients:\n{info}"))
}

/// Waits until Redis shows `n` blocked clients: proof that a blocking command really waits
/// in Redis, not in stormwall.
fn wait_blocked(redis: &Redis, n: i64) {
    let mut direct = redis.raw();
    eventually(
        &format!("{n} blocked clients in Redis"),
        Duration::from_secs(10),
        || info_field(&mut direct, "blocked_clients") == n,
    );
}

/// A client that keeps the shared connection busy: it pipelines `INCR` on its own key, 16 at
/// a time, and checks every reply counts up by one, until [`finish`](Busy::finish). Pin tests
/// run one beside the pinned client and require it to [`advance`](Busy::advance) while the
/// pinned client waits in Redis: a command wrongly left on the shared connection (a blocked
/// `BLPOP`, an open `MULTI`, a subscription) would stall it or garble its replies.
struct Busy {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Busy {
    /// Starts it and waits for its first replies (so it is on the shared connection before
    /// anything else happens).
    fn start(sw: &Stormwall, key: &str) -> Busy {
        Busy::start_after(sw, key, &[])
    }

    /// Like [`start`](Busy::start), after `setup` commands (e.g. an `AUTH`), each answered `+OK`.
    fn start_after(sw: &Stormwall, key: &str, setup: &[&[&str]]) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut c = sw.raw();
        for args in setup {
            ok(&call(&mut c, args));
        }
        let key = key.to_string();
        let thread = {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                let batch: Vec<u8> = (0..16).flat_map(|_| cmd(&["INCR", &key])).collect();
                let mut next = 1;
                while !stop.load(Ordering::Relaxed) {
                    c.send(&batch);
                    for _ in 0..16 {
                        let f = c.read_frame();
                        assert_eq!(f, number(next), "busy client: INCR {key} out of step");
                        next += 1;
                    }
                    done.store(next as u64 - 1, Ordering::Relaxed);
                }
            })
        };
        let busy = Busy {
            stop,
            done,
            thread: Some(thread),
        };
        busy.advance(16, "its first replies");
        busy
    }

    /// Waits until it has completed `n` more commands; fails if it stalls or broke.
    fn advance(&self, n: u64, during: &str) {
        let target = self.done.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.done.load(Ordering::Relaxed) < target {
            let broke = self.thread.as_ref().is_some_and(|t| t.is_finished());
            assert!(
                !broke,
                "the busy shared client stopped (a wrong reply?) during {during}"
            );
            assert!(
                Instant::now() < deadline,
                "the busy shared client stalled during {during}: the shared connection is \
                 stuck behind another client's command"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops it; fails if any of its replies was wrong.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.thread.take().unwrap().join() {
            std::panic::resume_unwind(e);
        }
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Polls `check` every 50 ms until it returns `Ok`, failing after `within` with its last
/// complaint.
fn poll(what: &str, within: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Sum of the pin counter over all reasons, and the reasons that counted at least one pin.
fn pins(sw: &Stormwall) -> (f64, BTreeSet<String>) {
    let s = scrape(sw);
    let reasons = s
        .samples
        .iter()
        .filter(|x| x.metric == PINS)
        .filter(|x| !matches!(x.value, prometheus_parse::Value::Counter(v) if v == 0.0))
        .filter_map(|x| x.labels.get("reason").map(str::to_string))
        .collect();
    (common::value(&s, PINS, &[]), reasons)
}

/// Shared mode only: the pin counter (summed over reasons) reaches `n`, one per pinned
/// client. Checked only when stormwall exports the counter at all (a stormwall that never
/// pinned, or renamed it, is caught by
/// `metrics_count_connections_by_mode_and_pins_by_reason_as_redis_sees_them`), so the
/// behavioural tests do not hang on a metric's name.
fn assert_pins(sw: &Stormwall, n: f64) {
    let exported = |sw: &Stormwall| {
        common::admin_get(sw, "/metrics")
            .1
            .lines()
            .any(|l| l.starts_with(PINS))
    };
    if !exported(sw) {
        return;
    }
    poll(
        &format!("{PINS} to sum to {n} (shared mode: one per pinned client)"),
        Duration::from_secs(5),
        || match pins(sw) {
            (total, _) if total == n => Ok(()),
            (total, reasons) => Err(format!("it sums to {total}, reasons {reasons:?}")),
        },
    );
}

/// Joins a thread, re-raising its panic (with its message) in the test.
fn join<T>(h: JoinHandle<T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Sends a signal to a process.
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("cannot run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Unread bytes in the receive queues of established TCP sockets whose local port is
/// `port` (from `/proc/net/tcp`): what has reached a stopped Redis but not been read by it.
fn unread_bytes_at(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .collect()
}

/// Reads what is left on a connection until it closes (10 s at most), asserting it closes
/// and that nothing at all arrives: in particular no `-ERR` in place of a lost command.
fn assert_closed_without_reply(c: &mut Raw, who: &str) {
    let t = read_transcript(&mut c.stream, Duration::from_secs(10));
    assert!(
        !t.bytes.starts_with(b"-"),
        "{who}: got an error reply instead of a closed connection: {}",
        shown(&t.bytes)
    );
    assert!(
        t.bytes.is_empty(),
        "{who}: unexpected bytes: {}",
        shown(&t.bytes)
    );
    assert!(t.closed, "{who}: connection not closed within 10 s");
}

/// A `redis` crate error is a connection failure (what a client library retries), not a
/// reply from the server.
fn is_connection_error(e: &redis::RedisError) -> bool {
    (e.is_io_error() || e.is_connection_dropped()) && !e.is_timeout()
}

// ---------------------------------------------------------------------------------------------
// 1. Each pin reason, with another client busy on the same shared connection
// ---------------------------------------------------------------------------------------------

/// Why: a `BLPOP` left on a shared connection would block every client behind it, and the
/// `LPUSH` meant to wake it could never be written. The blocked client must get the value;
/// the pusher and the busy client must keep going meanwhile.
#[test]
fn blpop_waits_on_its_own_connection_while_another_client_pushes() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:blpop");
    let mut a = sw.raw();
    let mut pusher = sw.raw();
    assert_eq!(call(&mut a, &["GET", "x"]), nil());
    assert_eq!(call(&mut pusher, &["GET", "x"]), nil());

    a.send(&cmd(&["BLPOP", "q", "0"]));
    wait_blocked(&redis, 1);
    busy.advance(200, "a BLPOP waiting in Redis");
    // The pusher is on the shared connection, not stuck behind the BLPOP.
    ok(&call(&mut pusher, &["SET", "x", "1"]));
    assert_eq!(call(&mut pusher, &["LPUSH", "q", "v1"]), number(1));
    assert_eq!(a.read_frame(), array(&[blob(b"q"), blob(b"v1")]));
    // The pinned client keeps working, on its private connection.
    assert_eq!(call(&mut a, &["GET", "x"]), blob(b"1"));
    assert_eq!(call(&mut a, &["LLEN", "q"]), number(0));
    busy.advance(50, "after the BLPOP");
    busy.finish();
    assert_pins(&sw, 1.0);
}

/// Why: every blocking command, not just `BLPOP`, must wait in Redis on a connection of its
/// own (`BRPOP`, `BRPOPLPUSH`, `BLMOVE`, `BLMPOP`, `BZPOPMIN`, `XREAD BLOCK`,
/// `XREADGROUP BLOCK`, `WAIT`). All wait at once while another client keeps the shared
/// connection busy, then each is woken by a write from a shared client and gets exactly the
/// reply Redis gives.
#[test]
fn every_blocking_command_waits_on_its_own_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:blocking");
    let mut waker = sw.raw();
    ok(&call(
        &mut waker,
        &["XGROUP", "CREATE", "s2", "g", "$", "MKSTREAM"],
    ));
    let entry = |stream: &[u8]| {
        array(&[array(&[
            blob(stream),
            array(&[array(&[blob(b"1-1"), array(&[blob(b"f"), blob(b"v")])])]),
        ])])
    };
    // (blocking command, the write that wakes it, what the blocked client then receives)
    let cases: Vec<(&[&str], &[&str], Frame)> = vec![
        (
            &["BRPOP", "l1", "0"],
            &["LPUSH", "l1", "a"],
            array(&[blob(b"l1"), blob(b"a")]),
        ),
        (
            &["BRPOPLPUSH", "l2", "l2dst", "0"],
            &["LPUSH", "l2", "b"],
            blob(b"b"),
        ),
        (
            &["BLMOVE", "l3", "l3dst", "LEFT", "RIGHT", "0"],
            &["LPUSH", "l3", "c"],
            blob(b"c"),
        ),
        (
            &["BLMPOP", "0", "1", "l4", "LEFT"],
            &["LPUSH", "l4", "d"],
            array(&[blob(b"l4"), array(&[blob(b"d")])]),
        ),
        (
            &["BZPOPMIN", "z1", "0"],
            &["ZADD", "z1", "1", "m"],
            array(&[blob(b"z1"), blob(b"m"), blob(b"1")]),
        ),
        (
            &["XREAD", "BLOCK", "0", "STREAMS", "s1", "$"],
            &["XADD", "s1", "1-1", "f", "v"],
            entry(b"s1"),
        ),
        (
            &[
                "XREADGROUP",
                "GROUP",
                "g",
                "c1",
                "BLOCK",
                "0",
                "STREAMS",
                "s2",
                ">",
            ],
            &["XADD", "s2", "1-1", "f", "v"],
            entry(b"s2"),
        ),
    ];
    let mut clients: Vec<Raw> = cases.iter().map(|_| sw.raw()).collect();
    for (c, (blocking, _, _)) in clients.iter_mut().zip(&cases) {
        assert_eq!(call(c, &["GET", "x"]), nil(), "before {blocking:?}");
        c.send(&cmd(blocking));
    }
    wait_blocked(&redis, cases.len() as i64);
    busy.advance(200, "seven blocking commands waiting in Redis");
    for (c, (blocking, wake, reply)) in clients.iter_mut().zip(&cases) {
        let woke = call(&mut waker, wake);
        assert!(!is_error(&woke), "{wake:?}: {woke:?}");
        assert_eq!(&c.read_frame(), reply, "reply to {blocking:?}");
        assert_eq!(txt(&call(c, &["PING"])), "PONG", "after {blocking:?}");
    }

    // WAIT for a replica that does not exist waits until unblocked; Redis's own
    // CLIENT UNBLOCK ends it as a timeout (0 replicas).
    let mut w = sw.raw();
    assert_eq!(call(&mut w, &["GET", "x"]), nil());
    w.send(&cmd(&["WAIT", "1", "0"]));
    wait_blocked(&redis, 1);
    busy.advance(200, "a WAIT waiting in Redis");
    let mut direct = redis.raw();
    let list = text(&call(&mut direct, &["CLIENT", "LIST"]));
    let id = list
        .lines()
        .find(|l| l.contains(" cmd=wait "))
        .and_then(|l| l.strip_prefix("id="))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no connection in WAIT in CLIENT LIST:\n{list}"))
        .to_string();
    assert_eq!(call(&mut direct, &["CLIENT", "UNBLOCK", &id]), number(1));
    assert_eq!(w.read_frame(), number(0));
    busy.finish();
    assert_pins(&sw, cases.len() as f64 + 1.0);
}

/// Why: `MULTI` on a shared connection would queue other clients' commands into the
/// transaction (they would get `+QUEUED`), and `WATCH` would watch on behalf of everyone.
/// Each client must see exactly what it would see on its own connection to Redis.
#[test]
fn multi_and_watch_are_private_to_their_client() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:multi");
    let mut tx = sw.raw();
    let mut other = sw.raw();
    assert_eq!(call(&mut tx, &["GET", "t"]), nil());

    // A transaction open in one client; another writes meanwhile and gets real replies.
    ok(&call(&mut tx, &["MULTI"]));
    assert_eq!(txt(&call(&mut tx, &["SET", "t", "1"])), "QUEUED");
    ok(&call(&mut other, &["SET", "t", "2"]));
    assert_eq!(call(&mut other, &["GET", "t"]), blob(b"2"));
    busy.advance(200, "an open MULTI");
    assert_eq!(txt(&call(&mut tx, &["INCR", "t"])), "QUEUED");
    assert_eq!(
        call(&mut tx, &["EXEC"]),
        array(&[
            Frame::SimpleString {
                data: b"OK".to_vec(),
                attributes: None
            },
            number(2)
        ])
    );
    assert_eq!(call(&mut redis.raw(), &["GET", "t"]), blob(b"2"));

    // WATCH, then another client modifies the key: EXEC returns nil, nothing applied.
    let mut watcher = sw.raw();
    ok(&call(&mut watcher, &["SET", "w", "1"]));
    ok(&call(&mut watcher, &["WATCH", "w"]));
    ok(&call(&mut other, &["SET", "w", "2"]));
    busy.advance(100, "a WATCH");
    ok(&call(&mut watcher, &["MULTI"]));
    assert_eq!(txt(&call(&mut watcher, &["SET", "w", "3"])), "QUEUED");
    assert_eq!(
        call(&mut watcher, &["EXEC"]),
        nil(),
        "EXEC after a conflict"
    );
    assert_eq!(call(&mut redis.raw(), &["GET", "w"]), blob(b"2"));

    // The same client's next WATCH without a conflict commits, while others write other keys.
    ok(&call(&mut watcher, &["WATCH", "w"]));
    ok(&call(&mut other, &["SET", "unrelated", "x"]));
    ok(&call(&mut watcher, &["MULTI"]));
    assert_eq!(txt(&call(&mut watcher, &["SET", "w", "4"])), "QUEUED");
    assert_eq!(
        strings(&call(&mut watcher, &["EXEC"])),
        ["OK"],
        "EXEC without a conflict"
    );
    assert_eq!(call(&mut other, &["GET", "w"]), blob(b"4"));
    busy.finish();
    assert_pins(&sw, 2.0);
}

/// Why: a subscribed connection receives messages nobody asked for; on a shared connection
/// they would be taken for other clients' replies. RESP2 (`SUBSCRIBE`, `PSUBSCRIBE`,
/// `SSUBSCRIBE`): messages arrive, the publisher and the busy client are unaffected.
#[test]
fn subscribe_family_resp2_gets_messages_published_by_a_shared_client() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:sub2");
    let mut sub = sw.raw();
    let mut publisher = sw.raw();
    assert_eq!(call(&mut sub, &["GET", "x"]), nil());

    assert_eq!(
        strings(&call(&mut sub, &["SUBSCRIBE", "ch"])),
        ["subscribe", "ch", "1"]
    );
    assert_eq!(
        strings(&call(&mut sub, &["PSUBSCRIBE", "p:*"])),
        ["psubscribe", "p:*", "2"]
    );
    assert_eq!(
        strings(&call(&mut sub, &["SSUBSCRIBE", "sch"])),
        ["ssubscribe", "sch", "1"]
    );
    busy.advance(200, "a subscribed client");
    assert_eq!(call(&mut publisher, &["PUBLISH", "ch", "m1"]), number(1));
    assert_eq!(strings(&sub.read_frame()), ["message", "ch", "m1"]);
    assert_eq!(call(&mut publisher, &["PUBLISH", "p:1", "m2"]), number(1));
    assert_eq!(strings(&sub.read_frame()), ["pmessage", "p:*", "p:1", "m2"]);
    assert_eq!(call(&mut publisher, &["SPUBLISH", "sch", "m3"]), number(1));
    assert_eq!(strings(&sub.read_frame()), ["smessage", "sch", "m3"]);
    // RESP2 PING in subscribed mode, answered by Redis in its pub/sub form.
    assert_eq!(strings(&call(&mut sub, &["PING"])), ["pong", ""]);
    // The publisher is an ordinary client on the shared connection.
    assert_eq!(call(&mut publisher, &["GET", "x"]), nil());
    busy.finish();
    assert_pins(&sw, 1.0);
}

/// Why: in RESP3 a subscribed client gets messages as push frames and may still run ordinary
/// commands. The protocol a shared client chose with `HELLO 3` (held by stormwall) must be
/// the protocol of its private connection after the pin; another RESP3 client that stays
/// shared keeps getting RESP3 replies.
#[test]
fn subscribe_resp3_gets_push_frames_and_replies_on_its_own_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:sub3");
    let mut sub = sw.raw();
    let mut publisher = sw.raw();
    let mut resp3 = sw.raw();
    for c in [&mut sub, &mut resp3] {
        let hello = call(c, &["HELLO", "3"]);
        assert!(matches!(hello, Frame::Map { .. }), "HELLO 3: {hello:?}");
        assert_eq!(call(c, &["GET", "x"]), nil());
    }

    let r = call(&mut sub, &["SUBSCRIBE", "ch3"]);
    assert!(matches!(r, Frame::Push { .. }), "SUBSCRIBE in RESP3: {r:?}");
    assert_eq!(strings(&r), ["subscribe", "ch3", "1"]);
    ok(&call(&mut publisher, &["SET", "x", "1"]));
    assert_eq!(call(&mut publisher, &["PUBLISH", "ch3", "hi"]), number(1));
    let m = sub.read_frame();
    assert!(matches!(m, Frame::Push { .. }), "message in RESP3: {m:?}");
    assert_eq!(strings(&m), ["message", "ch3", "hi"]);
    // An ordinary command from the subscribed RESP3 client: a reply, not a push.
    assert_eq!(call(&mut sub, &["GET", "x"]), blob(b"1"));
    busy.advance(200, "a RESP3 subscriber");
    // The other RESP3 client, still shared, still speaks RESP3.
    assert_eq!(call(&mut resp3, &["HSET", "h", "a", "1"]), number(1));
    let map = call(&mut resp3, &["HGETALL", "h"]);
    assert!(
        matches!(map, Frame::Map { .. }),
        "HGETALL in RESP3: {map:?}"
    );
    assert_eq!(
        call(&mut publisher, &["PUBLISH", "ch3", "again"]),
        number(1)
    );
    assert_eq!(strings(&sub.read_frame()), ["message", "ch3", "again"]);
    busy.finish();
    assert_pins(&sw, 1.0);
}

/// Why: `CLIENT ID`, `CLIENT LIST`, `CLIENT INFO` and `CLIENT KILL` are about *the* client's
/// connection: each pinned client has its own id for life, Redis lists it, and killing a
/// pinned client's connection from another client closes that client.
#[test]
fn client_id_list_kill_address_each_clients_own_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:client");
    let mut a = sw.raw();
    let mut victim = sw.raw();
    for c in [&mut a, &mut victim] {
        assert_eq!(call(c, &["GET", "x"]), nil());
    }
    let id_a = as_int(&call(&mut a, &["CLIENT", "ID"]));
    let id_v = as_int(&call(&mut victim, &["CLIENT", "ID"]));
    assert_ne!(id_a, id_v, "two clients got the same CLIENT ID");

    let direct_list = text(&call(&mut redis.raw(), &["CLIENT", "LIST"]));
    let listed = |list: &str, id: i64| list.lines().any(|l| l.starts_with(&format!("id={id} ")));
    assert!(
        listed(&direct_list, id_a) && listed(&direct_list, id_v),
        "{direct_list}"
    );
    let list = text(&call(&mut a, &["CLIENT", "LIST"]));
    assert!(listed(&list, id_a) && listed(&list, id_v), "{list}");
    let info = text(&call(&mut a, &["CLIENT", "INFO"]));
    assert!(
        info.starts_with(&format!("id={id_a} ")),
        "CLIENT INFO: {info}"
    );
    busy.advance(100, "CLIENT commands");

    assert_eq!(
        call(&mut a, &["CLIENT", "KILL", "ID", &id_v.to_string()]),
        number(1)
    );
    assert_closed_without_reply(&mut victim, "the client whose connection was killed");
    // The killer keeps its own connection and id.
    assert_eq!(call(&mut a, &["CLIENT", "ID"]), number(id_a));
    busy.advance(100, "a CLIENT KILL");
    busy.finish();
    assert_pins(&sw, 2.0);
}

/// Why: `MONITOR` turns a connection into a stream of every command Redis runs; it must be
/// the monitoring client's own, and it must show another client's command.
#[test]
fn monitor_sees_a_shared_clients_command() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:monitor");
    let mut m = sw.raw();
    let mut other = sw.raw();
    assert_eq!(call(&mut m, &["GET", "x"]), nil());
    ok(&call(&mut m, &["MONITOR"]));
    busy.advance(100, "MONITOR");
    ok(&call(&mut other, &["SET", "mon:key", "through-stormwall"]));
    let wanted = r#""SET" "mon:key" "through-stormwall""#;
    let mut seen = Vec::new();
    loop {
        let line = txt(&m.read_frame());
        if line.contains(wanted) {
            break;
        }
        seen.push(line);
        assert!(
            seen.len() < 1_000_000,
            "MONITOR never showed {wanted}; last: {:?}",
            seen.last()
        );
    }
    busy.finish();
    assert_pins(&sw, 1.0);
}

/// Why: state a shared client established (user via `AUTH`, database via `SELECT`, name via
/// `CLIENT SETNAME`, protocol via `HELLO 3`) is held by stormwall, not by any Redis
/// connection; when the client pins, its private connection must be put in exactly that
/// state before the pinning command runs. Each trigger below pins (`READONLY`, `DEBUG`,
/// unknown commands, `CLIENT GETNAME`/`TRACKING`/`REPLY`/`NO-EVICT`, `WAIT`, `WAITAOF`,
/// short blocking reads, `RESET`); each reply, and everything after it, must equal what a
/// direct connection in the same state gets.
#[test]
fn a_pin_replays_user_database_name_and_protocol() {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let mut admin = redis.raw();
    ok(&call(
        &mut admin,
        &["ACL", "SETUSER", "alice", "on", ">pa", "~*", "&*", "+@all"],
    ));
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:replay");
    let triggers: &[&[&str]] = &[
        &["READONLY"],
        &["DEBUG", "SLEEP", "0"],
        &["NOSUCHCOMMAND", "arg"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "TRACKING", "ON"],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "NO-EVICT", "ON"],
        &["WAIT", "0", "0"],
        &["WAITAOF", "0", "0", "0"],
        &["XREAD", "BLOCK", "1", "STREAMS", "nostream", "$"],
        &["BLPOP", "empty", "0.01"],
        &["RESET"],
    ];
    for (i, trigger) in triggers.iter().enumerate() {
        let (name, key, hash) = (format!("pin{i}"), format!("k{i}"), format!("h{i}"));
        let mut c = sw.raw();
        let mut d = redis.raw();
        for conn in [&mut c, &mut d] {
            ok(&call(conn, &["AUTH", "alice", "pa"]));
            ok(&call(conn, &["CLIENT", "SETNAME", &name]));
            ok(&call(conn, &["SELECT", "3"]));
            let hello = call(conn, &["HELLO", "3"]);
            assert!(matches!(hello, Frame::Map { .. }), "HELLO 3: {hello:?}");
        }
        ok(&call(&mut c, &["SET", &key, "v"]));
        assert_eq!(call(&mut c, &["HSET", &hash, "f", "1"]), number(1));

        let through = call(&mut c, trigger);
        let direct = call(&mut d, trigger);
        assert_eq!(
            through, direct,
            "reply to {trigger:?} (left: through stormwall)"
        );
        let after: &[&[&str]] = &[
            &["CLIENT", "GETNAME"],
            &["GET", &key],
            &["ACL", "WHOAMI"],
            &["HGETALL", &hash],
        ];
        let replies: Vec<Frame> = after.iter().map(|a| call(&mut c, a)).collect();
        for (a, r) in after.iter().zip(&replies) {
            assert_eq!(
                r,
                &call(&mut d, a),
                "{a:?} after {trigger:?} (left: stormwall)"
            );
        }
        if trigger[0] != "RESET" {
            // Spelled out: the state before the pin is the state after it.
            assert_eq!(txt(&replies[0]), name, "name after {trigger:?}");
            assert_eq!(replies[1], blob(b"v"), "db 3 after {trigger:?}");
            assert_eq!(txt(&replies[2]), "alice", "user after {trigger:?}");
            assert!(
                matches!(replies[3], Frame::Map { .. }),
                "RESP3 after {trigger:?}"
            );
            let info = txt(&call(&mut c, &["CLIENT", "INFO"]));
            for field in [
                format!("name={name} "),
                "db=3 ".into(),
                "user=alice ".into(),
            ] {
                assert!(
                    info.contains(&field),
                    "CLIENT INFO after {trigger:?}: {info}"
                );
            }
        } else {
            // RESET: back to the default user, db 0, RESP2, no name, as Redis does it.
            assert_eq!(replies[0], nil());
            assert_eq!(txt(&replies[2]), "default");
        }
    }
    busy.advance(100, "the pins");
    busy.finish();
    // The busy client ran in db 0 as the default user throughout.
    assert_eq!(call(&mut admin, &["EXISTS", "k0"]), number(0));
    assert_pins(&sw, triggers.len() as f64);
}

// ---------------------------------------------------------------------------------------------
// 2. Per-client order under heavy interleaving (both modes: the mode comes from the env)
// ---------------------------------------------------------------------------------------------

/// What one client of the order test saw.
struct Seen {
    /// Replies to its `INCR shared`, in the order received.
    shared: Vec<i64>,
    /// Its database (the final check looks there).
    db: usize,
    /// Its last own-counter value.
    counter: i64,
}

/// One client of the order test: pipelines of varying depth of `INCR ctr:<id>`,
/// `INCR shared`, `SET val:<id> <id>:<seq>`, `GET val:<id>`, checking every reply as it comes.
/// Some clients speak RESP3, some use another database, so several identities interleave.
fn order_client(port: u16, id: usize, start: &Barrier) -> Seen {
    let mut c = Raw::connect(port);
    let db = if id % 7 == 3 { 1 + id % 4 } else { 0 };
    if db != 0 {
        ok(&call(&mut c, &["SELECT", &db.to_string()]));
    }
    if id % 5 == 1 {
        assert!(matches!(call(&mut c, &["HELLO", "3"]), Frame::Map { .. }));
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1));
    let (ctr, val) = (format!("ctr:{id}"), format!("val:{id}"));
    let mut counter = 0i64;
    let mut shared = Vec::new();
    let mut seq = 0u64;
    start.wait();
    for _round in 0..20 {
        let depth = 1 + rng.below(16);
        let mut out = Vec::new();
        let first = seq;
        for _ in 0..depth {
            let v = format!("{id}:{seq}");
            out.extend(cmd(&["INCR", &ctr]));
            out.extend(cmd(&["INCR", "shared"]));
            out.extend(cmd(&["SET", &val, &v]));
            out.extend(cmd(&["GET", &val]));
            seq += 1;
        }
        c.send(&out);
        for s in first..seq {
            let expect = format!("{id}:{s}");
            let r = c.read_frame();
            counter += 1;
            assert_eq!(r, number(counter), "client {id}: own counter out of order");
            let r = c.read_frame();
            let v = as_int(&r);
            assert!(
                shared.last().is_none_or(|&last| v > last),
                "client {id}: INCR shared went from {:?} to {v}",
                shared.last()
            );
            shared.push(v);
            ok(&c.read_frame());
            let r = c.read_frame();
            assert_eq!(
                txt(&r),
                expect,
                "client {id}: GET returned another value (another client's reply?)"
            );
        }
    }
    Seen {
        shared,
        db,
        counter,
    }
}

/// Why: with shared connections, replies from one Redis connection are handed back to many
/// clients; one reply to the wrong client, or one out of order, breaks an application
/// silently. 100 clients pipeline at once; each checks its own counter counts up by one,
/// that each GET returns the value it just set (which embeds its own id and sequence), and
/// that its replies to the global `INCR` increase. At the end the global replies are exactly
/// 1..=N, each once.
#[test]
fn one_hundred_pipelining_clients_each_get_their_own_replies_in_order() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let start = Arc::new(Barrier::new(100));
    let clients: Vec<_> = (0..100)
        .map(|id| {
            let (port, start) = (sw.port, start.clone());
            thread::spawn(move || order_client(port, id, &start))
        })
        .collect();
    let seen: Vec<Seen> = clients.into_iter().map(join).collect();

    // Each database has its own `shared` key; per database, the replies to its INCRs are
    // exactly 1..=N, each once.
    let mut by_db: std::collections::BTreeMap<usize, Vec<i64>> = Default::default();
    for s in &seen {
        by_db.entry(s.db).or_default().extend(&s.shared);
    }
    let mut direct = redis.raw();
    for (db, all) in &mut by_db {
        all.sort_unstable();
        let n = all.len() as i64;
        assert!(
            all.iter().copied().eq(1..=n),
            "db {db}: the replies to INCR shared are not exactly 1..={n}, each once"
        );
        ok(&call(&mut direct, &["SELECT", &db.to_string()]));
        assert_eq!(
            call(&mut direct, &["GET", "shared"]),
            blob(n.to_string().as_bytes())
        );
    }
    for (id, s) in seen.iter().enumerate() {
        ok(&call(&mut direct, &["SELECT", &s.db.to_string()]));
        assert_eq!(
            call(&mut direct, &["GET", &format!("ctr:{id}")]),
            blob(s.counter.to_string().as_bytes()),
            "client {id}'s counter in db {}",
            s.db
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Identity: passwords, ACL users, databases
// ---------------------------------------------------------------------------------------------

/// Why: stormwall must never move a client to an identity Redis has not accepted for it. A
/// refused `AUTH`/`HELLO … AUTH` leaves the client exactly as it was — unauthenticated ones
/// keep getting `NOAUTH`, authenticated ones keep their user — while authenticated clients
/// share a connection beside it. Every reply equals a direct connection's; none of this pins.
#[test]
fn a_refused_password_never_gets_a_shared_identity() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start_after(&sw, "busy:auth", &[&["AUTH", "s3cret"]]);
    let mut good = sw.raw();
    ok(&call(&mut good, &["AUTH", "s3cret"]));
    ok(&call(&mut good, &["SET", "k", "v"]));

    // An unauthenticated client, through stormwall and directly, step by step.
    let mut bad = sw.raw();
    let mut direct = redis.raw();
    let steps: &[&[&str]] = &[
        &["GET", "k"],
        &["AUTH", "wrong"],
        &["GET", "k"],
        &["AUTH", "default", "wrong"],
        &["GET", "k"],
        &["HELLO", "3", "AUTH", "default", "wrong"],
        &["GET", "k"],
        &["AUTH", "nobody", "s3cret"],
        &["HGETALL", "k"],
    ];
    for step in steps {
        let (p, d) = (call(&mut bad, step), call(&mut direct, step));
        assert_eq!(p, d, "{step:?} (left: through stormwall)");
        assert!(
            is_error(&p),
            "{step:?} succeeded without a valid password: {p:?}"
        );
        if step[0] == "GET" {
            assert!(error_text(&p).starts_with("NOAUTH"), "{p:?}");
        }
        // Interleaved with an authenticated client on the shared connection.
        assert_eq!(call(&mut good, &["GET", "k"]), blob(b"v"));
    }
    // A pipeline of the same: still refused, still in order.
    let pipeline: Vec<u8> = steps.iter().flat_map(|s| cmd(s)).collect();
    bad.send(&pipeline);
    direct.send(&pipeline);
    for step in steps {
        assert_eq!(bad.read_frame(), direct.read_frame(), "pipelined {step:?}");
    }
    busy.advance(100, "refused passwords");

    // A failed AUTH after a good one keeps the earlier identity, as in Redis.
    let mut direct_good = redis.raw();
    ok(&call(&mut direct_good, &["AUTH", "s3cret"]));
    for step in [&["AUTH", "wrong"][..], &["GET", "k"], &["ACL", "WHOAMI"]] {
        assert_eq!(
            call(&mut good, step),
            call(&mut direct_good, step),
            "{step:?}"
        );
    }
    assert_eq!(call(&mut good, &["GET", "k"]), blob(b"v"));

    // The right password, when Redis accepts it, is the identity from then on.
    ok(&call(&mut bad, &["AUTH", "s3cret"]));
    assert_eq!(call(&mut bad, &["GET", "k"]), blob(b"v"));
    busy.finish();
    assert_pins(&sw, 0.0);
}

/// Why: two ACL users on one connection would run one user's commands with the other's
/// rights. Many interleaved clients of two users (some switching user half-way) must each
/// see their own user in `ACL WHOAMI` on every round; a user limited to `~app:*` must be
/// refused on other keys with Redis's own `NOPERM` text, exactly as on a direct connection.
#[test]
fn acl_users_never_share_a_connection() {
    let redis = Redis::start();
    let mut admin = redis.raw();
    for (user, pass, keys) in [
        ("alice", ">pa", "~*"),
        ("bob", ">pb", "~*"),
        ("app", ">papp", "~app:*"),
    ] {
        ok(&call(
            &mut admin,
            &["ACL", "SETUSER", user, "on", pass, keys, "&*", "+@all"],
        ));
    }
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:acl");
    let users = [("alice", "pa"), ("bob", "pb")];
    let start = Arc::new(Barrier::new(40));
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let (port, start) = (sw.port, start.clone());
            thread::spawn(move || {
                let mut c = Raw::connect(port);
                let mut me = users[i % 2];
                ok(&call(&mut c, &["AUTH", me.0, me.1]));
                start.wait();
                for n in 0..50 {
                    if n == 25 && i % 4 == 0 {
                        // Switch user half-way: from Redis's +OK on, the other user.
                        me = users[(i + 1) % 2];
                        ok(&call(&mut c, &["AUTH", me.0, me.1]));
                    }
                    let key = format!("u:{i}");
                    let value = format!("{}:{n}", me.0);
                    c.send(&cmd(&["ACL", "WHOAMI"]));
                    c.send(&cmd(&["SET", &key, &value]));
                    c.send(&cmd(&["GET", &key]));
                    assert_eq!(txt(&c.read_frame()), me.0, "client {i} round {n}: WHOAMI");
                    ok(&c.read_frame());
                    assert_eq!(txt(&c.read_frame()), value, "client {i} round {n}: GET");
                }
            })
        })
        .collect();

    // Meanwhile the limited user, through stormwall and directly.
    let mut p = sw.raw();
    let mut d = redis.raw();
    for conn in [&mut p, &mut d] {
        ok(&call(conn, &["AUTH", "app", "papp"]));
    }
    let steps: &[&[&str]] = &[
        &["GET", "other:key"],
        &["SET", "other:key", "x"],
        &["SET", "app:1", "v"],
        &["GET", "app:1"],
        &["MGET", "app:1", "other:key"],
        &["ACL", "WHOAMI"],
    ];
    for step in steps {
        let (a, b) = (call(&mut p, step), call(&mut d, step));
        assert_eq!(a, b, "app user's {step:?} (left: through stormwall)");
        if step.contains(&"other:key") {
            assert!(error_text(&a).starts_with("NOPERM"), "{step:?}: {a:?}");
        }
    }
    for c in clients {
        join(c);
    }
    busy.finish();
    assert_eq!(call(&mut admin, &["EXISTS", "other:key"]), number(0));
    assert_pins(&sw, 0.0);
}

/// Why: the selected database is per client. 20 clients each in their own database and 10
/// in database 0 write and read the same key name concurrently; each sees only its own
/// database. A refused `SELECT` (out of range) leaves the client where it was, as in Redis.
#[test]
fn each_client_keeps_its_own_database() {
    let redis = Redis::start_with(&["--databases", "32"]);
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:select");
    let start = Arc::new(Barrier::new(30));
    let clients: Vec<_> = (0..30)
        .map(|i| {
            let (port, start) = (sw.port, start.clone());
            thread::spawn(move || {
                let mut c = Raw::connect(port);
                let db = if i < 20 { i + 1 } else { 0 };
                if db != 0 {
                    ok(&call(&mut c, &["SELECT", &db.to_string()]));
                }
                start.wait();
                for n in 0..50 {
                    if n == 25 && db != 0 {
                        let r = call(&mut c, &["SELECT", "99"]);
                        assert_eq!(error_text(&r), "ERR DB index is out of range");
                    }
                    if db == 0 {
                        let key = format!("k0:{i}");
                        ok(&call(&mut c, &["SET", &key, &n.to_string()]));
                        assert_eq!(call(&mut c, &["GET", &key]), blob(n.to_string().as_bytes()));
                        // No other client's database leaks into db 0.
                        assert_eq!(call(&mut c, &["GET", "k"]), nil(), "db 0 client {i}");
                    } else {
                        let v = format!("db{db}:{n}");
                        ok(&call(&mut c, &["SET", "k", &v]));
                        assert_eq!(txt(&call(&mut c, &["GET", "k"])), v, "client in db {db}");
                    }
                }
            })
        })
        .collect();
    for c in clients {
        join(c);
    }
    busy.finish();
    let mut direct = redis.raw();
    for db in 1..=20 {
        ok(&call(&mut direct, &["SELECT", &db.to_string()]));
        assert_eq!(txt(&call(&mut direct, &["GET", "k"])), format!("db{db}:49"));
    }
    ok(&call(&mut direct, &["SELECT", "0"]));
    assert_eq!(call(&mut direct, &["EXISTS", "k"]), number(0));
    assert_pins(&sw, 0.0);
}

// ---------------------------------------------------------------------------------------------
// 4. 1,000 clients over a handful of Redis connections
// ---------------------------------------------------------------------------------------------

/// Raises the soft open-files limit towards the hard one (children inherit it) and says
/// whether `needed` descriptors are available.
fn enough_open_files(needed: u64) -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err("getrlimit(RLIMIT_NOFILE) failed".into());
        }
        if lim.rlim_cur < needed && lim.rlim_max > lim.rlim_cur {
            lim.rlim_cur = lim.rlim_max.min(needed.max(4096));
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    if lim.rlim_cur < needed {
        return Err(format!(
            "ulimit -n is {} (hard {}), the test needs {needed}",
            lim.rlim_cur, lim.rlim_max
        ));
    }
    Ok(())
}

/// Redis's own count of stormwall's connections: `connected_clients` minus the test's one
/// direct connection (the one asking) and stormwall's readiness probe. The probe
/// (`src/upstream/probe.rs`) keeps one connection open for its `PING`s and opens a short
/// extra one for its authentication check only on a later probe round (every 10 s of
/// probing); the tests that count set `admin.probe_interval = "1h"`, so after the first round
/// at startup (which needs no extra connection) exactly one probe connection exists.
fn stormwall_connections(direct: &mut Raw) -> i64 {
    const DIRECT: i64 = 1;
    const PROBE: i64 = 1;
    info_field(direct, "connected_clients") - DIRECT - PROBE
}

/// Why: the point of shared mode — Redis sees a handful of connections however many clients
/// stormwall serves (a fleet of sidecars must not exhaust `maxclients`). 1,000 clients
/// authenticate, name themselves, set library info, `SELECT 0`, some say `HELLO`/`HELLO 2`
/// (as client libraries do at connect; none of these pins) and `GET`; 100 of them are
/// `redis` crate connections with a password in the URL. Redis must then count at most
/// `shared_connections + spare_connections` connections from stormwall. When 10 clients pin
/// (`CLIENT ID`), the count may grow by exactly those 10 private connections; when they
/// leave, it falls back. (Shared mode only: in dedicated mode Redis counts one per client.)
#[test]
fn a_thousand_clients_reach_redis_over_a_handful_of_connections() {
    const CLIENTS: usize = 1000;
    const LIBRARY_CLIENTS: usize = 100;
    const PINNED: usize = 10;
    const SHARED: i64 = 2;
    const SPARE: i64 = 2;
    // The test's sockets plus stormwall's (one per client, plus upstream) and Redis's.
    if let Err(why) = enough_open_files(2 * CLIENTS as u64 + 500) {
        eprintln!("SKIPPED a_thousand_clients_reach_redis_over_a_handful_of_connections: {why}");
        return;
    }
    let redis = Redis::start_with(&["--requirepass", "pw"]);
    let sw = Stormwall::start(
        &redis.addr(),
        &format!(
            "mode = \"shared\"\nshared_connections = {SHARED}\nspare_connections = {SPARE}\n\
             [admin]\nprobe_interval = \"1h\"\n"
        ),
    );
    let mut direct = redis.raw();
    ok(&call(&mut direct, &["AUTH", "pw"]));
    ok(&call(&mut direct, &["SET", "k", "v"]));

    // CLIENT SETINFO exists from Redis 7.2 on; before that Redis refuses it. Either way the
    // client gets Redis's own reply.
    let setinfo = ["CLIENT", "SETINFO", "LIB-NAME", "shared-test"];
    let setinfo_reply = call(&mut direct, &setinfo);

    let mut raws: Vec<Raw> = Vec::new();
    for i in 0..CLIENTS - LIBRARY_CLIENTS {
        let mut c = sw.raw();
        let mut handshake = vec![
            cmd(&["AUTH", "pw"]),
            cmd(&["CLIENT", "SETNAME", &format!("c{i}")]),
            cmd(&setinfo),
            cmd(&["SELECT", "0"]),
        ];
        match i % 10 {
            0 => handshake.push(cmd(&["HELLO"])),
            1 => handshake.push(cmd(&["HELLO", "2"])),
            _ => {}
        }
        handshake.push(cmd(&["GET", "k"]));
        c.send(&handshake.concat());
        raws.push(c);
    }
    for (i, c) in raws.iter_mut().enumerate() {
        ok(&c.read_frame());
        ok(&c.read_frame());
        assert_eq!(c.read_frame(), setinfo_reply, "client {i}'s CLIENT SETINFO");
        ok(&c.read_frame());
        if i % 10 < 2 {
            let hello = c.read_frame();
            assert!(matches!(hello, Frame::Array { .. }), "HELLO: {hello:?}");
        }
        assert_eq!(c.read_frame(), blob(b"v"), "client {i}'s GET");
    }
    let mut libs: Vec<redis::Connection> = (0..LIBRARY_CLIENTS)
        .map(|_| {
            let url = format!("redis://:pw@127.0.0.1:{}/", sw.port);
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_connection_with_timeout(Duration::from_secs(10))
                .expect("redis crate client cannot connect");
            let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
            assert_eq!(v, "v");
            c
        })
        .collect();

    let bound = SHARED + SPARE;
    let upstream = stormwall_connections(&mut direct);
    let list = || {
        let mut c = redis.raw();
        ok(&call(&mut c, &["AUTH", "pw"]));
        txt(&call(&mut c, &["CLIENT", "LIST"]))
    };
    assert!(
        upstream <= bound,
        "{CLIENTS} clients reach Redis over {upstream} connections; shared mode allows \
         shared_connections + spare_connections = {bound}. CLIENT LIST (first lines):\n{}",
        list().lines().take(12).collect::<Vec<_>>().join("\n")
    );
    assert!(upstream >= 1, "no connection from stormwall at all?");

    // 10 clients pin: each gets a private connection of its own.
    let mut ids = HashSet::new();
    for c in raws.iter_mut().take(PINNED) {
        ids.insert(as_int(&call(c, &["CLIENT", "ID"])));
    }
    assert_eq!(ids.len(), PINNED, "pinned clients share a connection");
    let after = stormwall_connections(&mut direct);
    assert!(
        after <= bound + PINNED as i64 && after > PINNED as i64,
        "after {PINNED} pins Redis counts {after} connections from stormwall; expected more \
         than {PINNED} and at most {bound} + {PINNED}"
    );
    // Everyone still works, pinned or not.
    for c in raws.iter_mut().step_by(50) {
        assert_eq!(call(c, &["GET", "k"]), blob(b"v"));
    }
    for c in libs.iter_mut().step_by(10) {
        let v: String = redis::cmd("GET").arg("k").query(c).unwrap();
        assert_eq!(v, "v");
    }
    // The pinned clients leave: their private connections close.
    raws.drain(..PINNED);
    eventually(
        "the pinned clients' private connections to close",
        Duration::from_secs(10),
        || stormwall_connections(&mut direct) <= bound,
    );
}

// ---------------------------------------------------------------------------------------------
// 5. HELLO
// ---------------------------------------------------------------------------------------------

/// A `HELLO` reply without its `id` (which names a connection, so differs between a direct
/// connection and stormwall's); asserts the id is there and numeric.
fn without_id(f: Frame) -> Frame {
    let is_id = |k: &Frame| txt(k) == "id";
    match f {
        Frame::Map { data, attributes } => {
            let id = data.iter().find(|(k, _)| is_id(k)).map(|(_, v)| v.clone());
            assert!(matches!(id, Some(Frame::Number { .. })), "HELLO id: {id:?}");
            Frame::Map {
                data: data.into_iter().filter(|(k, _)| !is_id(k)).collect(),
                attributes,
            }
        }
        Frame::Array { data, attributes } => {
            let pairs: Vec<Frame> = data
                .chunks(2)
                .filter(|kv| !is_id(&kv[0]))
                .flatten()
                .cloned()
                .collect();
            assert_eq!(pairs.len() + 2, data.len(), "HELLO 2 reply has no id field");
            Frame::Array {
                data: pairs,
                attributes,
            }
        }
        other => panic!("HELLO did not reply with a map or an array: {other:?}"),
    }
}

/// Why: a shared client's protocol version is held by stormwall, so stormwall answers
/// `HELLO` — and must answer it with Redis's own reply for that version (every field but the
/// connection id equal to a direct connection's), switch the client's replies to RESP3 (maps,
/// sets, doubles, nulls) and back with `HELLO 2`, and leave the protocol unchanged when Redis
/// refuses a `HELLO … AUTH`. A RESP2 client sharing the connection is never switched.
#[test]
fn hello_answers_as_redis_and_switches_only_this_client() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:hello");
    let mut p = sw.raw();
    let mut d = redis.raw();
    let mut resp2 = sw.raw();
    assert_eq!(call(&mut resp2, &["HSET", "h", "a", "1"]), number(1));
    let both = |p: &mut Raw, d: &mut Raw, args: &[&str]| (call(p, args), call(d, args));

    let (a, b) = both(&mut p, &mut d, &["HELLO", "3"]);
    assert!(matches!(a, Frame::Map { .. }), "HELLO 3: {a:?}");
    assert_eq!(
        without_id(a),
        without_id(b),
        "HELLO 3 (left: through stormwall)"
    );
    for args in [
        &["HGETALL", "h"][..],
        &["GET", "missing"],
        &["SMEMBERS", "h2"],
    ] {
        let (a, b) = both(&mut p, &mut d, args);
        assert_eq!(a, b, "{args:?} in RESP3");
    }
    let map = call(&mut p, &["HGETALL", "h"]);
    assert!(
        matches!(map, Frame::Map { .. }),
        "HGETALL after HELLO 3: {map:?}"
    );
    // The RESP2 client on the same shared connection still gets RESP2.
    let arr = call(&mut resp2, &["HGETALL", "h"]);
    assert_eq!(
        arr,
        array(&[blob(b"a"), blob(b"1")]),
        "RESP2 client's HGETALL"
    );
    busy.advance(100, "HELLO 3");

    // HELLO with no version, and with SETNAME: Redis's reply, in the current protocol.
    let (a, b) = both(&mut p, &mut d, &["HELLO"]);
    assert_eq!(
        without_id(a),
        without_id(b),
        "HELLO (left: through stormwall)"
    );
    let (a, b) = both(&mut p, &mut d, &["HELLO", "3", "SETNAME", "named-by-hello"]);
    assert_eq!(without_id(a), without_id(b), "HELLO 3 SETNAME");

    // A refused HELLO … AUTH changes nothing: still RESP3.
    let (a, b) = both(&mut p, &mut d, &["HELLO", "2", "AUTH", "nobody", "wrong"]);
    assert_eq!(a, b, "refused HELLO 2 AUTH (left: through stormwall)");
    assert!(error_text(&a).starts_with("WRONGPASS"), "{a:?}");
    let map = call(&mut p, &["HGETALL", "h"]);
    assert!(matches!(map, Frame::Map { .. }), "still RESP3: {map:?}");

    // Back to RESP2.
    let (a, b) = both(&mut p, &mut d, &["HELLO", "2"]);
    assert!(matches!(a, Frame::Array { .. }), "HELLO 2: {a:?}");
    assert_eq!(
        without_id(a),
        without_id(b),
        "HELLO 2 (left: through stormwall)"
    );
    assert_eq!(
        call(&mut p, &["HGETALL", "h"]),
        arr,
        "HGETALL after HELLO 2"
    );
    // A refused HELLO 3 … AUTH leaves it in RESP2; an unsupported version is Redis's error.
    for args in [
        &["HELLO", "3", "AUTH", "nobody", "wrong"][..],
        &["HGETALL", "h"],
        &["HELLO", "4"],
        &["HGETALL", "h"],
    ] {
        let (a, b) = both(&mut p, &mut d, args);
        assert_eq!(a, b, "{args:?} (left: through stormwall)");
    }
    assert_eq!(call(&mut p, &["HGETALL", "h"]), arr);
    // The name HELLO set is the client's (CLIENT GETNAME pins and replays it).
    assert_eq!(
        call(&mut p, &["CLIENT", "GETNAME"]),
        blob(b"named-by-hello")
    );
    // Once the client has a connection of its own, HELLO's id is that connection's id, as
    // `CLIENT ID` says (libraries use it for `CLIENT TRACKING … REDIRECT`, `CLIENT KILL ID`).
    let id = as_int(&call(&mut p, &["CLIENT", "ID"]));
    let hello = call(&mut p, &["HELLO", "3"]);
    let Frame::Map { data, .. } = &hello else {
        panic!("HELLO 3: {hello:?}")
    };
    assert_eq!(
        data.get(&blob(b"id")),
        Some(&number(id)),
        "HELLO 3 id vs CLIENT ID"
    );
    busy.finish();
    assert_pins(&sw, 1.0);
}

/// Why: with a password, `HELLO 3 AUTH` authenticates and switches protocol in one step —
/// only if Redis accepts the password; a refused one leaves the client unauthenticated and in
/// RESP2, exactly as a direct connection.
#[test]
fn hello_with_auth_switches_only_when_redis_accepts() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let mut p = sw.raw();
    let mut d = redis.raw();
    let steps: &[&[&str]] = &[
        &["HELLO", "3"],
        &["HELLO", "3", "AUTH", "default", "wrong"],
        &["GET", "k"],
        &["HGETALL", "h"],
    ];
    for args in steps {
        let (a, b) = (call(&mut p, args), call(&mut d, args));
        assert_eq!(a, b, "{args:?} (left: through stormwall)");
        assert!(is_error(&a), "{args:?} without a valid password: {a:?}");
    }
    let a = call(&mut p, &["HELLO", "3", "AUTH", "default", "s3cret"]);
    let b = call(&mut d, &["HELLO", "3", "AUTH", "default", "s3cret"]);
    assert!(matches!(a, Frame::Map { .. }), "{a:?}");
    assert_eq!(without_id(a), without_id(b));
    assert_eq!(call(&mut p, &["HSET", "h", "f", "1"]), number(1));
    for args in [&["HGETALL", "h"][..], &["GET", "k"], &["ACL", "WHOAMI"]] {
        let (a, b) = (call(&mut p, args), call(&mut d, args));
        assert_eq!(a, b, "{args:?} (left: through stormwall)");
    }
    assert!(matches!(call(&mut p, &["HGETALL", "h"]), Frame::Map { .. }));
    assert_pins(&sw, 0.0);
}

// ---------------------------------------------------------------------------------------------
// 6. Redis restarts (SIGKILL, restart on the same port, data from the AOF)
// ---------------------------------------------------------------------------------------------

/// A Redis with an append-only file synced on every write, in a directory of its own (kept
/// alive with the server), so a SIGKILLed Redis restarts with every acknowledged write.
fn aof_redis() -> (Redis, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_str().expect("utf-8 temp dir").to_string();
    let redis = Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &path,
    ]);
    (redis, dir)
}

/// A `redis` crate connection whose reads give up after 30 s (a hang fails the test).
fn lib_client(sw: &Stormwall) -> redis::Connection {
    let c = sw.client();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

/// Why: the Celery incident of issue 9. A shared client with nothing in flight must not
/// notice a Redis restart at all: plain `redis` crate connections opened before the restart
/// (no reconnect logic) send commands during the outage and after it, and get the right
/// answers from the restarted Redis with no error of any kind — including the state stormwall
/// holds for them (database, name). (Shared mode only: in dedicated mode these connections
/// are closed when Redis dies.)
#[test]
fn idle_shared_clients_do_not_notice_a_redis_restart() {
    let (mut redis, _dir) = aof_redis();
    let sw = Stormwall::start(&redis.addr(), &shared("outage_wait = \"10s\"\n"));
    let mut during = lib_client(&sw);
    let mut after = lib_client(&sw);
    let mut in_db2 = lib_client(&sw);
    let _: () = redis::cmd("SET")
        .arg("a")
        .arg("1")
        .query(&mut during)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("b")
        .arg("2")
        .query(&mut after)
        .unwrap();
    let _: () = redis::cmd("SELECT").arg(2).query(&mut in_db2).unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("idle-two")
        .query(&mut in_db2)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("c")
        .arg("3")
        .query(&mut in_db2)
        .unwrap();

    redis.kill();
    // A command sent while Redis is down waits (up to outage_wait) and then succeeds.
    let waiting = thread::spawn(move || {
        let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("a").query(&mut during);
        (r, during)
    });
    thread::sleep(Duration::from_millis(300));
    redis.restart();
    let (r, mut during) = join(waiting);
    assert_eq!(
        r.map_err(|e| format!("{e} (kind {:?})", e.kind())),
        Ok(Some("1".to_string())),
        "GET sent during the outage"
    );
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("b").query(&mut after);
    assert_eq!(
        r.ok().flatten().as_deref(),
        Some("2"),
        "GET sent after the restart"
    );
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("c").query(&mut in_db2);
    assert_eq!(
        r.ok().flatten().as_deref(),
        Some("3"),
        "GET in db 2 after the restart"
    );
    let name: redis::RedisResult<Option<String>> =
        redis::cmd("CLIENT").arg("GETNAME").query(&mut in_db2);
    assert_eq!(name.ok().flatten().as_deref(), Some("idle-two"));
    // They go on working.
    let n: redis::RedisResult<i64> = redis::cmd("INCR").arg("n").query(&mut during);
    assert_eq!(n.ok(), Some(1));
}

/// Why: a command whose fate is unknown must end as it would with Redis itself — a closed
/// connection, which client libraries treat as retryable — never an error reply, which they
/// take for the command's answer. A shared client's `GET` that reached Redis (proved by the
/// bytes waiting in Redis's socket while it is stopped) when Redis is SIGKILLed, a pinned
/// client blocked in `BLPOP`, and an idle pinned client (its private connection's state is
/// gone) are all closed with no bytes at all. An idle shared client survives in shared mode
/// and is closed in dedicated mode. Both modes.
#[test]
fn a_command_in_flight_when_redis_dies_ends_in_a_closed_connection() {
    for mode in ["dedicated", "shared"] {
        let mut redis = Redis::start();
        let sw = Stormwall::start(
            &redis.addr(),
            &format!("mode = \"{mode}\"\nshared_connections = 1\n"),
        );
        let mut in_flight = sw.raw();
        let mut blocked = sw.raw();
        let mut pinned_idle = sw.raw();
        let mut shared_idle = sw.raw();
        assert_eq!(txt(&call(&mut in_flight, &["PING"])), "PONG");
        assert_eq!(txt(&call(&mut shared_idle, &["PING"])), "PONG");
        as_int(&call(&mut pinned_idle, &["CLIENT", "ID"]));
        blocked.send(&cmd(&["BLPOP", "q", "0"]));
        wait_blocked(&redis, 1);

        signal(redis.pid(), "STOP");
        let key = "in-flight-".repeat(20);
        let get = cmd(&["GET", &key]);
        in_flight.send(&get);
        eventually(
            "the GET to wait, unread, in the stopped Redis's socket",
            Duration::from_secs(10),
            || {
                unread_bytes_at(redis.port)
                    .iter()
                    .any(|&n| n >= get.len() as u64)
            },
        );
        redis.kill(); // SIGKILL works on a stopped process

        assert_closed_without_reply(&mut in_flight, &format!("{mode}: GET in flight"));
        assert_closed_without_reply(&mut blocked, &format!("{mode}: BLPOP in flight"));
        assert_closed_without_reply(&mut pinned_idle, &format!("{mode}: idle pinned client"));
        redis.restart();
        if mode == "shared" {
            // Nothing was in flight: the shared client keeps its connection.
            assert_eq!(
                shared_idle.try_read_frame_now(),
                None,
                "shared: unexpected bytes to an idle client"
            );
            shared_idle.send(&cmd(&["PING"]));
            assert_eq!(
                shared_idle.try_read_frame().map(|f| txt(&f)).as_deref(),
                Some("PONG"),
                "shared: the idle shared client lost its connection across the restart"
            );
        } else {
            assert_closed_without_reply(&mut shared_idle, "dedicated: idle client");
        }
        // New clients are served.
        assert_eq!(txt(&call(&mut sw.raw(), &["PING"])), "PONG", "{mode}");
    }
}

/// What a client of the worker test saw that it must never see.
#[derive(Default)]
struct Faults {
    /// Error replies (a client library would take them for the answer).
    error_replies: Vec<String>,
}

/// Runs `f` on a connection, reconnecting (every 20 ms, for up to 30 s) after connection
/// errors, as a client library with retries does. Error replies are recorded and returned as
/// `None`; connection errors are counted in `conn_errors`.
fn with_retries<T>(
    sw_port: u16,
    conn: &mut Option<redis::Connection>,
    conn_errors: &mut u64,
    faults: &Mutex<Faults>,
    mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no working connection for 30 s");
        if conn.is_none() {
            let url = format!("redis://127.0.0.1:{sw_port}/");
            match redis::Client::open(url)
                .unwrap()
                .get_connection_with_timeout(Duration::from_secs(5))
            {
                Ok(c) => {
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    *conn = Some(c);
                }
                Err(e) if is_connection_error(&e) => {
                    *conn_errors += 1;
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => {
                    faults
                        .lock()
                        .unwrap()
                        .error_replies
                        .push(format!("connect: {e}"));
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        match f(conn.as_mut().unwrap()) {
            Ok(v) => return Some(v),
            Err(e) if is_connection_error(&e) => {
                *conn_errors += 1;
                *conn = None;
            }
            Err(e) => {
                faults.lock().unwrap().error_replies.push(e.to_string());
                return None;
            }
        }
    }
}

/// Why: the Celery pattern that issue 9 saw lose 1,603 of 2,000 results. A producer
/// `LPUSH`es 2,000 jobs; a worker `BRPOP`s them (pinned) and acknowledges each with
/// `SADD done <job>` on a second connection; both retry on connection errors only. Redis is
/// SIGKILLed once mid-way and restarted from its AOF (`appendfsync always`). Nothing may
/// surface as an error reply, every job the worker saw acknowledged is in `done`, and a job
/// the producer saw acknowledged is lost only if it was popped by a `BRPOP` whose reply the
/// worker never received (at most one per broken `BRPOP` connection).
#[test]
fn brpop_worker_loses_no_acknowledged_job_across_a_redis_restart() {
    const JOBS: usize = 2000;
    let (mut redis, _dir) = aof_redis();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let port = sw.port;
    let faults = Arc::new(Mutex::new(Faults::default()));
    let produced = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicU64::new(0));

    let producer = {
        let (faults, produced) = (faults.clone(), produced.clone());
        thread::spawn(move || {
            let (mut conn, mut errors) = (None, 0);
            let mut pushed = Vec::new();
            for job in 0..JOBS {
                let name = format!("job{job}");
                let r = with_retries(port, &mut conn, &mut errors, &faults, |c| {
                    redis::cmd("LPUSH").arg("jobs").arg(&name).query::<i64>(c)
                });
                if r.is_some() {
                    pushed.push(name);
                }
                if job % 100 == 99 {
                    thread::sleep(Duration::from_millis(10));
                }
            }
            produced.store(true, Ordering::Relaxed);
            pushed
        })
    };
    let worker = {
        let (faults, stop, acked_count) = (faults.clone(), stop.clone(), acked_count.clone());
        thread::spawn(move || {
            let (mut pop_conn, mut ack_conn) = (None, None);
            let (mut pop_errors, mut ack_errors) = (0u64, 0u64);
            let mut acked = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let popped = with_retries(port, &mut pop_conn, &mut pop_errors, &faults, |c| {
                    redis::cmd("BRPOP")
                        .arg("jobs")
                        .arg(0.2)
                        .query::<Option<(String, String)>>(c)
                });
                let Some(Some((_, job))) = popped else {
                    continue;
                };
                let added = with_retries(port, &mut ack_conn, &mut ack_errors, &faults, |c| {
                    redis::cmd("SADD").arg("done").arg(&job).query::<i64>(c)
                });
                if added.is_some() {
                    acked.push(job);
                    acked_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            (acked, pop_errors)
        })
    };

    eventually(
        "the worker to acknowledge 600 jobs",
        Duration::from_secs(30),
        || acked_count.load(Ordering::Relaxed) >= 600,
    );
    redis.kill();
    thread::sleep(Duration::from_millis(300));
    redis.restart();
    let mut direct = redis.raw();
    eventually(
        "all jobs pushed and the queue drained",
        Duration::from_secs(40),
        || produced.load(Ordering::Relaxed) && as_int(&call(&mut direct, &["LLEN", "jobs"])) == 0,
    );
    stop.store(true, Ordering::Relaxed);
    let pushed = join(producer);
    let (acked, pop_errors) = join(worker);

    let faults = faults.lock().unwrap();
    assert!(
        faults.error_replies.is_empty(),
        "clients got error replies (a library takes them for answers): {:?}",
        faults.error_replies
    );
    let done: HashSet<String> = match call(&mut direct, &["SMEMBERS", "done"]) {
        Frame::Array { data, .. } => data.iter().map(txt).collect(),
        other => panic!("SMEMBERS: {other:?}"),
    };
    let missing: Vec<&String> = acked.iter().filter(|j| !done.contains(*j)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged jobs are not in `done` after the restart: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        pop_errors >= 1,
        "the worker's BRPOP connection never broke: was Redis really restarted?"
    );
    let lost: Vec<&String> = pushed.iter().filter(|j| !done.contains(*j)).collect();
    assert!(
        lost.len() as u64 <= pop_errors,
        "{} pushed jobs neither done nor queued, but only {pop_errors} BRPOPs broke: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert_eq!(
        pushed.len(),
        JOBS,
        "LPUSHes acknowledged (each retried until it was)"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Connecting while Redis is down
// ---------------------------------------------------------------------------------------------

/// What a client that connected while Redis was down and sent `PING` got: `Ok(true)` for
/// `+PONG`, `Ok(false)` for a connection closed without a reply; `Err` for anything else
/// (an error reply above all).
fn outcome_of_ping(c: &mut Raw) -> Result<bool, String> {
    c.stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    match c.try_read_frame() {
        Some(f) if txt(&f) == "PONG" && !is_error(&f) => Ok(true),
        None => Ok(false),
        Some(f) => Err(format!(
            "got {f:?}; expected +PONG or a closed connection without a reply"
        )),
    }
}

/// Why: a client connecting while Redis is down must see what it would see from Redis — no
/// connection — never an error reply that its library would take for the answer to its first
/// command. Dedicated mode closes it; shared mode may instead hold its command until Redis is
/// back (within `outage_wait`) and answer it. Either way, once Redis is back, new clients
/// are served.
#[test]
fn a_client_connecting_while_redis_is_down_is_served_later_or_closed_never_sent_an_error() {
    for mode in ["dedicated", "shared"] {
        let mut redis = Redis::start();
        let sw = Stormwall::start(
            &redis.addr(),
            &format!("mode = \"{mode}\"\noutage_wait = \"10s\"\n"),
        );
        assert_eq!(txt(&call(&mut sw.raw(), &["PING"])), "PONG");
        redis.kill();
        let mut early = sw.raw();
        early.send(&cmd(&["PING"]));
        let waiting = thread::spawn(move || outcome_of_ping(&mut early));
        thread::sleep(Duration::from_millis(300));
        redis.restart();
        let served = join(waiting).unwrap_or_else(|e| panic!("{mode}: {e}"));
        if mode == "dedicated" {
            assert!(
                !served,
                "dedicated: a client connecting while Redis was down was served"
            );
        }
        let mut late = sw.raw();
        eventually(
            &format!("{mode}: a new client to be served after the restart"),
            Duration::from_secs(10),
            || {
                late = sw.raw();
                late.send(&cmd(&["PING"]));
                outcome_of_ping(&mut late).unwrap_or_else(|e| panic!("{mode}: {e}"))
            },
        );
    }
}

/// Why: `outage_wait` bounds the wait. When Redis stays down longer, a shared client's
/// command — from a client connected before the outage or during it — ends in a closed
/// connection with no reply, as a dead Redis would look. (Shared mode; in dedicated mode the
/// same clients are closed at once, which this test accepts too.)
#[test]
fn past_outage_wait_shared_clients_are_closed_without_a_reply() {
    let mut redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared("outage_wait = \"300ms\"\n"));
    let mut before = sw.raw();
    assert_eq!(txt(&call(&mut before, &["PING"])), "PONG");
    redis.kill();
    before.send(&cmd(&["GET", "k"]));
    let mut during = sw.raw();
    during.send(&cmd(&["GET", "k"]));
    // Both closed, no bytes, well before Redis returns.
    assert_closed_without_reply(&mut before, "client connected before the outage");
    assert_closed_without_reply(&mut during, "client connected during the outage");
    redis.restart();
    let mut late = sw.raw();
    eventually("a new client to be served", Duration::from_secs(10), || {
        late = sw.raw();
        late.send(&cmd(&["PING"]));
        outcome_of_ping(&mut late).unwrap_or_else(|e| panic!("{e}"))
    });
}

// ---------------------------------------------------------------------------------------------
// 8. Metrics agree with Redis
// ---------------------------------------------------------------------------------------------

/// Why: operators size Redis's `maxclients` from these numbers. `/metrics` counts upstream
/// connections by mode (shared, private, spare) and pins by reason; their sum must equal what
/// Redis itself counts from stormwall, and pinning clients of two kinds must show two
/// reasons. (Shared mode only; names as in issue 9 — see [`PINS`] and
/// [`UPSTREAM_CONNECTIONS`].)
#[test]
fn metrics_count_connections_by_mode_and_pins_by_reason_as_redis_sees_them() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        &shared("spare_connections = 2\n[admin]\nprobe_interval = \"1h\"\n"),
    );
    let mut direct = redis.raw();
    let mut a = sw.raw();
    let mut blocker = sw.raw();
    let mut tx = sw.raw();
    for c in [&mut a, &mut blocker, &mut tx] {
        assert_eq!(call(c, &["GET", "x"]), nil());
    }
    blocker.send(&cmd(&["BLPOP", "q", "0"]));
    wait_blocked(&redis, 1);
    ok(&call(&mut tx, &["MULTI"]));
    assert_eq!(call(&mut a, &["LPUSH", "q", "v"]), number(1));
    assert_eq!(blocker.read_frame(), array(&[blob(b"q"), blob(b"v")]));

    let (total, reasons) = pins(&sw);
    assert_eq!(
        total, 2.0,
        "{PINS} after a BLPOP and a MULTI (reasons: {reasons:?})"
    );
    assert_eq!(
        reasons.len(),
        2,
        "a blocking command and MULTI pin for different reasons"
    );
    let by_mode = |m: &str| metric(&sw, UPSTREAM_CONNECTIONS, &[("mode", m)]) as i64;
    poll(
        "the connection gauges to match Redis's count",
        Duration::from_secs(10),
        || {
            let (s, p, sp) = (by_mode("shared"), by_mode("private"), by_mode("spare"));
            let redis_count = stormwall_connections(&mut direct);
            if s == 1 && p == 2 && sp <= 2 && s + p + sp == redis_count {
                Ok(())
            } else {
                Err(format!(
                    "{UPSTREAM_CONNECTIONS}: shared {s}, private {p}, spare {sp}; Redis counts \
                     {redis_count} (expected shared 1, private 2, spare <= 2, summing to \
                     Redis's count)"
                ))
            }
        },
    );
    drop((blocker, tx));
    poll(
        "private connections to close with their clients",
        Duration::from_secs(10),
        || match by_mode("private") {
            0 => Ok(()),
            n => Err(format!("{n} private connections")),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Edges of sharing: pins inside pipelines, clients that leave or stop reading, names,
//    users deleted under their clients
// ---------------------------------------------------------------------------------------------

/// Why: a pin happens in the middle of whatever the client already sent. Its earlier
/// commands (200 `GET`s on the shared connection) must be answered first, in order, then the
/// pinning command, then the rest of the same write on the private connection.
#[test]
fn a_pin_in_the_middle_of_a_pipeline_keeps_the_clients_order() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:midpipe");
    let mut c = sw.raw();
    let mut input = cmd(&["SET", "p", "1"]);
    for _ in 0..200 {
        input.extend(cmd(&["GET", "p"]));
    }
    input.extend(cmd(&["INCR", "p"]));
    input.extend(cmd(&["BLPOP", "q", "0"]));
    input.extend(cmd(&["GET", "p"]));
    input.extend(cmd(&["INCR", "p"]));
    c.send(&input);
    ok(&c.read_frame());
    for i in 0..200 {
        assert_eq!(c.read_frame(), blob(b"1"), "GET {i} of the pipeline");
    }
    assert_eq!(c.read_frame(), number(2));
    wait_blocked(&redis, 1);
    busy.advance(200, "a BLPOP pinned mid-pipeline");
    assert_eq!(call(&mut sw.raw(), &["LPUSH", "q", "v"]), number(1));
    assert_eq!(c.read_frame(), array(&[blob(b"q"), blob(b"v")]));
    assert_eq!(c.read_frame(), blob(b"2"));
    assert_eq!(c.read_frame(), number(3));
    busy.finish();
    assert_pins(&sw, 1.0);
}

/// Why: a client that leaves with thousands of replies owed on a shared connection must not
/// leave them to be handed to anyone else, nor wedge the connection. 20 clients each write
/// 5,000 `INCR`s and hang up at once, while two busy clients check every reply they get; the
/// connections Redis counts from stormwall stay within the pool's size.
#[test]
fn clients_leaving_with_replies_owed_do_not_disturb_others() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        &shared("spare_connections = 2\n[admin]\nprobe_interval = \"1h\"\n"),
    );
    let busy = Busy::start(&sw, "busy:leave1");
    let busy2 = Busy::start(&sw, "busy:leave2");
    let burst: Vec<u8> = (0..5000).flat_map(|_| cmd(&["INCR", "left"])).collect();
    for _ in 0..20 {
        let mut leaver = sw.raw();
        leaver.send(&burst);
        drop(leaver);
        busy.advance(50, "clients hanging up with replies owed");
    }
    busy.advance(500, "after the leavers");
    busy2.advance(500, "after the leavers");
    busy.finish();
    busy2.finish();
    let mut direct = redis.raw();
    let left: i64 = txt(&call(&mut direct, &["GET", "left"]))
        .parse()
        .unwrap_or(0);
    assert!(left <= 20 * 5000, "more INCRs ran than were sent: {left}");
    // Shared mode: the leavers' traffic went over the shared connection, not new ones.
    poll(
        "stormwall's connections to be within shared + spare",
        Duration::from_secs(10),
        || match stormwall_connections(&mut direct) {
            n if n <= 3 => Ok(()),
            n => Err(format!(
                "Redis counts {n} connections from stormwall (at most 1 + 2)"
            )),
        },
    );
}

/// Why: issue 9 point 4 — no client waits behind another's large reply longer than it takes
/// to move the bytes. One client asks for 200 × 1 MiB and never reads; a busy client on the
/// same shared connection, and a fresh one, must keep getting their answers.
#[test]
fn a_client_not_reading_large_replies_does_not_stall_the_shared_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let big = vec![b'x'; 1024 * 1024];
    let mut direct = redis.raw();
    direct.send(&encode_cmd(&[b"SET", b"big", &big]));
    ok(&direct.read_frame());
    let busy = Busy::start(&sw, "busy:hol");
    let mut hog = sw.raw();
    let gets: Vec<u8> = (0..200).flat_map(|_| cmd(&["GET", "big"])).collect();
    hog.send(&gets);
    busy.advance(2000, "a client not reading 200 MiB of replies");
    let mut fresh = sw.raw();
    ok(&call(&mut fresh, &["SET", "small", "s"]));
    assert_eq!(call(&mut fresh, &["GET", "small"]), blob(b"s"));
    busy.advance(500, "a client not reading 200 MiB of replies");
    busy.finish();
    // The hog's first reply, when it finally reads, is its own and whole.
    assert_eq!(hog.read_frame(), blob(&big));
}

/// Why: `CLIENT SETNAME`/`SETINFO` and `HELLO … SETNAME` are held by stormwall only as Redis
/// accepts them: a refused name (spaces, wrong arity) leaves the previous one, an empty name
/// clears it. The name the client then reads back (`CLIENT GETNAME`, which pins and replays
/// it) must equal what a direct connection reads after the same commands.
#[test]
fn names_are_held_only_as_redis_accepts_them() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let cases: &[&[&[&str]]] = &[
        &[
            &["CLIENT", "SETNAME", "good"],
            &["CLIENT", "SETNAME", "bad name"],
        ],
        &[&["CLIENT", "SETNAME", "good"], &["CLIENT", "SETNAME", ""]],
        &[
            &["CLIENT", "SETNAME", "good"],
            &["CLIENT", "SETNAME", "a", "b"],
        ],
        &[
            &["CLIENT", "SETNAME", "good"],
            &["CLIENT", "SETINFO", "LIB-NAME", "bad name"],
            &["CLIENT", "SETINFO", "LIB-VER", "1.0"],
        ],
        &[
            &["HELLO", "3", "SETNAME", "h"],
            &["CLIENT", "SETNAME", "x y"],
        ],
        &[
            &["CLIENT", "SETNAME", "good"],
            &["HELLO", "2", "SETNAME", "bad name"],
            &["HELLO", "2", "AUTH", "nobody", "x", "SETNAME", "other"],
        ],
        &[
            &["HELLO", "2", "SETNAME", "h2"],
            &["HELLO", "2", "SETNAME", "h3"],
        ],
    ];
    for steps in cases {
        let mut p = sw.raw();
        let mut d = redis.raw();
        for step in steps.iter().chain([&["CLIENT", "GETNAME"][..]].iter()) {
            let (a, b) = (call(&mut p, step), call(&mut d, step));
            let same = if step[0] == "HELLO" && !is_error(&a) {
                without_id(a.clone()) == without_id(b.clone())
            } else {
                a == b
            };
            assert!(
                same,
                "{step:?} in {steps:?}: through stormwall {a:?}, direct {b:?}"
            );
        }
    }
}

/// Why: Redis disconnects every connection of a user that `ACL DELUSER` removes. A shared
/// client of that user must end the same way — its connection closed, never a reply run as
/// someone else, never an error reply — while other users' clients carry on.
#[test]
fn a_deleted_users_clients_are_closed_as_redis_closes_them() {
    let redis = Redis::start();
    let mut admin = redis.raw();
    ok(&call(
        &mut admin,
        &["ACL", "SETUSER", "alice", "on", ">pa", "~*", "&*", "+@all"],
    ));
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let busy = Busy::start(&sw, "busy:deluser");
    let mut shared_alice = sw.raw();
    let mut pinned_alice = sw.raw();
    let mut direct_alice = redis.raw();
    for c in [&mut shared_alice, &mut pinned_alice, &mut direct_alice] {
        ok(&call(c, &["AUTH", "alice", "pa"]));
        assert_eq!(txt(&call(c, &["ACL", "WHOAMI"])), "alice");
    }
    as_int(&call(&mut pinned_alice, &["CLIENT", "ID"]));

    assert_eq!(call(&mut admin, &["ACL", "DELUSER", "alice"]), number(1));
    assert_closed_without_reply(&mut direct_alice, "direct alice (Redis's own behaviour)");
    assert_closed_without_reply(&mut pinned_alice, "pinned alice");
    // The shared client learns at its next command, at the latest.
    let whoami = cmd(&["ACL", "WHOAMI"]);
    let _ = shared_alice.stream.write_all(&whoami);
    assert_closed_without_reply(&mut shared_alice, "shared alice");
    busy.advance(100, "ACL DELUSER");
    busy.finish();
}

/// Why (G5): Redis decides at accept time whether a new connection is authenticated; a
/// password set at runtime (`CONFIG SET requirepass`) binds every connection opened after it
/// and none opened before. stormwall's own connections opened before (shared ones, spares
/// waiting for a pin) must never carry a client that arrived after: such a client gets
/// `NOAUTH` for everything — also after a command that pins — exactly like a new direct
/// connection, while a client connected before keeps working.
#[test]
fn a_password_required_at_runtime_binds_clients_that_arrive_after_it() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        &shared("spare_connections = 2\n[admin]\nprobe_interval = \"1h\"\n"),
    );
    let mut early = sw.raw();
    ok(&call(&mut early, &["SET", "k", "v"]));
    let mut direct = redis.raw();
    // Best effort: let stormwall open its spares before the password is set (in shared mode
    // Redis then counts the shared connection and two spares).
    let deadline = Instant::now() + Duration::from_secs(5);
    while stormwall_connections(&mut direct) < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    ok(&call(
        &mut direct,
        &["CONFIG", "SET", "requirepass", "s3cret"],
    ));

    for steps in [
        &[&["GET", "k"][..], &["SET", "stolen", "x"]][..],
        &[&["CLIENT", "ID"], &["GET", "k"]],
        &[&["HELLO", "3"], &["GET", "k"]],
        &[&["BLPOP", "q", "0.01"], &["GET", "k"]],
    ] {
        let mut p = sw.raw();
        let mut d = redis.raw();
        for step in steps {
            let (a, b) = (call(&mut p, step), call(&mut d, step));
            assert_eq!(
                a, b,
                "a client that arrived after requirepass: {step:?} (left: through stormwall)"
            );
            assert!(error_text(&a).starts_with("NOAUTH"), "{step:?}: {a:?}");
        }
    }
    // The client connected before keeps its authentication, as on Redis.
    assert_eq!(call(&mut early, &["GET", "k"]), blob(b"v"));
    assert_eq!(call(&mut early, &["EXISTS", "stolen"]), number(0));
    let mut late = sw.raw();
    ok(&call(&mut late, &["AUTH", "s3cret"]));
    assert_eq!(call(&mut late, &["GET", "k"]), blob(b"v"));
}

/// Why: during a Redis outage a shared client's next command may be one stormwall handles
/// specially — a state change it checks with Redis (`AUTH`, `HELLO`, `SELECT`,
/// `CLIENT SETNAME`) or one that pins (`CLIENT ID`, `MULTI`, `BLPOP`). Each must either wait
/// for Redis (within `outage_wait`) and get Redis's real answer, or end in a closed
/// connection — never an error reply made up by stormwall.
#[test]
fn state_changes_and_pins_during_an_outage_wait_or_close_never_error() {
    let mut redis = Redis::start_with(&["--requirepass", "pw"]);
    let sw = Stormwall::start(&redis.addr(), &shared("outage_wait = \"10s\"\n"));
    // (command, what Redis answers it once back)
    type Expect = fn(&Frame) -> bool;
    let cases: Vec<(&[&str], Expect)> = vec![
        (&["AUTH", "pw"], |f| txt(f) == "OK"),
        (&["HELLO", "3", "AUTH", "default", "pw"], |f| {
            matches!(f, Frame::Map { .. })
        }),
        (&["SELECT", "1"], |f| txt(f) == "OK"),
        (&["CLIENT", "SETNAME", "during"], |f| txt(f) == "OK"),
        (&["CLIENT", "ID"], |f| matches!(f, Frame::Number { .. })),
        (&["MULTI"], |f| txt(f) == "OK"),
        (&["BLPOP", "q", "0.01"], |f| *f == Frame::Null),
        (&["GET", "k"], |f| *f == Frame::Null),
    ];
    let mut clients: Vec<Raw> = cases.iter().map(|_| sw.raw()).collect();
    for c in &mut clients {
        ok(&call(c, &["AUTH", "pw"]));
        assert_eq!(call(c, &["GET", "k"]), nil());
    }
    redis.kill();
    for (c, (command, _)) in clients.iter_mut().zip(&cases) {
        c.send(&cmd(command));
    }
    thread::sleep(Duration::from_millis(300));
    redis.restart();
    let mut closed = Vec::new();
    for (c, (command, expected)) in clients.iter_mut().zip(&cases) {
        c.stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        match c.try_read_frame() {
            None => closed.push(command),
            Some(f) => assert!(
                expected(&f),
                "{command:?} sent during the outage: got {f:?}, not Redis's answer"
            ),
        }
    }
    // Shared mode: a client with nothing in flight waits for Redis (issue 9, point 5),
    // whatever its next command.
    assert!(
        closed.is_empty(),
        "clients with nothing in flight closed instead of waiting for Redis; their commands: \
         {closed:?}"
    );
}

/// Why: Redis closes connections on its own — `CLIENT KILL`, its idle `timeout`, an
/// operator. When it closes a shared connection, clients with nothing in flight must not
/// notice (their next command goes to a replacement, in their state), while a pinned client,
/// whose own connection Redis closed, is closed like a direct one.
#[test]
fn redis_closing_the_shared_connection_goes_unnoticed_by_idle_clients() {
    let redis = Redis::start_with(&["--databases", "4"]);
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let mut plain = sw.raw();
    let mut in_db2 = sw.raw();
    let mut resp3 = sw.raw();
    let mut pinned = sw.raw();
    ok(&call(&mut plain, &["SET", "k", "v0"]));
    ok(&call(&mut in_db2, &["SELECT", "2"]));
    ok(&call(&mut in_db2, &["SET", "k", "v2"]));
    assert!(matches!(
        call(&mut resp3, &["HELLO", "3"]),
        Frame::Map { .. }
    ));
    assert_eq!(call(&mut resp3, &["HSET", "h", "f", "1"]), number(1));
    as_int(&call(&mut pinned, &["CLIENT", "ID"]));

    let mut direct = redis.raw();
    let killed = as_int(&call(
        &mut direct,
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    ));
    assert!(killed >= 4, "CLIENT KILL closed only {killed} connections");
    assert_closed_without_reply(&mut pinned, "pinned client whose connection Redis closed");
    assert_eq!(call(&mut plain, &["GET", "k"]), blob(b"v0"));
    assert_eq!(call(&mut in_db2, &["GET", "k"]), blob(b"v2"));
    let map = call(&mut resp3, &["HGETALL", "h"]);
    assert!(
        matches!(map, Frame::Map { .. }),
        "RESP3 after the kill: {map:?}"
    );
}

/// Why: stormwall keeps a password only up to a size (it replays it on a pin or a
/// reconnect); a longer one is state it cannot hold, so such a client moves to a connection
/// of its own when it authenticates — and must then work exactly as a direct connection,
/// database and protocol included.
#[test]
fn a_password_too_long_to_hold_still_authenticates_like_redis() {
    let password = "p".repeat(5000);
    let redis = Redis::start_with(&["--requirepass", &password]);
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let mut p = sw.raw();
    let mut d = redis.raw();
    let steps: &[&[&str]] = &[
        &["GET", "k"],
        &["AUTH", "wrong"],
        &["AUTH", &password],
        &["SET", "k", "v"],
        &["SELECT", "1"],
        &["GET", "k"],
        &["SELECT", "0"],
        &["GET", "k"],
        &["ACL", "WHOAMI"],
    ];
    for step in steps {
        let (a, b) = (call(&mut p, step), call(&mut d, step));
        assert_eq!(a, b, "{} (left: through stormwall)", step[0]);
    }
    let (a, b) = (call(&mut p, &["HELLO", "3"]), call(&mut d, &["HELLO", "3"]));
    assert_eq!(without_id(a), without_id(b), "HELLO 3");
    let map = call(&mut p, &["HGETALL", "nohash"]);
    assert_eq!(map, call(&mut d, &["HGETALL", "nohash"]));
    assert_pins(&sw, 1.0);
}

/// `WAIT` counts the replicas that acknowledged the connection's *own earlier writes*. A
/// shared client's earlier writes went over the shared connection, and `WAIT` pins it to a
/// fresh private one, whose own replication offset would be 0 on a Redis that sets it only
/// for commands it propagates (7.0 sets it after every command, so the replay covers it) —
/// every replica has acknowledged offset 0, so `WAIT` would return at once, promising
/// durability it never checked. With the replica stopped, `WAIT` must time out with 0
/// acknowledgements, as it does directly.
#[test]
fn wait_after_shared_writes_waits_for_those_writes() {
    let redis = Redis::start();
    let port = redis.addr().rsplit(':').next().unwrap().to_owned();
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &port]);
    let mut direct = redis.raw();
    poll("the replica to connect", Duration::from_secs(10), || {
        let info = txt(&call(&mut direct, &["INFO", "replication"]));
        if info.contains("connected_slaves:1") && info.contains("state=online") {
            Ok(())
        } else {
            Err(info)
        }
    });
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let mut c = sw.raw();
    ok(&call(&mut c, &["SET", "w", "1"]));
    // Acknowledged while the replica runs: WAIT returns 1 (through stormwall as directly).
    assert_eq!(call(&mut c, &["WAIT", "1", "2000"]), number(1));
    let stopped = replica.pid();
    signal(stopped, "STOP");
    let mut d = redis.raw();
    ok(&call(&mut d, &["SET", "w", "2"]));
    assert_eq!(call(&mut d, &["WAIT", "1", "300"]), number(0), "direct");
    // A fresh client: its SET goes over the shared connection, then WAIT pins it.
    let mut fresh = sw.raw();
    ok(&call(&mut fresh, &["SET", "w", "3"]));
    let acked = call(&mut fresh, &["WAIT", "1", "300"]);
    signal(stopped, "CONT");
    assert_eq!(
        acked,
        number(0),
        "WAIT through stormwall ignored the client's own write"
    );
}

/// Head of line: on a shared connection, a reply of many megabytes holds up every other
/// client's replies behind it for as long as it takes to move. A client that received one
/// moves to a connection of its own before its next command, so only its first large reply
/// is ever shared; the other clients' replies stay correct and in order throughout.
#[test]
fn a_client_that_gets_a_large_reply_moves_to_its_own_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), &shared(""));
    let big = vec![b'x'; 3 * 1024 * 1024];
    let mut direct = redis.raw();
    ok(&direct.call(&[b"SET", b"big", &big]));
    let mut heavy = sw.raw();
    let mut light = sw.raw();
    ok(&call(&mut light, &["SET", "small", "1"]));
    assert_eq!(heavy.call(&[b"GET", b"big"]), blob(&big));
    assert_eq!(pins(&sw).0, 0.0, "pinned before its next command");
    assert_eq!(
        call(&mut heavy, &["STRLEN", "big"]),
        number(big.len() as i64)
    );
    let (count, reasons) = pins(&sw);
    assert_eq!(count, 1.0);
    assert!(reasons.contains("large_replies"), "{reasons:?}");
    // Its later large replies travel on its own connection; the light client is unaffected.
    for _ in 0..3 {
        assert_eq!(heavy.call(&[b"GET", b"big"]), blob(&big));
        assert_eq!(call(&mut light, &["GET", "small"]), blob(b"1"));
    }
    assert_eq!(pins(&sw).0, 1.0, "the light client was pinned");
}
