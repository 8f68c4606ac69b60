//! The command table: what stormwall must know about a command to proxy it faithfully.
//!
//! Almost every command is one request, one reply, forwarded untouched. The exceptions are
//! the commands that change how replies must be matched to requests (pub/sub, `MONITOR`,
//! `CLIENT REPLY OFF`), that may legitimately wait forever (blocking pops, `WAIT`), or that
//! change connection state the session tracks (`MULTI`/`EXEC`, `QUIT`, `RESET`, and the
//! identity commands `AUTH`/`HELLO`/`SELECT`), and the invalidations the shield governs
//! (`DEL`/`UNLINK`/`FLUSHDB`/`FLUSHALL`). Lookup is by an upper-cased copy of the name on the
//! stack: no allocation per command.

use crate::resp::request::Command;

/// How the session must treat one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One request, one reply.
    Plain,
    /// One reply that may take arbitrarily long (exempt from `upstream.reply_timeout`).
    Blocking,
    /// Starts a transaction: later commands are queued by Redis until `EXEC`/`DISCARD`.
    Multi,
    /// Ends a transaction.
    Exec,
    Discard,
    /// After this command replies no longer correspond one-to-one to requests (pub/sub
    /// messages, `MONITOR` output, suppressed replies), so the rest of the connection is
    /// relayed byte for byte.
    EntersRaw,
    /// Redis sends no reply at all (`REPLCONF ACK`, when not inside a transaction).
    NoReply,
    /// Redis replies `+OK` and closes the connection.
    Quit,
    /// Returns the connection to its initial state (leaves `MULTI`, among others).
    Reset,
    /// Changes who the connection acts as, or what it must see of its own invalidations
    /// (`AUTH`, `HELLO`, `SELECT`, `CLIENT TRACKING`).
    Identity,
    /// `DEL`/`UNLINK` with at least one key: governed by the invalidation engine.
    Delete,
    /// `FLUSHDB`/`FLUSHALL` (optionally `ASYNC`/`SYNC`): governed. `sync` as in
    /// [`crate::invalidation::Request::Flush`].
    Flush {
        all: bool,
        sync: Option<bool>,
    },
}

/// Longest command name looked up; longer names are plain commands.
const MAX_NAME: usize = 16;

/// Classifies a command by its name (and, for `CLIENT REPLY`, its arguments).
pub fn classify(cmd: &Command<'_>) -> Kind {
    let Some(name) = cmd.arg(0) else {
        return Kind::Plain;
    };
    let mut upper = [0u8; MAX_NAME];
    let Some(upper) = upper.get_mut(..name.len()) else {
        return Kind::Plain;
    };
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    match &*upper {
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"WAIT" | b"WAITAOF" | b"XREAD" | b"XREADGROUP" => Kind::Blocking,
        b"MULTI" => Kind::Multi,
        b"EXEC" => Kind::Exec,
        b"DISCARD" => Kind::Discard,
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
        | b"SUNSUBSCRIBE" | b"MONITOR" | b"SYNC" | b"PSYNC" => Kind::EntersRaw,
        b"CLIENT" if is_client_reply_off(cmd) => Kind::EntersRaw,
        b"CLIENT"
            if cmd
                .arg(1)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"TRACKING")) =>
        {
            Kind::Identity
        }
        b"REPLCONF" => replconf(cmd),
        b"QUIT" => Kind::Quit,
        b"RESET" => Kind::Reset,
        b"AUTH" | b"HELLO" | b"SELECT" => Kind::Identity,
        b"DEL" | b"UNLINK" if cmd.argc() >= 2 => Kind::Delete,
        b"FLUSHDB" | b"FLUSHALL" => flush(cmd, upper[5] == b'A'),
        _ => Kind::Plain,
    }
}

