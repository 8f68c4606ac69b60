//! Which arguments of a command are keys: read from Redis's command table, not written here.
//!
//! Routing a command in a cluster needs its keys, and Redis 7 has over 360 commands and
//! subcommands, each with its own layout (`MSET k v k v`, `EVAL script numkeys k…`,
//! `XREAD … STREAMS k… id…`, `GEORADIUS … STORE k`); modules add more at run time. A table
//! written by hand would be long, wrong in corners, and stale at the next Redis release. So
//! stormwall loads the table from the server it proxies, once, with `COMMAND`, and reads
//! each command's *key specifications* (Redis 7: the 9th element of each entry) the way
//! Redis itself does — `getKeysUsingKeySpecs` in `db.c`, step for step:
//!
//! * `begin_search`: `index` (the first key is argument N) or `keyword` (the first key
//!   follows a keyword such as `STREAMS` or `STORE`, searched for from a given argument,
//!   backwards if negative, compared like `strcasecmp`);
//! * `find_keys`: `range` (keys up to a last argument, counted from the first key or from
//!   the end, every `keystep`, optionally `limit`ed to a fraction of the rest, as `XREAD`'s
//!   keys are the first half of what follows `STREAMS`) or `keynum` (an argument says how
//!   many keys follow, as in `EVAL`, `ZUNIONSTORE`, `LMPOP`).
//!
//! With Redis 7.0's table that finds, with no round trip, the keys of every built-in command
//! but three: `SORT` and `SORT_RO` (their `STORE`/`BY`/`GET` arguments are declared
//! `unknown`) and `MIGRATE … KEYS` (declared `incomplete`). For those, and for module
//! commands whose keys are found by the module's own code (`movablekeys` on a module
//! command), the answer is [`Keys::AskRedis`]: the caller asks any node with
//! `COMMAND GETKEYS` ([`keys_from_redis`]) — or refuses the command. A Redis without key
//! specs (6.x) gives each command's first key, last key and step instead; those are read as
//! one range, and a `movablekeys` command there is [`Keys::AskRedis`] too.
//!
//! Two readings of the same table, because Redis has two: [`CommandKeys::keys`] is what
//! `COMMAND GETKEYS` answers (key specs flagged `not_key` skipped), and
//! [`CommandKeys::hashed`] is what Redis Cluster hashes to route a command, which also
//! counts the channels of sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`, `SUNSUBSCRIBE`).
//! Redis 7.0's cluster itself routes by the older per-command code (`getkeys_proc`, or the
//! first/last/step range), which finds the same keys for every valid command but one:
//! `GEORADIUS`/`GEORADIUSBYMEMBER` given both `STORE a` and `STOREDIST b` store into `b`
//! only, and the cluster hashes `b` alone, while the specs name both (so keys `a` and `b` in
//! two slots are CROSSSLOT here and accepted by the cluster).
//!
//! Arguments that do not fit the specs — a wrong number of arguments, a key count that is
//! not a number or runs past the end, `EVAL … 0` — are [`Keys::Unfit`]: the command has no
//! keys (`EVAL … 0`), or Redis refuses it, so any node answers it as well as another. Redis's
//! older per-command code may still find keys in some of them (a key count read leniently,
//! `atoi`-style, as in `ZUNIONSTORE d 2x a b`; `XREADGROUP` with `STREAMS` before argument
//! 4), and a cluster node then answers `-CROSSSLOT` or `-MOVED` where any node answers the
//! command's own syntax error: an error either way, in other words.

use std::collections::HashMap;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;

use super::slot::{CrossSlot, slot_of};
use crate::resp::parse_int;
use crate::resp::request::Command;
use crate::upstream::Conn;

/// Where the first key is found (a key spec's `begin_search`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Begin {
    /// At this argument.
    Index(usize),
    /// After the first argument equal to `keyword`, searched from `startfrom` (from the end
    /// if negative).
    Keyword { keyword: Vec<u8>, startfrom: i64 },
    /// Only Redis's code knows.
    Unknown,
}

/// Which arguments, from the first key on, are keys (a key spec's `find_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Find {
    /// Keys from the first to `lastkey` (counted from the first key; negative: from the end
    /// of the command), every `keystep`; with a `limit`, only the first 1/limit of the rest.
    Range {
        lastkey: i64,
        keystep: usize,
        limit: i64,
    },
    /// The argument at `keynumidx` (counted from the begin) says how many keys follow,
    /// starting `firstkey` after the begin, every `keystep`.
    Keynum {
        keynumidx: usize,
        firstkey: usize,
        keystep: usize,
    },
    /// Only Redis's code knows.
    Unknown,
}

