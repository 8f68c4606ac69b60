//! Contract point G1 for framing: every break listed in issue 8, item 11 (and issue 14, item
//! 3), each as one test that sends the same bytes to a real Redis directly and through
//! stormwall and compares the bytes that come back and whether the connection closes. Each
//! of these failed on the framing before the rewrite (noted per test).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{Redis, Stormwall, Transcript, exchange, read_transcript, shown};

const QUIET: Duration = Duration::from_secs(3);

/// Sends `input` to Redis and to stormwall (in front of a second, identical Redis), half-closes,
/// and asserts the same bytes come back and both close. Returns Redis's transcript.
fn same(redis: &Redis, sw: &Stormwall, input: &[u8]) -> Transcript {
    // Silence means "no more replies": a request of megabytes may take a debug build on a
    // busy machine longer than QUIET to frame, so the wait grows with the input.
    let quiet = QUIET + Duration::from_secs((input.len() / (1 << 20)) as u64);
    let direct = exchange(redis.port, input, true, quiet);
    let proxied = exchange(sw.port, input, true, quiet);
    assert_eq!(
        shown(&proxied.bytes),
        shown(&direct.bytes),
        "replies differ for {}",
        shown(input)
    );
    assert_eq!(proxied, direct, "replies differ for {}", shown(input));
    assert!(direct.closed, "Redis kept the connection open");
    direct
}

fn pair(redis_args: &[&str], toml: &str) -> (Redis, Redis, Stormwall) {
    let direct = Redis::start_with(redis_args);
    let behind = Redis::start_with(redis_args);
    let sw = Stormwall::start(&behind.addr(), toml);
    (direct, behind, sw)
}

#[test]
fn over_limit_errors_carry_no_extra_text() {
    // Before: "invalid bulk length (536870913 bytes exceed stormwall's limits.max_bulk_len …)".
    let (redis, _behind, sw) = pair(&[], "");
    let t = same(&redis, &sw, b"*1\r\n$536870913\r\n");
    assert_eq!(t.bytes, b"-ERR Protocol error: invalid bulk length\r\n");
    same(&redis, &sw, b"*2147483648\r\n");
    // A configured limit below the default answers as Redis does with the same limit.
    let (redis, _behind, sw) = pair(
        &["--proto-max-bulk-len", "1048576"],
        "[limits]\nmax_bulk_len = 1048576\n",
    );
    let t = same(&redis, &sw, b"*2\r\n$4\r\nECHO\r\n$1048577\r\n");
    assert_eq!(t.bytes, b"-ERR Protocol error: invalid bulk length\r\n");
}

#[test]
fn counts_over_a_million_are_accepted() {
    // Before: `*1048577` was refused (max_array_len = 1048576); Redis accepts up to 2^31-1.
    let (redis, _behind, sw) = pair(&[], "");
    let n = 1_048_577;
    let mut input = format!("*{n}\r\n$5\r\nRPUSH\r\n$1\r\nl\r\n").into_bytes();
    for _ in 0..n - 2 {
        input.extend_from_slice(b"$1\r\nx\r\n");
    }
    let t = same(&redis, &sw, &input);
    assert_eq!(t.bytes, format!(":{}\r\n", n - 2).into_bytes());
    // A count of 2^31-1 with a few arguments: waits for the rest, no error, no reservation.
    let t = same(&redis, &sw, b"*2147483647\r\n$4\r\nPING\r\n");
    assert!(t.bytes.is_empty());
}

#[test]
fn a_stray_byte_is_quoted_as_redis_quotes_it() {
    // Before: non-graphic bytes were shown as '?'. Redis prints the byte itself (CR and LF
    // turned into spaces).
    let (redis, _behind, sw) = pair(&[], "");
    for input in [
        &b"*1\r\n \r\n"[..],
        b"*1\r\n\r\n",
        b"*1\r\n\n\r\n",
        b"*1\r\n\x01\r\n",
        b"*1\r\n\xff\r\n",
        b"*2\r\n$4\r\nECHO\r\n\t3\r\n",
    ] {
        let t = same(&redis, &sw, input);
        assert!(
            t.bytes
                .starts_with(b"-ERR Protocol error: expected '$', got '"),
            "{}",
            shown(&t.bytes)
        );
    }
}

#[test]
fn a_stray_byte_is_judged_only_once_its_line_is_complete() {
    // Before: stormwall answered as soon as it saw the byte; Redis waits for the line.
    let (redis, _behind, sw) = pair(&[], "");
    let mut got = Vec::new();
    for port in [redis.port, sw.port] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"*2\r\n$4\r\nECHO\r\n?1").unwrap();
        let early = read_transcript(&mut s, Duration::from_millis(500));
        assert_eq!(early.bytes, b"", "answered before the line was complete");
        assert!(!early.closed);
        s.write_all(b"23\r\n").unwrap();
        got.push(read_transcript(&mut s, QUIET));
    }
    assert_eq!(
        got[0].bytes,
        b"-ERR Protocol error: expected '$', got '?'\r\n"
    );
    assert_eq!(got[1], got[0]);
}

