//! Batched `DEL`/`UNLINK`: each key deleted once per batch, each client told exactly how many
//! keys *its* request removed (G2), and allowed or refused exactly as Redis would treat its
//! own command (G5).
//!
//! A batch is a sequence of requests in arrival order. Under the sequential order "request 1,
//! then request 2, …", a key shared by several requests is removed by the first of them; the
//! later ones would find it gone. So each key is *claimed* by the first request that names it,
//! and each request sends one delete command with only the keys it claimed: the command's
//! integer reply is then exactly that request's answer, and requests left with no keys answer
//! `0`. A storm of identical `DEL`s becomes a single command. Claims are per command name: a
//! key claimed by an `UNLINK` never answers a `DEL` request, whose user may not be allowed to
//! run `DEL` (Redis must see that request's own command to refuse it).
//!
//! Claiming is only sound if the batch executes atomically — otherwise a write landing between
//! two requests' commands could split one request's effect across two points in time. So a
//! batch of several commands runs as one Lua script ([`BATCH_SCRIPT`]: each command in order,
//! each reply returned), which is also one command for Redis and for the command budget —
//! a pipeline of 100,000 single-key deletes is a hundred or so scripts, not 100,000
//! commands. Where the identity may not run it (an ACL rule on `EVAL` or on a key, `EVAL`
//! renamed away) nothing ran, and the batch is wrapped in `MULTI`/`EXEC` instead; a command
//! refused inside the script (its refusal text is the script's, not the one Redis gives the
//! command itself) is not an answer: that request goes again with its own command. (Were `MULTI` refused — the
//! identity's ACL changed since it was last seen to allow it — the commands run one by one:
//! requests answered by a single command still get exact counts, the others are reported
//! unknown.) If a command is refused at queue time by an ACL rule (an ACL user without
//! permission on it or on one of its keys), Redis aborts the whole transaction: the refused
//! request gets Redis's own error (it was not applied) and the rest are planned again. If the
//! identity may not use `MULTI` at all, the worker stops claiming and sends each request's own
//! keys, one command per request.
//!
//! Redis may also refuse the transaction itself, which no client's own command would meet:
//! over `maxmemory` every command queued inside `MULTI` gets `-OOM` (a plain `DEL` is always
//! allowed, it frees memory), and a user may be allowed `MULTI` but not `EXEC`
//! (`-EXECABORT … NOPERM … 'exec'`). Nothing was applied then, and the same requests go again
//! at once without a transaction, each with its own command: no claims in that round, and
//! every count is still exact, since each command is atomic and their order is a sequential
//! order. Only an ACL refusal inside `MULTI` is taken as the client's answer.
//!
//! `invalidation.delete_command` is applied to a request only where the identity may run both
//! its own command and the configured one, as Redis answers a side-effect-free check made for
//! each batch that needs it ([`access`](super::access)); otherwise the request's own command
//! is sent.
//!
//! Before every send, requests whose deadline passed or whose client left are taken out and
//! the batch is planned again: nothing is sent for a client that is no longer waiting.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Weak;

use bytes::Bytes;
use metrics::{counter, histogram};
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::access::{self, Access, Forms, is_command_refusal, probe_key};
use super::executor::{Executor, NotSent};
use super::outcome::{Outcome, PassReason, Refusal};
use super::shared_budget::{Units, take};
use super::{
    DeleteJob, Live, Place, Registry, Shared, deleters, earliest, expire_before, next_job, prune,
    send_margin,
};
use crate::config::DeleteCommand;
use crate::upstream::Identity;

/// A delete request: its keys (deduplicated) and whether the client sent `UNLINK`.
#[derive(Debug)]
pub(super) struct Delete {
    pub keys: Vec<Bytes>,
    pub unlink: bool,
}

/// Serves one identity's delete requests (on one master, in a cluster) until it is idle for
/// `identity_idle_timeout`.
pub(super) async fn worker(
    live: Live,
    registry: Weak<Registry>,
    (who, place): (Identity, Place),
    mut rx: mpsc::UnboundedReceiver<DeleteJob>,
) {
    let key = (who.clone(), place.clone());
    let mut worker = Worker {
        live: live.clone(),
        exec: Executor::new(who.clone()),
        place,
        deferred: VecDeque::new(),
        atomic: true,
        scripted: true,
        checkable: true,
        told: false,
    };
    loop {
        let first = match worker.deferred.pop_front() {
            Some(job) => job,
            None => match next_job(&live, &registry, deleters, &key, &who, &mut rx).await {
                Some(job) => job,
                None => return,
            },
        };
        let batch = worker.gather(first, &mut rx).await;
        worker.run(batch).await;
    }
}

