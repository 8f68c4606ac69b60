//! Shared mode's command table: which commands a client may send over a shared connection,
//! which state changes stormwall holds for it, and why the rest need a connection of the
//! client's own.
//!
//! A shared connection is only correct for a command whose meaning depends on nothing but
//! the key the connection was opened with (user, database, protocol). Commands that change
//! that state (`AUTH`, `HELLO`, `SELECT`, `CLIENT SETNAME`/`SETINFO`) are decided by Redis
//! and held by the session. Everything that depends on a connection of its own — an open
//! transaction, a blocked pop, subscriptions, connection flags, a reply mode, its id — moves
//! the client to a private connection for the rest of its life ("pins" it). A command
//! stormwall does not know pins too: unknown means private, the safe default.
//!
//! [`action`] is a pure function from the command to what to do, unit-tested here.

use crate::policy::Kind;
use crate::resp::request::Command;

/// Why a command needs a private connection. The label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    /// `MULTI`, `WATCH` and the rest of the transaction family.
    Transaction,
    /// Blocking commands: they may wait for another client's write, on their own connection.
    Blocking,
    /// Subscriptions: from then on the connection carries pushed messages.
    PubSub,
    Monitor,
    /// `CLIENT` subcommands about the connection itself (its id, tracking, reply mode, …)
    /// or other connections.
    Client,
    /// Connection flags and resets: `READONLY`, `READWRITE`, `ASKING`, `RESET`.
    ConnectionFlag,
    /// `SYNC`, `PSYNC`, `REPLCONF`.
    Replication,
    /// `DEBUG` and `SCRIPT DEBUG`.
    Debug,
    /// A state change stormwall cannot hold exactly (a password longer than it keeps, a
    /// `SELECT` or `HELLO` argument it cannot read as Redis does).
    UntrackedState,
    /// A command not in this table.
    Unknown,
    /// The client is not reading its replies (it writes a whole pipeline first, as
    /// `redis-py`'s `Pipeline.execute()` does): on a connection of its own Redis holds them,
    /// as it would for the client directly, instead of stormwall.
    UnreadReplies,
    /// The client received a reply over 1 MiB: on a shared connection the next one would
    /// hold up every other client's replies behind it for as long as it takes to move.
    LargeReplies,
}

/// Every pin reason's label, in [`PinReason`] order.
pub const PIN_REASONS: &[&str] = &[
    "transaction",
    "blocking",
    "pubsub",
    "monitor",
    "client",
    "connection_flag",
    "replication",
    "debug",
    "untracked_state",
    "unknown",
    "unread_replies",
    "large_replies",
];

impl PinReason {
    pub fn label(self) -> &'static str {
        PIN_REASONS[self as usize]
    }
}

/// What a shared client's command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send it on the shared connection.
    Share,
    /// Move to a private connection first.
    Pin(PinReason),
    /// `AUTH` or `HELLO`: decided by Redis on a spare connection in the client's state.
    Login,
    /// `SELECT`: checked by Redis on the shared connection, which is put back at once.
    Select,
    /// `CLIENT SETNAME`/`SETINFO`: checked by Redis, recorded, replayed on a pin.
    Name,
    /// `QUIT`: answered here (`+OK`, then the connection closes), since Redis would close
    /// the shared connection.
    Quit,
}

/// Longest command name in the table.
const MAX_NAME: usize = 24;

