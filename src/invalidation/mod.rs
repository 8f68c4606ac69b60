//! The invalidation engine: what turns a storm of `DEL`/`UNLINK`/`FLUSHDB`/`FLUSHALL` from
//! many clients into a bounded, smooth load on Redis while every client still gets exactly
//! the answer it asked for (contract points G2–G5).
//!
//! A session hands a governed request to [`Engine::execute`] and waits for its [`Verdict`].
//! The engine:
//!
//! 1. **admits** it into a bounded queue (`invalidation.max_pending`, `max_pending_keys`);
//!    when full, the `on_full` policy either makes the session wait (it stops reading from
//!    its client: backpressure) or answers `-BUSY` at once;
//! 2. **routes** it to a worker for its [`Identity`] (user, password, database): requests
//!    are only ever batched with others that could do exactly the same, and are executed on
//!    a connection authenticated as that identity (G5);
//! 3. the worker **batches** whatever is queued when it becomes free (group commit — no
//!    added latency when idle), takes the rate-limit budgets (only for what it then sends),
//!    executes on its own connection ([`executor`]), and answers each request with its own
//!    result. Deletes are in [`delete`], flushes in [`flush`], scoped flushes
//!    (`[[flush.rules]]`) in [`scoped`], permission checks in [`access`], what each ending
//!    means for the client in [`outcome`], and the budget every stormwall in front of the
//!    same Redis takes from (`invalidation.shared_budget`) in [`shared_budget`].
//!
//! Every request ends in exactly one [`Outcome`] (G4): its real result; an error saying it
//! was not applied; "unknown" when a connection was lost after it was sent (the session
//! closes the client's connection, as Redis's own failure would); or "pass through" when the
//! shield cannot act as the client (the session runs the client's own command). A request
//! whose `max_wait` passes, or whose client has gone, before it is sent is never sent later.
//!
//! In front of a Redis Cluster, workers are per identity *and master* ([`Place`]): a delete
//! is split by slot and each part goes to the worker of its slot's master, which batches
//! parts of all its slots into one script call (`delete::CLUSTER_BATCH_SCRIPT`: Redis
//! Cluster refuses declared keys, commands and transactions that span slots, but not a
//! script's calls for different slots of one master), or, where the identity may not run
//! the script, parts of one slot only; a flush goes to every master's flush worker. The client's answer is the parts' answers put together: counts summed,
//! one `+OK` once every master has flushed, or — if some parts ran and others did not —
//! unknown, as a lost connection would leave it. The rate budgets are the process's, so
//! they bound the whole cluster.
//!
//! Workers are per identity, so they are bounded: one idle for
//! `invalidation.identity_idle_timeout` ends, closing its connection and forgetting its
//! password, and at most `invalidation.max_identities` live at once.

mod access;
mod adaptive;
mod budget;
mod delete;
mod executor;
mod flush;
mod observe;
mod outcome;
mod scoped;
mod shared_budget;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use governor::DefaultDirectRateLimiter;
use governor::clock::Clock;
use metrics::{counter, gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{Config, InvalidationMode, OnFull};
use crate::upstream::Identity;
use adaptive::Controller;
use budget::{Budget, Scaled};
pub use observe::Observed;
pub(crate) use observe::{COMMANDS as OBSERVED_COMMANDS, WOULD as OBSERVED_WOULD};
use outcome::{Outcome, PassReason, Refusal};
pub(crate) use outcome::{PASSTHROUGH_REASONS, REJECTED_REASONS};
pub use scoped::{Client, Scope, scope_of};
pub(crate) use shared_budget::FALLBACK_REASONS;

/// A governed request as the session parsed it.
#[derive(Debug)]
pub enum Request {
    /// `DEL`/`UNLINK key [key …]`; `unlink` says which of the two the client sent (ACL rules
    /// may allow one and not the other).
    Delete { keys: Vec<Bytes>, unlink: bool },
    /// `FLUSHDB`/`FLUSHALL`, `sync` true if the client asked for `SYNC` (false for `ASYNC`,
    /// `None` for neither).
    Flush { all: bool, sync: Option<bool> },
    /// A `FLUSHDB` (`sync` as above) that a `[[flush.rules]]` entry turns into the deletion
    /// of the keys matching `pattern` ([`scoped`]).
    ScopedFlush { pattern: Bytes, sync: Option<bool> },
}

/// How a governed request ended, as the session must act on it. One place decides this for
/// every outcome ([`Outcome::verdict`]), so the error text, the metric label and whether
/// the request was applied can never disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send these bytes to the client: the real result, or an error reply saying the request
    /// was not applied.
    Reply(Bytes),
    /// The shield cannot act as this client on a connection of its own (credentials Redis no
    /// longer accepts on a new connection, too many identities, …): the session runs the
    /// client's own command on the client's own connection instead — correct, not coalesced.
    PassThrough,
    /// The request may or may not have been applied (the connection to Redis was lost after it
    /// was sent): the session closes the client's connection, as Redis's own failure would.
    Unknown,
}

impl Request {
    /// Keys a delete names (0 for a flush).
    pub fn keys(&self) -> usize {
        match self {
            Request::Delete { keys, .. } => keys.len(),
            Request::Flush { .. } | Request::ScopedFlush { .. } => 0,
        }
    }

    fn command(&self) -> &'static str {
        match self {
            Request::Delete { .. } => "delete",
            Request::Flush { all: false, .. } => "flushdb",
            Request::Flush { all: true, .. } => "flushall",
            Request::ScopedFlush { .. } => "flushdb",
        }
    }
}

