//! Batched `DEL`/`UNLINK`: each key deleted once per batch, each client told exactly how many
//! keys *its* request removed (G2).
//!
//! A batch is a sequence of requests in arrival order. Under the sequential order "request 1,
//! then request 2, …", a key shared by several requests is removed by the first of them; the
//! later ones would find it gone. So each key is *claimed* by the first request that names it,
//! and each request sends one delete command with only the keys it claimed: the command's
//! integer reply is then exactly that request's answer, and requests left with no keys answer
//! `0`. A storm of identical `DEL`s becomes a single command.
//!
//! Claiming is only sound if the batch executes atomically — otherwise a write landing between
//! two requests' commands could split one request's effect across two points in time. So a
//! batch of several commands is wrapped in `MULTI`/`EXEC`. If a command is refused at queue
//! time (an ACL user without permission on one of its keys), Redis aborts the whole
//! transaction: the refused request gets Redis's own error (it was not applied, G4/G5) and the
//! rest are planned and executed again. If the identity may not use `MULTI` at all, the worker
//! stops claiming and sends each request's own keys, one command per request.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use metrics::{counter, histogram};
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::retry::Executor;
use super::{Job, Live, Shared, expired, spend};
use crate::config::DeleteCommand;
use crate::resp::error_reply;
use crate::upstream::Identity;

type DeleteJob = Job<Vec<Bytes>>;

/// Serves one identity's delete requests until the engine is dropped.
pub(super) async fn worker(live: Live, who: Identity, mut rx: mpsc::UnboundedReceiver<DeleteJob>) {
    let mut worker = Worker {
        live,
        exec: Executor::new(who),
        atomic: true,
    };
    while let Some(first) = rx.recv().await {
        let batch = worker.gather(first, &mut rx).await;
        worker.run(batch).await;
    }
}

struct Worker {
    live: Live,
    exec: Executor,
    /// Whether this identity may use `MULTI` (and so whether keys can be claimed).
    atomic: bool,
}

/// What became of one request after a round.
enum Verdict {
    Done(Bytes),
    /// Not applied in this round (its transaction was aborted, or it lost its keys to a
    /// request that failed); plan it again.
    Again,
}

fn count_reply(n: i64) -> Bytes {
    Bytes::from(format!(":{n}\r\n"))
}

impl Worker {
    /// The settings as of now (a reload is picked up at the next use).
    fn shared(&self) -> Arc<Shared> {
        self.live.load_full()
    }

