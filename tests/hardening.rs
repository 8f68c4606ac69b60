//! Regression tests for the contract breaks an adversarial review found in the session
//! (issue 8): connection state that followed the client's request instead of Redis's reply,
//! commands with no reply, denied flushes that slipped past, a Redis failure shown as an
//! error reply, and tracking pushes out of order. Each test sends the same bytes to a Redis
//! directly and to an identical Redis through stormwall and compares what the client sees
//! and the data left behind.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{Frame, Raw, Redis, Stormwall, as_int, error_text, is_error, text};

/// Two identical fresh Redis servers, `behind` reached through stormwall and `direct` not.
struct Twin {
    direct: Redis,
    behind: Redis,
    sw: Stormwall,
}

impl Twin {
    fn start(toml: &str) -> Twin {
        Twin::start_with(&[], toml)
    }

    fn start_with(redis_args: &[&str], toml: &str) -> Twin {
        let direct = Redis::start_with(redis_args);
        let behind = Redis::start_with(redis_args);
        let sw = Stormwall::start(&behind.addr(), toml);
        Twin { direct, behind, sw }
    }

    /// Runs the same setup commands on both servers directly.
    fn setup(&self, cmds: &[&[&str]]) {
        for r in [&self.direct, &self.behind] {
            let mut raw = r.raw();
            for c in cmds {
                let args: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
                let reply = raw.call(&args);
                assert!(!is_error(&reply), "setup {c:?}: {reply:?}");
            }
        }
    }

    /// Sends `input` to both, reads `frames` replies from each and asserts they are equal.
    fn same(&self, input: &[u8], frames: usize) -> Vec<Frame> {
        let mut d = self.direct.raw();
        let mut p = self.sw.raw();
        exchange(&mut d, &mut p, input, frames)
    }

    /// Asserts `cmd` (a read) answers the same on both servers, directly.
    fn same_data(&self, cmd: &[&str]) -> Frame {
        let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_bytes()).collect();
        let a = self.direct.raw().call(&args);
        let b = self.behind.raw().call(&args);
        assert_eq!(
            a, b,
            "data differs for {cmd:?} (left: direct, right: behind)"
        );
        a
    }
}

fn exchange(d: &mut Raw, p: &mut Raw, input: &[u8], frames: usize) -> Vec<Frame> {
    d.send(input);
    p.send(input);
    (0..frames)
        .map(|i| {
            let a = d.read_frame();
            let b = p.read_frame();
            assert_eq!(
                a,
                b,
                "reply {i} differs (left: direct, right: stormwall) for {:?}",
                String::from_utf8_lossy(input)
            );
            a
        })
        .collect()
}

/// A `DISCARD` Redis refuses (wrong arity) does not end the transaction: the `DEL` after it
/// is queued, and the real `DISCARD` throws it away. The key survives.
#[test]
fn refused_discard_keeps_the_transaction_and_its_del_is_discarded() {
    let twin = Twin::start("");
    twin.setup(&[&["SET", "k", "v"]]);
    twin.same(b"MULTI\r\nDISCARD x\r\nDEL k\r\nDISCARD\r\nEXISTS k\r\n", 5);
    assert_eq!(as_int(&twin.same_data(&["EXISTS", "k"])), 1);
}

/// The same with `FLUSHALL`: a discarded transaction's flush never runs.
#[test]
fn refused_discard_keeps_the_transaction_and_its_flushall_is_discarded() {
    let twin = Twin::start("");
    twin.setup(&[&["SET", "k", "v"], &["SELECT", "3"]]);
    twin.same(
        b"MULTI\r\nDISCARD x\r\nFLUSHALL\r\nDISCARD\r\nDBSIZE\r\n",
        5,
    );
    assert_eq!(as_int(&twin.same_data(&["DBSIZE"])), 1);
}

