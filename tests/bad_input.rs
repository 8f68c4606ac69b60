//! Contract point G6, client side: malformed or hostile input gets a protocol error and a
//! closed connection (after the replies owed to the commands before it), limits are enforced
//! before anything is buffered, and no client can crash stormwall or stall the others.
//!
//! Where Redis has an answer of its own, the same bytes are sent to Redis directly and the
//! replies compared: stormwall claims to frame requests exactly as Redis does.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Frame, Raw, Redis, Rng, Stormwall, array, blob, encode_cmd, error_text, number, text,
};

/// Reads every frame `input` produces on a fresh connection, until the peer closes (panics if
/// it does not close within the read timeout).
fn frames_then_close(mut conn: Raw, input: &[u8], frames: usize, who: &str) -> Vec<Frame> {
    conn.send(input);
    let mut out = Vec::new();
    for i in 0..frames {
        match conn.try_read_frame() {
            Some(f) => out.push(f),
            None => panic!(
                "{who} closed after {i} of {frames} replies to {:?}",
                shown(input)
            ),
        }
    }
    assert!(
        conn.closed(),
        "{who} kept the connection open after {:?}",
        shown(input)
    );
    out
}

/// Sends `input` to Redis directly, then through stormwall (one after the other, so commands
/// with side effects see the same state); both must give the same `frames` replies and then
/// close the connection.
fn same_then_closed(redis: &Redis, sw: &Stormwall, input: &[u8], frames: usize) -> Vec<Frame> {
    let direct = frames_then_close(redis.raw(), input, frames, "Redis");
    let proxied = frames_then_close(sw.raw(), input, frames, "stormwall");
    assert_eq!(direct, proxied, "replies differ for {:?}", shown(input));
    proxied
}

fn shown(input: &[u8]) -> String {
    let s = String::from_utf8_lossy(input);
    if s.len() > 80 {
        format!("{}… ({} bytes)", &s[..80], input.len())
    } else {
        s.into_owned()
    }
}

fn pong(conn: &mut Raw) {
    assert_eq!(text(&conn.call(&[b"PING"])), "PONG");
}

/// Peak virtual memory of a process, in bytes (from /proc).
fn vm_peak(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmPeak:"))
        .expect("VmPeak in /proc status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmPeak value");
    kb * 1024
}

/// Joins threads, failing the test if any is still running at the deadline (a hang).
fn join_within<T>(handles: Vec<thread::JoinHandle<T>>, within: Duration, what: &str) -> Vec<T> {
    let deadline = Instant::now() + within;
    while handles.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "{what}: threads still running after {within:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| panic!("{what}: a thread panicked"))
        })
        .collect()
}

#[test]
fn malformed_multibulk_gets_redis_error_and_close() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let got = same_then_closed(&redis, &sw, b"*1\r\n:1\r\n", 1);
    assert_eq!(
        error_text(&got[0]),
        "ERR Protocol error: expected '$', got ':'"
    );
    // Negative bulk lengths.
    for input in [
        &b"*1\r\n$-1\r\n"[..],
        b"*1\r\n$-5\r\n",
        b"*2\r\n$3\r\nGET\r\n$-2\r\n",
    ] {
        let got = same_then_closed(&redis, &sw, input, 1);
        assert_eq!(
            error_text(&got[0]),
            "ERR Protocol error: invalid bulk length"
        );
    }
    // Non-numeric (or non-canonical) lengths: Redis accepts only plain decimal integers.
    for input in [
        &b"*x\r\n"[..],
        b"*+1\r\n",
        b"*01\r\n",
        b"* 1\r\n",
        b"*1x\r\n",
    ] {
        let got = same_then_closed(&redis, &sw, input, 1);
        assert_eq!(
            error_text(&got[0]),
            "ERR Protocol error: invalid multibulk length"
        );
    }
    for input in [
        &b"*1\r\n$abc\r\n"[..],
        b"*1\r\n$1x\r\n",
        b"*1\r\n$+4\r\n",
        b"*1\r\n$\r\n",
    ] {
        let got = same_then_closed(&redis, &sw, input, 1);
        assert_eq!(
            error_text(&got[0]),
            "ERR Protocol error: invalid bulk length"
        );
    }
    // A non-bulk argument in the middle of an otherwise fine command.
    same_then_closed(&redis, &sw, b"*2\r\n$4\r\nPING\r\n+hi\r\n", 1);
    // Stormwall is still fine for everyone else.
    pong(&mut sw.raw());
}

