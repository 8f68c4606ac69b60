//! A Redis Cluster client's request side: each command routed to the master that serves
//! its keys, over that master's shared connections.
//!
//! The client is not cluster-aware: it pipelines commands for any keys to what it takes
//! for one Redis. Commands framed one after another that go to the same master travel as
//! one run, in one write, as a standalone shared client's do; a command for another master
//! ends the run. Each run (and each command split across masters or sent to all of them)
//! is sent with its replies *captured* ([`SharedLink::capture_later`]) rather than routed
//! to an inbox, and queued, in the client's order, as a [`Dispatch`] for the reply side,
//! which waits for each in turn — resending what a node redirected — and writes the
//! replies to the client in the order the commands came. So replies keep the client's
//! order (G1) however many masters answer them, and a slow master holds up only the
//! replies behind its own, as it would on one Redis.
//!
//! A run is routed by one slot map ([`Map`]). When the router has a newer one, everything
//! sent under the old map is answered (redirections resolved) before anything is routed by
//! the new one: a command for a slot that moved could otherwise reach the new owner before
//! an earlier one for the same slot, sent to the old owner, is redirected there.
//!
//! Connection state is held as for a standalone shared client (`session::state`): `AUTH`
//! and `HELLO` are checked on a spare (to the master of slot 0) and move the client to its
//! new identity's groups on every master; `CLIENT SETNAME` is checked by a master and
//! recorded. `SELECT` goes to a master, which accepts only database 0, as Redis Cluster
//! does.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::time::Instant;
use tracing::debug;

use super::cluster_pins::PrivateConn;
use super::dispatch::{Dispatch, Merge, Part};
use super::link::{SharedLink, Upstream};
use super::queue::Entry;
use super::requests::{Next, RequestSide};
use crate::cluster::merge;
use crate::cluster::route::{self, Route, Split};
use crate::cluster::router::{Map, Node, Router};
use crate::resp::request::Command;
use crate::upstream::mux::Inbox;
use crate::upstream::pool::{Key, Unavailable};

/// First and longest pause before trying again to reach a master that could not be
/// reached (a refresh of the slot map is asked for meanwhile).
const BACKOFF_MIN: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A cluster client's places on the masters' shared connections.
pub(super) struct ClusterLink {
    pub router: Arc<Router>,
    /// The client's connection state: its groups on every master.
    key: Arc<Key>,
    /// The slot map the client's commands are routed by now.
    map: Arc<Map>,
    /// The client's place in each master's group (by the map's master index), once used.
    nodes: Vec<Option<SharedLink>>,
    /// Required by [`SharedLink`]; captured replies never arrive in it.
    inbox: Arc<Inbox>,
    /// Where commands without keys go: the last master used, so a run is not broken up.
    sticky: usize,
    /// The run being framed: the commands at the start of the client's buffer.
    pending: Pending,
    /// The client's connection of its own to one master (`session::cluster_pins`).
    pub(super) private: Option<PrivateConn>,
    /// A `MULTI` was sent, and Redis has not said the transaction ended.
    pub(super) txn_open: bool,
    /// An `EXEC`/`DISCARD` was sent: whether it ended the transaction is known once it is
    /// answered.
    pub(super) txn_closing: bool,
    /// The previous command went to the private connection: the next one on the shared
    /// connections waits until it is answered.
    pub(super) on_private: bool,
    /// The router has been told a master accepted this client's identity (it asks the
    /// cluster for its slot map with it when the default user may not).
    learned: bool,
}

/// A run of commands framed and not sent yet: the client's pipeline, whichever masters
/// its commands are for.
#[derive(Debug, Default)]
struct Pending {
    /// Each command: where it starts in the client's buffer, its length, and the index of
    /// its master's part in `parts`.
    commands: Vec<(usize, usize, usize)>,
    /// One per master the run has commands for, in the order of each master's first.
    parts: Vec<PendingPart>,
}

#[derive(Debug, Clone, Copy)]
struct PendingPart {
    master: usize,
    count: u32,
    /// The first keyed command's slot: where the part goes if the map changes before it
    /// can be sent.
    slot: Option<u16>,
}