    /// Takes whatever else is queued, up to `max_batch_keys` distinct keys.
    async fn gather(
        &self,
        first: DeleteJob,
        rx: &mut mpsc::UnboundedReceiver<DeleteJob>,
    ) -> Vec<DeleteJob> {
        let inv = &self.shared().config.invalidation;
        if !inv.batch_delay.is_zero() {
            tokio::time::sleep(inv.batch_delay).await;
        }
        let mut distinct: HashSet<Bytes> = first.what.iter().cloned().collect();
        let mut batch = vec![first];
        while distinct.len() < inv.max_batch_keys {
            match rx.try_recv() {
                Ok(job) => {
                    distinct.extend(job.what.iter().cloned());
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        batch
    }

    async fn run(&mut self, batch: Vec<DeleteJob>) {
        let now = Instant::now();
        let mut pending = Vec::with_capacity(batch.len());
        for job in batch {
            histogram!("stormwall_invalidation_wait_seconds")
                .record((now - job.received).as_secs_f64());
            pending.push(job);
        }
        while !pending.is_empty() {
            let plan = plan(&pending, self.atomic);
            let keys: usize = plan.iter().map(|(_, k)| k.len()).sum();
            let shared = self.shared();
            let inv = &shared.config.invalidation;
            let deadline = pending
                .iter()
                .map(|j| j.deadline)
                .min()
                .unwrap_or_else(Instant::now);
            let _ = spend(&shared.keys, inv.keys_burst, keys, deadline).await
                && spend(&shared.commands, inv.commands_burst, plan.len(), deadline).await;
            // Budgets may have made some requests wait past their deadline: they are answered
            // now and never executed later.
            let now = Instant::now();
            if pending.iter().any(|j| now > j.deadline) {
                let (late, rest): (Vec<_>, Vec<_>) =
                    pending.into_iter().partition(|j| now > j.deadline);
                late.into_iter().for_each(|j| j.answer(expired()));
                pending = rest;
                continue;
            }
            let verdicts = self.round(&pending, &plan).await;
            let mut again = Vec::new();
            for (job, verdict) in pending.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Done(reply) => job.answer(reply),
                    Verdict::Again => again.push(job),
                }
            }
            pending = again;
        }
    }

    /// Executes one plan and judges every pending request by the replies.
    async fn round(&mut self, pending: &[DeleteJob], plan: &[(usize, Vec<Bytes>)]) -> Vec<Verdict> {
        let name = match self.shared().config.invalidation.delete_command {
            DeleteCommand::Unlink => Bytes::from_static(b"UNLINK"),
            DeleteCommand::Del => Bytes::from_static(b"DEL"),
        };
        let wrap = self.atomic && plan.len() > 1;
        let mut commands = Vec::with_capacity(plan.len() + 2);
        if wrap {
            commands.push(vec![Bytes::from_static(b"MULTI")]);
        }
        for (_, keys) in plan {
            let mut cmd = Vec::with_capacity(keys.len() + 1);
            cmd.push(name.clone());
            cmd.extend(keys.iter().cloned());
            commands.push(cmd);
        }
        if wrap {
            commands.push(vec![Bytes::from_static(b"EXEC")]);
        }
        let received: usize = pending.iter().map(|j| j.what.len()).sum();
        let sent: usize = plan.iter().map(|(_, k)| k.len()).sum();
        counter!("stormwall_invalidation_batches_total").increment(1);
        histogram!("stormwall_invalidation_batch_keys").record(sent as f64);
        counter!("stormwall_invalidation_keys_sent_total").increment(sent as u64);
        counter!("stormwall_invalidation_coalesced_keys_total")
            .increment(received.saturating_sub(sent) as u64);
        counter!("stormwall_invalidation_commands_sent_total").increment(commands.len() as u64);

        let deadline = pending
            .iter()
            .map(|j| j.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        let outcome = match self.exec.run(&self.shared(), &commands, deadline).await {
            Ok(o) => o,
            Err(failure) => {
                let reply = failure.reply(self.exec.identity());
                return pending
                    .iter()
                    .map(|_| Verdict::Done(reply.clone()))
                    .collect();
            }
        };
        let replies = outcome.replies;
        let mut verdicts: Vec<Verdict> = if wrap {
            self.judge_transaction(pending.len(), plan, &replies)
        } else {
            judge_pipeline(pending.len(), plan, &replies, self.atomic)
        };
        if outcome.after_lost_attempt {
            // A lost attempt may already have removed the keys, so the counts now in hand may
            // be too low. The keys are gone either way; say so instead of guessing a number.
            let uncertain = error_reply(
                "ERR stormwall: the keys are deleted, but the connection to Redis dropped during \
                 the batch, so how many of them this request removed is unknown",
            );
            for v in &mut verdicts {
                if let Verdict::Done(reply) = v
                    && reply.first() == Some(&b':')
                {
                    *reply = uncertain.clone();
                }
            }
        }
        verdicts
    }

    /// Judges `[MULTI, cmd…, EXEC]` replies.
    fn judge_transaction(
        &mut self,
        jobs: usize,
        plan: &[(usize, Vec<Bytes>)],
        replies: &[OwnedFrame],
    ) -> Vec<Verdict> {
        let mut verdicts: Vec<Verdict> = (0..jobs).map(|_| Verdict::Done(count_reply(0))).collect();
        if let Some(OwnedFrame::Error(e)) = replies.first() {
            if e.starts_with("NOPERM") {
                // This identity may not use transactions: stop claiming, send per request.
                self.atomic = false;
                return (0..jobs).map(|_| Verdict::Again).collect();
            }
            let reply = error_reply(e);
            return (0..jobs).map(|_| Verdict::Done(reply.clone())).collect();
        }
        let queued = replies.get(1..=plan.len()).unwrap_or(&[]);
        let refused: Vec<(usize, &String)> = queued
            .iter()
            .zip(plan)
            .filter_map(|(r, (owner, _))| match r {
                OwnedFrame::Error(e) => Some((*owner, e)),
                _ => None,
            })
            .collect();
        if !refused.is_empty() {
            // Redis aborted the transaction: nothing was applied. The refused requests get
            // Redis's error; everyone else is planned again without them.
            let mut verdicts: Vec<Verdict> = (0..jobs).map(|_| Verdict::Again).collect();
            for (owner, e) in refused {
                verdicts[owner] = Verdict::Done(error_reply(e));
            }
            return verdicts;
        }
        match replies.get(plan.len() + 1) {
            Some(OwnedFrame::Array(results)) if results.len() == plan.len() => {
                for (result, (owner, _)) in results.iter().zip(plan) {
                    verdicts[*owner] = Verdict::Done(result_reply(result));
                }
                verdicts
            }
            other => {
                let reply = match other {
                    Some(OwnedFrame::Error(e)) => error_reply(e),
                    _ => unexpected(),
                };
                (0..jobs).map(|_| Verdict::Done(reply.clone())).collect()
            }
        }
    }
}

/// Judges replies to plain pipelined delete commands.
fn judge_pipeline(
    jobs: usize,
    plan: &[(usize, Vec<Bytes>)],
    replies: &[OwnedFrame],
    claimed: bool,
) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = (0..jobs).map(|_| Verdict::Done(count_reply(0))).collect();
    let mut failed_owner = false;
    for (result, (owner, _)) in replies.iter().zip(plan) {
        let reply = result_reply(result);
        failed_owner |= reply.first() == Some(&b'-');
        verdicts[*owner] = Verdict::Done(reply);
    }
    if claimed && failed_owner {
        // Requests that sent nothing lost their keys to the request that failed: their keys
        // may still exist, so they go again rather than answer 0.
        let owners: HashSet<usize> = plan.iter().map(|(o, _)| *o).collect();
        for (i, v) in verdicts.iter_mut().enumerate() {
            if !owners.contains(&i) {
                *v = Verdict::Again;
            }
        }
    }
    verdicts
}

/// Splits the batch into one command per request. With `claim`, each key goes only to the
/// first request that names it (requests left without keys send nothing).
fn plan(pending: &[DeleteJob], claim: bool) -> Vec<(usize, Vec<Bytes>)> {
    let mut claimed: HashSet<&Bytes> = HashSet::new();
    let mut plan = Vec::new();
    for (i, job) in pending.iter().enumerate() {
        let keys: Vec<Bytes> = if claim {
            job.what
                .iter()
                .filter(|k| claimed.insert(*k))
                .cloned()
                .collect()
        } else {
            job.what.clone()
        };
        if !keys.is_empty() {
            plan.push((i, keys));
        }
    }
    plan
}

fn result_reply(frame: &OwnedFrame) -> Bytes {
    match frame {
        OwnedFrame::Integer(n) => count_reply(*n),
        OwnedFrame::Error(e) => error_reply(e),
        _ => unexpected(),
    }
}

fn unexpected() -> Bytes {
    error_reply("ERR stormwall: unexpected reply from Redis to an invalidation; not applied")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(requests: &[&[&str]]) -> Vec<DeleteJob> {
        let sem = Arc::new(tokio::sync::Semaphore::new(100));
        requests
            .iter()
            .map(|keys| Job {
                what: keys.iter().map(|k| Bytes::from(k.to_string())).collect(),
                deadline: Instant::now(),
                received: Instant::now(),
                reply: tokio::sync::oneshot::channel().0,
                _admission: super::super::Admission {
                    _request: Some(sem.clone().try_acquire_owned().unwrap()),
                    _keys: None,
                },
            })
            .collect()
    }

    fn shown(plan: &[(usize, Vec<Bytes>)]) -> Vec<(usize, Vec<&str>)> {
        plan.iter()
            .map(|(o, ks)| {
                (
                    *o,
                    ks.iter().map(|k| std::str::from_utf8(k).unwrap()).collect(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn keys_are_claimed_by_the_first_request() {
        let batch = jobs(&[&["a", "b"], &["b", "c"], &["a"], &["c", "d"]]);
        assert_eq!(
            shown(&plan(&batch, true)),
            vec![(0, vec!["a", "b"]), (1, vec!["c"]), (3, vec!["d"])]
        );
        // Without claims every request sends its own keys.
        assert_eq!(plan(&batch, false).len(), 4);
    }

    #[tokio::test]
    async fn identical_requests_become_one_command() {
        let batch = jobs(&[&["k1", "k2"], &["k1", "k2"], &["k1", "k2"]]);
        assert_eq!(shown(&plan(&batch, true)), vec![(0, vec!["k1", "k2"])]);
    }
}