/// A refused `RESET` does not end the transaction either, so the `SELECT 5` after it is
/// queued and discarded: the later `DEL` runs in database 0, as with Redis.
#[test]
fn refused_reset_keeps_the_transaction_and_its_select() {
    let twin = Twin::start("");
    twin.setup(&[
        &["SET", "k", "zero"],
        &["SELECT", "5"],
        &["SET", "k", "five"],
    ]);
    twin.same(b"MULTI\r\nRESET x\r\nSELECT 5\r\nDISCARD\r\nDEL k\r\n", 5);
    assert_eq!(
        twin.same_data(&["EXISTS", "k"]),
        Frame::Number {
            data: 0,
            attributes: None
        }
    );
    let mut d = twin.direct.raw();
    let mut b = twin.behind.raw();
    d.call(&[b"SELECT", b"5"]);
    b.call(&[b"SELECT", b"5"]);
    assert_eq!(as_int(&d.call(&[b"EXISTS", b"k"])), 1);
    assert_eq!(
        as_int(&b.call(&[b"EXISTS", b"k"])),
        1,
        "db 5's key was deleted"
    );
}

/// An `AUTH` inside a transaction is only queued (`+QUEUED`); a discarded transaction never
/// changes who the connection is, so later invalidations still run as the default user —
/// also when a refused `DISCARD` came first and the transaction went on.
#[test]
fn queued_auth_is_not_adopted_as_the_identity() {
    let twin = Twin::start("");
    twin.setup(&[
        &["ACL", "SETUSER", "alice", "on", ">p", "~other:*", "+@all"],
        &["SET", "k", "v"],
    ]);
    twin.same(
        b"MULTI\r\nDISCARD x\r\nAUTH alice p\r\nDISCARD\r\nDEL k\r\n",
        5,
    );
    assert_eq!(as_int(&twin.same_data(&["EXISTS", "k"])), 0);
}

/// `HELLO` options parsed as Redis parses them: `SETNAME`'s value may be the word `AUTH`,
/// and of several `AUTH` options the last one wins.
#[test]
fn hello_options_are_parsed_like_redis() {
    let twin = Twin::start("");
    twin.setup(&[
        &["ACL", "SETUSER", "alice", "on", ">p", "~other:*", "+@all"],
        &["SET", "k", "v"],
        &["SET", "j", "v"],
    ]);
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    let hello = |raw: &mut Raw, args: &[&[u8]]| {
        let reply = raw.call(args);
        assert!(!is_error(&reply), "{reply:?}");
    };
    for raw in [&mut d, &mut p] {
        hello(
            raw,
            &[
                b"HELLO", b"3", b"SETNAME", b"AUTH", b"AUTH", b"default", b"x",
            ],
        );
    }
    exchange(&mut d, &mut p, b"DEL k\r\n", 1);
    for raw in [&mut d, &mut p] {
        hello(
            raw,
            &[
                b"HELLO", b"2", b"AUTH", b"default", b"x", b"AUTH", b"alice", b"p",
            ],
        );
    }
    // Now alice, who may not touch `j`.
    let replies = exchange(&mut d, &mut p, b"DEL j\r\n", 1);
    assert!(error_text(&replies[0]).starts_with("NOPERM"), "{replies:?}");
    assert_eq!(as_int(&twin.same_data(&["EXISTS", "k"])), 0);
    assert_eq!(as_int(&twin.same_data(&["EXISTS", "j"])), 1);
}

/// `REPLCONF ACK` produces no reply; the session must not wait for one (it used to time out
/// the next command and then lose track of every reply after it).
#[test]
fn replconf_ack_owes_no_reply() {
    let twin = Twin::start("reply_timeout = \"1s\"\n");
    twin.setup(&[&["SET", "k", "v"]]);
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    exchange(&mut d, &mut p, b"REPLCONF ACK 0\r\nPING\r\n", 1);
    std::thread::sleep(Duration::from_millis(1500));
    exchange(&mut d, &mut p, b"GET nokey\r\nDEL k\r\nPING\r\n", 3);
    assert_eq!(as_int(&twin.same_data(&["EXISTS", "k"])), 0);
}