impl Pending {
    fn push(&mut self, at: usize, len: usize, master: usize, slot: Option<u16>) {
        let part = match self.parts.iter().position(|p| p.master == master) {
            Some(i) => i,
            None => {
                self.parts.push(PendingPart {
                    master,
                    count: 0,
                    slot,
                });
                self.parts.len() - 1
            }
        };
        let p = &mut self.parts[part];
        p.count += 1;
        p.slot = p.slot.or(slot);
        self.commands.push((at, len, part));
    }

    fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    fn clear(&mut self) {
        self.commands.clear();
        self.parts.clear();
    }
}

impl ClusterLink {
    pub fn new(router: Arc<Router>, key: Key) -> ClusterLink {
        let map = router.map();
        let mut nodes = Vec::new();
        nodes.resize_with(map.masters().len(), || None);
        ClusterLink {
            router,
            key: Arc::new(key),
            map,
            nodes,
            inbox: Arc::new(Inbox::default()),
            sticky: 0,
            pending: Pending::default(),
            private: None,
            txn_open: false,
            txn_closing: false,
            on_private: false,
            learned: false,
        }
    }

    /// The client's connection state, whose groups its commands go to.
    pub(super) fn key(&self) -> &Arc<Key> {
        &self.key
    }

    /// Whether the router has a newer slot map than the one this client routes by.
    pub(super) fn map_is_stale(&self) -> bool {
        self.map.epoch != self.router.epoch()
    }

    /// The master of `slot` (`None`: the one the previous command went to), if the map
    /// names any master.
    pub(super) fn master_node(&self, slot: Option<u16>) -> Option<Arc<Node>> {
        self.map.masters().get(self.master_for(slot)).cloned()
    }

    /// Routes by the router's current map from now on.
    pub(super) fn renew(&mut self) {
        self.map = self.router.map();
        self.nodes.clear();
        self.nodes.resize_with(self.map.masters().len(), || None);
        if self.sticky >= self.nodes.len() {
            self.sticky = 0;
        }
    }

    /// The client's connection state changed (only with nothing in flight): its commands
    /// go to the groups of its new state.
    pub fn rekey(&mut self, key: Key) {
        if *self.key != key {
            self.key = Arc::new(key);
            self.nodes.iter_mut().for_each(|n| *n = None);
            self.learned = false;
        }
    }

    /// The master of `slot`, or any master for a command without keys (or a slot no
    /// master serves now: that master answers `CLUSTERDOWN`, and the command is tried
    /// again).
    fn master_for(&self, slot: Option<u16>) -> usize {
        slot.and_then(|s| self.map.master_of(s))
            .unwrap_or_else(|| self.any())
    }

    /// Any master: the last one a command went to.
    fn any(&self) -> usize {
        self.sticky
    }

    /// Sends `bytes` (`count` commands) to the master at `master` in the current map.
    async fn capture(
        &mut self,
        master: usize,
        bytes: &Bytes,
        count: u32,
    ) -> Result<Part, Unavailable> {
        let Some(node) = self.map.masters().get(master).cloned() else {
            return Err(Unavailable::Outage(std::io::Error::other(
                "the cluster's slot map names no master",
            )));
        };
        let size = self.router.group_size;
        let place = self.nodes[master].get_or_insert_with(|| {
            SharedLink::new(node.pools.group(&self.key, size), self.inbox.clone())
        });
        let rx = place
            .capture_later(&node.pools, &node.cfg, bytes, count)
            .await?;
        node.commands.increment(u64::from(count));
        if !self.learned {
            self.router.learn(&self.key.identity);
            self.learned = true;
        }
        Ok(Part::shared(node, bytes.clone(), count, rx))
    }
}

/// Only empty lines (which Redis skips between commands).
fn is_padding(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == b'\r' || b == b'\n')
}

/// Whether `bytes` holds `commands` (start, length) in order and nothing else but empty
/// lines between them.
fn holds_only(bytes: &[u8], commands: &[(usize, usize, usize)]) -> bool {
    let mut at = 0;
    for &(start, len, _) in commands {
        match bytes.get(at..start) {
            Some(gap) if is_padding(gap) => at = start + len,
            _ => return false,
        }
    }
    bytes.get(at..).is_some_and(is_padding)
}

