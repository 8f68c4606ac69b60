//! The cluster as stormwall routes to it: which master serves each slot now, and a pool of
//! shared connections per master.
//!
//! A [`Node`] is one master's address with an `[upstream]` of its own: a copy of the
//! configured one whose [`Target`] points at that node. That is all the shared-connection
//! machinery needs ([`Pools`], [`Group`](crate::upstream::pool::Group),
//! [`Mux`](crate::upstream::mux::Mux) connect wherever their configuration's target says),
//! so each node gets exactly what a standalone Redis gets — groups per client identity,
//! handshakes, spares, reconnection — with no change to it.
//!
//! The slot map is a [`Map`]: a topology plus the node of each shard, numbered by an
//! *epoch* that grows each time a refresh routes some slot elsewhere. A session routes by
//! one map at a time and, before it uses a newer one, waits until every command it sent
//! under the old one has been answered (redirections included): otherwise a command sent
//! late to the new owner could overtake an earlier one still being redirected there.
//!
//! The map is refreshed ([`topology::refresh`]) when a node answers `MOVED` for a slot the
//! map gives it, when a node cannot be reached or a connection to one fails, and every
//! [`PERIODIC`] anyway; requests for a refresh that arrive while one runs are served by the
//! next one, at most one every [`MIN_SPACING`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use metrics::{Counter, Gauge};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::keys::{CommandKeys, Keys};
use super::topology::{self, Topology};
use crate::config::{UpstreamConfig, UpstreamKind};
use crate::net::Addr;
use crate::resp::request::Command;
use crate::upstream::pool::{Key, PoolMetrics, Pools, Unavailable};
use crate::upstream::{Conn, Identity, Target};

/// How often the slot map is asked for when nothing suggested a change.
pub const PERIODIC: Duration = Duration::from_secs(5);
/// Least time between two refreshes (a burst of `MOVED` during resharding asks for one
/// per redirected command).
pub const MIN_SPACING: Duration = Duration::from_millis(50);

/// One master: where it is, and the shared connections to it.
pub struct Node {
    pub address: Addr,
    /// `[upstream]` with this node's address as its target, and no outage wait of its own:
    /// when a node cannot be reached the router decides where to try next, not the pool.
    pub cfg: UpstreamConfig,
    pub pools: Pools,
    /// `stormwall_cluster_node_commands_total{node}`: client commands sent to it.
    pub commands: Counter,
    /// `stormwall_cluster_node_connections{node}`: connections open to it carrying
    /// clients' commands (shared and private).
    pub connections: Gauge,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.address)
    }
}

/// The slot map sessions route by.
pub struct Map {
    /// Grows each time some slot is routed elsewhere.
    pub epoch: u64,
    topology: Option<Topology>,
    /// The node of each of the topology's shards, by shard index.
    masters: Vec<Arc<Node>>,
}

impl Map {
    /// Whether any node has given a slot map yet.
    pub fn is_known(&self) -> bool {
        self.topology.is_some()
    }

    /// The index (in [`masters`](Self::masters)) of the master serving `slot`, if one does.
    pub fn master_of(&self, slot: u16) -> Option<usize> {
        self.topology.as_ref()?.shard_index(slot)
    }

    /// The masters, by shard index.
    pub fn masters(&self) -> &[Arc<Node>] {
        &self.masters
    }

    /// The first slot the master at `master` serves (where a flush meant for it goes if
    /// another master takes its slots over).
    pub fn first_slot_of(&self, master: usize) -> Option<u16> {
        let shard = self.topology.as_ref()?.shards().get(master)?;
        shard.ranges.iter().map(|r| r.0).min()
    }

    /// The masters in the order of the first slot each serves (so a failover, which keeps a
    /// shard's slots, keeps a master's place): the order `SCAN` walks them in.
    pub fn masters_by_slot(&self) -> Vec<usize> {
        let Some(topology) = &self.topology else {
            return Vec::new();
        };
        let mut order: Vec<(u16, usize)> = topology
            .shards()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.ranges.iter().map(|r| r.0).min().map(|first| (first, i)))
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, i)| i).collect()
    }
}

/// Metric handles the router updates.
#[derive(Clone)]
pub struct RouterMetrics {
    pub refresh_ok: Counter,
    pub refresh_failed: Counter,
    pub map_changes: Counter,
    /// Masters of a new map that were replicas in the one before.
    pub failovers: Counter,
    /// Slots the current map gives a master.
    pub slots_served: Gauge,
    /// Masters serving slots in the current map.
    pub masters: Gauge,
    /// By [`super::redirect::Redirect::label`]: moved, ask, tryagain, clusterdown.
    pub redirects: [Counter; 4],
}