/// What a group of requests holds until its last request is answered or dropped: its queue
/// slots, and its place in the queue-depth gauge. Released on drop, however the requests
/// end — answered, expired, or abandoned by a client that left.
struct Admission {
    _request: Option<OwnedSemaphorePermit>,
    _keys: Option<OwnedSemaphorePermit>,
    requests: usize,
}

impl Admission {
    fn new(
        request: Option<OwnedSemaphorePermit>,
        keys: Option<OwnedSemaphorePermit>,
        requests: usize,
    ) -> Self {
        gauge!("stormwall_invalidation_queue_depth").increment(requests as f64);
        Admission {
            _request: request,
            _keys: keys,
            requests,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        gauge!("stormwall_invalidation_queue_depth").decrement(self.requests as f64);
    }
}

/// One request travelling to a worker.
struct Job<T> {
    what: T,
    deadline: Instant,
    received: Instant,
    /// Its rate budget was taken for the whole client request it is part of (a cluster
    /// request split by master): the worker does not charge it again, so no part of a
    /// request is ever refused for budget while another part runs.
    prepaid: bool,
    reply: oneshot::Sender<Outcome>,
    _admission: Arc<Admission>,
}

impl<T> Job<T> {
    fn answer(self, outcome: Outcome) {
        // The session may have gone away; nothing is left to do for it either way.
        let _ = self.reply.send(outcome);
    }

    /// The client is gone (its session dropped the request): it must not be sent now.
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// How much of a request's `max_wait` must be left for it to be sent: one sent with less
/// would likely outlast its deadline in flight and end unknown (a closed connection) where
/// it could have been refused as not applied.
fn send_margin(max_wait: Duration) -> Duration {
    (max_wait / 10).min(Duration::from_millis(100))
}

/// Answers the requests too close to their deadline to be sent (`late` says how: not
/// applied, or unknown if an attempt may have applied them) and drops those whose client is
/// gone, so neither is ever sent. Called before every attempt to send.
fn prune<T>(pending: &mut Vec<Job<T>>, margin: Duration, late: impl Fn() -> Outcome) {
    let now = Instant::now() + margin;
    if !pending.iter().any(|j| j.deadline <= now || j.abandoned()) {
        return;
    }
    let mut abandoned = 0u64;
    for job in std::mem::take(pending) {
        if job.abandoned() {
            abandoned += 1;
        } else if job.deadline <= now {
            job.answer(late());
        } else {
            pending.push(job);
        }
    }
    counter!("stormwall_invalidation_abandoned_total").increment(abandoned);
}

/// Answers the requests whose deadline is before `at` with `outcome`, keeping the rest.
fn expire_before<T>(pending: &mut Vec<Job<T>>, at: Instant, outcome: impl Fn() -> Outcome) {
    for job in std::mem::take(pending) {
        if job.deadline < at {
            job.answer(outcome());
        } else {
            pending.push(job);
        }
    }
}

/// The earliest deadline among `jobs` (now, if there are none).
fn earliest<T>(jobs: &[Job<T>]) -> Instant {
    jobs.iter()
        .map(|j| j.deadline)
        .min()
        .unwrap_or_else(Instant::now)
}

/// The engine's settings and budgets as of the last (re)load. Workers read a fresh snapshot
/// for each batch, so a reload takes effect at the next batch without touching a connection.
struct Shared {
    config: Arc<Config>,
    keys: Arc<Budget>,
    commands: Arc<Budget>,
    /// The adaptive budget's controller: kept across reloads, like what it learned.
    controller: Arc<Controller>,
    /// The budget kept in Redis for every stormwall in front of it (`shared_budget`),
    /// kept across reloads with its connection.
    budget: Arc<shared_budget::SharedBudget>,
    /// Queue slots: requests, and keys in them.
    requests: Arc<Semaphore>,
    pending_keys: Arc<Semaphore>,
    /// The queue is refusing requests: logged once when it starts and once when it stops,
    /// so a storm produces two lines, not one per refused request.
    refusing: Arc<AtomicBool>,
}

impl Shared {
    /// Settings from `config`, keeping `old`'s budgets and queues where their limits did not
    /// change (so a reload that touches nothing else does not reset them).
    fn new(config: Arc<Config>, old: Option<&Shared>) -> Shared {
        let inv = &config.invalidation;
        let old_inv = old.map(|o| &o.config.invalidation);
        let same = |f: fn(&crate::config::InvalidationConfig) -> (u32, u32)| {
            old_inv.is_some_and(|o| f(o) == f(inv))
        };
        let keys = match old {
            Some(o) if same(|i| (i.keys_per_second, i.keys_burst)) => o.keys.clone(),
            _ => Arc::new(Budget::new(inv.keys_per_second, inv.keys_burst)),
        };
        let commands = match old {
            Some(o) if same(|i| (i.commands_per_second, i.commands_burst)) => o.commands.clone(),
            _ => Arc::new(Budget::new(inv.commands_per_second, inv.commands_burst)),
        };
        // A resized queue is a new semaphore: requests admitted before keep their slots in
        // the old one, new requests are admitted against the new limit.
        let requests = match old {
            Some(o) if o.config.invalidation.max_pending == inv.max_pending => o.requests.clone(),
            _ => Arc::new(Semaphore::new(inv.max_pending)),
        };
        let pending_keys = match old {
            Some(o) if o.config.invalidation.max_pending_keys == inv.max_pending_keys => {
                o.pending_keys.clone()
            }
            _ => Arc::new(Semaphore::new(inv.max_pending_keys)),
        };
        Shared {
            config,
            keys,
            commands,
            controller: old.map(|o| o.controller.clone()).unwrap_or_default(),
            budget: old.map(|o| o.budget.clone()).unwrap_or_default(),
            requests,
            pending_keys,
            refusing: old.map(|o| o.refusing.clone()).unwrap_or_default(),
        }
    }
}

impl Shared {
    /// The share of the configured budgets to use now: the adaptive controller's, or all.
    fn fraction(&self) -> f64 {
        let inv = &self.config.invalidation;
        if inv.adaptive {
            self.controller.fraction(inv.adaptive_floor)
        } else {
            1.0
        }
    }