/// The slot of a cluster delete request's keys (the engine splits requests by slot; a
/// worker that cannot run the batch script batches those of one slot together).
fn slot_of(job: &DeleteJob) -> Option<u16> {
    job.what
        .keys
        .first()
        .map(|k| crate::cluster::slot::key_slot(k))
}

struct Worker {
    live: Live,
    exec: Executor,
    /// Where the batches run: the upstream, or one cluster master.
    place: Place,
    /// In a cluster: requests taken from the queue for another slot than the batch being
    /// gathered, served first (in arrival order) by the next batches.
    deferred: VecDeque<DeleteJob>,
    /// Whether this identity may use `MULTI` (and so whether keys can be claimed).
    atomic: bool,
    /// Whether this identity may run the batch script (`EVAL`).
    scripted: bool,
    /// Whether this identity may run `DISCARD`, so its permissions can be checked (a check
    /// whose `DISCARD` is refused leaves the connection inside `MULTI`).
    checkable: bool,
    /// The credentials refusal was logged (once per worker).
    told: bool,
}

/// One delete command in a plan.
#[derive(Debug)]
struct Entry {
    /// The request (index into the participants) whose answer this command's reply is.
    owner: usize,
    unlink: bool,
    /// Sent as the other command than the client's.
    rewritten: bool,
    keys: Vec<Bytes>,
}

/// The commands for the first `covers.len()` pending requests (the participants).
#[derive(Debug)]
struct Plan {
    entries: Vec<Entry>,
    /// Per participant: the entries that remove its keys (its own, if any, last).
    covers: Vec<Vec<usize>>,
}

/// What became of one participant after a round.
enum Judged {
    Done(Outcome),
    /// Not applied in this round (its transaction was aborted, it lost its keys to a
    /// request that failed, or a rewrite was refused); plan it again.
    Again,
}

impl Worker {
    /// The settings as of now (a reload is picked up at the next use).
    fn shared(&self) -> std::sync::Arc<Shared> {
        self.live.load_full()
    }

