//! How the replies of one client command sent to several masters become the one reply a
//! client of a single Redis expects — pure functions over reply bytes (RESP2 or RESP3, as
//! the client's protocol made the masters answer), unit-tested here.
//!
//! Whenever a part failed (an error reply), the client gets the first error rather than a
//! merge of the rest: for the split commands that means the parts that did run are not
//! reported (see the README's table of what splitting gives up).
//!
//! `SCAN` walks the masters one after the other; the cursor the client holds says which
//! master and where in it: `node_cursor << 10 | position`, where `position` is the master's
//! place among the masters ordered by the first slot each serves. So cursor `0` starts at
//! the first master's cursor `0`, a master that finishes hands over to the next one at its
//! cursor `0` (client cursor = the next position, never `0`), and the last master's
//! finishing ends the iteration with `0`. A master's own cursor must stay below 2^54 (a
//! hash table of 2^54 buckets), which leaves room for 1024 masters.

use bytes::Bytes;

use super::route::Fanout;
use crate::resp::reply::ReplyScanner;

/// Bits of a client's `SCAN` cursor that hold the master's position.
pub const SCAN_POSITION_BITS: u32 = 10;

/// Whether a reply is an error (`-…`, or RESP3's blob error `!…`).
pub fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-' | b'!'))
}

