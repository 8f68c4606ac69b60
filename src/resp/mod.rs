//! RESP framing for a proxy: where frames end, what command a request is, and the few replies
//! stormwall writes itself.
//!
//! A proxy forwards bytes; it only needs to know where each frame ends and, for requests, the
//! command name and arguments. So instead of building frame trees (which allocate a `Vec` per
//! array), the scanners here walk the buffer in place and record argument *ranges* into a
//! reused vector: zero allocations per command in steady state. They are resumable — a frame
//! that arrives in pieces is not rescanned from its start — and they enforce the configured
//! limits *before* buffering, so a declared length of 4 GiB is rejected, never reserved.
//!
//! Request framing follows Redis's own `processMultibulkBuffer`/`processInlineBuffer`
//! byte for byte (same accepted inputs, same error texts), so a client cannot tell the two
//! apart. `redis-protocol` is the reference: the unit tests check these scanners against its
//! decoder, and local replies are encoded with it.

mod querybuf;
pub mod reply;
pub mod request;

use std::borrow::Cow;

use bytes::Bytes;
use redis_protocol::resp2::types::{OwnedFrame, Resp2Frame};

/// A client or upstream sent bytes that are not valid RESP (or exceed a configured limit),
/// and what Redis does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// Redis answers `-ERR Protocol error: <text>` and closes the connection. The text is
    /// bytes: Redis quotes the offending byte as it came (`expected '$', got '\xff'`).
    Reply(Cow<'static, [u8]>),
    /// Redis closes the connection without an answer, as it does to a client past its
    /// `client-query-buffer-limit`. The text is for logs only.
    Close(&'static str),
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtocolError::Reply(text) => {
                write!(f, "Protocol error: {}", String::from_utf8_lossy(text))
            }
            ProtocolError::Close(why) => write!(f, "{why} (connection closed without a reply)"),
        }
    }
}

impl std::error::Error for ProtocolError {}

impl ProtocolError {
    /// The bytes a client gets before its connection is closed: Redis's error reply, or
    /// nothing at all for [`ProtocolError::Close`].
    pub fn to_reply(&self) -> Bytes {
        match self {
            ProtocolError::Reply(text) => {
                let mut out = b"-ERR Protocol error: ".to_vec();
                // CR/LF would end the frame early; Redis maps them to spaces.
                out.extend(text.iter().map(|&b| match b {
                    b'\r' | b'\n' => b' ',
                    b => b,
                }));
                out.extend_from_slice(b"\r\n");
                Bytes::from(out)
            }
            ProtocolError::Close(_) => Bytes::new(),
        }
    }

    /// The text after `Protocol error: ` (or the log reason of a close), for tests and logs.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            ProtocolError::Reply(text) => String::from_utf8_lossy(text),
            ProtocolError::Close(why) => Cow::Borrowed(why),
        }
    }
}

/// Appends a command as a RESP array of bulk strings: the form Redis runs any command in,
/// for what stormwall sends itself (the shield's batches, re-encoded inline requests).
pub fn encode_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Encodes a RESP error reply. `msg` starts with the error code (`ERR`, `BUSY`, …); line
/// breaks are replaced because they would end the frame early.
pub fn error_reply(msg: &str) -> Bytes {
    let clean: String = msg
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    encode(&OwnedFrame::Error(clean))
}

fn encode(frame: &OwnedFrame) -> Bytes {
    let mut buf = vec![0; frame.encode_len(false)];
    match redis_protocol::resp2::encode::encode(&mut buf, frame, false) {
        Ok(n) => {
            buf.truncate(n);
            Bytes::from(buf)
        }
        // Encoding an in-memory frame only fails on a bug; say so rather than send garbage.
        Err(_) => Bytes::from_static(b"-ERR stormwall: internal error encoding a reply\r\n"),
    }
}

/// Parses a RESP integer the way Redis's `string2ll` does: optional `-`, no `+`, no leading
/// zeros, no spaces, must fit in an `i64`.
pub(crate) fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits {
        [b'0'] if !neg => return Some(0),
        [b'1'..=b'9', ..] if digits.len() <= 19 => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        0i64.checked_sub_unsigned(v)
    } else {
        i64::try_from(v).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_like_redis() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"42"), Some(42));
        assert_eq!(parse_int(b"-1"), Some(-1));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1a",
            b"9223372036854775808",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_int(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn error_replies_stay_one_line() {
        assert_eq!(&error_reply("ERR a\r\nb")[..], b"-ERR a  b\r\n");
        let e = ProtocolError::Reply(b"invalid bulk length"[..].into());
        assert_eq!(
            &e.to_reply()[..],
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
        assert!(ProtocolError::Close("too big").to_reply().is_empty());
    }
}