/// The cluster's routing state, shared by every session.
pub struct Router {
    /// `upstream.seeds`, asked after the nodes of the last map.
    seeds: Vec<String>,
    /// `[upstream]` as configured at start (timeouts, TLS): each node's is a copy.
    base: UpstreamConfig,
    /// Shared connections per node and identity.
    pub group_size: usize,
    map: ArcSwap<Map>,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    keys: ArcSwapOption<CommandKeys>,
    /// A refresh is wanted (coalesced: one permit).
    wanted: Notify,
    changed: watch::Sender<u64>,
    /// Credentials to ask the cluster with when its default user may not (`requirepass`,
    /// ACLs): the last identity a node accepted for a client's shared connection.
    learned: Mutex<Option<Identity>>,
    pool_metrics: PoolMetrics,
    pub metrics: RouterMetrics,
}

impl Router {
    pub fn new(
        cfg: &UpstreamConfig,
        group_size: usize,
        pool_metrics: PoolMetrics,
        metrics: RouterMetrics,
    ) -> Arc<Router> {
        Arc::new(Router {
            seeds: cfg.seeds.clone(),
            base: cfg.clone(),
            group_size,
            map: ArcSwap::from_pointee(Map {
                epoch: 0,
                topology: None,
                masters: Vec::new(),
            }),
            nodes: Mutex::default(),
            keys: ArcSwapOption::empty(),
            wanted: Notify::new(),
            changed: watch::Sender::new(0),
            learned: Mutex::default(),
            pool_metrics,
            metrics,
        })
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<String, Arc<Node>>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The map to route by now.
    pub fn map(&self) -> Arc<Map> {
        self.map.load_full()
    }

    /// The current map's epoch, without taking a reference to it.
    pub fn epoch(&self) -> u64 {
        self.map.load().epoch
    }

    /// Redis's command table, once a node has given it.
    pub fn command_keys(&self) -> Option<Arc<CommandKeys>> {
        self.keys.load_full()
    }

    /// Asks for a refresh soon (coalesced with any other request).
    pub fn refresh_soon(&self) {
        self.wanted.notify_one();
    }

    /// A node answered `MOVED` for `slot` to `to`: if the map still gives the slot to
    /// another node, it is stale and a refresh is asked for.
    pub fn moved(&self, slot: u16, to: &Addr) {
        let map = self.map.load();
        let agrees = map
            .master_of(slot)
            .and_then(|i| map.masters.get(i))
            .is_some_and(|n| &n.address == to);
        if !agrees {
            self.refresh_soon();
        }
    }

    /// Remembers credentials a node accepted, to ask for the slot map with if the default
    /// user may not.
    pub fn learn(&self, who: &Identity) {
        if who.password.is_some() {
            let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
            if learned.as_ref() != Some(who) {
                *learned = Some(Identity {
                    db: 0,
                    ..who.clone()
                });
            }
        }
    }

    /// The node at `address`, created (with an empty pool) if the router has not met it.
    pub fn node(&self, address: &Addr) -> Arc<Node> {
        let mut nodes = self.nodes();
        if let Some(node) = nodes.get(&address.to_string()) {
            return node.clone();
        }
        let mut cfg = self.base.clone();
        cfg.kind = UpstreamKind::Standalone;
        cfg.address = address.clone();
        cfg.outage_wait = Duration::ZERO;
        cfg.target = Arc::new(Target::default());
        cfg.target.follow(&cfg);
        let label = address.to_string();
        let connections =
            metrics::gauge!("stormwall_cluster_node_connections", "node" => label.clone());
        let mut pool_metrics = self.pool_metrics.clone();
        pool_metrics.mux.node_connections = Some(connections.clone());
        let node = Arc::new(Node {
            address: address.clone(),
            cfg,
            pools: Pools::new(pool_metrics),
            commands: metrics::counter!("stormwall_cluster_node_commands_total", "node" => label),
            connections,
        });
        nodes.insert(address.to_string(), node.clone());
        node
    }

    /// Waits until a slot map is known, or `deadline`: false if it passed first.
    pub async fn wait_known(&self, deadline: Instant) -> bool {
        let mut changed = self.changed.subscribe();
        loop {
            if self.map.load().is_known() {
                return true;
            }
            self.refresh_soon();
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.map.load().is_known(),
            }
        }
    }

    /// Sends `bytes` (`replies` commands) to `node` on a shared connection of `key`'s
    /// group, and returns the receiver their replies will come through. A node that cannot
    /// be reached is reported (and a refresh asked for): nothing was sent.
    pub async fn send_to(
        &self,
        node: &Node,
        key: &Key,
        bytes: &[u8],
        replies: u32,
    ) -> Result<oneshot::Receiver<Vec<Bytes>>, Unavailable> {
        let group = node.pools.group(key, self.group_size);
        loop {
            let mux = match group
                .connection(group.assign(), &node.pools, &node.cfg)
                .await
            {
                Ok(mux) => mux,
                Err(e) => {
                    if matches!(e, Unavailable::Outage(_)) {
                        self.refresh_soon();
                    }
                    return Err(e);
                }
            };
            if let Some(rx) = mux.capture(bytes, replies) {
                node.commands.increment(u64::from(replies));
                return Ok(rx);
            }
            // The connection failed just now: the group opens another.
        }
    }

