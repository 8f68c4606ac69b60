//! Typed configuration: a TOML file, overridden by command-line flags, validated once.
//!
//! Every setting has a safe default so `stormwall --listen A --upstream B` works with no file.
//! Unknown keys are errors (a typo in an operator's file must not silently fall back to a
//! default), and every semantic check names the key it rejects, e.g. `listen.max_clients`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::Addr;

/// The whole configuration, one struct per TOML section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub invalidation: InvalidationConfig,
    pub flush: FlushConfig,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
    pub shutdown: ShutdownConfig,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
}

/// A setting a reload cannot change: what is bound, connected or installed once at start
/// (listeners, the upstream address, the admin endpoint, the reload watcher, the log format).
pub struct RestartOnly {
    /// The key as written in the file, e.g. `listen.address`; what the reload log names.
    pub key: &'static str,
    /// Copies this setting's value from the running config (first) into a reloaded one.
    keep: fn(&Config, &mut Config),
}

/// Every restart-only setting, in one place: the reload check, the merge that keeps running
/// values, the reload log and the documentation (`deploy/stormwall.example.toml`, the
/// README; a unit test keeps them in step) all come from this list. Anything not listed
/// changes live on reload.
pub const RESTART_ONLY: &[RestartOnly] = &[
    RestartOnly {
        key: "listen.address",
        keep: |from, into| into.listen.address = from.listen.address.clone(),
    },
    RestartOnly {
        key: "listen.unix_socket",
        keep: |from, into| into.listen.unix_socket = from.listen.unix_socket.clone(),
    },
    RestartOnly {
        key: "listen.tcp_keepalive",
        keep: |from, into| into.listen.tcp_keepalive = from.listen.tcp_keepalive,
    },
    RestartOnly {
        key: "listen.tls.address",
        // The running listener keeps its certificates if the new file drops the listener
        // (whose address only a restart changes), so it goes on serving until then.
        keep: |from, into| {
            into.listen.tls.address = from.listen.tls.address.clone();
            if into.listen.tls.loaded.get().is_none() {
                into.listen.tls.loaded = from.listen.tls.loaded.clone();
            }
        },
    },
    RestartOnly {
        key: "upstream.kind",
        keep: |from, into| into.upstream.kind = from.upstream.kind,
    },
    RestartOnly {
        key: "upstream.mode",
        keep: |from, into| into.upstream.mode = from.upstream.mode,
    },
    RestartOnly {
        key: "upstream.tls.enabled",
        // As for the listener: TLS to Redis stays usable until the restart that turns it off.
        keep: |from, into| {
            into.upstream.tls.enabled = from.upstream.tls.enabled;
            if into.upstream.tls.loaded.get().is_none() {
                into.upstream.tls.loaded = from.upstream.tls.loaded.clone();
            }
        },
    },
    RestartOnly {
        key: "upstream.shared_connections",
        keep: |from, into| into.upstream.shared_connections = from.upstream.shared_connections,
    },
    RestartOnly {
        key: "admin.enabled",
        keep: |from, into| into.admin.enabled = from.admin.enabled,
    },
    RestartOnly {
        key: "admin.address",
        keep: |from, into| into.admin.address = from.admin.address.clone(),
    },
    RestartOnly {
        key: "admin.probe_interval",
        keep: |from, into| into.admin.probe_interval = from.admin.probe_interval,
    },
    RestartOnly {
        key: "reload.watch_interval",
        keep: |from, into| into.reload.watch_interval = from.reload.watch_interval,
    },
    RestartOnly {
        key: "runtime.worker_threads",
        keep: |from, into| into.runtime.worker_threads = from.runtime.worker_threads,
    },
    RestartOnly {
        key: "log.format",
        keep: |from, into| into.log.format = from.log.format,
    },
];

/// Where clients connect, and how many may.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// `host:port` or a unix socket path.
    pub address: Addr,
    /// An additional unix socket to listen on, besides `address`.
    pub unix_socket: Option<PathBuf>,
    /// Connections beyond this get `-ERR max number of clients reached` and are closed.
    pub max_clients: usize,
    /// Close a client that has sent nothing and awaits no reply for this long. `0s` = never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// TCP keepalive probe interval for client sockets. `0s` = off.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// A TLS listener beside `address` (as Redis's `tls-port` beside `port`).
    pub tls: ListenTlsConfig,
}

/// `[listen.tls]`: the TLS listener, its certificate and how it checks clients'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenTlsConfig {
    /// `host:port` of the TLS listener. Unset: no TLS listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<Addr>,
    /// The certificate chain (PEM, leaf first) presented to clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM) of `cert_file`'s leaf certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Whether clients must present a certificate.
    pub client_auth: ClientAuth,
    /// A client that has not completed its TLS handshake within this is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// The certificates and keys read from the files above (filled by
    /// [`Config::load_tls`]; compared by file contents, so a rotation is a change).
    #[serde(skip)]
    pub loaded: crate::tls::Loaded<crate::tls::ServerSide>,
}

impl Default for ListenTlsConfig {
    fn default() -> Self {
        ListenTlsConfig {
            address: None,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth: ClientAuth::Off,
            handshake_timeout: Duration::from_secs(10),
            loaded: Default::default(),
        }
    }
}

/// `listen.tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    Off,
    /// A client may present one; if it does, it must chain to `client_ca_file`.
    Optional,
    /// A client must present one chaining to `client_ca_file`.
    Required,
}

