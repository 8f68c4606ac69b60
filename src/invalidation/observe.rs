//! Observe mode (`invalidation.mode = "observe"`): every governed command passes through to
//! Redis untouched, and this shadow model counts what the shield *would* have done with it.
//!
//! **Why it exists.** The shield changes what Redis sees (batches, `UNLINK` for `DEL`,
//! spaced `ASYNC` flushes) and what clients wait for, and under a storm it refuses requests
//! (`-BUSY`, `-TRYAGAIN`). An operator putting stormwall in front of a production Redis wants
//! to see that effect on a dashboard before it happens — how much invalidation load would
//! have been coalesced away, how many requests would have waited for the budget, and above
//! all how many would have been refused — and then switch to `enforce` by a reload. So in
//! observe mode the session forwards a governed command exactly as with
//! `invalidation.enabled = false` (same bytes, Redis's reply, no wait; `flush.deny` is not
//! applied either) and hands a description of it (identity, command, keys) to [`Observer`],
//! which never waits and never talks to Redis.
//!
//! **What each request is counted as** (`stormwall_invalidation_observed_total{command,
//! would}`), exactly one of, in this order of precedence:
//!
//! - `deny`: `flush.deny` lists it; enforcement refuses it outright.
//! - `pass`: enforcement would have passed it through ungoverned too (inside a transaction
//!   or one that may still be open, a client the shield cannot act for, more identities than
//!   `invalidation.max_identities`, raw relaying after `SUBSCRIBE`/`MONITOR`).
//! - `refuse`: the shadow queue was full under `on_full = "reject"` (`-BUSY`), or its turn —
//!   behind the batch in flight and the budget — would have come later than `max_wait`
//!   (`-TRYAGAIN`).
//! - `coalesce`: it would have sent nothing of its own: every key it names is named by an
//!   earlier request in the same would-be batch, or it is a flush answered by a flush
//!   another request of the same target opened.
//! - `delay`: it would have sent keys or a flush of its own after waiting for the rate budget
//!   (`keys_per_second`, `commands_per_second`), the flush spacing (`flush.min_interval`
//!   after `flush.burst`), or room in a full queue (`on_full = "wait"`).
//! - `batch`: it would have waited for the identity's batch (or the target's flush) in
//!   flight and gone with the next one, alongside whatever else arrived meanwhile.
//! - `execute`: it would have been sent at once (with the rest of its own pipeline).
//!
//! Keys counted in `stormwall_invalidation_observed_coalesced_keys_total` are those an
//! earlier request of the same would-be batch already named: the same quantity as
//! `stormwall_invalidation_coalesced_keys_total` in enforce mode.
//!
//! **Where the model is an estimate.** Nothing is executed, so how long a batch or flush
//! would have taken is not known: it is taken as Redis's recent round trip (the adaptive
//! controller's last window, fed by the readiness probe and the latency sampler, which runs
//! in observe mode too) times the round trips the shield makes: one per delete batch, plus
//! one for the permission check when a batch would rewrite `DEL`/`UNLINK`; two per flush
//! (the check, the flush). A batch of many keys takes Redis longer than that, so under
//! storms of large deletes the model sees somewhat less batching than enforcement would.
//! Budgets are token buckets at the configured rates (scaled by the adaptive ratio, as in
//! enforce mode) that go into debt instead of waiting, so a storm accumulates delay as the
//! queue would; a request that would wait past `max_wait` is refused and charges nothing,
//! as in enforce mode. Only the first [`TRACKED_KEYS`] distinct keys of a would-be batch are
//! remembered for coalescing (8 bytes each, as hashes), and only [`TRACKED_KEYS`] keys of
//! one request are looked at; keys beyond are counted as not coalesced. Whether a request
//! arrived while its client's earlier command's replies were unread (enforcement then
//! passes it through) is not modelled.
//!
//! Memory is bounded: one entry per identity, at most `invalidation.max_identities`, each
//! holding one key set of at most [`TRACKED_KEYS`] hashes; an entry idle for
//! `identity_idle_timeout` is dropped when room is needed. The lock is held for the
//! bookkeeping of one request (hashing at most [`TRACKED_KEYS`] keys); nothing is allocated
//! per request once the sets have grown.
//!
//! Every [`REPORT_EVERY`] in which enforcement would have done anything but execute or pass,
//! one log line sums it up; never a line per request.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use metrics::{Counter, counter};
use tokio::time::Instant;