    /// The slot a command hashes to, found from its encoded bytes (the rare path: a
    /// redirected command being sent again). `None`: no keys, or keys in several slots.
    pub fn slot_of_encoded(&self, command: &[u8]) -> Option<u16> {
        let keys = self.command_keys()?;
        let args = crate::resp::request::decode_commands(command)?.pop()?;
        let cmd = Command::Inline { args: &args };
        match keys.hashed(&cmd) {
            Keys::Found(found) => found.slot().ok().flatten(),
            _ => None,
        }
    }

    /// Refreshes the map now (see the module doc for when), and loads the command table if
    /// it is not loaded yet.
    pub async fn refresh(&self) {
        let map = self.map();
        let mut seeds: Vec<String> = Vec::new();
        if let Some(t) = &map.topology {
            seeds.extend(t.masters().map(|n| n.address.to_string()));
            seeds.extend(t.nodes().map(|n| n.address.to_string()));
        }
        seeds.extend(self.seeds.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        seeds.retain(|s| seen.insert(s.clone()));
        let mut who = Identity::default();
        let mut result = topology::refresh(&seeds, &self.base, &who).await;
        let learned = self
            .learned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if result.is_err()
            && let Some(learned) = learned
        {
            who = learned;
            result = topology::refresh(&seeds, &self.base, &who).await;
        }
        match result {
            Ok(topology) => {
                self.metrics.refresh_ok.increment(1);
                self.install(topology);
            }
            Err(e) => {
                self.metrics.refresh_failed.increment(1);
                warn!(error = %e, "cannot get the cluster's slot map");
            }
        }
        if self.keys.load().is_none() {
            self.load_keys(&who).await;
        }
    }

    /// Takes a new topology; a new epoch if it routes some slot elsewhere.
    fn install(&self, topology: Topology) {
        let current = self.map.load_full();
        if current
            .topology
            .as_ref()
            .is_some_and(|t| t.routes_like(&topology))
        {
            // Same routing: keep the epoch, take the fresher view of the nodes (the next
            // refresh asks them).
            self.map.store(Arc::new(Map {
                epoch: current.epoch,
                topology: Some(topology),
                masters: current.masters.clone(),
            }));
            return;
        }
        let masters: Vec<Arc<Node>> = topology
            .shards()
            .iter()
            .map(|s| self.node(&s.master.address))
            .collect();
        let primary = topology
            .master_for(0)
            .or_else(|| topology.masters().next())
            .map(|n| n.address.clone());
        let epoch = current.epoch + 1;
        self.metrics.slots_served.set(topology.covered() as f64);
        self.metrics.masters.set(masters.len() as f64);
        if let Some(before) = &current.topology {
            let promoted = topology.promotions_since(before);
            if promoted > 0 {
                info!(
                    promoted,
                    "a replica of the cluster took over its master's slots"
                );
                self.metrics.failovers.increment(promoted as u64);
            }
        }
        if current.is_known() {
            info!(
                masters = masters.len(),
                covered = topology.covered(),
                "the cluster's slot map changed"
            );
            self.metrics.map_changes.increment(1);
        } else {
            info!(
                masters = masters.len(),
                covered = topology.covered(),
                answered_by = topology.answered_by(),
                "cluster slot map loaded"
            );
        }
        if !topology.is_complete() {
            warn!(
                covered = topology.covered(),
                "the cluster's slot map leaves slots without a master"
            );
        }
        self.map.store(Arc::new(Map {
            epoch,
            topology: Some(topology),
            masters: masters.clone(),
        }));
        // Nodes no longer in the map, and that no session holds, are forgotten.
        self.nodes().retain(|_, node| {
            masters.iter().any(|m| Arc::ptr_eq(m, node)) || Arc::strong_count(node) > 1
        });
        if let Some(primary) = primary {
            self.base.target.cluster_node(primary, &self.base);
        }
        self.changed.send_replace(epoch);
    }

    async fn load_keys(&self, who: &Identity) {
        let map = self.map();
        for node in map.masters() {
            let deadline = Instant::now() + self.base.connect_timeout;
            let attempt = async {
                let mut conn = Conn::connect_to(&node.address, &self.base)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.establish(&who.commands(), deadline)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                CommandKeys::load(&mut conn, deadline).await
            };
            match attempt.await {
                Ok(keys) => {
                    debug!(commands = keys.len(), node = %node.address, "command table loaded");
                    self.keys.store(Some(Arc::new(keys)));
                    return;
                }
                Err(e) => debug!(error = %e, node = %node.address, "cannot load the command table"),
            }
        }
    }

    /// Refreshes at start, then keeps the map current (see the module doc) until `stop`.
    pub async fn follow(&self, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PERIODIC) => {}
                _ = self.wanted.notified() => {}
                _ = sweep.tick() => {
                    // Groups of identities no client uses any more close, as the
                    // standalone pool's maintenance does.
                    let nodes: Vec<Arc<Node>> = self.nodes().values().cloned().collect();
                    nodes.iter().for_each(|n| n.pools.sweep());
                    continue;
                }
            }
            self.refresh().await;
            tokio::time::sleep(MIN_SPACING).await;
        }
    }
}