/// `[upstream.tls]`: TLS to Redis.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// Connect to Redis over TLS.
    pub enabled: bool,
    /// CA certificates (PEM) Redis's certificate must chain to. Unset: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The name sent (SNI) and verified. Unset: the host part of `upstream.address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate chain (PEM) for mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM) of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Accept any certificate Redis presents. Dangerous (anyone on the path can read and
    /// change the traffic); logs a warning at start.
    pub insecure_skip_verify: bool,
    /// What the files above hold (filled by [`Config::load_tls`]).
    #[serde(skip)]
    pub loaded: crate::tls::Loaded<crate::tls::ClientSide>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            address: Addr::Tcp("127.0.0.1:6380".into()),
            unix_socket: None,
            max_clients: 10_000,
            idle_timeout: Duration::ZERO,
            tcp_keepalive: Duration::from_secs(300),
            tls: ListenTlsConfig::default(),
        }
    }
}

/// The Redis server behind the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// What kind of upstream: one Redis at `address`, or the master a set of Sentinels
    /// names ([`UpstreamKind`]).
    pub kind: UpstreamKind,
    /// `host:port` or a unix socket path (`kind = "standalone"`).
    pub address: Addr,
    /// Sentinel addresses, `host:port` (`kind = "sentinel"`), asked in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sentinels: Vec<String>,
    /// The master's name as the Sentinels know it (`kind = "sentinel"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
    /// Cluster nodes to ask for the slot map, `host:port` (`kind = "cluster"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<String>,
    /// The user stormwall authenticates to the Sentinels as (Sentinel's own ACL); unset:
    /// `default`, with `sentinel_password_file` if that is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel_user: Option<String>,
    /// A file holding the Sentinels' password (`requirepass` in sentinel.conf); unset: no
    /// authentication. Read at every connection to a Sentinel, so a rotated file applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel_password_file: Option<PathBuf>,
    /// How long one attempt to open a connection to Redis may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a non-blocking command may wait for Redis to start answering before the
    /// connection is declared dead. Blocking commands (`BLPOP`, `XREAD BLOCK`, `WAIT`, …)
    /// and pub/sub are exempt. `0s` = wait forever.
    #[serde(with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// TCP keepalive probe interval for upstream sockets. `0s` = off.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// Whether clients share upstream connections ([`UpstreamMode`]).
    pub mode: UpstreamMode,
    /// Shared connections per upstream identity (user, password, database, protocol).
    /// Unset: one per runtime worker thread (`runtime.worker_threads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_connections: Option<usize>,
    /// Connections kept open and idle, ready for a client that needs one of its own (a pin)
    /// or for checking an `AUTH`/`HELLO`, so neither waits for a connect.
    pub spare_connections: usize,
    /// Shared mode: how long a command waits for Redis to come back (reconnecting with
    /// backoff) before the client's connection is closed. `0s` = close at once.
    #[serde(with = "humantime_serde")]
    pub outage_wait: Duration,
    /// TLS to Redis.
    pub tls: UpstreamTlsConfig,
    /// Where Redis is now (runtime state shared by every copy of the configuration).
    #[serde(skip)]
    pub target: std::sync::Arc<crate::upstream::Target>,
}

/// What stands behind `[upstream]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// One Redis server at `upstream.address`.
    #[default]
    Standalone,
    /// The master that `upstream.sentinels` name for `upstream.master_name`, followed
    /// through failovers.
    Sentinel,
    /// A Redis Cluster, found through `upstream.seeds`: each command goes to the master of
    /// its keys' slot (`crate::cluster`, `session::cluster`). Shared mode only.
    Cluster,
}

/// How client connections map to Redis connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// Clients whose connection state stormwall can hold share a few connections per
    /// identity; a client that needs a connection of its own (a transaction, a blocking
    /// command, pub/sub, …) moves to a private one for the rest of its life.
    Shared,
    /// Every client gets its own Redis connection for its whole life.
    Dedicated,
}

impl UpstreamConfig {
    /// How long stormwall waits for Redis to answer one of its own commands (a handshake,
    /// a check on a spare): as long as a client's command may wait (`reply_timeout`), so a
    /// Redis busy with a slow script is waited for, not taken for gone.
    pub fn reply_wait(&self) -> Duration {
        if self.reply_timeout.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.reply_timeout
        }
    }

    /// Shared connections per identity, with the default applied.
    pub fn shared_connections(&self, worker_threads: usize) -> usize {
        self.shared_connections.unwrap_or(worker_threads).max(1)
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            kind: UpstreamKind::Standalone,
            address: Addr::Tcp("127.0.0.1:6379".into()),
            sentinels: Vec::new(),
            master_name: None,
            seeds: Vec::new(),
            sentinel_user: None,
            sentinel_password_file: None,
            connect_timeout: Duration::from_secs(2),
            reply_timeout: Duration::from_secs(30),
            tcp_keepalive: Duration::from_secs(300),
            mode: UpstreamMode::Shared,
            shared_connections: None,
            spare_connections: 2,
            outage_wait: Duration::from_secs(5),
            tls: UpstreamTlsConfig::default(),
            target: Default::default(),
        }
    }
}

/// Bounds on what one client may make stormwall hold in memory (contract point G6). The
/// defaults are Redis's own, so that with them stormwall accepts and refuses exactly what
/// Redis does; lower values refuse with the answer Redis gives for the same overflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest bulk string accepted in a request or reply (Redis's `proto-max-bulk-len`).
    /// A longer request argument gets `Protocol error: invalid bulk length`.
    pub max_bulk_len: u64,
    /// Most arguments in one request (Redis's ceiling is 2^31-1). More gets
    /// `Protocol error: invalid multibulk length`. Nothing is reserved per declared argument.
    pub max_array_len: u64,
    /// Largest single request, all arguments together, which stormwall holds until it is
    /// complete (Redis's `client-query-buffer-limit`, at least 1 MiB). Past it the connection
    /// is closed without a reply, as Redis closes a client past its query buffer limit.
    pub max_request_bytes: u64,
    /// Deprecated and ignored: replies are framed at any depth, because Redis returns
    /// arrays nested thousands deep from Lua. Accepted so that older config files still
    /// load; [`Config::deprecations`] asks for its removal.
    #[serde(default, skip_serializing)]
    pub max_reply_depth: Option<u64>,
}

