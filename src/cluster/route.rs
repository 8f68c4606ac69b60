//! Where one command goes in a cluster: a pure function from the command (and Redis's
//! command table) to a [`Route`], unit-tested here without sockets.
//!
//! * Every key in one slot: that slot's master ([`Route::Slot`]).
//! * Keys in several slots: `DEL`, `UNLINK`, `EXISTS`, `TOUCH` and `MGET` are split by slot
//!   ([`Route::Split`]), since each key stands alone in them; every other command goes to
//!   the first key's master, which refuses it with Redis Cluster's own `-CROSSSLOT` (after
//!   the checks Redis makes first — authentication, ACLs, arity — so the client gets
//!   exactly what a cluster node would say, and nothing runs).
//! * No keys: commands about the whole dataset run on every master and their replies are
//!   merged ([`Route::All`], [`Route::Scan`]); the rest (`PING`, `ECHO`, `TIME`, `PUBLISH`,
//!   `CONFIG`, …) go to any master ([`Route::Any`]).
//! * Commands whose arguments do not fit their key specs (Redis refuses them whichever node
//!   gets them), commands only Redis can find the keys of (`SORT … BY`, `MIGRATE … KEYS`),
//!   and unknown commands: any master too — for the second kind, a node that does not serve
//!   the keys answers `MOVED`, and the command follows it to the one that does.

use super::keys::{CommandKeys, Keys};
use super::slot::key_slot;
use crate::resp::request::Command;

/// How the replies of a command sent to every master become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// The first error, else the first reply (`FLUSHDB`, `SCRIPT LOAD`, `FUNCTION LOAD`:
    /// every master answers alike when all went well).
    FirstError,
    /// Integers summed (`DBSIZE`).
    Sum,
    /// Arrays concatenated (`KEYS`).
    Concat,
    /// Arrays of 0/1 combined element by element: 1 only where every master says 1
    /// (`SCRIPT EXISTS`: a script is usable only if every master has it).
    And,
    /// The first success, else the first error (`SCRIPT KILL`, `FUNCTION KILL`: only the
    /// master running the script can kill it; the others say `NOTBUSY`).
    AnyOk,
    /// The first reply that is not null (`RANDOMKEY`).
    FirstNonNull,
    /// `INFO`: the first master's text, with a keyspace section summing every master's.
    Info,
}

impl Fanout {
    /// Whether the commands merged this way change data (`FLUSHDB`, `SCRIPT LOAD`,
    /// `FUNCTION LOAD`, …): one that some masters ran and others refused must not be
    /// answered with the refusal.
    pub fn writes(self) -> bool {
        matches!(self, Fanout::FirstError)
    }
}

/// How a command crossing slots is split, and its parts' replies merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `DEL`, `UNLINK`, `EXISTS`, `TOUCH`: one command per slot, counts summed.
    Count,
    /// `MGET`: one `MGET` per slot, values put back in the client's order.
    MGet,
}

/// Where a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The master of this slot.
    Slot(u16),
    /// Any master.
    Any,
    /// Split by slot: every argument after the name is a key.
    Split(Split),
    /// Every master, replies merged.
    All(Fanout),
    /// `SCAN`: one master at a time, its position in the cursor.
    Scan,
}

/// Longest command or subcommand name looked up here.
const MAX_NAME: usize = 16;

/// Upper-cases `name` into `buf` (no allocation); `None` if it is longer than any name
/// looked up.
fn upper<'b>(name: &[u8], buf: &'b mut [u8; MAX_NAME]) -> Option<&'b [u8]> {
    let out = buf.get_mut(..name.len())?;
    out.copy_from_slice(name);
    out.make_ascii_uppercase();
    Some(out)
}

