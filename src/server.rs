//! The accept loop: listeners, the client limit, and graceful shutdown.
//!
//! Shutdown is done once, here: on the signal every listener stops accepting, every session
//! stops reading new commands and finishes the ones in flight, and the process waits up to
//! `shutdown.drain_timeout` for them before returning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::config::{UpstreamKind, UpstreamMode};
use crate::invalidation::Engine;
use crate::logging::{LogHandle, Throttle};
use crate::net::{Addr, Listener, Stream};
use crate::resp::error_reply;
use crate::session::{self, Context};
use crate::telemetry::Hot;
use crate::{admin, reload, telemetry, upstream};
use metrics_exporter_prometheus::PrometheusHandle;

/// Binds every configured listener; fails (naming the address) if any cannot be bound.
pub async fn bind(config: &Config) -> anyhow::Result<Vec<Listener>> {
    let mut addrs = vec![(config.listen.address.clone(), false)];
    if let Some(path) = &config.listen.unix_socket {
        addrs.push((Addr::Unix(path.clone()), false));
    }
    if let Some(addr) = &config.listen.tls.address {
        addrs.push((addr.clone(), true));
    }
    let mut listeners = Vec::new();
    for (addr, tls) in &addrs {
        let l = Listener::bind(addr, config.listen.tcp_keepalive, *tls)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// What runs beside the client listeners.
pub struct Services {
    /// The admin endpoint's bound listener and the metrics it renders.
    pub admin: Option<(tokio::net::TcpListener, PrometheusHandle)>,
    /// How to re-read the config on reload, the file to watch, and the log filter to change.
    pub reload: (reload::Loader, Option<std::path::PathBuf>, LogHandle),
}

/// What the upstream is, for the log: its address, or the Sentinel master's name.
fn upstream_name(up: &crate::config::UpstreamConfig) -> String {
    match up.kind {
        UpstreamKind::Standalone => up.address.to_string(),
        UpstreamKind::Sentinel => format!(
            "master `{}` via Sentinel {}",
            up.master_name.as_deref().unwrap_or(""),
            up.sentinels.join(",")
        ),
        UpstreamKind::Cluster => format!("Redis Cluster via {}", up.seeds.join(",")),
    }
}

/// Serves clients on `listeners` until `shutdown` is cancelled, then drains.
pub async fn run(
    config: Config,
    listeners: Vec<Listener>,
    services: Services,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    for l in &listeners {
        info!(listen = %l.local_addr(), tls = l.is_tls(), upstream = %upstream_name(&config.upstream), upstream_tls = config.upstream.tls.enabled, "stormwall listening");
    }
    for warning in crate::tls::warnings(&config) {
        warn!("{warning}");
    }
    let metrics = Hot::new();
    let pools = upstream::pool::Pools::new(metrics.pools.clone());
    let router = (config.upstream.kind == UpstreamKind::Cluster).then(|| {
        crate::cluster::router::Router::new(
            &config.upstream,
            config
                .upstream
                .shared_connections(config.runtime.worker_threads),
            metrics.pools.clone(),
            metrics.cluster.clone(),
        )
    });
    let ctx = Arc::new(Context {
        config: ArcSwap::new(config.clone()),
        shutdown: shutdown.clone(),
        upstream_up: AtomicBool::new(true),
        auth_required: AtomicBool::new(false),
        engine: Engine::new(config.clone()),
        metrics,
        log_throttle: Throttle::new(5),
        pools,
        cluster: router.clone(),
    });
    ctx.metrics.upstream_up.set(1.0);
    // The admin endpoint outlives the drain (so /readyz reports it); the rest stops with it.
    let background = CancellationToken::new();
    let hup = reload::hangup();
    let admin = services.admin.map(|(listener, metrics)| {
        info!(admin = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoint listening");
        tokio::spawn(telemetry::upkeep(metrics.clone()));
        tokio::spawn(admin::serve(listener, ctx.clone(), metrics, background.clone()))
    });
    let upstream = &config.upstream;
    upstream.target.follow(upstream);
    if upstream.kind == UpstreamKind::Sentinel {
        // The master, known before the first client if a Sentinel names one now.
        match upstream::sentinel::locate(upstream).await {
            Ok((master, _)) => upstream.target.moved_to(master, upstream),
            Err(e) => warn!(error = %e, "no Sentinel names a usable master yet"),
        }
        let live = ctx.clone();
        let stop = background.clone();
        tokio::spawn(async move {
            upstream::sentinel::follow(|| live.config.load_full(), stop).await;
        });
    }
    if let Some(router) = router {
        ctx.engine.set_cluster(router.clone());
        // The slot map (and the master of slot 0, where the probe goes) before the first
        // client, if a node gives one now; then kept current.
        router.refresh().await;
        let stop = background.clone();
        tokio::spawn(async move { router.follow(stop).await });
    }
    // Known before the first client: whether Redis is up, and whether it requires
    // authentication (Redis's pre-authentication limits then apply to new clients).
    let mut probe = upstream::Probe::default();
    check_upstream(&ctx, &mut probe).await;
    tokio::spawn(probe_upstream(ctx.clone(), probe, background.clone()));
    if config.upstream.mode == UpstreamMode::Shared {
        let pools_ctx = ctx.clone();
        let stop = background.clone();
        tokio::spawn(async move {
            let live = || pools_ctx.config.load_full();
            pools_ctx.pools.maintain(live, stop).await;
        });
    }
    tokio::spawn(publish_tls_expiry(ctx.clone(), background.clone()));
    let (loader, file, log) = services.reload;
    tokio::spawn(reload::watch(
        ctx.clone(),
        hup,
        loader,
        file,
        log,
        background.clone(),
    ));
    let clients = Arc::new(AtomicUsize::new(0));
    let sessions = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for listener in listeners {
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            ctx.clone(),
            clients.clone(),
            sessions.clone(),
        )));
    }
    shutdown.cancelled().await;
    for a in accept_loops {
        // Dropping the listener closes the socket (and removes a unix socket file).
        a.abort();
        let _ = a.await;
    }
    sessions.close();
    let open = clients.load(Ordering::Relaxed);
    let drain = config.shutdown.drain_timeout;
    info!(clients = open, drain_timeout = %humantime::format_duration(drain), "draining");
    if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
        warn!(
            clients = clients.load(Ordering::Relaxed),
            "drain timeout reached; closing remaining connections"
        );
    } else {
        info!("drained; exiting");
    }
    background.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
}