/// Redis's `INT_MAX` ceiling on a request's argument count.
pub const MAX_ARRAY_LEN: u64 = i32::MAX as u64;
/// Most `[[flush.rules]]` entries (each FLUSHDB is matched against them in order).
pub const MAX_FLUSH_RULES: usize = 1000;
/// Redis's minimum `client-query-buffer-limit`.
pub const MIN_REQUEST_BYTES: u64 = 1024 * 1024;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: MAX_ARRAY_LEN,
            max_request_bytes: 1024 * 1024 * 1024,
            max_reply_depth: None,
        }
    }
}

/// The invalidation shield for `DEL`/`UNLINK`: batching, queue bounds and rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvalidationConfig {
    /// Govern `DEL`/`UNLINK`/`FLUSHDB`/`FLUSHALL`. `false` passes them through like any command.
    pub enabled: bool,
    /// `enforce`: the shield acts. `observe`: governed commands pass through untouched (as
    /// with `enabled = false`) while a shadow model counts what the shield would have done
    /// (`invalidation/observe.rs`), for a safe first rollout. Read live by every session.
    pub mode: InvalidationMode,
    /// What deletes keys in Redis: `unlink` frees memory off Redis's main thread.
    pub delete_command: DeleteCommand,
    /// Most distinct keys in one batch (a single larger request still goes out alone).
    pub max_batch_keys: usize,
    /// Extra time a batch waits for company after the executor is free. `0s`: none, so an
    /// idle proxy adds no latency; requests arriving during a batch form the next one.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// Invalidation requests waiting or executing, across all clients.
    pub max_pending: usize,
    /// Keys in those requests.
    pub max_pending_keys: usize,
    /// Longest a request may wait before being executed; past it, it is answered with
    /// `-TRYAGAIN` and was not applied.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// When the queue is full: `wait` (stop reading from that client until there is room,
    /// up to `max_wait`) or `reject` (answer `-BUSY` at once).
    pub on_full: OnFull,
    /// Keys deleted in Redis per second, and how many may go at once. With `shared_budget`,
    /// the total for every stormwall in front of the same Redis.
    pub keys_per_second: u32,
    pub keys_burst: u32,
    /// Invalidation commands sent to Redis per second, and burst: commands that reach
    /// Redis, not client requests (a batch of pipelined deletes run as one script is one).
    /// With `shared_budget`, the total for every stormwall in front of the same Redis.
    pub commands_per_second: u32,
    pub commands_burst: u32,
    /// The budgets (keys, commands, `flush.min_interval`) follow Redis's latency: cut while
    /// Redis answers slower than its healthy baseline, grown back when it recovers, never
    /// above the configured values (`invalidation/adaptive.rs`).
    pub adaptive: bool,
    /// The least the adaptive budget goes down to, as a fraction of the configured budgets.
    pub adaptive_floor: f64,
    /// Keep the two budgets above in Redis itself, so that every stormwall in front of the
    /// same Redis takes from one budget (see `invalidation::shared_budget`). When Redis
    /// cannot run the budget's script, each stormwall falls back to a local budget at the
    /// same rates.
    pub shared_budget: bool,
    /// The prefix of the shared budget's two keys in Redis (`<prefix>:keys` and
    /// `<prefix>:commands`, database 0). Its `{…}` hash tag keeps both in one Cluster slot.
    pub shared_budget_key: String,
    /// The Redis user stormwall's own budget connection logs in as (unset: the default
    /// user). It needs `EVALSHA`, `EVAL`, and `TIME`, `GET`, `SET` on the budget's keys.
    pub shared_budget_user: Option<String>,
    /// A file holding that connection's password (read at each connect, so the config holds
    /// no secret and a rotated password is picked up on the next connection). Without
    /// `shared_budget_user`, it is `requirepass`'s password for the default user.
    pub shared_budget_password_file: Option<PathBuf>,
    /// The shield keeps a worker and a Redis connection per identity (user, password,
    /// database); one unused for this long is closed, and its password forgotten.
    #[serde(with = "humantime_serde")]
    pub identity_idle_timeout: Duration,
    /// Most identities with a live worker at once. Invalidations of further identities pass
    /// through ungoverned on the client's own connection (so one client cycling through
    /// passwords cannot make the shield open unbounded connections to Redis).
    pub max_identities: usize,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        InvalidationConfig {
            enabled: true,
            mode: InvalidationMode::Enforce,
            delete_command: DeleteCommand::Unlink,
            max_batch_keys: 1000,
            batch_delay: Duration::ZERO,
            max_pending: 10_000,
            max_pending_keys: 1_000_000,
            max_wait: Duration::from_secs(5),
            on_full: OnFull::Wait,
            keys_per_second: 100_000,
            keys_burst: 10_000,
            commands_per_second: 2_000,
            commands_burst: 200,
            shared_budget: false,
            shared_budget_key: "{stormwall:budget}".into(),
            shared_budget_user: None,
            shared_budget_password_file: None,
            adaptive: true,
            adaptive_floor: 0.05,
            identity_idle_timeout: Duration::from_secs(60),
            max_identities: 64,
        }
    }
}

/// Whether the shield acts on governed commands or only counts what it would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidationMode {
    /// Coalesce, batch, rate-limit and refuse as configured (the shield).
    Enforce,
    /// Pass every governed command through untouched, and count what enforcement would
    /// have done (`stormwall_invalidation_observed_total`).
    Observe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteCommand {
    Unlink,
    Del,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    Wait,
    Reject,
}