/// `flush.deny` holds wherever stormwall can see the command: inside a transaction (which
/// Redis then aborts, as for any command refused at queue time), behind a blocking command
/// in the same write, and after `CLIENT REPLY SKIP`.
#[test]
fn denied_flush_cannot_be_smuggled_past_the_policy() {
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[flush]\ndeny = [\"FLUSHALL\", \"FLUSHDB\"]\n",
    );
    redis.raw().call(&[b"SET", b"precious", b"1"]);
    let alive = || as_int(&redis.raw().call(&[b"EXISTS", b"precious"])) == 1;

    let mut raw = sw.raw();
    raw.send(b"MULTI\r\nFLUSHALL\r\nEXEC\r\n");
    assert_eq!(text(&raw.read_frame()), "OK");
    let denied = raw.read_frame();
    assert!(error_text(&denied).contains("denied"), "{denied:?}");
    let exec = raw.read_frame();
    assert!(error_text(&exec).starts_with("EXECABORT"), "{exec:?}");
    assert!(alive(), "FLUSHALL inside MULTI ran");

    raw.send(b"BLPOP nokey 0.3\r\nFLUSHDB\r\n");
    assert_eq!(raw.read_frame(), Frame::Null);
    assert!(error_text(&raw.read_frame()).contains("denied"));
    assert!(alive(), "FLUSHDB behind a blocking command ran");

    let mut raw = sw.raw();
    raw.send(b"CLIENT REPLY SKIP\r\nPING\r\nFLUSHALL\r\nCLIENT REPLY ON\r\n");
    let _ = raw.read_frame();
    assert!(alive(), "FLUSHALL after CLIENT REPLY SKIP ran");
}

/// With RESP3 client tracking, Redis sends the reply to the client's own `DEL` before the
/// invalidation push it causes; through stormwall the order is the same.
#[test]
fn tracking_push_follows_the_governed_reply() {
    let twin = Twin::start("");
    twin.setup(&[&["SET", "k", "v"]]);
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    for raw in [&mut d, &mut p] {
        raw.call(&[b"HELLO", b"3"]);
        assert_eq!(text(&raw.call(&[b"CLIENT", b"TRACKING", b"ON"])), "OK");
        raw.call(&[b"GET", b"k"]);
    }
    let got = exchange(&mut d, &mut p, b"DEL k\r\n", 2);
    assert!(matches!(got[0], Frame::Number { data: 1, .. }), "{got:?}");
    assert!(matches!(got[1], Frame::Push { .. }), "{got:?}");
}

