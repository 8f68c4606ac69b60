//! Request framing: one client command at a time, exactly as Redis 7.0 frames them.
//!
//! Two forms exist. Multibulk (`*N\r\n$len\r\narg\r\n…`) is what every client library sends;
//! its arguments are recorded as byte ranges into the caller's buffer. Inline (`GET k\r\n`)
//! is what `telnet` and `redis-cli`'s raw mode send; it is rare, so its arguments are copied
//! out, which keeps the multibulk path allocation-free.
//!
//! The code follows `processMultibulkBuffer`/`processInlineBuffer` in Redis 7.0's
//! `networking.c` step for step, because a client must not be able to tell stormwall from
//! Redis: the same inputs are accepted, the same error texts come back, and they come at the
//! same point. In particular a line is judged only once it is complete (a stray byte where
//! `$` belongs is reported when its line has ended, like Redis), and an unfinished line over
//! 64 KiB is refused only where Redis's reads end (see [`super::querybuf`]), which is why
//! inline lines of up to 81,909 bytes pass on a fresh connection.
//!
//! The parser keeps its position between calls, so a request arriving in many reads is
//! scanned once. Contract with the caller: every call passes a slice that *starts at the
//! first byte of the unfinished request* (complete requests are consumed by the caller) and
//! holds every byte received after it.

use std::borrow::Cow;
use std::ops::Range;

use super::querybuf::{BIG_ARG, INLINE_MAX, QueryBuf};
use super::{ProtocolError, parse_int};

/// Redis's own ceiling on a multibulk count: a larger one is `invalid multibulk length`.
pub const MAX_MULTIBULK: u64 = i32::MAX as u64;
/// Before a client has authenticated (when Redis requires it), Redis refuses requests of more
/// than this many arguments …
const UNAUTH_MAX_ARGS: i64 = 10;
/// … and arguments longer than this (`processMultibulkBuffer`, Redis 7.0).
const UNAUTH_MAX_BULK: i64 = 16 * 1024;

/// What one client may make the parser buffer (see `LimitsConfig`). Where a limit is below
/// Redis's own, crossing it gets the answer Redis gives for the same kind of overflow.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Like `proto-max-bulk-len`: a longer argument is `invalid bulk length`.
    pub max_bulk_len: u64,
    /// Like Redis's `INT_MAX` ceiling: more arguments is `invalid multibulk length`.
    pub max_array_len: u64,
    /// Bytes of one request (what stormwall holds until it is complete). Past it the
    /// connection is closed without a reply, as Redis does past `client-query-buffer-limit`.
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

/// Redis's `reqtype`: decided by the first byte of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unknown,
    Inline,
    Multibulk,
}

/// Outcome of one pass over what is visible.
enum Step {
    Done(Parsed),
    /// More bytes are needed.
    More,
}

/// Where the modelled Redis reads are, as offsets in the client's whole byte stream.
#[derive(Debug)]
struct Reads {
    /// Offset of `buf[0]`, the first byte of the unfinished request.
    base: u64,
    /// Where the read in progress starts and (if every byte is there) ends.
    start: u64,
    end: u64,
    /// The first byte Redis still holds in its query buffer (it trims after each read).
    kept: u64,
    buf: QueryBuf,
    /// A bulk argument of `BIG_ARG` bytes or more completed in the read in progress: where
    /// it ended (CRLF included) and its length.
    big_done: Option<(u64, u64)>,
}

impl Reads {
    fn new() -> Reads {
        let mut buf = QueryBuf::default();
        let first = buf.next_read(0, None);
        Reads {
            base: 0,
            start: 0,
            end: first,
            kept: 0,
            buf,
            big_done: None,
        }
    }
}

/// Resumable multibulk/inline request parser.
#[derive(Debug)]
pub struct RequestParser {
    limits: RequestLimits,
    unauthenticated: bool,
    caught_up: bool,
    kind: Kind,
    /// Redis's `multibulklen`: arguments still to come (0 before the count line is read).
    remaining: u64,
    /// Redis's `bulklen`: the length of the argument whose header was read, if any.
    bulk: Option<u64>,
    /// Redis's `qb_pos`: where parsing continues, relative to the request's first byte.
    pos: usize,
    args: Vec<Range<usize>>,
    reads: Reads,
    /// Bytes of the unfinished line the last pass stopped in (0 if it did not).
    open_line: u64,
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
            Command::Multibulk { buf, args } => args.get(i).and_then(|r| buf.get(r.clone())),
            Command::Inline { args } => args.get(i).map(|a| a.as_slice()),
        }
    }
}