/// Flush coalescing and limits for `FLUSHDB`/`FLUSHALL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Least time between two flushes of the same target (a database, or all of them).
    /// Requests arriving meanwhile are all answered by the next flush.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// `async` (Redis frees memory in the background; its main thread never blocks),
    /// `sync`, or `as-requested` (keep the client's `ASYNC`/`SYNC`).
    pub mode: FlushMode,
    /// Commands refused outright with an error, e.g. `["FLUSHALL"]`.
    pub deny: Vec<FlushCommand>,
    /// Flushes of a target that may go at once before `min_interval` spacing applies, so an
    /// occasional flush (a test suite's teardown) is never delayed.
    pub burst: u32,
    /// How long a scoped flush ([`FlushRule`]) may take in all, from its arrival to its
    /// answer: waiting for its turn, then the whole `SCAN` + delete of its pattern. Past it,
    /// a request whose scan had not started is refused (not applied); one whose scan had
    /// deleted keys ends with a closed connection (partly applied).
    #[serde(with = "humantime_serde")]
    pub scoped_max_wait: Duration,
    /// Scoped flush rules, first match wins: a client's `FLUSHDB` becomes the deletion of the
    /// keys matching the rule's pattern only (`[[flush.rules]]` in the file).
    pub rules: Vec<FlushRule>,
}

/// One `[[flush.rules]]` entry: which clients it matches (every given matcher must match;
/// at least one is required), and the keys their `FLUSHDB` deletes instead of the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushRule {
    /// The client's name as set by `CLIENT SETNAME` or `HELLO … SETNAME`: exact, or a glob
    /// (`*`, `?`, `[…]`, `\` as in Redis's `KEYS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_name: Option<String>,
    /// The ACL user the client is authenticated as (`default` for a client that never
    /// named one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The database the client has selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<i64>,
    /// The keys a matching client's `FLUSHDB` deletes: a `SCAN … MATCH` glob.
    pub pattern: String,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            min_interval: Duration::from_secs(1),
            mode: FlushMode::Async,
            deny: Vec::new(),
            burst: 3,
            scoped_max_wait: Duration::from_secs(60),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlushMode {
    Async,
    Sync,
    AsRequested,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlushCommand {
    #[serde(rename = "FLUSHDB", alias = "flushdb")]
    FlushDb,
    #[serde(rename = "FLUSHALL", alias = "flushall")]
    FlushAll,
}

/// The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, `/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// `host:port`; loopback by default so metrics are not exposed by accident.
    pub address: String,
    /// How often the readiness probe checks that Redis answers.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            address: "127.0.0.1:9380".into(),
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// Live reload of the config file (always on `SIGHUP`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Also reload when the file's contents change, checked this often. `0s` = only on SIGHUP.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch_interval: Duration::ZERO,
        }
    }
}