/// Whether a reply is a null (`$-1`, `*-1`, RESP3 `_`).
pub fn is_null(reply: &[u8]) -> bool {
    matches!(reply, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n")
}

/// An integer reply's value.
fn integer(reply: &[u8]) -> Option<i64> {
    let digits = reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The elements of an array reply (`*n`, or a RESP3 set `~n`), each a whole frame.
pub fn elements(reply: &[u8]) -> Option<Vec<&[u8]>> {
    if !matches!(reply.first(), Some(b'*' | b'~')) {
        return None;
    }
    let header = memchr::memmem::find(reply, b"\r\n")? + 2;
    let count: usize = std::str::from_utf8(&reply[1..header - 2])
        .ok()?
        .parse()
        .ok()?;
    let mut out = Vec::with_capacity(count);
    let mut rest = &reply[header..];
    let mut scanner = ReplyScanner::new(u64::MAX);
    for _ in 0..count {
        let (len, _) = scanner.next(rest).ok()??;
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    rest.is_empty().then_some(out)
}

/// An array of `items` (whole frames), with the header `tag` (`*` or `~`).
fn array<'a>(tag: u8, items: impl ExactSizeIterator<Item = &'a [u8]>) -> Bytes {
    let mut out = Vec::new();
    out.push(tag);
    out.extend_from_slice(items.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for item in items {
        out.extend_from_slice(item);
    }
    Bytes::from(out)
}

/// A reply that is not what the command gives: the masters answered unexpectedly.
fn unexpected() -> Bytes {
    Bytes::from_static(
        b"-ERR stormwall: the cluster's masters gave replies that cannot be merged\r\n",
    )
}

/// The first error among `replies`, if any.
fn first_error(replies: &[Bytes]) -> Option<Bytes> {
    replies.iter().find(|r| is_error(r)).cloned()
}

/// Merges the replies of a command sent to every master, in the masters' order.
pub fn fanout(kind: Fanout, replies: &[Bytes]) -> Bytes {
    let Some(first) = replies.first() else {
        return unexpected();
    };
    match kind {
        Fanout::FirstError => first_error(replies).unwrap_or_else(|| first.clone()),
        Fanout::Sum => sum(replies),
        Fanout::Concat => {
            if let Some(e) = first_error(replies) {
                return e;
            }
            let parts: Option<Vec<Vec<&[u8]>>> = replies.iter().map(|r| elements(r)).collect();
            match parts {
                Some(parts) => {
                    let all: Vec<&[u8]> = parts.into_iter().flatten().collect();
                    array(first[0], all.into_iter())
                }
                None => unexpected(),
            }
        }
        Fanout::And => {
            if let Some(e) = first_error(replies) {
                return e;
            }
            let parts: Option<Vec<Vec<&[u8]>>> = replies.iter().map(|r| elements(r)).collect();
            let Some(parts) = parts else {
                return unexpected();
            };
            let n = parts[0].len();
            if parts.iter().any(|p| p.len() != n) {
                return unexpected();
            }
            let merged: Vec<&[u8]> = (0..n)
                .map(|i| {
                    if parts.iter().all(|p| p[i] == b":1\r\n") {
                        &b":1\r\n"[..]
                    } else {
                        &b":0\r\n"[..]
                    }
                })
                .collect();
            array(first[0], merged.into_iter())
        }
        Fanout::AnyOk => replies
            .iter()
            .find(|r| !is_error(r))
            .unwrap_or(first)
            .clone(),
        Fanout::FirstNonNull => first_error(replies).unwrap_or_else(|| {
            replies
                .iter()
                .find(|r| !is_null(r))
                .unwrap_or(first)
                .clone()
        }),
        Fanout::Info => info(replies),
    }
}

/// Whether some of `replies` are errors and some are not: a command that changes data, sent
/// to several masters, ran on some and was refused by others.
pub fn partly_applied(replies: &[Bytes]) -> bool {
    replies.iter().any(|r| is_error(r)) && replies.iter().any(|r| !is_error(r))
}

/// Integer replies summed; the first error if there is one.
pub fn sum(replies: &[Bytes]) -> Bytes {
    if let Some(e) = first_error(replies) {
        return e;
    }
    let mut total: i64 = 0;
    for reply in replies {
        match integer(reply).and_then(|n| total.checked_add(n)) {
            Some(t) => total = t,
            None => return unexpected(),
        }
    }
    Bytes::from(format!(":{total}\r\n"))
}

/// `MGET` split by slot: `parts[i]` is the reply to the `MGET` of the keys at positions
/// `places[i]` of the client's `MGET` of `total` keys; the values go back in its order.
pub fn mget(parts: &[Bytes], places: &[Vec<usize>], total: usize) -> Bytes {
    if let Some(e) = first_error(parts) {
        return e;
    }
    let mut values: Vec<Option<&[u8]>> = vec![None; total];
    for (reply, places) in parts.iter().zip(places) {
        let Some(items) = elements(reply).filter(|items| items.len() == places.len()) else {
            return unexpected();
        };
        for (item, &place) in items.into_iter().zip(places) {
            match values.get_mut(place) {
                Some(slot) => *slot = Some(item),
                None => return unexpected(),
            }
        }
    }
    let values: Option<Vec<&[u8]>> = values.into_iter().collect();
    match values {
        Some(values) => array(b'*', values.into_iter()),
        None => unexpected(),
    }
}

/// Reads a client's `SCAN` cursor: `(position of the master, the master's cursor)`.
/// `None` if it is not a plain decimal number (then a master judges it, as Redis would).
pub fn scan_cursor(cursor: &[u8]) -> Option<(usize, u64)> {
    if cursor.is_empty() || !cursor.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value: u64 = std::str::from_utf8(cursor).ok()?.parse().ok()?;
    let mask = (1u64 << SCAN_POSITION_BITS) - 1;
    Some(((value & mask) as usize, value >> SCAN_POSITION_BITS))
}

/// The cursor a client gets back after the master at `position` (of `masters`) answered
/// its own `node_cursor`; `None` if the master's cursor is too large to encode.
pub fn client_cursor(position: usize, masters: usize, node_cursor: u64) -> Option<u64> {
    if node_cursor == 0 {
        let next = position + 1;
        return Some(if next < masters { next as u64 } else { 0 });
    }
    if node_cursor >> (64 - SCAN_POSITION_BITS) != 0 {
        return None;
    }
    Some(node_cursor << SCAN_POSITION_BITS | position as u64)
}

/// Rewrites a master's `SCAN` reply (`[cursor, [keys…]]`) with the client's cursor.
pub fn scan_reply(reply: &Bytes, position: usize, masters: usize) -> Bytes {
    if is_error(reply) {
        return reply.clone();
    }
    let Some(items) = elements(reply).filter(|i| i.len() == 2) else {
        return unexpected();
    };
    let node_cursor = bulk_text(items[0]).and_then(|c| c.parse::<u64>().ok());
    let Some(cursor) = node_cursor.and_then(|c| client_cursor(position, masters, c)) else {
        return Bytes::from_static(
            b"-ERR stormwall: a master's SCAN cursor is too large to carry its position\r\n",
        );
    };
    let cursor = cursor.to_string();
    let mut out = format!("*2\r\n${}\r\n{cursor}\r\n", cursor.len()).into_bytes();
    out.extend_from_slice(items[1]);
    Bytes::from(out)
}

/// A bulk string's (or simple string's) text.
fn bulk_text(frame: &[u8]) -> Option<&str> {
    let body = match frame.first()? {
        b'$' => {
            let header = memchr::memmem::find(frame, b"\r\n")? + 2;
            frame.get(header..frame.len().checked_sub(2)?)?
        }
        b'+' => frame.get(1..frame.len().checked_sub(2)?)?,
        _ => return None,
    };
    std::str::from_utf8(body).ok()
}

/// `INFO`'s text (RESP2 bulk string, or RESP3 verbatim string `=…txt:`): `(prefix, text)`
/// where the prefix is `txt:` for a verbatim string.
fn info_text(reply: &[u8]) -> Option<(&[u8], &str)> {
    let tag = *reply.first()?;
    if tag != b'$' && tag != b'=' {
        return None;
    }
    let header = memchr::memmem::find(reply, b"\r\n")? + 2;
    let body = reply.get(header..reply.len().checked_sub(2)?)?;
    let (prefix, text) = if tag == b'=' {
        (body.get(..4)?, body.get(4..)?)
    } else {
        (&body[..0], body)
    };
    Some((prefix, std::str::from_utf8(text).ok()?))
}

/// One `dbN:` line's fields, in order.
type DbFields = Vec<(String, f64)>;

/// `INFO` from every master: the first master's reply, with its `# Keyspace` section (if
/// it has one) replaced by the sum over the masters (`keys` and `expires` added up,
/// `avg_ttl` averaged weighted by `expires`).
pub fn info(replies: &[Bytes]) -> Bytes {
    if let Some(e) = first_error(replies) {
        return e;
    }
    let Some((tag, prefix, first)) = replies
        .first()
        .and_then(|r| info_text(r).map(|(p, t)| (r[0], p, t)))
    else {
        return unexpected();
    };
    let lines: Vec<&str> = first.split("\r\n").collect();
    let Some(start) = lines.iter().position(|l| *l == "# Keyspace") else {
        return replies[0].clone();
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.is_empty())
        .map_or(lines.len(), |i| start + 1 + i);
    // Every master's databases, summed.
    let mut dbs: Vec<(u64, DbFields)> = Vec::new();
    for reply in replies {
        let Some((_, text)) = info_text(reply) else {
            return unexpected();
        };
        let mut in_keyspace = false;
        for line in text.split("\r\n") {
            if line.starts_with('#') {
                in_keyspace = line == "# Keyspace";
                continue;
            }
            let Some((db, fields)) = line.split_once(':').filter(|_| in_keyspace) else {
                continue;
            };
            let Some(n) = db.strip_prefix("db").and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let fields: DbFields = fields
                .split(',')
                .filter_map(|f| f.split_once('='))
                .filter_map(|(k, v)| Some((k.to_owned(), v.parse::<f64>().ok()?)))
                .collect();
            match dbs.iter_mut().find(|(d, _)| *d == n) {
                Some((_, total)) => add_db(total, &fields),
                None => dbs.push((n, fields)),
            }
        }
    }
    dbs.sort_by_key(|(n, _)| *n);
    let mut section: Vec<String> = vec!["# Keyspace".into()];
    for (n, fields) in &dbs {
        let fields: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", *v as i64))
            .collect();
        section.push(format!("db{n}:{}", fields.join(",")));
    }
    let text: Vec<&str> = lines[..start]
        .iter()
        .copied()
        .chain(section.iter().map(String::as_str))
        .chain(lines[end..].iter().copied())
        .collect();
    let text = text.join("\r\n");
    let mut out = Vec::with_capacity(text.len() + 16);
    out.push(tag);
    out.extend_from_slice((prefix.len() + text.len()).to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(prefix);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// Adds one master's fields of a database to the running total.
fn add_db(total: &mut DbFields, fields: &DbFields) {
    let get = |f: &DbFields, k: &str| f.iter().find(|(n, _)| n == k).map_or(0.0, |(_, v)| *v);
    let (e1, e2) = (get(total, "expires"), get(fields, "expires"));
    let (t1, t2) = (get(total, "avg_ttl"), get(fields, "avg_ttl"));
    for (k, v) in fields {
        match total.iter_mut().find(|(n, _)| n == k) {
            Some((_, t)) if k == "avg_ttl" => {
                *t = if e1 + e2 > 0.0 {
                    (t1 * e1 + t2 * e2) / (e1 + e2)
                } else {
                    0.0
                };
            }
            Some((_, t)) => *t += v,
            None => total.push((k.clone(), *v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[test]
    fn counts_sum_and_errors_win() {
        assert_eq!(sum(&[b(":1\r\n"), b(":2\r\n"), b(":0\r\n")]), b(":3\r\n"));
        assert_eq!(
            sum(&[b(":1\r\n"), b("-NOPERM no\r\n"), b("-ERR x\r\n")]),
            b("-NOPERM no\r\n")
        );
        assert!(is_error(&sum(&[b("+OK\r\n")])));
    }

    #[test]
    fn fanouts_merge_as_one_redis_would_answer() {
        use Fanout::*;
        let ok = b("+OK\r\n");
        assert_eq!(fanout(FirstError, &[ok.clone(), ok.clone()]), ok);
        assert_eq!(
            fanout(FirstError, &[ok.clone(), b("-ERR busy\r\n")]),
            b("-ERR busy\r\n")
        );
        assert_eq!(
            fanout(
                Concat,
                &[
                    b("*1\r\n$1\r\na\r\n"),
                    b("*0\r\n"),
                    b("*2\r\n$1\r\nb\r\n$1\r\nc\r\n")
                ]
            ),
            b("*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
        );
        assert_eq!(
            fanout(And, &[b("*2\r\n:1\r\n:1\r\n"), b("*2\r\n:1\r\n:0\r\n")]),
            b("*2\r\n:1\r\n:0\r\n")
        );
        assert_eq!(
            fanout(
                AnyOk,
                &[
                    b("-NOTBUSY No scripts in execution right now.\r\n"),
                    ok.clone()
                ]
            ),
            ok
        );
        assert_eq!(
            fanout(FirstNonNull, &[b("$-1\r\n"), b("_\r\n"), b("$1\r\nk\r\n")]),
            b("$1\r\nk\r\n")
        );
        assert_eq!(
            fanout(FirstNonNull, &[b("$-1\r\n"), b("$-1\r\n")]),
            b("$-1\r\n")
        );
        assert_eq!(fanout(Sum, &[b(":4\r\n"), b(":5\r\n")]), b(":9\r\n"));
    }

    #[test]
    fn mget_values_go_back_in_order() {
        // MGET a b c d: a and c on one slot, b on another, d on a third.
        let parts = [
            b("*2\r\n$2\r\nva\r\n$-1\r\n"),
            b("*1\r\n$2\r\nvb\r\n"),
            b("*1\r\n_\r\n"),
        ];
        let places = [vec![0, 2], vec![1], vec![3]];
        assert_eq!(
            mget(&parts, &places, 4),
            b("*4\r\n$2\r\nva\r\n$2\r\nvb\r\n$-1\r\n_\r\n")
        );
        assert!(is_error(&mget(&parts[..2], &places[..2], 4)));
    }

    #[test]
    fn a_write_refused_by_some_masters_only_is_partly_applied() {
        assert!(partly_applied(&[b(":1\r\n"), b("-NOPERM no\r\n")]));
        assert!(partly_applied(&[b("+OK\r\n"), b("-BUSY busy\r\n")]));
        assert!(!partly_applied(&[b("-NOPERM no\r\n"), b("-NOPERM no\r\n")]));
        assert!(!partly_applied(&[b(":1\r\n"), b(":0\r\n")]));
    }

    #[test]
    fn scan_cursors_carry_the_masters_position() {
        assert_eq!(scan_cursor(b"0"), Some((0, 0)));
        assert_eq!(scan_cursor(b"2"), Some((2, 0)));
        assert_eq!(scan_cursor(&b"5121"[..]), Some((1, 5)));
        assert_eq!(scan_cursor(b"-1"), None);
        assert_eq!(scan_cursor(b"x"), None);
        assert_eq!(scan_cursor(b""), None);
        // A master that finishes hands over to the next; the last one ends it.
        assert_eq!(client_cursor(0, 3, 0), Some(1));
        assert_eq!(client_cursor(2, 3, 0), Some(0));
        assert_eq!(client_cursor(1, 3, 5), Some(5 << 10 | 1));
        assert_eq!(client_cursor(1, 3, 1 << 54), None);
        for (position, node) in [(0, 7), (3, 1 << 53), (1023, 12345)] {
            let c = client_cursor(position, 1024, node).unwrap();
            assert_eq!(
                scan_cursor(c.to_string().as_bytes()),
                Some((position, node))
            );
        }
        assert_eq!(
            scan_reply(&b("*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n"), 2, 3),
            b("*2\r\n$5\r\n17410\r\n*1\r\n$1\r\nk\r\n")
        );
        assert_eq!(
            scan_reply(&b("*2\r\n$1\r\n0\r\n*0\r\n"), 0, 3),
            b("*2\r\n$1\r\n1\r\n*0\r\n")
        );
    }

    #[test]
    fn info_sums_the_keyspace_and_keeps_the_rest() {
        let one = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=1000\r\n";
        let two = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\ndb0:keys=5,expires=3,avg_ttl=2000\r\n";
        let three = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\n";
        let bulk = |t: &str| b(&format!("${}\r\n{t}\r\n", t.len()));
        let merged = info(&[bulk(one), bulk(two), bulk(three)]);
        let want = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\ndb0:keys=8,expires=4,avg_ttl=1750\r\n";
        assert_eq!(merged, bulk(want));
        // RESP3: a verbatim string.
        let verbatim = |t: &str| b(&format!("={}\r\ntxt:{t}\r\n", t.len() + 4));
        assert_eq!(info(&[verbatim(one), verbatim(two)]), verbatim(want));
        // No keyspace section asked for: the first master's reply.
        let server = bulk("# Server\r\nredis_version:7.0.15\r\n");
        assert_eq!(info(&[server.clone(), server.clone()]), server);
    }
}