/// One key specification.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    begin: Begin,
    find: Find,
    /// Not keys: sharded pub/sub channels, hashed like keys.
    not_key: bool,
    /// Redis may find more keys than the spec says (`MIGRATE … KEYS`).
    incomplete: bool,
}

/// What the table says about one command (or subcommand).
#[derive(Debug, Default)]
struct Entry {
    /// Redis's arity: the exact argument count, or the minimum if negative.
    arity: i64,
    specs: Vec<Spec>,
    /// Only Redis can find this command's keys: a spec is `unknown`, or a module finds them
    /// in its own code.
    opaque: bool,
    /// Subcommands by lower-case name (`encoding` for `OBJECT ENCODING`).
    subcommands: HashMap<Box<[u8]>, Entry>,
}

/// The key-finding part of Redis's command table, loaded from `COMMAND`.
#[derive(Debug, Default)]
pub struct CommandKeys {
    /// Commands by lower-case name.
    commands: HashMap<Box<[u8]>, Entry>,
}

/// One key argument of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyArg<'a> {
    /// Its position in the command (0 is the command's name).
    pub index: usize,
    pub name: &'a [u8],
}

/// The key arguments of one command, in Redis's order (repeats kept, as Redis keeps them).
/// Holds a single key without allocating.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyArgs<'a> {
    first: Option<KeyArg<'a>>,
    rest: Vec<KeyArg<'a>>,
}

impl<'a> KeyArgs<'a> {
    fn push(&mut self, key: KeyArg<'a>) {
        if self.first.is_none() {
            self.first = Some(key);
        } else {
            self.rest.push(key);
        }
    }

    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = KeyArg<'a>> + '_ {
        self.first.into_iter().chain(self.rest.iter().copied())
    }

    /// The key names, in order.
    pub fn names(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.iter().map(|k| k.name)
    }

    /// The slot every key hashes to (`None`: no keys), or Redis Cluster's refusal.
    pub fn slot(&self) -> Result<Option<u16>, CrossSlot> {
        slot_of(self.names())
    }
}

/// What the table says about one command's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys<'a> {
    /// These are its keys (none, for a keyless command), exactly as Redis finds them.
    Found(KeyArgs<'a>),
    /// The arguments do not fit the command's key specs (wrong count, a key count that is
    /// not a number or runs past the end, `EVAL … 0`): the command has no keys, or Redis
    /// refuses it, so any node answers it alike (see the module doc for the error a cluster
    /// node may give instead).
    Unfit,
    /// Only Redis can tell (`SORT`, `SORT_RO`, `MIGRATE … KEYS`, a module's own key
    /// finding): ask it with [`keys_from_redis`], or refuse the command.
    AskRedis,
    /// Not in Redis's table (or an unknown subcommand): Redis answers `-ERR unknown
    /// command`, whichever node gets it.
    UnknownCommand,
}

impl CommandKeys {
    /// Loads the table from the server on `conn` with `COMMAND` (the connection must speak
    /// RESP2, as a fresh one does, and be authenticated if the server requires it). Any node
    /// of a cluster will do; a module loaded later on some node is not in the table, and
    /// its commands are [`Keys::UnknownCommand`] until the table is loaded again.
    pub async fn load(conn: &mut Conn, deadline: Instant) -> Result<CommandKeys, String> {
        let reply = conn
            .call_until(&[vec![Bytes::from_static(b"COMMAND")]], deadline)
            .await
            .map_err(|e| format!("COMMAND failed: {e}"))?;
        match reply.first() {
            Some(reply) => CommandKeys::from_reply(reply),
            None => Err("no reply to COMMAND".into()),
        }
    }

    /// Reads a `COMMAND` reply (RESP2).
    pub fn from_reply(reply: &OwnedFrame) -> Result<CommandKeys, String> {
        let entries = match reply {
            OwnedFrame::Array(entries) => entries,
            OwnedFrame::Error(e) => return Err(format!("COMMAND refused: {e}")),
            _ => return Err("COMMAND answered something other than an array".into()),
        };
        let mut commands = HashMap::with_capacity(entries.len());
        for entry in entries {
            let (name, entry) = read_entry(entry)?;
            commands.insert(name, entry);
        }
        if commands.is_empty() {
            return Err("COMMAND listed no commands".into());
        }
        Ok(CommandKeys { commands })
    }

