//! A model of where Redis 7.0's reads of a client's bytes end.
//!
//! Redis judges an over-long line (`too big inline request`, `too big mbulk count string`,
//! `too big bulk count string`) only when it looks at its query buffer, i.e. after each
//! `read(2)`: a line is refused if, at the end of a read, more than 64 KiB of it are buffered
//! with no line end in sight. So which long lines Redis accepts depends on where its reads end,
//! and that is not "every 16 KiB": `readQueryFromClient` reads 16 KiB into a fresh buffer, but
//! once the buffer has grown it reads as much as the buffer's *allocation* has room for, and
//! the allocation grows greedily (`sdsMakeRoomFor` doubles it, then jemalloc rounds it up to
//! its next size class). On a fresh connection that puts the first two read ends at 16,384
//! and 81,910 bytes, so a first inline line is accepted up to 81,909 bytes before its `\n`;
//! after a `PING` in the same write, up to 163,829. Reads of a large bulk argument (32 KiB or
//! more) are sized to end exactly at the argument's end, and the buffer is then replaced by a
//! fresh one as large as that argument.
//!
//! [`QueryBuf`] replays that arithmetic (from `networking.c`, `sds.c` and jemalloc 5's size
//! classes, as in Redis 7.0.15 built with jemalloc) for a client whose bytes are all there
//! when Redis reads — the case of any client that writes a request before reading the reply,
//! and of every pipeline. Checked against a real `redis-server` in `tests/framing_parity.rs`.
//! Redis's periodic query-buffer shrinking (`clientsCronResizeQueryBuffer`, after seconds of
//! idleness) and commands that stop Redis from parsing (a blocked `BLPOP`) move its read ends
//! in ways no byte-level model can see; those only matter for lines over 64 KiB.

/// `PROTO_IOBUF_LEN`: what Redis asks `read(2)` for when its buffer is small.
pub(crate) const IOBUF_LEN: u64 = 16 * 1024;
/// `PROTO_MBULK_BIG_ARG`: bulk arguments this large get reads sized to end where they end.
pub(crate) const BIG_ARG: u64 = 32 * 1024;
/// `PROTO_INLINE_MAX_SIZE`: the most of an unfinished line Redis keeps at the end of a read.
pub(crate) const INLINE_MAX: u64 = 64 * 1024;
/// `SDS_MAX_PREALLOC`: greedy growth doubles below this, adds this much above it.
const MAX_PREALLOC: u64 = 1024 * 1024;

/// An sds string header type (`SDS_TYPE_8` … `SDS_TYPE_64`): it decides the header size,
/// which is part of every allocation, and so of where the next read ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sds {
    T8,
    T16,
    T32,
    T64,
}

impl Sds {
    /// `sdsReqType`, with type 5 promoted to 8 as `sdsMakeRoomFor` and `sdsempty` do.
    fn for_len(n: u64) -> Sds {
        if n < 1 << 8 {
            Sds::T8
        } else if n < 1 << 16 {
            Sds::T16
        } else if n < 1 << 32 {
            Sds::T32
        } else {
            Sds::T64
        }
    }

    fn header(self) -> u64 {
        match self {
            Sds::T8 => 3,
            Sds::T16 => 5,
            Sds::T32 => 9,
            Sds::T64 => 17,
        }
    }

    fn max(self) -> u64 {
        match self {
            Sds::T8 => 0xff,
            Sds::T16 => 0xffff,
            Sds::T32 => 0xffff_ffff,
            Sds::T64 => u64::MAX,
        }
    }
}

/// jemalloc 5's usable size for a request of `n` bytes on x86-64 (16-byte quantum; four
/// size classes per doubling above 128 bytes).
fn size_class(n: u64) -> u64 {
    if n <= 8 {
        8
    } else if n <= 128 {
        n.div_ceil(16) * 16
    } else {
        let log = 63 - u64::from((n - 1).leading_zeros());
        let step = 1u64 << (log - 2);
        n.div_ceil(step).saturating_mul(step)
    }
}

