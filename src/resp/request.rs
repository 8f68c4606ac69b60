//! Request framing: one client command at a time, as Redis itself frames them.
//!
//! Two forms exist. Multibulk (`*N\r\n$len\r\narg\r\n…`) is what every client library sends;
//! its arguments are recorded as byte ranges into the caller's buffer. Inline (`GET k\r\n`)
//! is what `telnet` and `redis-cli`'s raw mode send; it is rare, so its arguments are copied
//! out, which keeps the multibulk path allocation-free.
//!
//! The parser keeps its position between calls, so a request arriving in many reads is
//! scanned once. Contract with the caller: every call passes a slice that *starts at the
//! first byte of the unfinished request* (complete requests are consumed by the caller).

use std::ops::Range;

use super::{ProtocolError, parse_int};

/// Longest inline request or `*N`/`$N` header line Redis accepts (`PROTO_INLINE_MAX_SIZE`).
const MAX_LINE: usize = 64 * 1024;

/// What one client may make the parser buffer (see `LimitsConfig`).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_bulk_len: u64,
    pub max_array_len: u64,
    pub max_request_bytes: u64,
}

/// One complete request at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A multibulk command of `len` bytes; its arguments are in [`RequestParser::command`].
    Multibulk { len: usize },
    /// An inline command of `len` bytes; arguments copied out (quotes and escapes resolved).
    Inline { len: usize, args: Vec<Vec<u8>> },
    /// `len` bytes Redis reads and ignores without replying (`*0`, `*-1`, an empty line).
    Empty { len: usize },
}

impl Parsed {
    #[allow(clippy::len_without_is_empty)] // a request is never empty; `Empty` is a variant
    pub fn len(&self) -> usize {
        match self {
            Parsed::Multibulk { len } | Parsed::Inline { len, .. } | Parsed::Empty { len } => *len,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Nothing of the next request seen yet.
    Start,
    /// Inside a multibulk request: `pos` is where the next argument header starts.
    Args { pos: usize, remaining: u64 },
}

/// Resumable multibulk/inline request parser.
#[derive(Debug)]
pub struct RequestParser {
    limits: RequestLimits,
    state: State,
    args: Vec<Range<usize>>,
}

/// A parsed command's arguments, borrowed from the buffer (multibulk) or the parse (inline).
#[derive(Debug, Clone, Copy)]
pub enum Command<'a> {
    Multibulk {
        buf: &'a [u8],
        args: &'a [Range<usize>],
    },
    Inline {
        args: &'a [Vec<u8>],
    },
}

impl<'a> Command<'a> {
    pub fn argc(&self) -> usize {
        match self {
            Command::Multibulk { args, .. } => args.len(),
            Command::Inline { args } => args.len(),
        }
    }

    /// Argument `i` (0 is the command name), if present.
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        match *self {
            Command::Multibulk { buf, args } => args.get(i).map(|r| &buf[r.clone()]),
            Command::Inline { args } => args.get(i).map(|a| a.as_slice()),
        }
    }
}

impl RequestParser {
    pub fn new(limits: RequestLimits) -> RequestParser {
        RequestParser {
            limits,
            state: State::Start,
            args: Vec::new(),
        }
    }

    /// The arguments of the multibulk request last returned by [`parse`](Self::parse).
    /// `buf` must be the slice that was passed to that call.
    pub fn command<'a>(&'a self, buf: &'a [u8]) -> Command<'a> {
        Command::Multibulk {
            buf,
            args: &self.args,
        }
    }