    /// How many commands (not counting subcommands) the table holds.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The keys of `cmd`, as `COMMAND GETKEYS` names them.
    pub fn keys<'a>(&self, cmd: &Command<'a>) -> Keys<'a> {
        self.find(cmd, false)
    }

    /// The arguments Redis Cluster hashes to route `cmd`: its keys, and the channels of
    /// sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`, `SUNSUBSCRIBE`).
    pub fn hashed<'a>(&self, cmd: &Command<'a>) -> Keys<'a> {
        self.find(cmd, true)
    }

    fn find<'a>(&self, cmd: &Command<'a>, with_not_keys: bool) -> Keys<'a> {
        let Some(entry) = cmd.arg(0).and_then(|name| lookup(&self.commands, name)) else {
            return Keys::UnknownCommand;
        };
        // Redis's `lookupCommand`: a container (`OBJECT`, `XINFO`, …) given a subcommand
        // means that subcommand; given nothing more, itself (which its arity then refuses).
        let entry = match cmd.arg(1) {
            Some(sub) if !entry.subcommands.is_empty() => match lookup(&entry.subcommands, sub) {
                Some(sub) => sub,
                None => return Keys::UnknownCommand,
            },
            _ => entry,
        };
        entry.keys(cmd, with_not_keys)
    }
}

/// `name` in `map`, case-insensitively (the map's names are lower case).
fn lookup<'m>(map: &'m HashMap<Box<[u8]>, Entry>, name: &[u8]) -> Option<&'m Entry> {
    // Names are short: lower-cased on the stack, with no allocation per command.
    let mut buf = [0u8; 64];
    match buf.get_mut(..name.len()) {
        Some(lower) => {
            lower.copy_from_slice(name);
            lower.make_ascii_lowercase();
            map.get(&*lower)
        }
        None => map.get(name.to_ascii_lowercase().as_slice()),
    }
}

impl Entry {
    /// Redis's `getKeysUsingKeySpecs` (db.c, 7.0), after the arity check `processCommand`
    /// makes first.
    fn keys<'a>(&self, cmd: &Command<'a>, with_not_keys: bool) -> Keys<'a> {
        let argc = cmd.argc();
        let n = argc as i64;
        if (self.arity > 0 && n != self.arity) || n < -self.arity {
            return Keys::Unfit;
        }
        if self.opaque {
            return Keys::AskRedis;
        }
        let mut found = KeyArgs::default();
        for spec in &self.specs {
            if spec.not_key && !with_not_keys {
                continue;
            }
            let first = match &spec.begin {
                Begin::Index(i) => *i as i64,
                Begin::Keyword { keyword, startfrom } => {
                    match keyword_position(cmd, keyword, *startfrom) {
                        Some(at) => at + 1,
                        // The keyword is optional (`STORE`): this spec names no key.
                        None => continue,
                    }
                }
                Begin::Unknown => return Keys::AskRedis,
            };
            let (first, last, step) = match &spec.find {
                Find::Range {
                    lastkey,
                    keystep,
                    limit,
                } => {
                    let last = if *lastkey >= 0 {
                        first + lastkey
                    } else if *limit == 0 {
                        n + lastkey
                    } else {
                        // Redis allows a limit only with `lastkey` -1. Both divide
                        // rounding toward zero.
                        first + ((n - first) / limit + lastkey)
                    };
                    (first, last, *keystep)
                }
                Find::Keynum {
                    keynumidx,
                    firstkey,
                    keystep,
                } => {
                    let at = first + *keynumidx as i64;
                    let Some(count) = arg_at(cmd, at).and_then(parse_int) else {
                        return Keys::Unfit;
                    };
                    // A count the client gave: any `i64` (Redis refuses the absurd ones;
                    // they must not overflow here first).
                    let Some(first) = i64::try_from(*firstkey)
                        .ok()
                        .and_then(|k| first.checked_add(k))
                    else {
                        return Keys::Unfit;
                    };
                    let last = first.checked_add(count).map(|l| l - 1);
                    match last {
                        Some(last) if count >= 0 => (first, last, *keystep),
                        _ => return Keys::Unfit,
                    }
                }
                Find::Unknown => return Keys::AskRedis,
            };
            // Out of bounds (`EVAL s 0` too: Redis's fallback finds no key there either).
            if last >= n || last < first || first >= n {
                return Keys::Unfit;
            }
            let mut i = first;
            while i <= last {
                if let Some(name) = arg_at(cmd, i) {
                    found.push(KeyArg {
                        index: i as usize,
                        name,
                    });
                }
                // (A step of 0 in a command table would never end.)
                i += step.max(1) as i64;
            }
            if spec.incomplete {
                return Keys::AskRedis;
            }
        }
        Keys::Found(found)
    }
}

/// Argument `i` of `cmd`, for a position computed in signed arithmetic.
fn arg_at<'a>(cmd: &Command<'a>, i: i64) -> Option<&'a [u8]> {
    usize::try_from(i).ok().and_then(|i| cmd.arg(i))
}

