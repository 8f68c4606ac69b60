//! Metrics: the Prometheus recorder, the help text of every metric, and cached handles for
//! the passthrough hot path.
//!
//! Recording through the `metrics` macros looks the metric up in the registry on every call;
//! fine for the invalidation path, too slow for per-batch passthrough accounting. So sessions
//! use [`Hot`], a set of handles resolved once, whose updates are single atomic operations.
//! The full list, with meanings, is `docs/metrics.md`.

use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds): 20 µs … 5 s, dense where a proxy's overhead lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
];
/// Keys per delete batch.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Commands per write on a shared connection.
const WRITE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Installs the global Prometheus recorder and describes every metric. Returns the handle
/// `/metrics` renders from. Call once, before anything records.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("stormwall_invalidation_batch_keys".into()),
                BATCH_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("stormwall_shared_write_commands".into()),
                WRITE_BUCKETS,
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    zero_series();
    Ok(handle)
}

/// Creates every labelled counter at 0, so the first event is an increase Prometheus can
/// see (a series that appears at 1 hides its first increment from `increase()` and alerts).
fn zero_series() {
    for result in ["ok", "failed"] {
        counter!("stormwall_config_reloads_total", "result" => result).absolute(0);
    }
    for class in ["passthrough", "governed", "denied"] {
        counter!("stormwall_commands_total", "class" => class).absolute(0);
    }
    for command in ["delete", "flushdb", "flushall"] {
        counter!("stormwall_invalidation_requests_total", "command" => command).absolute(0);
    }
    for command in ["flushdb", "flushall"] {
        counter!("stormwall_flushes_requested_total", "command" => command).absolute(0);
        counter!("stormwall_flushes_executed_total", "command" => command).absolute(0);
    }
    for reason in crate::invalidation::REJECTED_REASONS {
        counter!("stormwall_invalidation_rejected_total", "reason" => reason).absolute(0);
    }
    for reason in crate::session::PIN_REASONS {
        counter!("stormwall_pins_total", "reason" => *reason).absolute(0);
    }
    for outcome in ["recovered", "timed_out"] {
        counter!("stormwall_outage_waits_total", "outcome" => outcome).absolute(0);
    }
    for mode in ["shared", "private", "spare"] {
        gauge!("stormwall_upstream_connections", "mode" => mode).set(0.0);
    }
    for command in crate::invalidation::OBSERVED_COMMANDS {
        for would in crate::invalidation::OBSERVED_WOULD {
            counter!("stormwall_invalidation_observed_total", "command" => command, "would" => would)
                .absolute(0);
        }
    }
    for reason in crate::invalidation::PASSTHROUGH_REASONS {
        counter!("stormwall_invalidation_passthrough_total", "reason" => reason).absolute(0);
    }
    for name in [
        "stormwall_invalidation_keys_received_total",
        "stormwall_invalidation_keys_sent_total",
        "stormwall_invalidation_coalesced_keys_total",
        "stormwall_invalidation_commands_sent_total",
        "stormwall_invalidation_batches_total",
        "stormwall_invalidation_retries_total",
        "stormwall_invalidation_unknown_total",
        "stormwall_invalidation_abandoned_total",
        "stormwall_scoped_flushes_requested_total",
        "stormwall_scoped_flushes_executed_total",
        "stormwall_scoped_flush_scan_calls_total",
        "stormwall_scoped_flush_keys_deleted_total",
        "stormwall_invalidation_observed_coalesced_keys_total",
    ] {
        counter!(name).absolute(0);
    }
    for reason in crate::invalidation::FALLBACK_REASONS {
        counter!("stormwall_shared_budget_fallbacks_total", "reason" => *reason).absolute(0);
    }
    for result in ["taken", "wait"] {
        counter!("stormwall_shared_budget_calls_total", "result" => result).absolute(0);
    }
    for cause in ["reload", "sentinel"] {
        counter!("stormwall_upstream_moves_total", "cause" => cause).absolute(0);
    }
    for side in ["client", "upstream"] {
        counter!("stormwall_tls_handshakes_total", "side" => side, "result" => "ok", "reason" => "")
            .absolute(0);
        for reason in crate::tls::FAILURE_REASONS {
            counter!("stormwall_tls_handshakes_total", "side" => side, "result" => "failed", "reason" => *reason)
                .absolute(0);
        }
    }
    for name in [
        "stormwall_shared_budget_active",
        "stormwall_invalidation_queue_depth",
        "stormwall_invalidation_identities",
        "stormwall_shield_upstream_connections",
    ] {
        gauge!(name).set(0.0);
    }
}