fn refuse(text: &'static str) -> ProtocolError {
    ProtocolError::Reply(Cow::Borrowed(text.as_bytes()))
}

impl RequestParser {
    pub fn new(limits: RequestLimits) -> RequestParser {
        RequestParser {
            limits,
            unauthenticated: false,
            caught_up: false,
            kind: Kind::Unknown,
            remaining: 0,
            bulk: None,
            pos: 0,
            args: Vec::new(),
            reads: Reads::new(),
            open_line: 0,
        }
    }

    /// Whether Redis would treat this client as not yet authenticated (Redis requires a
    /// password or the default user is off, and the client has not authenticated). While it
    /// is, requests of more than 10 arguments are refused with `Protocol error:
    /// unauthenticated multibulk length` and arguments over 16 KiB with `Protocol error:
    /// unauthenticated bulk length`, checked where Redis checks them (after its own count and
    /// length checks), so an unauthenticated client cannot make stormwall buffer more than
    /// Redis would. Default `false`; the session turns it on and off as Redis's replies
    /// (to `AUTH`, `HELLO … AUTH`, `RESET`) say. Takes effect from the next header parsed.
    pub fn set_unauthenticated(&mut self, unauthenticated: bool) {
        self.unauthenticated = unauthenticated;
    }

    /// Whether the client has stopped sending: the bytes passed to the next
    /// [`parse`](Self::parse) calls are all it sent. Redis looks at an unfinished line at the
    /// end of each of its reads, and a read ends early where the client's bytes end, so a
    /// line over 64 KiB that stops there is refused (`too big inline request`). With `false`
    /// (the default) the end of the buffer is never taken for the end of a read and only the
    /// reads Redis makes when every byte is already there count: the outcome then depends
    /// only on the bytes, never on how TCP split them. (A read that merely comes up short is
    /// no sign: a stream still arriving does that all the time, and Redis, reading less
    /// often and in larger pieces, mostly does not see it.) The session sets it when
    /// [`awaits_line_end`](Self::awaits_line_end) and no byte came for a moment, parses
    /// again, and clears it.
    pub fn set_caught_up(&mut self, caught_up: bool) {
        self.caught_up = caught_up;
    }

    /// Whether the last [`parse`](Self::parse) stopped in an unfinished line of more than
    /// 64 KiB, which Redis refuses if the client sends nothing more (so the session should
    /// not wait for more bytes for long before asking again with `set_caught_up(true)`).
    pub fn awaits_line_end(&self) -> bool {
        self.open_line > INLINE_MAX
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
        loop {
            let reads = &self.reads;
            let have = reads.base + buf.len() as u64;
            // Nothing past the end of Redis's read in progress may decide anything yet.
            let visible_end = have.min(reads.end);
            let at_read_end =
                visible_end == reads.end || (self.caught_up && visible_end > reads.start);
            let visible = &buf[..((visible_end - reads.base) as usize).min(buf.len())];
            match self.step(visible, at_read_end) {
                Ok(Step::Done(parsed)) => {
                    self.reads.base += parsed.len() as u64;
                    self.clear();
                    return Ok(Some(parsed));
                }
                Ok(Step::More) if at_read_end => self.read_ended(visible_end),
                Ok(Step::More) => return Ok(None),
                Err(e) => {
                    self.clear();
                    return Err(e);
                }
            }
        }
    }

    /// Forgets a partially parsed request (after an error the connection is closed anyway,
    /// but a fresh state keeps the parser reusable).
    pub fn reset(&mut self) {
        self.clear();
    }

    fn clear(&mut self) {
        self.kind = Kind::Unknown;
        self.remaining = 0;
        self.bulk = None;
        self.pos = 0;
    }

