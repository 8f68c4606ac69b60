//! Coalesced `FLUSHDB`/`FLUSHALL`: one flush answers every request for the same target that
//! arrived before it started (G2); a few flushes of a target go at once (`flush.burst`),
//! after which they are spaced `flush.min_interval` apart.
//!
//! A worker serves one target (an identity's database for `FLUSHDB`, or all of that
//! identity's databases for `FLUSHALL`). When a request arrives it waits for the target's
//! spacing budget, then takes every request queued by that moment and executes a single
//! flush for all of them. Requests arriving while that flush runs wait for the next one: a
//! flush that started before a request arrived never answers it.
//!
//! Each request is allowed or refused exactly as Redis would treat its own form (`FLUSHALL`,
//! `FLUSHALL SYNC`, `FLUSHALL ASYNC` may each be allowed or not by ACL rules): before each
//! flush, Redis is asked which forms this identity may run ([`access`](super::access)). A
//! request whose own form is refused gets Redis's refusal (an ACL rule, or `rename-command`);
//! a refusal that only the check's `MULTI` meets (`-OOM` over `maxmemory`) says nothing, and
//! the flush itself, never inside `MULTI`, gets Redis's own answer. `flush.mode` rewrites a
//! request only where both forms are allowed (`as-requested`: to the strongest form among the
//! requests, `SYNC` over plain over `ASYNC`, so coalesced requests share one flush); requests
//! that end up with different forms get one flush each, in one pipeline.
//!
//! A flush's answer is `+OK` however many attempts it took, so a flush whose connection was
//! lost in flight is retried (for the clients still waiting) until the deadline; only then is
//! its fate reported unknown.

use std::num::NonZeroU32;
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::counter;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::mpsc;

use super::access::{self, Access, Forms, is_command_refusal};
use super::executor::{Executor, NotSent};
use super::outcome::{Outcome, PassReason, Refusal};
use super::shared_budget::{Units, take};
use super::{
    FlushJob, Live, Place, Registry, Shared, earliest, expire_before, flushers, next_job, prune,
    send_margin,
};
use crate::config::FlushMode;
use crate::upstream::Identity;

/// The three forms of a flush, as indexes: the client's `None`, `Some(true)`, `Some(false)`.
const PLAIN: usize = 0;
const SYNC: usize = 1;
const ASYNC: usize = 2;

fn form_of(sync: Option<bool>) -> usize {
    match sync {
        None => PLAIN,
        Some(true) => SYNC,
        Some(false) => ASYNC,
    }
}

/// How much a form makes sure of before `+OK`: `SYNC` frees the memory, plain follows
/// Redis's `lazyfree-lazy-user-flush`, `ASYNC` frees it later.
fn strength(form: usize) -> u8 {
    match form {
        SYNC => 2,
        PLAIN => 1,
        _ => 0,
    }
}

