//! Shared connections per upstream identity, and pre-connected spares.
//!
//! A [`Group`] is the set of shared connections for one [`Key`] — the connection state a
//! client established (user and password as Redis accepted them, database, RESP version,
//! and for clients that never authenticated, whether Redis let them in without a password).
//! Connections are opened lazily, put into the key's state by a handshake, and replaced
//! when they fail: a command that needs one while Redis is away waits, reconnecting with
//! backoff, for up to `upstream.outage_wait`.
//!
//! Spares are plain connected sockets, kept ready so that a client moving to a private
//! connection (a pin), or an `AUTH`/`HELLO` being checked, never waits for a connect.
//!
//! This is the only part of stormwall that knows where Redis is: a Cluster or Sentinel
//! upstream would add a router that picks a [`Pools`] per node, not change this.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use metrics::{Counter, Gauge};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::mux::{Mux, MuxMetrics};
use super::{Conn, ConnError, Identity};
use crate::config::{UpstreamConfig, UpstreamKind};

/// A group nobody has used for this long is closed.
const GROUP_IDLE: Duration = Duration::from_secs(30);
/// First and longest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The connection state a shared connection is opened in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub identity: Identity,
    /// RESP version: 2 or 3.
    pub proto: u8,
    /// Whether Redis treats the connection as authenticated. Always true with credentials;
    /// without, it is what Redis decided for the client's own arrival (a password may be
    /// required by now, or no longer).
    pub authenticated: bool,
}

impl Key {
    /// The commands that put a fresh connection into this state.
    fn handshake(&self) -> Vec<Vec<Bytes>> {
        let mut commands = self.identity.commands();
        if self.proto == 3 {
            commands.push(vec![Bytes::from_static(b"HELLO"), Bytes::from_static(b"3")]);
        }
        commands
    }
}