    /// One pass of Redis's `processInputBuffer` over `buf` (what Redis has read of this
    /// request). `at_read_end`: `buf` ends where a Redis read ends, so over-long lines are
    /// judged now.
    fn step(&mut self, buf: &[u8], at_read_end: bool) -> Result<Step, ProtocolError> {
        self.open_line = 0;
        if self.kind == Kind::Unknown {
            let Some(&first) = buf.first() else {
                return Ok(Step::More);
            };
            self.kind = if first == b'*' {
                Kind::Multibulk
            } else {
                Kind::Inline
            };
        }
        if self.kind == Kind::Inline {
            self.inline(buf, at_read_end)
        } else {
            self.multibulk(buf, at_read_end)
        }
    }

    /// Bytes of an unfinished request held so far: past `max_request_bytes` the connection
    /// is closed without a reply, as Redis closes a client past `client-query-buffer-limit`.
    fn within_request_limit(&self, bytes: u64) -> Result<(), ProtocolError> {
        if bytes > self.limits.max_request_bytes {
            return Err(ProtocolError::Close(
                "request larger than limits.max_request_bytes",
            ));
        }
        Ok(())
    }

    /// `processInlineBuffer`.
    fn inline(&mut self, buf: &[u8], at_read_end: bool) -> Result<Step, ProtocolError> {
        let Some(nl) = line_end(b'\n', buf) else {
            if at_read_end && buf.len() as u64 > INLINE_MAX {
                return Err(refuse("too big inline request"));
            }
            self.open_line = buf.len() as u64;
            self.within_request_limit(buf.len() as u64)?;
            return Ok(Step::More);
        };
        let mut line = &buf[..nl];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        let args = split_args(line).ok_or(refuse("unbalanced quotes in request"))?;
        let len = nl + 1;
        Ok(Step::Done(if args.is_empty() {
            Parsed::Empty { len }
        } else {
            Parsed::Inline { len, args }
        }))
    }

    /// `processMultibulkBuffer`.
    fn multibulk(&mut self, buf: &[u8], at_read_end: bool) -> Result<Step, ProtocolError> {
        if self.remaining == 0 {
            let cr = match line_end(b'\r', buf) {
                None => {
                    if at_read_end && buf.len() as u64 > INLINE_MAX {
                        return Err(refuse("too big mbulk count string"));
                    }
                    self.open_line = buf.len() as u64;
                    self.within_request_limit(buf.len() as u64)?;
                    return Ok(Step::More);
                }
                // The line ends at the CR, which must be followed by one more byte (skipped
                // unchecked, as Redis does).
                Some(cr) if cr + 2 > buf.len() => return Ok(Step::More),
                Some(cr) => cr,
            };
            let n = match parse_int(&buf[1..cr]) {
                Some(n) if n <= 0 => n,
                Some(n) if n as u64 <= MAX_MULTIBULK.min(self.limits.max_array_len) => n,
                _ => return Err(refuse("invalid multibulk length")),
            };
            if n > UNAUTH_MAX_ARGS && self.unauthenticated {
                return Err(refuse("unauthenticated multibulk length"));
            }
            self.pos = cr + 2;
            if n <= 0 {
                return Ok(Step::Done(Parsed::Empty { len: self.pos }));
            }
            // Nothing is reserved per declared argument: the count is only a promise.
            self.remaining = n as u64;
            self.args.clear();
        }
        while self.remaining > 0 {
            let len = match self.bulk {
                Some(len) => len,
                None => {
                    let line = buf.get(self.pos..).unwrap_or_default();
                    let cr = match line_end(b'\r', line) {
                        None => {
                            if at_read_end && line.len() as u64 > INLINE_MAX {
                                return Err(refuse("too big bulk count string"));
                            }
                            self.open_line = line.len() as u64;
                            self.within_request_limit(buf.len() as u64)?;
                            return Ok(Step::More);
                        }
                        Some(cr) if cr + 2 > line.len() => return Ok(Step::More),
                        Some(cr) => cr,
                    };
                    if line[0] != b'$' {
                        return Err(expected_dollar(line[0]));
                    }
                    let n = match parse_int(&line[1..cr]) {
                        Some(n) if n >= 0 && n as u64 <= self.limits.max_bulk_len => n,
                        _ => return Err(refuse("invalid bulk length")),
                    };
                    if n > UNAUTH_MAX_BULK && self.unauthenticated {
                        return Err(refuse("unauthenticated bulk length"));
                    }
                    self.pos += cr + 2;
                    let n = n as u64;
                    // Checked before waiting for the bytes, so a declared size is never held.
                    self.within_request_limit((self.pos as u64).saturating_add(n + 2))?;
                    self.bulk = Some(n);
                    n
                }
            };
            // `len` fits: it is below `max_request_bytes`, checked above against the buffer.
            let have = buf.len().saturating_sub(self.pos) as u64;
            if have < len + 2 {
                return Ok(Step::More);
            }
            let start = self.pos;
            let end = start + len as usize;
            self.args.push(start..end);
            self.pos = end + 2;
            if len >= BIG_ARG {
                self.reads.big_done = Some((self.reads.base + self.pos as u64, len));
            }
            self.bulk = None;
            self.remaining -= 1;
        }
        Ok(Step::Done(Parsed::Multibulk { len: self.pos }))
    }