/// Where a part of a command goes.
#[derive(Debug, Clone, Copy)]
pub(super) enum To {
    /// The master of this slot.
    Slot(u16),
    /// The master at this position in the order `SCAN` walks them.
    Position(usize),
    /// Every master, in that order.
    Every,
}

/// What a cluster client's command becomes.
pub(super) enum Plan {
    /// Forwarded as the client sent it, in a run, to the master of this slot (`None`: any).
    Forward(Option<u16>),
    /// Commands stormwall built (an inline command re-encoded, a split, a fan-out), each
    /// sent on its own, their replies merged.
    Built(Vec<(To, Vec<u8>)>, Merge),
}

/// What a cluster client's `cmd` becomes (its class aside: the caller has decided it is a
/// command for the masters, not one about the connection). `inline` when the client sent
/// it inline: it is then re-encoded, so every command the masters get is multibulk.
pub(super) fn plan(router: &Router, cmd: &Command<'_>, inline: bool) -> Plan {
    let keys = router.command_keys();
    let route = route::route(cmd, keys.as_deref());
    let encoded = || {
        let args: Vec<&[u8]> = (0..cmd.argc()).filter_map(|i| cmd.arg(i)).collect();
        let mut out = Vec::new();
        crate::resp::encode_command(&mut out, &args);
        out
    };
    match route {
        Route::Slot(slot) if inline => Plan::Built(vec![(To::Slot(slot), encoded())], Merge::Each),
        Route::Slot(slot) => Plan::Forward(Some(slot)),
        Route::Any if inline => Plan::Built(vec![(To::Position(0), encoded())], Merge::Each),
        Route::Any => Plan::Forward(None),
        Route::All(fanout) => Plan::Built(vec![(To::Every, encoded())], Merge::Fanout(fanout)),
        Route::Split(split) => split_by_slot(cmd, split),
        Route::Scan => {
            let Some((position, node_cursor)) = cmd.arg(1).and_then(merge::scan_cursor) else {
                // Not a cursor stormwall made: a master judges it, as Redis would.
                return if inline {
                    Plan::Built(vec![(To::Position(0), encoded())], Merge::Each)
                } else {
                    Plan::Forward(None)
                };
            };
            let cursor = node_cursor.to_string();
            let mut args: Vec<&[u8]> = vec![b"SCAN", cursor.as_bytes()];
            args.extend((2..cmd.argc()).filter_map(|i| cmd.arg(i)));
            let mut out = Vec::new();
            crate::resp::encode_command(&mut out, &args);
            Plan::Built(
                vec![(To::Position(position), out)],
                Merge::Scan {
                    position,
                    masters: 0,
                },
            )
        }
    }
}

/// One command per slot, each with the keys of that slot in the client's order.
fn split_by_slot(cmd: &Command<'_>, split: Split) -> Plan {
    let name = cmd.arg(0).unwrap_or_default();
    // Slots in the order their first key comes, each with its keys' positions.
    let slots = crate::cluster::slot::by_slot((1..cmd.argc()).map(|i| {
        (
            crate::cluster::slot::key_slot(cmd.arg(i).unwrap_or_default()),
            i - 1,
        )
    }));
    let parts = slots
        .iter()
        .map(|(slot, places)| {
            let mut args: Vec<&[u8]> = vec![name];
            args.extend(places.iter().filter_map(|&p| cmd.arg(p + 1)));
            let mut out = Vec::new();
            crate::resp::encode_command(&mut out, &args);
            (To::Slot(*slot), out)
        })
        .collect();
    let merge = match split {
        Split::Count => Merge::Sum {
            // `DEL`/`UNLINK` change data: parts that end differently leave the client
            // nothing true to be told (the error would read as "nothing was deleted").
            writes: name.eq_ignore_ascii_case(b"DEL") || name.eq_ignore_ascii_case(b"UNLINK"),
        },
        Split::MGet => Merge::MGet {
            places: slots.into_iter().map(|(_, places)| places).collect(),
            total: cmd.argc() - 1,
        },
    };
    Plan::Built(parts, merge)
}