/// Keeps histogram storage bounded; the exporter needs this called periodically.
pub(crate) async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(
        "stormwall_cluster_refreshes_total",
        "Times the Redis Cluster slot map was asked for, by result (upstream.kind = cluster)."
    );
    describe_counter!(
        "stormwall_cluster_slot_map_changes_total",
        "Refreshes of the Redis Cluster slot map that routed some slot to another master."
    );
    describe_counter!(
        "stormwall_cluster_failovers_total",
        "Replicas seen taking over their master's slots (a new slot map's master that was a replica in the one before)."
    );
    describe_gauge!(
        "stormwall_cluster_slots_served",
        "Slots (of 16384) the current Redis Cluster slot map gives a master."
    );
    describe_gauge!(
        "stormwall_cluster_masters",
        "Masters serving slots in the current Redis Cluster slot map."
    );
    describe_counter!(
        "stormwall_cluster_node_commands_total",
        "Client commands sent to each Redis Cluster master, by node (host:port)."
    );
    describe_gauge!(
        "stormwall_cluster_node_connections",
        "Connections open to each Redis Cluster master carrying clients' commands (shared and private), by node (host:port)."
    );
    describe_counter!(
        "stormwall_cluster_redirects_total",
        "Replies by which a cluster node said a command did not run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN), each followed by sending the command again."
    );
    describe_counter!(
        "stormwall_tls_handshakes_total",
        "TLS handshakes by side (client: on the TLS listener; upstream: to Redis), result and, for failures, reason."
    );
    describe_gauge!(
        "stormwall_tls_certificate_expiry_seconds",
        "Seconds until the earliest certificate in each configured certificate or CA file expires (negative: expired)."
    );
    describe_gauge!(
        "stormwall_upstream_connections",
        "Connections to Redis carrying client traffic, by mode: shared (many clients each), private (one pinned client each), spare (open and idle, ready for a pin or an AUTH/HELLO check)."
    );
    describe_counter!(
        "stormwall_pins_total",
        "Shared-mode clients moved to a private connection for the rest of their life, by the reason the command table gives."
    );
    describe_histogram!(
        "stormwall_shared_write_commands",
        "Commands carried by one write to a shared connection (the auto-pipelining depth across clients)."
    );
    describe_counter!(
        "stormwall_outage_waits_total",
        "Shared-mode commands that waited for Redis to come back, by outcome: recovered (a connection was restored within upstream.outage_wait) or timed_out (the client was closed)."
    );
    describe_gauge!(
        "stormwall_client_connections",
        "Client connections open now."
    );
    describe_counter!(
        "stormwall_client_connections_total",
        "Client connections accepted."
    );
    describe_counter!(
        "stormwall_client_connections_rejected_total",
        "Client connections refused with an error, by reason."
    );
    describe_counter!(
        "stormwall_commands_total",
        "Client commands by how they were handled: passthrough, governed or denied."
    );
    describe_counter!(
        "stormwall_protocol_errors_total",
        "Client connections closed for malformed or over-limit input."
    );
    describe_gauge!(
        "stormwall_upstream_up",
        "1 if Redis answered the last probe or connection attempt, else 0."
    );
    describe_counter!(
        "stormwall_upstream_connects_total",
        "Upstream connection attempts, by result."
    );
    describe_counter!(
        "stormwall_upstream_errors_total",
        "Client sessions ended by an upstream failure, by kind."
    );
    describe_histogram!(
        "stormwall_upstream_rtt_seconds",
        "From forwarding a run of commands to Redis until its last reply arrived."
    );
    describe_histogram!(
        "stormwall_proxy_overhead_seconds",
        "Time from reading client bytes until they are written to Redis."
    );
    describe_counter!(
        "stormwall_config_reloads_total",
        "Config reloads, by result."
    );
    describe_counter!(
        "stormwall_invalidation_requests_total",
        "Governed invalidation requests received, by command."
    );
    describe_counter!(
        "stormwall_invalidation_keys_received_total",
        "Keys named by governed DEL/UNLINK requests."
    );
    describe_counter!(
        "stormwall_invalidation_keys_sent_total",
        "Keys sent to Redis in delete commands."
    );
    describe_counter!(
        "stormwall_invalidation_coalesced_keys_total",
        "Keys not sent because an earlier request in the same batch deleted them."
    );
    describe_counter!(
        "stormwall_invalidation_commands_sent_total",
        "Invalidation commands sent to Redis."
    );
    describe_counter!(
        "stormwall_invalidation_batches_total",
        "Delete batches executed."
    );
    describe_histogram!(
        "stormwall_invalidation_batch_keys",
        "Distinct keys per delete batch."
    );
    describe_counter!(
        "stormwall_flushes_requested_total",
        "Flush requests taken into a flush, by command."
    );
    describe_counter!(
        "stormwall_flushes_executed_total",
        "Flushes actually sent to Redis, by command."
    );
    describe_counter!(
        "stormwall_scoped_flushes_requested_total",
        "FLUSHDB requests that flush.rules turned into scoped flushes, taken into a scan."
    );
    describe_counter!(
        "stormwall_scoped_flushes_executed_total",
        "Scoped flush scans started (each answers every request queued when it started)."
    );
    describe_counter!(
        "stormwall_scoped_flush_scan_calls_total",
        "SCAN commands sent by scoped flushes."
    );
    describe_counter!(
        "stormwall_scoped_flush_keys_deleted_total",
        "Keys removed by scoped flushes (as counted by Redis's replies)."
    );
    describe_gauge!(
        "stormwall_invalidation_queue_depth",
        "Governed requests admitted and not yet answered."
    );
    describe_gauge!(
        "stormwall_invalidation_adaptive_ratio",
        "The invalidation budget in use, as a fraction of the configured one (adaptive budget)."
    );
    describe_gauge!(
        "stormwall_invalidation_budget_keys_per_second",
        "Keys per second the invalidation budget allows now."
    );
    describe_gauge!(
        "stormwall_redis_latency_seconds",
        "Worst Redis round trip in the adaptive budget's last window."
    );
    describe_gauge!(
        "stormwall_redis_latency_baseline_seconds",
        "Redis's healthy round trip, as the adaptive budget learned it."
    );
    describe_histogram!(
        "stormwall_invalidation_wait_seconds",
        "From a delete request's arrival until its batch starts."
    );
    describe_counter!(
        "stormwall_invalidation_rejected_total",
        "Governed requests answered with an error, by reason."
    );
    describe_counter!(
        "stormwall_invalidation_retries_total",
        "Attempts to reach Redis again for an invalidation batch after a failure to connect."
    );
    describe_counter!(
        "stormwall_invalidation_unknown_total",
        "Governed requests whose fate is unknown (the connection was lost after sending); \
         the client's connection is closed."
    );
    describe_counter!(
        "stormwall_invalidation_abandoned_total",
        "Governed requests dropped unsent because their client had gone."
    );
    describe_counter!(
        "stormwall_invalidation_passthrough_total",
        "Governed requests handed back to run on the client's own connection, by reason."
    );
    describe_counter!(
        "stormwall_invalidation_observed_total",
        "Observe mode: governed requests passed through untouched, by command and by what enforcement would have done with them (execute, batch, delay, coalesce, refuse, deny, pass)."
    );
    describe_counter!(
        "stormwall_invalidation_observed_coalesced_keys_total",
        "Observe mode: keys enforcement would not have sent because an earlier request in the same would-be batch named them."
    );
    describe_gauge!(
        "stormwall_invalidation_identities",
        "Identities (user, password, database) with a live shield worker."
    );
    describe_gauge!(
        "stormwall_shield_upstream_connections",
        "Connections the shield holds open to Redis."
    );
    describe_gauge!(
        "stormwall_shared_budget_active",
        "1 if the last invalidation budget was taken from the budget shared in Redis \
         (invalidation.shared_budget), 0 if it is off or this stormwall fell back to its local budget."
    );
    describe_counter!(
        "stormwall_shared_budget_calls_total",
        "Calls of the shared budget's script in Redis, by result: taken, or wait (nothing taken; \
         the budget is there after a wait)."
    );
    describe_counter!(
        "stormwall_shared_budget_fallbacks_total",
        "Times this stormwall fell back from the shared budget to its local one, by reason."
    );
}