    /// A Redis read ended at stream offset `at` with the request unfinished: replay what
    /// Redis does to its query buffer then (trim, large-argument handling) and where its next
    /// read will end.
    fn read_ended(&mut self, at: u64) {
        let reads = &mut self.reads;
        let stuck = reads.base + self.pos as u64;
        let mut kept = reads.kept.max(stuck);
        let big_bulk = match (self.kind, self.bulk) {
            (Kind::Multibulk, Some(len)) if len >= BIG_ARG => Some(len),
            _ => None,
        };
        match (reads.big_done.take(), big_bulk) {
            // A large argument ended exactly where the read did: Redis hands its buffer to
            // the argument and starts a new one as large.
            (Some((end, len)), _) if end == at => {
                reads.buf = QueryBuf::fresh(len + 2);
                kept = at;
            }
            // A large argument's header was read in this read: Redis trims its buffer to the
            // argument and sizes it for the rest.
            (_, Some(len)) if stuck > reads.start => {
                let held = at - stuck;
                reads
                    .buf
                    .make_room(held, (len + 2).saturating_sub(held), false);
            }
            _ => {}
        }
        let missing = big_bulk.map(|len| (len + 2).saturating_sub(at - stuck));
        let next = reads.buf.next_read(at - kept, missing);
        reads.kept = kept;
        reads.start = at;
        reads.end = at.saturating_add(next);
    }
}

/// `expected '$', got '%c'`: the byte as-is, except that Redis turns CR and LF in an error
/// text into spaces (a NUL never gets here: it ends Redis's search for the line).
fn expected_dollar(got: u8) -> ProtocolError {
    let got = if got == b'\r' || got == b'\n' {
        b' '
    } else {
        got
    };
    let mut text = b"expected '$', got '".to_vec();
    text.extend_from_slice(&[got, b'\'']);
    ProtocolError::Reply(Cow::Owned(text))
}

/// Where `delim` first occurs, as Redis's `strchr` finds it: a NUL byte ends the search, so
/// a line with a NUL before its end is treated as unfinished (Redis waits for more, and only
/// complains once the 64 KiB line limit is passed) rather than as a complete command.
fn line_end(delim: u8, buf: &[u8]) -> Option<usize> {
    memchr::memchr2(delim, 0, buf).filter(|&i| buf[i] == delim)
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

/// The commands in `bytes`, which stormwall encoded itself or framed already (each a
/// multibulk request, back to back), each as its arguments. `None` if they are not that.
/// For rare paths (a command being sent again after a redirection): it allocates.
pub fn decode_commands(bytes: &[u8]) -> Option<Vec<Vec<Vec<u8>>>> {
    let mut parser = RequestParser::new(RequestLimits {
        max_bulk_len: u64::MAX,
        max_array_len: MAX_MULTIBULK,
        max_request_bytes: u64::MAX,
    });
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Ok(Some(Parsed::Multibulk { len })) = parser.parse(rest) else {
            return None;
        };
        let cmd = parser.command(rest);
        out.push(
            (0..cmd.argc())
                .filter_map(|i| cmd.arg(i))
                .map(<[u8]>::to_vec)
                .collect(),
        );
        rest = &rest[len..];
    }
    Some(out)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
