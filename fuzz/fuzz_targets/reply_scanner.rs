//! Fuzz target: the reply scanner (`resp::reply::ReplyScanner`).
//!
//! Properties checked, beyond "no panic":
//! - the same bytes split at arbitrary points give the same frames (length and kind) and
//!   the same error;
//! - where `redis-protocol`'s RESP3 decoder also reads a complete frame, it has the same
//!   length;
//! - any nesting depth is framed (flag bit 0 wraps the input in up to 1,999 one-element
//!   arrays), without recursion.
//!
//! Input layout: byte 0 = flags, bytes 1..3 = nesting depth, bytes 3..11 = split seed, the
//! rest = what Redis sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stormwall::resp::ProtocolError;
use stormwall::resp::reply::{FrameKind, ReplyScanner};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<(usize, FrameKind)>,
    end: Result<usize, ProtocolError>,
}

fn scan(input: &[u8], mut seed: u64) -> Outcome {
    let mut s = ReplyScanner::new(1 << 20);
    let (mut start, mut have) = (0, 0);
    let mut frames = Vec::new();
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
            match s.next(&input[start..have]) {
                Ok(Some((len, kind))) => {
                    assert!(len > 0 && start + len <= have);
                    frames.push((len, kind));
                    start += len;
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        end: Err(e),
                    };
                }
            }
        }
    }
    Outcome {
        frames,
        end: Ok(input.len() - start),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 11 {
        return;
    }
    let flags = data[0];
    let depth = u16::from_le_bytes([data[1], data[2]]) as usize % 2_000;
    let seed = u64::from_le_bytes(data[3..11].try_into().expect("8 bytes")) | 1;
    let mut input = Vec::new();
    if flags & 1 != 0 {
        for _ in 0..depth {
            input.extend_from_slice(b"*1\r\n");
        }
    }
    input.extend_from_slice(&data[11..]);

    let whole = scan(&input, 0);
    assert_eq!(whole, scan(&input, seed), "a split changed the outcome");

    // Compare each frame we found with redis-protocol's reading of the same bytes (its
    // decoder recurses, so only where the nesting stays shallow enough for it).
    if flags & 1 != 0 && depth > 64 {
        return;
    }
    let mut at = 0;
    for &(len, _) in &whole.frames {
        if let Ok(Some((_, theirs))) =
            redis_protocol::resp3::decode::complete::decode(&input[at..at + len])
        {
            assert_eq!(theirs, len, "frame at {at} differs from redis-protocol's");
        }
        at += len;
    }
});
