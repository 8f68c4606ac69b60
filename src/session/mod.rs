//! One client connection: its own upstream Redis connection, commands forwarded in order,
//! replies returned in order (contract point G1).
//!
//! Two halves run concurrently inside the connection's task:
//!
//! * the **request side** reads client bytes, frames and classifies each command, and writes
//!   runs of complete commands to Redis exactly as they arrived (one write per read, however
//!   deep the pipeline);
//! * the **reply side** reads Redis's bytes, frames them, and writes them back to the client.
//!
//! They are linked by an in-order [`queue`] of entries: "the next N replies come from Redis",
//! "send this reply stormwall made itself", or "from here on relay raw bytes". The request
//! side always enqueues an entry *before* writing the bytes it describes, so when a reply
//! arrives its entry is already queued; a reply with no entry means the two sides disagree
//! and the connection is failed rather than risk handing a client someone else's answer.
//!
//! Connection state (transaction, identity) is tracked in [`state`], changed only by Redis's
//! replies.
//!
//! Failure handling (G6): if Redis goes away or stops answering, the replies that arrived
//! whole are delivered and the client connection is closed — exactly what the client would
//! see if Redis itself had failed. No command whose fate is unknown is answered with an error
//! reply, which a client library would take for the command's answer; the library sees a
//! connection error, reconnects and re-establishes its own state (`SELECT`, `AUTH`,
//! subscriptions).

mod cluster;
mod cluster_pins;
mod dispatch;
mod link;
mod queue;
mod replies;
mod requests;
mod sharing;
mod state;

pub use sharing::PIN_REASONS;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, UpstreamMode};
use crate::invalidation::Engine;
use crate::logging::Throttle;
use crate::net::Stream;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{RequestLimits, RequestParser};
use crate::telemetry::Hot;
use crate::upstream::Identity;
use crate::upstream::mux::Inbox;
use crate::upstream::pool::{Key, Pools};
use link::{Replies, SharedLink, Upstream};
use queue::ReplyQueue;
use replies::ReplySide;
use requests::RequestSide;
use state::Confirmed;

use crate::buffers::READ_BUF;
/// Reads are attempted with at least this much free space.
const MIN_READ: usize = 4 * 1024;

/// What every session shares: configuration and process-wide state.
pub struct Context {
    /// The live configuration; each session takes a snapshot when it starts, so a reload
    /// applies to new connections and to the shield at once, and never cuts a connection.
    pub config: ArcSwap<Config>,
    /// Cancelled when the process starts draining.
    pub shutdown: CancellationToken,
    /// Whether the last upstream connection attempt succeeded; flips are logged once each,
    /// so a Redis outage produces two log lines, not one per client.
    pub upstream_up: AtomicBool,
    /// Redis requires a password (its default user is not `nopass`), as the readiness probe
    /// last saw it: clients that have not authenticated then get Redis's pre-authentication
    /// limits from stormwall too, so they cannot make it buffer large requests.
    pub auth_required: AtomicBool,
    /// The invalidation shield every session hands governed commands to.
    pub engine: Engine,
    pub metrics: Hot,
    /// Keeps per-connection warnings from becoming a storm of their own during an outage.
    pub log_throttle: Throttle,
    /// Shared connections and spares (shared mode).
    pub pools: Pools,
    /// The slot map and per-master pools of a Redis Cluster upstream.
    pub cluster: Option<Arc<crate::cluster::router::Router>>,
}

impl Context {
    /// Records the outcome of an attempt to reach Redis (a client's connection or a probe).
    pub fn note_upstream(&self, up: bool, error: Option<&std::io::Error>) {
        self.metrics.upstream_up.set(if up { 1.0 } else { 0.0 });
        if self.upstream_up.swap(up, Ordering::Relaxed) != up {
            let config = self.config.load();
            let up = &config.upstream;
            // Where connections go now (a Sentinel's master, a reloaded address).
            let addr = up
                .target
                .locate(up)
                .map_or_else(|e| e.to_string(), |l| l.address.to_string());
            match error {
                None => info!(upstream = %addr, "upstream Redis reachable"),
                Some(e) => {
                    warn!(upstream = %addr, error = %e, "upstream Redis unreachable; clients get errors until it returns")
                }
            }
        }
    }
}