    /// The key and command budgets to take from now.
    fn budgets(&self) -> (Arc<Scaled>, Arc<Scaled>) {
        let fraction = self.fraction();
        let keys = self.keys.at(fraction);
        gauge!("stormwall_invalidation_budget_keys_per_second").set(keys.per_second);
        (keys, self.commands.at(fraction))
    }

    /// Notes `keys` sent to Redis, for the adaptive budget's cuts.
    fn sent(&self, keys: u64) {
        self.controller
            .sent(keys, self.config.invalidation.keys_per_second);
    }

    /// Notes how long Redis took for something (a batch, a flush, a `PING`).
    fn observe(&self, kind: adaptive::Sample, latency: Duration) {
        self.controller
            .sample(kind, latency, self.config.invalidation.adaptive_floor);
    }
}

/// The live settings, swapped whole on reload.
type Live = Arc<ArcSwap<Shared>>;

type DeleteJob = Job<delete::Delete>;
type FlushJob = Job<Option<bool>>;
/// A scoped flush: the client's `FLUSHDB` form (its scope is the worker's).
type ScopedJob = Job<Option<bool>>;

/// Where a worker's requests run: the upstream (standalone or Sentinel's master), or one
/// master of a Redis Cluster.
#[derive(Clone, Default)]
pub(crate) struct Place {
    node: Option<Arc<crate::cluster::router::Node>>,
}

impl Place {
    fn master(node: Arc<crate::cluster::router::Node>) -> Place {
        Place { node: Some(node) }
    }

    /// `[upstream]` for this place's connections: the node's own in a cluster.
    fn upstream<'a>(&'a self, config: &'a Config) -> &'a crate::config::UpstreamConfig {
        match &self.node {
            Some(node) => &node.cfg,
            None => &config.upstream,
        }
    }