#[test]
fn empty_requests_are_skipped_like_redis() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    // `*0`, `*-1` and blank lines are consumed without a reply; the connection stays usable.
    let input = b"*-5\r\n*0\r\n\r\n   \r\nPING\r\n*1\r\n$4\r\nPING\r\n";
    let direct = {
        let mut c = redis.raw();
        c.send(input);
        vec![c.read_frame(), c.read_frame()]
    };
    let mut c = sw.raw();
    c.send(input);
    let proxied = vec![c.read_frame(), c.read_frame()];
    assert_eq!(direct, proxied);
    pong(&mut c);
}

#[test]
fn bulk_length_over_limit_is_rejected_before_the_body() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[limits]\nmax_bulk_len = 1000\n");

    // Exactly at the limit is fine.
    let mut ok = sw.raw();
    let value = vec![b'v'; 1000];
    assert_eq!(text(&ok.call(&[b"SET", b"k", &value])), "OK");
    assert_eq!(ok.call(&[b"STRLEN", b"k"]), number(1000));

    // One byte over: Redis's own text for an over-long bulk (as with proto-max-bulk-len),
    // nothing added, and it arrives without the body being sent.
    let mut c = sw.raw();
    c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1001\r\n");
    let e = error_text(&c.read_frame());
    assert_eq!(e, "ERR Protocol error: invalid bulk length");
    assert!(
        c.closed(),
        "connection not closed after an over-limit bulk length"
    );

    // A declared 2 GB argument: answered at once, and never reserved. Several clients at once,
    // so an allocation per client would show up as many gigabytes of address space.
    let before = vm_peak(sw.pid());
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = sw.raw();
        c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000000000\r\n");
        clients.push(c);
    }
    for mut c in clients {
        let e = error_text(&c.read_frame());
        assert_eq!(e, "ERR Protocol error: invalid bulk length");
        assert!(c.closed());
    }
    let after = vm_peak(sw.pid());
    assert!(
        after < before + (1 << 30),
        "stormwall's peak address space grew from {before} to {after} bytes after 2 GB bulk \
         lengths were declared (and refused)"
    );
    // The earlier value is untouched and other clients still work.
    assert_eq!(ok.call(&[b"STRLEN", b"k"]), number(1000));
}

#[test]
fn array_length_over_limit_is_rejected() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "[limits]\nmax_array_len = 8\n");
    let mut ok = sw.raw();
    let r = ok.call(&[b"RPUSH", b"l", b"a", b"b", b"c", b"d", b"e", b"f"]);
    assert_eq!(r, number(6));

    for header in [
        &b"*9\r\n"[..],
        b"*2147483648\r\n",
        b"*9223372036854775807\r\n",
    ] {
        let mut c = sw.raw();
        // Only the header: the arguments are never needed to decide.
        c.send(header);
        let e = error_text(&c.read_frame());
        assert_eq!(e, "ERR Protocol error: invalid multibulk length");
        assert!(c.closed());
    }
    // The header after valid commands in the same write: those still get their replies.
    let mut c = sw.raw();
    let mut input = encode_cmd(&[b"LLEN", b"l"]);
    input.extend_from_slice(b"*9\r\n$5\r\nRPUSH\r\n");
    c.send(&input);
    assert_eq!(c.read_frame(), number(6));
    assert_eq!(
        error_text(&c.read_frame()),
        "ERR Protocol error: invalid multibulk length"
    );
    assert!(c.closed());
    pong(&mut ok);
}

#[test]
fn request_over_max_request_bytes_is_closed_without_a_reply() {
    // Like Redis past its client-query-buffer-limit: the connection is closed, no reply.
    let redis = Redis::start();
    let sw = Stormwall::start(
        &redis.addr(),
        "[limits]\nmax_bulk_len = 300000\nmax_request_bytes = 1048576\n",
    );
    let v = vec![b'x'; 300_000];
    let mut ok = sw.raw();
    // About 900 KB in one request: under the limit.
    assert_eq!(ok.call(&[b"RPUSH", b"l", &v, &v, &v]), number(3));

    // Four 300 KB arguments (each within max_bulk_len) cross 1 MiB at the fourth header;
    // the body of that argument is never sent. The commands before it are still answered.
    let mut c = sw.raw();
    let mut input = encode_cmd(&[b"LLEN", b"l"]);
    input.extend_from_slice(b"*6\r\n$5\r\nRPUSH\r\n$1\r\nl\r\n");
    for _ in 0..3 {
        input.extend_from_slice(b"$300000\r\n");
        input.extend_from_slice(&v);
        input.extend_from_slice(b"\r\n");
    }
    input.extend_from_slice(b"$300000\r\n");
    c.send(&input);
    assert_eq!(c.read_frame(), number(3));
    assert_eq!(
        c.try_read_frame(),
        None,
        "a reply after the over-limit request"
    );
    // Nothing of the refused request reached Redis.
    assert_eq!(ok.call(&[b"LLEN", b"l"]), number(3));
}

