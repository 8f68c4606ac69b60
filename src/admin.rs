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

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::session::Context;

#[derive(Clone)]
struct Admin {
    ctx: Arc<Context>,
    metrics: PrometheusHandle,
}

/// Serves the admin endpoint until `stop` is cancelled.
pub async fn serve(
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
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin endpoint failed");
    }
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