/// The allocation of Redis's query buffer for one client (`sdsalloc` and its header type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueryBuf {
    alloc: u64,
    sds: Sds,
}

impl Default for QueryBuf {
    /// `sdsempty()` as `createClient` makes it: type 8, 4 usable bytes.
    fn default() -> Self {
        QueryBuf::fresh(0)
    }
}

impl QueryBuf {
    /// `sdsnewlen(SDS_NOINIT, len)`: what replaces the buffer after a large argument.
    pub(crate) fn fresh(len: u64) -> QueryBuf {
        let sds = Sds::for_len(len);
        QueryBuf {
            alloc: usable(sds, len),
            sds,
        }
    }

    /// `sdsMakeRoomFor` (greedy) / `sdsMakeRoomForNonGreedy` for a buffer holding `len` bytes.
    pub(crate) fn make_room(&mut self, len: u64, add: u64, greedy: bool) {
        if self.alloc.saturating_sub(len) >= add {
            return;
        }
        let mut new_len = len.saturating_add(add);
        if greedy {
            new_len = if new_len < MAX_PREALLOC {
                new_len * 2
            } else {
                new_len.saturating_add(MAX_PREALLOC)
            };
        }
        self.sds = Sds::for_len(new_len);
        self.alloc = usable(self.sds, new_len);
    }

    /// How many bytes Redis asks `read(2)` for, given `len` buffered bytes and, if it is in
    /// the middle of a bulk argument of 32 KiB or more, the bytes of it (with its CRLF) still
    /// missing. Grows the allocation first, as `readQueryFromClient` does.
    pub(crate) fn next_read(&mut self, len: u64, big_arg_missing: Option<u64>) -> u64 {
        let (mut want, big) = match big_arg_missing {
            Some(missing) if missing > 0 => (missing, true),
            Some(_) => (IOBUF_LEN, true),
            None => (IOBUF_LEN, false),
        };
        if big || self.alloc < IOBUF_LEN {
            self.make_room(len, want, false);
        } else {
            self.make_room(len, want, true);
            // "Read as much as possible from the socket to save read(2) system calls."
            want = self.alloc - len;
        }
        want
    }
}

/// What `sdsnewlen`/`sdsMakeRoomFor` record as the allocation for `len` bytes of type `sds`.
fn usable(sds: Sds, len: u64) -> u64 {
    let bytes = sds.header().saturating_add(len).saturating_add(1);
    (size_class(bytes) - sds.header() - 1).min(sds.max())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_size_classes() {
        for (n, class) in [
            (1, 8),
            (9, 16),
            (33, 48),
            (129, 160),
            (16_390, 20_480),
            (65_530, 65_536),
            (65_546, 81_920),
            (163_838, 163_840),
        ] {
            assert_eq!(size_class(n), class, "{n}");
        }
    }

    #[test]
    fn read_ends_on_a_fresh_connection() {
        // 16 KiB into the empty buffer, then everything the grown allocation holds: the
        // second read ends at 81,910 bytes (measured against redis-server 7.0.15).
        let mut qb = QueryBuf::default();
        assert_eq!(qb.alloc, 4);
        assert_eq!(qb.next_read(0, None), 16_384);
        assert_eq!(qb.next_read(16_384, None), 81_910 - 16_384);
        // After a 6-byte command was consumed, the third read reaches 163,830.
        let mut qb = QueryBuf::default();
        qb.next_read(0, None);
        assert_eq!(qb.next_read(16_378, None), 65_530 - 16_378);
        assert_eq!(qb.next_read(65_530, None), 163_830 - 65_530);
    }

    #[test]
    fn large_arguments_are_read_to_their_end() {
        let mut qb = QueryBuf::default();
        qb.next_read(0, None);
        assert_eq!(qb.next_read(100, Some(50_000)), 50_000);
        let fresh = QueryBuf::fresh(100_002);
        assert!(fresh.alloc >= 100_002);
    }
}