use super::{Shared, send_margin};
use crate::config::{DeleteCommand, FlushCommand, OnFull};
use crate::upstream::Identity;

/// Every value of the `would` label, in [`Would`] order.
pub(crate) const WOULD: [&str; 7] = [
    "execute", "batch", "delay", "coalesce", "refuse", "deny", "pass",
];
/// Every value of the `command` label, in [`Observed::index`] order.
pub(crate) const COMMANDS: [&str; 3] = ["delete", "flushdb", "flushall"];

/// Keys remembered per would-be batch, and looked at per request.
pub(super) const TRACKED_KEYS: usize = 4096;
/// How often the log summary is written (if there is anything to say).
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Redis's round trip when the controller has no sample yet.
const DEFAULT_RTT: Duration = Duration::from_micros(200);

/// What enforcement would have done with one request. Ordered by precedence: when two
/// apply, the greater one is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Would {
    Execute,
    Batch,
    Delay,
    Coalesce,
    Refuse,
    Deny,
    Pass,
}

/// A governed command as observe mode sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// `DEL`/`UNLINK`; `unlink` says which.
    Delete { unlink: bool },
    /// `FLUSHDB` (`all` false) or `FLUSHALL`.
    Flush { all: bool },
}

impl Observed {
    fn index(self) -> usize {
        match self {
            Observed::Delete { .. } => 0,
            Observed::Flush { all: false } => 1,
            Observed::Flush { all: true } => 2,
        }
    }
}

/// A `u64` that is already a hash, used as its own hash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeySet = HashSet<u64, BuildHasherDefault<Prehashed>>;

/// Requests and keys in the shadow queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Load {
    requests: usize,
    keys: usize,
}

impl Load {
    fn add(&mut self, other: Load) {
        self.requests += other.requests;
        self.keys += other.keys;
    }
    fn sub(&mut self, other: Load) {
        self.requests = self.requests.saturating_sub(other.requests);
        self.keys = self.keys.saturating_sub(other.keys);
    }
}

/// A rate and burst, as the shield would use them now.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    burst: f64,
}

/// A token bucket that goes into debt rather than waiting: taking more than it holds says
/// when the taker would have had it. `at: None` is a full bucket.
#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    /// Taking `n` at `now`: the bucket's level after, and when the units would be had.
    fn take(&self, now: Instant, rate: Rate, n: f64) -> (f64, Instant) {
        let level = match self.at {
            None => rate.burst,
            Some(at) => (self.tokens + rate.per_second * now.duration_since(at).as_secs_f64())
                .min(rate.burst),
        };
        let after = level - n;
        let ready = if after >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64((-after / rate.per_second).min(1e6))
        };
        (after, ready)
    }

    fn set(&mut self, now: Instant, tokens: f64) {
        self.tokens = tokens;
        self.at = Some(now);
    }
}

/// The settings the model runs on, from the live config at each request.
#[derive(Debug, Clone)]
struct Params {
    /// A round trip to Redis.
    rtt: Duration,
    /// The longest a request may wait before it must be sent (`max_wait` less the margin
    /// the workers keep).
    patience: Duration,
    max_pending: usize,
    max_pending_keys: usize,
    reject: bool,
    /// Most distinct keys in one batch: the workers stop at `max_batch_keys` and plan at
    /// most a key burst at a time.
    batch_keys: usize,
    keys: Rate,
    commands: Rate,
    /// Flush spacing: one per interval after a burst (`None`: no spacing).
    spacing: Option<Rate>,
    unlink: bool,
    max_identities: usize,
    idle: Duration,
}