/// Decides how a shared client's command is carried. `kind` is the policy's class.
pub fn action(kind: Kind, cmd: &Command<'_>) -> Action {
    use PinReason::*;
    match kind {
        Kind::Multi | Kind::Exec | Kind::Discard => return Action::Pin(Transaction),
        Kind::Blocking => return blocking(cmd),
        Kind::Reset => return Action::Pin(ConnectionFlag),
        Kind::Quit => return Action::Quit,
        Kind::NoReply => return Action::Pin(Replication),
        _ => {}
    }
    let Some(name) = cmd.arg(0) else {
        return Action::Pin(Unknown);
    };
    let mut upper = [0u8; MAX_NAME];
    let Some(upper) = upper.get_mut(..name.len()) else {
        return Action::Pin(Unknown);
    };
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    match &*upper {
        b"AUTH" | b"HELLO" => Action::Login,
        b"SELECT" => Action::Select,
        b"WATCH" | b"UNWATCH" => Action::Pin(Transaction),
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
        | b"SUNSUBSCRIBE" => Action::Pin(PubSub),
        b"MONITOR" => Action::Pin(Monitor),
        b"SYNC" | b"PSYNC" | b"REPLCONF" => Action::Pin(Replication),
        b"READONLY" | b"READWRITE" | b"ASKING" => Action::Pin(ConnectionFlag),
        b"DEBUG" => Action::Pin(Debug),
        b"SCRIPT" if sub_is(cmd, b"DEBUG") => Action::Pin(Debug),
        b"CLIENT" if sub_is(cmd, b"SETNAME") || sub_is(cmd, b"SETINFO") => Action::Name,
        b"CLIENT" => Action::Pin(Client),
        known if SHARED.binary_search(&known).is_ok() => Action::Share,
        _ => Action::Pin(Unknown),
    }
}

/// `WAIT`/`WAITAOF`, which count the acknowledgements of the connection's own earlier
/// writes — made on the shared connection, for a client that pins for them.
pub fn counts_earlier_writes(cmd: &Command<'_>) -> bool {
    cmd.arg(0)
        .is_some_and(|n| n.eq_ignore_ascii_case(b"WAIT") || n.eq_ignore_ascii_case(b"WAITAOF"))
}

/// Sent on a private connection before a `WAIT`/`WAITAOF` that pinned it: any command Redis
/// propagates sets the connection's replication offset to the current one, which covers the
/// client's earlier writes on the shared connection, so `WAIT` waits for those as it would
/// have on the client's own connection. `PUBLISH` propagates without touching any key (its
/// channel has no subscribers unless someone subscribes to this very name).
pub fn write_barrier() -> Vec<bytes::Bytes> {
    vec![
        bytes::Bytes::from_static(b"PUBLISH"),
        bytes::Bytes::from_static(b"__stormwall__:wait-barrier"),
        bytes::Bytes::new(),
    ]
}

/// `XREAD`/`XREADGROUP` block only with `BLOCK`; the rest always may.
fn blocking(cmd: &Command<'_>) -> Action {
    let name = cmd.arg(0).unwrap_or_default();
    let stream_read =
        name.eq_ignore_ascii_case(b"XREAD") || name.eq_ignore_ascii_case(b"XREADGROUP");
    // A key or ID spelled "block" pins needlessly: the safe direction.
    if stream_read
        && !(1..cmd.argc()).any(|i| cmd.arg(i).is_some_and(|a| a.eq_ignore_ascii_case(b"BLOCK")))
    {
        return Action::Share;
    }
    Action::Pin(PinReason::Blocking)
}

fn sub_is(cmd: &Command<'_>, sub: &[u8]) -> bool {
    cmd.arg(1).is_some_and(|a| a.eq_ignore_ascii_case(sub))
}