/// A flush with a valid modifier; anything else goes to Redis, which answers with its error.
fn flush(cmd: &Command<'_>, all: bool) -> Kind {
    let sync = match cmd.argc() {
        1 => None,
        2 => match cmd.arg(1) {
            Some(a) if a.eq_ignore_ascii_case(b"SYNC") => Some(true),
            Some(a) if a.eq_ignore_ascii_case(b"ASYNC") => Some(false),
            _ => return Kind::Plain,
        },
        _ => return Kind::Plain,
    };
    Kind::Flush { all, sync }
}

/// `REPLCONF` answers nothing when its first option is `ACK`, `FACK` or `GETACK` (Redis
/// returns early for them); when such an option comes after others, whether a reply comes
/// depends on how Redis judged the earlier ones, so the connection is relayed raw from
/// there (exact at the cost of no longer governing it).
fn replconf(cmd: &Command<'_>) -> Kind {
    let silent = |i: usize| {
        cmd.arg(i).is_some_and(|a| {
            a.eq_ignore_ascii_case(b"ACK")
                || a.eq_ignore_ascii_case(b"FACK")
                || a.eq_ignore_ascii_case(b"GETACK")
        })
    };
    // An even argument count is a syntax error Redis replies to.
    if cmd.argc().is_multiple_of(2) {
        return Kind::Plain;
    }
    if silent(1) {
        Kind::NoReply
    } else if (3..cmd.argc()).step_by(2).any(silent) {
        Kind::EntersRaw
    } else {
        Kind::Plain
    }
}

/// `CLIENT REPLY OFF` and `CLIENT REPLY SKIP` suppress replies, breaking one-to-one matching.
fn is_client_reply_off(cmd: &Command<'_>) -> bool {
    let eq = |i: usize, word: &[u8]| cmd.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(word));
    eq(1, b"REPLY") && (eq(2, b"OFF") || eq(2, b"SKIP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(words: &[&str]) -> Kind {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        classify(&Command::Inline { args: &args })
    }

    #[test]
    fn table() {
        assert_eq!(kind(&["get", "k"]), Kind::Plain);
        assert_eq!(kind(&["bLpOp", "k", "0"]), Kind::Blocking);
        assert_eq!(kind(&["multi"]), Kind::Multi);
        assert_eq!(kind(&["psubscribe", "*"]), Kind::EntersRaw);
        assert_eq!(kind(&["client", "reply", "skip"]), Kind::EntersRaw);
        assert_eq!(kind(&["client", "reply", "on"]), Kind::Plain);
        assert_eq!(kind(&["client", "setname", "x"]), Kind::Plain);
        assert_eq!(kind(&["averyveryverylongcommandname"]), Kind::Plain);
        assert_eq!(kind(&["quit"]), Kind::Quit);
        assert_eq!(kind(&["del", "a", "b"]), Kind::Delete);
        assert_eq!(kind(&["unlink", "a"]), Kind::Delete);
        assert_eq!(kind(&["del"]), Kind::Plain);
        assert_eq!(
            kind(&["flushdb"]),
            Kind::Flush {
                all: false,
                sync: None
            }
        );
        assert_eq!(
            kind(&["FLUSHALL", "sync"]),
            Kind::Flush {
                all: true,
                sync: Some(true)
            }
        );
        assert_eq!(
            kind(&["flushdb", "async"]),
            Kind::Flush {
                all: false,
                sync: Some(false)
            }
        );
        assert_eq!(kind(&["flushdb", "later"]), Kind::Plain);
        assert_eq!(kind(&["select", "2"]), Kind::Identity);
        assert_eq!(kind(&["client", "tracking", "on"]), Kind::Identity);
        assert_eq!(kind(&["replconf", "ack", "0"]), Kind::NoReply);
        assert_eq!(kind(&["REPLCONF", "GETACK", "*"]), Kind::NoReply);
        assert_eq!(kind(&["replconf", "ack"]), Kind::Plain);
        assert_eq!(kind(&["replconf", "capa", "eof"]), Kind::Plain);
        assert_eq!(
            kind(&["replconf", "listening-port", "1", "ack", "0"]),
            Kind::EntersRaw
        );
    }
}
