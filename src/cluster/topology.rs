//! Which master serves each hash slot: the cluster's map, as one of its nodes sees it.
//!
//! Any node of a Redis Cluster can say who serves which slots; stormwall asks the nodes it
//! knows (the configured seeds, then the nodes of the last map) in turn. Redis 7 answers
//! `CLUSTER SHARDS`: each shard's slot ranges and its nodes, with role, address and health.
//! Older servers only have `CLUSTER SLOTS` (ranges, each with its master and the replicas
//! Redis considers available), which is asked when `CLUSTER SHARDS` is refused.
//!
//! One node's view can be stale or partial: a node cut off from the majority keeps the old
//! owners and says `cluster_state:fail`; while a slot has no live master it is unassigned or
//! still names the failed one. So the first answer that covers all 16384 slots *and* comes
//! from a node saying `cluster_state:ok` is taken at once; if none does, the answer covering
//! the most slots is returned, and [`Topology::is_complete`] / [`Topology::state_ok`] say
//! what it lacks, for the caller to retry soon.
//!
//! Nodes are addressed as `host:port`: the `endpoint` a node announces (its IP by default,
//! or its hostname with `cluster-preferred-endpoint-type hostname`), its `ip` if that is
//! unknown (`?`), or the host of the seed that answered if Redis knows neither (a node that
//! has not learnt its own address yet, or `unknown-endpoint`, which tells clients exactly
//! that). The port is `tls-port` when `upstream.tls` is enabled, `port` otherwise.

use std::fmt;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::time::Instant;

use super::keys::{field, map};
use super::slot::SLOTS;
use crate::config::UpstreamConfig;
use crate::net::Addr;
use crate::upstream::sentinel::host_port;
use crate::upstream::{Conn, Identity};

/// What a node's health is, as `CLUSTER SHARDS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Online,
    /// A replica that has not finished its first sync.
    Loading,
    /// Marked `FAIL` by the cluster.
    Failed,
    /// Not reported (`CLUSTER SLOTS`, which lists no failed replicas but may list a failed
    /// master), or a value this version does not know.
    Unknown,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The node's 40-character cluster id (empty if the server did not say).
    pub id: String,
    /// Where to connect to it.
    pub address: Addr,
    pub health: Health,
}

/// A master, the slots it serves, and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub master: Node,
    pub replicas: Vec<Node>,
    /// The slot ranges it serves (inclusive), in the order the server listed them.
    pub ranges: Vec<(u16, u16)>,
}

/// The slot → master map one node gave.
#[derive(Clone, PartialEq, Eq)]
pub struct Topology {
    /// Masters that serve at least one slot. (`CLUSTER SHARDS` also lists masters without
    /// slots — a new node, or a failed master whose replica took its slots over — which
    /// serve no key and are left out.)
    shards: Vec<Shard>,
    /// For each slot, the index of its shard in `shards`, or [`UNASSIGNED`].
    slots: Box<[u16]>,
    /// Whether the node that answered said `cluster_state:ok`.
    state_ok: bool,
    /// The seed that answered.
    answered_by: String,
}

/// In [`Topology::slots`]: no master serves the slot.
const UNASSIGNED: u16 = u16::MAX;

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("shards", &self.shards)
            .field("covered", &self.covered())
            .field("state_ok", &self.state_ok)
            .field("answered_by", &self.answered_by)
            .finish()
    }
}

impl Topology {
    /// The master serving `slot`, if any (a slot past 16383 has none).
    pub fn master_for(&self, slot: u16) -> Option<&Node> {
        self.shard_for(slot).map(|s| &s.master)
    }

    /// The shard serving `slot`: its master and replicas.
    pub fn shard_for(&self, slot: u16) -> Option<&Shard> {
        let index = *self.slots.get(usize::from(slot))?;
        self.shards.get(usize::from(index))
    }

    /// Every master that serves slots, each once.
    pub fn masters(&self) -> impl Iterator<Item = &Node> {
        self.shards.iter().map(|s| &s.master)
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Every node listed, masters and replicas: whom to ask at the next refresh.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.shards
            .iter()
            .flat_map(|s| std::iter::once(&s.master).chain(&s.replicas))
    }

