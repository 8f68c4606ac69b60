//! Log output through `tracing`: plain or JSON lines on stderr.
//!
//! The level comes from `RUST_LOG` when set (so an operator can turn on debug logs without
//! editing the file), otherwise from `log.level` in the config.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match config.format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A rate limit for warnings that every connection could hit at once (an upstream outage
/// seen by 10,000 clients): a few lines a second, then a count of what was suppressed.
pub struct Throttle {
    limiter: governor::DefaultDirectRateLimiter,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub fn new(per_second: u32) -> Throttle {
        let rate = std::num::NonZeroU32::new(per_second).unwrap_or(std::num::NonZeroU32::MIN);
        Throttle {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether to log this occurrence; reports how many were suppressed since the last one.
    pub fn allow(&self) -> bool {
        use std::sync::atomic::Ordering;
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