    /// Takes whatever else is queued, up to `max_batch_keys` distinct keys.
    async fn gather(
        &mut self,
        first: DeleteJob,
        rx: &mut mpsc::UnboundedReceiver<DeleteJob>,
    ) -> Vec<DeleteJob> {
        let inv = &self.shared().config.invalidation;
        if !inv.batch_delay.is_zero() {
            tokio::time::sleep(inv.batch_delay).await;
        }
        let mut distinct: std::collections::HashSet<Bytes> =
            first.what.keys.iter().cloned().collect();
        // In a cluster a batch spans slots only if it can run as the batch script, which a
        // master runs over keys of all its slots ([`CLUSTER_BATCH_SCRIPT`]); a transaction
        // (or a command) whose keys span slots is refused, even on one node.
        let slot = (self.place.in_cluster() && !self.scripted)
            .then(|| slot_of(&first))
            .flatten();
        let mut batch = vec![first];
        let mut later = VecDeque::new();
        while distinct.len() < inv.max_batch_keys {
            let job = match self.deferred.pop_front() {
                Some(job) => job,
                None => match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            if slot.is_some() && slot_of(&job) != slot {
                later.push_back(job);
                continue;
            }
            distinct.extend(job.what.keys.iter().cloned());
            batch.push(job);
        }
        later.extend(self.deferred.drain(..));
        self.deferred = later;
        batch
    }

    async fn run(&mut self, mut pending: Vec<DeleteJob>) {
        let now = Instant::now();
        for job in &pending {
            histogram!("stormwall_invalidation_wait_seconds")
                .record((now - job.received).as_secs_f64());
        }
        // Budget already taken for the current plan and not yet used by a send.
        let mut paid = Units::default();
        // Redis refused the last round's transaction itself: this round goes without one.
        let mut plain = false;
        loop {
            let shared = self.shared();
            let inv = &shared.config.invalidation;
            let max_wait = inv.max_wait;
            let expired = || Outcome::NotApplied(Refusal::Expired { max_wait });
            let margin = send_margin(max_wait);
            prune(&mut pending, margin, expired);
            if pending.is_empty() {
                return;
            }
            let deadline = earliest(&pending);
            match self
                .exec
                .ready(self.place.upstream(&shared.config), deadline)
                .await
            {
                Ok(_) => {}
                Err(NotSent::Refused(e)) => return self.pass_through(pending, &e),
                Err(_) => {
                    // A cluster master that cannot be reached is answered at once: the
                    // engine sends the requests to the master the slot map names next.
                    if self.place.in_cluster() || !self.exec.pause(deadline).await {
                        for job in pending {
                            job.answer(Outcome::NotApplied(Refusal::Unreachable));
                        }
                        return;
                    }
                    continue;
                }
            }
            let configured = inv.delete_command == DeleteCommand::Unlink;
            // The configured command replaces a client's own only where the identity may run
            // both, as Redis says now.
            let rewrite = if pending.iter().any(|j| j.what.unlink != configured) {
                let slot = self
                    .place
                    .in_cluster()
                    .then(|| slot_of(&pending[0]))
                    .flatten();
                match self.may_rewrite(&shared, slot, deadline).await {
                    Ok(rewrite) => rewrite,
                    Err(_) => {
                        self.exec.discard();
                        continue;
                    }
                }
            } else {
                false
            };
            let plain_round = std::mem::take(&mut plain);
            let unlink_for = |d: &Delete| if rewrite { configured } else { d.unlink };
            let (keys_budget, commands_budget) = shared.budgets();
            let max_keys = keys_budget.burst as usize;
            // Claims need the batch to run atomically: as one script, or inside MULTI.
            let scripted = self.scripted && !plain_round;
            let mut claim = (self.atomic || scripted) && !plain_round;
            let mut plan = plan(&pending, claim, unlink_for, max_keys);
            let script = scripted && plan.entries.len() > 1 && fits_script(&plan);
            // Claims without the script need MULTI, which a cluster refuses across slots.
            let spans_slots = self.place.in_cluster() && spans_slots(&plan);
            if !script && claim && (!self.atomic || spans_slots) {
                claim = false;
                plan = self::plan(&pending, claim, unlink_for, max_keys);
            }
            let participants = plan.covers.len();
            if plan.entries.is_empty() {
                // Requests naming no key: Redis would answer 0 without deleting anything.
                let rest = pending.split_off(participants);
                pending
                    .into_iter()
                    .for_each(|j| j.answer(Outcome::Count(0)));
                pending = rest;
                continue;
            }
            let keys: u64 = plan.entries.iter().map(|e| e.keys.len() as u64).sum();
            // What reaches Redis: one script, or one command per entry.
            let commands = if script { 1 } else { plan.entries.len() as u64 };
            // A plan holds more than `keys_burst` keys only when it is one request alone: a
            // single request is not a storm, and one needing more budget than `max_wait` can
            // ever bring would otherwise be refused forever (Redis itself would run it). It
            // is charged one full burst, so the requests after it still wait their turn.
            let charged = keys.min(u64::from(keys_budget.burst));
            let deadline = earliest(&pending[..participants]);
            // Cluster request parts had their budget taken for the whole request.
            let prepaid = pending[..participants].iter().all(|j| j.prepaid);
            let budget = if prepaid {
                Ok(())
            } else {
                take(
                    &shared,
                    (&*keys_budget, &*commands_budget),
                    Units::new(charged, commands),
                    &mut paid,
                    deadline - margin,
                )
                .await
            };
            if let Err(at) = budget {
                // The budget cannot be had before some requests' deadlines: they are answered
                // now, without spending budget on them, and the rest planned again.
                expire_before(&mut pending, at + margin, expired);
                continue;
            }
            // Waiting for budget took time: a client that left meanwhile is not executed.
            if pending[..participants].iter().any(|j| j.abandoned()) {
                continue;
            }
            let wrap = !script && claim && plan.entries.len() > 1;
            let mut batch: Vec<Vec<Bytes>> = if script {
                vec![script_command(&plan, self.place.in_cluster())]
            } else {
                plan.entries
                    .iter()
                    .map(|e| {
                        let mut cmd = Vec::with_capacity(e.keys.len() + 1);
                        cmd.push(Bytes::from_static(if e.unlink {
                            b"UNLINK"
                        } else {
                            b"DEL"
                        }));
                        cmd.extend(e.keys.iter().cloned());
                        cmd
                    })
                    .collect()
            };
            if wrap {
                batch.insert(0, command(b"MULTI"));
                batch.push(command(b"EXEC"));
            }
            let received: usize = pending[..participants]
                .iter()
                .map(|j| j.what.keys.len())
                .sum();
            counter!("stormwall_invalidation_batches_total").increment(1);
            histogram!("stormwall_invalidation_batch_keys").record(keys as f64);
            counter!("stormwall_invalidation_keys_sent_total").increment(keys);
            counter!("stormwall_invalidation_coalesced_keys_total")
                .increment((received as u64).saturating_sub(keys));
            counter!("stormwall_invalidation_commands_sent_total").increment(batch.len() as u64);
            let rest = pending.split_off(participants);
            let started = Instant::now();
            let judged = match self.exec.send(&batch, deadline).await {
                // Closed before anything was written: plan again.
                Err(_) => {
                    pending.extend(rest);
                    continue;
                }
                Ok(Err(_lost)) => None,
                Ok(Ok(replies)) => {
                    shared.observe(super::adaptive::Sample::Batch, started.elapsed());
                    shared.sent(keys);
                    if wrap
                        && matches!(replies.first(), Some(OwnedFrame::Error(e)) if e.starts_with("NOPERM"))
                    {
                        // This identity may not use transactions (any more): stop claiming.
                        self.atomic = false;
                    }
                    let judged = if script {
                        match judge_script(&plan, &replies) {
                            Script::Judged(judged, refused) => {
                                // Redis's own error for a request comes from its own
                                // command: those go again, each alone, next round.
                                plain = refused;
                                Some(judged)
                            }
                            Script::NotRun { may_not_eval } => {
                                // Nothing ran: the same requests go again at once (without
                                // the script for good if this identity may not run it).
                                tracing::debug!(
                                    may_not_eval,
                                    "Redis refused the shield's batch script; sending each \
                                     request's own command instead"
                                );
                                if may_not_eval {
                                    self.scripted = false;
                                } else {
                                    plain = true;
                                }
                                pending.extend(rest);
                                continue;
                            }
                            Script::Unknown => None,
                        }
                    } else if wrap {
                        match judge_transaction(&plan, &replies) {
                            Some(Transaction::Judged(judged)) => Some(judged),
                            Some(Transaction::Refused { exec_denied }) => {
                                // Nothing was applied and no budget used: the same requests
                                // go again at once, each with its own command, whose answers
                                // are Redis's own for that command.
                                tracing::debug!(
                                    exec_denied,
                                    "Redis refused the shield's transaction; sending each \
                                     request's own command instead"
                                );
                                if exec_denied {
                                    self.atomic = false;
                                }
                                plain = true;
                                pending.extend(rest);
                                continue;
                            }
                            None => None,
                        }
                    } else {
                        judge_pipeline(&plan, &replies)
                    };
                    if judged.is_none() {
                        // Replies that make no sense: the connection is out of step.
                        self.exec.discard();
                    }
                    judged
                }
            };
            paid = Units::default();
            let Some(judged) = judged else {
                // Sent, and the answer was lost (or garbled): the fate of every participant
                // is unknown, and a retry could give a wrong count.
                pending.into_iter().for_each(|j| j.answer(Outcome::Unknown));
                pending = rest;
                continue;
            };
            let mut again = Vec::new();
            for (job, judged) in pending.into_iter().zip(judged) {
                match judged {
                    Judged::Done(outcome) => job.answer(outcome),
                    Judged::Again => again.push(job),
                }
            }
            again.extend(rest);
            pending = again;
        }
    }

    /// Asks Redis whether this identity may run both `DEL` and `UNLINK`, so that either may
    /// be sent for the other (asked about a key of `slot`, the batch's, in a cluster). Also
    /// learns whether it may use `MULTI`.
    async fn may_rewrite(
        &mut self,
        shared: &Shared,
        slot: Option<u16>,
        deadline: Instant,
    ) -> io::Result<bool> {
        if !self.checkable {
            return Ok(false);
        }
        let probe = probe_key(slot);
        let forms = [
            vec![Bytes::from_static(b"DEL"), probe.clone()],
            vec![Bytes::from_static(b"UNLINK"), probe],
        ];
        let conn = self
            .exec
            .ready(self.place.upstream(&shared.config), deadline)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::NotConnected))?;
        match access::check(conn, &forms, Forms::Harmless, deadline).await {
            Ok(Some(verdicts)) => Ok(verdicts.iter().all(|a| *a == Access::Allowed)),
            // The user may not run `MULTI`: no check, no claims; each request sends its own
            // command.
            Ok(None) => {
                self.atomic = false;
                Ok(false)
            }
            // The user may not run `DISCARD`: this connection is left inside `MULTI` (the
            // caller replaces it), and no check can be made again.
            Err(e) => {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    self.checkable = false;
                }
                Err(e)
            }
        }
    }

    /// Redis no longer accepts this identity on a connection of the shield's own: the
    /// sessions run these requests on their clients' own connections.
    fn pass_through(&mut self, pending: Vec<DeleteJob>, error: &str) {
        if !std::mem::replace(&mut self.told, true) {
            tracing::warn!(
                db = self.exec.identity().db,
                %error,
                "Redis refuses a new connection for this identity; its \
                 invalidations run on the clients' own connections (not coalesced)"
            );
        }
        for job in pending {
            job.answer(Outcome::PassThrough(PassReason::of(error)));
        }
    }
}