    /// The index in [`shards`](Self::shards) of the shard serving `slot`, if any.
    pub fn shard_index(&self, slot: u16) -> Option<usize> {
        let index = *self.slots.get(usize::from(slot))?;
        (index != UNASSIGNED).then_some(usize::from(index))
    }

    /// Whether `other` sends every slot to the same master address (health, replicas and
    /// who answered aside): a new map that routes like the old one changes nothing for
    /// clients.
    pub fn routes_like(&self, other: &Topology) -> bool {
        fn master(t: &Topology, index: u16) -> Option<&Addr> {
            t.shards.get(usize::from(index)).map(|s| &s.master.address)
        }
        self.slots.len() == other.slots.len()
            && self
                .slots
                .iter()
                .zip(other.slots.iter())
                .all(|(&a, &b)| master(self, a) == master(other, b))
    }

    /// How many masters here were replicas in `before`: failovers (planned or not) between
    /// the two maps. Nodes are matched by cluster id, or by address where the server gave
    /// no id (`CLUSTER SLOTS` before Redis 4).
    pub fn promotions_since(&self, before: &Topology) -> usize {
        let same = |a: &Node, b: &Node| {
            if a.id.is_empty() || b.id.is_empty() {
                a.address == b.address
            } else {
                a.id == b.id
            }
        };
        self.masters()
            .filter(|m| {
                before
                    .shards
                    .iter()
                    .flat_map(|s| &s.replicas)
                    .any(|r| same(r, m))
            })
            .count()
    }

    /// How many slots have a master.
    pub fn covered(&self) -> usize {
        self.slots.iter().filter(|&&s| s != UNASSIGNED).count()
    }

    /// Whether every slot has a master.
    pub fn is_complete(&self) -> bool {
        self.covered() == SLOTS
    }

    /// Whether the node that answered said `cluster_state:ok` (it sees every slot served
    /// and a majority of masters reachable).
    pub fn state_ok(&self) -> bool {
        self.state_ok
    }

    /// The seed (`host:port`) whose answer this is.
    pub fn answered_by(&self) -> &str {
        &self.answered_by
    }

    /// Builds the map from shards (each with its ranges), checking that no slot is claimed
    /// twice.
    fn from_shards(
        mut shards: Vec<Shard>,
        state_ok: bool,
        answered_by: &str,
    ) -> Result<Topology, String> {
        shards.retain(|s| !s.ranges.is_empty());
        if shards.len() >= usize::from(UNASSIGNED) {
            return Err("more masters than slots".into());
        }
        let mut slots = vec![UNASSIGNED; SLOTS].into_boxed_slice();
        for (index, shard) in shards.iter().enumerate() {
            for &(start, end) in &shard.ranges {
                if start > end || usize::from(end) >= SLOTS {
                    return Err(format!("slot range {start}-{end} is not a range of slots"));
                }
                for slot in &mut slots[usize::from(start)..=usize::from(end)] {
                    if *slot != UNASSIGNED {
                        return Err(format!(
                            "slots {start}-{end} are claimed by two masters at once"
                        ));
                    }
                    *slot = index as u16;
                }
            }
        }
        Ok(Topology {
            shards,
            slots,
            state_ok,
            answered_by: answered_by.to_owned(),
        })
    }
}

/// How addresses in a reply are read: the seed's host stands in for an unknown one, and
/// `tls` picks the port.
struct Reading<'s> {
    seed_host: &'s str,
    tls: bool,
}