/// Keeps `upstream_up` (and so `/readyz`) and `auth_required` current even when no client is
/// connecting, and logs the moments Redis goes away and comes back. The first check was made
/// before clients were accepted ([`check_upstream`]).
async fn probe_upstream(ctx: Arc<Context>, mut probe: upstream::Probe, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ctx.config.load().admin.probe_interval) => {}
        }
        check_upstream(&ctx, &mut probe).await;
    }
}

/// Keeps `stormwall_tls_certificate_expiry_seconds` current (the certificates may be rotated
/// by a reload at any time).
async fn publish_tls_expiry(ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        crate::tls::publish_expiry(&ctx.config.load());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(15)) => {}
        }
    }
}

/// One probe of Redis: is it up, and does it require clients to authenticate.
async fn check_upstream(ctx: &Context, probe: &mut upstream::Probe) {
    let config = ctx.config.load_full();
    match probe.check(&config.upstream).await {
        Ok(auth_required) => {
            if let Some(round_trip) = probe.round_trip() {
                ctx.engine.observe_latency(round_trip);
            }
            ctx.auth_required.store(auth_required, Ordering::Relaxed);
            ctx.note_upstream(true, None);
        }
        Err(e) => ctx.note_upstream(false, Some(&e)),
    }
}

async fn accept_loop(
    listener: Listener,
    ctx: Arc<Context>,
    clients: Arc<AtomicUsize>,
    sessions: TaskTracker,
) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving the rest.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let guard = ClientSlot::take(&clients, &ctx.metrics);
        if guard.count > ctx.config.load().listen.max_clients {
            ctx.metrics.rejected_max_clients.increment(1);
            if listener.is_tls() {
                // Redis's answer, in the client's protocol: after the handshake (bounded by
                // its timeout, as for any client).
                let ctx = ctx.clone();
                sessions.spawn(async move {
                    if let Some(stream) = handshake(stream, &ctx, &peer).await {
                        refuse_over_limit(stream, guard).await;
                    }
                });
            } else {
                sessions.spawn(refuse_over_limit(stream, guard));
            }
            continue;
        }
        let ctx = ctx.clone();
        let tls = listener.is_tls();
        sessions.spawn(async move {
            let _slot = guard;
            if tls {
                match handshake(stream, &ctx, &peer).await {
                    Some(s) => stream = s,
                    None => return,
                }
            }
            tracing::debug!(%peer, "client connected");
            session::serve(stream, ctx).await;
            tracing::debug!(%peer, "client disconnected");
        });
    }
}

/// The TLS handshake with a client on the TLS listener, with the certificates current now,
/// within `listen.tls.handshake_timeout` (a client that stalls is closed and frees its slot).
/// `None` (counted and logged) if it fails.
async fn handshake(stream: Stream, ctx: &Context, peer: &str) -> Option<Stream> {
    let config = ctx.config.load_full();
    let Some(tls) = config.listen.tls.loaded.get() else {
        warn!(%peer, "TLS listener without loaded certificates; closing the connection");
        return None;
    };
    let limit = config.listen.tls.handshake_timeout;
    let result = match tokio::time::timeout(limit, stream.accept_tls(&tls.acceptor)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no TLS handshake within listen.tls.handshake_timeout ({})",
                humantime::format_duration(limit)
            ),
        )),
    };
    let (noted, stream) = match result {
        Ok(s) => (Ok(()), Some(s)),
        Err(e) => (Err(e), None),
    };
    crate::tls::note_handshake("client", peer, &noted);
    stream
}

/// Redis's own answer to one client too many.
async fn refuse_over_limit(stream: Stream, _slot: ClientSlot) {
    let (_, mut w) = stream.into_split();
    let reply = error_reply("ERR max number of clients reached");
    let _ = tokio::time::timeout(Duration::from_secs(1), w.send_all(&reply)).await;
    let _ = w.shutdown().await;
}

/// Counts a connection for as long as it lives.
struct ClientSlot {
    clients: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
    /// Connections open including this one.
    count: usize,
}

impl ClientSlot {
    fn take(clients: &Arc<AtomicUsize>, metrics: &Hot) -> ClientSlot {
        let count = clients.fetch_add(1, Ordering::Relaxed) + 1;
        metrics.connections_total.increment(1);
        metrics.connections.increment(1.0);
        ClientSlot {
            clients: clients.clone(),
            gauge: metrics.connections.clone(),
            count,
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.clients.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}