    /// Parses the request at the start of `buf`. `Ok(None)` means more bytes are needed.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<Parsed>, ProtocolError> {
        if let State::Start = self.state {
            match buf.first() {
                None => return Ok(None),
                Some(b'*') => {}
                Some(_) => return parse_inline(buf),
            }
            let Some((n, next)) = header(buf, 0, "too big mbulk count string")? else {
                return Ok(None);
            };
            let n = n.ok_or(ProtocolError("invalid multibulk length".into()))?;
            if n <= 0 {
                return Ok(Some(Parsed::Empty { len: next }));
            }
            if n as u64 > self.limits.max_array_len {
                return Err(ProtocolError(
                    format!(
                        "invalid multibulk length ({n} arguments exceed stormwall's limits.max_array_len = {})",
                        self.limits.max_array_len
                    )
                    .into(),
                ));
            }
            self.args.clear();
            self.state = State::Args {
                pos: next,
                remaining: n as u64,
            };
        }
        let State::Args { pos, remaining } = &mut self.state else {
            unreachable!("state is Args after the Start branch");
        };
        while *remaining > 0 {
            let Some(&tag) = buf.get(*pos) else {
                return Ok(None);
            };
            if tag != b'$' {
                let shown = if tag.is_ascii_graphic() {
                    tag as char
                } else {
                    '?'
                };
                self.state = State::Start;
                return Err(ProtocolError(format!("expected '$', got '{shown}'").into()));
            }
            let Some((n, start)) = header(buf, *pos, "too big bulk count string")? else {
                return Ok(None);
            };
            let len = match n {
                Some(n) if n >= 0 && n as u64 <= self.limits.max_bulk_len => n as usize,
                Some(n) if n > 0 => {
                    return Err(ProtocolError(
                        format!(
                            "invalid bulk length ({n} bytes exceed stormwall's limits.max_bulk_len = {})",
                            self.limits.max_bulk_len
                        )
                        .into(),
                    ));
                }
                _ => return Err(ProtocolError("invalid bulk length".into())),
            };
            // Checked before waiting for the bytes, so the declared size is never buffered.
            let end = start + len;
            if (end + 2) as u64 > self.limits.max_request_bytes {
                return Err(ProtocolError(
                    format!(
                        "request too large (more than stormwall's limits.max_request_bytes = {})",
                        self.limits.max_request_bytes
                    )
                    .into(),
                ));
            }
            if end + 2 > buf.len() {
                return Ok(None);
            }
            // Like Redis, the two bytes after the payload are skipped, not checked.
            self.args.push(start..end);
            *pos = end + 2;
            *remaining -= 1;
        }
        let len = *pos;
        self.state = State::Start;
        Ok(Some(Parsed::Multibulk { len }))
    }

    /// Forgets a partially parsed request (after an error the connection is closed anyway,
    /// but a fresh state keeps the parser reusable).
    pub fn reset(&mut self) {
        self.state = State::Start;
    }
}

/// Parses a `*N\r\n` / `$N\r\n` header at `at`. Like Redis: the line ends at the first `\r`,
/// which must be followed by one more byte (skipped). Returns the number (None if it is not
/// one) and where the next field starts, or `Ok(None)` if the line is incomplete.
fn header(
    buf: &[u8],
    at: usize,
    too_big: &'static str,
) -> Result<Option<(Option<i64>, usize)>, ProtocolError> {
    let line = &buf[at + 1..];
    match line_end(b'\r', line) {
        None if line.len() > MAX_LINE => Err(ProtocolError(too_big.into())),
        Some(cr) if cr > MAX_LINE => Err(ProtocolError(too_big.into())),
        None => Ok(None),
        Some(cr) if cr + 2 > line.len() => Ok(None),
        Some(cr) => Ok(Some((parse_int(&line[..cr]), at + 1 + cr + 2))),
    }
}

/// Where `delim` first occurs, as Redis's `strchr` finds it: a NUL byte ends the search, so
/// a line with a NUL before its end is treated as unfinished (Redis waits for more, and only
/// complains once the 64 KiB line limit is passed) rather than as a complete command.
fn line_end(delim: u8, buf: &[u8]) -> Option<usize> {
    memchr::memchr2(delim, 0, buf).filter(|&i| buf[i] == delim)
}