/// Where `keyword` is in `cmd`, searched as Redis searches for a key spec's keyword: from
/// `startfrom` towards the end (never looking at the last argument, which could not be
/// followed by a key), or from `argc + startfrom` back towards argument 2 if it is
/// negative.
fn keyword_position(cmd: &Command<'_>, keyword: &[u8], startfrom: i64) -> Option<i64> {
    let argc = cmd.argc() as i64;
    let (start, end) = if startfrom > 0 {
        (startfrom, argc - 1)
    } else {
        (argc + startfrom, 1)
    };
    let mut i = start;
    while i != end {
        if i >= argc || i < 1 {
            break;
        }
        if arg_at(cmd, i).is_some_and(|arg| strcasecmp_eq(arg, keyword)) {
            return Some(i);
        }
        i = if start <= end { i + 1 } else { i - 1 };
    }
    None
}

/// C's `strcasecmp(arg, keyword) == 0`: it stops at a NUL byte, so `STREAMS\0x` is
/// `STREAMS` to Redis (and to the command that reads the argument next).
fn strcasecmp_eq(arg: &[u8], keyword: &[u8]) -> bool {
    let arg = arg.split(|&b| b == 0).next().unwrap_or(arg);
    arg.eq_ignore_ascii_case(keyword)
}

/// Reads one command's entry from `COMMAND`'s reply: its lower-case name and what it says
/// about keys.
fn read_entry(frame: &OwnedFrame) -> Result<(Box<[u8]>, Entry), String> {
    let OwnedFrame::Array(parts) = frame else {
        return Err("a COMMAND entry is not an array".into());
    };
    let name = parts
        .first()
        .and_then(text)
        .ok_or("a COMMAND entry has no name")?;
    let shown = String::from_utf8_lossy(name);
    let int = |i: usize| match parts.get(i) {
        Some(OwnedFrame::Integer(n)) => Ok(*n),
        _ => Err(format!(
            "COMMAND entry `{shown}`: element {i} is not an integer"
        )),
    };
    let arity = int(1)?;
    let flags: Vec<&[u8]> = match parts.get(2) {
        Some(OwnedFrame::Array(flags)) => flags.iter().filter_map(text).collect(),
        _ => return Err(format!("COMMAND entry `{shown}`: no flags")),
    };
    let flag = |f: &str| flags.iter().any(|g| g.eq_ignore_ascii_case(f.as_bytes()));
    let movable = flag("movablekeys");
    let mut entry = Entry {
        arity,
        ..Entry::default()
    };
    match parts.get(8) {
        // Redis 7: key specifications.
        Some(OwnedFrame::Array(specs)) => {
            entry.specs = specs.iter().map(read_spec).collect();
            // A module command that finds its keys in its own code is `movablekeys` even
            // when its specs look complete: its code, not the specs, is what Redis uses.
            entry.opaque = (movable && flag("module"))
                || entry
                    .specs
                    .iter()
                    .any(|s| s.begin == Begin::Unknown || s.find == Find::Unknown);
        }
        // Redis 6: only the first key, last key and step, which `movablekeys` commands
        // (`EVAL`, `ZUNIONSTORE`, …) do not follow.
        _ => {
            let (first, last, step) = (int(3)?, int(4)?, int(5)?);
            if first > 0 && step > 0 {
                entry.specs.push(Spec {
                    begin: Begin::Index(first as usize),
                    find: Find::Range {
                        lastkey: if last >= 0 { last - first } else { last },
                        keystep: step as usize,
                        limit: 0,
                    },
                    not_key: false,
                    incomplete: false,
                });
            }
            entry.opaque = movable;
        }
    }
    if let Some(OwnedFrame::Array(subs)) = parts.get(9) {
        for sub in subs {
            let (full, sub) = read_entry(sub)?;
            // Subcommands are named `container|sub`.
            let short = match full.iter().position(|&b| b == b'|') {
                Some(bar) => full[bar + 1..].into(),
                None => full,
            };
            entry.subcommands.insert(short, sub);
        }
    }
    Ok((name.to_ascii_lowercase().into_boxed_slice(), entry))
}

