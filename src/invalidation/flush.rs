//! Coalesced `FLUSHDB`/`FLUSHALL`: one flush answers every request for the same target that
//! arrived before it started (G2), and flushes of a target are at least `flush.min_interval`
//! apart.
//!
//! A worker serves one target (an identity's database for `FLUSHDB`, or all of that
//! identity's databases for `FLUSHALL`). When a request arrives it waits out the interval
//! since the previous flush *started*, then takes every request queued by that moment and
//! executes a single flush for all of them. Requests arriving while that flush runs wait for
//! the next one: a flush that started before a request arrived never answers it.

use bytes::Bytes;
use metrics::counter;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::retry::Executor;
use super::{Job, Live, expired, spend};
use crate::config::FlushMode;
use crate::resp::error_reply;
use crate::upstream::Identity;

/// `Some(true)`: the client asked for `SYNC`; `Some(false)`: `ASYNC`; `None`: neither.
type FlushJob = Job<Option<bool>>;

/// Serves one flush target until the engine is dropped.
pub(super) async fn worker(
    live: Live,
    (who, all): (Identity, bool),
    mut rx: mpsc::UnboundedReceiver<FlushJob>,
) {
    let command: &'static str = if all { "FLUSHALL" } else { "FLUSHDB" };
    let label = if all { "flushall" } else { "flushdb" };
    let mut exec = Executor::new(who);
    let mut last_start: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let shared = live.load_full();
        if let Some(start) = last_start {
            tokio::time::sleep_until(start + shared.config.flush.min_interval).await;
        }
        let mut waiters = vec![first];
        while let Ok(job) = rx.try_recv() {
            waiters.push(job);
        }
        counter!("stormwall_flushes_requested_total", "command" => label)
            .increment(waiters.len() as u64);
        let now = Instant::now();
        let (late, mut waiters): (Vec<_>, Vec<_>) =
            waiters.into_iter().partition(|j| now > j.deadline);
        late.into_iter().for_each(|j| j.answer(expired()));
        if waiters.is_empty() {
            continue;
        }
        let deadline = waiters
            .iter()
            .map(|j| j.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        if !spend(
            &shared.commands,
            shared.config.invalidation.commands_burst,
            1,
            deadline,
        )
        .await
        {
            // Over the command budget past the earliest deadline: answer the late, keep the rest.
            let now = Instant::now();
            let (late, rest): (Vec<_>, Vec<_>) =
                waiters.into_iter().partition(|j| now > j.deadline);
            late.into_iter().for_each(|j| j.answer(expired()));
            waiters = rest;
            if waiters.is_empty() {
                continue;
            }
        }
        let sync = match shared.config.flush.mode {
            FlushMode::Async => false,
            FlushMode::Sync => true,
            // Coalesced requests that disagree get the stronger one.
            FlushMode::AsRequested => waiters.iter().any(|j| j.what == Some(true)),
        };
        let mode = if sync { "SYNC" } else { "ASYNC" };
        let cmd = vec![
            Bytes::from_static(command.as_bytes()),
            Bytes::from_static(mode.as_bytes()),
        ];
        last_start = Some(Instant::now());
        counter!("stormwall_flushes_executed_total", "command" => label).increment(1);
        counter!("stormwall_invalidation_commands_sent_total").increment(1);
        let deadline = waiters
            .iter()
            .map(|j| j.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        // A flush's answer is +OK however many attempts it took, so a retried flush is exact.
        let reply = match exec.run(&shared, &[cmd], deadline).await {
            Ok(outcome) => match outcome.replies.first() {
                Some(redis_protocol::resp2::types::OwnedFrame::SimpleString(s)) if s == b"OK" => {
                    Bytes::from_static(b"+OK\r\n")
                }
                Some(redis_protocol::resp2::types::OwnedFrame::Error(e)) => error_reply(e),
                _ => error_reply(
                    "ERR stormwall: unexpected reply from Redis to a flush; not applied",
                ),
            },
            Err(failure) => failure.reply(exec.identity()),
        };
        for job in waiters {
            job.answer(reply.clone());
        }
    }
}
