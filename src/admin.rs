//! The admin HTTP endpoint, on its own listener (loopback by default): what an orchestrator
//! probes and what Prometheus scrapes.
//!
//! * `GET /metrics` — Prometheus text (every metric in `docs/metrics.md`);
//! * `GET /healthz` — 200 while the process runs;
//! * `GET /readyz` — 200 when Redis answers and clients are being accepted, 503 (with the
//!   reason) otherwise, so no traffic is routed to a sidecar whose Redis is gone or that is
//!   draining;
//! * `GET /config` — the effective configuration as TOML (it holds no secrets: passwords
//!   are never part of stormwall's config; clients bring their own).
//!
//! The endpoint must stay answerable whatever else connects to it: a connection gets
//! [`HEADER_READ_TIMEOUT`] to send its request headers, and at most [`MAX_CONNECTIONS`] are
//! served at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::logging::Throttle;
use crate::session::Context;

/// How long a connection may take to send a request's headers (and, between requests, how
/// long a kept-alive connection may sit idle). Probes and scrapes send theirs at once; a
/// client that trickles bytes or sends nothing is closed, so it cannot hold a socket and a
/// task for ever.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once. Prometheus keeps one, an orchestrator's probes a few;
/// each costs a descriptor from the same limit as clients. Beyond this, new connections are
/// closed at once instead of queueing behind slow ones.
pub(crate) const MAX_CONNECTIONS: usize = 256;

#[derive(Clone)]
struct Admin {
    ctx: Arc<Context>,
    metrics: PrometheusHandle,
}

/// Serves the admin endpoint until `stop` is cancelled.
///
/// Connections are driven by hyper's HTTP/1 server directly rather than `axum::serve`, which
/// has no header-read timeout (hyper only enforces one when given a timer) and no limit on
/// connections.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/config", get(config))
        .with_state(Admin { ctx, metrics });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let throttle = Throttle::new(1);
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if throttle.allow() {
                        tracing::warn!(error = %e, "admin endpoint: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if throttle.allow() {
                tracing::warn!(
                    limit = MAX_CONNECTIONS,
                    "admin endpoint: too many connections; closing new ones"
                );
            }
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                // Timeouts and clients that hang up are routine here, not worth a log line.
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    // Let a response being written finish, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn render_metrics(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.render(),
    )
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.ctx.shutdown.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: draining for shutdown\n",
        )
    } else if !admin.ctx.upstream_up.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: upstream Redis unreachable\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn config(State(admin): State<Admin>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/toml; charset=utf-8")],
        admin.ctx.config.load().to_toml(),
    )
}
