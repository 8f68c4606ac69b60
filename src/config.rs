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
    pub log: LogConfig,
}

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
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            address: Addr::Tcp("127.0.0.1:6380".into()),
            unix_socket: None,
            max_clients: 10_000,
            idle_timeout: Duration::ZERO,
            tcp_keepalive: Duration::from_secs(300),
        }
    }
}

/// The Redis server behind the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `host:port` or a unix socket path.
    pub address: Addr,
    /// How long a new client waits for its upstream connection before getting an error.
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
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            address: Addr::Tcp("127.0.0.1:6379".into()),
            connect_timeout: Duration::from_secs(2),
            reply_timeout: Duration::from_secs(30),
            tcp_keepalive: Duration::from_secs(300),
        }
    }
}

/// Bounds on what one client may make stormwall hold in memory (contract point G6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest bulk string accepted in a request or reply (Redis's `proto-max-bulk-len`).
    pub max_bulk_len: u64,
    /// Most arguments in one request.
    pub max_array_len: u64,
    /// Largest single request, all arguments together (Redis's `client-query-buffer-limit`).
    pub max_request_bytes: u64,
    /// Deepest nesting of aggregates accepted in a reply from Redis.
    pub max_reply_depth: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_request_bytes: 1024 * 1024 * 1024,
            max_reply_depth: 128,
        }
    }
}

/// The invalidation shield for `DEL`/`UNLINK`: batching, queue bounds and rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvalidationConfig {
    /// Govern `DEL`/`UNLINK`/`FLUSHDB`/`FLUSHALL`. `false` passes them through like any command.
    pub enabled: bool,
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
    /// Keys deleted in Redis per second, and how many may go at once.
    pub keys_per_second: u32,
    pub keys_burst: u32,
    /// Invalidation commands (deletes and flushes) sent to Redis per second, and burst.
    pub commands_per_second: u32,
    pub commands_burst: u32,
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
            identity_idle_timeout: Duration::from_secs(60),
            max_identities: 64,
        }
    }
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
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            min_interval: Duration::from_secs(1),
            mode: FlushMode::Async,
            deny: Vec::new(),
            burst: 3,
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
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
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
        if l.max_array_len == 0 {
            return Err(invalid("limits.max_array_len", "must be at least 1"));
        }
        if l.max_request_bytes < l.max_bulk_len.min(64 * 1024) {
            return Err(invalid(
                "limits.max_request_bytes",
                "must be at least 64 KiB (or limits.max_bulk_len, if smaller)",
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
        if self.admin.enabled && self.admin.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "admin.address",
                format!("`{}` is not an ip:port address", self.admin.address),
            ));
        }
        if self.admin.probe_interval.is_zero() {
            return Err(invalid("admin.probe_interval", "must be greater than 0s"));
        }
        if l.max_reply_depth == 0 {
            return Err(invalid("limits.max_reply_depth", "must be at least 1"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a valid tracing filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// Settings that only take effect at start: the keys (named as in the file) whose values
    /// differ between `self` and `new`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |key: &'static str, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        check("listen.address", self.listen.address != new.listen.address);
        check(
            "listen.unix_socket",
            self.listen.unix_socket != new.listen.unix_socket,
        );
        check(
            "listen.tcp_keepalive",
            self.listen.tcp_keepalive != new.listen.tcp_keepalive,
        );
        check(
            "upstream.address",
            self.upstream.address != new.upstream.address,
        );
        check("admin", self.admin != new.admin);
        check("reload.watch_interval", self.reload != new.reload);
        check("log.format", self.log.format != new.log.format);
        changed
    }

    /// `new` with every restart-only setting kept as it is in `self`, so a reload applies
    /// what it can and leaves the rest as the running process has it.
    pub fn with_live_changes_from(&self, new: &Config) -> Config {
        let mut merged = new.clone();
        merged.listen.address = self.listen.address.clone();
        merged.listen.unix_socket = self.listen.unix_socket.clone();
        merged.listen.tcp_keepalive = self.listen.tcp_keepalive;
        merged.upstream.address = self.upstream.address.clone();
        merged.admin = self.admin.clone();
        merged.reload = self.reload.clone();
        merged.log.format = self.log.format;
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
        for (section, keys) in defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing from the example"
            );
            for key in keys.as_table().into_iter().flat_map(|t| t.keys()) {
                assert!(
                    text.lines()
                        .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} ="))),
                    "{section}.{key} missing from the example config"
                );
            }
        }
    }

    #[test]
    fn rendered_config_parses_back() {
        let c = Config::default();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }
}
