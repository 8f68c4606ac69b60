//! Fuzz target: the request framer (`resp::request::RequestParser`).
//!
//! Properties checked, beyond "no panic":
//! - the same bytes split at arbitrary points give the same requests and the same error
//!   (with the buffer end never taken for the end of a Redis read, the outcome is a function
//!   of the bytes alone);
//! - with short reads (the session's default), a split may only make an over-long line fail
//!   earlier, as a short read makes Redis judge it earlier; nothing else changes;
//! - every multibulk request that `redis-protocol`'s decoder also reads as an array of bulk
//!   strings has the same length and the same arguments;
//! - reported lengths and argument ranges stay inside the buffer.
//!
//! Input layout: byte 0 = flags (bit 0: unauthenticated, bit 1: small limits), bytes 1..9 =
//! the seed of the split points, the rest = the client's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis_protocol::resp2::types::OwnedFrame;
use stormwall::resp::ProtocolError;
use stormwall::resp::request::{Parsed, RequestLimits, RequestParser};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    requests: Vec<(usize, Vec<Vec<u8>>)>,
    end: Result<usize, ProtocolError>,
}

fn feed(parser: &mut RequestParser, input: &[u8], mut seed: u64) -> Outcome {
    let (mut start, mut have) = (0, 0);
    let mut requests = Vec::new();
    while have < input.len() {
        let step = if seed == 0 {
            input.len()
        } else {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            1 + (seed % 64) as usize
        };
        have = (have + step).min(input.len());
        loop {
            let buf = &input[start..have];
            match parser.parse(buf) {
                Ok(Some(parsed)) => {
                    assert!(parsed.len() > 0 && parsed.len() <= buf.len());
                    let args = match &parsed {
                        Parsed::Multibulk { .. } => {
                            let cmd = parser.command(buf);
                            (0..cmd.argc())
                                .map(|i| cmd.arg(i).expect("argument in range").to_vec())
                                .collect()
                        }
                        Parsed::Inline { args, .. } => args.clone(),
                        Parsed::Empty { .. } => Vec::new(),
                    };
                    if let Parsed::Multibulk { len } = parsed {
                        agrees_with_redis_protocol(&buf[..len], &args);
                    }
                    requests.push((parsed.len(), args));
                    start += parsed.len();
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        requests,
                        end: Err(e),
                    };
                }
            }
        }
    }
    Outcome {
        requests,
        end: Ok(input.len() - start),
    }
}

/// Where `redis-protocol` reads the same bytes as an array of bulk strings, it must find
/// the same frame. (Redis, and so stormwall, also accepts things it rejects, such as any
/// two bytes after a bulk's data: those are skipped.)
fn agrees_with_redis_protocol(frame: &[u8], args: &[Vec<u8>]) {
    let Ok(Some((OwnedFrame::Array(items), len))) = redis_protocol::resp2::decode::decode(frame)
    else {
        return;
    };
    let theirs: Option<Vec<Vec<u8>>> = items
        .into_iter()
        .map(|f| match f {
            OwnedFrame::BulkString(b) => Some(b),
            _ => None,
        })
        .collect();
    if let Some(theirs) = theirs {
        assert_eq!(
            len,
            frame.len(),
            "frame length differs from redis-protocol's"
        );
        assert_eq!(theirs, args, "arguments differ from redis-protocol's");
    }
}

fn too_big(o: &Outcome) -> bool {
    matches!(&o.end, Err(e) if e.text().starts_with("too big"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let seed = u64::from_le_bytes(data[1..9].try_into().expect("8 bytes")) | 1;
    let input = &data[9..];
    let limits = if flags & 2 != 0 {
        RequestLimits {
            max_bulk_len: 64,
            max_array_len: 8,
            max_request_bytes: 1 << 20,
        }
    } else {
        RequestLimits {
            max_bulk_len: 512 << 20,
            max_array_len: i32::MAX as u64,
            max_request_bytes: 1 << 30,
        }
    };
    let parser = |caught_up: bool| {
        let mut p = RequestParser::new(limits);
        p.set_unauthenticated(flags & 1 != 0);
        p.set_caught_up(caught_up);
        p
    };
    let whole = feed(&mut parser(false), input, 0);
    let split = feed(&mut parser(false), input, seed);
    assert_eq!(whole, split, "a split changed the outcome");

    let whole = feed(&mut parser(true), input, 0);
    let split = feed(&mut parser(true), input, seed);
    if too_big(&split) && !too_big(&whole) {
        assert!(split.requests.len() <= whole.requests.len());
        assert_eq!(split.requests[..], whole.requests[..split.requests.len()]);
    } else {
        assert_eq!(
            whole, split,
            "a split changed more than an over-long line's fate"
        );
    }
});