fn parse_inline(buf: &[u8]) -> Result<Option<Parsed>, ProtocolError> {
    let Some(nl) = line_end(b'\n', buf) else {
        if buf.len() > MAX_LINE {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(None);
    };
    if nl > MAX_LINE {
        return Err(ProtocolError("too big inline request".into()));
    }
    let mut line = &buf[..nl];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    let args = split_args(line).ok_or(ProtocolError("unbalanced quotes in request".into()))?;
    let len = nl + 1;
    Ok(Some(if args.is_empty() {
        Parsed::Empty { len }
    } else {
        Parsed::Inline { len, args }
    }))
}

/// Splits an inline request into arguments exactly as Redis's `sdssplitargs` does: blanks
/// separate, `"…"` understands `\n \r \t \b \a \xHH` escapes, `'…'` only `\'`, and a closing
/// quote must be followed by a blank. `None` on unbalanced quotes. A NUL byte ends the line,
/// as it does for the C string Redis scans.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let is_space = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::new();
    let mut p = 0;
    loop {
        while at(p) != 0 && is_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Some(out);
        }
        // Inside quotes: the quote byte that opened them.
        let mut quote: Option<u8> = None;
        let mut cur = Vec::new();
        loop {
            let c = at(p);
            let Some(q) = quote else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => break,
                    b'"' | b'\'' => quote = Some(c),
                    _ => cur.push(c),
                }
                p += 1;
                continue;
            };
            let (h1, h2) = (hex(at(p + 2)), hex(at(p + 3)));
            if q == b'"' && c == b'\\' && at(p + 1) == b'x' && h1.is_some() && h2.is_some() {
                cur.push(h1? * 16 + h2?);
                p += 3;
            } else if q == b'"' && c == b'\\' && at(p + 1) != 0 {
                p += 1;
                cur.push(match at(p) {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'a' => 0x07,
                    other => other,
                });
            } else if q == b'\'' && c == b'\\' && at(p + 1) == b'\'' {
                p += 1;
                cur.push(b'\'');
            } else if c == q {
                // A closing quote must be followed by a blank or the end.
                if at(p + 1) != 0 && !is_space(at(p + 1)) {
                    return None;
                }
                p += 1;
                break;
            } else if c == 0 {
                return None;
            } else {
                cur.push(c);
            }
            p += 1;
        }
        out.push(cur);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_bulk_len: 1024,
        max_array_len: 16,
        max_request_bytes: 4096,
    };

    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut p = RequestParser::new(LIMITS);
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(parsed) = p.parse(&input[at..])? {
            match &parsed {
                Parsed::Multibulk { .. } => {
                    let cmd = p.command(&input[at..]);
                    out.push(
                        (0..cmd.argc())
                            .map(|i| cmd.arg(i).unwrap().to_vec())
                            .collect(),
                    );
                }
                Parsed::Inline { args, .. } => out.push(args.clone()),
                Parsed::Empty { .. } => {}
            }
            at += parsed.len();
        }
        assert_eq!(at, input.len(), "trailing bytes left unparsed");
        Ok(out)
    }

    fn err(input: &[u8]) -> String {
        parse_all(input).unwrap_err().0.into_owned()
    }

    #[test]
    fn multibulk_pipeline() {
        let got =
            parse_all(b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n").unwrap();
        assert_eq!(
            got,
            vec![
                vec![b"PING".to_vec()],
                vec![b"SET".to_vec(), b"k".to_vec(), vec![]]
            ]
        );
    }

    #[test]
    fn empty_requests_are_consumed_silently() {
        assert_eq!(
            parse_all(b"*0\r\n*-1\r\n\r\n   \n").unwrap(),
            Vec::<Vec<Vec<u8>>>::new()
        );
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let input = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n";
        let whole = parse_all(input).unwrap();
        let mut p = RequestParser::new(LIMITS);
        let (mut start, mut got) = (0, Vec::new());
        for end in 1..=input.len() {
            if let Some(parsed) = p.parse(&input[start..end]).unwrap() {
                got.push(parsed.len());
                start += parsed.len();
            }
        }
        assert_eq!(start, input.len());
        assert_eq!(got.len(), whole.len());
    }

    #[test]
    fn redis_error_texts() {
        assert_eq!(err(b"*x\r\n"), "invalid multibulk length");
        assert!(err(b"*17\r\n").starts_with("invalid multibulk length"));
        assert_eq!(err(b"*1\r\n:1\r\n"), "expected '$', got ':'");
        assert_eq!(err(b"*1\r\n$-1\r\n"), "invalid bulk length");
        assert_eq!(err(b"*1\r\n$abc\r\n"), "invalid bulk length");
        assert!(err(b"*1\r\n$2000\r\n").starts_with("invalid bulk length"));
        assert_eq!(err(b"SET \"a\r\n"), "unbalanced quotes in request");
        let long = vec![b'a'; MAX_LINE + 10];
        assert_eq!(err(&long), "too big inline request");
        let mut long_header = b"*".to_vec();
        long_header.extend(vec![b'1'; MAX_LINE + 10]);
        assert_eq!(err(&long_header), "too big mbulk count string");
    }

    #[test]
    fn request_size_limit_is_checked_before_buffering() {
        let mut p = RequestParser::new(LIMITS);
        // Each argument fits max_bulk_len, but together they exceed max_request_bytes; the
        // error comes at the header of the argument that would cross it.
        let mut input = b"*5\r\n".to_vec();
        for _ in 0..4 {
            input.extend_from_slice(b"$1000\r\n");
            input.extend(vec![b'x'; 1000]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"$1000\r\n");
        assert!(p.parse(&input).unwrap_err().0.contains("max_request_bytes"));
    }

    #[test]
    fn nul_ends_the_search_for_a_line_end_like_strchr() {
        let mut p = RequestParser::new(LIMITS);
        assert_eq!(p.parse(b"GET a\0b\r\nPING\r\n").unwrap(), None);
        assert_eq!(p.parse(b"*1\0\r\n").unwrap(), None);
        let mut long = b"GET a\0".to_vec();
        long.extend(vec![b'x'; MAX_LINE + 1]);
        assert_eq!(err(&long), "too big inline request");
    }

    #[test]
    fn inline_split_like_sdssplitargs() {
        assert_eq!(
            split_args(b"set  k   v").unwrap(),
            vec![b"set".to_vec(), b"k".to_vec(), b"v".to_vec()]
        );
        assert_eq!(
            split_args(br#"set "a b\x41\n" 'it\'s'"#).unwrap(),
            vec![b"set".to_vec(), b"a bA\n".to_vec(), b"it's".to_vec()]
        );
        assert_eq!(split_args(br#"get "a"b"#), None);
        assert_eq!(split_args(b"get 'a"), None);
        assert_eq!(split_args(b"").unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn agrees_with_redis_protocol_on_boundaries() {
        // Valid multibulk requests: our frame length must equal redis-protocol's.
        use redis_protocol::resp2::{encode::encode, types::OwnedFrame, types::Resp2Frame};
        for argc in 1..8usize {
            let frame = OwnedFrame::Array(
                (0..argc)
                    .map(|i| OwnedFrame::BulkString(vec![b'a' + i as u8; i * 37 % 200]))
                    .collect(),
            );
            let mut bytes = vec![0; frame.encode_len(false)];
            encode(&mut bytes, &frame, false).unwrap();
            let (_, theirs) = redis_protocol::resp2::decode::decode(&bytes)
                .unwrap()
                .unwrap();
            let ours = RequestParser::new(LIMITS)
                .parse(&bytes)
                .unwrap()
                .unwrap()
                .len();
            assert_eq!(ours, theirs);
        }
    }
}
