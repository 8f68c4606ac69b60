//! Live reload: on `SIGHUP` (and, if `reload.watch_interval` is set, when the file changes)
//! the config file is read again and applied without dropping a connection.
//!
//! What can change live — limits, timeouts, the invalidation and flush policies, the log
//! level, `max_clients` — takes effect for new connections and for the shield's next batch.
//! What cannot (the settings in [`crate::config::RESTART_ONLY`]) is reported as needing a
//! restart and keeps its running value. An invalid file is rejected with a log line naming
//! the problem; the running config stays.

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::logging::LogHandle;
use crate::session::Context;

/// Re-reads the configuration (file plus command-line overrides), validated.
pub type Loader = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// The SIGHUP handler, installed before the process says it is listening: until it is, a
/// SIGHUP would terminate the process (the signal's default action).
pub(crate) fn hangup() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}

/// Reloads on SIGHUP (`hup`, from [`hangup`]) and file changes until `stop` is cancelled.
pub(crate) async fn watch(
    ctx: Arc<Context>,
    hup: std::io::Result<Signal>,
    load: Loader,
    file: Option<std::path::PathBuf>,
    log: LogHandle,
    stop: CancellationToken,
) {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGHUP; live reload disabled");
            return;
        }
    };
    let interval = ctx.config.load().reload.watch_interval;
    // The config file and the certificate files it names: replacing a certificate is a
    // change too (a rotation that leaves the config file alone).
    let read = |path: &Option<std::path::PathBuf>, ctx: &Context| {
        let mut all = vec![path.as_ref().and_then(|p| std::fs::read(p).ok())];
        for f in crate::tls::watched_files(&ctx.config.load()) {
            all.push(std::fs::read(f).ok());
        }
        all
    };
    let mut seen = read(&file, &ctx);
    let mut tick = tokio::time::interval(if interval.is_zero() {
        Duration::from_secs(3600)
    } else {
        interval
    });
    tick.tick().await;
    loop {
        let cause = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick(), if !interval.is_zero() => {
                let now = read(&file, &ctx);
                if now == seen {
                    continue;
                }
                seen = now;
                "file change"
            }
        };
        match load() {
            Ok(new) => apply(&ctx, new, &log, cause),
            Err(e) => {
                counter!("stormwall_config_reloads_total", "result" => "failed").increment(1);
                error!(cause, error = %e, "config reload rejected; the running config stays");
            }
        }
    }
}

/// Applies what can change live and reports what cannot.
pub(crate) fn apply(ctx: &Context, new: Config, log: &LogHandle, cause: &str) {
    for warning in new.deprecations() {
        warn!("{warning}");
    }
    let old = ctx.config.load_full();
    let restart = old.restart_only_changes(&new);
    if !restart.is_empty() {
        warn!(settings = ?restart, "these settings only change on restart; keeping their running values");
    }
    let merged = Arc::new(old.with_live_changes_from(&new));
    if let Err(e) = log.set_level(&merged.log.level) {
        warn!(error = %e, "cannot apply log.level");
    }
    ctx.engine.reload(merged.clone());
    let changed = *merged != *old;
    ctx.config.store(merged.clone());
    // After the store: a connection opened from the new config must not be counted as one
    // to the old address.
    merged.upstream.target.follow(&merged.upstream);
    counter!("stormwall_config_reloads_total", "result" => "ok").increment(1);
    info!(cause, changed, "config reloaded");
}