/// A target's spacing: `burst` flushes at once, then one per `min_interval` (stretched by
/// the adaptive budget: at half the budget, twice the interval). Scoped flushes are spaced
/// the same way.
pub(super) struct Spacing {
    settings: (Duration, u32),
    fraction: f64,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Spacing {
    fn new(
        settings: (Duration, u32),
        fraction: f64,
        max_wait: Duration,
        old: Option<&Spacing>,
    ) -> Spacing {
        let burst = NonZeroU32::new(settings.1).unwrap_or(NonZeroU32::MIN);
        // Never so far apart that a flush would time out waiting for its turn.
        let interval = settings.0.div_f64(fraction).min(max_wait / 2);
        let limiter =
            Quota::with_period(interval).map(|q| RateLimiter::direct(q.allow_burst(burst)));
        if let (Some(limiter), Some(old)) = (&limiter, old) {
            if fraction < old.fraction {
                // Cut for Redis's sake: the burst was had at the old pace.
                let _ = limiter.check_n(burst);
            } else if let Some(used) = NonZeroU32::new(burst.get() - old.take_available(burst)) {
                // Grown back, or reloaded: what a storm used of the burst stays used. A fresh
                // limiter would let a steady storm have `burst` flushes at once again at
                // every step of the adaptive budget's growth (each step rebuilds the spacing).
                let _ = limiter.check_n(used);
            }
        }
        Spacing {
            settings,
            fraction,
            limiter,
        }
    }

    /// Waits for the next flush's turn under the spacing in `slot`, first brought up to date
    /// with the settings and the adaptive budget in `shared`.
    pub(super) async fn wait_turn(slot: &mut Option<Spacing>, shared: &Shared) {
        let settings = (shared.config.flush.min_interval, shared.config.flush.burst);
        let fraction = shared.fraction();
        let max_wait = shared.config.invalidation.max_wait;
        let spacing = match slot.take() {
            Some(s) if s.holds(settings, fraction) => slot.insert(s),
            old => slot.insert(Spacing::new(settings, fraction, max_wait, old.as_ref())),
        };
        if let Some(limiter) = &spacing.limiter {
            limiter.until_ready().await;
        }
    }

    /// How many flushes this spacing would let go at once now, at most `up_to`. Takes them,
    /// so it is only for a spacing being replaced.
    fn take_available(&self, up_to: NonZeroU32) -> u32 {
        match &self.limiter {
            Some(limiter) => (0..up_to.get())
                .take_while(|_| limiter.check().is_ok())
                .count() as u32,
            None => up_to.get(),
        }
    }

    /// Whether this spacing still stands for `settings` at `fraction`.
    fn holds(&self, settings: (Duration, u32), fraction: f64) -> bool {
        self.settings == settings
            && (fraction - self.fraction).abs() <= 0.1 * self.fraction
            && (fraction < 1.0 || self.fraction == 1.0)
    }
}

/// Serves one flush target until it is idle for `identity_idle_timeout`.
pub(super) async fn worker(
    live: Live,
    registry: Weak<Registry>,
    (who, all, place): (Identity, bool, Place),
    mut rx: mpsc::UnboundedReceiver<FlushJob>,
) {
    let key = (who.clone(), all, place.clone());
    let name: &'static [u8] = if all { b"FLUSHALL" } else { b"FLUSHDB" };
    let label = if all { "flushall" } else { "flushdb" };
    let mut exec = Executor::new(who.clone());
    let mut told = false;
    let mut checkable = true;
    let mut spacing: Option<Spacing> = None;
    while let Some(first) = next_job(&live, &registry, flushers, &key, &who, &mut rx).await {
        Spacing::wait_turn(&mut spacing, &live.load_full()).await;
        let mut waiters = vec![first];
        while let Ok(job) = rx.try_recv() {
            waiters.push(job);
        }
        counter!("stormwall_flushes_requested_total", "command" => label)
            .increment(waiters.len() as u64);
        let mut round = Round {
            exec: &mut exec,
            place: &place,
            name,
            label,
            told: &mut told,
            checkable: &mut checkable,
        };
        round.run(&live, waiters).await;
    }
}

struct Round<'a> {
    exec: &'a mut Executor,
    /// Where the flush runs: the upstream, or one cluster master.
    place: &'a Place,
    name: &'static [u8],
    label: &'static str,
    told: &'a mut bool,
    /// The identity may run `DISCARD`, so its permissions can be checked (a check whose
    /// `DISCARD` is refused leaves the connection inside `MULTI`).
    checkable: &'a mut bool,
}