/// Runs `attempt` until it succeeds, Redis refuses for good, or `deadline` would pass:
/// Redis unreachable, or still loading its data, is waited out with backoff.
async fn through_outage<T, F, Fut>(
    metrics: &PoolMetrics,
    deadline: Instant,
    mut attempt: F,
) -> Result<T, ConnError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ConnError>>,
{
    let mut backoff = BACKOFF_MIN;
    let mut waited = false;
    loop {
        let error = match attempt().await {
            Ok(done) => {
                if waited {
                    metrics.outage_recovered.increment(1);
                    debug!("Redis answers again after an outage");
                }
                return Ok(done);
            }
            Err(ConnError::Refused(e)) if !e.starts_with("LOADING") => {
                return Err(ConnError::Refused(e));
            }
            Err(ConnError::Refused(e)) => io::Error::other(e),
            Err(ConnError::Io(e)) => e,
        };
        if Instant::now() + backoff > deadline {
            metrics.outage_timed_out.increment(1);
            return Err(ConnError::Io(error));
        }
        waited = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `RESET`: puts a connection in a new connection's state, authentication included, as
/// Redis would judge it now.
fn reset() -> Vec<Bytes> {
    vec![Bytes::from_static(b"RESET")]
}

/// Groups kept while no client uses them, beyond which unused ones close at once (a client
/// cycling through passwords must not make stormwall hold a connection per password).
const MAX_UNUSED_GROUPS: usize = 16;

/// Metric handles the pools update.
#[derive(Clone)]
pub struct PoolMetrics {
    pub mux: MuxMetrics,
    pub spares: Gauge,
    pub outage_recovered: Counter,
    pub outage_timed_out: Counter,
    pub connects_ok: Counter,
    pub connects_failed: Counter,
}

/// Every group and the spares, for one Redis server.
pub struct Pools {
    groups: Mutex<HashMap<Key, Arc<Group>>>,
    spares: Mutex<Vec<Conn>>,
    /// A spare was taken (or should be checked).
    spare_taken: Notify,
    metrics: PoolMetrics,
}

impl Pools {
    pub fn new(metrics: PoolMetrics) -> Pools {
        Pools {
            groups: Mutex::default(),
            spares: Mutex::default(),
            spare_taken: Notify::new(),
            metrics,
        }
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<Key, Arc<Group>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spare_list(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The group for `key`, created if needed, with `size` connections.
    pub fn group(&self, key: &Key, size: usize) -> Arc<Group> {
        let mut groups = self.groups();
        if !groups.contains_key(key) && groups.len() >= MAX_UNUSED_GROUPS {
            groups.retain(|_, group| {
                let used = Arc::strong_count(group) > 1;
                if !used {
                    group.close();
                }
                used
            });
        }
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Group {
                    key: key.clone(),
                    slots: (0..size.max(1))
                        .map(|_| tokio::sync::Mutex::new(None))
                        .collect(),
                    next: AtomicUsize::new(0),
                    metrics: self.metrics.clone(),
                    idle_since: Mutex::new(None),
                })
            })
            .clone()
    }

    /// A connected socket in Redis's initial state for a new connection, from the spares if
    /// one is ready, else connected now.
    pub async fn spare(&self, cfg: &UpstreamConfig) -> io::Result<Conn> {
        loop {
            let taken = self.spare_list().pop();
            let Some(mut conn) = taken else { break };
            self.metrics.spares.decrement(1.0);
            self.spare_taken.notify_one();
            if !conn.is_closed() {
                return Ok(conn);
            }
        }
        self.spare_taken.notify_one();
        self.connect(cfg).await
    }

    /// A spare in a new connection's state as Redis judges it now (`RESET`), then put into a
    /// client's state by `setup` (a pin's private connection, or the connection a login is
    /// checked on). While Redis is unreachable or still loading its data, retries for up to
    /// `upstream.outage_wait`, as a shared command waits for its connection.
    pub async fn prepared(
        &self,
        cfg: &UpstreamConfig,
        setup: &[Vec<Bytes>],
    ) -> Result<Conn, ConnError> {
        let deadline = Instant::now() + cfg.outage_wait;
        through_outage(&self.metrics, deadline, || async {
            let mut conn = self.spare(cfg).await.map_err(ConnError::Io)?;
            let by = Instant::now() + cfg.reply_wait();
            let mut commands = vec![reset()];
            commands.extend_from_slice(setup);
            match conn.establish(&commands, by).await {
                // No RESET (renamed away, or a Redis before 6.2): a brand-new connection is
                // in a new connection's state without it.
                Err(ConnError::Refused(e)) if e.contains("unknown command") => {
                    let mut fresh = self.connect(cfg).await.map_err(ConnError::Io)?;
                    fresh.establish(setup, by).await?;
                    Ok(fresh)
                }
                result => result.map(|()| conn),
            }
        })
        .await
    }

    /// Returns a spare that is still in Redis's initial state (nothing changed it).
    pub fn give_back(&self, conn: Conn, cfg: &UpstreamConfig) {
        let mut spares = self.spare_list();
        if spares.len() < cfg.spare_connections {
            spares.push(conn);
            self.metrics.spares.increment(1.0);
        }
    }

    async fn connect(&self, cfg: &UpstreamConfig) -> io::Result<Conn> {
        match Conn::connect(cfg).await {
            Ok(conn) => {
                self.metrics.connects_ok.increment(1);
                Ok(conn)
            }
            Err(e) => {
                self.metrics.connects_failed.increment(1);
                Err(e)
            }
        }
    }

    /// Whether Redis lets a new connection in without a password right now: asked on a
    /// spare, after a `RESET` (which makes Redis judge the connection's authentication
    /// again, as for a new one: the spare may have been opened before Redis started, or
    /// stopped, requiring a password). Neither changes anything else, so the spare goes back.
    pub async fn admits_without_password(&self, cfg: &UpstreamConfig) -> io::Result<bool> {
        let mut conn = self.spare(cfg).await?;
        let deadline = Instant::now() + cfg.reply_wait();
        let check = [reset(), vec![Bytes::from_static(b"PING")]];
        let replies = conn.call_raw_until(&check, deadline).await?;
        let noauth = |reply: Option<&Bytes>| reply.is_some_and(|r| r.starts_with(b"-NOAUTH"));
        if replies.first().is_some_and(|r| r.first() == Some(&b'-')) {
            // No RESET (renamed away, or a Redis before 6.2): ask a brand-new connection.
            let mut fresh = self.connect(cfg).await?;
            let ping = [vec![Bytes::from_static(b"PING")]];
            let replies = fresh.call_raw_until(&ping, deadline).await?;
            return Ok(!noauth(replies.first()));
        }
        let admitted = !noauth(replies.get(1));
        self.give_back(conn, cfg);
        Ok(admitted)
    }

    /// Keeps `upstream.spare_connections` spares open and closes idle groups, until
    /// `stop`. `cfg` gives the live configuration.
    pub async fn maintain(
        &self,
        cfg: impl Fn() -> Arc<crate::config::Config>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut backoff = BACKOFF_MIN;
        let mut sweep = tokio::time::interval(GROUP_IDLE / 3);
        loop {
            let config = cfg();
            let upstream = &config.upstream;
            // Spares Redis closed meanwhile (its `timeout`, a restart) are dropped.
            let missing = {
                let mut spares = self.spare_list();
                let before = spares.len();
                spares.retain_mut(|c| !c.is_closed());
                self.metrics
                    .spares
                    .decrement((before - spares.len()) as f64);
                upstream.spare_connections.saturating_sub(spares.len())
            };
            let mut wait = None;
            for _ in 0..missing {
                match self.connect(upstream).await {
                    Ok(conn) => {
                        backoff = BACKOFF_MIN;
                        self.give_back(conn, upstream);
                    }
                    Err(e) => {
                        debug!(error = %e, "cannot open a spare upstream connection");
                        wait = Some(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        break;
                    }
                }
            }
            let pause = wait.unwrap_or(GROUP_IDLE);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.spare_taken.notified(), if wait.is_none() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = sweep.tick() => self.sweep(),
            }
        }
    }

    /// Closes groups no client has held for [`GROUP_IDLE`].
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.groups().retain(|_, group| {
            let mut idle = group.idle_since.lock().unwrap_or_else(|p| p.into_inner());
            // Only this map holds it: no client uses it.
            if Arc::strong_count(group) > 1 {
                *idle = None;
                return true;
            }
            match *idle {
                None => {
                    *idle = Some(now);
                    true
                }
                Some(since) if now - since < GROUP_IDLE => true,
                Some(_) => {
                    drop(idle);
                    group.close();
                    false
                }
            }
        });
    }
}

