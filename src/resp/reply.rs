//! Reply framing: where each RESP2/RESP3 frame from Redis ends, and whether it is a push.
//!
//! Replies are matched to requests by counting, so the scanner must find exact frame
//! boundaries for every type Redis can send — including RESP3 maps, sets, attributes (which
//! prefix a reply without being one) and push frames (`>`: client-tracking invalidations and
//! pub/sub messages, which answer no request and must never be counted as a reply).
//!
//! Like the request parser it is resumable: state is kept between calls, and every call
//! passes a slice that starts at the first byte of the unfinished frame.
//!
//! There is no nesting limit, because Redis has none of its own: a Lua script can return a
//! table nested 129 deep, or thousands deep (until Lua's own stack gives out around 8,000
//! levels), and Redis sends it. The scanner walks nested aggregates with an explicit stack of
//! open levels instead of recursion, so depth costs no call stack; each level was opened by
//! a header of at least four bytes (`*1\r\n`) of the frame being held, so the stack stays
//! smaller than the frame itself and memory is bounded in bytes like everything else.

use super::{ProtocolError, parse_int};

/// What a complete frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A reply to a request.
    Reply,
    /// An out-of-band RESP3 push (`>`), forwarded but answering nothing.
    Push,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    remaining: u64,
    /// An attribute map, which does not count as an element of its parent.
    attribute: bool,
}

/// Resumable reply frame scanner, for any nesting depth.
#[derive(Debug)]
pub struct ReplyScanner {
    max_bulk_len: u64,
    pos: usize,
    stack: Vec<Level>,
    kind: FrameKind,
}

impl ReplyScanner {
    /// `max_bulk_len`: the longest bulk string (or line) accepted in a reply.
    pub fn new(max_bulk_len: u64) -> ReplyScanner {
        ReplyScanner {
            max_bulk_len,
            pos: 0,
            stack: Vec::new(),
            kind: FrameKind::Reply,
        }
    }

    /// Finds the end of the frame at the start of `buf`. `Ok(None)` means more bytes are
    /// needed; `Ok(Some((len, kind)))` means `buf[..len]` is one whole frame.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<(usize, FrameKind)>, ProtocolError> {
        loop {
            let Some(&tag) = buf.get(self.pos) else {
                return Ok(None);
            };
            let line_start = self.pos + 1;
            let Some(cr) = find_crlf(&buf[line_start..]) else {
                if (buf.len() - line_start) as u64 > self.max_bulk_len {
                    return Err(self.fail("reply line too long"));
                }
                return Ok(None);
            };
            let line = &buf[line_start..line_start + cr];
            let after = line_start + cr + 2;
            if self.stack.is_empty() && tag != b'|' {
                self.kind = if tag == b'>' {
                    FrameKind::Push
                } else {
                    FrameKind::Reply
                };
            }
            let mut attribute_done = false;
            match tag {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => self.pos = after,
                b'$' | b'!' | b'=' => match parse_int(line) {
                    Some(-1) if tag == b'$' => self.pos = after,
                    Some(n) if n >= 0 && n as u64 <= self.max_bulk_len => {
                        let end = after + n as usize;
                        if end + 2 > buf.len() {
                            return Ok(None);
                        }
                        if &buf[end..end + 2] != b"\r\n" {
                            return Err(self.fail("bulk reply not terminated by CRLF"));
                        }
                        self.pos = end + 2;
                    }
                    _ => return Err(self.fail("invalid bulk length in reply")),
                },
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = match parse_int(line) {
                        Some(-1) if tag == b'*' => 0,
                        Some(n) if n >= 0 => n as u64,
                        _ => return Err(self.fail("invalid aggregate length in reply")),
                    };
                    let count = if matches!(tag, b'%' | b'|') {
                        n.saturating_mul(2)
                    } else {
                        n
                    };
                    self.pos = after;
                    if count > 0 {
                        self.stack.push(Level {
                            remaining: count,
                            attribute: tag == b'|',
                        });
                        continue;
                    }
                    attribute_done = tag == b'|';
                }
                _ => return Err(self.fail("unknown reply type byte")),
            }
            // One element finished; close every aggregate it completes.
            if !attribute_done {
                while let Some(top) = self.stack.last_mut() {
                    top.remaining -= 1;
                    if top.remaining > 0 {
                        break;
                    }
                    let was_attribute = top.attribute;
                    self.stack.pop();
                    if was_attribute {
                        attribute_done = true;
                        break;
                    }
                }
            }
            // An attribute prefixes the element after it, so the frame is not over yet.
            if self.stack.is_empty() && !attribute_done {
                let len = self.pos;
                self.pos = 0;
                return Ok(Some((len, self.kind)));
            }
        }
    }

    fn fail(&mut self, what: &'static str) -> ProtocolError {
        self.pos = 0;
        self.stack.clear();
        ProtocolError::Reply(what.as_bytes().into())
    }
}