impl Round<'_> {
    /// Flushes once for `waiters` (more than once only if forms differ, or to retry).
    async fn run(&mut self, live: &Live, mut waiters: Vec<FlushJob>) {
        // A flush was sent and its answer lost: from then on, a waiter whose time runs out
        // may have been flushed.
        let mut maybe_applied = false;
        let mut paid = Units::default();
        loop {
            let shared = live.load_full();
            let inv = &shared.config.invalidation;
            let max_wait = inv.max_wait;
            let late = || {
                if maybe_applied {
                    Outcome::Unknown
                } else {
                    Outcome::NotApplied(Refusal::Expired { max_wait })
                }
            };
            let margin = send_margin(max_wait);
            prune(&mut waiters, margin, late);
            if waiters.is_empty() {
                return;
            }
            let deadline = earliest(&waiters);
            let forms: Vec<Vec<Bytes>> = [PLAIN, SYNC, ASYNC]
                .into_iter()
                .map(|f| self.form(f))
                .collect();
            let conn = match self
                .exec
                .ready(self.place.upstream(&shared.config), deadline)
                .await
            {
                Ok(conn) => conn,
                Err(NotSent::Refused(e)) => return self.pass_through(waiters, &e),
                Err(_) => {
                    // A cluster master that cannot be reached is answered at once (unless a
                    // flush may have run there): the engine sends it to the master that
                    // serves those slots next.
                    let moved_on = self.place.in_cluster() && !maybe_applied;
                    if moved_on || !self.exec.pause(deadline).await {
                        let outcome = if maybe_applied {
                            Outcome::Unknown
                        } else {
                            Outcome::NotApplied(Refusal::Unreachable)
                        };
                        waiters.into_iter().for_each(|j| j.answer(outcome.clone()));
                        return;
                    }
                    continue;
                }
            };
            let access = if *self.checkable {
                match access::check(conn, &forms, Forms::Destructive, deadline).await {
                    Ok(access) => access,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::PermissionDenied {
                            *self.checkable = false;
                        }
                        self.exec.discard();
                        continue;
                    }
                }
            } else {
                None
            };
            // Each waiter's own form first: refused as Redis refuses it.
            if let Some(access) = &access {
                for job in std::mem::take(&mut waiters) {
                    match &access[form_of(job.what)] {
                        Access::Denied(e) => job.answer(Outcome::Redis(e.clone())),
                        // Unsure: the flush itself, sent plain, gets Redis's own answer.
                        Access::Allowed | Access::Unsure => waiters.push(job),
                    }
                }
                if waiters.is_empty() {
                    return;
                }
            }
            let may = |f: usize| access.as_ref().is_some_and(|a| a[f] == Access::Allowed);
            // As requested, one flush answers all: the strongest form any of them asked for
            // (a plain flush is synchronous unless Redis's `lazyfree-lazy-user-flush` says
            // otherwise, so it is stronger than ASYNC and weaker than SYNC).
            let strongest = waiters
                .iter()
                .map(|j| form_of(j.what))
                .max_by_key(|&f| strength(f))
                .unwrap_or(PLAIN);
            let sent: Vec<usize> = waiters
                .iter()
                .map(|j| {
                    let own = form_of(j.what);
                    let wanted = match shared.config.flush.mode {
                        FlushMode::Async => ASYNC,
                        FlushMode::Sync => SYNC,
                        FlushMode::AsRequested => strongest,
                    };
                    if wanted == own || (may(own) && may(wanted)) {
                        wanted
                    } else {
                        own
                    }
                })
                .collect();
            let mut groups: Vec<usize> = Vec::new();
            for f in &sent {
                if !groups.contains(f) {
                    groups.push(*f);
                }
            }
            let (keys_budget, commands_budget) = shared.budgets();
            let want = Units::new(0, groups.len() as u64);
            let budgets = (&*keys_budget, &*commands_budget);
            // Cluster request parts had their budget taken for the whole request.
            let prepaid = waiters.iter().all(|j| j.prepaid);
            if !prepaid
                && let Err(at) = take(&shared, budgets, want, &mut paid, deadline - margin).await
            {
                expire_before(&mut waiters, at + margin, late);
                continue;
            }
            // Waiting for budget took time: a client that left meanwhile is not flushed for.
            if waiters.iter().any(|j| j.abandoned()) {
                continue;
            }
            let commands: Vec<Vec<Bytes>> = groups.iter().map(|&f| self.form(f)).collect();
            counter!("stormwall_flushes_executed_total", "command" => self.label)
                .increment(groups.len() as u64);
            counter!("stormwall_invalidation_commands_sent_total").increment(groups.len() as u64);
            let started = tokio::time::Instant::now();
            let replies = match self.exec.send(&commands, deadline).await {
                Err(_) => continue,
                Ok(Err(_lost)) => {
                    maybe_applied = true;
                    paid = Units::default();
                    continue;
                }
                Ok(Ok(replies)) => replies,
            };
            shared.observe(super::adaptive::Sample::Batch, started.elapsed());
            paid = Units::default();
            let mut again = Vec::new();
            for (job, form) in waiters.into_iter().zip(sent) {
                let group = groups.iter().position(|&g| g == form).unwrap_or(0);
                match replies.get(group) {
                    Some(OwnedFrame::SimpleString(s)) if s == b"OK" => job.answer(Outcome::Flushed),
                    // A rewrite refused since the check: the next round checks again.
                    Some(OwnedFrame::Error(e))
                        if form != form_of(job.what) && is_command_refusal(e) =>
                    {
                        again.push(job)
                    }
                    Some(OwnedFrame::Error(e)) if !maybe_applied => {
                        job.answer(Outcome::Redis(e.clone()))
                    }
                    _ => {
                        self.exec.discard();
                        job.answer(Outcome::Unknown)
                    }
                }
            }
            waiters = again;
        }
    }

    fn form(&self, form: usize) -> Vec<Bytes> {
        let mut cmd = vec![Bytes::from_static(self.name)];
        match form {
            SYNC => cmd.push(Bytes::from_static(b"SYNC")),
            ASYNC => cmd.push(Bytes::from_static(b"ASYNC")),
            _ => {}
        }
        cmd
    }

    /// Redis no longer accepts this identity on a connection of the shield's own.
    fn pass_through(&mut self, waiters: Vec<FlushJob>, error: &str) {
        if !std::mem::replace(self.told, true) {
            tracing::warn!(
                db = self.exec.identity().db,
                %error,
                "Redis refuses a new connection for this identity; its flushes \
                 run on the clients' own connections (not coalesced)"
            );
        }
        for job in waiters {
            job.answer(Outcome::PassThrough(PassReason::of(error)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: (Duration, u32) = (Duration::from_secs(1), 3);
    const MAX_WAIT: Duration = Duration::from_secs(5);

    fn allowed_now(spacing: &Spacing) -> usize {
        let limiter = spacing.limiter.as_ref().expect("spaced");
        (0..10).take_while(|_| limiter.check().is_ok()).count()
    }

    /// A storm used the burst while the adaptive budget was cut; when the budget grows back
    /// the spacing is rebuilt at the faster pace, and it must not hand out a new burst (it
    /// did: each growth step let three more flushes go at once).
    #[test]
    fn a_spacing_rebuilt_as_the_budget_grows_keeps_the_burst_used() {
        let cut = Spacing::new(SETTINGS, 0.5, MAX_WAIT, None);
        assert_eq!(allowed_now(&cut), 3);
        let grown = Spacing::new(SETTINGS, 0.6, MAX_WAIT, Some(&cut));
        assert_eq!(allowed_now(&grown), 0);
        let whole = Spacing::new(SETTINGS, 1.0, MAX_WAIT, Some(&grown));
        assert_eq!(allowed_now(&whole), 0);
    }

    /// What was left of the burst carries over a rebuild: an idle target keeps all of it, a
    /// target that used one flush keeps two.
    #[test]
    fn a_rebuilt_spacing_keeps_what_was_left_of_the_burst() {
        let idle = Spacing::new(SETTINGS, 0.5, MAX_WAIT, None);
        assert_eq!(
            allowed_now(&Spacing::new(SETTINGS, 1.0, MAX_WAIT, Some(&idle))),
            3
        );
        let once = Spacing::new(SETTINGS, 0.5, MAX_WAIT, None);
        assert!(once.limiter.as_ref().unwrap().check().is_ok());
        assert_eq!(
            allowed_now(&Spacing::new(SETTINGS, 1.0, MAX_WAIT, Some(&once))),
            2
        );
        // A cut still takes the whole burst, as before.
        let idle = Spacing::new(SETTINGS, 1.0, MAX_WAIT, None);
        assert_eq!(
            allowed_now(&Spacing::new(SETTINGS, 0.5, MAX_WAIT, Some(&idle))),
            0
        );
    }
}