/// Handles for everything a session records, resolved once per process. (Governed commands
/// are counted by the invalidation engine, which decides their class.)
pub(crate) struct Hot {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub rejected_max_clients: Counter,
    pub rejected_upstream: Counter,
    pub passthrough: Counter,
    pub protocol_errors: Counter,
    pub upstream_up: Gauge,
    pub connects_ok: Counter,
    pub connects_failed: Counter,
    pub upstream_lost: Counter,
    pub upstream_timeout: Counter,
    pub upstream_protocol: Counter,
    pub upstream_rtt: Histogram,
    pub overhead: Histogram,
    /// Client moves to a private connection, by [`crate::session::PIN_REASONS`] index.
    pub pins: Vec<Counter>,
    pub private_connections: Gauge,
    pub pools: crate::upstream::pool::PoolMetrics,
    pub cluster: crate::cluster::router::RouterMetrics,
}

impl Hot {
    pub fn new() -> Hot {
        Hot {
            connections: gauge!("stormwall_client_connections"),
            connections_total: counter!("stormwall_client_connections_total"),
            rejected_max_clients: counter!("stormwall_client_connections_rejected_total", "reason" => "max_clients"),
            rejected_upstream: counter!("stormwall_client_connections_rejected_total", "reason" => "upstream_unreachable"),
            passthrough: counter!("stormwall_commands_total", "class" => "passthrough"),
            protocol_errors: counter!("stormwall_protocol_errors_total"),
            upstream_up: gauge!("stormwall_upstream_up"),
            connects_ok: counter!("stormwall_upstream_connects_total", "result" => "ok"),
            connects_failed: counter!("stormwall_upstream_connects_total", "result" => "failed"),
            upstream_lost: counter!("stormwall_upstream_errors_total", "kind" => "lost"),
            upstream_timeout: counter!("stormwall_upstream_errors_total", "kind" => "timeout"),
            upstream_protocol: counter!("stormwall_upstream_errors_total", "kind" => "protocol"),
            upstream_rtt: histogram!("stormwall_upstream_rtt_seconds"),
            overhead: histogram!("stormwall_proxy_overhead_seconds"),
            pins: crate::session::PIN_REASONS
                .iter()
                .map(|reason| counter!("stormwall_pins_total", "reason" => *reason))
                .collect(),
            private_connections: gauge!("stormwall_upstream_connections", "mode" => "private"),
            pools: crate::upstream::pool::PoolMetrics {
                mux: crate::upstream::mux::MuxMetrics {
                    write_commands: histogram!("stormwall_shared_write_commands"),
                    connections: gauge!("stormwall_upstream_connections", "mode" => "shared"),
                    node_connections: None,
                },
                spares: gauge!("stormwall_upstream_connections", "mode" => "spare"),
                outage_recovered: counter!("stormwall_outage_waits_total", "outcome" => "recovered"),
                outage_timed_out: counter!("stormwall_outage_waits_total", "outcome" => "timed_out"),
                connects_ok: counter!("stormwall_upstream_connects_total", "result" => "ok"),
                connects_failed: counter!("stormwall_upstream_connects_total", "result" => "failed"),
            },
            cluster: crate::cluster::router::RouterMetrics {
                refresh_ok: counter!("stormwall_cluster_refreshes_total", "result" => "ok"),
                refresh_failed: counter!("stormwall_cluster_refreshes_total", "result" => "failed"),
                map_changes: counter!("stormwall_cluster_slot_map_changes_total"),
                failovers: counter!("stormwall_cluster_failovers_total"),
                slots_served: gauge!("stormwall_cluster_slots_served"),
                masters: gauge!("stormwall_cluster_masters"),
                redirects: [
                    counter!("stormwall_cluster_redirects_total", "kind" => "moved"),
                    counter!("stormwall_cluster_redirects_total", "kind" => "ask"),
                    counter!("stormwall_cluster_redirects_total", "kind" => "tryagain"),
                    counter!("stormwall_cluster_redirects_total", "kind" => "clusterdown"),
                ],
            },
        }
    }
}