/// Reads a `CLUSTER SHARDS` reply (RESP2): a list of shards, each a map with `slots` (a
/// flat list of start, end, start, end, …) and `nodes` (maps with `id`, `port`, `tls-port`,
/// `ip`, `endpoint`, `role`, `health`, …).
fn read_shards(reply: &OwnedFrame, how: &Reading<'_>) -> Result<Vec<Shard>, String> {
    let OwnedFrame::Array(shards) = reply else {
        return Err(unexpected("CLUSTER SHARDS", reply));
    };
    let mut out = Vec::with_capacity(shards.len());
    for shard in shards {
        let shard = map(shard);
        let ranges = match field(&shard, "slots") {
            Some(OwnedFrame::Array(bounds)) if bounds.len() % 2 == 0 => bounds
                .chunks_exact(2)
                .map(|pair| Some((slot_number(&pair[0])?, slot_number(&pair[1])?)))
                .collect::<Option<Vec<_>>>()
                .ok_or("CLUSTER SHARDS: a slot that is not a slot number")?,
            _ => return Err("CLUSTER SHARDS: a shard without a list of slot ranges".into()),
        };
        let Some(OwnedFrame::Array(nodes)) = field(&shard, "nodes") else {
            return Err("CLUSTER SHARDS: a shard without nodes".into());
        };
        let mut master = None;
        let mut replicas = Vec::new();
        for node in nodes {
            let node = map(node);
            let id = field(&node, "id").and_then(text).unwrap_or_default();
            let port_field = if how.tls { "tls-port" } else { "port" };
            let port = match field(&node, port_field) {
                Some(OwnedFrame::Integer(p)) => u16::try_from(*p).ok(),
                _ => None,
            };
            let Some(port) = port else {
                return Err(format!(
                    "CLUSTER SHARDS: node {id} has no {port_field}{}",
                    if how.tls {
                        " (set tls-cluster yes on the nodes, so they know each other's TLS ports)"
                    } else {
                        ""
                    }
                ));
            };
            let host = [field(&node, "endpoint"), field(&node, "ip")]
                .into_iter()
                .flatten()
                .filter_map(text)
                .find(|h| known_host(h))
                .unwrap_or(how.seed_host);
            let health = match field(&node, "health").and_then(text) {
                Some("online") => Health::Online,
                Some("loading") => Health::Loading,
                Some("fail") => Health::Failed,
                _ => Health::Unknown,
            };
            let is_master = field(&node, "role").and_then(text) == Some("master");
            let node = Node {
                id: id.to_owned(),
                address: Addr::Tcp(host_port(host, &port.to_string())),
                health,
            };
            if is_master && master.is_none() {
                master = Some(node);
            } else if is_master {
                return Err("CLUSTER SHARDS: a shard with two masters".into());
            } else {
                replicas.push(node);
            }
        }
        let Some(master) = master else {
            return Err("CLUSTER SHARDS: a shard without a master".into());
        };
        out.push(Shard {
            master,
            replicas,
            ranges,
        });
    }
    Ok(out)
}

/// Reads a `CLUSTER SLOTS` reply: a list of `[start, end, master, replica…]`, each node
/// `[host, port, id, {more addresses}]` (older servers: `[host, port]` or with the id).
/// A master appears once per contiguous range it serves.
fn read_slots(reply: &OwnedFrame, how: &Reading<'_>) -> Result<Vec<Shard>, String> {
    let OwnedFrame::Array(ranges) = reply else {
        return Err(unexpected("CLUSTER SLOTS", reply));
    };
    let mut out: Vec<Shard> = Vec::new();
    for range in ranges {
        let parts = match range {
            OwnedFrame::Array(parts) if parts.len() >= 3 => parts,
            _ => return Err("CLUSTER SLOTS: a range without a master".into()),
        };
        let (Some(start), Some(end)) = (slot_number(&parts[0]), slot_number(&parts[1])) else {
            return Err("CLUSTER SLOTS: a slot that is not a slot number".into());
        };
        let mut nodes = parts[2..]
            .iter()
            .map(|node| slots_node(node, how))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let Some(master) = nodes.next() else {
            return Err("CLUSTER SLOTS: a range without a master".into());
        };
        // Another range of a master already seen (matched by id, or by address if the
        // server gives no ids).
        let same = |s: &&mut Shard| {
            if master.id.is_empty() {
                s.master.address == master.address
            } else {
                s.master.id == master.id
            }
        };
        match out.iter_mut().find(|s| same(s)) {
            Some(shard) => shard.ranges.push((start, end)),
            None => out.push(Shard {
                master,
                replicas: nodes.collect(),
                ranges: vec![(start, end)],
            }),
        }
    }
    Ok(out)
}