/// Commands whose meaning depends only on the connection's user, database and protocol,
/// answered exactly once: safe on a shared connection. Sorted (binary search), upper case.
/// Governed invalidations (`DEL`, `UNLINK`, `FLUSHDB`, `FLUSHALL`) are here too: when the
/// shield passes one through, it travels like any write.
const SHARED: &[&[u8]] = &[
    b"ACL",
    b"APPEND",
    b"BGREWRITEAOF",
    b"BGSAVE",
    b"BITCOUNT",
    b"BITFIELD",
    b"BITFIELD_RO",
    b"BITOP",
    b"BITPOS",
    b"CLUSTER",
    b"COMMAND",
    b"CONFIG",
    b"COPY",
    b"DBSIZE",
    b"DECR",
    b"DECRBY",
    b"DEL",
    b"DUMP",
    b"ECHO",
    b"EVAL",
    b"EVALSHA",
    b"EVALSHA_RO",
    b"EVAL_RO",
    b"EXISTS",
    b"EXPIRE",
    b"EXPIREAT",
    b"EXPIRETIME",
    b"FAILOVER",
    b"FCALL",
    b"FCALL_RO",
    b"FLUSHALL",
    b"FLUSHDB",
    b"FUNCTION",
    b"GEOADD",
    b"GEODIST",
    b"GEOHASH",
    b"GEOPOS",
    b"GEORADIUS",
    b"GEORADIUSBYMEMBER",
    b"GEORADIUSBYMEMBER_RO",
    b"GEORADIUS_RO",
    b"GEOSEARCH",
    b"GEOSEARCHSTORE",
    b"GET",
    b"GETBIT",
    b"GETDEL",
    b"GETEX",
    b"GETRANGE",
    b"GETSET",
    b"HDEL",
    b"HEXISTS",
    b"HEXPIRE",
    b"HEXPIREAT",
    b"HEXPIRETIME",
    b"HGET",
    b"HGETALL",
    b"HGETDEL",
    b"HGETEX",
    b"HINCRBY",
    b"HINCRBYFLOAT",
    b"HKEYS",
    b"HLEN",
    b"HMGET",
    b"HMSET",
    b"HPERSIST",
    b"HPEXPIRE",
    b"HPEXPIREAT",
    b"HPEXPIRETIME",
    b"HPTTL",
    b"HRANDFIELD",
    b"HSCAN",
    b"HSET",
    b"HSETEX",
    b"HSETNX",
    b"HSTRLEN",
    b"HTTL",
    b"HVALS",
    b"INCR",
    b"INCRBY",
    b"INCRBYFLOAT",
    b"INFO",
    b"KEYS",
    b"LASTSAVE",
    b"LATENCY",
    b"LCS",
    b"LINDEX",
    b"LINSERT",
    b"LLEN",
    b"LMOVE",
    b"LMPOP",
    b"LOLWUT",
    b"LPOP",
    b"LPOS",
    b"LPUSH",
    b"LPUSHX",
    b"LRANGE",
    b"LREM",
    b"LSET",
    b"LTRIM",
    b"MEMORY",
    b"MGET",
    b"MIGRATE",
    b"MODULE",
    b"MOVE",
    b"MSET",
    b"MSETNX",
    b"OBJECT",
    b"PERSIST",
    b"PEXPIRE",
    b"PEXPIREAT",
    b"PEXPIRETIME",
    b"PFADD",
    b"PFCOUNT",
    b"PFDEBUG",
    b"PFMERGE",
    b"PFSELFTEST",
    b"PING",
    b"PSETEX",
    b"PTTL",
    b"PUBLISH",
    b"PUBSUB",
    b"RANDOMKEY",
    b"RENAME",
    b"RENAMENX",
    b"REPLICAOF",
    b"RESTORE",
    b"RESTORE-ASKING",
    b"ROLE",
    b"RPOP",
    b"RPOPLPUSH",
    b"RPUSH",
    b"RPUSHX",
    b"SADD",
    b"SAVE",
    b"SCAN",
    b"SCARD",
    b"SCRIPT",
    b"SDIFF",
    b"SDIFFSTORE",
    b"SET",
    b"SETBIT",
    b"SETEX",
    b"SETNX",
    b"SETRANGE",
    b"SHUTDOWN",
    b"SINTER",
    b"SINTERCARD",
    b"SINTERSTORE",
    b"SISMEMBER",
    b"SLAVEOF",
    b"SLOWLOG",
    b"SMEMBERS",
    b"SMISMEMBER",
    b"SMOVE",
    b"SORT",
    b"SORT_RO",
    b"SPOP",
    b"SPUBLISH",
    b"SRANDMEMBER",
    b"SREM",
    b"SSCAN",
    b"STRLEN",
    b"SUBSTR",
    b"SUNION",
    b"SUNIONSTORE",
    b"SWAPDB",
    b"TIME",
    b"TOUCH",
    b"TTL",
    b"TYPE",
    b"UNLINK",
    b"XACK",
    b"XADD",
    b"XAUTOCLAIM",
    b"XCLAIM",
    b"XDEL",
    b"XGROUP",
    b"XINFO",
    b"XLEN",
    b"XPENDING",
    b"XRANGE",
    b"XREAD",
    b"XREADGROUP",
    b"XREVRANGE",
    b"XSETID",
    b"XTRIM",
    b"ZADD",
    b"ZCARD",
    b"ZCOUNT",
    b"ZDIFF",
    b"ZDIFFSTORE",
    b"ZINCRBY",
    b"ZINTER",
    b"ZINTERCARD",
    b"ZINTERSTORE",
    b"ZLEXCOUNT",
    b"ZMPOP",
    b"ZMSCORE",
    b"ZPOPMAX",
    b"ZPOPMIN",
    b"ZRANDMEMBER",
    b"ZRANGE",
    b"ZRANGEBYLEX",
    b"ZRANGEBYSCORE",
    b"ZRANGESTORE",
    b"ZRANK",
    b"ZREM",
    b"ZREMRANGEBYLEX",
    b"ZREMRANGEBYRANK",
    b"ZREMRANGEBYSCORE",
    b"ZREVRANGE",
    b"ZREVRANGEBYLEX",
    b"ZREVRANGEBYSCORE",
    b"ZREVRANK",
    b"ZSCAN",
    b"ZSCORE",
    b"ZUNION",
    b"ZUNIONSTORE",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify;

    fn act(args: &[&[u8]]) -> Action {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        let cmd = Command::Inline { args: &args };
        action(classify(&cmd), &cmd)
    }

    #[test]
    fn table_is_sorted_and_unique() {
        assert!(
            SHARED.windows(2).all(|w| w[0] < w[1]),
            "SHARED must be sorted"
        );
        assert!(SHARED.iter().all(|n| n.len() <= MAX_NAME));
    }

    #[test]
    fn plain_commands_share_and_state_is_held() {
        assert_eq!(act(&[b"get", b"k"]), Action::Share);
        assert_eq!(act(&[b"DEL", b"k"]), Action::Share);
        assert_eq!(act(&[b"xread", b"STREAMS", b"s", b"0"]), Action::Share);
        assert_eq!(act(&[b"auth", b"pw"]), Action::Login);
        assert_eq!(act(&[b"HELLO", b"3"]), Action::Login);
        assert_eq!(act(&[b"select", b"2"]), Action::Select);
        assert_eq!(act(&[b"client", b"setname", b"x"]), Action::Name);
        assert_eq!(
            act(&[b"CLIENT", b"SETINFO", b"LIB-NAME", b"x"]),
            Action::Name
        );
        assert_eq!(act(&[b"quit"]), Action::Quit);
    }

    #[test]
    fn connection_bound_commands_pin_with_their_reason() {
        use PinReason::*;
        for (args, reason) in [
            (&[&b"MULTI"[..]][..], Transaction),
            (&[b"watch", b"k"], Transaction),
            (&[b"exec"], Transaction),
            (&[b"blpop", b"q", b"0"], Blocking),
            (
                &[b"xread", b"BLOCK", b"0", b"STREAMS", b"s", b"$"],
                Blocking,
            ),
            (&[b"wait", b"1", b"0"], Blocking),
            (&[b"subscribe", b"c"], PubSub),
            (&[b"monitor"], Monitor),
            (&[b"client", b"id"], Client),
            (&[b"client", b"tracking", b"on"], Client),
            (&[b"client", b"reply", b"off"], Client),
            (&[b"readonly"], ConnectionFlag),
            (&[b"reset"], ConnectionFlag),
            (&[b"debug", b"sleep", b"0"], Debug),
            (&[b"script", b"debug", b"yes"], Debug),
            (&[b"replconf", b"ack", b"1"], Replication),
            (&[b"no-such-command"], Unknown),
            (&[b"a-command-name-longer-than-the-table-allows"], Unknown),
        ] {
            assert_eq!(act(args), Action::Pin(reason), "{args:?}");
        }
    }
}