impl Params {
    fn from(shared: &Shared) -> Params {
        let inv = &shared.config.invalidation;
        let fraction = shared.fraction();
        let scale = |n: u32| (f64::from(n) * fraction).round().max(1.0);
        let keys = Rate {
            per_second: scale(inv.keys_per_second),
            burst: scale(inv.keys_burst),
        };
        let commands = Rate {
            per_second: scale(inv.commands_per_second),
            burst: scale(inv.commands_burst),
        };
        let flush = &shared.config.flush;
        let interval = flush.min_interval.div_f64(fraction).min(inv.max_wait / 2);
        let spacing = (!interval.is_zero()).then(|| Rate {
            per_second: 1.0 / interval.as_secs_f64(),
            burst: f64::from(flush.burst.max(1)),
        });
        Params {
            rtt: shared
                .controller
                .latency()
                .unwrap_or(DEFAULT_RTT)
                .max(Duration::from_micros(20)),
            patience: inv.max_wait.saturating_sub(send_margin(inv.max_wait)),
            max_pending: inv.max_pending,
            max_pending_keys: inv.max_pending_keys,
            reject: inv.on_full == OnFull::Reject,
            batch_keys: inv.max_batch_keys.min(keys.burst as usize).max(1),
            keys,
            commands,
            spacing,
            unlink: inv.delete_command == DeleteCommand::Unlink,
            max_identities: inv.max_identities,
            idle: inv.identity_idle_timeout,
        }
    }
}

/// The rate budgets every identity shares, as in enforce mode.
#[derive(Debug, Default)]
struct Budgets {
    keys: Bucket,
    commands: Bucket,
}

/// One identity's would-be delete worker.
#[derive(Debug)]
struct Deletes {
    /// When the batches already under way would be done.
    free_at: Instant,
    /// Requests in those batches (leave the queue at `free_at`).
    running: Load,
    /// The batch forming behind them, if any.
    queued: Option<Queued>,
    /// Keys named by the queued batch's requests (hashes).
    keys: KeySet,
}

#[derive(Debug)]
struct Queued {
    /// When the budget for its keys and command would be had.
    ready_at: Instant,
    load: Load,
    /// Distinct keys in it.
    distinct: usize,
    /// It would rewrite a client's command (one more round trip, the permission check).
    rewrite: bool,
}

impl Deletes {
    fn new(now: Instant) -> Deletes {
        Deletes {
            free_at: now,
            running: Load::default(),
            queued: None,
            keys: KeySet::default(),
        }
    }

    fn start(&self, q: &Queued) -> Instant {
        self.free_at.max(q.ready_at)
    }

    /// Moves the queued batch into flight, as the worker would once free and its budget had.
    fn promote(&mut self, p: &Params, totals: &mut Load) {
        let Some(q) = self.queued.take() else {
            return;
        };
        let start = self.start(&q);
        // What was in flight is done by the time the next batch starts.
        totals.sub(self.running);
        self.running = q.load;
        let trips = if q.rewrite { 2 } else { 1 };
        self.free_at = start + p.rtt * trips;
        self.keys.clear();
        if self.keys.capacity() > TRACKED_KEYS {
            self.keys.shrink_to(TRACKED_KEYS);
        }
    }