impl RequestSide<'_> {
    /// Carries out `plan` for the cluster client's command at `buf[*scanned..][..len]`.
    pub(super) async fn cluster(
        &mut self,
        upstream: &mut Upstream,
        buf: &mut BytesMut,
        scanned: &mut usize,
        len: usize,
        plan: Plan,
    ) -> Next {
        let Upstream::Cluster(link) = upstream else {
            return Next::Stop;
        };
        if link.map.epoch != link.router.epoch() {
            // A newer map: what was sent under the old one is answered first.
            if let Next::Stop = self.forward(upstream, buf, *scanned).await {
                return Next::Stop;
            }
            *scanned = 0;
            if let Next::Stop = self.answered().await {
                return Next::Stop;
            }
        }
        let Upstream::Cluster(link) = upstream else {
            return Next::Stop;
        };
        if link.on_private {
            // Back from the private connection: what went there is answered first.
            link.on_private = false;
            if let Next::Stop = self.answered().await {
                return Next::Stop;
            }
        }
        let Upstream::Cluster(link) = upstream else {
            return Next::Stop;
        };
        if link.map.epoch != link.router.epoch() {
            link.renew();
        }
        match plan {
            Plan::Forward(slot) => {
                // Commands for other masters join the run too: the run becomes one write
                // per master, its replies put back in this order (a pipeline of keys on
                // every master is not cut into a write per command).
                let master = link.master_for(slot);
                link.pending.push(*scanned, len, master, slot);
                link.sticky = master;
                *scanned += len;
                Next::Read
            }
            Plan::Built(parts, merge) => {
                if let Next::Stop = self.forward(upstream, buf, *scanned).await {
                    return Next::Stop;
                }
                *scanned = 0;
                buf.advance(len);
                let Upstream::Cluster(link) = upstream else {
                    return Next::Stop;
                };
                self.built(link, parts, merge).await
            }
        }
    }

    /// Sends the commands stormwall built for one client command, and queues their merge.
    async fn built(&self, link: &mut ClusterLink, parts: Vec<(To, Vec<u8>)>, merge: Merge) -> Next {
        let order = link.map.masters_by_slot();
        let masters = order.len();
        // Where each command goes, `Every` expanded.
        let mut sends: Vec<(usize, Option<u16>, Bytes)> = Vec::new();
        for (to, bytes) in parts {
            let bytes = Bytes::from(bytes);
            match to {
                To::Slot(slot) => sends.push((link.master_for(Some(slot)), Some(slot), bytes)),
                To::Position(p) => match order.get(p) {
                    Some(&master) => sends.push((master, None, bytes)),
                    // A cursor for a position this cluster does not have.
                    None => {
                        let reply = Bytes::from_static(b"-ERR invalid cursor\r\n");
                        self.enqueue(Entry::Local(reply)).await;
                        return Next::Read;
                    }
                },
                To::Every => sends.extend(order.iter().map(|&m| (m, None, bytes.clone()))),
            }
        }
        let mut sent = Vec::with_capacity(sends.len());
        for (master, slot, bytes) in sends {
            match self.cluster_send(link, master, slot, bytes, 1).await {
                Some(part) => sent.push(part),
                None => return Next::Stop,
            }
        }
        let mut merge = merge;
        if let Merge::Scan { masters: m, .. } = &mut merge {
            *m = masters;
        }
        self.links.ctx.metrics.passthrough.increment(1);
        let dispatch = Dispatch::new(sent, merge, link.key.clone());
        self.enqueue(Entry::Cluster(Box::new(dispatch))).await;
        Next::Read
    }

    /// Sends the pending run (`bytes`, the client's own) to its masters, and queues it.
    pub(super) async fn cluster_flush(&self, link: &mut ClusterLink, bytes: &[u8]) -> Next {
        if link.pending.is_empty() && is_padding(bytes) {
            // Nothing, or only the empty lines Redis skips.
            return Next::Read;
        }
        let mut pending = std::mem::take(&mut link.pending);
        if !holds_only(bytes, &pending.commands) {
            debug!("cluster client: bytes with no command routed; closing the client");
            self.links.dead.cancel();
            return Next::Stop;
        }
        let count = pending.commands.len() as u64;
        let (parts, merge) = if let [only] = pending.parts[..] {
            // One master: the client's bytes as they came.
            let Some(part) = self
                .cluster_send(
                    link,
                    only.master,
                    only.slot,
                    Bytes::copy_from_slice(bytes),
                    only.count,
                )
                .await
            else {
                return Next::Stop;
            };
            (vec![part], Merge::Each)
        } else {
            // One write per master, each with its commands in the client's order; the
            // reply side puts the replies back in that order.
            let mut writes: Vec<Vec<u8>> = vec![Vec::new(); pending.parts.len()];
            let mut order = Vec::with_capacity(pending.commands.len());
            for &(at, len, part) in &pending.commands {
                writes[part].extend_from_slice(&bytes[at..at + len]);
                order.push(part);
            }
            let mut sent = Vec::with_capacity(writes.len());
            for (p, write) in pending.parts.iter().zip(writes) {
                match self
                    .cluster_send(link, p.master, p.slot, Bytes::from(write), p.count)
                    .await
                {
                    Some(part) => sent.push(part),
                    None => return Next::Stop,
                }
            }
            (sent, Merge::Interleave(order))
        };
        pending.clear();
        link.pending = pending;
        self.links.ctx.metrics.passthrough.increment(count);
        let dispatch = Dispatch::new(parts, merge, link.key.clone());
        self.enqueue(Entry::Cluster(Box::new(dispatch))).await;
        Next::Read
    }

    /// Sends `bytes` (`count` commands, for `slot` if they have keys) to the master at
    /// `master`. A master that cannot be reached is waited for — the slot map refreshed
    /// meanwhile, and the commands sent to the slot's new master if it names one — for up
    /// to `upstream.outage_wait`; then the client is closed, as when a standalone Redis
    /// stays away. Nothing was sent until this returns a part.
    async fn cluster_send(
        &self,
        link: &mut ClusterLink,
        mut master: usize,
        slot: Option<u16>,
        bytes: Bytes,
        count: u32,
    ) -> Option<Part> {
        let links = self.links;
        let deadline = Instant::now() + links.config.upstream.outage_wait;
        let mut backoff = BACKOFF_MIN;
        loop {
            let error = match link.capture(master, &bytes, count).await {
                Ok(part) => return Some(part),
                Err(Unavailable::Refused(e)) => {
                    debug!(error = %e, "a cluster master refuses this client's connection state; closing the client");
                    links.dead.cancel();
                    return None;
                }
                Err(Unavailable::Outage(e)) => e,
            };
            link.router.refresh_soon();
            if Instant::now() + backoff > deadline {
                debug!(error = %error, "no cluster master to send to within upstream.outage_wait; closing the client");
                links.dead.cancel();
                return None;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = links.dead.cancelled() => return None,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            if link.map.epoch != link.router.epoch() {
                // What was sent under the old map is answered before the new one is used.
                tokio::select! {
                    _ = links.queue.drained() => {}
                    _ = links.dead.cancelled() => return None,
                }
                link.renew();
                master = link.master_for(slot);
            }
        }
    }

    /// Sends `out` (`replies` commands stormwall reads itself: a name being checked) to any
    /// master in this client's state, with nothing of its own pending.
    pub(super) async fn cluster_capture(
        &self,
        link: &mut ClusterLink,
        out: &[u8],
        replies: u32,
    ) -> Option<tokio::sync::oneshot::Receiver<Vec<Bytes>>> {
        let master = link.any();
        self.cluster_send(link, master, None, Bytes::copy_from_slice(out), replies)
            .await
            .map(|part| part.rx)
    }

    /// Waits until every reply queued so far has been delivered — or until it is clear the
    /// client is not reading them (it writes a whole pipeline before reading): waiting
    /// could then wait forever, and what follows goes on at once.
    async fn answered(&self) -> Next {
        let links = self.links;
        tokio::select! {
            _ = links.queue.drained() => Next::Read,
            _ = links.dead.cancelled() => Next::Stop,
            _ = links.client_blocked() => Next::Read,
        }
    }
}
