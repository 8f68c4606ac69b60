//! The invalidation engine: what turns a storm of `DEL`/`UNLINK`/`FLUSHDB`/`FLUSHALL` from
//! many clients into a bounded, smooth load on Redis while every client still gets exactly
//! the answer it asked for (contract points G2–G5).
//!
//! A session hands a governed request to [`Engine::execute`] and waits for the reply bytes.
//! The engine:
//!
//! 1. **admits** it into a bounded queue (`invalidation.max_pending`, `max_pending_keys`);
//!    when full, the `on_full` policy either makes the session wait (it stops reading from
//!    its client: backpressure) or answers `-BUSY` at once;
//! 2. **routes** it to a worker for its [`Identity`] (user, password, database): requests
//!    are only ever batched with others that could do exactly the same, and are executed on
//!    a connection authenticated as that identity (G5);
//! 3. the worker **batches** whatever is queued when it becomes free (group commit — no
//!    added latency when idle), spends the rate-limit budgets, executes, and answers each
//!    request with its own result. Deletes are in [`delete`], flushes in [`flush`].
//!
//! Every request ends in exactly one reply: its real result, or an error that says whether
//! it was applied (G4). Requests whose `max_wait` passes before execution are answered with
//! `-TRYAGAIN` and never executed later.

mod delete;
mod flush;
mod retry;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::{counter, gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{Config, FlushCommand, OnFull};
use crate::resp::error_reply;
use crate::upstream::Identity;

/// A governed request as the session parsed it.
#[derive(Debug)]
pub enum Request {
    /// `DEL`/`UNLINK key [key …]`; `unlink` says which of the two the client sent (ACL rules
    /// may allow one and not the other).
    Delete { keys: Vec<Bytes>, unlink: bool },
    /// `FLUSHDB`/`FLUSHALL`, `sync` true if the client asked for `SYNC` (false for `ASYNC`,
    /// `None` for neither).
    Flush { all: bool, sync: Option<bool> },
}

/// How a governed request ended, as the session must act on it. One place decides this for
/// every outcome (see the engine's workers), so the error text, the metric label and whether
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
    fn command(&self) -> &'static str {
        match self {
            Request::Delete { .. } => "delete",
            Request::Flush { all: false, .. } => "flushdb",
            Request::Flush { all: true, .. } => "flushall",
        }
    }
}

/// Queue slots held by a request until it is answered.
struct Admission {
    _request: Option<OwnedSemaphorePermit>,
    _keys: Option<OwnedSemaphorePermit>,
}

/// One request travelling to a worker.
struct Job<T> {
    what: T,
    deadline: Instant,
    received: Instant,
    reply: oneshot::Sender<Bytes>,
    _admission: Admission,
}

impl<T> Job<T> {
    fn answer(self, reply: Bytes) {
        // The session may have gone away; the work is done either way.
        let _ = self.reply.send(reply);
    }
}

/// The engine's settings and budgets as of the last (re)load. Workers read a fresh snapshot
/// for each batch, so a reload takes effect at the next batch without touching a connection.
struct Shared {
    config: Arc<Config>,
    keys: Arc<DefaultDirectRateLimiter>,
    commands: Arc<DefaultDirectRateLimiter>,
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
            _ => Arc::new(RateLimiter::direct(quota(
                inv.keys_per_second,
                inv.keys_burst,
            ))),
        };
        let commands = match old {
            Some(o) if same(|i| (i.commands_per_second, i.commands_burst)) => o.commands.clone(),
            _ => Arc::new(RateLimiter::direct(quota(
                inv.commands_per_second,
                inv.commands_burst,
            ))),
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
            requests,
            pending_keys,
            refusing: old.map(|o| o.refusing.clone()).unwrap_or_default(),
        }
    }
}

/// The live settings, swapped whole on reload.
type Live = Arc<ArcSwap<Shared>>;

/// Worker queues by what they serve.
type Workers<K, T> = HashMap<K, mpsc::UnboundedSender<Job<T>>>;

/// The engine sessions call into. Cheap to share behind an `Arc`.
pub struct Engine {
    live: Live,
    deleters: Mutex<Workers<Identity, Vec<Bytes>>>,
    flushers: Mutex<Workers<(Identity, bool), Option<bool>>>,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nz(per_second)).allow_burst(nz(burst))
}

impl Engine {
    pub fn new(config: Arc<Config>) -> Engine {
        Engine {
            live: Arc::new(ArcSwap::from_pointee(Shared::new(config, None))),
            deleters: Mutex::new(HashMap::new()),
            flushers: Mutex::new(HashMap::new()),
        }
    }

    /// Applies a reloaded config from the next request and batch on.
    pub fn reload(&self, config: Arc<Config>) {
        let old = self.live.load_full();
        self.live.store(Arc::new(Shared::new(config, Some(&old))));
    }

    /// Executes a governed request as `who` and says how it ended.
    pub async fn execute(&self, who: &Identity, request: Request) -> Verdict {
        Verdict::Reply(self.execute_reply(who, request).await)
    }