/// Reads one key specification (a map, as a flat array in RESP2). Anything it does not
/// understand — a type a later Redis adds, a missing field — reads as `unknown`, which
/// sends the command to Redis to find its keys rather than guessing.
fn read_spec(frame: &OwnedFrame) -> Spec {
    let spec = map(frame);
    let flags: Vec<&[u8]> = match field(&spec, "flags") {
        Some(OwnedFrame::Array(flags)) => flags.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    let flag = |f: &str| flags.iter().any(|g| g.eq_ignore_ascii_case(f.as_bytes()));
    Spec {
        begin: read_begin(field(&spec, "begin_search")),
        find: read_find(field(&spec, "find_keys")),
        not_key: flag("not_key"),
        incomplete: flag("incomplete"),
    }
}

fn read_begin(frame: Option<&OwnedFrame>) -> Begin {
    let search = frame.map(map).unwrap_or_default();
    let spec = field(&search, "spec").map(map).unwrap_or_default();
    let int = |name: &str| match field(&spec, name) {
        Some(OwnedFrame::Integer(n)) => Some(*n),
        _ => None,
    };
    match field(&search, "type").and_then(text) {
        Some(b"index") => match int("index") {
            Some(i) if i > 0 => Begin::Index(i as usize),
            _ => Begin::Unknown,
        },
        Some(b"keyword") => match (field(&spec, "keyword").and_then(text), int("startfrom")) {
            (Some(keyword), Some(startfrom)) => Begin::Keyword {
                keyword: keyword.to_vec(),
                startfrom,
            },
            _ => Begin::Unknown,
        },
        _ => Begin::Unknown,
    }
}

fn read_find(frame: Option<&OwnedFrame>) -> Find {
    let find = frame.map(map).unwrap_or_default();
    let spec = field(&find, "spec").map(map).unwrap_or_default();
    let int = |name: &str| match field(&spec, name) {
        Some(OwnedFrame::Integer(n)) => Some(*n),
        _ => None,
    };
    // A step below 1 would never move on; no Redis sends one.
    let step = |n: i64| usize::try_from(n).ok().filter(|&s| s > 0);
    match field(&find, "type").and_then(text) {
        Some(b"range") => match (int("lastkey"), int("keystep").and_then(step), int("limit")) {
            (Some(lastkey), Some(keystep), Some(limit)) if limit >= 0 => Find::Range {
                lastkey,
                keystep,
                limit,
            },
            _ => Find::Unknown,
        },
        Some(b"keynum") => match (
            int("keynumidx").and_then(|n| usize::try_from(n).ok()),
            int("firstkey").and_then(|n| usize::try_from(n).ok()),
            int("keystep").and_then(step),
        ) {
            (Some(keynumidx), Some(firstkey), Some(keystep)) => Find::Keynum {
                keynumidx,
                firstkey,
                keystep,
            },
            _ => Find::Unknown,
        },
        _ => Find::Unknown,
    }
}

/// A map's pairs (RESP2 sends a map as a flat array: name, value, name, value, …).
pub(super) fn map(frame: &OwnedFrame) -> Vec<(&[u8], &OwnedFrame)> {
    match frame {
        OwnedFrame::Array(items) => items
            .chunks_exact(2)
            .filter_map(|pair| Some((text(&pair[0])?, &pair[1])))
            .collect(),
        _ => Vec::new(),
    }
}

pub(super) fn field<'f>(map: &[(&[u8], &'f OwnedFrame)], name: &str) -> Option<&'f OwnedFrame> {
    map.iter()
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| *v)
}