/// Where the first `\r\n` starts. (A plain `memchr` for `\r` plus a look at the next byte:
/// several times faster per line than a substring search, which sets up a searcher per call.)
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\r', &buf[from..]) {
        let at = from + i;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<(usize, FrameKind)> {
        let mut s = ReplyScanner::new(1 << 20);
        let (mut at, mut out) = (0, Vec::new());
        while let Some((len, kind)) = s.next(&input[at..]).unwrap() {
            out.push((len, kind));
            at += len;
        }
        assert_eq!(at, input.len(), "unparsed tail");
        out
    }

    #[test]
    fn resp2_types() {
        let input = b"+OK\r\n-ERR x\r\n:5\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n*0\r\n*2\r\n$1\r\na\r\n*1\r\n:1\r\n";
        assert_eq!(frames(input).len(), 8);
    }

    #[test]
    fn resp3_types_and_push() {
        let input = b"_\r\n,1.5\r\n#t\r\n(123\r\n!3\r\nerr\r\n=7\r\ntxt:abc\r\n\
            %1\r\n+k\r\n:1\r\n~2\r\n:1\r\n:2\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n";
        let got = frames(input);
        assert_eq!(got.len(), 9);
        assert_eq!(got[8].1, FrameKind::Push);
        assert!(got[..8].iter().all(|f| f.1 == FrameKind::Reply));
    }

    #[test]
    fn attributes_prefix_a_reply() {
        // An attribute then the reply it annotates: one frame. Inside an array the attribute
        // does not count as an element.
        let input = b"|1\r\n+ttl\r\n:3\r\n:42\r\n*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n";
        let got = frames(input);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 19);
    }

    #[test]
    fn resumes_byte_by_byte() {
        let input = b"*3\r\n$5\r\nhello\r\n%1\r\n+a\r\n*1\r\n:1\r\n>1\r\n+x\r\n+OK\r\n";
        let whole = frames(input);
        let mut s = ReplyScanner::new(1 << 20);
        let (mut start, mut got) = (0, Vec::new());
        for end in 1..=input.len() {
            if let Some((len, kind)) = s.next(&input[start..end]).unwrap() {
                got.push((len, kind));
                start += len;
            }
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn any_depth_without_recursion() {
        // Deeper than any call stack would allow, and the stack of open levels stays far
        // smaller than the frame it describes.
        let depth = 200_000;
        let mut input = b"*1\r\n".repeat(depth);
        input.extend_from_slice(b":1\r\n+OK\r\n");
        let got = frames(&input);
        assert_eq!(
            got,
            vec![(depth * 4 + 4, FrameKind::Reply), (5, FrameKind::Reply)]
        );
        // Resumed at every byte, a 2,000-deep mixed frame gives the same boundary.
        let mut nested = b"*2\r\n%1\r\n+k\r\n".repeat(2_000);
        nested.extend_from_slice(b":1\r\n");
        nested.extend(b"$1\r\nx\r\n".repeat(2_000));
        let whole = frames(&nested);
        assert_eq!(whole, vec![(nested.len(), FrameKind::Reply)]);
        let mut s = ReplyScanner::new(1 << 20);
        let mut got = None;
        for end in 1..=nested.len() {
            if let Some(frame) = s.next(&nested[..end]).unwrap() {
                got = Some(frame);
                break;
            }
        }
        assert_eq!(got, Some(whole[0]));
    }

    #[test]
    fn crlf_search_skips_lone_carriage_returns() {
        assert_eq!(find_crlf(b"ab\r\n"), Some(2));
        assert_eq!(find_crlf(b"a\rb\r\n"), Some(3));
        assert_eq!(find_crlf(b"ab\r"), None);
        assert_eq!(find_crlf(b"ab"), None);
    }

    #[test]
    fn limits_and_garbage() {
        let mut s = ReplyScanner::new(10);
        assert!(s.next(b"$11\r\n").is_err());
        assert!(s.next(b"?\r\n").is_err());
        assert!(s.next(b"$3\r\nabcXY").is_err());
        assert!(s.next(b"*-2\r\n").is_err());
    }

    #[test]
    fn agrees_with_redis_protocol_resp3() {
        use redis_protocol::resp3::decode::complete::decode;
        let inputs: [&[u8]; 4] = [
            b"%2\r\n+a\r\n*2\r\n:1\r\n:2\r\n+b\r\n_\r\n",
            b">2\r\n+invalidate\r\n*1\r\n$3\r\nkey\r\n",
            b"~3\r\n,1.5\r\n#f\r\n(99999999999999999999\r\n",
            b"*2\r\n=8\r\ntxt:abcd\r\n!4\r\nOOPS\r\n",
        ];
        for input in inputs {
            let (_, theirs) = decode(input).unwrap().unwrap();
            let mut s = ReplyScanner::new(1 << 20);
            assert_eq!(s.next(input).unwrap().unwrap().0, theirs);
        }
    }
}