    async fn execute_reply(&self, who: &Identity, request: Request) -> Bytes {
        let shared = self.live.load_full();
        let config = &shared.config;
        let command = request.command();
        counter!("stormwall_invalidation_requests_total", "command" => command).increment(1);
        if let Request::Flush { all, .. } = request {
            let cmd = if all {
                FlushCommand::FlushAll
            } else {
                FlushCommand::FlushDb
            };
            if config.flush.deny.contains(&cmd) {
                let name = if all { "FLUSHALL" } else { "FLUSHDB" };
                counter!("stormwall_invalidation_rejected_total", "reason" => "denied")
                    .increment(1);
                counter!("stormwall_commands_total", "class" => "denied").increment(1);
                return error_reply(&format!(
                    "ERR stormwall: {name} is denied by this proxy's policy (flush.deny); not applied"
                ));
            }
        }
        counter!("stormwall_commands_total", "class" => "governed").increment(1);
        let received = Instant::now();
        let deadline = received + config.invalidation.max_wait;
        let keys = match &request {
            Request::Delete { keys, .. } => keys.len(),
            Request::Flush { .. } => 0,
        };
        counter!("stormwall_invalidation_keys_received_total").increment(keys as u64);
        let admission = match admit(&shared, keys, deadline).await {
            Ok(a) => a,
            Err(reply) => return reply,
        };
        gauge!("stormwall_invalidation_queue_depth").increment(1.0);
        let (tx, rx) = oneshot::channel();
        match request {
            Request::Delete { keys, .. } => {
                let job = Job {
                    what: dedup(keys),
                    deadline,
                    received,
                    reply: tx,
                    _admission: admission,
                };
                self.route(&self.deleters, who.clone(), job, delete::worker);
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
                    reply: tx,
                    _admission: admission,
                };
                self.route(&self.flushers, (target, all), job, flush::worker);
            }
        }
        let reply = rx.await.unwrap_or_else(|_| {
            error_reply("ERR stormwall: invalidation worker stopped before answering; not applied")
        });
        gauge!("stormwall_invalidation_queue_depth").decrement(1.0);
        reply
    }

    /// Sends `job` to the worker for `key`, starting one if needed.
    fn route<K, T, F, Fut>(&self, workers: &Mutex<Workers<K, T>>, key: K, job: Job<T>, spawn: F)
    where
        K: std::hash::Hash + Eq + Clone,
        F: FnOnce(Live, K, mpsc::UnboundedReceiver<Job<T>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        // The lock is never held across an await, and a poisoned map is still a valid map.
        let mut map = workers.lock().unwrap_or_else(|p| p.into_inner());
        let sender = map.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(spawn(self.live.clone(), key, rx));
            tx
        });
        if let Err(mpsc::error::SendError(job)) = sender.send(job) {
            job.answer(error_reply(
                "ERR stormwall: invalidation worker is gone; not applied",
            ));
        }
    }
}

/// Takes queue slots for a request with `keys` keys, as `invalidation.on_full` says: wait for
/// room (up to the request's deadline) or give up at once.
async fn admit(shared: &Shared, keys: usize, deadline: Instant) -> Result<Admission, Bytes> {
    let inv = &shared.config.invalidation;
    let wait = inv.on_full == OnFull::Wait;
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
        let request = take(&shared.requests, 1).await.ok_or((
            "requests",
            "invalidation.max_pending",
            inv.max_pending,
        ))?;
        let keys = take(&shared.pending_keys, keys).await.ok_or((
            "keys",
            "invalidation.max_pending_keys",
            inv.max_pending_keys,
        ))?;
        Ok(Admission {
            _request: request,
            _keys: keys,
        })
    };
    let refused = if wait {
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(admission)) => return Ok(admitted(shared, admission)),
            _ => error_reply(&format!(
                "TRYAGAIN stormwall: the invalidation queue stayed full for invalidation.max_wait ({}); not applied",
                humantime::format_duration(inv.max_wait)
            )),
        }
    } else {
        match attempt.await {
            Ok(admission) => return Ok(admitted(shared, admission)),
            Err((what, setting, limit)) => error_reply(&format!(
                "BUSY stormwall: invalidation queue is full (too many pending {what}; {setting} = {limit}); not applied, retry later"
            )),
        }
    };
    let reason = if wait { "max_wait" } else { "queue_full" };
    counter!("stormwall_invalidation_rejected_total", "reason" => reason).increment(1);
    if !shared.refusing.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            policy = if wait { "wait" } else { "reject" },
            "invalidation limit engaged: the queue is full and requests are refused (not applied)"
        );
    }
    Err(refused)
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

/// The reply for a request whose deadline passed before it could be executed.
fn expired() -> Bytes {
    counter!("stormwall_invalidation_rejected_total", "reason" => "max_wait").increment(1);
    error_reply(
        "TRYAGAIN stormwall: invalidation not executed within invalidation.max_wait; not applied",
    )
}

/// Waits until `n` units fit the limiter, taking them in burst-sized bites. False if
/// `deadline` came first (the caller then answers the requests whose time is up).
async fn spend(
    limiter: &DefaultDirectRateLimiter,
    burst: u32,
    mut n: usize,
    deadline: Instant,
) -> bool {
    while n > 0 {
        let bite = n.min(burst.max(1) as usize);
        if let Some(bite_nz) = NonZeroU32::new(bite as u32) {
            // Cannot exceed capacity: bites are at most the configured burst.
            if tokio::time::timeout_at(deadline, limiter.until_n_ready(bite_nz))
                .await
                .is_err()
            {
                return false;
            }
        }
        n -= bite;
    }
    true
}