impl Default for Hot {
    fn default() -> Self {
        Hot::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every `"stormwall_…"` metric name quoted in `text`.
    fn names(text: &str) -> BTreeSet<&str> {
        text.split('"')
            .filter(|s| s.len() > "stormwall_".len() && s.starts_with("stormwall_"))
            .filter(|s| s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .collect()
    }

    #[test]
    fn docs_list_exactly_the_metrics_recorded() {
        let recorded: BTreeSet<&str> = [
            include_str!("telemetry.rs"),
            include_str!("invalidation/mod.rs"),
            include_str!("invalidation/delete.rs"),
            include_str!("invalidation/flush.rs"),
            include_str!("invalidation/scoped.rs"),
            include_str!("invalidation/executor.rs"),
            include_str!("invalidation/outcome.rs"),
            include_str!("invalidation/access.rs"),
            include_str!("invalidation/observe.rs"),
            include_str!("invalidation/shared_budget.rs"),
            include_str!("reload.rs"),
            include_str!("tls.rs"),
            include_str!("upstream/target.rs"),
            include_str!("upstream/sentinel.rs"),
        ]
        .into_iter()
        .flat_map(names)
        .collect();
        let docs = include_str!("../docs/metrics.md");
        let documented: BTreeSet<&str> = docs
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        assert_eq!(
            recorded, documented,
            "docs/metrics.md is out of step with the code"
        );
    }
}