/// Graceful shutdown on SIGTERM/SIGINT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After the signal, in-flight commands get this long to finish before the process exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The async runtime the proxy runs on (see `runtime()` in `src/main.rs` for why one thread
/// is the default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// 1: one thread runs everything, and commands from different clients reach Redis in the
    /// order they reached stormwall. More: tokio's multi-thread scheduler with this many
    /// workers, for more forwarding throughput than one core gives, at the price of commands
    /// sent back to back on different connections sometimes reaching Redis out of order.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `stormwall=debug`. `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// A configuration that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates config text (`path` only names it in errors): what
    /// [`from_file`](Self::from_file) does after reading, and what the fuzzer drives.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Warnings for settings that are accepted but no longer do anything; the binary logs
    /// them at start and on every reload.
    pub fn deprecations(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.limits.max_reply_depth.is_some() {
            out.push(
                "limits.max_reply_depth is deprecated and ignored: replies are framed at any \
                 nesting depth (Redis returns arrays nested thousands deep from Lua); remove \
                 it from the config file",
            );
        }
        out
    }

    /// Rejects values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        if self.listen.max_clients == 0 {
            return Err(invalid("listen.max_clients", "must be at least 1"));
        }
        if self.upstream.connect_timeout.is_zero() {
            return Err(invalid(
                "upstream.connect_timeout",
                "must be greater than 0s",
            ));
        }
        let l = &self.limits;
        if l.max_bulk_len == 0 {
            return Err(invalid("limits.max_bulk_len", "must be at least 1"));
        }
        if l.max_array_len == 0 || l.max_array_len > MAX_ARRAY_LEN {
            return Err(invalid(
                "limits.max_array_len",
                format!("must be between 1 and {MAX_ARRAY_LEN} (Redis's own ceiling)"),
            ));
        }
        if l.max_request_bytes < MIN_REQUEST_BYTES {
            return Err(invalid(
                "limits.max_request_bytes",
                "must be at least 1 MiB (1048576), like Redis's client-query-buffer-limit",
            ));
        }
        let inv = &self.invalidation;
        for (key, value) in [
            ("invalidation.max_batch_keys", inv.max_batch_keys),
            ("invalidation.max_pending", inv.max_pending),
            ("invalidation.max_pending_keys", inv.max_pending_keys),
            ("invalidation.keys_per_second", inv.keys_per_second as usize),
            ("invalidation.keys_burst", inv.keys_burst as usize),
            (
                "invalidation.commands_per_second",
                inv.commands_per_second as usize,
            ),
            ("invalidation.commands_burst", inv.commands_burst as usize),
            ("invalidation.max_identities", inv.max_identities),
            ("flush.burst", self.flush.burst as usize),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if inv.shared_budget_key.is_empty() {
            return Err(invalid(
                "invalidation.shared_budget_key",
                "must not be empty",
            ));
        }
        if inv.shared_budget_user.as_deref() == Some("") {
            return Err(invalid(
                "invalidation.shared_budget_user",
                "must not be empty (leave it unset for the default user)",
            ));
        }
        if inv.shared_budget_user.is_some() && inv.shared_budget_password_file.is_none() {
            return Err(invalid(
                "invalidation.shared_budget_user",
                "needs invalidation.shared_budget_password_file (a nopass user accepts any \
                 password in the file)",
            ));
        }
        if !(inv.adaptive_floor > 0.0 && inv.adaptive_floor <= 1.0) {
            return Err(invalid(
                "invalidation.adaptive_floor",
                "must be a fraction greater than 0 and at most 1",
            ));
        }
        if inv.identity_idle_timeout.is_zero() {
            return Err(invalid(
                "invalidation.identity_idle_timeout",
                "must be greater than 0s",
            ));
        }
        if inv.max_wait.is_zero() {
            return Err(invalid("invalidation.max_wait", "must be greater than 0s"));
        }
        if self.flush.min_interval >= inv.max_wait {
            return Err(invalid(
                "flush.min_interval",
                "must be shorter than invalidation.max_wait, or flushes would time out waiting for their turn",
            ));
        }
        self.validate_rules()?;
        if self.admin.enabled && self.admin.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "admin.address",
                format!("`{}` is not an ip:port address", self.admin.address),
            ));
        }
        if self.admin.probe_interval.is_zero() {
            return Err(invalid("admin.probe_interval", "must be greater than 0s"));
        }
        if self.upstream.shared_connections == Some(0)
            || self.upstream.shared_connections > Some(1024)
        {
            return Err(invalid(
                "upstream.shared_connections",
                "must be between 1 and 1024",
            ));
        }
        if self.upstream.spare_connections > 1024 {
            return Err(invalid(
                "upstream.spare_connections",
                "must be at most 1024",
            ));
        }
        if !(1..=1024).contains(&self.runtime.worker_threads) {
            return Err(invalid(
                "runtime.worker_threads",
                "must be between 1 and 1024",
            ));
        }
        self.validate_sentinel()?;
        self.validate_cluster()?;
        self.validate_tls()?;
        if let Err(e) = crate::logging::parse_filter(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a valid tracing filter ({e})", self.log.level),
            ));
        }
        Ok(())
    }

    /// A Sentinel upstream's settings: where the Sentinels are and which master to follow.
    fn validate_sentinel(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
        let u = &self.upstream;
        if u.kind != UpstreamKind::Sentinel {
            return Ok(());
        }
        if u.sentinels.is_empty() {
            return Err(invalid(
                "upstream.sentinels",
                "needs at least one Sentinel address with upstream.kind = \"sentinel\"".into(),
            ));
        }
        for s in &u.sentinels {
            if !matches!(s.parse::<Addr>(), Ok(Addr::Tcp(_))) {
                return Err(invalid(
                    "upstream.sentinels",
                    format!("`{s}` is not a host:port address"),
                ));
            }
        }
        match u.master_name.as_deref() {
            Some(name) if !name.is_empty() && !name.bytes().any(|b| b <= b' ') => {}
            _ => {
                return Err(invalid(
                    "upstream.master_name",
                    "is required with upstream.kind = \"sentinel\" (the name in Sentinel's \
                     `sentinel monitor <name> …`), without spaces"
                        .into(),
                ));
            }
        }
        if u.sentinel_user.is_some() && u.sentinel_password_file.is_none() {
            return Err(invalid(
                "upstream.sentinel_user",
                "needs upstream.sentinel_password_file".into(),
            ));
        }
        if u.tls.enabled && u.tls.server_name.is_none() {
            return Err(invalid(
                "upstream.tls.server_name",
                "is required with TLS to a Sentinel-managed master (its address is only known \
                 at run time)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A cluster upstream's seeds and mode, and the settings that do not apply to one.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
        let u = &self.upstream;
        if u.kind != UpstreamKind::Cluster {
            return Ok(());
        }
        if u.seeds.is_empty() {
            return Err(invalid(
                "upstream.seeds",
                "needs at least one cluster node address with upstream.kind = \"cluster\"".into(),
            ));
        }
        for s in &u.seeds {
            if !matches!(s.parse::<Addr>(), Ok(Addr::Tcp(_))) {
                return Err(invalid(
                    "upstream.seeds",
                    format!("`{s}` is not a host:port address"),
                ));
            }
        }
        if u.mode == UpstreamMode::Dedicated {
            return Err(invalid(
                "upstream.mode",
                "upstream.mode = \"dedicated\" cannot be used with upstream.kind = \"cluster\": a \
                 cluster client's commands go to many masters, over shared connections to each; \
                 use upstream.mode = \"shared\""
                    .into(),
            ));
        }
        if !self.flush.rules.is_empty() {
            return Err(invalid(
                "flush.rules",
                "scoped flushes are not supported with upstream.kind = \"cluster\" (a scan and \
                 its deletes would have to run per master and per slot); remove [[flush.rules]]"
                    .into(),
            ));
        }
        if self.invalidation.shared_budget {
            return Err(invalid(
                "invalidation.shared_budget",
                "is not supported with upstream.kind = \"cluster\" (the budget's keys would \
                 live on one master); set it to false"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The TLS settings that can be checked without reading files (the files are read and
    /// checked by [`load_tls`](Self::load_tls)).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| ConfigError::Invalid {
            key,
            message: message.into(),
        };
        let l = &self.listen.tls;
        if let Some(addr) = &l.address {
            if !matches!(addr, Addr::Tcp(_)) {
                return Err(invalid("listen.tls.address", "must be host:port"));
            }
            if l.cert_file.is_none() {
                return Err(invalid(
                    "listen.tls.cert_file",
                    "is required with listen.tls.address",
                ));
            }
            if l.key_file.is_none() {
                return Err(invalid(
                    "listen.tls.key_file",
                    "is required with listen.tls.address",
                ));
            }
            if l.client_auth != ClientAuth::Off && l.client_ca_file.is_none() {
                return Err(invalid(
                    "listen.tls.client_ca_file",
                    "is required when listen.tls.client_auth is optional or required",
                ));
            }
            if l.handshake_timeout.is_zero() {
                return Err(invalid(
                    "listen.tls.handshake_timeout",
                    "must be greater than 0s",
                ));
            }
        }
        let u = &self.upstream.tls;
        if u.enabled {
            if !matches!(self.upstream.address, Addr::Tcp(_)) {
                return Err(invalid(
                    "upstream.tls.enabled",
                    "needs a host:port upstream.address (not a unix socket)",
                ));
            }
            if u.cert_file.is_some() != u.key_file.is_some() {
                return Err(invalid(
                    "upstream.tls.key_file",
                    "upstream.tls.cert_file and upstream.tls.key_file go together",
                ));
            }
            if u.server_name.as_deref() == Some("") {
                return Err(invalid("upstream.tls.server_name", "must not be empty"));
            }
        }
        Ok(())
    }

    /// Reads and checks every configured certificate and key (PEM parses, the key matches
    /// its certificate, the server name is valid) and keeps what they hold in the config,
    /// ready for handshakes. An error names the setting and the file.
    pub fn load_tls(&mut self) -> Result<(), ConfigError> {
        let invalid =
            |(key, message): (&'static str, String)| ConfigError::Invalid { key, message };
        self.listen.tls.loaded = match self.listen.tls.address {
            Some(_) => crate::tls::Loaded::new(
                crate::tls::ServerSide::load(&self.listen.tls).map_err(invalid)?,
            ),
            None => Default::default(),
        };
        self.upstream.tls.loaded = if self.upstream.tls.enabled {
            crate::tls::Loaded::new(
                crate::tls::ClientSide::load(&self.upstream.tls, &self.upstream.address)
                    .map_err(invalid)?,
            )
        } else {
            Default::default()
        };
        Ok(())
    }

    /// Checks `flush.scoped_max_wait` and every `[[flush.rules]]` entry (numbered from 1 in
    /// errors, in file order).
    fn validate_rules(&self) -> Result<(), ConfigError> {
        let flush = &self.flush;
        if flush.scoped_max_wait <= flush.min_interval {
            return Err(ConfigError::Invalid {
                key: "flush.scoped_max_wait",
                message: "must be longer than flush.min_interval, or scoped flushes would time \
                          out waiting for their turn"
                    .into(),
            });
        }
        if flush.rules.len() > MAX_FLUSH_RULES {
            return Err(ConfigError::Invalid {
                key: "flush.rules",
                message: format!("at most {MAX_FLUSH_RULES} rules"),
            });
        }
        for (i, rule) in flush.rules.iter().enumerate() {
            let invalid = |key: &'static str, what: &str| ConfigError::Invalid {
                key,
                message: format!("in rule {} of [[flush.rules]]: {what}", i + 1),
            };
            if rule.client_name.is_none() && rule.user.is_none() && rule.db.is_none() {
                return Err(invalid(
                    "flush.rules",
                    "needs at least one of `client_name`, `user`, `db` (a rule matching every \
                     client would make every FLUSHDB a scoped one; use `pattern = \"*\"` with \
                     a matcher if that is meant)",
                ));
            }
            if rule.pattern.is_empty() {
                return Err(invalid("flush.rules.pattern", "must not be empty"));
            }
            if let Some(name) = &rule.client_name
                && (name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f))
            {
                // Redis refuses such names in CLIENT SETNAME: the rule could never match.
                return Err(invalid(
                    "flush.rules.client_name",
                    "must be non-empty, without spaces or control characters (Redis refuses \
                     such client names)",
                ));
            }
            if rule.user.as_deref() == Some("") {
                return Err(invalid("flush.rules.user", "must not be empty"));
            }
            if rule.db.is_some_and(|db| db < 0) {
                return Err(invalid("flush.rules.db", "must be 0 or more"));
            }
        }
        Ok(())
    }

    /// Settings that only take effect at start ([`RESTART_ONLY`]): the keys whose values
    /// differ between `self` and `new`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        RESTART_ONLY
            .iter()
            .filter(|setting| {
                // Changed if putting the running value back into `new` changes `new`.
                let mut kept = new.clone();
                (setting.keep)(self, &mut kept);
                kept != *new
            })
            .map(|setting| setting.key)
            .collect()
    }

    /// `new` with every restart-only setting kept as it is in `self`, so a reload applies
    /// what it can and leaves the rest as the running process has it.
    pub fn with_live_changes_from(&self, new: &Config) -> Config {
        let mut merged = new.clone();
        for setting in RESTART_ONLY {
            (setting.keep)(self, &mut merged);
        }
        // Where Redis is lives on; the reload applies a new address to it (`Target::follow`).
        merged.upstream.target = self.upstream.target.clone();
        merged
    }

    /// The effective configuration as TOML, for `--check-config`.
    pub fn to_toml(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    /// A cluster upstream needs seeds (host:port) and shared mode, and takes neither scoped
    /// flushes nor the shared budget.
    #[test]
    fn cluster_upstream_settings_are_checked() {
        let err = parse("[upstream]\nkind = \"cluster\"\n").unwrap_err();
        assert!(
            err.contains("upstream.seeds") && err.contains("at least one"),
            "{err}"
        );
        let err = parse("[upstream]\nkind = \"cluster\"\nseeds = [\"nope\"]\n").unwrap_err();
        assert!(err.contains("`nope` is not a host:port address"), "{err}");
        let err =
            parse("[upstream]\nkind = \"cluster\"\nseeds = [\"/tmp/redis.sock\"]\n").unwrap_err();
        assert!(err.contains("upstream.seeds"), "{err}");
        let cluster =
            "[upstream]\nkind = \"cluster\"\nseeds = [\"10.0.0.1:7000\", \"redis-1:7000\"]\n";
        let c = parse(cluster).unwrap();
        assert_eq!(c.upstream.kind, UpstreamKind::Cluster);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        // A cluster client's commands go to many masters: shared connections only.
        let err = parse(&format!("{cluster}mode = \"dedicated\"\n")).unwrap_err();
        assert!(
            err.contains("upstream.mode") && err.contains("cannot be used with"),
            "{err}"
        );
        let err = parse(&format!(
            "{cluster}[[flush.rules]]\nclient_name = \"a*\"\npattern = \"a:*\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("flush.rules"), "{err}");
        let err = parse(&format!("{cluster}[invalidation]\nshared_budget = true\n")).unwrap_err();
        assert!(err.contains("invalidation.shared_budget"), "{err}");
        // Seeds beside another kind are ignored, as Sentinels are beside a standalone one.
        assert!(parse("[upstream]\nseeds = [\"10.0.0.1:7000\"]\n").is_ok());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[listen]\nmax_clientz = 5\n").unwrap_err();
        assert!(err.contains("max_clientz"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = parse("[listen]\nmax_clients = 0\n").unwrap_err();
        assert!(err.contains("listen.max_clients"), "{err}");
        let err = parse("[upstream]\nconnect_timeout = \"soon\"\n").unwrap_err();
        assert!(err.contains("connect_timeout"), "{err}");
        for (text, key) in [
            ("[flush]\nburst = 0\n", "flush.burst"),
            (
                "[invalidation]\nmax_identities = 0\n",
                "invalidation.max_identities",
            ),
            (
                "[invalidation]\nidentity_idle_timeout = \"0s\"\n",
                "invalidation.identity_idle_timeout",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn durations_and_addresses_parse() {
        let c = parse(
            "[listen]\naddress = \"/tmp/sw.sock\"\nidle_timeout = \"5m\"\n\
             [upstream]\naddress = \"redis:6379\"\n",
        )
        .unwrap();
        assert_eq!(c.listen.address, Addr::Unix("/tmp/sw.sock".into()));
        assert_eq!(c.listen.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.upstream.address, Addr::Tcp("redis:6379".into()));
    }

    #[test]
    fn example_config_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/stormwall.example.toml");
        let example = Config::from_file(&path).unwrap();
        assert_eq!(
            example,
            Config::default(),
            "deploy/stormwall.example.toml is out of step"
        );
        // And it shows every setting (a missing one would still parse, as its default).
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        let mut sections: Vec<(String, toml::Table)> = Vec::new();
        for (section, keys) in defaults {
            let Some(table) = keys.as_table() else {
                continue;
            };
            // Nested tables (`[listen.tls]`) are sections of their own.
            for (key, value) in table {
                if let Some(sub) = value.as_table() {
                    sections.push((format!("{section}.{key}"), sub.clone()));
                }
            }
            sections.push((section, table.clone()));
        }
        for (section, keys) in sections {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing from the example"
            );
            for key in keys.iter().filter(|(_, v)| !v.is_table()).map(|(k, _)| k) {
                assert!(
                    text.lines()
                        .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} ="))),
                    "{section}.{key} missing from the example config"
                );
            }
        }
    }

    /// A non-default value for every restart-only key, as TOML.
    fn changed_value(key: &str) -> &'static str {
        match key {
            "listen.address" => "[listen]\naddress = \"127.0.0.1:7001\"\n",
            "listen.unix_socket" => "[listen]\nunix_socket = \"/tmp/sw-test.sock\"\n",
            "listen.tcp_keepalive" => "[listen]\ntcp_keepalive = \"1m\"\n",
            "upstream.kind" => {
                "[upstream]\nkind = \"sentinel\"\nsentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"m\"\n"
            }
            "admin.enabled" => "[admin]\nenabled = false\n",
            "admin.address" => "[admin]\naddress = \"127.0.0.1:7003\"\n",
            "admin.probe_interval" => "[admin]\nprobe_interval = \"3s\"\n",
            "reload.watch_interval" => "[reload]\nwatch_interval = \"10s\"\n",
            "runtime.worker_threads" => "[runtime]\nworker_threads = 2\n",
            "upstream.mode" => "[upstream]\nmode = \"dedicated\"\n",
            "upstream.shared_connections" => "[upstream]\nshared_connections = 3\n",
            "log.format" => "[log]\nformat = \"json\"\n",
            "listen.tls.address" => {
                "[listen.tls]\naddress = \"127.0.0.1:7004\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n"
            }
            "upstream.tls.enabled" => "[upstream.tls]\nenabled = true\n",
            other => panic!("restart-only key {other} has no test value here"),
        }
    }

    #[test]
    fn each_restart_only_key_is_reported_and_kept() {
        for setting in RESTART_ONLY {
            // The TLS listener's address needs its files named; they are live settings, so
            // the running config names the same ones.
            let running = match setting.key {
                "listen.tls.address" => {
                    parse("[listen.tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n").unwrap()
                }
                // Where the Sentinels are is a live setting.
                "upstream.kind" => {
                    parse("[upstream]\nsentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"m\"\n")
                        .unwrap()
                }
                _ => Config::default(),
            };
            let new = parse(changed_value(setting.key)).unwrap();
            assert_ne!(new, running, "{}: test value is the default", setting.key);
            assert_eq!(running.restart_only_changes(&new), vec![setting.key]);
            assert_eq!(
                running.with_live_changes_from(&new),
                running,
                "{} changed on reload",
                setting.key
            );
        }
    }

    #[test]
    fn flush_rules_parse_and_bad_ones_name_the_key() {
        let c = parse(
            "[[flush.rules]]\nclient_name = \"appA*\"\npattern = \":1:*\"\n\
             [[flush.rules]]\nuser = \"billing\"\ndb = 2\npattern = \"bill:*\"\n",
        )
        .unwrap();
        assert_eq!(c.flush.rules.len(), 2);
        assert_eq!(c.flush.rules[0].client_name.as_deref(), Some("appA*"));
        assert_eq!(c.flush.rules[1].db, Some(2));
        // What --check-config prints loads back the same.
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        for (text, key) in [
            ("[[flush.rules]]\npattern = \"a:*\"\n", "flush.rules"),
            (
                "[[flush.rules]]\ndb = 1\npattern = \"\"\n",
                "flush.rules.pattern",
            ),
            ("[[flush.rules]]\ndb = 1\n", "pattern"),
            (
                "[[flush.rules]]\ndb = -1\npattern = \"a\"\n",
                "flush.rules.db",
            ),
            (
                "[[flush.rules]]\nuser = \"\"\npattern = \"a\"\n",
                "flush.rules.user",
            ),
            (
                "[[flush.rules]]\nclient_name = \"my app\"\npattern = \"a\"\n",
                "flush.rules.client_name",
            ),
            (
                "[[flush.rules]]\ndb = 1\npattern = \"a\"\nprefix = \"a\"\n",
                "prefix",
            ),
            (
                "[flush]\nscoped_max_wait = \"1s\"\n",
                "flush.scoped_max_wait",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        // The rule's number says which one is wrong.
        let err = parse(
            "[[flush.rules]]\ndb = 1\npattern = \"a\"\n[[flush.rules]]\ndb = 2\npattern = \"\"\n",
        )
        .unwrap_err();
        assert!(err.contains("rule 2"), "{err}");
    }

    #[test]
    fn worker_threads_must_be_positive() {
        let err = parse("[runtime]\nworker_threads = 0\n").unwrap_err();
        assert!(err.contains("runtime.worker_threads"), "{err}");
        assert_eq!(
            parse("[runtime]\nworker_threads = 4\n")
                .unwrap()
                .runtime
                .worker_threads,
            4
        );
    }

    #[test]
    fn live_settings_change_on_reload() {
        let running = Config::default();
        let new = parse(
            "[listen]\nmax_clients = 5\n[limits]\nmax_bulk_len = 1000\n\
             [flush]\nmin_interval = \"2s\"\n[log]\nlevel = \"debug\"\n\
             [invalidation]\nmode = \"observe\"\n",
        )
        .unwrap();
        assert!(running.restart_only_changes(&new).is_empty());
        assert_eq!(running.with_live_changes_from(&new), new);
    }

    #[test]
    fn restart_only_keys_are_real_and_documented() {
        let defaults: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/stormwall.example.toml"),
        )
        .unwrap();
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        for setting in RESTART_ONLY {
            let (section, key) = setting.key.rsplit_once('.').unwrap();
            let table = section
                .split('.')
                .try_fold(&defaults, |t, part| t.get(part).and_then(|v| v.as_table()));
            // These have no fixed default, so they are absent from the rendered defaults.
            let known = table.is_some_and(|t| t.contains_key(key))
                || [
                    "listen.unix_socket",
                    "upstream.shared_connections",
                    "listen.tls.address",
                ]
                .contains(&setting.key);
            assert!(known, "{} is not a config key", setting.key);
            assert!(
                example.contains(&format!("`{}`", setting.key)),
                "deploy/stormwall.example.toml does not list {} as restart-only",
                setting.key
            );
            assert!(
                readme.contains(&format!("`{}`", setting.key)),
                "README.md does not list {} as restart-only",
                setting.key
            );
        }
    }

    #[test]
    fn max_reply_depth_is_accepted_with_a_deprecation() {
        let c = parse("[limits]\nmax_reply_depth = 128\n").unwrap();
        assert_eq!(c.deprecations().len(), 1);
        assert!(c.deprecations()[0].contains("max_reply_depth"));
        assert!(Config::default().deprecations().is_empty());
        // Not written back out, so --check-config output no longer shows it.
        assert!(!c.to_toml().contains("max_reply_depth"));
    }

    #[test]
    fn limits_default_to_redis_own_and_stay_within_them() {
        let l = LimitsConfig::default();
        assert_eq!(l.max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(l.max_array_len, 2_147_483_647);
        assert_eq!(l.max_request_bytes, 1024 * 1024 * 1024);
        let err = parse("[limits]\nmax_array_len = 2147483648\n").unwrap_err();
        assert!(err.contains("limits.max_array_len"), "{err}");
        let err = parse("[limits]\nmax_request_bytes = 65536\n").unwrap_err();
        assert!(err.contains("limits.max_request_bytes"), "{err}");
    }

    #[test]
    fn a_non_ascii_log_filter_is_an_error_not_a_panic() {
        // Found by the config_loader fuzz target: tracing-subscriber panics on it.
        let err = parse("[log]\nlevel = \"    \u{7eff}  = 3/\"\n").unwrap_err();
        assert!(err.contains("log.level"), "{err}");
    }

    #[test]
    fn rendered_config_parses_back() {
        let c = Config::default();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }
}