/// Asserts the connection closes with no byte sent.
fn assert_closed_without_a_reply(raw: &mut Raw) {
    let mut rest = Vec::new();
    let _ = raw.stream.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "got bytes instead of a close: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// G6: a command whose fate is unknown (Redis died before answering) ends in a closed
/// connection, never in an error reply a client library would take for the answer.
#[test]
fn redis_dying_mid_command_closes_the_client_without_an_error_reply() {
    let mut redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let sw = Stormwall::start(&redis.addr(), "");
    let mut raw = sw.raw();
    assert_eq!(text(&raw.call(&[b"PING"])), "PONG");
    raw.send(b"DEBUG SLEEP 2\r\n");
    std::thread::sleep(Duration::from_millis(200));
    redis.kill();
    assert_closed_without_a_reply(&mut raw);
}

/// A client that connects while Redis is down is closed, as Redis's refused connection
/// would be, not handed an error reply it might take for an answer.
#[test]
fn connecting_while_redis_is_down_closes_without_an_error_reply() {
    let mut redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    redis.kill();
    let mut raw = sw.raw();
    raw.send(b"PING\r\n");
    assert_closed_without_a_reply(&mut raw);
}

/// With client tracking in `NOLOOP` mode Redis does not report a client's own writes back to
/// it; a delete the shield ran on its own connection would be reported. Through stormwall
/// the client sees exactly what it sees directly.
#[test]
fn tracking_noloop_client_is_not_told_about_its_own_delete() {
    let twin = Twin::start("");
    twin.setup(&[&["SET", "k", "v"], &["SET", "j", "v"]]);
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    for raw in [&mut d, &mut p] {
        raw.call(&[b"HELLO", b"3"]);
        let reply = raw.call(&[b"CLIENT", b"TRACKING", b"ON", b"NOLOOP"]);
        assert_eq!(text(&reply), "OK");
        raw.call(&[b"GET", b"k"]);
        raw.call(&[b"GET", b"j"]);
    }
    // Its own DEL of `k` is not reported; the direct write to `j` after it is.
    exchange(&mut d, &mut p, b"DEL k\r\n", 1);
    twin.direct.raw().call(&[b"SET", b"j", b"w"]);
    twin.behind.raw().call(&[b"SET", b"j", b"w"]);
    let pushes = exchange(&mut d, &mut p, b"PING\r\n", 2);
    assert!(matches!(&pushes[0], Frame::Push { .. }), "{pushes:?}");
}

/// Redis's limits for clients that have not authenticated: a large bulk or a long command
/// from an unauthenticated client is refused at its header, before anything is buffered; an
/// `AUTH` earlier in the same write lifts them, as it does in Redis.
#[test]
fn unauthenticated_clients_get_redis_pre_auth_limits() {
    let twin = Twin::start_with(&["--requirepass", "pw"], "");
    // The header of a 500 MB argument: refused at once, connection closed.
    let input = b"*2\r\n$4\r\nECHO\r\n$500000000\r\n";
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    let got = exchange(&mut d, &mut p, input, 1);
    assert_eq!(
        error_text(&got[0]),
        "ERR Protocol error: unauthenticated bulk length"
    );
    assert!(p.closed());
    let mut many = b"*11\r\n".to_vec();
    for _ in 0..11 {
        many.extend_from_slice(b"$1\r\nx\r\n");
    }
    let got = twin.same(&many, 1);
    assert_eq!(
        error_text(&got[0]),
        "ERR Protocol error: unauthenticated multibulk length"
    );
    // Authenticated in the same write: the large argument is accepted.
    let value = vec![b'v'; 20_000];
    let mut input = b"AUTH pw\r\n".to_vec();
    input.extend(common::encode_cmd(&[b"ECHO", &value]));
    let got = twin.same(&input, 2);
    assert_eq!(text(&got[0]), "OK");
}

/// A `REPLCONF ACK` queued in a transaction makes Redis write an `EXEC` array one element
/// short (the next reply fills the gap). No client can count that; stormwall relays such an
/// `EXEC` and what follows byte for byte, so the client gets exactly Redis's bytes instead
/// of a proxy waiting forever for a reply that never comes.
#[test]
fn exec_of_a_queued_no_reply_command_is_relayed_byte_for_byte() {
    let twin = Twin::start("reply_timeout = \"1s\"\n");
    let input = b"MULTI\r\nREPLCONF ACK 0\r\nFLUSHDB\r\nEXEC\r\nPING\r\nECHO end\r\n";
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    d.send(input);
    p.send(input);
    let expected = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+PONG\r\n$3\r\nend\r\n";
    assert_eq!(d.read_bytes(expected.len()), expected.to_vec());
    assert_eq!(p.read_bytes(expected.len()), expected.to_vec());
    // The connection is not waiting for a reply Redis never sends (which would end it at
    // upstream.reply_timeout).
    std::thread::sleep(Duration::from_millis(1500));
    exchange(&mut d, &mut p, b"ECHO again\r\n", 1);
}

/// Redis started to require a password after the shield's own connection was opened (that
/// connection stays authenticated, as Redis keeps them): a client connecting now is not,
/// and its invalidations are refused exactly as Redis refuses them — they never run on the
/// shield's older connection.
#[test]
fn a_password_required_later_is_required_of_new_clients() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[flush]\nmin_interval = \"0s\"\n");
    let mut early = sw.raw();
    early.call(&[b"SET", b"warm", b"1"]);
    assert_eq!(as_int(&early.call(&[b"DEL", b"warm"])), 1);
    assert_eq!(text(&early.call(&[b"FLUSHDB"])), "OK");
    let mut admin = redis.raw();
    admin.call(&[b"SET", b"victim", b"1"]);
    assert_eq!(
        text(&admin.call(&[b"CONFIG", b"SET", b"requirepass", b"pw"])),
        "OK"
    );
    admin.call(&[b"AUTH", b"pw"]);
    let mut late = sw.raw();
    for cmd in [
        &[&b"DEL"[..], b"victim"][..],
        &[b"UNLINK", b"victim"],
        &[b"FLUSHDB"],
    ] {
        let reply = late.call(cmd);
        assert!(
            error_text(&reply).starts_with("NOAUTH"),
            "{cmd:?}: {reply:?}"
        );
    }
    assert_eq!(
        as_int(&admin.call(&[b"EXISTS", b"victim"])),
        1,
        "deleted by an unauthenticated client"
    );
    // The early client's connection stays authenticated, as it would directly.
    assert_eq!(as_int(&early.call(&[b"DEL", b"victim"])), 1);
}