#[test]
fn replies_before_a_malformed_frame_arrive_in_order() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    // Same bytes, same replies as Redis: three real replies, the error, then close. What
    // follows the bad frame is not executed.
    let mut input = Vec::new();
    let cmds: [&[&[u8]]; 3] = [&[b"SET", b"a", b"1"], &[b"INCR", b"a"], &[b"GET", b"a"]];
    for args in cmds {
        input.extend(encode_cmd(args));
    }
    input.extend_from_slice(b"*1\r\n:1\r\n");
    input.extend(encode_cmd(&[b"SET", b"a", b"after"]));
    let got = same_then_closed(&redis, &sw, &input, 4);
    assert_eq!(text(&got[2]), "2");
    assert!(error_text(&got[3]).contains("expected '$', got ':'"));
    assert_eq!(
        text(&redis.raw().call(&[b"GET", b"a"])),
        "2",
        "a command after the malformed frame was executed"
    );

    // A deep pipeline followed by a bad frame in the same write: every reply, in order.
    let n = 3000;
    let mut input = Vec::new();
    for _ in 0..n {
        input.extend(encode_cmd(&[b"INCR", b"deep"]));
    }
    input.extend_from_slice(b"*1\r\n$-1\r\n");
    let got = frames_then_close(sw.raw(), &input, n + 1, "stormwall");
    for (i, f) in got[..n].iter().enumerate() {
        assert_eq!(*f, number(i as i64 + 1), "reply {i} out of order");
    }
    assert_eq!(
        error_text(&got[n]),
        "ERR Protocol error: invalid bulk length"
    );

    // The bad frame in a later write, while replies to the earlier ones may still be owed.
    let mut c = sw.raw();
    let mut input = Vec::new();
    for _ in 0..n {
        input.extend(encode_cmd(&[b"INCR", b"later"]));
    }
    c.send(&input);
    c.send(b"GET \"unbalanced\r\n");
    for i in 0..n {
        assert_eq!(c.read_frame(), number(i as i64 + 1));
    }
    assert_eq!(
        error_text(&c.read_frame()),
        "ERR Protocol error: unbalanced quotes in request"
    );
    assert!(c.closed());
}

#[test]
fn a_stalled_half_frame_does_not_block_other_clients() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    let mut big_partial = b"*2\r\n$4\r\nECHO\r\n$60000\r\n".to_vec();
    big_partial.extend(vec![b'e'; 30000]);
    // Each: the half sent now, the rest sent later, and the reply expected then.
    let stalls: Vec<(Vec<u8>, Vec<u8>, Frame)> = vec![
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc".to_vec(),
            b"0123456\r\n".to_vec(),
            Frame::SimpleString {
                data: b"OK".to_vec(),
                attributes: None,
            },
        ),
        (
            b"*3\r".to_vec(),
            b"\n$3\r\nSET\r\n$2\r\nk2\r\n$1\r\nv\r\n".to_vec(),
            Frame::SimpleString {
                data: b"OK".to_vec(),
                attributes: None,
            },
        ),
        (
            b"ECH".to_vec(),
            b"O inline\r\n".to_vec(),
            Frame::BlobString {
                data: b"inline".to_vec(),
                attributes: None,
            },
        ),
        (
            big_partial,
            {
                let mut rest = vec![b'e'; 30000];
                rest.extend_from_slice(b"\r\n");
                rest
            },
            Frame::BlobString {
                data: vec![b'e'; 60000],
                attributes: None,
            },
        ),
    ];
    let mut stalled = Vec::new();
    for (half, _, _) in &stalls {
        let mut c = sw.raw();
        c.send(half);
        stalled.push(c);
    }

    // Meanwhile other clients run many commands each.
    let port = sw.port;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            thread::spawn(move || {
                let mut c = Raw::connect(port);
                let key = format!("counter{w}");
                for i in 1..=500 {
                    let r = c.call(&[b"INCR", key.as_bytes()]);
                    assert_eq!(r, number(i));
                }
            })
        })
        .collect();
    join_within(
        workers,
        Duration::from_secs(20),
        "clients next to stalled ones",
    );

    // The stalled clients were only waiting for their own bytes.
    for (c, (_, rest, want)) in stalled.iter_mut().zip(&stalls) {
        c.send(rest);
        assert_eq!(c.read_frame(), *want);
    }
    assert_eq!(text(&redis.raw().call(&[b"GET", b"k"])), "abc0123456");
}