    /// Whether requests here go to one master of a cluster (a batch's keys span slots only
    /// in the batch script).
    fn in_cluster(&self) -> bool {
        self.node.is_some()
    }
}

impl PartialEq for Place {
    fn eq(&self, other: &Place) -> bool {
        match (&self.node, &other.node) {
            (Some(a), Some(b)) => a.address == b.address,
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for Place {}

impl std::hash::Hash for Place {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.node
            .as_ref()
            .map(|n| n.address.to_string())
            .hash(state);
    }
}

/// The live workers, by what they serve, and how many workers each identity has.
#[derive(Default)]
struct Workers {
    deleters: HashMap<(Identity, Place), mpsc::UnboundedSender<DeleteJob>>,
    /// By target: an identity (with database 0 for `FLUSHALL`), whether it is `FLUSHALL`,
    /// and where.
    flushers: HashMap<(Identity, bool, Place), mpsc::UnboundedSender<FlushJob>>,
    /// By scope: an identity and the pattern its `FLUSHDB` deletes.
    scopers: HashMap<(Identity, Bytes), mpsc::UnboundedSender<ScopedJob>>,
    identities: HashMap<Identity, usize>,
}

impl Workers {
    fn add(&mut self, who: &Identity) {
        *self.identities.entry(who.clone()).or_default() += 1;
        gauge!("stormwall_invalidation_identities").set(self.identities.len() as f64);
    }

    fn remove(&mut self, who: &Identity) {
        if let Some(n) = self.identities.get_mut(who) {
            *n -= 1;
            if *n == 0 {
                self.identities.remove(who);
            }
        }
        gauge!("stormwall_invalidation_identities").set(self.identities.len() as f64);
    }
}

/// Where workers are found, started, and retired. Workers hold it weakly, so dropping the
/// engine ends them.
#[derive(Default)]
struct Registry {
    workers: Mutex<Workers>,
    /// The identity cap is refusing new identities: logged when it starts and stops.
    capped: AtomicBool,
}

/// Picks one kind of worker map out of [`Workers`].
type Pick<K, T> = fn(&mut Workers) -> &mut HashMap<K, mpsc::UnboundedSender<Job<T>>>;

// `Place` hashes and compares by its node's address, which never changes (the node's
// configuration, which has interior mutability, takes no part).
#[allow(clippy::mutable_key_type)]
fn deleters(w: &mut Workers) -> &mut HashMap<(Identity, Place), mpsc::UnboundedSender<DeleteJob>> {
    &mut w.deleters
}

#[allow(clippy::mutable_key_type)] // See `deleters`.
fn flushers(
    w: &mut Workers,
) -> &mut HashMap<(Identity, bool, Place), mpsc::UnboundedSender<FlushJob>> {
    &mut w.flushers
}

fn scopers(w: &mut Workers) -> &mut HashMap<(Identity, Bytes), mpsc::UnboundedSender<ScopedJob>> {
    &mut w.scopers
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Workers> {
        // The lock is never held across an await, and a poisoned map is still a valid map.
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a worker that found nothing to do for `identity_idle_timeout`, unless a request
    /// reached it meanwhile. Senders only send under the lock, so once this returns true no
    /// request can reach the worker any more, and it may end.
    fn retire<K: std::hash::Hash + Eq, T>(
        registry: &Weak<Registry>,
        pick: Pick<K, T>,
        key: &K,
        who: &Identity,
        rx: &mpsc::UnboundedReceiver<Job<T>>,
    ) -> bool {
        let Some(registry) = registry.upgrade() else {
            return true;
        };
        let mut workers = registry.lock();
        if !rx.is_empty() {
            return false;
        }
        pick(&mut workers).remove(key);
        workers.remove(who);
        tracing::debug!(db = who.db, "idle invalidation worker retired");
        true
    }
}

/// Receives a worker's next request, waiting at most `identity_idle_timeout`; `None` when
/// the worker should end (retired while idle, or the engine is gone).
async fn next_job<K: std::hash::Hash + Eq, T>(
    live: &Live,
    registry: &Weak<Registry>,
    pick: Pick<K, T>,
    key: &K,
    who: &Identity,
    rx: &mut mpsc::UnboundedReceiver<Job<T>>,
) -> Option<Job<T>> {
    loop {
        let idle = live.load().config.invalidation.identity_idle_timeout;
        match tokio::time::timeout(idle, rx.recv()).await {
            Ok(job) => return job,
            Err(_) => {
                if Registry::retire(registry, pick, key, who, rx) {
                    return None;
                }
            }
        }
    }
}

/// The engine sessions call into. Cheap to share behind an `Arc`.
pub struct Engine {
    live: Live,
    registry: Arc<Registry>,
    /// When a governed request last arrived; the latency sampler runs only near then.
    activity: Arc<adaptive::Activity>,
    sampler: std::sync::Once,
    /// Observe mode's shadow model.
    observer: observe::Observer,
    /// A Redis Cluster upstream's slot map: requests then run per master.
    cluster: std::sync::OnceLock<Arc<crate::cluster::router::Router>>,
}

impl Engine {
    pub fn new(config: Arc<Config>) -> Engine {
        gauge!("stormwall_invalidation_adaptive_ratio").set(1.0);
        gauge!("stormwall_invalidation_budget_keys_per_second")
            .set(config.invalidation.keys_per_second);
        Engine {
            live: Arc::new(ArcSwap::from_pointee(Shared::new(config, None))),
            registry: Arc::default(),
            activity: Arc::default(),
            sampler: std::sync::Once::new(),
            observer: observe::Observer::default(),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// Runs requests on the masters of a Redis Cluster from now on (set once, at start).
    pub fn set_cluster(&self, router: Arc<crate::cluster::router::Router>) {
        let _ = self.cluster.set(router);
    }

    /// Notes a round trip to Redis measured elsewhere (the readiness probe's `PING`), for
    /// the adaptive budget's baseline.
    pub fn observe_latency(&self, latency: Duration) {
        self.live
            .load()
            .observe(adaptive::Sample::RoundTrip, latency);
    }

    /// Applies a reloaded config from the next request and batch on.
    pub fn reload(&self, config: Arc<Config>) {
        let old = self.live.load_full();
        self.live.store(Arc::new(Shared::new(config, Some(&old))));
    }

    /// The reply to a flush `flush.deny` refuses (the session refuses it in place, wherever it
    /// appears, so it never reaches the engine), counted like every other refusal.
    pub fn denied(all: bool) -> Bytes {
        let command = if all { "FLUSHALL" } else { "FLUSHDB" };
        match Outcome::NotApplied(Refusal::Denied { command }).verdict() {
            Verdict::Reply(reply) => reply,
            // A refusal is always a reply; nothing else is reachable.
            Verdict::PassThrough | Verdict::Unknown => Bytes::new(),
        }
    }

    /// The reply refusing a `FLUSHDB` that `flush.rules` would scope, where the shield cannot
    /// run it as a scoped flush (`why`): not applied, and never the whole flush instead.
    pub fn unscoped(why: &str) -> Bytes {
        match Outcome::NotApplied(Refusal::Unscoped(why.to_owned())).verdict() {
            Verdict::Reply(reply) => reply,
            Verdict::PassThrough | Verdict::Unknown => Bytes::new(),
        }
    }

    /// Executes consecutive governed requests of one client as `who` and says how each
    /// ended, in order. They are admitted together (one wait for queue room) and reach their
    /// worker back to back, so a pipeline of deletes joins one batch instead of one batch per
    /// request; the worker keeps their order (G3 within the group). Callers pass requests of
    /// one kind (deletes, or flushes of one target): requests for different workers would
    /// run in no particular order.
    pub async fn execute_all(&self, who: &Identity, requests: Vec<Request>) -> Vec<Verdict> {
        self.run(who, requests)
            .await
            .into_iter()
            .map(Outcome::verdict)
            .collect()
    }

    /// Executes one governed request as `who` and says how it ended.
    pub async fn execute(&self, who: &Identity, request: Request) -> Verdict {
        let outcome = self.run(who, vec![request]).await.pop();
        outcome
            .unwrap_or(Outcome::NotApplied(Refusal::WorkerGone))
            .verdict()
    }

    /// Whether governed commands are only observed now (`invalidation.mode = "observe"`,
    /// live): the session then passes them through as with `enabled = false` and tells
    /// [`Engine::observe`] about each.
    pub fn observing(&self) -> bool {
        self.live.load().config.invalidation.mode == InvalidationMode::Observe
    }

    /// Observe mode: counts what enforcement would have done with one governed command
    /// that passes through (`invalidation/observe.rs`). Never waits. `who`: the client's
    /// identity, or `None` where enforcement would have passed it through as well (a
    /// transaction, a client the shield cannot act for). `follows`: it came pipelined right
    /// behind a governed command of the same kind from the same client.
    pub fn observe<'k>(
        &self,
        who: Option<&Identity>,
        command: Observed,
        keys: impl Iterator<Item = &'k [u8]>,
        follows: bool,
    ) {
        // The latency sampler runs as it would under enforcement: the model's sense of how
        // long a batch takes, and the adaptive budget it uses, come from it.
        self.active();
        let shared = self.live.load();
        self.observer.observe(&shared, who, command, keys, follows);
    }

    /// Notes that governed requests are flowing, for the adaptive budget's sampler.
    fn active(&self) {
        self.activity.touch();
        self.sampler.call_once(|| {
            let live = Arc::downgrade(&self.live);
            adaptive::spawn_sampler(self.activity.clone(), move || {
                live.upgrade().map(|l| l.load_full())
            });
        });
    }

    async fn run(&self, who: &Identity, requests: Vec<Request>) -> Vec<Outcome> {
        self.active();
        let shared = self.live.load_full();
        let config = &shared.config;
        let received = Instant::now();
        let deadline = received + config.invalidation.max_wait;
        let mut keys = 0;
        for request in &requests {
            let command = request.command();
            counter!("stormwall_invalidation_requests_total", "command" => command).increment(1);
            counter!("stormwall_commands_total", "class" => "governed").increment(1);
            keys += request.keys();
        }
        counter!("stormwall_invalidation_keys_received_total").increment(keys as u64);
        let admission = match admit(&shared, requests.len(), keys, deadline).await {
            Ok(a) => Arc::new(a),
            Err(refusal) => {
                return requests
                    .iter()
                    .map(|_| Outcome::NotApplied(refusal.clone()))
                    .collect();
            }
        };
        let cap = config.invalidation.max_identities;
        let mut answers = Vec::with_capacity(requests.len());
        // A cluster request's parts go to their workers together, once the requests after
        // it have their budget too (a master's workers then find a pipeline's parts queued
        // together and batch them), or before a request must wait for budget (the ones
        // admitted do not wait with it). One entry per answer sent so far.
        let mut sent: Vec<Vec<Routed>> = Vec::new();
        let cluster = self.cluster.get();
        for request in requests {
            let (tx, rx) = oneshot::channel();
            let routed = match request {
                Request::Delete { keys, unlink } if let Some(router) = cluster => {
                    let slots = by_slot(dedup(keys));
                    let count = slots.iter().map(Vec::len).sum();
                    // A master runs a batch's slots as one script: a command per master.
                    let map = router.map();
                    let mut masters: Vec<Option<usize>> = slots
                        .iter()
                        .map(|keys| {
                            let slot = keys.first().map(|k| crate::cluster::slot::key_slot(k));
                            slot.and_then(|s| map.master_of(s))
                        })
                        .collect();
                    masters.sort_unstable();
                    masters.dedup();
                    let budget = (masters.len(), count);
                    let paid = self.prepay(&shared, budget, deadline, (&answers, &mut sent), cap);
                    if let Err(refused) = paid.await {
                        answers.push(Answer::One(Err(refused)));
                        continue;
                    }
                    let parts = slots.into_iter().map(|keys| Part {
                        who: who.clone(),
                        what: PartOf::Delete { keys, unlink },
                        deadline,
                        received,
                        admission: admission.clone(),
                    });
                    answers.push(Answer::Parts(parts.collect()));
                    continue;
                }
                Request::Flush { all, sync } if cluster.is_some() => {
                    let mut target = who.clone();
                    if all {
                        // FLUSHALL is the same operation from any database.
                        target.db = 0;
                    }
                    let map = cluster.map(|r| r.map());
                    let slots: Vec<u16> = map
                        .iter()
                        .flat_map(|m| (0..m.masters().len()).filter_map(|i| m.first_slot_of(i)))
                        .collect();
                    let budget = (slots.len(), 0);
                    let paid = self.prepay(&shared, budget, deadline, (&answers, &mut sent), cap);
                    if let Err(refused) = paid.await {
                        answers.push(Answer::One(Err(refused)));
                        continue;
                    }
                    if slots.is_empty() {
                        answers.push(Answer::One(Err(Outcome::NotApplied(Refusal::Unreachable))));
                        continue;
                    }
                    let parts = slots.into_iter().map(|slot| Part {
                        who: target.clone(),
                        what: PartOf::Flush { all, sync, slot },
                        deadline,
                        received,
                        admission: admission.clone(),
                    });
                    answers.push(Answer::Parts(parts.collect()));
                    continue;
                }
                Request::Delete { keys, unlink } => {
                    let job = Job {
                        what: delete::Delete {
                            keys: dedup(keys),
                            unlink,
                        },
                        deadline,
                        received,
                        prepaid: false,
                        reply: tx,
                        _admission: admission.clone(),
                    };
                    let key = (who.clone(), Place::default());
                    self.route(deleters, key, who, cap, job, delete::worker)
                        .map_err(Outcome::PassThrough)
                }
                Request::Flush { all, sync } => {
                    let mut target = who.clone();
                    if all {
                        // FLUSHALL is the same operation from any database.
                        target.db = 0;
                    }
                    let job = Job {
                        what: sync,
                        deadline,
                        received,
                        prepaid: false,
                        reply: tx,
                        _admission: admission.clone(),
                    };
                    let counted = target.clone();
                    let key = (target, all, Place::default());
                    self.route(flushers, key, &counted, cap, job, flush::worker)
                        .map_err(Outcome::PassThrough)
                }
                Request::ScopedFlush { pattern, sync } => {
                    let job = Job {
                        what: sync,
                        // Its own, longer deadline: it covers the whole scan (see `scoped`).
                        deadline: received + config.flush.scoped_max_wait,
                        received,
                        prepaid: false,
                        reply: tx,
                        _admission: admission.clone(),
                    };
                    let key = (who.clone(), pattern);
                    self.route(scopers, key, who, cap, job, scoped::worker)
                        .map_err(|_| {
                            // Its own FLUSHDB would flush every application's keys: never in
                            // its place.
                            let why = "invalidation.max_identities is reached".to_owned();
                            Outcome::NotApplied(Refusal::Unscoped(why))
                        })
                }
            };
            answers.push(Answer::One(routed.map(|()| rx)));
        }
        self.send_unsent(&answers, &mut sent, cap);
        let mut outcomes = Vec::with_capacity(answers.len());
        for (answer, sent) in answers.into_iter().zip(sent) {
            outcomes.push(match answer {
                Answer::One(answer) => answered(answer).await,
                Answer::Parts(parts) => {
                    let parts = parts.into_iter().zip(sent);
                    let mut each = Vec::with_capacity(parts.len());
                    for (part, rx) in parts {
                        each.push(self.part_answered(cluster, cap, part, rx).await);
                    }
                    combine(each)
                }
            });
        }
        outcomes
    }

    /// [`prepay`]s a cluster request's `budget` (commands, keys). If it must be waited for,
    /// the parts of the requests before it (`answers`, of which `sent` are sent) go first.
    async fn prepay(
        &self,
        shared: &Shared,
        budget: (usize, usize),
        deadline: Instant,
        (answers, sent): (&[Answer], &mut Vec<Vec<Routed>>),
        cap: usize,
    ) -> Result<(), Outcome> {
        let mut paid = shared_budget::Units::default();
        // What is taken stays in `paid` if the first attempt stops at a wait.
        let now = prepay(shared, budget, deadline, &mut paid);
        if let Ok(result) = tokio::time::timeout(Duration::ZERO, now).await {
            return result;
        }
        self.send_unsent(answers, sent, cap);
        prepay(shared, budget, deadline, &mut paid).await
    }

    /// Sends the parts of `answers` past the `sent.len()` already sent.
    fn send_unsent(&self, answers: &[Answer], sent: &mut Vec<Vec<Routed>>, cap: usize) {
        let cluster = self.cluster.get();
        for answer in answers.iter().skip(sent.len()) {
            sent.push(match answer {
                Answer::Parts(parts) => parts
                    .iter()
                    .map(|part| self.send_part(cluster, part, cap))
                    .collect(),
                Answer::One(_) => Vec::new(),
            });
        }
    }

    /// Routes one part of a cluster request to the worker of the master the slot map names
    /// for its slot now.
    fn send_part(
        &self,
        cluster: Option<&Arc<crate::cluster::router::Router>>,
        part: &Part,
        cap: usize,
    ) -> Routed {
        let map = cluster.map(|r| r.map());
        let node = map.as_ref().and_then(|map| {
            let master = map.master_of(part.slot()?)?;
            map.masters().get(master).cloned()
        });
        let Some(node) = node else {
            return Err(Outcome::NotApplied(Refusal::Unreachable));
        };
        let (tx, rx) = oneshot::channel();
        let who = &part.who;
        let routed = match &part.what {
            PartOf::Delete { keys, unlink } => {
                let place = Place::master(node);
                let job = Job {
                    what: delete::Delete {
                        keys: keys.clone(),
                        unlink: *unlink,
                    },
                    deadline: part.deadline,
                    received: part.received,
                    prepaid: true,
                    reply: tx,
                    _admission: part.admission.clone(),
                };
                let key = (who.clone(), place);
                self.route(deleters, key, who, cap, job, delete::worker)
            }
            PartOf::Flush { all, sync, .. } => {
                let job = Job {
                    what: *sync,
                    deadline: part.deadline,
                    received: part.received,
                    prepaid: true,
                    reply: tx,
                    _admission: part.admission.clone(),
                };
                let key = (who.clone(), *all, Place::master(node));
                self.route(flushers, key, who, cap, job, flush::worker)
            }
        };
        routed.map(|()| rx).map_err(Outcome::PassThrough)
    }

    /// A cluster request part's outcome. A part that did not run because its slot is
    /// served elsewhere or not now — a master answered `MOVED`, `ASK`, `TRYAGAIN`,
    /// `CLUSTERDOWN`, or `READONLY` (demoted by a failover), or could not be reached — is
    /// sent again, to the master the slot map names then, until the request's deadline.
    async fn part_answered(
        &self,
        cluster: Option<&Arc<crate::cluster::router::Router>>,
        cap: usize,
        part: Part,
        mut rx: Routed,
    ) -> Outcome {
        let mut backoff = Duration::from_millis(25);
        loop {
            let outcome = answered(rx).await;
            let elsewhere = match &outcome {
                Outcome::Redis(e) => not_here(e),
                Outcome::NotApplied(Refusal::Unreachable) => true,
                _ => false,
            };
            let Some(router) = cluster.filter(|_| elsewhere) else {
                return outcome;
            };
            router.refresh_soon();
            let max_wait = part.deadline - part.received;
            if Instant::now() + backoff + send_margin(max_wait) > part.deadline {
                // Never the cluster's redirection as the client's answer: not applied.
                return match outcome {
                    Outcome::Redis(_) => Outcome::NotApplied(Refusal::Expired { max_wait }),
                    other => other,
                };
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            rx = self.send_part(cluster, &part, cap);
        }
    }

    /// Sends `job` to the worker for `key` (acting as `who`), starting one if the identity
    /// cap allows.
    fn route<K, T, F, Fut>(
        &self,
        pick: Pick<K, T>,
        key: K,
        who: &Identity,
        cap: usize,
        job: Job<T>,
        spawn: F,
    ) -> Result<(), PassReason>
    where
        K: std::hash::Hash + Eq + Clone,
        F: FnOnce(Live, Weak<Registry>, K, mpsc::UnboundedReceiver<Job<T>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut workers = self.registry.lock();
        let job = match pick(&mut workers).get(&key) {
            None => job,
            // A worker retires by removing itself under this lock, so this only fails if
            // it ended otherwise (a panic): a new one takes its place.
            Some(sender) => match sender.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(job)) => {
                    pick(&mut workers).remove(&key);
                    workers.remove(who);
                    job
                }
            },
        };
        if !workers.identities.contains_key(who) && workers.identities.len() >= cap {
            if !self.registry.capped.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_identities = cap,
                    "invalidation.max_identities reached: invalidations of further identities \
                     pass through ungoverned"
                );
            }
            return Err(PassReason::MaxIdentities);
        }
        if self.registry.capped.swap(false, Ordering::Relaxed) {
            tracing::info!("below invalidation.max_identities again: every identity is governed");
        }
        workers.add(who);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(spawn(
            self.live.clone(),
            Arc::downgrade(&self.registry),
            key.clone(),
            rx,
        ));
        // The receiver is alive: the worker was just spawned with it.
        let _ = tx.send(job);
        pick(&mut workers).insert(key, tx);
        Ok(())
    }
}

/// Takes the rate budget for a whole cluster request (`commands`: one per master it reaches,
/// whose batch script runs all its slots; `keys` keys) before
/// any part is sent, so its parts are never refused for budget one by one (some would run
/// and some not: a request neither applied nor refused). As for a request alone in a
/// batch, it is charged at most one full burst of each.
async fn prepay(
    shared: &Shared,
    (commands, keys): (usize, usize),
    deadline: Instant,
    paid: &mut shared_budget::Units,
) -> Result<(), Outcome> {
    let (keys_budget, commands_budget) = shared.budgets();
    let want = shared_budget::Units::new(
        (keys as u64).min(u64::from(keys_budget.burst)),
        (commands as u64).min(u64::from(commands_budget.burst)),
    );
    let max_wait = shared.config.invalidation.max_wait;
    shared_budget::take(
        shared,
        (&*keys_budget, &*commands_budget),
        want,
        paid,
        deadline - send_margin(max_wait),
    )
    .await
    .map_err(|_| Outcome::NotApplied(Refusal::Expired { max_wait }))
}

/// A part sent to its worker: where its outcome will come from, or the outcome now.
type Routed = Result<oneshot::Receiver<Outcome>, Outcome>;

/// Where a request's answer will come from: one worker, or (in a cluster) several, whose
/// answers are [`combine`]d.
enum Answer {
    One(Routed),
    /// A cluster request's parts (its budget taken), kept to be sent again if redirected.
    Parts(Vec<Part>),
}

/// One part of a cluster request: one slot's keys of a delete, or one master's flush.
struct Part {
    /// Who it runs as (database 0 for `FLUSHALL`).
    who: Identity,
    what: PartOf,
    deadline: Instant,
    received: Instant,
    admission: Arc<Admission>,
}

enum PartOf {
    Delete {
        keys: Vec<Bytes>,
        unlink: bool,
    },
    /// The flush of the master serving `slot` (the first of its slots when it was sent).
    Flush {
        all: bool,
        sync: Option<bool>,
        slot: u16,
    },
}

impl Part {
    /// The slot whose master runs it.
    fn slot(&self) -> Option<u16> {
        match &self.what {
            PartOf::Delete { keys, .. } => keys.first().map(|k| crate::cluster::slot::key_slot(k)),
            PartOf::Flush { slot, .. } => Some(*slot),
        }
    }
}

/// A cluster delete's keys by slot, each slot's in the client's order.
fn by_slot(keys: Vec<Bytes>) -> Vec<Vec<Bytes>> {
    let slotted = keys
        .into_iter()
        .map(|key| (crate::cluster::slot::key_slot(&key), key));
    crate::cluster::slot::by_slot(slotted)
        .into_iter()
        .map(|(_, keys)| keys)
        .collect()
}

/// Whether a Redis error says a command did not run because its slot is served elsewhere
/// or not now (a cluster's redirections, or a master demoted to a replica).
fn not_here(error: &str) -> bool {
    ["MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "READONLY"]
        .iter()
        .any(|p| error.starts_with(p))
}

async fn answered(answer: Routed) -> Outcome {
    match answer {
        Ok(rx) => rx.await.unwrap_or(Outcome::NotApplied(Refusal::WorkerGone)),
        Err(outcome) => outcome,
    }
}

/// One client request's outcome from its parts' (a cluster delete split by master, a flush
/// of every master): counts summed and flushes done when every part ran; the first
/// refusal when none ran (passed through if one part must be: the client's own command
/// then runs whole); unknown when some ran and some did not, as a lost connection would
/// leave it (G4: never a count or an `+OK` for what was not applied, nor a refusal for what
/// was).
fn combine(parts: Vec<Outcome>) -> Outcome {
    let ran = |o: &Outcome| matches!(o, Outcome::Count(_) | Outcome::Flushed);
    let not_run = |o: &Outcome| {
        matches!(
            o,
            Outcome::NotApplied(_) | Outcome::Redis(_) | Outcome::PassThrough(_)
        )
    };
    if !parts.is_empty() && parts.iter().all(ran) {
        let counts: Option<i64> = parts
            .iter()
            .map(|o| match o {
                Outcome::Count(n) => Some(*n),
                _ => None,
            })
            .sum();
        return match counts {
            Some(total) => Outcome::Count(total),
            None if parts.iter().all(|o| *o == Outcome::Flushed) => Outcome::Flushed,
            None => Outcome::Unknown,
        };
    }
    if !parts.is_empty() && parts.iter().all(not_run) {
        if let Some(pass) = parts.iter().find(|o| matches!(o, Outcome::PassThrough(_))) {
            return pass.clone();
        }
        return parts.into_iter().next().unwrap_or(Outcome::Unknown);
    }
    Outcome::Unknown
}

/// Takes queue slots for `requests` requests with `keys` keys in all, as
/// `invalidation.on_full` says: wait for room (up to their deadline) or give up at once.
async fn admit(
    shared: &Shared,
    requests: usize,
    keys: usize,
    deadline: Instant,
) -> Result<Admission, Refusal> {
    let inv = &shared.config.invalidation;
    let wait = inv.on_full == OnFull::Wait;
    // A group larger than the whole queue takes all of it rather than never fitting.
    let slots = requests.clamp(1, inv.max_pending.max(1)) as u32;
    // A request larger than the whole key budget takes all of it rather than never fitting.
    let keys = keys.min(inv.max_pending_keys) as u32;
    // Some(permit) when taken (None for zero units); None when there is no room.
    let take = |sem: &Arc<Semaphore>, n: u32| {
        let sem = sem.clone();
        async move {
            if n == 0 {
                return Some(None);
            }
            let permit = if wait {
                sem.acquire_many_owned(n).await.ok()
            } else {
                sem.try_acquire_many_owned(n).ok()
            };
            permit.map(Some)
        }
    };
    let attempt = async {
        let request = take(&shared.requests, slots)
            .await
            .ok_or(Refusal::QueueFull {
                what: "requests",
                setting: "invalidation.max_pending",
                limit: inv.max_pending,
            })?;
        let keys = take(&shared.pending_keys, keys)
            .await
            .ok_or(Refusal::QueueFull {
                what: "keys",
                setting: "invalidation.max_pending_keys",
                limit: inv.max_pending_keys,
            })?;
        Ok(Admission::new(request, keys, requests))
    };
    let refusal = if wait {
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(admission)) => return Ok(admitted(shared, admission)),
            _ => Refusal::QueueStayedFull {
                max_wait: inv.max_wait,
            },
        }
    } else {
        match attempt.await {
            Ok(admission) => return Ok(admitted(shared, admission)),
            Err(refusal) => refusal,
        }
    };
    if !shared.refusing.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            policy = if wait { "wait" } else { "reject" },
            "invalidation limit engaged: the queue is full and requests are refused (not applied)"
        );
    }
    Err(refusal)
}