/// The shared connections for one key.
pub struct Group {
    key: Key,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Mux>>>>,
    /// Round-robin position for assigning clients to connections.
    next: AtomicUsize,
    metrics: PoolMetrics,
    idle_since: Mutex<Option<Instant>>,
}

/// Whether a shared connection can take new clients' commands: alive, and to where the
/// upstream is now.
pub fn usable(mux: &Mux, cfg: &UpstreamConfig) -> bool {
    !mux.is_dead() && cfg.target.is_current(mux.epoch())
}

/// Why no shared connection could be had.
#[derive(Debug)]
pub enum Unavailable {
    /// Redis did not come back within `upstream.outage_wait`.
    Outage(io::Error),
    /// Redis refuses the key's handshake (a changed password, a deleted user, a changed
    /// authentication requirement).
    Refused(String),
}

impl Group {
    /// Which connection a new client uses.
    pub fn assign(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    /// Takes `conn`, already in this group's state (a spare on which Redis just accepted a
    /// client's login), as the connection at `slot` if that one is not open: the group
    /// then needs no handshake of its own, which Redis could refuse by now (a password
    /// rotated since the client logged in).
    pub fn adopt(&self, slot: usize, conn: Conn, cfg: &UpstreamConfig) {
        let Ok(mut current) = self.slots[slot % self.slots.len()].try_lock() else {
            return;
        };
        if current.as_ref().is_some_and(|m| usable(m, cfg)) {
            return;
        }
        let epoch = conn.epoch();
        if !cfg.target.is_current(epoch) {
            return;
        }
        if let Some((read, write)) = conn.into_halves() {
            let mux = Mux::start(read, write, self.metrics.mux.clone(), epoch);
            if let Some(old) = current.replace(mux) {
                old.retire();
            }
        }
    }

    /// The live connection at `slot`, opened (or reopened, with backoff, for up to
    /// `upstream.outage_wait`) if needed.
    pub async fn connection(
        &self,
        slot: usize,
        pools: &Pools,
        cfg: &UpstreamConfig,
    ) -> Result<Arc<Mux>, Unavailable> {
        // One deadline from the client's arrival, however many wait for the same slot.
        let deadline = Instant::now() + cfg.outage_wait;
        let slot = &self.slots[slot % self.slots.len()];
        let Ok(mut current) = tokio::time::timeout_at(deadline, slot.lock()).await else {
            self.metrics.outage_timed_out.increment(1);
            return Err(Unavailable::Outage(io::ErrorKind::TimedOut.into()));
        };
        if let Some(mux) = current.as_ref().filter(|m| usable(m, cfg)) {
            return Ok(mux.clone());
        }
        // The upstream moved: the old connection finishes what is owed on it.
        if let Some(old) = current.take() {
            old.retire();
        }
        match through_outage(&self.metrics, deadline, || self.open(pools, cfg)).await {
            Ok(mux) => {
                *current = Some(mux.clone());
                Ok(mux)
            }
            Err(ConnError::Refused(e)) => Err(Unavailable::Refused(e)),
            Err(ConnError::Io(e)) => Err(Unavailable::Outage(e)),
        }
    }

    async fn open(&self, pools: &Pools, cfg: &UpstreamConfig) -> Result<Arc<Mux>, ConnError> {
        let mut conn = pools.connect(cfg).await.map_err(ConnError::Io)?;
        let epoch = conn.epoch();
        let deadline = Instant::now() + cfg.reply_wait();
        let mut handshake = self.key.handshake();
        // Proves Redis answers, and whether it admits the connection: a key without
        // credentials is only for connections Redis treats as the client's would be.
        handshake.push(vec![Bytes::from_static(b"PING")]);
        let sentinel = cfg.kind == UpstreamKind::Sentinel;
        if sentinel {
            handshake.push(vec![Bytes::from_static(b"ROLE")]);
        }
        let mut replies = conn
            .call_raw_until(&handshake, deadline)
            .await
            .map_err(ConnError::Io)?;
        // Writes only go to a server that says it is the master (a failover may have made
        // it a replica since Sentinel named it): retried until Sentinel names the new one.
        if sentinel
            && let Some(role) = replies.pop()
            && super::sentinel::raw_role_is_not_master(&role)
        {
            return Err(ConnError::Io(super::sentinel::not_master("replica")));
        }
        let (ping, setup) = replies
            .split_last()
            .ok_or(ConnError::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if let Some(refused) = setup.iter().find(|r| r.first() == Some(&b'-')) {
            if refused.starts_with(b"-LOADING") {
                return Err(ConnError::Io(io::Error::other(
                    "Redis is loading its dataset",
                )));
            }
            return Err(ConnError::Refused(
                String::from_utf8_lossy(&refused[1..]).trim_end().to_owned(),
            ));
        }
        if ping.starts_with(b"-LOADING") {
            return Err(ConnError::Io(io::Error::other(
                "Redis is loading its dataset",
            )));
        }
        if ping.starts_with(b"-NOAUTH") == self.key.authenticated {
            return Err(ConnError::Refused(
                "Redis's authentication requirement changed".into(),
            ));
        }
        let (read, write) = conn
            .into_halves()
            .ok_or_else(|| ConnError::Io(io::ErrorKind::InvalidData.into()))?;
        Ok(Mux::start(read, write, self.metrics.mux.clone(), epoch))
    }

    fn close(&self) {
        for slot in &self.slots {
            if let Ok(current) = slot.try_lock()
                && let Some(mux) = current.as_ref()
            {
                mux.close();
            }
        }
    }
}