#[test]
fn unbalanced_quotes_in_inline_commands() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    for input in [
        &b"SET \"a\r\n"[..],
        b"GET 'a\r\n",
        b"GET \"a\"b\r\n",
        b"GET 'a'b\r\n",
        b"PING\r\nSET k \"oops\n",
    ] {
        let frames = if input.starts_with(b"PING") { 2 } else { 1 };
        let got = same_then_closed(&redis, &sw, input, frames);
        assert_eq!(
            error_text(got.last().unwrap()),
            "ERR Protocol error: unbalanced quotes in request"
        );
    }
    // Balanced quotes and escapes are fine, and read the same as through Redis.
    let input = b"SET k \"a b\\x41\\n\"\r\nGET k\r\nSET j 'it\\'s'\r\nGET j\r\n";
    let direct = {
        let mut c = redis.raw();
        c.send(input);
        (0..4).map(|_| c.read_frame()).collect::<Vec<_>>()
    };
    let mut c = sw.raw();
    c.send(input);
    let proxied: Vec<_> = (0..4).map(|_| c.read_frame()).collect();
    assert_eq!(direct, proxied);
    assert_eq!(text(&proxied[1]), "a bA\n");
    assert_eq!(text(&proxied[3]), "it's");
}

#[test]
fn over_long_lines_are_rejected_like_redis() {
    let redis = Redis::start();
    let sw = Stormwall::start(&redis.addr(), "");
    // Exactly one byte over Redis's 64 KiB inline limit, without a newline (so neither side
    // leaves unread bytes behind that would turn the close into a reset).
    let inline = vec![b'a'; 64 * 1024 + 1];
    let got = same_then_closed(&redis, &sw, &inline, 1);
    assert_eq!(
        error_text(&got[0]),
        "ERR Protocol error: too big inline request"
    );

    let mut count = b"*".to_vec();
    count.extend(vec![b'1'; 64 * 1024 + 1]);
    let got = same_then_closed(&redis, &sw, &count, 1);
    assert_eq!(
        error_text(&got[0]),
        "ERR Protocol error: too big mbulk count string"
    );

    let mut bulk = b"*1\r\n$".to_vec();
    bulk.extend(vec![b'1'; 64 * 1024 + 1]);
    let got = same_then_closed(&redis, &sw, &bulk, 1);
    assert_eq!(
        error_text(&got[0]),
        "ERR Protocol error: too big bulk count string"
    );
    pong(&mut sw.raw());
}

/// Connects and tells whether stormwall accepted the connection: `false` if it answered
/// "max number of clients reached" (and closed), `true` if it serves PING.
fn accepted(port: u16) -> bool {
    const REFUSED: &[u8] = b"-ERR max number of clients reached\r\n";
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // A refusal comes unasked; give it a moment before speaking (speaking to a socket that is
    // being closed can turn the refusal into a bare reset).
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => panic!("closed without a reply"),
        Ok(n) => {
            assert_eq!(
                &buf[..n],
                REFUSED,
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            return false;
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Err(e) => panic!("read failed: {e}"),
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    match s.read(&mut buf) {
        Ok(n) if &buf[..n] == b"+PONG\r\n" => true,
        Ok(n) if &buf[..n] == REFUSED => false,
        Ok(0) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => false,
        other => panic!("unexpected answer to PING: {other:?} {:?}", &buf[..]),
    }
}

#[test]
fn max_clients_refuses_the_extra_connection() {
    let redis = Redis::start();
    let sw = Stormwall::start_with_listen(&redis.addr(), "max_clients = 2\n", "");
    let mut a = sw.raw();
    pong(&mut a);
    let mut b = sw.raw();
    pong(&mut b);

    let mut c = sw.raw();
    let e = error_text(&c.read_frame());
    assert_eq!(e, "ERR max number of clients reached");
    assert!(c.closed(), "the refused connection was left open");
    // Refusing did not disturb the clients already served.
    pong(&mut a);
    pong(&mut b);
    assert!(!accepted(sw.port));

    // Once one leaves, a new client gets its slot (the slot frees when stormwall notices).
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if accepted(sw.port) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no client accepted after one of max_clients disconnected"
        );
        thread::sleep(Duration::from_millis(20));
    }
    pong(&mut b);
}