/// Decides where `cmd` goes. `table` is Redis's command table (`None` until a node gave
/// it: then every command goes to any master, and `MOVED` routes it).
pub fn route(cmd: &Command<'_>, table: Option<&CommandKeys>) -> Route {
    let mut name_buf = [0u8; MAX_NAME];
    let name = cmd.arg(0).and_then(|n| upper(n, &mut name_buf));
    let mut sub_buf = [0u8; MAX_NAME];
    let sub = cmd.arg(1).and_then(|s| upper(s, &mut sub_buf));
    if let Some(fanout) = name.and_then(|n| all_masters(n, sub, cmd.argc())) {
        return fanout;
    }
    let Some(table) = table else {
        return Route::Any;
    };
    let keys = match table.hashed(cmd) {
        Keys::Found(keys) => keys,
        Keys::Unfit | Keys::AskRedis | Keys::UnknownCommand => return Route::Any,
    };
    match keys.slot() {
        Ok(Some(slot)) => Route::Slot(slot),
        Ok(None) => Route::Any,
        Err(_) => match name {
            Some(b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH") => Route::Split(Split::Count),
            Some(b"MGET") => Route::Split(Split::MGet),
            // The first key's master refuses it, in Redis's own words.
            _ => keys
                .names()
                .next()
                .map_or(Route::Any, |k| Route::Slot(key_slot(k))),
        },
    }
}

/// The keyless commands that are about every master's data (`name` and `sub` upper case).
fn all_masters(name: &[u8], sub: Option<&[u8]>, argc: usize) -> Option<Route> {
    use Fanout::*;
    Some(match (name, sub) {
        (b"FLUSHDB" | b"FLUSHALL", _) => Route::All(FirstError),
        (b"DBSIZE", _) => Route::All(Sum),
        (b"KEYS", _) if argc == 2 => Route::All(Concat),
        (b"RANDOMKEY", _) => Route::All(FirstNonNull),
        (b"SCAN", _) if argc >= 2 => Route::Scan,
        (b"INFO", _) => Route::All(Info),
        (b"SCRIPT", Some(b"LOAD" | b"FLUSH")) => Route::All(FirstError),
        (b"SCRIPT", Some(b"EXISTS")) => Route::All(And),
        (b"SCRIPT", Some(b"KILL")) => Route::All(AnyOk),
        (b"FUNCTION", Some(b"LOAD" | b"DELETE" | b"FLUSH" | b"RESTORE")) => Route::All(FirstError),
        (b"FUNCTION", Some(b"KILL")) => Route::All(AnyOk),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CommandKeys {
        let raw = include_bytes!("../../tests/fixtures/redis-7.0-command.resp");
        let (frame, _) = redis_protocol::resp2::decode::decode(&raw[..])
            .expect("valid RESP")
            .expect("a complete reply");
        CommandKeys::from_reply(&frame).expect("a command table")
    }

    fn route_of(table: &CommandKeys, words: &[&str]) -> Route {
        let args: Vec<Vec<u8>> = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        route(&Command::Inline { args: &args }, Some(table))
    }

    #[test]
    fn keys_in_one_slot_go_to_its_master() {
        let t = table();
        assert_eq!(route_of(&t, &["get", "foo"]), Route::Slot(key_slot(b"foo")));
        assert_eq!(
            route_of(&t, &["MSET", "{u1}a", "1", "{u1}b", "2"]),
            Route::Slot(key_slot(b"u1"))
        );
        assert_eq!(
            route_of(&t, &["EVAL", "return 1", "1", "k"]),
            Route::Slot(key_slot(b"k"))
        );
        assert_eq!(
            route_of(&t, &["SPUBLISH", "chan", "m"]),
            Route::Slot(key_slot(b"chan"))
        );
        assert_eq!(
            route_of(&t, &["del", "{x}1", "{x}2"]),
            Route::Slot(key_slot(b"x"))
        );
    }

    #[test]
    fn keys_across_slots_split_or_go_to_the_first_keys_master() {
        let t = table();
        assert_eq!(route_of(&t, &["DEL", "a", "b"]), Route::Split(Split::Count));
        assert_eq!(
            route_of(&t, &["unlink", "a", "b"]),
            Route::Split(Split::Count)
        );
        assert_eq!(
            route_of(&t, &["EXISTS", "a", "b"]),
            Route::Split(Split::Count)
        );
        assert_eq!(
            route_of(&t, &["touch", "a", "b"]),
            Route::Split(Split::Count)
        );
        assert_eq!(route_of(&t, &["MGET", "a", "b"]), Route::Split(Split::MGet));
        // Redis Cluster refuses these; the first key's master says so.
        for cmd in [
            &["MSET", "a", "1", "b", "2"][..],
            &["MSETNX", "a", "1", "b", "2"],
            &["RENAME", "a", "b"],
            &["SMOVE", "a", "b", "m"],
            &["SINTERSTORE", "a", "b", "c"],
        ] {
            assert_eq!(route_of(&t, cmd), Route::Slot(key_slot(b"a")), "{cmd:?}");
        }
    }

    #[test]
    fn keyless_commands_go_to_any_or_every_master() {
        let t = table();
        for cmd in [
            &["PING"][..],
            &["echo", "x"],
            &["TIME"],
            &["PUBLISH", "c", "m"],
            &["CONFIG", "GET", "maxmemory"],
            &["SCRIPT", "HELP"],
            &["FUNCTION", "LIST"],
            &["EVAL", "return 1", "0"],
            &["no-such-command", "x"],
            &["GET"],
            &["SORT", "k", "BY", "w_*"],
        ] {
            assert_eq!(route_of(&t, cmd), Route::Any, "{cmd:?}");
        }
        use Fanout::*;
        for (cmd, fanout) in [
            (&["flushdb"][..], FirstError),
            (&["FLUSHALL", "ASYNC"], FirstError),
            (&["dbsize"], Sum),
            (&["KEYS", "*"], Concat),
            (&["randomkey"], FirstNonNull),
            (&["info"], Info),
            (&["INFO", "keyspace"], Info),
            (&["script", "load", "return 1"], FirstError),
            (&["SCRIPT", "FLUSH"], FirstError),
            (&["SCRIPT", "EXISTS", "a", "b"], And),
            (&["SCRIPT", "KILL"], AnyOk),
            (&["FUNCTION", "LOAD", "code"], FirstError),
            (&["function", "delete", "lib"], FirstError),
            (&["FUNCTION", "KILL"], AnyOk),
        ] {
            assert_eq!(route_of(&t, cmd), Route::All(fanout), "{cmd:?}");
        }
        assert_eq!(route_of(&t, &["SCAN", "0"]), Route::Scan);
        // Malformed ones go to one master, which refuses them as any would.
        assert_eq!(route_of(&t, &["SCAN"]), Route::Any);
        assert_eq!(route_of(&t, &["KEYS"]), Route::Any);
    }

    #[test]
    fn without_the_command_table_any_master_and_moved_decide() {
        let args: Vec<Vec<u8>> = vec![b"GET".to_vec(), b"k".to_vec()];
        assert_eq!(route(&Command::Inline { args: &args }, None), Route::Any);
    }
}