    /// Brings the worker up to `now`: a queued batch whose start has come is in flight, and
    /// a batch whose time is over has left the queue.
    fn settle(&mut self, now: Instant, p: &Params, totals: &mut Load) {
        if self.queued.as_ref().is_some_and(|q| self.start(q) <= now) {
            self.promote(p, totals);
        }
        if self.free_at <= now && self.queued.is_none() {
            totals.sub(std::mem::take(&mut self.running));
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.queued.is_none() && self.free_at <= now
    }

    /// One delete request, with its distinct key hashes (`keys` counts them all, tracked or
    /// not). Returns what it would have been and how many of its keys were coalesced.
    #[allow(clippy::too_many_arguments)]
    fn arrive(
        &mut self,
        now: Instant,
        p: &Params,
        budgets: &mut Budgets,
        totals: &mut Load,
        hashes: &[u64],
        keys: usize,
        unlink: bool,
        follows: bool,
    ) -> (Would, usize) {
        // A request pipelined right behind another goes to the worker with it, into the
        // same batch; any other finds the worker as time has moved it.
        if !(follows && self.queued.is_some()) {
            self.settle(now, p, totals);
        }
        let overlap = |set: &KeySet| hashes.iter().filter(|h| set.contains(h)).count();
        let mut coalesced = match &self.queued {
            Some(_) => overlap(&self.keys),
            None => 0,
        };
        // A full batch goes as it is; this request starts the next one.
        if let Some(q) = &self.queued
            && q.distinct + (keys - coalesced) > p.batch_keys
            && q.load.requests > 0
        {
            self.promote(p, totals);
            coalesced = 0;
        }
        let opens = self.queued.is_none();
        let fresh = keys - coalesced;
        let charge = fresh.min(p.keys.burst as usize) as f64;
        let (key_level, key_ready) = budgets.keys.take(now, p.keys, charge);
        let (cmd_level, cmd_ready) = if opens {
            budgets.commands.take(now, p.commands, 1.0)
        } else {
            (budgets.commands.tokens, now)
        };
        let ready_at = self
            .queued
            .as_ref()
            .map_or(now, |q| q.ready_at)
            .max(key_ready)
            .max(cmd_ready);
        let start = self.free_at.max(ready_at).max(now);
        if start > now + p.patience {
            // Answered -TRYAGAIN without spending budget on it; nothing else changes.
            return (Would::Refuse, 0);
        }
        budgets.keys.set(now, key_level);
        if opens {
            budgets.commands.set(now, cmd_level);
        }
        let load = Load { requests: 1, keys };
        totals.add(load);
        let q = self.queued.get_or_insert(Queued {
            ready_at,
            load: Load::default(),
            distinct: 0,
            rewrite: false,
        });
        q.ready_at = ready_at;
        q.load.add(load);
        q.distinct += fresh;
        q.rewrite |= unlink != p.unlink;
        for h in hashes {
            if self.keys.len() < TRACKED_KEYS {
                self.keys.insert(*h);
            }
        }
        let would = if keys > 0 && coalesced == keys {
            Would::Coalesce
        } else if ready_at > self.free_at.max(now) {
            Would::Delay
        } else if self.free_at > now {
            Would::Batch
        } else {
            Would::Execute
        };
        (would, coalesced)
    }
}

/// One flush target's would-be worker (an identity's database, or all of them).
#[derive(Debug)]
struct Flushes {
    /// When the flush under way would be done.
    busy_until: Instant,
    running: Load,
    /// The flush that would go next: when it would start, and the requests it answers.
    pending: Option<(Instant, Load)>,
    spacing: Bucket,
}

impl Flushes {
    fn new(now: Instant) -> Flushes {
        Flushes {
            busy_until: now,
            running: Load::default(),
            pending: None,
            spacing: Bucket::default(),
        }
    }

    fn settle(&mut self, now: Instant, p: &Params, totals: &mut Load) {
        if let Some((start, load)) = self.pending
            && start <= now
        {
            totals.sub(self.running);
            self.running = load;
            // The permission check, then the flush.
            self.busy_until = start + p.rtt * 2;
            self.pending = None;
        }
        if self.busy_until <= now && self.pending.is_none() {
            totals.sub(std::mem::take(&mut self.running));
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.pending.is_none() && self.busy_until <= now
    }

    fn arrive(
        &mut self,
        now: Instant,
        p: &Params,
        budgets: &mut Budgets,
        totals: &mut Load,
        follows: bool,
    ) -> Would {
        if !(follows && self.pending.is_some()) {
            self.settle(now, p, totals);
        }
        let one = Load {
            requests: 1,
            keys: 0,
        };
        if let Some((start, load)) = &mut self.pending {
            if *start > now + p.patience {
                return Would::Refuse;
            }
            load.add(one);
            totals.add(one);
            return Would::Coalesce;
        }
        let base = now.max(self.busy_until);
        let (space_level, space_ready) = match p.spacing {
            Some(rate) => self.spacing.take(now, rate, 1.0),
            None => (0.0, now),
        };
        let (cmd_level, cmd_ready) = budgets.commands.take(now, p.commands, 1.0);
        let start = base.max(space_ready).max(cmd_ready);
        if start > now + p.patience {
            return Would::Refuse;
        }
        if p.spacing.is_some() {
            self.spacing.set(now, space_level);
        }
        budgets.commands.set(now, cmd_level);
        self.pending = Some((start, one));
        totals.add(one);
        if start > base {
            Would::Delay
        } else if base > now {
            Would::Batch
        } else {
            Would::Execute
        }
    }
}

/// Everything the model holds for one identity.
struct Entry {
    last_used: Instant,
    deletes: Deletes,
    flushdb: Flushes,
    flushall: Flushes,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            last_used: now,
            deletes: Deletes::new(now),
            flushdb: Flushes::new(now),
            flushall: Flushes::new(now),
        }
    }