fn command(name: &'static [u8]) -> Vec<Bytes> {
    vec![Bytes::from_static(name)]
}

/// Runs a plan's delete commands in order, atomically, as one command: `KEYS` are every
/// entry's keys one after another, `ARGV` each entry's command name and key count. Each
/// command's reply (a count, or Redis's error caught by `pcall`) is returned in order, like
/// `EXEC`'s. A pipeline of thousands of small deletes is then a few commands for Redis, not
/// thousands, and the command budget counts what reaches Redis. Redis checks the caller's
/// ACL permissions for `EVAL`, for every declared key, and for each command the script runs.
const BATCH_SCRIPT: &[u8] = b"local replies = {}
local first = 1
for i = 1, #ARGV, 2 do
  local last = first + tonumber(ARGV[i + 1]) - 1
  replies[#replies + 1] = redis.pcall(ARGV[i], unpack(KEYS, first, last))
  first = last + 1
end
return replies";

/// [`BATCH_SCRIPT`] for a cluster master, its keys among the arguments rather than declared:
/// a master refuses declared keys of several slots (`CROSSSLOT`), but runs a script (one
/// without a `#!lua` line, whose calls may span slots) whose calls name keys of any of its
/// slots. Each call is one request's keys, so of one slot. A call naming a slot the master
/// does not serve (the map changed) is refused (`Script attempted to access a non local
/// key`), and that request goes again with its own command, which the master answers with
/// `MOVED`. Arguments: per entry, the command, its key count, its keys.
const CLUSTER_BATCH_SCRIPT: &[u8] = b"local replies = {}
local i = 1
while i <= #ARGV do
  local count = tonumber(ARGV[i + 1])
  replies[#replies + 1] = redis.pcall(ARGV[i], unpack(ARGV, i + 2, i + 1 + count))
  i = i + 2 + count
end
return replies";

/// Whether `plan`'s keys are in more than one slot.
fn spans_slots(plan: &Plan) -> bool {
    let mut slots = plan
        .entries
        .iter()
        .filter_map(|e| e.keys.first())
        .map(|k| crate::cluster::slot::key_slot(k));
    let first = slots.next();
    slots.any(|s| Some(s) != first)
}

/// Most keys of one entry in the script: Lua's `unpack` has a stack limit (8,000 values).
const SCRIPT_ENTRY_KEYS: usize = 4096;

/// Whether every entry of `plan` can go through the script.
fn fits_script(plan: &Plan) -> bool {
    plan.entries
        .iter()
        .all(|e| e.keys.len() <= SCRIPT_ENTRY_KEYS)
}

/// `EVAL <BATCH_SCRIPT> numkeys key… (name count)…` for `plan`, or for a cluster master
/// `EVAL <CLUSTER_BATCH_SCRIPT> 0 (name count key…)…`. (`EVAL`, not `EVALSHA`: Redis caches
/// the compiled script by its digest either way, and a restarted Redis, whose cache is
/// empty, needs no second attempt.)
fn script_command(plan: &Plan, cluster: bool) -> Vec<Bytes> {
    let keys: usize = plan.entries.iter().map(|e| e.keys.len()).sum();
    let mut cmd = Vec::with_capacity(3 + keys + 2 * plan.entries.len());
    cmd.push(Bytes::from_static(b"EVAL"));
    let name = |e: &Entry| Bytes::from_static(if e.unlink { b"UNLINK" } else { b"DEL" });
    if cluster {
        cmd.push(Bytes::from_static(CLUSTER_BATCH_SCRIPT));
        cmd.push(Bytes::from_static(b"0"));
        for entry in &plan.entries {
            cmd.push(name(entry));
            cmd.push(Bytes::from(entry.keys.len().to_string()));
            cmd.extend(entry.keys.iter().cloned());
        }
        return cmd;
    }
    cmd.push(Bytes::from_static(BATCH_SCRIPT));
    cmd.push(Bytes::from(keys.to_string()));
    for entry in &plan.entries {
        cmd.extend(entry.keys.iter().cloned());
    }
    for entry in &plan.entries {
        cmd.push(name(entry));
        cmd.push(Bytes::from(entry.keys.len().to_string()));
    }
    cmd
}

/// How a batch script's round ended.
enum Script {
    /// It ran. The `bool`: some request's command was refused inside it (with a text of the
    /// script's, not the one Redis gives the command itself), so it goes again on its own.
    Judged(Vec<Judged>, bool),
    /// Redis refused to run it (an ACL rule on `EVAL` or on a declared key, a busy or loading
    /// Redis, `EVAL` renamed away): nothing was applied. `may_not_eval`: the refusal is of
    /// `EVAL` itself, for good.
    NotRun { may_not_eval: bool },
    /// It failed while running (a Lua error, never a command's): its effect is unknown.
    Unknown,
}

/// Judges the reply to [`script_command`].
fn judge_script(plan: &Plan, replies: &[OwnedFrame]) -> Script {
    match replies.first() {
        Some(OwnedFrame::Array(results)) if results.len() == plan.entries.len() => {
            let refused = results.iter().any(|r| matches!(r, OwnedFrame::Error(_)));
            match judge_results(plan, results, false) {
                Some(judged) => Script::Judged(judged, refused),
                None => Script::Unknown,
            }
        }
        Some(OwnedFrame::Error(e)) if e.contains("user_script") || e.contains("running script") => {
            Script::Unknown
        }
        Some(OwnedFrame::Error(e)) => Script::NotRun {
            may_not_eval: e.starts_with("ERR unknown command")
                || (is_command_refusal(e) && e.contains("'eval'")),
        },
        _ => Script::Unknown,
    }
}

/// Splits the first pending requests (up to `max_keys` keys sent, at least one request)
/// into delete commands, `unlink_for` choosing each request's command. With `claim`, each
/// key goes only to the first request that names it under the same command name.
fn plan(
    pending: &[DeleteJob],
    claim: bool,
    unlink_for: impl Fn(&Delete) -> bool,
    max_keys: usize,
) -> Plan {
    let mut claimed: [HashMap<&Bytes, usize>; 2] = [HashMap::new(), HashMap::new()];
    let mut entries: Vec<Entry> = Vec::new();
    let mut covers = Vec::new();
    let mut total = 0;
    for (i, job) in pending.iter().enumerate() {
        if i > 0 && total + job.what.keys.len() > max_keys {
            break;
        }
        let unlink = unlink_for(&job.what);
        let claims = &mut claimed[usize::from(unlink)];
        let index = entries.len();
        let mut own = Vec::new();
        let mut cover: Vec<usize> = Vec::new();
        for key in &job.what.keys {
            match claims.get(key) {
                Some(&e) if claim => {
                    if !cover.contains(&e) {
                        cover.push(e);
                    }
                }
                _ => {
                    if claim {
                        claims.insert(key, index);
                    }
                    own.push(key.clone());
                }
            }
        }
        if !own.is_empty() {
            total += own.len();
            cover.push(index);
            entries.push(Entry {
                owner: i,
                unlink,
                rewritten: unlink != job.what.unlink,
                keys: own,
            });
        }
        covers.push(cover);
    }
    Plan { entries, covers }
}

/// How a `[MULTI, cmd…, EXEC]` round ended.
enum Transaction {
    Judged(Vec<Judged>),
    /// Redis refused the transaction, not a request's own command: `-OOM` for every command
    /// queued over `maxmemory` (a plain `DEL` is allowed), `EXEC` refused (`exec_denied`: by
    /// an ACL rule, for good), or any other queue-time error a client's own command might not
    /// get. Nothing was applied, and no client may see this error.
    Refused {
        exec_denied: bool,
    },
}

/// Judges `[MULTI, cmd…, EXEC]` replies. `None`: replies that make no sense.
fn judge_transaction(plan: &Plan, replies: &[OwnedFrame]) -> Option<Transaction> {
    let n = plan.entries.len();
    match replies.first()? {
        OwnedFrame::SimpleString(s) if s == b"OK" => {}
        // MULTI was refused, so the commands ran one by one, each at its own moment: a
        // request answered by one command has its exact answer; one whose keys were spread
        // over several commands has no single moment, and its count is unknown.
        OwnedFrame::Error(_) => {
            let mut judged = judge_results(plan, replies.get(1..=n)?, true)?;
            for (j, cover) in judged.iter_mut().zip(&plan.covers) {
                if cover.len() > 1 {
                    *j = Judged::Done(Outcome::Unknown);
                }
            }
            return Some(Transaction::Judged(judged));
        }
        _ => return None,
    }
    let queued = replies.get(1..=n)?;
    // Only an ACL refusal is known to be the same for the command outside `MULTI`.
    if queued
        .iter()
        .any(|r| matches!(r, OwnedFrame::Error(e) if !e.starts_with("NOPERM")))
    {
        return Some(Transaction::Refused { exec_denied: false });
    }
    if queued.iter().any(|r| matches!(r, OwnedFrame::Error(_))) {
        // Redis aborted the transaction: nothing was applied. A refused request gets Redis's
        // error for its own command; everyone else is planned again.
        let mut judged: Vec<Judged> = plan.covers.iter().map(|_| Judged::Again).collect();
        for (reply, entry) in queued.iter().zip(&plan.entries) {
            if let OwnedFrame::Error(e) = reply
                && !(entry.rewritten && is_command_refusal(e))
            {
                judged[entry.owner] = Judged::Done(Outcome::Redis(e.clone()));
            }
        }
        return Some(Transaction::Judged(judged));
    }
    match replies.get(n + 1)? {
        OwnedFrame::Array(results) if results.len() == n => {
            judge_results(plan, results, true).map(Transaction::Judged)
        }
        // EXEC itself refused (`-EXECABORT … NOPERM … 'exec'`, `-READONLY`, …): nothing was
        // applied. The clients' own commands get their own answers without a transaction.
        OwnedFrame::Error(e) => Some(Transaction::Refused {
            exec_denied: e.contains("NOPERM"),
        }),
        _ => None,
    }
}

/// Judges replies to plain pipelined delete commands.
fn judge_pipeline(plan: &Plan, replies: &[OwnedFrame]) -> Option<Vec<Judged>> {
    judge_results(plan, replies.get(..plan.entries.len())?, true)
}

/// Judges each participant by the results of the commands that removed its keys.
/// `errors_answer`: an error result is Redis's own answer to the request's own command (not
/// so inside the batch script, whose refusals read differently): else it goes again.
fn judge_results(plan: &Plan, results: &[OwnedFrame], errors_answer: bool) -> Option<Vec<Judged>> {
    let failed = |e: usize| matches!(results.get(e), Some(OwnedFrame::Error(_)));
    plan.covers
        .iter()
        .enumerate()
        .map(|(i, cover)| {
            let own = cover
                .last()
                .copied()
                .filter(|&e| plan.entries[e].owner == i);
            let others_failed = cover.iter().any(|&e| Some(e) != own && failed(e));
            Some(match own.map(|e| (e, results.get(e))) {
                Some((e, Some(OwnedFrame::Error(err)))) => {
                    if !errors_answer || (plan.entries[e].rewritten && is_command_refusal(err)) {
                        Judged::Again
                    } else {
                        Judged::Done(Outcome::Redis(err.clone()))
                    }
                }
                // Its own keys were removed, but keys it shared with a request that failed
                // were not: no single point in time gives this count.
                Some((_, Some(OwnedFrame::Integer(_)))) if others_failed => {
                    Judged::Done(Outcome::Unknown)
                }
                Some((_, Some(OwnedFrame::Integer(n)))) => Judged::Done(Outcome::Count(*n)),
                Some(_) => return None,
                // Every key of it was removed by an earlier request, unless that one failed:
                // then its keys may still exist, and it goes again.
                None if others_failed => Judged::Again,
                None => Judged::Done(Outcome::Count(0)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidation::{Admission, Job};

    fn jobs(requests: &[(&[&str], bool)]) -> Vec<DeleteJob> {
        requests
            .iter()
            .map(|(keys, unlink)| Job {
                prepaid: false,
                what: Delete {
                    keys: keys.iter().map(|k| Bytes::from(k.to_string())).collect(),
                    unlink: *unlink,
                },
                deadline: Instant::now(),
                received: Instant::now(),
                reply: tokio::sync::oneshot::channel().0,
                _admission: std::sync::Arc::new(Admission::new(None, None, 1)),
            })
            .collect()
    }

    fn shown(plan: &Plan) -> Vec<(usize, bool, Vec<&str>)> {
        plan.entries
            .iter()
            .map(|e| {
                (
                    e.owner,
                    e.unlink,
                    e.keys
                        .iter()
                        .map(|k| std::str::from_utf8(k).unwrap())
                        .collect(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn keys_are_claimed_by_the_first_request() {
        let batch = jobs(&[
            (&["a", "b"], true),
            (&["b", "c"], true),
            (&["a"], true),
            (&["c", "d"], true),
        ]);
        let p = plan(&batch, true, |d| d.unlink, 100);
        assert_eq!(
            shown(&p),
            vec![
                (0, true, vec!["a", "b"]),
                (1, true, vec!["c"]),
                (3, true, vec!["d"])
            ]
        );
        assert_eq!(p.covers[2], vec![0]);
        // Without claims every request sends its own keys.
        assert_eq!(plan(&batch, false, |d| d.unlink, 100).entries.len(), 4);
    }

    #[tokio::test]
    async fn identical_requests_become_one_command() {
        let batch = jobs(&[(&["k1", "k2"], false), (&["k1", "k2"], false)]);
        assert_eq!(
            shown(&plan(&batch, true, |d| d.unlink, 100)),
            vec![(0, false, vec!["k1", "k2"])]
        );
    }

    #[tokio::test]
    async fn claims_are_per_command_name() {
        // A DEL request is never answered by an UNLINK's claim: its own command goes out.
        let batch = jobs(&[(&["k"], true), (&["k"], false)]);
        assert_eq!(
            shown(&plan(&batch, true, |d| d.unlink, 100)),
            vec![(0, true, vec!["k"]), (1, false, vec!["k"])]
        );
        // Where both may be run, the rewrite makes them one command.
        assert_eq!(plan(&batch, true, |_| true, 100).entries.len(), 1);
    }

    fn ok(s: &str) -> OwnedFrame {
        OwnedFrame::SimpleString(s.as_bytes().to_vec())
    }

    fn err(s: &str) -> OwnedFrame {
        OwnedFrame::Error(s.into())
    }

    fn shown_judged(judged: Option<Vec<Judged>>) -> Vec<String> {
        judged
            .expect("replies make sense")
            .into_iter()
            .map(|j| match j {
                Judged::Done(o) => format!("{o:?}"),
                Judged::Again => "Again".into(),
            })
            .collect()
    }

    fn judged(t: Option<Transaction>) -> Option<Vec<Judged>> {
        match t? {
            Transaction::Judged(j) => Some(j),
            Transaction::Refused { .. } => None,
        }
    }

    #[tokio::test]
    async fn a_transaction_refused_for_itself_is_never_an_answer() {
        let batch = jobs(&[(&["a"], true), (&["b"], true)]);
        let p = plan(&batch, true, |d| d.unlink, 100);
        let oom = "OOM command not allowed when used memory > 'maxmemory'.";
        let replies = [
            ok("OK"),
            err(oom),
            err(oom),
            err("EXECABORT Transaction discarded because of previous errors."),
        ];
        assert!(matches!(
            judge_transaction(&p, &replies),
            Some(Transaction::Refused { exec_denied: false })
        ));
        let replies = [
            ok("OK"),
            ok("QUEUED"),
            ok("QUEUED"),
            err(
                "EXECABORT Transaction discarded because of: NOPERM this user has no \
                 permissions to run the 'exec' command",
            ),
        ];
        assert!(matches!(
            judge_transaction(&p, &replies),
            Some(Transaction::Refused { exec_denied: true })
        ));
    }

    #[tokio::test]
    async fn an_aborted_transaction_answers_the_refused_and_replans_the_rest() {
        // Request 0 is a rewritten DEL refused for the command (permissions changed since the
        // check): it goes again. Request 1 is refused for a key: that is its answer.
        let batch = jobs(&[(&["a"], false), (&["b"], true), (&["c"], true)]);
        let p = plan(&batch, true, |_| true, 100);
        let keys =
            "NOPERM this user has no permissions to access one of the keys used as arguments";
        let replies = [
            ok("OK"),
            err("NOPERM this user has no permissions to run the 'unlink' command"),
            err(keys),
            ok("QUEUED"),
            err("EXECABORT Transaction discarded because of previous errors."),
        ];
        assert_eq!(
            shown_judged(judged(judge_transaction(&p, &replies))),
            vec![
                "Again".to_string(),
                format!("Redis({keys:?})"),
                "Again".into()
            ]
        );
    }

    #[tokio::test]
    async fn counts_come_from_the_exec_results() {
        let batch = jobs(&[(&["a", "b"], true), (&["b"], true), (&["c"], true)]);
        let p = plan(&batch, true, |d| d.unlink, 100);
        let results = OwnedFrame::Array(vec![OwnedFrame::Integer(2), OwnedFrame::Integer(1)]);
        let replies = [ok("OK"), ok("QUEUED"), ok("QUEUED"), results];
        assert_eq!(
            shown_judged(judged(judge_transaction(&p, &replies))),
            vec!["Count(2)", "Count(0)", "Count(1)"]
        );
    }

    #[tokio::test]
    async fn a_refused_multi_leaves_spread_requests_unknown() {
        // MULTI refused: the commands ran one by one. Request 1's keys were removed by two
        // commands at two moments: no exact count exists for it.
        let batch = jobs(&[(&["a"], true), (&["a", "b"], true), (&["a"], true)]);
        let p = plan(&batch, true, |d| d.unlink, 100);
        let replies = [
            err("NOPERM this user has no permissions to run the 'multi' command"),
            OwnedFrame::Integer(1),
            OwnedFrame::Integer(1),
            err("ERR EXEC without MULTI"),
        ];
        assert_eq!(
            shown_judged(judged(judge_transaction(&p, &replies))),
            vec!["Count(1)", "Unknown", "Count(0)"]
        );
    }

    #[tokio::test]
    async fn a_failed_claimer_sends_its_dependents_again() {
        let batch = jobs(&[(&["a"], true), (&["a"], true)]);
        let p = plan(&batch, true, |d| d.unlink, 100);
        assert_eq!(
            shown_judged(judge_pipeline(&p, &[err("ERR boom")])),
            vec!["Redis(\"ERR boom\")", "Again"]
        );
    }

    #[tokio::test]
    async fn a_plan_keeps_within_the_key_budget() {
        let batch = jobs(&[(&["a", "b"], true), (&["c", "d"], true), (&["e"], true)]);
        let p = plan(&batch, true, |d| d.unlink, 3);
        assert_eq!(p.covers.len(), 1, "only the first request fits");
        // A single request larger than the budget still goes, alone.
        assert_eq!(plan(&batch, true, |d| d.unlink, 1).covers.len(), 1);
    }
}