#[test]
fn idle_timeout_closes_idle_clients_but_not_blocked_ones() {
    let redis = Redis::start();
    let sw = Stormwall::start_with_listen(&redis.addr(), "idle_timeout = \"300ms\"\n", "");
    let start = Instant::now();
    let mut blocked = sw.raw();
    blocked.cmd(&[b"BLPOP", b"q", b"0"]);
    let mut subscriber = sw.raw();
    let r = subscriber.call(&[b"SUBSCRIBE", b"ch"]);
    assert!(matches!(r, Frame::Array { .. }), "{r:?}");
    let mut idle = sw.raw();
    pong(&mut idle);
    assert!(idle.closed(), "idle client not closed");

    // Several idle periods later the blocked client is still waiting, and gets its element.
    thread::sleep(Duration::from_millis(1000).saturating_sub(start.elapsed()));
    let mut direct = redis.raw();
    assert_eq!(direct.call(&[b"LPUSH", b"q", b"v"]), number(1));
    assert_eq!(blocked.read_frame(), array(&[blob(b"q"), blob(b"v")]));
    pong(&mut blocked);
    // A subscriber waits for messages, which is not idleness either (Redis spares it too).
    assert_eq!(direct.call(&[b"PUBLISH", b"ch", b"m"]), number(1));
    assert_eq!(
        subscriber.read_frame(),
        array(&[blob(b"message"), blob(b"ch"), blob(b"m")])
    );
}

#[test]
fn inline_command_with_a_nul_byte_does_not_wedge_the_session() {
    // Redis 7.0 finds an inline command's end with strchr(), so a NUL byte before the newline
    // means "line not complete yet": Redis answers nothing and keeps waiting for input, and
    // closes the connection when the client leaves. A proxy that frames the line as complete
    // waits for a reply that never comes, and must not hold the session (and its client slot
    // and upstream connection) open after the client has gone.
    let redis = Redis::start();
    let sw = Stormwall::start_with_listen(&redis.addr(), "max_clients = 1\n", "");
    let input = b"GET a\x00b\r\nPING\r\n";
    for (who, port) in [("Redis", redis.port), ("stormwall", sw.port)] {
        let mut c = Raw::connect(port);
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        c.send(input);
        c.stream.shutdown(Shutdown::Write).unwrap();
        assert!(
            c.closed(),
            "{who} kept the connection open after the client finished sending {:?}",
            shown(input)
        );
    }
    // A client that sends it and disconnects gives its slot back.
    let mut c = sw.raw();
    c.send(input);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !accepted(sw.port) {
        assert!(
            Instant::now() < deadline,
            "the only client slot is still taken 5s after its client left"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Random input: pure noise, or commands (from a harmless set) with random damage.
fn garbage(rng: &mut Rng) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"PING", b"ECHO", b"SET", b"GET", b"INCR", b"STRLEN", b"EXISTS",
    ];
    const BITS: &[&[u8]] = &[
        b"*",
        b"$",
        b"\r\n",
        b"\r",
        b"\n",
        b"-1",
        b"0",
        b"3",
        b"99999",
        b"2000000000",
        b"\"",
        b"'",
        b" ",
        b":",
        b"+",
        b"\\x4",
    ];
    let mut out = Vec::new();
    match rng.below(3) {
        0 => {
            let n = 1 + rng.below(4000);
            out = rng.bytes(n);
        }
        _ => {
            for _ in 0..1 + rng.below(20) {
                let argc = 1 + rng.below(4);
                let mut args: Vec<Vec<u8>> = vec![WORDS[rng.below(WORDS.len())].to_vec()];
                for _ in 1..argc {
                    let n = rng.below(40);
                    args.push(rng.bytes(n));
                }
                let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                let mut cmd = if rng.below(4) == 0 {
                    let mut line = refs.join(&b' ');
                    line.extend_from_slice(b"\r\n");
                    line
                } else {
                    encode_cmd(&refs)
                };
                // Damage: flip, cut or splice protocol fragments in.
                for _ in 0..rng.below(4) {
                    if cmd.is_empty() {
                        break;
                    }
                    let at = rng.below(cmd.len());
                    match rng.below(3) {
                        0 => cmd[at] = rng.next() as u8,
                        1 => cmd.truncate(at),
                        _ => {
                            let bit = BITS[rng.below(BITS.len())];
                            cmd.splice(at..at, bit.iter().copied());
                        }
                    }
                }
                out.extend(cmd);
            }
        }
    }
    out
}

/// Sends `input` in a few chunks, half-closes, and drains the replies. Returns an error
/// description if stormwall kept the connection open (a hang) or sent invalid RESP.
fn fuzz_one(port: u16, input: &[u8], rng: &mut Rng) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = input;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len());
        // Write errors are fine: stormwall closes after a protocol error.
        if s.write_all(&rest[..n]).is_err() {
            break;
        }
        rest = &rest[n..];
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(format!("not closed after the client finished: {e}")),
        }
    }
    // Whatever arrived must be valid RESP (a reset may cut the last frame short).
    let mut at = 0;
    loop {
        match skip_frame(&got, at) {
            Ok(Some(end)) => at = end,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "invalid RESP from stormwall at byte {at}: {e}: {:?}",
                    String::from_utf8_lossy(&got[at..got.len().min(at + 80)])
                ));
            }
        }
    }
}