    fn settle(&mut self, now: Instant, p: &Params, totals: &mut Load) {
        self.deletes.settle(now, p, totals);
        self.flushdb.settle(now, p, totals);
        self.flushall.settle(now, p, totals);
    }

    /// Nothing under way, and unused for `identity_idle_timeout`: the worker would have
    /// retired.
    fn retired(&self, now: Instant, p: &Params) -> bool {
        self.deletes.idle(now)
            && self.flushdb.idle(now)
            && self.flushall.idle(now)
            && self.last_used + p.idle <= now
    }
}

/// Counts since the last log summary.
#[derive(Debug)]
struct Window {
    since: Instant,
    counts: [u64; WOULD.len()],
    coalesced_keys: u64,
}

/// The shadow engine's state.
struct Model {
    entries: HashMap<Identity, Entry>,
    budgets: Budgets,
    /// Requests and keys in the shadow queue: exact after [`Model::sweep`], otherwise an
    /// upper bound (a batch whose identity saw no request since it ended is still counted).
    totals: Load,
    /// Distinct key hashes of the request being fed (kept to reuse its allocation).
    scratch: Vec<u64>,
    window: Window,
}

impl Model {
    fn new(now: Instant) -> Model {
        Model {
            entries: HashMap::new(),
            budgets: Budgets::default(),
            totals: Load::default(),
            scratch: Vec::new(),
            window: Window {
                since: now,
                counts: [0; WOULD.len()],
                coalesced_keys: 0,
            },
        }
    }

    /// Brings every identity up to `now`, so `totals` is exact.
    fn sweep(&mut self, now: Instant, p: &Params) {
        for entry in self.entries.values_mut() {
            entry.settle(now, p, &mut self.totals);
        }
    }

    /// One governed request that reached the model (not denied, not passed through),
    /// whose distinct key hashes are in `scratch` (`keys` counts every key, tracked or not).
    fn feed(
        &mut self,
        now: Instant,
        p: &Params,
        who: &Identity,
        command: Observed,
        keys: usize,
        follows: bool,
    ) -> (Would, usize) {
        // Admission: the queue's bounds, checked on exact totals when the bound says full.
        let over = |t: &Load| {
            t.requests + 1 > p.max_pending
                || t.keys + keys.min(p.max_pending_keys) > p.max_pending_keys
        };
        let mut full = over(&self.totals);
        if full {
            self.sweep(now, p);
            full = over(&self.totals);
        }
        if full && p.reject {
            return (Would::Refuse, 0);
        }
        // FLUSHALL is the same operation from any database.
        let target;
        let who = match command {
            Observed::Flush { all: true } if who.db != 0 => {
                target = Identity {
                    db: 0,
                    ..who.clone()
                };
                &target
            }
            _ => who,
        };
        let Model {
            entries,
            budgets,
            totals,
            scratch,
            ..
        } = self;
        let Some(entry) = entry(entries, totals, now, p, who) else {
            return (Would::Pass, 0);
        };
        let (would, coalesced) = match command {
            Observed::Delete { unlink } => entry
                .deletes
                .arrive(now, p, budgets, totals, scratch, keys, unlink, follows),
            Observed::Flush { all: false } => {
                (entry.flushdb.arrive(now, p, budgets, totals, follows), 0)
            }
            Observed::Flush { all: true } => {
                (entry.flushall.arrive(now, p, budgets, totals, follows), 0)
            }
        };
        // Waiting for room in a full queue (`on_full = "wait"`) is a delay at least.
        if full && would < Would::Delay {
            return (Would::Delay, coalesced);
        }
        (would, coalesced)
    }

    fn count(&mut self, would: Would, coalesced: usize) {
        self.window.counts[would as usize] += 1;
        self.window.coalesced_keys += coalesced as u64;
    }
}

/// The entry for `who`, made if the identity cap allows (`None`: enforcement would have
/// passed the request through, as the cap does).
fn entry<'a>(
    entries: &'a mut HashMap<Identity, Entry>,
    totals: &mut Load,
    now: Instant,
    p: &Params,
    who: &Identity,
) -> Option<&'a mut Entry> {
    if !entries.contains_key(who) {
        if entries.len() >= p.max_identities {
            entries.retain(|_, e| {
                e.settle(now, p, totals);
                !e.retired(now, p)
            });
        }
        if entries.len() >= p.max_identities {
            return None;
        }
        entries.insert(who.clone(), Entry::new(now));
    }
    let entry = entries.get_mut(who)?;
    entry.last_used = now;
    Some(entry)
}

