//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes` processes on free
//! loopback ports, joined by `redis-cli --cluster create`, each stopped by pid when the
//! [`Cluster`] drops (they are [`Redis`] handles).
//!
//! What the tests ask of the cluster they ask of Redis itself (`CLUSTER KEYSLOT`,
//! `CLUSTER SLOTS`, `ROLE`), never of stormwall's code, so the harness is an independent
//! oracle for `stormwall::cluster`.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{Frame, Raw, Redis, Stormwall, as_int, free_port, is_error, text};

/// How long the cluster may take to agree after a change (a failover is about two node
/// timeouts; a busy machine adds more).
const SETTLE: Duration = Duration::from_secs(30);

/// A Redis Cluster of real processes.
pub struct Cluster {
    /// Every node, in the order they were started (killed ones included).
    pub nodes: Vec<Redis>,
    /// How long [`Cluster::start`] took, from the first process to an agreed, synced
    /// cluster.
    pub started_in: Duration,
}

/// One contiguous slot range and the master serving it, as `CLUSTER SLOTS` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub master_port: u16,
    pub master_id: String,
    pub replica_ports: Vec<u16>,
}

impl Cluster {
    /// `masters` masters with `replicas_per_master` replicas each, every slot assigned, every
    /// node saying `cluster_state:ok` and agreeing on who serves which slots, and every
    /// replica synced with its master.
    pub fn start(masters: usize, replicas_per_master: usize) -> Cluster {
        let began = Instant::now();
        let count = masters * (1 + replicas_per_master);
        let nodes: Vec<Redis> = (0..count).map(|_| Cluster::node()).collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(|n| n.addr()));
        create.args([
            "--cluster-replicas",
            &replicas_per_master.to_string(),
            "--cluster-yes",
        ]);
        let out = create
            .output()
            .expect("cannot run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = Cluster {
            nodes,
            started_in: Duration::ZERO,
        };
        cluster.wait_settled();
        cluster.started_in = began.elapsed();
        cluster
    }

    /// One cluster-enabled `redis-server`: its cluster bus on a port of its own (the default,
    /// port + 10000, may be taken or past 65535), `nodes.conf` in its own directory (kept
    /// across a restart, so it comes back as the same node), no delay before a replica's
    /// first sync, and a replication PING every second.
    fn node() -> Redis {
        // Ports are picked free and released, so another process (another test's cluster
        // bus, say) can take one before this server binds it: then fresh ports are tried.
        let mut problems = Vec::new();
        for _ in 0..4 {
            let bus = free_port().to_string();
            let mut node = Redis {
                port: free_port(),
                args: [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-port",
                    &bus,
                    "--repl-diskless-sync-delay",
                    "0",
                    // A replica counts as available (listed by `CLUSTER SLOTS`, `online` in
                    // `CLUSTER SHARDS`) once its master has sent it something; with nothing
                    // written, that is the replication PING, every 10 s by default.
                    "--repl-ping-replica-period",
                    "1",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                child: None,
                dir: tempfile::tempdir().expect("cannot create a temp dir for Redis"),
            };
            match node.try_spawn() {
                Ok(()) => return node,
                Err(e) => problems.push(e),
            }
        }
        panic!("a cluster node failed to start four times: {problems:?}");
    }

    /// The nodes still running.
    pub fn live(&self) -> impl Iterator<Item = &Redis> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// `host:port` of every node, for seeds.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr()).collect()
    }

    /// The node on `port`.
    pub fn node_at(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn node_at_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// A live node to ask.
    fn any(&self) -> &Redis {
        self.live().next().expect("no cluster node is running")
    }

    /// The slot map as a live node's `CLUSTER SLOTS` gives it.
    pub fn slots(&self) -> Vec<SlotRange> {
        slots_seen_by(self.any())
    }

    /// The masters serving slots, each once, as `CLUSTER SLOTS` says.
    pub fn masters(&self) -> Vec<&Redis> {
        let mut ports: Vec<u16> = self.slots().iter().map(|r| r.master_port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports.into_iter().map(|p| self.node_at(p)).collect()
    }

    /// The replicas of the master on `port`.
    pub fn replicas_of(&self, port: u16) -> Vec<&Redis> {
        let mut ports: Vec<u16> = self
            .slots()
            .into_iter()
            .filter(|r| r.master_port == port)
            .flat_map(|r| r.replica_ports)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports.into_iter().map(|p| self.node_at(p)).collect()
    }

    /// The slot of `key`, as Redis computes it (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &[u8]) -> u16 {
        let reply = self.any().raw().call(&[b"CLUSTER", b"KEYSLOT", key]);
        u16::try_from(as_int(&reply)).expect("a slot number")
    }

    /// The master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> &Redis {
        let range = self
            .slots()
            .into_iter()
            .find(|r| (r.start..=r.end).contains(&slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"));
        self.node_at(range.master_port)
    }

    /// The master serving `key`.
    pub fn node_for_key(&self, key: &[u8]) -> &Redis {
        self.master_of_slot(self.slot_of(key))
    }

    /// A node's cluster id (`CLUSTER MYID`).
    pub fn id(&self, port: u16) -> String {
        text(&self.node_at(port).raw().call(&[b"CLUSTER", b"MYID"]))
    }

    /// Kills the node on `port` with SIGKILL (by its pid), as a crash would.
    pub fn kill(&mut self, port: u16) {
        self.node_at_mut(port).kill();
    }

    /// Starts the node on `port` again, with its `nodes.conf`: it rejoins as itself.
    pub fn restart(&mut self, port: u16) {
        self.node_at_mut(port).restart();
    }

    /// A planned failover (`CLUSTER FAILOVER` on the replica on `port`), waited for until
    /// the cluster has settled with that replica as a master.
    pub fn failover(&self, replica: u16) {
        let reply = self.node_at(replica).raw().call(&[b"CLUSTER", b"FAILOVER"]);
        assert!(!is_error(&reply), "CLUSTER FAILOVER: {reply:?}");
        super::eventually("the replica to become a master", SETTLE, || {
            role(self.node_at(replica)) == "master"
        });
        self.wait_settled();
    }

    /// Moves `count` slots from the master on `from` to the master on `to` with
    /// `redis-cli --cluster reshard`, keys included, and waits until every node agrees.
    pub fn reshard(&self, from: u16, to: u16, count: usize) {
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &self.any().addr()])
            .args(["--cluster-from", &self.id(from)])
            .args(["--cluster-to", &self.id(to)])
            .args(["--cluster-slots", &count.to_string(), "--cluster-yes"])
            .output()
            .expect("cannot run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_settled();
    }

    /// Waits until every live node says `cluster_state:ok`, they all give the same slot
    /// map, and every replica in it is synced with its master.
    pub fn wait_settled(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            match self.unsettled() {
                None => return,
                Some(why) if Instant::now() > deadline => {
                    panic!("the cluster did not settle within {SETTLE:?}: {why}")
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Why the cluster has not settled yet, if it has not.
    fn unsettled(&self) -> Option<String> {
        let mut maps = Vec::new();
        for node in self.live() {
            let info = text(&node.raw().call(&[b"CLUSTER", b"INFO"]));
            if !info.contains("cluster_state:ok") {
                return Some(format!("{} is not in cluster_state:ok", node.addr()));
            }
            // Every replica the node knows, not failed, is listed in its `CLUSTER SLOTS`
            // (Redis lists a replica there, and `CLUSTER SHARDS` calls it `online`
            // rather than `loading`, once its replication offset is known).
            let nodes = text(&node.raw().call(&[b"CLUSTER", b"NODES"]));
            let replicas = nodes
                .lines()
                .filter_map(|l| l.split(' ').nth(2))
                .filter(|flags| flags.contains("slave") && !flags.contains("fail"))
                .count();
            let map = slots_seen_by(node);
            // (A master with several ranges lists its replicas with each.)
            let mut listed: Vec<u16> = map.iter().flat_map(|r| r.replica_ports.clone()).collect();
            listed.sort_unstable();
            listed.dedup();
            let listed = listed.len();
            if listed != replicas {
                return Some(format!(
                    "{} lists {listed} of its {replicas} replicas",
                    node.addr()
                ));
            }
            maps.push((node.port, map));
        }
        let (first_port, first) = maps.first()?.clone();
        for (port, map) in &maps {
            if *map != first {
                return Some(format!(
                    "{port} and {first_port} disagree on the slot map: {map:?} vs {first:?}"
                ));
            }
        }
        for range in &first {
            for &replica in &range.replica_ports {
                let info = text(&self.node_at(replica).raw().call(&[b"INFO", b"replication"]));
                if !info.contains("master_link_status:up") {
                    return Some(format!("replica {replica} is not synced yet"));
                }
            }
        }
        None
    }
}

/// An ACL user `app` (password `secret`) that may run every command on keys `app:*`, on
/// every live node.
pub fn add_app_user(cluster: &Cluster) {
    for node in cluster.live() {
        let reply = node.raw().call(&[
            b"ACL", b"SETUSER", b"app", b"on", b">secret", b"~app:*", b"+@all",
        ]);
        assert_eq!(text(&reply), "OK");
    }
}

/// stormwall in front of `cluster` (every node a seed), shared mode (the only one a cluster
/// takes), with `extra` TOML after `[upstream]`'s keys.
pub fn proxy(cluster: &Cluster, extra: &str) -> Stormwall {
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("\"{s}\"")).collect();
    Stormwall::start(
        &cluster.seeds()[0],
        &format!(
            "kind = \"cluster\"\nseeds = [{}]\nmode = \"shared\"\n{extra}",
            seeds.join(", ")
        ),
    )
}

/// What `ROLE` says first: `master`, `slave`.
pub fn role(node: &Redis) -> String {
    match node.raw().call(&[b"ROLE"]) {
        Frame::Array { data, .. } => data.first().map(text).unwrap_or_default(),
        other => panic!("ROLE: {other:?}"),
    }
}

/// `CLUSTER SLOTS` as `node` sees it, ranges in slot order, replicas by port.
pub fn slots_seen_by(node: &Redis) -> Vec<SlotRange> {
    let reply = node.raw().call(&[b"CLUSTER", b"SLOTS"]);
    let Frame::Array { data: ranges, .. } = reply else {
        panic!("CLUSTER SLOTS: {reply:?}");
    };
    let mut out: Vec<SlotRange> = ranges
        .iter()
        .map(|range| {
            let Frame::Array { data: parts, .. } = range else {
                panic!("CLUSTER SLOTS range: {range:?}");
            };
            let node_port = |f: &Frame| match f {
                Frame::Array { data, .. } => u16::try_from(as_int(&data[1])).expect("a port"),
                other => panic!("CLUSTER SLOTS node: {other:?}"),
            };
            let node_id = |f: &Frame| match f {
                Frame::Array { data, .. } => text(&data[2]),
                other => panic!("CLUSTER SLOTS node: {other:?}"),
            };
            let mut replica_ports: Vec<u16> = parts[3..].iter().map(node_port).collect();
            replica_ports.sort_unstable();
            SlotRange {
                start: u16::try_from(as_int(&parts[0])).expect("a slot"),
                end: u16::try_from(as_int(&parts[1])).expect("a slot"),
                master_port: node_port(&parts[2]),
                master_id: node_id(&parts[2]),
                replica_ports,
            }
        })
        .collect();
    out.sort_by_key(|r| r.start);
    out
}

/// `CLUSTER KEYSLOT` for many keys, pipelined on one connection.
pub fn keyslots(conn: &mut Raw, keys: &[Vec<u8>]) -> Vec<u16> {
    let mut out = Vec::new();
    for key in keys {
        out.extend(super::encode_cmd(&[b"CLUSTER", b"KEYSLOT", key]));
    }
    conn.send(&out);
    keys.iter()
        .map(|_| u16::try_from(as_int(&conn.read_frame())).expect("a slot number"))
        .collect()
}