/// Serves one client until it disconnects, Redis goes away, or the process drains.
pub async fn serve(client: Stream, ctx: Arc<Context>) {
    let cfg = ctx.config.load_full();
    let Some((upstream, replies, admitted, private_epoch)) = connect(&ctx, &cfg).await else {
        // Closed without a reply, as a client connecting to a Redis that is down would
        // be: an error reply could be taken for the answer to its first command.
        let (_, mut w) = client.into_split();
        let _ = w.shutdown().await;
        return;
    };
    let (client_read, client_write) = client.into_split();
    let links = Links {
        ctx: &ctx,
        config: cfg.clone(),
        dead: CancellationToken::new(),
        shutdown: ctx.shutdown.child_token(),
        queue: ReplyQueue::default(),
        state: Mutex::new(Confirmed::new(admitted)),
        authenticated: AtomicBool::new(admitted),
        client_gone: AtomicBool::new(false),
        client_blocked: AtomicBool::new(false),
        blocked: Notify::new(),
        pinned: AtomicBool::new(false),
        private_epoch: AtomicU64::new(private_epoch),
    };
    let limits = &cfg.limits;
    let requests = RequestSide {
        links: &links,
        parser: RequestParser::new(RequestLimits {
            max_bulk_len: limits.max_bulk_len,
            max_array_len: limits.max_array_len,
            max_request_bytes: limits.max_request_bytes,
        }),
        maybe_multi: false,
        multi_enters_raw: false,
        raw: false,
        unframed: false,
        read_at: Instant::now(),
        unsent: AtomicU32::new(0),
    };
    let reply_side = ReplySide {
        links: &links,
        scanner: ReplyScanner::new(limits.max_bulk_len),
        pending: 0,
        blocking: false,
        effect: None,
        replace: None,
        sent: Instant::now(),
    };
    // The upstream write half is only borrowed by the request side, so that it half-closes
    // the connection exactly when the client does (not when it merely stops sending:
    // dropping the half would half-close it too).
    let mut upstream = upstream;
    let requests = async {
        requests.run(client_read, &mut upstream).await;
        links.queue.finish();
    };
    let halves = async { tokio::join!(requests, reply_side.run(replies, client_write)) };
    tokio::pin!(halves);
    tokio::select! {
        _ = &mut halves => {}
        _ = links.moved_away() => {
            debug!("the upstream moved; closing a client with a connection of its own to the old one");
            links.dead.cancel();
            halves.await;
        }
    }
    if links.pinned.load(Ordering::Relaxed) {
        ctx.metrics.private_connections.decrement(1.0);
    }
}

/// The client's way to Redis, and whether Redis admits it without a password: its own
/// connection (dedicated mode), or a place on the shared connections for a new client's
/// state. `None` if Redis cannot be reached.
async fn connect(ctx: &Context, cfg: &Config) -> Option<(Upstream, Replies, bool, u64)> {
    let up = &cfg.upstream;
    let result = match up.mode {
        UpstreamMode::Dedicated => {
            Stream::connect_upstream(up)
                .await
                .map(|(stream, epoch)| {
                    ctx.metrics.connects_ok.increment(1);
                    let (read, write) = stream.into_split();
                    // As Redis decides for a new connection: authenticated if no password
                    // is required.
                    let admitted = !ctx.auth_required.load(Ordering::Relaxed);
                    (
                        Upstream::Socket(write),
                        Replies::Socket(read),
                        admitted,
                        epoch,
                    )
                })
                .inspect_err(|_| ctx.metrics.connects_failed.increment(1))
        }
        UpstreamMode::Shared if ctx.cluster.is_some() => connect_cluster(ctx, cfg).await,
        UpstreamMode::Shared => {
            // Asked of Redis for this client, not taken from the probe's last look: a
            // shared connection opened before Redis required a password must never carry
            // a client that arrived after.
            ctx.pools.admits_without_password(up).await.map(|admitted| {
                let key = Key {
                    identity: Identity::default(),
                    proto: 2,
                    authenticated: admitted,
                };
                let size = up.shared_connections(cfg.runtime.worker_threads);
                let inbox = Arc::new(Inbox::default());
                let link = SharedLink::new(ctx.pools.group(&key, size), inbox.clone());
                (
                    Upstream::Shared(link),
                    Replies::Shared(inbox),
                    admitted,
                    SHARED,
                )
            })
        }
    };
    match result {
        Ok(connected) => {
            ctx.note_upstream(true, None);
            Some(connected)
        }
        Err(e) => {
            ctx.metrics.rejected_upstream.increment(1);
            ctx.note_upstream(false, Some(&e));
            tracing::debug!(error = %e, "cannot reach upstream Redis; closing the client");
            None
        }
    }
}