/// Resolved once: updating them is then one atomic operation.
struct Counters {
    observed: [[Counter; WOULD.len()]; COMMANDS.len()],
    coalesced_keys: Counter,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            observed: std::array::from_fn(|c| {
                std::array::from_fn(|w| {
                    counter!("stormwall_invalidation_observed_total",
                        "command" => COMMANDS[c], "would" => WOULD[w])
                })
            }),
            coalesced_keys: counter!("stormwall_invalidation_observed_coalesced_keys_total"),
        }
    }
}

/// The shadow model the engine feeds in observe mode.
pub(super) struct Observer {
    model: Arc<Mutex<Model>>,
    counters: OnceLock<Counters>,
    /// Keys are remembered as 64-bit hashes, seeded per process.
    hasher: RandomState,
    reporter: std::sync::Once,
}

impl Default for Observer {
    fn default() -> Self {
        Observer {
            model: Arc::new(Mutex::new(Model::new(Instant::now()))),
            counters: OnceLock::new(),
            hasher: RandomState::new(),
            reporter: std::sync::Once::new(),
        }
    }
}

fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    // Never held across an await; a poisoned model is still a valid model.
    model.lock().unwrap_or_else(|e| e.into_inner())
}

impl Observer {
    /// Counts what enforcement would have done with one governed request from `who`
    /// (`None`: enforcement would have passed it through ungoverned). `follows`: it was
    /// pipelined right behind a governed request of the same kind from the same client.
    pub(super) fn observe<'k>(
        &self,
        shared: &Shared,
        who: Option<&Identity>,
        command: Observed,
        keys: impl Iterator<Item = &'k [u8]>,
        follows: bool,
    ) {
        self.reporter.call_once(|| {
            tokio::spawn(report(Arc::downgrade(&self.model)));
        });
        let denied = match command {
            Observed::Flush { all } => {
                let cmd = if all {
                    FlushCommand::FlushAll
                } else {
                    FlushCommand::FlushDb
                };
                shared.config.flush.deny.contains(&cmd)
            }
            Observed::Delete { .. } => false,
        };
        let (would, coalesced) = if denied {
            (Would::Deny, 0)
        } else if let Some(who) = who {
            let p = Params::from(shared);
            let now = Instant::now();
            let mut model = lock(&self.model);
            let mut scratch = std::mem::take(&mut model.scratch);
            scratch.clear();
            let mut count = 0;
            for key in keys {
                count += 1;
                if scratch.len() < TRACKED_KEYS {
                    scratch.push(self.hasher.hash_one(key));
                }
            }
            // Repeated keys within one request count once (as Redis counts them), and are
            // not coalescing.
            let tracked = scratch.len();
            scratch.sort_unstable();
            scratch.dedup();
            let keys = count - (tracked - scratch.len());
            model.scratch = scratch;
            let result = model.feed(now, &p, who, command, keys, follows);
            model.count(result.0, result.1);
            result
        } else {
            (Would::Pass, 0)
        };
        if denied || who.is_none() {
            lock(&self.model).count(would, 0);
        }
        let counters = self.counters.get_or_init(Counters::new);
        counters.observed[command.index()][would as usize].increment(1);
        if coalesced > 0 {
            counters.coalesced_keys.increment(coalesced as u64);
        }
    }
}

/// Logs a summary every [`REPORT_EVERY`] in which enforcement would have changed anything.
/// Ends with the engine.
async fn report(model: Weak<Mutex<Model>>) {
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(model) = model.upgrade() else {
            return;
        };
        let now = Instant::now();
        let window = {
            let mut m = lock(&model);
            std::mem::replace(
                &mut m.window,
                Window {
                    since: now,
                    counts: [0; WOULD.len()],
                    coalesced_keys: 0,
                },
            )
        };
        if let Some(line) = summary(&window, now) {
            tracing::info!("{line}");
        }
    }
}