/// One node of a `CLUSTER SLOTS` range.
fn slots_node(frame: &OwnedFrame, how: &Reading<'_>) -> Result<Node, String> {
    let parts = match frame {
        OwnedFrame::Array(parts) if parts.len() >= 2 => parts,
        _ => return Err("CLUSTER SLOTS: a node that is not [host, port, …]".into()),
    };
    // The endpoint is null with `unknown-endpoint`, `?` or empty when Redis does not know.
    let host = text(&parts[0])
        .filter(|h| known_host(h))
        .unwrap_or(how.seed_host);
    let port = match &parts[1] {
        OwnedFrame::Integer(p) => u16::try_from(*p).ok(),
        _ => None,
    }
    .ok_or("CLUSTER SLOTS: a node whose port is not a port")?;
    Ok(Node {
        id: parts.get(2).and_then(text).unwrap_or_default().to_owned(),
        address: Addr::Tcp(host_port(host, &port.to_string())),
        health: Health::Unknown,
    })
}

/// Whether `host` names a host (Redis says `?` or nothing when it does not know).
fn known_host(host: &str) -> bool {
    !host.is_empty() && host != "?"
}

fn slot_number(frame: &OwnedFrame) -> Option<u16> {
    match frame {
        OwnedFrame::Integer(n) => u16::try_from(*n).ok(),
        _ => None,
    }
}

fn unexpected(what: &str, reply: &OwnedFrame) -> String {
    match reply {
        OwnedFrame::Error(e) => format!("{what} refused: {e}"),
        _ => format!("{what} answered something other than a list"),
    }
}

fn text(frame: &OwnedFrame) -> Option<&str> {
    match frame {
        OwnedFrame::BulkString(b) => std::str::from_utf8(b).ok(),
        OwnedFrame::SimpleString(s) => std::str::from_utf8(s).ok(),
        _ => None,
    }
}

/// Whether a `CLUSTER INFO` reply says `cluster_state:ok`.
fn says_state_ok(info: &OwnedFrame) -> bool {
    text(info).is_some_and(|info| info.lines().any(|l| l.trim_end() == "cluster_state:ok"))
}

/// Asks the nodes at `seeds` in turn for the slot map (see the module doc for which answer
/// wins), as `who` (a cluster with `requirepass` or ACLs answers only authenticated
/// connections; the database is ignored, a cluster has only 0). Seeds are `host:port`; a
/// refresh should pass the nodes of the last map first and the configured seeds after.
pub async fn refresh(
    seeds: &[String],
    cfg: &UpstreamConfig,
    who: &Identity,
) -> Result<Topology, String> {
    let mut best: Option<Topology> = None;
    let mut problems = Vec::new();
    for seed in seeds {
        match ask(seed, cfg, who).await {
            Ok(topology) if topology.state_ok && topology.is_complete() => return Ok(topology),
            Ok(topology) => {
                if best
                    .as_ref()
                    .is_none_or(|b| topology.covered() > b.covered())
                {
                    best = Some(topology);
                }
            }
            Err(e) => problems.push(format!("{seed}: {e}")),
        }
    }
    match best {
        Some(partial) => Ok(partial),
        None if seeds.is_empty() => Err("no cluster node to ask".into()),
        None => Err(problems.join("; ")),
    }
}

/// One seed's slot map.
async fn ask(seed: &str, cfg: &UpstreamConfig, who: &Identity) -> Result<Topology, String> {
    let address: Addr = seed.parse()?;
    let Addr::Tcp(host_and_port) = &address else {
        return Err("cluster nodes are reached over TCP (host:port)".into());
    };
    let seed_host = host_and_port
        .rsplit_once(':')
        .map_or(host_and_port.as_str(), |(host, _)| host);
    let seed_host = seed_host.trim_start_matches('[').trim_end_matches(']');
    let mut conn = Conn::connect_to(&address, cfg)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut commands = Identity {
        db: 0,
        ..who.clone()
    }
    .commands();
    let logins = commands.len();
    commands.push(cluster(b"INFO"));
    commands.push(cluster(b"SHARDS"));
    let replies = conn
        .call_until(&commands, deadline)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(OwnedFrame::Error(e)) = replies.iter().take(logins).find(|r| is_error(r)) {
        return Err(format!("refused the login: {e}"));
    }
    let (Some(info), Some(shards)) = (replies.get(logins), replies.get(logins + 1)) else {
        return Err("no reply to CLUSTER INFO and CLUSTER SHARDS".into());
    };
    if let OwnedFrame::Error(e) = info {
        return Err(format!("CLUSTER INFO refused: {e}"));
    }
    let how = Reading {
        seed_host,
        tls: cfg.tls.enabled,
    };
    let shards = match shards {
        // Before Redis 7: `ERR unknown subcommand 'SHARDS'`.
        OwnedFrame::Error(_) => {
            let slots = conn
                .call_until(&[cluster(b"SLOTS")], deadline)
                .await
                .map_err(|e| e.to_string())?;
            let reply = slots.first().ok_or("no reply to CLUSTER SLOTS")?;
            read_slots(reply, &how)?
        }
        reply => read_shards(reply, &how)?,
    };
    Topology::from_shards(shards, says_state_ok(info), seed)
}