/// A client-side caching client (RESP3 tracking, no `NOLOOP`) reads the invalidation push
/// for its own `DEL` together with the `DEL`'s reply, as Redis writes them: a cache that
/// checks for pushes when the reply arrives never serves the deleted value.
#[test]
fn tracking_clients_get_their_own_invalidation_with_the_reply() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut c = sw.raw();
    c.call(&[b"HELLO", b"3"]);
    assert_eq!(text(&c.call(&[b"CLIENT", b"TRACKING", b"ON"])), "OK");
    for _ in 0..50 {
        c.call(&[b"SET", b"tk", b"1"]);
        c.call(&[b"GET", b"tk"]);
        assert_eq!(as_int(&c.call(&[b"DEL", b"tk"])), 1);
        let push = c.try_read_frame_now();
        assert!(matches!(push, Some(Frame::Push { .. })), "{push:?}");
    }
}

/// `CLIENT CACHING NO` (tracking in `OPTOUT` mode) applies to the connection's next command:
/// the `DEL` consumes it, so the `GET` after it is tracked, as with Redis.
#[test]
fn client_caching_applies_to_the_next_command_even_an_invalidation() {
    let twin = Twin::start("");
    twin.setup(&[&["SET", "ok1", "v"], &["SET", "ok2", "v"]]);
    let mut d = twin.direct.raw();
    let mut p = twin.sw.raw();
    for raw in [&mut d, &mut p] {
        raw.call(&[b"HELLO", b"3"]);
        let reply = raw.call(&[b"CLIENT", b"TRACKING", b"ON", b"OPTOUT"]);
        assert_eq!(text(&reply), "OK");
    }
    exchange(
        &mut d,
        &mut p,
        b"CLIENT CACHING NO\r\nDEL ok1\r\nGET ok2\r\n",
        3,
    );
    twin.direct.raw().call(&[b"SET", b"ok2", b"x"]);
    twin.behind.raw().call(&[b"SET", b"ok2", b"x"]);
    let got = exchange(&mut d, &mut p, b"PING\r\n", 2);
    assert!(matches!(got[0], Frame::Push { .. }), "{got:?}");
}

/// When Redis refuses the shield a new connection for a reason other than credentials (its
/// `maxclients` reached), a client whose own connection works gets Redis's own answer to its
/// own command, not an error from stormwall.
#[test]
fn a_shield_refused_a_connection_runs_the_command_on_the_clients_own() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut client = sw.raw();
    client.call(&[b"SET", b"mk", b"1"]);
    client.call(&[b"PING"]);
    let mut admin = redis.raw();
    let info = text(&admin.call(&[b"INFO", b"clients"]));
    let connected = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .expect("connected_clients");
    let reply = admin.call(&[
        b"CONFIG",
        b"SET",
        b"maxclients",
        connected.trim().as_bytes(),
    ]);
    assert_eq!(text(&reply), "OK");
    assert_eq!(as_int(&client.call(&[b"DEL", b"mk"])), 1);
    assert_eq!(as_int(&admin.call(&[b"EXISTS", b"mk"])), 0);
}