/// The log line for one window, if enforcement would have done anything but execute and
/// pass through.
fn summary(window: &Window, now: Instant) -> Option<String> {
    let n = |w: Would| window.counts[w as usize];
    let acted = [
        Would::Batch,
        Would::Delay,
        Would::Coalesce,
        Would::Refuse,
        Would::Deny,
    ]
    .iter()
    .any(|&w| n(w) > 0);
    if !acted {
        return None;
    }
    let total: u64 = window.counts.iter().sum();
    Some(format!(
        "observe mode: in the last {:.0} s, {total} governed requests passed through; \
         enforcement would have executed {} at once, batched {}, coalesced {} (and {} keys \
         named again within a batch), delayed {} for budget or spacing, refused {}, denied {}; \
         {} would have passed through ungoverned anyway",
        now.duration_since(window.since).as_secs_f64(),
        n(Would::Execute),
        n(Would::Batch),
        n(Would::Coalesce),
        window.coalesced_keys,
        n(Would::Delay),
        n(Would::Refuse),
        n(Would::Deny),
        n(Would::Pass),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            rtt: Duration::from_millis(1),
            patience: Duration::from_millis(4900),
            max_pending: 10_000,
            max_pending_keys: 1_000_000,
            reject: false,
            batch_keys: 1000,
            keys: Rate {
                per_second: 100_000.0,
                burst: 10_000.0,
            },
            commands: Rate {
                per_second: 2000.0,
                burst: 200.0,
            },
            spacing: Some(Rate {
                per_second: 1.0,
                burst: 3.0,
            }),
            unlink: true,
            max_identities: 64,
            idle: Duration::from_secs(60),
        }
    }

    fn who(db: i64) -> Identity {
        Identity {
            db,
            ..Identity::default()
        }
    }

    /// Feeds a delete of `keys` (as hashes) at `t`.
    fn del(m: &mut Model, p: &Params, t: Instant, keys: &[u64], follows: bool) -> (Would, usize) {
        m.scratch = keys.to_vec();
        let unlink = Observed::Delete { unlink: true };
        m.feed(t, p, &who(0), unlink, keys.len(), follows)
    }

    fn flush(m: &mut Model, p: &Params, t: Instant, all: bool) -> Would {
        m.scratch.clear();
        m.feed(t, p, &who(0), Observed::Flush { all }, 0, false).0
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_storm_of_identical_deletes_batches_and_coalesces() {
        let p = params();
        let t = Instant::now();
        let mut m = Model::new(t);
        // Alone on an idle worker: at once.
        assert_eq!(del(&mut m, &p, t, &[1, 2], false), (Would::Execute, 0));
        // While it is in flight (1 ms): the next batch. The first of it sends its keys; the
        // rest name the same keys and send nothing of their own.
        assert_eq!(del(&mut m, &p, t + ms(0), &[1, 2], false).0, Would::Batch);
        for _ in 0..10 {
            assert_eq!(del(&mut m, &p, t, &[1, 2], false), (Would::Coalesce, 2));
        }
        // Partly new keys: batched, one key coalesced.
        assert_eq!(del(&mut m, &p, t, &[2, 3], false), (Would::Batch, 1));
        // Long after: idle again.
        assert_eq!(
            del(&mut m, &p, t + ms(100), &[1], false),
            (Would::Execute, 0)
        );
        m.sweep(t + ms(200), &p);
        assert_eq!(m.totals, Load::default(), "everything left the queue");
    }

    #[test]
    fn a_pipeline_joins_its_first_requests_batch() {
        let p = params();
        let t = Instant::now();
        let mut m = Model::new(t);
        assert_eq!(del(&mut m, &p, t, &[1], false).0, Would::Execute);
        // Framed in the same read, later by the clock: still the same batch.
        assert_eq!(del(&mut m, &p, t + ms(5), &[2], true).0, Would::Execute);
        assert_eq!(del(&mut m, &p, t + ms(5), &[1], true), (Would::Coalesce, 1));
        // Another client's request then finds that batch under way.
        assert_eq!(del(&mut m, &p, t + ms(5), &[9], false).0, Would::Batch);
    }

    #[test]
    fn over_budget_requests_are_delayed_then_refused() {
        let mut p = params();
        p.keys = Rate {
            per_second: 10.0,
            burst: 10.0,
        };
        p.patience = ms(1500);
        let t = Instant::now();
        let mut m = Model::new(t);
        // The burst goes at once.
        assert_eq!(
            del(&mut m, &p, t, &(0..10).collect::<Vec<_>>(), false).0,
            Would::Execute
        );
        // The next 10 keys need a second of budget: delayed, within max_wait.
        let ten: Vec<u64> = (10..20).collect();
        assert_eq!(del(&mut m, &p, t + ms(10), &ten, false).0, Would::Delay);
        // Coalesced into that delayed batch: it sends nothing of its own.
        assert_eq!(del(&mut m, &p, t + ms(10), &ten, false).0, Would::Coalesce);
        // 10 more keys would need another second (2 s in all): past max_wait, refused.
        let more: Vec<u64> = (20..30).collect();
        assert_eq!(
            del(&mut m, &p, t + ms(10), &more, false),
            (Would::Refuse, 0)
        );
        // A refusal spent nothing: one more key still fits within max_wait, delayed.
        assert_eq!(del(&mut m, &p, t + ms(10), &[30], false).0, Would::Delay);
    }

    #[test]
    fn a_full_queue_refuses_under_reject_and_delays_under_wait() {
        let mut p = params();
        p.max_pending = 3;
        p.reject = true;
        let t = Instant::now();
        let mut m = Model::new(t);
        for k in 0..3 {
            assert_ne!(del(&mut m, &p, t, &[k], false).0, Would::Refuse);
        }
        assert_eq!(del(&mut m, &p, t, &[7], false).0, Would::Refuse);
        p.reject = false;
        assert_eq!(del(&mut m, &p, t, &[8], false).0, Would::Delay);
        // Once the batches are done there is room again.
        p.reject = true;
        assert_eq!(del(&mut m, &p, t + ms(50), &[9], false).0, Would::Execute);
    }

    #[test]
    fn flushes_coalesce_and_are_spaced_after_the_burst() {
        let p = params();
        let t = Instant::now();
        let mut m = Model::new(t);
        // A wave of 50: the first goes at once, the second waits for it, the rest ride along.
        assert_eq!(flush(&mut m, &p, t, false), Would::Execute);
        assert_eq!(flush(&mut m, &p, t, false), Would::Batch);
        for _ in 0..48 {
            assert_eq!(flush(&mut m, &p, t, false), Would::Coalesce);
        }
        // FLUSHALL is another target.
        assert_eq!(flush(&mut m, &p, t, true), Would::Execute);
        // A third flush of the target uses the last of the burst; a fourth waits for spacing.
        assert_eq!(flush(&mut m, &p, t + ms(100), false), Would::Execute);
        assert_eq!(flush(&mut m, &p, t + ms(200), false), Would::Delay);
        assert_eq!(flush(&mut m, &p, t + ms(200), false), Would::Coalesce);
    }

    #[test]
    fn identities_beyond_the_cap_pass_through() {
        let mut p = params();
        p.max_identities = 2;
        let t = Instant::now();
        let mut m = Model::new(t);
        let unlink = Observed::Delete { unlink: true };
        for db in 0..2 {
            m.scratch = vec![1];
            assert_eq!(m.feed(t, &p, &who(db), unlink, 1, false).0, Would::Execute);
        }
        m.scratch = vec![1];
        assert_eq!(m.feed(t, &p, &who(5), unlink, 1, false).0, Would::Pass);
        // After identity_idle_timeout, room again.
        m.scratch = vec![1];
        let later = t + p.idle + ms(1);
        assert_eq!(
            m.feed(later, &p, &who(5), unlink, 1, false).0,
            Would::Execute
        );
        assert!(m.entries.len() <= 2);
    }

    #[test]
    fn the_summary_says_what_enforcement_would_have_done() {
        let t = Instant::now();
        let mut w = Window {
            since: t,
            counts: [0; WOULD.len()],
            coalesced_keys: 0,
        };
        w.counts[Would::Execute as usize] = 5;
        assert_eq!(summary(&w, t + REPORT_EVERY), None, "nothing to say");
        w.counts[Would::Coalesce as usize] = 7;
        w.counts[Would::Refuse as usize] = 2;
        w.coalesced_keys = 70;
        let line = summary(&w, t + REPORT_EVERY).unwrap();
        assert!(
            line.contains("in the last 10 s, 14 governed requests"),
            "{line}"
        );
        assert!(line.contains("coalesced 7 (and 70 keys"), "{line}");
        assert!(line.contains("refused 2"), "{line}");
    }
}