fn cluster(sub: &'static [u8]) -> Vec<Bytes> {
    vec![Bytes::from_static(b"CLUSTER"), Bytes::from_static(sub)]
}

fn is_error(frame: &OwnedFrame) -> bool {
    matches!(frame, OwnedFrame::Error(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply captured from a real 3-master, 3-replica Redis 7.0.15 cluster on loopback
    /// (`tests/fixtures/README.md` says when).
    fn captured(name: &str) -> OwnedFrame {
        let raw = match name {
            "shards-ok" => &include_bytes!("../../tests/fixtures/cluster-shards-ok.resp")[..],
            "shards-master-failed" => {
                &include_bytes!("../../tests/fixtures/cluster-shards-master-failed.resp")[..]
            }
            "shards-after-failover" => {
                &include_bytes!("../../tests/fixtures/cluster-shards-after-failover.resp")[..]
            }
            "slots-ok" => &include_bytes!("../../tests/fixtures/cluster-slots-ok.resp")[..],
            "slots-after-failover" => {
                &include_bytes!("../../tests/fixtures/cluster-slots-after-failover.resp")[..]
            }
            other => panic!("no fixture {other}"),
        };
        let (frame, len) = redis_protocol::resp2::decode::decode(raw)
            .expect("valid RESP")
            .expect("a whole reply");
        assert_eq!(len, raw.len());
        frame
    }

    const PLAIN: Reading<'static> = Reading {
        seed_host: "seed.example",
        tls: false,
    };

    fn topology(shards: Vec<Shard>) -> Topology {
        Topology::from_shards(shards, true, "127.0.0.1:7101").expect("a consistent map")
    }

    fn port_of(node: &Node) -> String {
        match &node.address {
            Addr::Tcp(a) => a
                .rsplit_once(':')
                .map(|(_, p)| p.to_owned())
                .unwrap_or_default(),
            Addr::Unix(_) => panic!("unix address"),
        }
    }

    #[test]
    fn shards_of_a_healthy_cluster() {
        let t = topology(read_shards(&captured("shards-ok"), &PLAIN).unwrap());
        assert!(t.is_complete() && t.state_ok());
        assert_eq!(t.masters().count(), 3);
        assert_eq!(t.nodes().count(), 6);
        let first = t.master_for(0).unwrap();
        assert_eq!(first.address, Addr::Tcp("127.0.0.1:7101".into()));
        assert_eq!(first.id, "79fcd70557dcb39db2d3089e1b812d4293b94fbd");
        assert_eq!(first.health, Health::Online);
        assert_eq!(port_of(t.master_for(5460).unwrap()), "7101");
        assert_eq!(port_of(t.master_for(5461).unwrap()), "7102");
        assert_eq!(port_of(t.master_for(16383).unwrap()), "7103");
        assert_eq!(t.master_for(16384), None);
        let shard = t.shard_for(12182).unwrap();
        assert_eq!(shard.ranges, [(10923, 16383)]);
        assert_eq!(shard.replicas.len(), 1);
        assert_eq!(port_of(&shard.replicas[0]), "7105");
    }

    #[test]
    fn slots_of_a_healthy_cluster_agree_with_shards() {
        let shards = topology(read_shards(&captured("shards-ok"), &PLAIN).unwrap());
        let slots = topology(read_slots(&captured("slots-ok"), &PLAIN).unwrap());
        assert!(slots.is_complete());
        for slot in 0..SLOTS as u16 {
            let (a, b) = (
                shards.master_for(slot).unwrap(),
                slots.master_for(slot).unwrap(),
            );
            assert_eq!((&a.id, &a.address), (&b.id, &b.address), "slot {slot}");
        }
        assert_eq!(slots.master_for(0).unwrap().health, Health::Unknown);
        assert_eq!(slots.shard_for(0).unwrap().replicas.len(), 1);
    }

    /// The master of 10923-16383 was killed: once the cluster marks it failed, its slots
    /// still name it (and the state is `fail`) until its replica takes over; then the old
    /// master is listed with no slots, and left out.
    #[test]
    fn a_failover_as_shards_show_it() {
        let failed = topology(read_shards(&captured("shards-master-failed"), &PLAIN).unwrap());
        assert!(failed.is_complete());
        assert_eq!(failed.master_for(16383).unwrap().health, Health::Failed);
        assert_eq!(port_of(failed.master_for(16383).unwrap()), "7103");
        let after = read_shards(&captured("shards-after-failover"), &PLAIN).unwrap();
        assert_eq!(after.len(), 4, "the failed master is still listed");
        let after = topology(after);
        assert_eq!(after.masters().count(), 3);
        let new = after.master_for(16383).unwrap();
        assert_eq!(
            (port_of(new).as_str(), new.health),
            ("7105", Health::Online)
        );
        assert!(after.shard_for(16383).unwrap().replicas.is_empty());
        let slots = topology(read_slots(&captured("slots-after-failover"), &PLAIN).unwrap());
        assert_eq!(port_of(slots.master_for(16383).unwrap()), "7105");
    }

    #[test]
    fn a_failover_counts_one_promotion_and_a_refresh_none() {
        let ok = topology(read_shards(&captured("shards-ok"), &PLAIN).unwrap());
        let failed = topology(read_shards(&captured("shards-master-failed"), &PLAIN).unwrap());
        let after = topology(read_shards(&captured("shards-after-failover"), &PLAIN).unwrap());
        assert_eq!(ok.promotions_since(&ok), 0);
        assert_eq!(
            failed.promotions_since(&ok),
            0,
            "marked failed, not replaced yet"
        );
        assert_eq!(after.promotions_since(&failed), 1);
        assert_eq!(after.promotions_since(&ok), 1);
        // CLUSTER SLOTS (ids given) agrees.
        let slots_ok = topology(read_slots(&captured("slots-ok"), &PLAIN).unwrap());
        let slots_after = topology(read_slots(&captured("slots-after-failover"), &PLAIN).unwrap());
        assert_eq!(slots_after.promotions_since(&slots_ok), 1);
    }

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    fn shard_reply(slots: &[i64], nodes: Vec<Vec<(&str, OwnedFrame)>>) -> OwnedFrame {
        let nodes = nodes
            .into_iter()
            .map(|fields| {
                OwnedFrame::Array(fields.into_iter().flat_map(|(k, v)| [bulk(k), v]).collect())
            })
            .collect();
        OwnedFrame::Array(vec![
            bulk("slots"),
            OwnedFrame::Array(slots.iter().map(|&s| OwnedFrame::Integer(s)).collect()),
            bulk("nodes"),
            OwnedFrame::Array(nodes),
        ])
    }

    #[test]
    fn addresses_endpoints_and_tls_ports() {
        let node = |endpoint: &str, ip: &str| {
            vec![
                ("id", bulk("a")),
                ("port", OwnedFrame::Integer(6379)),
                ("tls-port", OwnedFrame::Integer(6380)),
                ("ip", bulk(ip)),
                ("endpoint", bulk(endpoint)),
                ("role", bulk("master")),
            ]
        };
        let address = |endpoint: &str, ip: &str, tls: bool| {
            let reply = OwnedFrame::Array(vec![shard_reply(&[0, 16383], vec![node(endpoint, ip)])]);
            let how = Reading {
                seed_host: "seed.example",
                tls,
            };
            read_shards(&reply, &how).unwrap()[0].master.address.clone()
        };
        let tcp = |s: &str| Addr::Tcp(s.into());
        assert_eq!(
            address("redis-0.internal", "10.0.0.1", false),
            tcp("redis-0.internal:6379")
        );
        assert_eq!(address("?", "10.0.0.1", false), tcp("10.0.0.1:6379"));
        assert_eq!(address("?", "", false), tcp("seed.example:6379"));
        assert_eq!(address("10.0.0.1", "10.0.0.1", true), tcp("10.0.0.1:6380"));
        assert_eq!(address("::1", "::1", false), tcp("[::1]:6379"));
        // A cluster without tls-cluster does not know its nodes' TLS ports.
        let reply = OwnedFrame::Array(vec![shard_reply(
            &[0, 16383],
            vec![vec![
                ("port", OwnedFrame::Integer(1)),
                ("role", bulk("master")),
            ]],
        )]);
        let tls = Reading {
            seed_host: "s",
            tls: true,
        };
        let error = read_shards(&reply, &tls).unwrap_err();
        assert!(error.contains("tls-cluster"), "{error}");
        // CLUSTER SLOTS: a null endpoint (`unknown-endpoint`) is the seed's host.
        let slots = OwnedFrame::Array(vec![OwnedFrame::Array(vec![
            OwnedFrame::Integer(0),
            OwnedFrame::Integer(16383),
            OwnedFrame::Array(vec![OwnedFrame::Null, OwnedFrame::Integer(7000)]),
        ])]);
        let t = topology(read_slots(&slots, &PLAIN).unwrap());
        assert_eq!(t.master_for(1).unwrap().address, tcp("seed.example:7000"));
        assert_eq!(t.master_for(1).unwrap().id, "");
    }

    #[test]
    fn gaps_and_conflicts() {
        let master = |port: i64| {
            vec![
                ("id", bulk(&port.to_string())),
                ("port", OwnedFrame::Integer(port)),
                ("endpoint", bulk("h")),
                ("role", bulk("master")),
            ]
        };
        // Two ranges of one master, and an unassigned gap.
        let reply = OwnedFrame::Array(vec![
            shard_reply(&[0, 99, 200, 16383], vec![master(1)]),
            shard_reply(&[], vec![master(2)]),
        ]);
        let t = topology(read_shards(&reply, &PLAIN).unwrap());
        assert_eq!(t.covered(), SLOTS - 100);
        assert!(!t.is_complete());
        assert_eq!(t.master_for(100), None);
        assert_eq!(
            t.masters().count(),
            1,
            "a master without slots serves nothing"
        );
        // Two masters claiming one slot: not a map to route by.
        let reply = OwnedFrame::Array(vec![
            shard_reply(&[0, 16383], vec![master(1)]),
            shard_reply(&[5, 5], vec![master(2)]),
        ]);
        let shards = read_shards(&reply, &PLAIN).unwrap();
        assert!(Topology::from_shards(shards, true, "s").is_err());
        // Malformed replies.
        for bad in [
            OwnedFrame::Error("ERR This instance has cluster support disabled".into()),
            OwnedFrame::Array(vec![shard_reply(&[0], vec![master(1)])]),
            OwnedFrame::Array(vec![shard_reply(&[0, 70000], vec![master(1)])]),
            OwnedFrame::Array(vec![shard_reply(&[0, 1], vec![])]),
            OwnedFrame::Array(vec![shard_reply(&[0, 1], vec![master(1), master(2)])]),
        ] {
            assert!(read_shards(&bad, &PLAIN).is_err(), "{bad:?}");
        }
        let reversed = OwnedFrame::Array(vec![shard_reply(&[9, 1], vec![master(1)])]);
        let shards = read_shards(&reversed, &PLAIN).unwrap();
        assert!(Topology::from_shards(shards, true, "s").is_err());
        assert!(read_slots(&OwnedFrame::Array(vec![OwnedFrame::Integer(1)]), &PLAIN).is_err());
    }

    #[test]
    fn cluster_state_from_cluster_info() {
        assert!(says_state_ok(&bulk(
            "cluster_enabled:1\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n"
        )));
        assert!(!says_state_ok(&bulk("cluster_state:fail\r\n")));
        assert!(!says_state_ok(&OwnedFrame::Error("ERR".into())));
    }
}
