//! Log output through `tracing`: plain or JSON lines on stderr, one line per notable event,
//! coloured only when stderr is a terminal.
//!
//! The level comes from `RUST_LOG` when set (so an operator can turn on debug logs without
//! editing the file), otherwise from `log.level` in the config, and can change on reload.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Parses a log filter (`log.level`, `RUST_LOG`). Only ASCII is accepted: filters name
/// levels and module paths, and `tracing-subscriber` 0.3 panics on some non-ASCII input
/// (it slices a directive inside a character) — found by fuzzing the config loader.
pub fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    if !level.is_ascii() {
        return Err("a log filter is ASCII (levels and module paths)".into());
    }
    EnvFilter::try_new(level).map_err(|e| e.to_string())
}

/// Changes the log filter of the running process.
pub struct LogHandle {
    set: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>,
    /// `RUST_LOG` was set at start, and keeps precedence over the config file.
    from_env: bool,
}

impl LogHandle {
    /// Applies `level` from a reloaded config (unless `RUST_LOG` governs the level).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.from_env {
            return Ok(());
        }
        (self.set)(parse_filter(level)?)
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: &LogConfig) -> LogHandle {
    let env = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let from_env = env.is_some();
    let filter = env
        .as_deref()
        .map(parse_filter)
        .unwrap_or_else(|| parse_filter(&config.level))
        .or_else(|_| parse_filter(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file, journald or a log shipper
    // they are noise (`\x1b[2m…`) that breaks grep and parsers.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let set: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync> = match config.format {
        LogFormat::Plain => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    LogHandle { set, from_env }
}

/// A rate limit for warnings that every connection could hit at once (an upstream outage
/// seen by 10,000 clients): a few lines a second, then a count of what was suppressed.
pub(crate) struct Throttle {
    limiter: governor::DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl Throttle {
    pub fn new(per_second: u32) -> Throttle {
        let rate = std::num::NonZeroU32::new(per_second).unwrap_or(std::num::NonZeroU32::MIN);
        Throttle {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log this occurrence; reports how many were suppressed since the last one.
    pub fn allow(&self) -> bool {
        if self.limiter.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let skipped = self.suppressed.swap(0, Ordering::Relaxed);
        if skipped > 0 {
            tracing::warn!(suppressed = skipped, "similar warnings suppressed");
        }
        true
    }
}