/// A cluster client's places on the masters' shared connections, once a slot map is known
/// (waited for up to `upstream.outage_wait`). Whether it is admitted without a password is
/// asked of the master of slot 0.
async fn connect_cluster(
    ctx: &Context,
    cfg: &Config,
) -> std::io::Result<(Upstream, Replies, bool, u64)> {
    let up = &cfg.upstream;
    let Some(router) = &ctx.cluster else {
        return Err(std::io::ErrorKind::NotConnected.into());
    };
    if !router.wait_known(Instant::now() + up.outage_wait).await {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "no cluster node has given the slot map",
        ));
    }
    let admitted = admitted_by_a_master(router, up).await?;
    let key = Key {
        identity: Identity::default(),
        proto: 2,
        authenticated: admitted,
    };
    let link = cluster::ClusterLink::new(router.clone(), key);
    // Nothing arrives in it: a cluster client's replies are captured per master.
    let inbox = Arc::new(Inbox::default());
    Ok((
        Upstream::Cluster(link),
        Replies::Shared(inbox),
        admitted,
        SHARED,
    ))
}

/// Whether a cluster master lets a new connection in without a password: asked of the
/// masters in slot order until one answers, the slot map refreshed and the masters asked
/// again while none does (a failover under way), for up to `upstream.outage_wait`.
async fn admitted_by_a_master(
    router: &crate::cluster::router::Router,
    up: &crate::config::UpstreamConfig,
) -> std::io::Result<bool> {
    let deadline = Instant::now() + up.outage_wait;
    let mut backoff = std::time::Duration::from_millis(25);
    loop {
        let map = router.map();
        let mut error = std::io::Error::from(std::io::ErrorKind::NotConnected);
        for master in map.masters_by_slot() {
            let Some(node) = map.masters().get(master) else {
                continue;
            };
            match node.pools.admits_without_password(&node.cfg).await {
                Ok(admitted) => return Ok(admitted),
                Err(e) => error = e,
            }
        }
        router.refresh_soon();
        if Instant::now() + backoff > deadline {
            return Err(error);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
    }
}

/// State the two halves of one session share.
struct Links<'a> {
    ctx: &'a Context,
    /// The configuration this session started with.
    config: Arc<Config>,
    /// Cancelled when either half hits a fatal error; the other half then stops too.
    dead: CancellationToken,
    /// The process-wide shutdown, as a child token of this session's own: polling it locks
    /// only this session's node, not one that every session on every thread shares.
    shutdown: CancellationToken,
    queue: ReplyQueue,
    /// The connection's state as Redis's replies confirmed it (written by the reply side).
    state: Mutex<Confirmed>,
    /// `state.authenticated`, readable without the lock once per client read.
    authenticated: AtomicBool,
    /// The client closed its side; Redis closing next is expected, not a failure.
    client_gone: AtomicBool,
    /// The reply side is waiting for the client to read (a write to it did not complete at
    /// once), and `blocked` is notified when that starts.
    client_blocked: AtomicBool,
    blocked: Notify,
    /// A shared client moved to a private connection (counted in the metrics until it ends).
    pinned: AtomicBool,
    /// The upstream epoch the client's own connection was opened in ([`SHARED`] while it has
    /// none): when the upstream moves, that connection goes to a server that is no longer
    /// the upstream, and the client is closed — its state there (a transaction,
    /// subscriptions, a blocked command) cannot follow it, as it would not for a client
    /// connected to that server directly.
    private_epoch: AtomicU64,
}

/// `Links::private_epoch` of a client without a connection of its own.
const SHARED: u64 = u64::MAX;

impl Links<'_> {
    fn state(&self) -> MutexGuard<'_, Confirmed> {
        // Nothing panics while holding it, and the state stays consistent if it did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether Redis's pre-authentication limits apply to this client now.
    fn unauthenticated(&self) -> bool {
        self.ctx.auth_required.load(Ordering::Relaxed)
            && !self.authenticated.load(Ordering::Acquire)
    }

    /// Applies Redis's verdict on a state-changing command.
    fn confirm(&self, effect: state::Effect, reply: &[u8]) {
        let mut state = self.state();
        state.confirm(effect, reply);
        self.authenticated
            .store(state.authenticated, Ordering::Release);
    }

    /// Resolves once the upstream has moved away from the server this client's own
    /// connection goes to.
    async fn moved_away(&self) {
        let target = &self.config.upstream.target;
        let mut moves = target.subscribe();
        loop {
            let epoch = self.private_epoch.load(Ordering::Acquire);
            if epoch != SHARED && !target.is_current(epoch) {
                return;
            }
            if moves.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Resolves once the reply side is waiting for the client to read.
    async fn client_blocked(&self) {
        loop {
            let notified = self.blocked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.client_blocked.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
