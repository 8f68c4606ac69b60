//! The `stormwall` command: parse flags, load and check the config, run until a signal.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use stormwall::config::{Config, LogFormat};
use stormwall::net::Addr;
use stormwall::{logging, reload, server, telemetry};

/// A Redis-protocol proxy that passes normal traffic through untouched and shields Redis from
/// invalidation storms.
#[derive(Parser, Debug, Clone)]
#[command(name = "stormwall", version)]
struct Cli {
    /// TOML config file (see deploy/stormwall.example.toml). Flags below override it.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Validate FILE (with any flag overrides), print the effective config, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,

    /// Where clients connect: host:port or a unix socket path [default: 127.0.0.1:6380]
    #[arg(long, value_name = "ADDR")]
    listen: Option<Addr>,

    /// The Redis server: host:port or a unix socket path [default: 127.0.0.1:6379]
    #[arg(long, value_name = "ADDR")]
    upstream: Option<Addr>,

    /// Admin HTTP address (/metrics, /healthz, /readyz, /config) [default: 127.0.0.1:9380]
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,

    /// Also listen on this unix socket.
    #[arg(long, value_name = "PATH")]
    unix_socket: Option<PathBuf>,

    /// Maximum simultaneous client connections [default: 10000]
    #[arg(long, value_name = "N")]
    max_clients: Option<usize>,

    /// Log filter, e.g. info or stormwall=debug (RUST_LOG wins if set) [default: info]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// Log line format [default: plain]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl Cli {
    /// The file's config (or defaults) with flags applied on top, validated.
    fn load(&self) -> Result<Config, String> {
        let file = self.check_config.as_ref().or(self.config.as_ref());
        let mut config = match file {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        if let Some(a) = &self.listen {
            config.listen.address = a.clone();
        }
        if let Some(a) = &self.upstream {
            config.upstream.address = a.clone();
        }
        if let Some(p) = &self.unix_socket {
            config.listen.unix_socket = Some(p.clone());
        }
        if let Some(a) = &self.admin {
            config.admin.address = a.clone();
            config.admin.enabled = true;
        }
        if let Some(n) = self.max_clients {
            config.listen.max_clients = n;
        }
        if let Some(l) = &self.log_level {
            config.log.level = l.clone();
        }
        if let Some(f) = self.log_format {
            config.log.format = f;
        }
        config.validate().map_err(|e| e.to_string())?;
        config.load_tls().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stormwall: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check_config.is_some() {
        for warning in config.deprecations() {
            eprintln!("stormwall: warning: {warning}");
        }
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let log = logging::init(&config.log);
    for warning in config.deprecations() {
        warn!("{warning}");
    }
    let metrics = match telemetry::install() {
        Ok(m) => m,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime(config.runtime.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let listeners = match server::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                error!("{e:#}");
                return ExitCode::FAILURE;
            }
        };
        let admin = if config.admin.enabled {
            match tokio::net::TcpListener::bind(&config.admin.address).await {
                Ok(l) => Some((l, metrics)),
                Err(e) => {
                    error!(
                        "cannot listen on admin address {}: {e}",
                        config.admin.address
                    );
                    return ExitCode::FAILURE;
                }
            }
        } else {
            None
        };
        let file = cli.config.clone();
        let reload_cli = cli.clone();
        let loader: reload::Loader = Box::new(move || reload_cli.load());
        let services = server::Services {
            admin,
            reload: (loader, file, log),
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        server::run(config, listeners, services, shutdown).await;
        ExitCode::SUCCESS
    });
    // Sessions still blocked after the drain timeout must not hold the process open.
    runtime.shutdown_background();
    code
}

/// The async runtime: by default one thread that runs every task in the order they were
/// woken (`runtime.worker_threads = 1`).
///
/// Why not tokio's multi-thread runtime by default: it keeps a per-worker "LIFO slot", and a
/// task woken while the worker polls for I/O takes that slot, pushing the task woken before
/// it to the back of the queue. When client A's command and then client B's arrive in the
/// same poll, B's session runs first and B's command reaches Redis first: about a third of
/// back-to-back pairs on an idle machine (`benches/ordering.rs`; a plain TCP relay, socat:
/// ~1–6%). Disabling the slot (`Builder::disable_lifo_slot`, only behind `--cfg
/// tokio_unstable`) still leaves two workers racing for the two sessions: 224 of 1,000 on
/// a busy machine. With one thread, wake-ups run first-in first-out, so commands reach
/// Redis in the order they reached stormwall (2 of 5,000 out of order, as many as when
/// connected to Redis directly), and CPU per request was lower (no cross-thread wake-ups). The cost: forwarding uses at most one core, and when
/// other processes compete for the CPU a single thread gets a single thread's share of it;
/// `results/ordering.md` has the numbers. Operators who need more than one core of
/// forwarding set `worker_threads` higher and accept the reordering.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    }
}

/// First SIGTERM/SIGINT starts a graceful drain; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stop stormwall with SIGKILL");
        return;
    };
    let mut first = true;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if first {
            info!(
                signal = name,
                "shutdown requested; draining (send again to exit now)"
            );
            shutdown.cancel();
            first = false;
        } else {
            info!(signal = name, "second signal; exiting now");
            std::process::exit(130);
        }
    }
}