fn text(frame: &OwnedFrame) -> Option<&[u8]> {
    match frame {
        OwnedFrame::BulkString(b) => Some(b),
        OwnedFrame::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// Asks Redis which arguments of `cmd` are keys (`COMMAND GETKEYS`), for the commands the
/// table answers [`Keys::AskRedis`] for. Any node can answer: the command is not run. An
/// error reply (`Invalid arguments specified for command`, `The command has no key
/// arguments`) is returned as `Ok(Err(text))`: the command has no keys Redis can find.
pub async fn keys_from_redis(
    conn: &mut Conn,
    cmd: &Command<'_>,
    deadline: Instant,
) -> Result<Result<Vec<Bytes>, String>, String> {
    if cmd.argc() < 2 {
        // A name alone has no key to find (and GETKEYS refuses to be asked about it).
        return Ok(Ok(Vec::new()));
    }
    let mut ask = vec![
        Bytes::from_static(b"COMMAND"),
        Bytes::from_static(b"GETKEYS"),
    ];
    ask.extend((0..cmd.argc()).filter_map(|i| cmd.arg(i).map(Bytes::copy_from_slice)));
    let reply = conn
        .call_until(&[ask], deadline)
        .await
        .map_err(|e| format!("COMMAND GETKEYS failed: {e}"))?;
    match reply.into_iter().next() {
        Some(OwnedFrame::Array(keys)) => keys
            .into_iter()
            .map(|k| match k {
                OwnedFrame::BulkString(k) => Ok(Bytes::from(k)),
                _ => Err("COMMAND GETKEYS answered a key that is not a string".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Ok),
        Some(OwnedFrame::Error(e)) => Ok(Err(e)),
        _ => Err("COMMAND GETKEYS answered something other than keys".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis 7.0.15's `COMMAND` reply, as the server sent it.
    fn redis_70() -> CommandKeys {
        let raw = include_bytes!("../../tests/fixtures/redis-7.0-command.resp");
        let (frame, len) = redis_protocol::resp2::decode::decode(&raw[..])
            .expect("valid RESP")
            .expect("a complete reply");
        assert_eq!(len, raw.len());
        CommandKeys::from_reply(&frame).expect("a command table")
    }

    fn keys(table: &CommandKeys, words: &[&str]) -> Keys<'static> {
        // Leaked so the keys can outlive the call: a test's few bytes.
        let args: &'static [Vec<u8>] = Box::leak(
            words
                .iter()
                .map(|w| w.as_bytes().to_vec())
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        table.keys(&Command::Inline { args })
    }

    fn found(table: &CommandKeys, words: &[&str]) -> Vec<String> {
        match keys(table, words) {
            Keys::Found(k) => k
                .names()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect(),
            other => panic!("{words:?}: {other:?}"),
        }
    }

    #[test]
    fn reads_the_whole_table() {
        let table = redis_70();
        assert_eq!(table.len(), 240);
        assert!(!table.is_empty());
        let subcommands: usize = table.commands.values().map(|e| e.subcommands.len()).sum();
        assert_eq!(subcommands, 126);
        // Every command but SORT and SORT_RO has specs the interpreter reads.
        let mut opaque: Vec<String> = table
            .commands
            .iter()
            .flat_map(|(name, e)| {
                std::iter::once((name.clone(), e)).chain(e.subcommands.iter().map(|(s, e)| {
                    let full = [&name[..], b"|", &s[..]].concat().into_boxed_slice();
                    (full, e)
                }))
            })
            .filter(|(_, e)| e.opaque)
            .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
            .collect();
        opaque.sort();
        assert_eq!(opaque, ["sort", "sort_ro"]);
    }

    #[test]
    fn single_and_fixed_keys() {
        let t = redis_70();
        assert_eq!(found(&t, &["GET", "k"]), ["k"]);
        assert_eq!(found(&t, &["get", "k"]), ["k"]);
        assert_eq!(found(&t, &["SET", "k", "v", "GET"]), ["k"]);
        assert_eq!(found(&t, &["LMOVE", "a", "b", "LEFT", "RIGHT"]), ["a", "b"]);
        assert_eq!(found(&t, &["SMOVE", "a", "b", "m"]), ["a", "b"]);
        assert_eq!(found(&t, &["RENAME", "a", "b"]), ["a", "b"]);
        assert_eq!(found(&t, &["PING"]), Vec::<String>::new());
        assert_eq!(found(&t, &["FLUSHALL", "ASYNC"]), Vec::<String>::new());
    }

    #[test]
    fn ranges_with_steps() {
        let t = redis_70();
        assert_eq!(found(&t, &["MSET", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(found(&t, &["MGET", "a", "b", "a"]), ["a", "b", "a"]);
        assert_eq!(found(&t, &["DEL", "a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(found(&t, &["BITOP", "AND", "d", "x", "y"]), ["d", "x", "y"]);
        assert_eq!(found(&t, &["BLPOP", "a", "b", "0"]), ["a", "b"]);
        assert_eq!(found(&t, &["SINTERSTORE", "d", "a", "b"]), ["d", "a", "b"]);
    }

    #[test]
    fn key_counts() {
        let t = redis_70();
        assert_eq!(found(&t, &["EVAL", "s", "2", "a", "b", "x"]), ["a", "b"]);
        assert_eq!(found(&t, &["fcall", "f", "1", "a", "x"]), ["a"]);
        assert_eq!(
            found(
                &t,
                &["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"]
            ),
            ["d", "a", "b"]
        );
        assert_eq!(found(&t, &["LMPOP", "2", "a", "b", "LEFT"]), ["a", "b"]);
        assert_eq!(found(&t, &["BLMPOP", "0", "1", "a", "LEFT"]), ["a"]);
        assert_eq!(
            found(&t, &["SINTERCARD", "2", "a", "b", "LIMIT", "1"]),
            ["a", "b"]
        );
        // No key: the specs do not fit, and Redis's own fallback finds none either.
        assert_eq!(keys(&t, &["EVAL", "return 1", "0"]), Keys::Unfit);
        // A count that is not a number, negative, or larger than what follows.
        assert_eq!(keys(&t, &["EVAL", "s", "x", "a"]), Keys::Unfit);
        assert_eq!(keys(&t, &["EVAL", "s", "-1", "a"]), Keys::Unfit);
        assert_eq!(keys(&t, &["EVAL", "s", "3", "a", "b"]), Keys::Unfit);
        assert_eq!(keys(&t, &["EVAL", "s", "01", "a"]), Keys::Unfit);
    }

    #[test]
    fn keywords() {
        let t = redis_70();
        assert_eq!(
            found(&t, &["XREAD", "COUNT", "1", "STREAMS", "a", "b", "0", "0"]),
            ["a", "b"]
        );
        assert_eq!(
            found(&t, &["XREADGROUP", "GROUP", "g", "c", "streams", "a", "0"]),
            ["a"]
        );
        // A key named like the keyword: the first match begins the keys.
        assert_eq!(
            found(&t, &["XREAD", "STREAMS", "streams", "0"]),
            ["streams"]
        );
        // Redis compares keywords with strcasecmp, which stops at a NUL byte.
        assert_eq!(found(&t, &["XREAD", "STREAMS\0x", "a", "0"]), ["a"]);
        // An odd number of stream arguments: Redis's specs take half, rounded down (and
        // XREAD then refuses the command).
        assert_eq!(found(&t, &["XREAD", "STREAMS", "a", "b", "0"]), ["a"]);
        assert_eq!(
            found(&t, &["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "d"]),
            ["k", "d"]
        );
        assert_eq!(found(&t, &["GEORADIUS", "k", "0", "0", "1", "km"]), ["k"]);
        // MIGRATE's `KEYS` spec is incomplete: only Redis knows.
        assert_eq!(found(&t, &["MIGRATE", "h", "1", "k", "0", "100"]), ["k"]);
        assert_eq!(
            keys(&t, &["MIGRATE", "h", "1", "", "0", "100", "KEYS", "a", "b"]),
            Keys::AskRedis
        );
        assert_eq!(keys(&t, &["SORT", "k"]), Keys::AskRedis);
        assert_eq!(keys(&t, &["SORT_RO", "k"]), Keys::AskRedis);
    }

    #[test]
    fn subcommands() {
        let t = redis_70();
        assert_eq!(found(&t, &["OBJECT", "ENCODING", "k"]), ["k"]);
        assert_eq!(found(&t, &["object", "encoding", "k"]), ["k"]);
        assert_eq!(found(&t, &["MEMORY", "USAGE", "k", "SAMPLES", "5"]), ["k"]);
        assert_eq!(found(&t, &["XINFO", "STREAM", "s", "FULL"]), ["s"]);
        assert_eq!(found(&t, &["XGROUP", "CREATE", "s", "g", "$"]), ["s"]);
        assert_eq!(found(&t, &["CONFIG", "GET", "x"]), Vec::<String>::new());
        assert_eq!(keys(&t, &["OBJECT", "NOPE", "k"]), Keys::UnknownCommand);
        // The container alone: its arity refuses it.
        assert_eq!(keys(&t, &["OBJECT"]), Keys::Unfit);
    }

    #[test]
    fn arity_and_unknown_commands() {
        let t = redis_70();
        assert_eq!(keys(&t, &["GET"]), Keys::Unfit);
        assert_eq!(keys(&t, &["GET", "a", "b"]), Keys::Unfit);
        assert_eq!(keys(&t, &["MSET", "a"]), Keys::Unfit);
        assert_eq!(keys(&t, &["NOSUCHCOMMAND", "a"]), Keys::UnknownCommand);
        assert_eq!(keys(&t, &[&"X".repeat(100)]), Keys::UnknownCommand);
        assert_eq!(t.keys(&Command::Inline { args: &[] }), Keys::UnknownCommand);
    }

    #[test]
    fn sharded_channels_are_hashed_not_keys() {
        let t = redis_70();
        let args = [b"SPUBLISH".to_vec(), b"ch".to_vec(), b"m".to_vec()];
        let cmd = Command::Inline { args: &args };
        assert_eq!(t.keys(&cmd), Keys::Found(KeyArgs::default()));
        let Keys::Found(hashed) = t.hashed(&cmd) else {
            panic!("{:?}", t.hashed(&cmd));
        };
        assert_eq!(hashed.names().collect::<Vec<_>>(), [b"ch"]);
        let args = [b"SSUBSCRIBE".to_vec(), b"a".to_vec(), b"b".to_vec()];
        let Keys::Found(hashed) = t.hashed(&Command::Inline { args: &args }) else {
            panic!("SSUBSCRIBE");
        };
        assert_eq!(hashed.len(), 2);
    }

    #[test]
    fn one_key_does_not_allocate_and_positions_are_kept() {
        let t = redis_70();
        let args = [
            b"HSET".to_vec(),
            b"h".to_vec(),
            b"f".to_vec(),
            b"v".to_vec(),
        ];
        let Keys::Found(k) = t.keys(&Command::Inline { args: &args }) else {
            panic!("HSET");
        };
        assert_eq!(k.rest.capacity(), 0);
        assert_eq!(
            k.iter().collect::<Vec<_>>(),
            [KeyArg {
                index: 1,
                name: b"h"
            }]
        );
        let args: Vec<Vec<u8>> = ["MSET", "a", "1", "{a}b", "2"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let Keys::Found(k) = t.keys(&Command::Inline { args: &args }) else {
            panic!("MSET");
        };
        assert_eq!(k.iter().map(|k| k.index).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(k.slot(), Ok(Some(crate::cluster::slot::key_slot(b"a"))));
    }

    #[test]
    fn multibulk_commands_too() {
        let t = redis_70();
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let ranges = [8..11, 17..18];
        let cmd = Command::Multibulk {
            buf,
            args: &ranges[..1],
        };
        assert_eq!(t.keys(&cmd), Keys::Unfit);
        let cmd = Command::Multibulk { buf, args: &ranges };
        let Keys::Found(k) = t.keys(&cmd) else {
            panic!("GET");
        };
        assert_eq!(k.names().collect::<Vec<_>>(), [b"k"]);
    }

    /// Redis 6 has no key specs: the first key, last key and step are read instead.
    #[test]
    fn redis_6_entries() {
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let status = |s: &str| OwnedFrame::SimpleString(s.as_bytes().to_vec());
        let entry = |name: &str, arity: i64, flags: &[&str], first: i64, last: i64, step: i64| {
            OwnedFrame::Array(vec![
                bulk(name),
                OwnedFrame::Integer(arity),
                OwnedFrame::Array(flags.iter().map(|f| status(f)).collect()),
                OwnedFrame::Integer(first),
                OwnedFrame::Integer(last),
                OwnedFrame::Integer(step),
                OwnedFrame::Array(vec![]),
            ])
        };
        let reply = OwnedFrame::Array(vec![
            entry("get", 2, &["readonly", "fast"], 1, 1, 1),
            entry("mset", -3, &["write", "denyoom"], 1, -1, 2),
            entry("eval", -3, &["noscript", "movablekeys"], 0, 0, 0),
            entry("ping", -1, &["stale", "fast"], 0, 0, 0),
        ]);
        let t = CommandKeys::from_reply(&reply).unwrap();
        assert_eq!(found(&t, &["GET", "k"]), ["k"]);
        assert_eq!(found(&t, &["MSET", "a", "1", "b", "2"]), ["a", "b"]);
        assert_eq!(keys(&t, &["EVAL", "s", "1", "k"]), Keys::AskRedis);
        assert_eq!(found(&t, &["PING"]), Vec::<String>::new());
    }

    #[test]
    fn unreadable_replies_are_errors() {
        assert!(CommandKeys::from_reply(&OwnedFrame::Error("NOPERM no".into())).is_err());
        assert!(CommandKeys::from_reply(&OwnedFrame::Array(vec![])).is_err());
        assert!(CommandKeys::from_reply(&OwnedFrame::Integer(1)).is_err());
        let nameless = OwnedFrame::Array(vec![OwnedFrame::Array(vec![OwnedFrame::Integer(1)])]);
        assert!(CommandKeys::from_reply(&nameless).is_err());
    }

    /// A key spec type a later Redis might add reads as unknown: Redis is asked.
    #[test]
    fn unknown_spec_types_ask_redis() {
        let bulk = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let spec = OwnedFrame::Array(vec![
            bulk("flags"),
            OwnedFrame::Array(vec![]),
            bulk("begin_search"),
            OwnedFrame::Array(vec![
                bulk("type"),
                bulk("index"),
                bulk("spec"),
                OwnedFrame::Array(vec![bulk("index"), OwnedFrame::Integer(1)]),
            ]),
            bulk("find_keys"),
            OwnedFrame::Array(vec![
                bulk("type"),
                bulk("pattern"),
                bulk("spec"),
                OwnedFrame::Array(vec![]),
            ]),
        ]);
        let reply = OwnedFrame::Array(vec![OwnedFrame::Array(vec![
            bulk("future"),
            OwnedFrame::Integer(-2),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Integer(1),
            OwnedFrame::Integer(1),
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(vec![spec]),
            OwnedFrame::Array(vec![]),
        ])]);
        let t = CommandKeys::from_reply(&reply).unwrap();
        assert_eq!(keys(&t, &["FUTURE", "k"]), Keys::AskRedis);
    }
}