/// Where the RESP2 frame starting at `at` ends; `Ok(None)` if it is incomplete. (Hand-rolled
/// because Redis error texts may carry arbitrary bytes, which RESP3 decoders reject as UTF-8.)
fn skip_frame(buf: &[u8], at: usize) -> Result<Option<usize>, String> {
    let Some(&tag) = buf.get(at) else {
        return Ok(None);
    };
    let Some(cr) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[at + 1..at + cr];
    let next = at + cr + 2;
    let number = || -> Result<i64, String> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad length {:?}", String::from_utf8_lossy(line)))
    };
    match tag {
        b'+' | b'-' | b':' => Ok(Some(next)),
        b'$' => match number()? {
            -1 => Ok(Some(next)),
            n if n >= 0 => {
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    Ok(None)
                } else if &buf[end..end + 2] != b"\r\n" {
                    Err("bulk string not followed by CRLF".into())
                } else {
                    Ok(Some(end + 2))
                }
            }
            n => Err(format!("bulk length {n}")),
        },
        b'*' => {
            let mut pos = next;
            for _ in 0..number()?.max(0) {
                match skip_frame(buf, pos)? {
                    Some(end) => pos = end,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos))
        }
        other => Err(format!("unexpected type byte {other:#x}")),
    }
}

#[test]
fn random_garbage_never_crashes_stormwall() {
    let redis = Redis::start();
    let mut sw = Stormwall::start(
        &redis.addr(),
        "[limits]\nmax_bulk_len = 4096\nmax_array_len = 64\nmax_request_bytes = 1048576\n",
    );
    let port = sw.port;
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let stop = stop.clone();
            thread::spawn(move || {
                let seed = 0x5EED_0000 + t;
                let mut rng = Rng(seed);
                for i in 0..100 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let input = garbage(&mut rng);
                    if let Err(e) = fuzz_one(port, &input, &mut rng) {
                        stop.store(true, Ordering::Relaxed);
                        return Err(format!(
                            "seed {seed:#x}, connection {i}: {e}; input {:?}",
                            String::from_utf8_lossy(&input[..input.len().min(200)])
                        ));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for r in join_within(threads, Duration::from_secs(60), "fuzz") {
        r.unwrap_or_else(|e| panic!("{e}\n{}", sw.log()));
    }
    assert!(sw.is_running(), "stormwall exited\n{}", sw.log());
    assert!(
        !sw.log().contains("panicked"),
        "stormwall panicked:\n{}",
        sw.log()
    );
    let mut c = sw.raw();
    pong(&mut c);
    assert_eq!(text(&c.call(&[b"SET", b"after", b"fuzz"])), "OK");
    assert_eq!(text(&c.call(&[b"GET", b"after"])), "fuzz");
}