/// Notes that requests are admitted again after a period of refusals.
fn admitted(shared: &Shared, admission: Admission) -> Admission {
    if shared.refusing.load(Ordering::Relaxed) && shared.refusing.swap(false, Ordering::Relaxed) {
        tracing::info!("invalidation limit released: the queue admits requests again");
    }
    admission
}

/// Removes repeated keys from one request, keeping first occurrences in order: Redis counts
/// `DEL a a` as one key removed at most.
fn dedup(keys: Vec<Bytes>) -> Vec<Bytes> {
    if keys.len() < 2 {
        return keys;
    }
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.into_iter()
        .filter(|k| seen.insert(k.clone()))
        .collect()
}

/// Takes `n` units of a rate budget, in bites of at most `burst`, counting what it took in
/// `taken` (units already taken for this plan are not taken again). When the rest cannot
/// be had by `deadline`, nothing more is taken and the error says when it could be: the
/// caller answers the requests that cannot wait that long instead of spending budget on
/// them (governor's `check_n` shows the wait without spending).
async fn take(
    limiter: &DefaultDirectRateLimiter,
    burst: u32,
    per_second: u32,
    n: u64,
    taken: &mut u64,
    deadline: Instant,
) -> Result<(), Instant> {
    let unit = Duration::from_secs(1) / per_second.max(1);
    while *taken < n {
        let left = n - *taken;
        let bite = left.min(u64::from(burst.max(1)));
        // The bites after this one need at least this long, however full the budget is now.
        let later = unit.saturating_mul(u32::try_from(left - bite).unwrap_or(u32::MAX));
        let Some(bite_nz) = u32::try_from(bite).ok().and_then(NonZeroU32::new) else {
            break;
        };
        if Instant::now() + later > deadline {
            return Err(Instant::now() + later);
        }
        match limiter.check_n(bite_nz) {
            Ok(Ok(())) => *taken += bite,
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                let ready = Instant::now() + wait + later;
                if ready > deadline {
                    return Err(ready);
                }
                tokio::time::sleep(wait).await;
            }
            // A bite larger than the limiter's burst (a reload changed it meanwhile): it can
            // never be had.
            Err(_) => return Err(deadline + Duration::from_secs(1)),
        }
    }
    Ok(())
}