/// `ECHO a…a\r\n`: an inline line of `n` bytes before its CRLF.
fn inline_echo(n: usize) -> Vec<u8> {
    let mut v = b"ECHO ".to_vec();
    v.extend(vec![b'a'; n - 5]);
    v.extend_from_slice(b"\r\n");
    v
}

#[test]
fn inline_lines_are_accepted_as_far_as_redis_reads() {
    // Before: anything over 65,536 bytes was refused. Redis judges at the end of its reads,
    // which on a fresh connection end at 16,384 and 81,910 bytes.
    let (redis, _behind, sw) = pair(&[], "");
    for n in [65_537, 70_000, 81_908] {
        let t = same(&redis, &sw, &inline_echo(n));
        assert!(t.bytes.starts_with(format!("${}\r\n", n - 5).as_bytes()));
    }
    let t = same(&redis, &sw, &inline_echo(81_909));
    assert_eq!(t.bytes, b"-ERR Protocol error: too big inline request\r\n");
    // Unfinished and over 64 KiB at the end of what was sent: refused by both.
    let t = same(&redis, &sw, &vec![b'a'; 65_537]);
    assert_eq!(t.bytes, b"-ERR Protocol error: too big inline request\r\n");
}

#[test]
fn header_lines_over_64k_and_the_65536_digit_edge() {
    // Before: `*` + 65,536 digits (65,537 bytes) waited for more, where Redis refuses; and
    // a complete header line over 64 KiB got "too big …" where Redis says "invalid …".
    let (redis, _behind, sw) = pair(&[], "");
    let digits = |n: usize| vec![b'1'; n];
    let mut count = b"*".to_vec();
    count.extend(digits(65_536));
    let t = same(&redis, &sw, &count);
    assert_eq!(
        t.bytes,
        b"-ERR Protocol error: too big mbulk count string\r\n"
    );
    let mut bulk = b"*1\r\n$".to_vec();
    bulk.extend(digits(65_536));
    let t = same(&redis, &sw, &bulk);
    assert_eq!(
        t.bytes,
        b"-ERR Protocol error: too big bulk count string\r\n"
    );
    let mut count = b"*".to_vec();
    count.extend(digits(70_000));
    count.extend_from_slice(b"\r\n");
    let t = same(&redis, &sw, &count);
    assert_eq!(
        t.bytes,
        b"-ERR Protocol error: invalid multibulk length\r\n"
    );
    let mut bulk = b"*1\r\n$".to_vec();
    bulk.extend(digits(70_000));
    bulk.extend_from_slice(b"\r\n");
    let t = same(&redis, &sw, &bulk);
    assert_eq!(t.bytes, b"-ERR Protocol error: invalid bulk length\r\n");
}

/// A script returning a table nested `depth` deep: `{{{…{1}…}}}`.
fn nested_eval(depth: usize) -> Vec<u8> {
    let script = format!("local t = {{1}} for i = 2, {depth} do t = {{t}} end return t");
    common::encode_cmd(&[b"EVAL", script.as_bytes(), b"0"])
}

#[test]
fn deeply_nested_script_replies_pass_and_the_connection_stays_usable() {
    // Before: max_reply_depth = 128 turned a 129-deep reply into an error and a closed
    // connection.
    let (redis, _behind, sw) = pair(&[], "");
    for depth in [129, 1_000, 5_000] {
        let mut input = nested_eval(depth);
        input.extend_from_slice(b"PING\r\n");
        let t = same(&redis, &sw, &input);
        assert!(t.bytes.starts_with(b"*1\r\n*1\r\n"), "{}", shown(&t.bytes));
        assert!(t.bytes.ends_with(b":1\r\n+PONG\r\n"), "{}", shown(&t.bytes));
        assert_eq!(t.bytes.windows(4).filter(|w| w == b"*1\r\n").count(), depth);
    }
    // Past Lua's own stack (~8,000 levels) Redis sends nested arrays ending in an error
    // element: passed through like the rest.
    let mut input = nested_eval(20_000);
    input.extend_from_slice(b"PING\r\n");
    let t = same(&redis, &sw, &input);
    let text = String::from_utf8_lossy(&t.bytes);
    assert!(
        text.contains("reached lua stack limit"),
        "{}",
        shown(&t.bytes)
    );
    assert!(t.bytes.ends_with(b"+PONG\r\n"));
}
